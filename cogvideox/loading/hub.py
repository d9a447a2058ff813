"""Turn "a local folder or a hub id" into a local folder.

A local path wins when it exists. Otherwise a string shaped like ``org/name`` is fetched with
``huggingface_hub.snapshot_download``, restricted by ``allow_patterns`` so that only the files a component needs
are downloaded (no ``.bin`` duplicates, no other precisions).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# What any component folder needs: configs, safetensors weights and their indexes, tokenizer files.
DEFAULT_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt")
# What a whole pipeline needs from a hub repository (the published ones also hold .bin and .pt copies).
PIPELINE_FILES = (
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
)


def is_hub_id(name: str) -> bool:
    """True for ``org/name`` strings (which may still also be a local relative path)."""
    return bool(_HUB_ID.match(name))


def resolve_pretrained(
    path_or_hub_id: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_patterns: Sequence[str] | None = None,
) -> Path:
    """The local folder for ``path_or_hub_id`` (joined with ``subfolder``), downloading from the hub if needed.

    Raises:
        FileNotFoundError: neither an existing folder nor a hub id, or the subfolder is absent.
        ImportError: a hub id was given and huggingface_hub is not installed.
    """
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        root = local
    elif isinstance(path_or_hub_id, str) and is_hub_id(path_or_hub_id):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
            raise ImportError(
                f"loading {path_or_hub_id!r} from the hub needs huggingface_hub: pip install huggingface_hub"
            ) from err
        patterns = list(allow_patterns or DEFAULT_ALLOW_PATTERNS)
        if subfolder:
            patterns = [f"{subfolder}/{p}" for p in patterns] + ["model_index.json"]
        root = Path(
            snapshot_download(
                path_or_hub_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_patterns=patterns,
            )
        )
    else:
        raise FileNotFoundError(
            f"{str(path_or_hub_id)!r} is neither an existing folder nor a hub id like 'THUDM/CogVideoX-5b'"
        )
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{root} has no {subfolder!r} subfolder")
    return folder


def component_folder(path_or_hub_id: str | Path, component: str, **hub_kwargs) -> Path:
    """A component's folder, given either that folder itself or the pipeline root that contains it.

    ``Transformer.from_pretrained("CogVideoX-5b")`` and ``Transformer.from_pretrained("CogVideoX-5b/transformer")``
    both work: a folder with its own ``config.json`` and no ``model_index.json`` is taken as the component folder.
    """
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        if (local / component).is_dir() and (local / "model_index.json").is_file():
            return local / component
        if (local / component).is_dir() and not (local / "config.json").is_file():
            return local / component
        return local
    return resolve_pretrained(path_or_hub_id, subfolder=component, **hub_kwargs)
