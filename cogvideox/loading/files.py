"""Finding and reading the weight files of one component folder.

A component folder in the published (diffusers / transformers) layout holds its weights as
- one ``*.safetensors`` file, or
- shards ``*-0000k-of-0000n.safetensors`` listed by a ``*.safetensors.index.json`` (``weight_map``).
Pickle formats (``*.bin``, ``*.pt``, ``*.pth``) are refused unless the caller opts in, and are then read
with ``torch.load(weights_only=True)`` so that a checkpoint cannot run code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..configs import read_json

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_INDEX_SUFFIX = ".bin.index.json"


def _is_variant(path: Path) -> bool:
    """``diffusion_pytorch_model.fp16.safetensors`` (or ``....fp16.safetensors.index.json``) is a precision variant
    of the plain file: a dot is left in the name once the weight suffix is removed."""
    name = path.name
    for suffix in (SAFETENSORS_INDEX_SUFFIX, PICKLE_INDEX_SUFFIX, ".safetensors", *PICKLE_SUFFIXES):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return "." in name


def _files_from_index(index_path: Path) -> list[Path]:
    what = "a shard index: a JSON object whose 'weight_map' maps each tensor name to its shard file"
    weight_map = read_json(index_path, what=what).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(
            f"{index_path} has no valid 'weight_map' (found {type(weight_map).__name__}): it should be {what}; "
            "fix the file or download it again"
        )
    names = list(dict.fromkeys(weight_map.values()))  # shard order as listed, each once
    files = [index_path.parent / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shards that are not there: {missing}")
    return files


def _pick_one(candidates: list[Path], folder: Path, kind: str) -> Path:
    plain = [p for p in candidates if not _is_variant(p)]
    if len(plain) == 1:
        return plain[0]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"{folder} holds several {kind} files and no index to choose between them: "
        f"{sorted(p.name for p in candidates)}; keep one, or add a shard index"
    )


def find_weight_files(folder: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a component folder, in load order.

    Raises:
        FileNotFoundError: the folder does not exist or holds no weights.
        ValueError: only pickle weights are present and ``allow_pickle`` is False, or the choice is ambiguous.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")

    indexes = sorted(folder.glob(f"*{SAFETENSORS_INDEX_SUFFIX}"))
    if indexes:
        return _files_from_index(_pick_one(indexes, folder, "safetensors index"))
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        return [_pick_one(singles, folder, "safetensors")]

    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    pickle_indexes = sorted(folder.glob(f"*{PICKLE_INDEX_SUFFIX}"))
    if pickles or pickle_indexes:
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds only pickle weights ({sorted(p.name for p in pickles)}); pickle files can run "
                "code when opened, so they are refused. Convert them to safetensors, or pass allow_pickle=True "
                "to read them with torch.load(weights_only=True)"
            )
        if pickle_indexes:
            return _files_from_index(_pick_one(pickle_indexes, folder, "pickle index"))
        return [_pick_one(pickles, folder, "pickle")]
    raise FileNotFoundError(f"{folder} holds no weights (*.safetensors, or a *{SAFETENSORS_INDEX_SUFFIX} index)")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` from one weight file, one tensor at a time, on the CPU.

    safetensors files are memory-mapped, so host memory holds about one tensor at a time beyond the page cache.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
        with handle as f:
            for key in f.keys():
                try:
                    tensor = f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as err:
                    raise ValueError(f"{path}: tensor {key!r} cannot be read (truncated or corrupt?): {err}") from err
                yield key, tensor
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for bad pickles; all mean the same to the caller
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True): {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    yield from state.items()
