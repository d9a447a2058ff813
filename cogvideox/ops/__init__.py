"""Kernels with one explicit switch: attention backends (sdpa by default, math as the readable reference)."""

from .attention import (
    BACKENDS,
    attention,
    attention_math,
    attention_sdpa,
    get_attention_backend,
    set_attention_backend,
    use_attention_backend,
)

__all__ = [
    "BACKENDS",
    "attention",
    "attention_math",
    "attention_sdpa",
    "get_attention_backend",
    "set_attention_backend",
    "use_attention_backend",
]
