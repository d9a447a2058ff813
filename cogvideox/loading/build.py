"""Build a model on the meta device and fill it from its weight files, strictly.

The weights go straight from the (memory-mapped) files into the requested dtype and device and are *assigned*
to the module (``load_state_dict(assign=True)``), so no second copy of the model ever exists: peak host memory
is about one shard. Loading is strict: every key the model expects must be found with the expected shape, and
every key found must be expected; otherwise one error lists all the problems with the file each came from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .files import find_weight_files, iter_tensors

M = TypeVar("M", bound=nn.Module)

# A rename maps a key as stored in the file to the model's key; None drops the key (for example a tied copy).
KeyRename = Callable[[str], "str | None"]


class WeightLoadingError(ValueError):
    """The files do not match the model: lists missing, unexpected and wrongly shaped keys."""


def build_on_meta(factory: Callable[[], M]) -> M:
    """Run ``factory`` with the meta device as default, so parameters take no memory until loaded."""
    with torch.device("meta"):
        return factory()


def _describe(problems: dict[str, list[str]], folder: Path, limit: int = 20) -> str:
    lines = [f"weights in {folder} do not match the model:"]
    for title, items in problems.items():
        if not items:
            continue
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items[:limit])
        if len(items) > limit:
            lines.append(f"    ... and {len(items) - limit} more")
    lines.append("  Is this the right folder (and subfolder) for this component, and the right model variant?")
    return "\n".join(lines)


def load_weights(
    model: M,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    rename: KeyRename | None = None,
    keep_float32: Callable[[str], bool] | None = None,
) -> M:
    """Fill ``model`` (built on meta) from the weight files of ``folder``; return it in eval mode.

    Args:
        model: the module, usually from :func:`build_on_meta`.
        folder: a component folder (``config.json`` + weights).
        dtype: floating tensors are cast to it (integer tensors keep theirs); None keeps the file's dtype.
        device: where the weights go; default CPU.
        allow_pickle: accept ``.bin``/``.pt`` files, read with ``weights_only=True``.
        rename: maps file keys to model keys, or to None to drop a key.
        keep_float32: model keys for which floating weights stay float32 whatever ``dtype`` is.
    """
    folder = Path(folder)
    device = torch.device(device) if device is not None else torch.device("cpu")
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    seen: dict[str, Path] = {}
    problems: dict[str, list[str]] = {"missing keys": [], "unexpected keys": [], "wrong shapes": [], "duplicates": []}

    for path in find_weight_files(folder, allow_pickle=allow_pickle):
        batch: dict[str, torch.Tensor] = {}
        for file_key, tensor in iter_tensors(path):
            key = rename(file_key) if rename is not None else file_key
            if key is None:
                continue
            if key not in expected:
                problems["unexpected keys"].append(f"{file_key} in {path.name}")
                continue
            if key in seen:
                problems["duplicates"].append(f"{key} in {seen[key].name} and {path.name}")
                continue
            shape, _ = expected[key]
            if tuple(tensor.shape) != shape:
                problems["wrong shapes"].append(
                    f"{key}: model expects {list(shape)}, {path.name} has {list(tensor.shape)}"
                )
                continue
            seen[key] = path
            if problems["unexpected keys"] or problems["wrong shapes"] or problems["duplicates"]:
                continue  # already failing: only keep collecting the report, move no more data
            target = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
            if keep_float32 is not None and tensor.is_floating_point() and keep_float32(key):
                target = torch.float32
            batch[key] = tensor.to(device=device, dtype=target)
        if batch:
            # assign=True puts these very tensors into the module: no copy into a preallocated parameter.
            model.load_state_dict(batch, strict=False, assign=True)
            del batch

    problems["missing keys"] = [k for k in expected if k not in seen]
    if any(problems.values()):
        raise WeightLoadingError(_describe(problems, folder))

    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        # A buffer not in the state dict (non-persistent) would stay on meta: models compute such tables lazily.
        raise WeightLoadingError(f"after loading {folder}, tensors are still unset (on meta): {on_meta[:20]}")
    return model.eval()
