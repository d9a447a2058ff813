"""oneDNN's matrix product for float32 inference on the CPU, as a layer that a model opts into.

PyTorch sends a float32 ``F.linear`` on the CPU to MKL's sgemm. oneDNN (bundled with every x86 PyTorch build)
has its own JIT-compiled matrix product, which on the AMD EPYC (Zen 4) CPUs this project develops on takes
0.74-0.85x the time for the 5B transformer's projections, 0.58-0.70x for T5-XXL's and 0.27x for the two-row adaLN
products (``benchmarks/linear.py``; ``benchmarks/RESULTS.md``, "CPU linear kernels"). Below ``ONEDNN_MIN_MACS``
multiply-adds its fixed cost per call outweighs the gain, so those products stay with ``F.linear``.

The models are built from plain ``nn.Linear``. :func:`use_onednn_linear_` turns every plain ``nn.Linear`` of a
model into a :class:`OneDNNLinear` in place (same object, same parameters: nothing is copied) and
:func:`use_aten_linear_` turns them back; the choice lives in the model's own layers, not in a process-wide
switch. A :class:`OneDNNLinear` takes the oneDNN path only where it is a drop-in replacement for ``F.linear``:
plain float32 tensors on the CPU (no subclass: DTensor, fake tensors, ``torch.fx`` proxies); no CPU autocast
(which casts ``F.linear``'s inputs but does not know this op); no derivative needed (the op has none: no autograd
graph, no forward-mode AD, no ``torch.func`` transform); not while ``torch.compile``, ``torch.export`` or
``torch.jit.trace`` traces (Inductor picks its own kernels, and in torch 2.13 fails with an AssertionError on this
op); a product of at least ``ONEDNN_MIN_MACS`` multiply-adds. Everywhere else it runs ``F.linear``. Results
differ from ``F.linear`` by summation order only, about 1e-6 relative, inside the 1e-5 parity bound of the tests.
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


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear op (every x86 build does; some ARM builds do not)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False
    # Tracing checks first, so that dynamo never meets mkldnn.is_available below.
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.numel() * weight.shape[0] < ONEDNN_MIN_MACS or not onednn_linear_available():
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast casts F.linear's inputs; it does not know this op
        return False
    # The op has no derivative: no backward graph, no forward-mode AD (dual tensors do not set requires_grad),
    # no torch.func transform (vmap, jvp, grad) around the call.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    return torch.autograd.forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ weight[out, in]^T + bias[out]`` -> ``[..., out]``, as ``F.linear``, through oneDNN when
    the conditions of the module docstring hold."""
    if _takes_onednn(x, weight, bias):
        # oneDNN reads the bias as dense: a strided or expanded one would give wrong sums without an error.
        bias = None if bias is None else bias.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`onednn_linear`: same parameters, keys and ``isinstance`` behaviour.
    Made by :func:`use_onednn_linear_` from existing layers rather than built directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def _retype_(module: nn.Module, old: type[nn.Linear], new: type[nn.Linear]) -> int:
    """Set the class of every submodule of class exactly ``old`` (``module`` included) to ``new``.

    Changing ``__class__`` (as ``torch.nn.utils.parametrize`` does) keeps the very module object: its parameters,
    hooks and identity stay, so offload hooks and anything else holding the layer keep working. Both classes
    have the same state (OneDNNLinear only overrides ``forward``), which is what makes this safe."""
    layers = [m for m in module.modules() if type(m) is old]
    for layer in layers:
        layer.__class__ = new
    return len(layers)


def _set_own_products_(module: nn.Module, enabled: bool) -> None:
    """Layers that compute a linear product themselves instead of holding an ``nn.Linear`` (the fp8 layer, the
    1.0 convolutional patch embedding) declare a boolean ``onednn_linear`` attribute; the swap sets it, so they
    follow the same kernel choice as the rest of the model."""
    for m in module.modules():
        if isinstance(getattr(m, "onednn_linear", None), bool):
            m.onednn_linear = enabled


def use_onednn_linear_(module: nn.Module) -> int:
    """In place: every plain ``nn.Linear`` in ``module`` (``module`` itself included) becomes a
    :class:`OneDNNLinear`, keeping its Parameter objects (no copy), and layers with their own product
    (``onednn_linear`` attribute: fp8 layers, the 1.0 patch embedding) take :func:`onednn_linear` too. Other
    subclasses of ``nn.Linear`` (LoRA wrappers hold a plain layer inside) are left alone. Returns how many layers
    changed class; a second call changes none."""
    _set_own_products_(module, True)
    return _retype_(module, nn.Linear, OneDNNLinear)


def use_aten_linear_(module: nn.Module) -> int:
    """In place: undo :func:`use_onednn_linear_` (every :class:`OneDNNLinear` in ``module`` becomes a plain
    ``nn.Linear`` again, running ``F.linear``, and so do the layers with their own product). Returns how many
    layers changed class."""
    _set_own_products_(module, False)
    return _retype_(module, OneDNNLinear, nn.Linear)


def is_plain_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and :class:`OneDNNLinear` exactly (not fp8 layers, LoRA wrappers or other
    subclasses): the layers whose weight is one full-precision matrix that fp8 storage, LoRA and q/k/v fusion can
    take over."""
    return type(module) in (nn.Linear, OneDNNLinear)


__all__ = [
    "ONEDNN_MIN_MACS",
    "OneDNNLinear",
    "is_plain_linear",
    "onednn_linear",
    "onednn_linear_available",
    "use_aten_linear_",
    "use_onednn_linear_",
]
