"""One CogVideoX transformer block: expert-adaptive LayerNorm, joint attention, feed-forward.

The paper's "expert adaptive LayerNorm" conditions text and video tokens on the time embedding with *separate*
shift / scale / gate vectors (six vectors per norm: three for video, three for text) while sharing the LayerNorm
itself, so the two modalities live in one sequence without sharing modulation.

    h = [LN-mod(text); LN-mod(video)]       # norm1, joined text first
    text += gate_t * Attn(h)_text;  video += gate_v * Attn(h)_video
    h = [LN-mod(text); LN-mod(video)]       # norm2
    text += gate_t' * FF(h)_text;   video += gate_v' * FF(h)_video

The residual streams stay separate (each modality has its own gate); only the normalised input of attention and
feed-forward is joined, so each of their matrix products runs once over all tokens, as in the reference.

Keys (published): ``norm1.{linear,norm}``, ``attn1.*``, ``norm2.{linear,norm}``, ``ff.net.0.proj``, ``ff.net.2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import TransformerConfig
from .attention import JointAttention


class ExpertAdaLayerNorm(nn.Module):
    """LayerNorm shared by text and video, modulated per modality by the time embedding.

    ``linear`` maps the time embedding to 6 x D, chunked in the published order
    (video shift, video scale, video gate, text shift, text scale, text gate).
    """

    def __init__(
        self, cond_dim: int, dim: int, *, elementwise_affine: bool, eps: float, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(
        self, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """video ``[B, S, D]``, text ``[B, L, D]``, temb ``[B, cond]`` ->
        (modulated [text; video] ``[B, L + S, D]``, video gate ``[B, 1, D]``, text gate ``[B, 1, D]``)."""
        mod = self.linear(F.silu(temb))[:, None, :]  # [B, 1, 6D]
        shift, scale, gate, text_shift, text_scale, text_gate = mod.chunk(6, dim=-1)
        # norm(x) * (1 + scale) + shift, as one addcmul pass per modality.
        joined = torch.cat(
            [
                torch.addcmul(text_shift, self.norm(text), 1 + text_scale),
                torch.addcmul(shift, self.norm(video), 1 + scale),
            ],
            dim=1,
        )
        return joined, gate, text_gate


class FeedForward(nn.Module):
    """``Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)``; keys ``net.0.proj`` and ``net.2`` as published."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None) -> None:
        super().__init__()
        first = nn.Module()
        first.proj = nn.Linear(dim, hidden, device=device, dtype=dtype)
        # Index 1 (dropout in the reference) holds no weights; an Identity keeps the published numbering.
        self.net = nn.ModuleList([first, nn.Identity(), nn.Linear(hidden, dim, device=device, dtype=dtype)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        dim = config.inner_dim
        norm_kwargs = {"elementwise_affine": config.norm_elementwise_affine, "eps": config.norm_eps}
        factory = {"device": device, "dtype": dtype}
        self.norm1 = ExpertAdaLayerNorm(config.time_embed_dim, dim, **norm_kwargs, **factory)
        self.attn1 = JointAttention(
            dim, config.num_attention_heads, config.attention_head_dim, qkv_bias=config.attention_bias, **factory
        )
        self.norm2 = ExpertAdaLayerNorm(config.time_embed_dim, dim, **norm_kwargs, **factory)
        self.ff = FeedForward(dim, 4 * dim, **factory)

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video ``[B, S, D]``, text ``[B, L, D]``, temb ``[B, time_embed_dim]``, rotary tables
        ``[L + S, 1, hd]`` (see :func:`~cogvideox.rope.rotate_pairs`), key_mask ``[B, L + S]`` bool (False:
        padding no token attends to) -> updated (video, text)."""
        text_len = text.shape[1]
        joined, gate, text_gate = self.norm1(video, text, temb)
        out = self.attn1(joined, rotary, key_mask, text_len=text_len)
        # x + gate * f(x) as one addcmul pass; the slices of ``out`` are views.
        text = torch.addcmul(text, text_gate, out[:, :text_len])
        video = torch.addcmul(video, gate, out[:, text_len:])

        joined, gate, text_gate = self.norm2(video, text, temb)
        out = self.ff(joined)
        text = torch.addcmul(text, text_gate, out[:, :text_len])
        video = torch.addcmul(video, gate, out[:, text_len:])
        return video, text
