"""Ulysses sequence parallel for the CogVideoX transformer (Jacobs et al., DeepSpeed-Ulysses, arXiv 2309.14509).

The ``U`` ranks of a Ulysses group share one forward pass. Each holds every text token (``L``, replicated) and a
contiguous ``1/U`` share of the video tokens (``S_loc = ceil(S / U)``; the video is padded with
``pad = U * S_loc - S`` zero tokens at its end, so any latent size works). Everything in a block except attention
acts per token and runs on the local tokens with no communication. Attention needs every token, so around it:

    q, k, v (local)   [B, L + S_loc, H, hd]          heads padded to H' = U * ceil(H / U)
      video part  --all-to-all-->  [B, U * S_loc, H'/U, hd]   all tokens, this rank's H'/U heads
      text part   --slice------->  [B, L,         H'/U, hd]   (replicated: no communication)
    k, v: the last ``pad`` video rows (the padding, one block at the end) dropped -> [B, L + S, H'/U, hd]
    attention of the [text; all video] queries over [text; real video] keys, for H'/U heads
    out  --all-to-all-->  [B, L + S_loc, H', hd]: this rank's video tokens and every text token, all heads
                                                  (the text rows ride along in the same all-to-all)

Dropping the padding keys instead of masking them keeps the kernel call mask-free: "flash" and "sage" take no
mask at all, and PyTorch's SDPA leaves its FlashAttention kernel for a slower one whenever a mask is given. The
padding queries stay (their rows keep the all-to-all regular); their outputs are dropped by :meth:`gather`. Only a
caller's ``frame_mask`` still needs a mask, over the ``L + S`` real keys.

Per block this moves ``3 * B * S * D / U`` values out of each rank and ``B * (S + U * L) * D / U`` back
(``D`` = H' x hd); docs/distributed.md works out the volume per step.

Heads that do not divide by ``U`` (the 2B's 30 over 4 or 8 ranks) are padded with zero heads: a zero query and key
give uniform weights over zero values, an exact 0 that is dropped after the exchange. It costs ``H'/H - 1`` more
attention work (30 -> 32: 6.7 %), where xDiT refuses such degrees.

The rotary table is sliced to the local tokens (identity rows for padding); sin-cos and learned positions are
added before the split, so they need nothing. After the blocks the per-token output norm and projection run on
the local tokens and the small projected output (``p^2 * p_t * C`` channels, 64 or 128, not ``D``) is gathered.

Inference only: the collectives here do not carry gradients.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..ops import attention as attention_kernel

logger = logging.getLogger(__name__)


class UlyssesParallel:
    """The sequence-parallel hooks of one transformer on one Ulysses group.

    Install with :func:`enable_sequence_parallel`; the transformer then calls :meth:`shard` before its blocks and
    :meth:`gather` after its output projection, and each :class:`~cogvideox.transformer.JointAttention` calls
    :meth:`attention` instead of its local kernel.
    """

    def __init__(self, group: dist.ProcessGroup, num_heads: int) -> None:
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_heads = num_heads
        self.local_heads = -(-num_heads // self.degree)  # ceil
        # S of the forward pass in progress, recorded by shard(): attention drops the keys past it (the padding).
        self.video_tokens: int | None = None
        padded = self.local_heads * self.degree
        if padded != num_heads:
            logger.info(
                "%d attention heads over %d Ulysses ranks: padded to %d (%.1f %% more attention work); degrees "
                "dividing %d need no padding",
                num_heads, self.degree, padded, 100 * (padded / num_heads - 1), num_heads,
            )  # fmt: skip

    # ------------------------------------------------------------------------------------ tokens in and out

    def local_tokens(self, video_tokens: int) -> int:
        """Video tokens per rank, ``ceil(S / U)``."""
        return -(-video_tokens // self.degree)

    def real_local_tokens(self) -> int:
        """How many of this rank's ``S_loc`` video tokens in the forward pass in progress are real (the rest, at
        the end of the last ranks' shares, is padding): what a statistic over the tokens must count."""
        per_rank = self.local_tokens(self.video_tokens)
        return max(0, min(per_rank, self.video_tokens - self.rank * per_rank))

    def shard(
        self,
        video: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        key_mask: torch.Tensor | None,
        text_len: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """Keep this rank's share of the video tokens.

        Args:
            video: ``[B, S, D]`` all video tokens (positions already added).
            rotary: (cos, signed sin) ``[L + S, 1, hd]`` for the whole sequence, or None.
            key_mask: ``[B, L + S]`` bool (False: a key no token may attend to), or None.
            text_len: ``L``.
        Returns:
            video ``[B, S_loc, D]``; rotary ``[L + S_loc, 1, hd]`` (text rows, then this rank's rows; identity
            rows for padding tokens); ``key_mask`` unchanged: ``[B, L + S]`` over the whole *unpadded* sequence
            (attention sees every real key after the all-to-all and drops the padding ones), or None.
        """
        batch, tokens, _ = video.shape
        self.video_tokens = tokens
        per_rank = self.local_tokens(tokens)
        pad = per_rank * self.degree - tokens
        start, stop = self.rank * per_rank, (self.rank + 1) * per_rank
        if pad:
            video = torch.cat([video, video.new_zeros(batch, pad, video.shape[2])], dim=1)
        video = video[:, start:stop]
        if rotary is not None:
            cos, sin = rotary
            cos_video, sin_video = cos[text_len:], sin[text_len:]
            if pad:  # identity rotation (cos 1, sin 0) for padding tokens: their values never reach a real token
                cos_video = torch.cat([cos_video, cos_video.new_ones(pad, *cos_video.shape[1:])])
                sin_video = torch.cat([sin_video, sin_video.new_zeros(pad, *sin_video.shape[1:])])
            rotary = (
                torch.cat([cos[:text_len], cos_video[start:stop]]),
                torch.cat([sin[:text_len], sin_video[start:stop]]),
            )
        return video, rotary, key_mask

    def gather(self, local: torch.Tensor, video_tokens: int) -> torch.Tensor:
        """``[B, S_loc, P]`` per-token outputs of every rank -> ``[B, S, P]`` on every rank (padding dropped)."""
        parts = [torch.empty_like(local) for _ in range(self.degree)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :video_tokens]

    # ------------------------------------------------------------------------------------------- attention

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text_len: int,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Joint attention over every rank's tokens.

        Args:
            q, k, v: ``[B, L + S_loc, H, hd]`` (normalised and rotated) for the text tokens and this rank's video
                tokens.
            text_len: ``L``.
            key_mask: ``[B, L + S]`` bool over the whole unpadded sequence (a caller's ``frame_mask``), or None.
        Returns:
            ``[B, L + S_loc, H, hd]``: attention output for the same tokens, all heads.
        """
        degree, heads = self.degree, self.local_heads
        batch, tokens, num_heads, head_dim = q.shape
        per_rank = tokens - text_len
        video_tokens = self.video_tokens
        if video_tokens is None or per_rank != self.local_tokens(video_tokens):
            raise RuntimeError(
                f"Ulysses attention got {per_rank} local video tokens per rank, which does not fit the "
                f"{video_tokens} video tokens recorded by shard(): the transformer must call shard() before its "
                "blocks in the same forward pass (see Transformer.forward)"
            )
        qkv = torch.stack([q, k, v])  # [3, B, N_loc, H, hd]
        if heads * degree != num_heads:
            qkv = torch.cat([qkv, qkv.new_zeros(*qkv.shape[:3], heads * degree - num_heads, head_dim)], dim=3)
        text, video = qkv[:, :, :text_len], qkv[:, :, text_len:]

        # Send head group j of my video tokens to rank j; receive my head group of rank j's tokens.
        send = video.unflatten(3, (degree, heads)).permute(3, 0, 1, 2, 4, 5).contiguous()  # [U, 3, B, S_loc, h, hd]
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        video = received.permute(1, 2, 0, 3, 4, 5).reshape(3, batch, degree * per_rank, heads, head_dim)
        text = text[:, :, :, self.rank * heads : (self.rank + 1) * heads]
        q, k, v = torch.cat([text, video], dim=2).transpose(2, 3).unbind(0)  # each [B, h, L + U S_loc, hd]
        # The padding is the last rows of the gathered video: drop those keys rather than mask them (module doc).
        k, v = k[:, :, : text_len + video_tokens], v[:, :, : text_len + video_tokens]  # [B, h, L + S, hd]

        mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads and queries
        out = attention_kernel(q, k, v, attn_mask=mask).transpose(1, 2)  # [B, L + U S_loc, h, hd]

        # Back: rank j gets the text rows (all ranks computed them for their heads) and its own video tokens.
        text_out = out[:, :text_len].unsqueeze(0).expand(degree, -1, -1, -1, -1)
        video_out = out[:, text_len:].unflatten(1, (degree, per_rank)).transpose(0, 1)
        send = torch.cat([text_out, video_out], dim=2).contiguous()  # [U, B, L + S_loc, h, hd]
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        out = received.permute(1, 2, 0, 3, 4).reshape(batch, tokens, degree * heads, head_dim)
        return out[:, :, :num_heads]


def enable_sequence_parallel(transformer: torch.nn.Module, group: dist.ProcessGroup | None) -> UlyssesParallel | None:
    """Run ``transformer`` sequence-parallel over ``group`` (every rank of the group calls this, and then runs the
    same forward passes with the same inputs). A group of one rank (or None) turns it off. Returns the hooks."""
    disable_sequence_parallel(transformer)
    if group is None or dist.get_world_size(group) == 1:
        return None
    hooks = UlyssesParallel(group, transformer.config.num_attention_heads)
    transformer.set_sequence_parallel(hooks)
    return hooks


def disable_sequence_parallel(transformer: torch.nn.Module) -> None:
    """Back to single-process forward passes."""
    transformer.set_sequence_parallel(None)
