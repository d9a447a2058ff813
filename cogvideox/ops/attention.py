"""The one attention switch of the library.

Every attention in the package calls :func:`attention`. Which kernel runs is chosen explicitly, by
:func:`set_attention_backend` (process-wide default) or the ``use_attention_backend`` context manager:

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks flash, cuDNN or
  memory-efficient kernels on a GPU and a fused kernel on the CPU;
- ``"math"``: the textbook formula in plain PyTorch, kept as the readable reference the others are tested against;
- ``"flash"`` / ``"sage"``: FlashAttention 3/2 or SageAttention when installed; imported only when chosen, and a
  clear ImportError names the package to install when not.

The choice is one process-wide setting, read at call time. It is a plain module variable on purpose:
``torch.compile`` traces a read of it without a graph break (and recompiles when it changes), which a
``ContextVar`` would not allow.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

Backend = Callable[..., torch.Tensor]

_backend_name = "sdpa"


def attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, computed in float32.

    Shapes: q ``[B, H, Lq, D]``, k and v ``[B, H, Lk, D]``, mask broadcastable to ``[B, H, Lq, Lk]``
    (boolean: True = attend; or additive float). Returns ``[B, H, Lq, D]`` in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """PyTorch's fused scaled dot-product attention; same shapes as :func:`attention_math`."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _attention_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    if attn_mask is not None:
        raise ValueError("the 'flash' attention backend does not take a mask; use 'sdpa' for masked attention")
    try:
        from flash_attn_interface import flash_attn_func  # FlashAttention 3 (Hopper)
    except ImportError:
        try:
            from flash_attn import flash_attn_func  # FlashAttention 2
        except ImportError as err:
            raise ImportError(
                "attention backend 'flash' needs FlashAttention: pip install flash-attn (or FA3's flash_attn_interface)"
            ) from err
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
    return out.transpose(1, 2)


def _attention_sage(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    if attn_mask is not None:
        raise ValueError("the 'sage' attention backend does not take a mask; use 'sdpa' for masked attention")
    try:
        from sageattention import sageattn
    except ImportError as err:
        raise ImportError("attention backend 'sage' needs SageAttention: pip install sageattention") from err
    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)


BACKENDS: dict[str, Backend] = {
    "sdpa": attention_sdpa,
    "math": attention_math,
    "flash": _attention_flash,
    "sage": _attention_sage,
}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return name


def set_attention_backend(name: str) -> None:
    """Choose the attention kernel for the process: ``sdpa`` (default), ``math``, ``flash``, ``sage``."""
    global _backend_name
    _backend_name = _check_name(name)


def get_attention_backend() -> str:
    """The name of the attention kernel in use here."""
    return _backend_name


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Run a block with another attention kernel, restoring the previous one after."""
    previous = get_attention_backend()
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Attention with the selected backend. q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` -> ``[B, H, Lq, D]``."""
    return BACKENDS[_backend_name](q, k, v, attn_mask=attn_mask, scale=scale)
