"""Weight storage in float8 (e4m3): half the bytes of bfloat16, cast back to the compute dtype when a layer runs.

This saves memory, not time: the matrix product still runs in the compute dtype (bf16 on a GPU), on a weight
dequantized just before it. The error is the weight rounding alone (3 mantissa bits: at most 1/16 relative per
weight, RMS about 1/50), measured on the whole model in docs/performance.md.

Each output row ``i`` of a weight ``W`` is stored as ``W8[i] = fp8(W[i] / 2**e[i])`` with the per-row exponent
``e[i] = ceil(log2(max|W[i]| / 448))`` (448 is e4m3's largest finite value), so every row uses fp8's full range
and nothing saturates. The scale is a power of two on purpose:

- dividing and multiplying by it is exact (as long as the result stays in the dtype's normal range, which real
  weights do in bf16 and fp32), so dequantizing adds no rounding;
- it is stored as an integer exponent (``weight_exponent``, int8), which ``module.to(dtype)`` never converts.

``module.to(torch.bfloat16)`` (or ``.half()``, ``.float()``) on a model holding :class:`Fp8Linear` layers casts
their biases and keeps the fp8 weights: every e4m3 value is exact in fp16, bf16 and fp32, so the weight converts
back losslessly (see :meth:`Fp8Linear._apply`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .linear import OneDNNLinear, is_plain_linear, onednn_linear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@torch.no_grad()
def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` floating weight -> (``[out, in]`` float8_e4m3fn, ``[out]`` int8 exponents) such that
    ``fp8.to(float32) * 2**exponent`` is ``weight`` rounded to 3 mantissa bits. All-zero rows get exponent 0."""
    if weight.ndim != 2:
        raise ValueError(f"quantize_rows takes a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    amax = weight.detach().abs().amax(dim=1).float()
    # ceil(log2(amax / 448)) so that max|W[i]| / 2**e <= 448; tiny rows are clamped to fp32's normal range.
    exponent = torch.ceil(torch.log2(amax.clamp_min(2.0**-100) / FP8_MAX)).clamp(-127, 127)
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent)).to(torch.int8)
    scaled = weight.detach().float() * torch.exp2(-exponent.float())[:, None]  # exact: a power of two
    return scaled.to(FP8), exponent


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as float8_e4m3fn rows times ``2**weight_exponent``; ``b`` (if any) in the
    compute dtype. Keys: ``weight`` (fp8), ``weight_exponent`` (int8, one per output row), ``bias``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=FP8), False)
        self.register_buffer("weight_exponent", torch.zeros(out_features, device=device, dtype=torch.int8))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # Set by ops.use_onednn_linear_ / use_aten_linear_: float32 CPU products through oneDNN, as the plain
        # layers of the model do (1.11x instead of 1.15-1.2x the reference's step on the CPU, benchmarks/step.py).
        self.onednn_linear = False

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize an ``nn.Linear`` (its weight is not modified; drop the Linear to free it)."""
        has_bias = linear.bias is not None
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=has_bias)
        weight, exponent = quantize_rows(linear.weight)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_exponent = exponent
        layer.onednn_linear = isinstance(linear, OneDNNLinear)  # keep the kernel the layer it replaces had
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``, ``[out, in]``: a fresh tensor (exact: fp8 values and powers of two).

        Scaled in place, so a call holds one dequantized copy of the layer's weight, not two."""
        return self.weight.to(dtype).mul_(torch.exp2(self.weight_exponent.to(dtype))[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = onednn_linear if self.onednn_linear else F.linear
        return product(x, self.dequantized_weight(x.dtype), self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp8Linear:
        # nn.Module.to(dtype) converts every floating tensor, and fp8 counts as floating. The conversion is
        # lossless (e4m3 values are exact in fp16/bf16/fp32), so storing the result back in fp8 undoes it while
        # keeping any device move that came with it.
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8:
            self.weight.data = self.weight.data.to(FP8)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


@torch.no_grad()
def linears_to_fp8_(module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Replace the plain linear layers under ``module`` (``nn.Linear`` or ``OneDNNLinear``; those
    ``include(name, layer)`` accepts) by :class:`Fp8Linear`, one at a time, so the extra memory is one layer's
    float32 copy. Returns their names."""
    replaced = []
    for name, child in list(module.named_modules()):
        if not is_plain_linear(child) or (include is not None and not include(name, child)):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, leaf, Fp8Linear.from_linear(child))
        replaced.append(name)
    return replaced


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module`` (works on the meta device too)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


__all__ = ["FP8", "FP8_MAX", "Fp8Linear", "linears_to_fp8_", "quantize_rows", "weight_bytes"]
