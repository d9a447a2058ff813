"""Full 3D self-attention over the joined [text; video] sequence.

Text and video tokens are projected with the same weights, normalised per head (q/k LayerNorm, eps 1e-6),
rotated by 3D RoPE (video tokens only, after the q/k norm, as in the paper and the reference), and attend to one
another jointly. The kernel is chosen by :mod:`cogvideox.ops.attention`.

Keys (published): ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (all biased except that q/k/v follow
``attention_bias``), ``norm_q``, ``norm_k``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import attention
from ..rope import apply_rotary


class JointAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        factory = {"device": device, "dtype": dtype}
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias, **factory)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias, **factory)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias, **factory)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6, **factory)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6, **factory)
        # A ModuleList so that the published key is ``to_out.0`` (the reference keeps a dropout at index 1).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True, **factory)])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, H*hd]`` -> ``[B, H, L, hd]`` (a view)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        return q, k, self._heads(self.to_v(x))

    def forward(
        self,
        text: torch.Tensor,
        video: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text ``[B, L, D]``, video ``[B, S, D]``, rotary (cos, sin) ``[S, hd]`` -> (text, video) outputs."""
        q_text, k_text, v_text = self._qkv(text)
        q_video, k_video, v_video = self._qkv(video)
        if rotary is not None:
            cos, sin = rotary
            q_video = apply_rotary(q_video, cos, sin)
            k_video = apply_rotary(k_video, cos, sin)
        q = torch.cat([q_text, q_video], dim=2)
        k = torch.cat([k_text, k_video], dim=2)
        v = torch.cat([v_text, v_video], dim=2)
        out = attention(q, k, v).transpose(1, 2).flatten(2)  # [B, L+S, H*hd]
        out = self.to_out[0](out)
        text_len = text.shape[1]
        return out[:, :text_len], out[:, text_len:]
