"""Kernels: attention backends (one explicit switch; sdpa by default, math as the readable reference) and the CPU
linear kernel (oneDNN for large float32 inference products, ``F.linear`` otherwise), which a model opts into with
:func:`use_onednn_linear_` on its own layers."""

from .attention import (
    BACKENDS,
    attention,
    attention_math,
    attention_sdpa,
    get_attention_backend,
    set_attention_backend,
    use_attention_backend,
)
from .linear import OneDNNLinear, onednn_linear, use_aten_linear_, use_onednn_linear_

__all__ = [
    "BACKENDS",
    "OneDNNLinear",
    "attention",
    "attention_math",
    "attention_sdpa",
    "get_attention_backend",
    "onednn_linear",
    "set_attention_backend",
    "use_aten_linear_",
    "use_attention_backend",
    "use_onednn_linear_",
]
