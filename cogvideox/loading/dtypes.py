"""The one check of the ``dtype=`` every ``from_pretrained`` takes, made before anything is read or downloaded.

The layers compute in the dtype of their weights, so only float32, bfloat16 and float16 can be asked for. Without
this check a float8 or integer dtype loads without complaint and fails at the first call with a promotion error
from inside torch. Strings are accepted too ("bf16", "bfloat16", "torch.bfloat16"): notebook and command-line users
type them, and diffusers' ``torch_dtype`` habit makes ``dtype="bfloat16"`` an easy slip to forgive.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Every float8 dtype this torch knows (e4m3fn, e5m2, and the fnuz variants of newer releases).
FLOAT8_DTYPES = tuple(getattr(torch, name) for name in dir(torch) if name.startswith("float8_"))

_ACCEPTED = (
    "torch.float32, torch.bfloat16 or torch.float16 (or their names 'float32'/'fp32', 'bfloat16'/'bf16', "
    "'float16'/'fp16'), or None to keep the dtype stored in the files"
)


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype the models compute in, or None (keep the files' dtype).

    Args:
        dtype: ``torch.float32``, ``torch.bfloat16``, ``torch.float16``, one of the names in :data:`DTYPE_NAMES`
            (case-insensitive, with or without a ``torch.`` prefix), or None.

    Raises:
        ValueError: a float8 dtype (with the supported way to store fp8 weights), or any other dtype or name.
        TypeError: neither a dtype, a string nor None.
    """
    if dtype is None:
        return None
    given = dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        dtype = getattr(torch, name, None) if name.startswith("float8") else None
        if dtype is None:
            raise ValueError(f"dtype={given!r} is not a dtype cogvideox computes in: use {_ACCEPTED}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={given!r} ({type(given).__name__}) is not a dtype: use {_ACCEPTED}")
    if dtype in FLOAT8_DTYPES:
        raise ValueError(
            f"dtype={given!r}: weights cannot be loaded as float8, because the layers compute in the dtype of their "
            "weights and no matrix product runs in float8 here. To keep the transformer's weights in float8 (about "
            "half the memory of bfloat16), load with dtype=torch.bfloat16 and then call "
            "Transformer.enable_fp8_weight_storage() (pipe.transformer.enable_fp8_weight_storage() on a Pipeline)"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={given!r} is not a dtype cogvideox computes in: use {_ACCEPTED}")
    return dtype
