"""Full 3D self-attention over the joined [text; video] sequence.

Text and video tokens are projected with the same weights, normalised per head (q/k LayerNorm, eps 1e-6),
rotated by 3D RoPE (video tokens only, after the q/k norm, as in the paper and the reference), and attend to one
another jointly. The kernel is chosen by :mod:`cogvideox.ops.attention`.

The caller passes the sequence already joined (``[B, L + S, D]``, text first), so each projection is one matrix
product over all tokens rather than a small one for the 226 text tokens and a large one for the video.

Keys (published): ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (all biased except that q/k/v follow
``attention_bias``), ``norm_q``, ``norm_k``. :meth:`JointAttention.fuse_qkv` replaces the three projections by
one ``to_qkv`` (one matrix product instead of three); ``state_dict()`` still gives the published keys (views of
the fused weight, no copy) and ``load_state_dict`` accepts them, so saving, loading and LoRA keys are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import attention
from ..ops.fp8 import Fp8Linear
from ..ops.linear import is_plain_linear
from ..rope import rotate_pairs

_QKV = ("to_q", "to_k", "to_v")


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
        self.to_q: nn.Module | None = nn.Linear(dim, inner, bias=qkv_bias, **factory)
        self.to_k: nn.Module | None = nn.Linear(dim, inner, bias=qkv_bias, **factory)
        self.to_v: nn.Module | None = nn.Linear(dim, inner, bias=qkv_bias, **factory)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6, **factory)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6, **factory)
        # A ModuleList so that the published key is ``to_out.0`` (the reference keeps a dropout at index 1).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True, **factory)])
        self.to_qkv: nn.Module | None = None
        # Ulysses hooks (cogvideox.distributed.UlyssesParallel) when sequence parallel is on: a plain object, not a
        # submodule, so it never shows in state_dict() or module walks.
        self.sequence_parallel = None
        self.register_state_dict_post_hook(_split_fused_keys)
        self.register_load_state_dict_pre_hook(_join_published_keys)

    @property
    def is_fused(self) -> bool:
        return self.to_qkv is not None

    # ------------------------------------------------------------------ fused projection

    def check_fuse_qkv(self) -> None:
        """Raise TypeError when :meth:`fuse_qkv` cannot stack the projections (one of them is not a plain linear
        layer: a LoRA wrapper or an fp8 layer). Changes nothing."""
        if self.is_fused:
            return
        parts = [getattr(self, name) for name in _QKV]
        if not all(is_plain_linear(p) for p in parts):
            kinds = sorted({type(p).__name__ for p in parts})
            raise TypeError(
                f"fuse_qkv_projections() needs plain nn.Linear q/k/v projections, found {kinds}: fuse q/k/v "
                "first, then load LoRA adapters or enable fp8 weight storage (or unload_lora() before fusing)"
            )

    def check_unfuse_qkv(self) -> None:
        """Raise TypeError when :meth:`unfuse_qkv` cannot split ``to_qkv`` (a LoRA wrapper: its adapter is one
        block-diagonal product over q, k and v, with no per-projection layer to give back). Changes nothing."""
        if self.is_fused and not (is_plain_linear(self.to_qkv) or type(self.to_qkv) is Fp8Linear):
            raise TypeError(
                f"unfuse_qkv_projections() cannot split to_qkv, a {type(self.to_qkv).__name__}: LoRA adapters "
                "loaded on fused q/k/v stay fused. Call unload_lora() first (after unfuse_lora() if the LoRA is "
                "fused and should not stay baked in), or unfuse q/k/v before load_lora()"
            )

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Replace ``to_q``, ``to_k``, ``to_v`` by one ``to_qkv`` holding their weights stacked (q, k, v rows),
        of the same class as the three (so a model on the oneDNN linear layer stays on it).

        Works layer by layer: the extra memory is one projection's weights, freed when the three go.
        """
        if self.is_fused:
            return
        self.check_fuse_qkv()
        parts = [getattr(self, name) for name in _QKV]
        kinds = {type(p) for p in parts}
        # Plain nn.Linear and OneDNNLinear compute the same values; a mix (some layers swapped by hand) falls
        # back to plain nn.Linear.
        cls = kinds.pop() if len(kinds) == 1 else nn.Linear
        first = parts[0]
        fused = cls(first.in_features, 3 * first.out_features, bias=first.bias is not None, device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), first.weight.requires_grad)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), first.bias.requires_grad)
        self.to_q = self.to_k = self.to_v = None
        self.to_qkv = fused

    @torch.no_grad()
    def unfuse_qkv(self) -> None:
        """Undo :meth:`fuse_qkv`: three projections of ``to_qkv``'s class again, each a copy of its rows."""
        if not self.is_fused:
            return
        self.check_unfuse_qkv()
        fused, self.to_qkv = self.to_qkv, None
        for index, name in enumerate(_QKV):
            setattr(self, name, _rows_of(fused, index, 3))

    # ------------------------------------------------------------------ forward

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, N, D]`` -> q, k, v, each ``[B, N, H, hd]``."""
        heads = (self.heads, self.head_dim)
        if self.to_qkv is not None:
            return self.to_qkv(x).unflatten(-1, (3, *heads)).unbind(2)
        return self.to_q(x).unflatten(-1, heads), self.to_k(x).unflatten(-1, heads), self.to_v(x).unflatten(-1, heads)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
        text_len: int = 0,
    ) -> torch.Tensor:
        """x ``[B, L + S, D]`` (text tokens first); rotary (cos, signed sin) ``[L + S, 1, hd]`` float32 tables that
        leave text rows unrotated (cos 1, sin 0); key_mask ``[B, L + S]`` bool, False for padding tokens that no
        token may attend to (Frame Pack batches; built from ``Transformer.forward(frame_mask=)``) -> ``[B, L + S, D]``.

        Under sequence parallel, S is this rank's share of the video tokens and ``text_len`` (L) says where they
        start; the Ulysses hooks drop the padding keys they add themselves, so key_mask, when given, covers the
        caller's unpadded sequence (see cogvideox/distributed/ulysses.py)."""
        q, k, v = self._project(x)
        q, k = self.norm_q(q), self.norm_k(k)
        if rotary is not None:
            cos, sin_signed = rotary
            q, k = rotate_pairs(q, cos, sin_signed), rotate_pairs(k, cos, sin_signed)
        if self.sequence_parallel is not None:
            out = self.sequence_parallel.attention(q, k, v, text_len, key_mask)  # [B, L + S, H, hd]
            return self.to_out[0](out.flatten(2))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads and queries
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)  # [B, H, N, hd]
        # SDPA kernels lay their output out as [B, N, H, hd], so this flatten is usually a view.
        return self.to_out[0](out.transpose(1, 2).flatten(2))


def _rows_of(fused: nn.Module, index: int, parts: int) -> nn.Module:
    """A module of the same kind holding rows ``index`` of ``parts`` equal row blocks of every tensor of
    ``fused`` (weight, bias and any per-row scale): cloned, so the fused tensors can be freed."""
    clone = _empty_like(fused, fused.out_features // parts)
    for name, tensor in [*fused.named_parameters(recurse=False), *fused.named_buffers(recurse=False)]:
        piece = tensor.detach().chunk(parts, dim=0)[index].clone()
        if name in clone._parameters:
            setattr(clone, name, nn.Parameter(piece, tensor.requires_grad))
        else:
            clone.register_buffer(name, piece)
    return clone


def _empty_like(module: nn.Module, out_features: int) -> nn.Module:
    """An unfilled module of ``module``'s class with ``out_features`` rows, on the meta device."""
    has_bias = getattr(module, "bias", None) is not None
    with torch.device("meta"):
        return type(module)(module.in_features, out_features, bias=has_bias)


def _split_fused_keys(module: JointAttention, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post hook: publish ``to_qkv.*`` as ``to_q.*``, ``to_k.*``, ``to_v.*`` in the published order.

    The pieces are contiguous row views of the fused tensors (no copy; safetensors accepts such
    non-overlapping views). This module's keys are the last ones in ``state_dict`` when the hook runs, so they
    can be re-inserted in order.
    """
    if not module.is_fused:
        return
    fused_prefix = prefix + "to_qkv."
    mine = [(key, state_dict.pop(key)) for key in [k for k in state_dict if k.startswith(prefix)]]
    for key, tensor in mine:  # q, k, v first, as an unfused module lists them
        if key.startswith(fused_prefix):
            leaf = key[len(fused_prefix) :]
            for name, piece in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                state_dict[f"{prefix}{name}.{leaf}"] = piece
    for name in _QKV:  # group by projection: to_q.weight, to_q.bias, to_k.weight, ...
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            state_dict[key] = state_dict.pop(key)
    for key, tensor in mine:
        if not key.startswith(fused_prefix):
            state_dict[key] = tensor


def _join_published_keys(
    module: JointAttention, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """Load pre hook: a fused module takes the published ``to_q/k/v.*`` keys by stacking them into ``to_qkv.*``.

    All three of a tensor must arrive in one call; shard-by-shard loading (``load_weights``) cannot promise that,
    which is why models are fused after loading.
    """
    if not module.is_fused:
        return
    published = tuple(f"{prefix}{name}." for name in _QKV)
    leaves = sorted({k[len(prefix) :].split(".", 1)[1] for k in state_dict if k.startswith(published)})
    for leaf in leaves:
        keys = [f"{prefix}{name}.{leaf}" for name in _QKV]
        present = [k for k in keys if k in state_dict]
        if len(present) != 3:
            raise ValueError(
                f"{prefix}to_qkv is fused but this state dict has only {present} of {keys}: load q, k and v "
                "together, or load into the unfused model and call fuse_qkv_projections() after"
            )
        state_dict[f"{prefix}to_qkv.{leaf}"] = torch.cat([state_dict.pop(k) for k in keys])
