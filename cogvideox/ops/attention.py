"""The one attention switch of the library.

Every attention in the package calls :func:`attention`. Which kernel runs is chosen explicitly, by
:func:`set_attention_backend` (process-wide default) or the ``use_attention_backend`` context manager:

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks flash, cuDNN or
  memory-efficient kernels on a GPU and a fused kernel on the CPU;
- ``"math"``: the textbook formula in plain PyTorch, kept as the readable reference the others are tested against;
- ``"flash"`` / ``"sage"``: FlashAttention 3 (``flash_attn_interface``, tried first) or 2 (``flash_attn``), or
  SageAttention (``sageattention``).

Selecting ``"flash"`` or ``"sage"`` imports the package there and then, once, and raises a one-line ImportError
naming the package to install when it is missing: the user asked for that kernel explicitly, so a silent fallback
would hide the mistake. The per-call path only calls what was resolved, so ``torch.compile(fullgraph=True)``
traces it (no import, no try/except inside the traced code).

The kernels are wrapped as ``torch.library`` custom ops (``cogvideox::flash_attention`` and
``cogvideox::sage_attention``, with a fake implementation giving the output's shape and dtype), registered when
the backend is first selected, never at import. Under ``torch.compile`` they are one opaque node of the graph:
no graph break, whatever the package does inside. Under autograd (inputs that require grad) "flash" calls the
package's own function, whose backward we keep; SageAttention has no backward, so "sage" falls back (below).

Calls a kernel cannot take fall back to SDPA, with one :class:`AttentionFallbackWarning` per backend and reason
per process: dtypes other than float16/bfloat16, head dims the kernel lacks, tensors not on a CUDA device, and a
mask. A mask falls back rather than raising: the masked calls (Frame Pack padding) are few and SDPA computes them
exactly, while an error would stop a whole generation. :func:`unsupported_reason` says which reason applies.
Under ``torch.compile`` the choice is made, and the warning given, when the graph is traced.

The choice is one process-wide setting, read at call time. It is a plain module variable on purpose:
``torch.compile`` traces a read of it without a graph break (and recompiles when it changes), which a
``ContextVar`` would not allow.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

Backend = Callable[..., torch.Tensor]
# (q, k, v, scale) -> out, all [B, L, H, D]: a kernel package's function, called in the layout both packages take.
Kernel = Callable[..., torch.Tensor]


class AttentionFallbackWarning(UserWarning):
    """A call the selected attention kernel cannot take ran on SDPA instead."""


_backend_name = "sdpa"

# Device types the kernels run on. A module variable so that the CPU tests can admit "cpu" with a fake kernel.
KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_kernels: dict[str, Kernel] = {}  # "flash" / "sage" -> the package function resolved at selection time
_ops: dict[str, Callable[..., torch.Tensor]] = {}  # "flash" / "sage" -> its custom op, registered once per process
_warned: set[tuple[str, str]] = set()  # (backend, reason) pairs already warned about

_MISSING = {
    "flash": (
        "attention backend 'flash' needs FlashAttention: pip install flash-attn (FlashAttention 2) or "
        "flash_attn_interface (FlashAttention 3, built from the flash-attention repo's hopper/ folder); or use 'sdpa'"
    ),
    "sage": "attention backend 'sage' needs SageAttention: pip install sageattention; or use 'sdpa'",
}

# Published limits. FlashAttention 2 README: "Datatype fp16 and bf16", "All head dimensions up to 256"; its CUDA
# entry point (csrc/flash_attn/flash_api.cpp) checks "head dimension at most 256" and "a head_size that is a
# multiple of 8" (some Python wrappers pad other sizes: a copy of q, k and v per call). SageAttention README:
# "q, k, v are FP16/BF16"; its kernels are built for head dims 64 and 128 (SageAttention 2 pads smaller ones to
# those and raises above 128, sageattention/core.py).
_HEAD_DIMS = {
    "flash": (lambda d: d <= 256 and d % 8 == 0, "FlashAttention takes one head dim, at most 256, a multiple of 8"),
    "sage": (lambda d: d in (64, 128), "SageAttention takes one head dim, 64 or 128"),
}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


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


# ------------------------------------------------------------------------------------ flash and sage kernels


def unsupported_reason(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> str | None:
    """Why the ``"flash"`` or ``"sage"`` kernel cannot take this call (the text of the fallback warning), or None.

    Reads only static properties (mask presence, rank, device, dtype, head dims, grad), so under ``torch.compile``
    it is decided at trace time and adds nothing to the graph. q ``[B, H, Lq, D]``, k and v ``[B, H, Lk, D]``."""
    tensors = (q, k, v)
    if attn_mask is not None:
        return "a mask (the kernel takes none)"
    if any(t.ndim != 4 for t in tensors):
        return f"tensors of rank {q.ndim}, {k.ndim}, {v.ndim} (the kernel takes 4-D [B, H, L, D] q, k and v)"
    devices = sorted({t.device.type for t in tensors})
    if any(d not in KERNEL_DEVICE_TYPES for d in devices):
        return f"tensors on {', '.join(devices)} (the kernel runs on CUDA GPUs only)"
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    if len(dtypes) > 1 or q.dtype not in _KERNEL_DTYPES:
        return f"dtype {', '.join(dtypes)} (the kernel takes float16 or bfloat16 q, k and v: run the model in bf16)"
    dims = sorted({t.shape[-1] for t in tensors})
    accepts, rule = _HEAD_DIMS[backend]
    if len(dims) > 1 or not accepts(dims[0]):
        return f"head dim {', '.join(map(str, dims))} ({rule})"
    if backend == "sage" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs that require grad (SageAttention has no backward pass)"
    return None


def _warn_now(backend: str, reason: str) -> None:
    if (backend, reason) in _warned:
        return
    _warned.add((backend, reason))
    warnings.warn(
        f"attention backend {backend!r} cannot take {reason}; these calls run on 'sdpa' instead "
        "(warned once per reason)",
        AttentionFallbackWarning,
        stacklevel=6,  # the caller of attention(): _warn_now < _warn_fallback < _kernel_attention < backend < attention
    )


def _warn_fallback(backend: str, reason: str) -> None:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace warnings.warn (a graph break: an error under fullgraph=True). comptime runs the
        # function while the graph is traced, which is when the fallback is chosen; it takes no free variables,
        # so it reads this frame's locals. Imported here: torch._dynamo is already loaded when compiling.
        from torch._dynamo.comptime import comptime

        comptime(
            lambda ctx: _warn_now(
                ctx.get_local("backend").as_python_constant(), ctx.get_local("reason").as_python_constant()
            )
        )
    else:
        _warn_now(backend, reason)


def _call_flash(
    func: Callable[..., object], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
) -> torch.Tensor:
    out = func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # some FlashAttention 3 versions return (out, lse)


def _call_sage(
    func: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
) -> torch.Tensor:
    return func(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)


def _resolve_kernel(backend: str) -> Kernel:
    """Import the package of ``backend`` and return its function; ImportError (one line) when it is missing.

    ``find_spec`` first, then a plain import: an installed but broken package raises its own error (a missing
    CUDA library, say) instead of being reported as not installed."""
    candidates = (
        [("flash_attn_interface", "flash_attn_func"), ("flash_attn", "flash_attn_func")]  # FA3 first, then FA2
        if backend == "flash"
        else [("sageattention", "sageattn")]
    )
    call = _call_flash if backend == "flash" else _call_sage
    for module_name, function_name in candidates:
        if importlib.util.find_spec(module_name) is not None:
            return functools.partial(call, getattr(importlib.import_module(module_name), function_name))
    raise ImportError(_MISSING[backend])


def _register_op(backend: str) -> Callable[..., torch.Tensor]:
    """The custom op ``cogvideox::<backend>_attention``: [B, L, H, D] q, k, v and a scale -> [B, Lq, H, Dv]."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        # The kernel is looked up per call, so re-selecting the backend (a reinstalled package, a test's fake)
        # takes effect without registering the op again. contiguous(): the fake below promises that layout.
        # The device guard: a kernel launched by a package (Triton's, say) goes to q's GPU, not the current one.
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            return _kernels[backend](q, k, v, scale).contiguous()

    # An explicit schema: this module's annotations are strings (from __future__), which inference does not read.
    op = torch.library.custom_op(
        f"cogvideox::{backend}_attention",
        run,
        mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, float? scale) -> Tensor",
    )

    @op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    return op


def _kernel_attention(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    reason = unsupported_reason(backend, q, k, v, attn_mask)
    if reason is not None:
        _warn_fallback(backend, reason)
        return attention_sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
    if backend not in _kernels:  # BACKENDS["flash"] called directly, without selecting it
        raise RuntimeError(
            f"attention backend {backend!r} is not loaded: call set_attention_backend({backend!r}) first"
        )
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H, D], the layout both kernels take
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = _kernels[backend](q, k, v, scale)  # the package's autograd function: the op has no backward
    else:
        out = _ops[backend](q, k, v, scale)
    return out.transpose(1, 2)


def _attention_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    return _kernel_attention("flash", q, k, v, attn_mask, scale)


def _attention_sage(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    return _kernel_attention("sage", q, k, v, attn_mask, scale)


# -------------------------------------------------------------------------------------------- the switch

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
    """Choose the attention kernel for the process: ``sdpa`` (default), ``math``, ``flash``, ``sage``.

    Raises:
        ValueError: an unknown name.
        ImportError: ``flash`` or ``sage`` without its package (one line naming the package to install); the
            backend in use is then left unchanged.
    """
    global _backend_name
    _check_name(name)
    if name in _MISSING:  # flash, sage: resolve the package now, so that no call imports anything
        _kernels[name] = _resolve_kernel(name)
        if name not in _ops:
            _ops[name] = _register_op(name)
    _backend_name = name


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
