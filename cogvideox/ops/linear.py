"""Linear layers, with oneDNN's matrix product for float32 inference on the CPU.

PyTorch sends a float32 ``F.linear`` on the CPU to MKL's sgemm. oneDNN (bundled with every x86 PyTorch build)
has its own JIT-compiled matrix product, which on the AMD EPYC (Zen 4) CPUs this project develops on takes
0.74-0.85x the time for the 5B transformer's projections, 0.58-0.70x for T5-XXL's and 0.27x for the two-row adaLN
products (``benchmarks/linear.py``; ``benchmarks/RESULTS.md``, "CPU linear kernels"). Below ``ONEDNN_MIN_MACS``
multiply-adds its fixed cost per call outweighs the gain, so those products stay with ``F.linear``.

The oneDNN path is taken only where it is a drop-in replacement: plain float32 tensors on the CPU (no subclass:
DTensor, fake tensors, ``torch.fx`` proxies); no CPU autocast (which casts ``F.linear``'s inputs but does not know
this op); no derivative needed (the op has none: no autograd graph, no forward-mode AD, no ``torch.func``
transform); not while ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` traces (Inductor picks its own
kernels, and in torch 2.13 fails with an AssertionError on this op); and :func:`set_cpu_onednn_linear` has not
turned it off. Results differ from ``F.linear`` by summation order only, about 1e-6 relative, inside the 1e-5
parity bound of the tests.

:class:`Linear` is ``nn.Linear`` with that dispatch: same parameters, keys and ``isinstance`` behaviour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this many multiply-adds (rows x in x out) oneDNN's per-call cost wins over its faster kernel: on the
# 2-core EPYC, 64x256x256 (2**22) is 29 % slower through oneDNN, 128x256x512 (2**24) 4 % faster, larger ones
# faster still (benchmarks/linear.py).
ONEDNN_MIN_MACS = 1 << 23

# Plain tensors only: subclasses (DTensor, FakeTensor, torch.fx proxies, ...) keep F.linear and its rules.
_PLAIN = (torch.Tensor, nn.Parameter)

_cpu_onednn = True


def set_cpu_onednn_linear(enabled: bool) -> None:
    """Process-wide: let float32 CPU inference use oneDNN's matrix product (default) or always ``F.linear``."""
    global _cpu_onednn
    _cpu_onednn = bool(enabled)


def cpu_onednn_linear_enabled() -> bool:
    return _cpu_onednn and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.numel() * weight.shape[0] < ONEDNN_MIN_MACS or not cpu_onednn_linear_enabled():
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast casts F.linear's inputs; it does not know this op
        return False
    # The op has no derivative: no backward graph, no forward-mode AD (dual tensors do not set requires_grad),
    # no torch.func transform (vmap, jvp, grad) around the call.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    return torch.autograd.forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ weight[out, in]^T + bias[out]`` -> ``[..., out]``, as ``F.linear``."""
    if _takes_onednn(x, weight, bias):
        # oneDNN reads the bias as dense: a strided or expanded one would give wrong sums without an error.
        bias = None if bias is None else bias.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and :class:`Linear` exactly (not fp8 layers, LoRA wrappers or other subclasses)."""
    return type(module) in (nn.Linear, Linear)


__all__ = [
    "ONEDNN_MIN_MACS",
    "Linear",
    "cpu_onednn_linear_enabled",
    "is_plain_linear",
    "linear",
    "set_cpu_onednn_linear",
]
