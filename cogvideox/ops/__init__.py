"""Kernels with one explicit switch each: attention backends (sdpa by default, math as the readable reference) and
the CPU linear kernel (oneDNN for large float32 inference products, ``F.linear`` otherwise)."""

from .attention import (
    BACKENDS,
    attention,
    attention_math,
    attention_sdpa,
    get_attention_backend,
    set_attention_backend,
    use_attention_backend,
)
from .linear import Linear, linear, set_cpu_onednn_linear

__all__ = [
    "BACKENDS",
    "Linear",
    "attention",
    "attention_math",
    "attention_sdpa",
    "get_attention_backend",
    "linear",
    "set_attention_backend",
    "set_cpu_onednn_linear",
    "use_attention_backend",
]
