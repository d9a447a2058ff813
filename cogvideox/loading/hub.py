"""Turn "a local folder or a hub id" into a local folder.

A local path wins when it exists. Otherwise a string shaped like ``org/name`` is fetched with
``huggingface_hub.snapshot_download``, restricted by ``allow_patterns`` so that only the files a component needs
are downloaded (no ``.bin`` duplicates, no other precisions). When the hub cannot be reached, the error says
that the string was taken for a hub id and how to load without the network, not only the transport's message.
"""

from __future__ import annotations

import re
import sys
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


# The errors a download raises when the hub cannot be reached, by module: looked up in ``sys.modules`` only (a
# transport that was never imported cannot have raised, and importing one here would slow every import).
_CONNECTION_ERRORS = {
    "requests.exceptions": ("ConnectionError", "Timeout"),
    "httpx": ("TransportError",),
    "httpx2": ("TransportError",),
}
# huggingface_hub's own errors (older releases define them in huggingface_hub.utils only).
_HUB_ERROR_MODULES = ("huggingface_hub.errors", "huggingface_hub.utils")


def _loaded_classes(names_by_module: dict[str, tuple[str, ...]]) -> tuple[type[BaseException], ...]:
    found = []
    for module_name, names in names_by_module.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, BaseException))


def _cause(error: BaseException) -> str:
    """``Type: message`` (first line) of what made ``error``: the transport's error behind huggingface_hub's."""
    cause = error.__cause__ or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def hub_unreachable_error(hub_id: str, error: BaseException, *, local_files_only: bool) -> OSError | None:
    """The error to raise instead of ``error`` when a download failed for want of the network (or with the
    network turned off and the files not cached); None for any other failure, which is raised unchanged."""
    offline = _loaded_classes(dict.fromkeys(_HUB_ERROR_MODULES, ("OfflineModeIsEnabled",)))
    not_cached = _loaded_classes(dict.fromkeys(_HUB_ERROR_MODULES, ("LocalEntryNotFoundError",)))
    taken = f"{hub_id!r} was taken for a hub id because no folder of that name exists here ({Path.cwd()})"
    if isinstance(error, not_cached) and (local_files_only or isinstance(error.__cause__, offline)):
        reason = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
        return FileNotFoundError(
            f"{taken}, and it is not in the local hub cache while downloads are off ({reason}): give the path of a "
            "local folder holding the model, or download it once with the network on"
        )
    # Without the network huggingface_hub raises LocalEntryNotFoundError (nothing cached) from the transport's
    # error; a transport error may also escape it mid-download. OfflineModeIsEnabled is a ConnectionError.
    if isinstance(error, (ConnectionError, TimeoutError, *not_cached, *_loaded_classes(_CONNECTION_ERRORS))):
        return ConnectionError(
            f"{taken}, and the Hugging Face Hub could not be reached ({_cause(error)}): give the path of a local "
            "folder holding the model, or, if it was downloaded before, set HF_HUB_OFFLINE=1 to load it from the "
            "local hub cache without the network"
        )
    return None


def resolve_pretrained(
    path_or_hub_id: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_patterns: Sequence[str] | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder for ``path_or_hub_id`` (joined with ``subfolder``), downloading from the hub if needed.

    A hub id may be given as a ``pathlib.Path`` too (``Path("THUDM/CogVideoX-5b")``, which is what a notebook that
    builds paths gets), as long as no local folder has that name. ``token``: the Hugging Face token for gated or
    private repositories (``True``: the one ``huggingface-cli login`` saved; default: that one or ``HF_TOKEN``).

    Raises:
        FileNotFoundError: neither an existing folder nor a hub id, or the subfolder is absent; or downloads are
            off (``local_files_only``, ``HF_HUB_OFFLINE=1``) and the hub id is not in the local cache.
        ConnectionError: a hub id was given and the hub could not be reached (the message says how to load
            without the network).
        ImportError: a hub id was given and huggingface_hub is not installed.
    """
    local = Path(path_or_hub_id).expanduser()
    hub_id = local.as_posix() if isinstance(path_or_hub_id, Path) else path_or_hub_id
    if local.is_dir():
        root = local
    elif is_hub_id(hub_id):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
            raise ImportError(
                f"loading {hub_id!r} from the hub needs huggingface_hub: pip install huggingface_hub"
            ) from err
        patterns = list(allow_patterns or DEFAULT_ALLOW_PATTERNS)
        if subfolder:
            patterns = [f"{subfolder}/{p}" for p in patterns] + ["model_index.json"]
        try:
            root = Path(
                snapshot_download(
                    hub_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    allow_patterns=patterns,
                    token=token,
                )
            )
        except Exception as err:
            clear = hub_unreachable_error(hub_id, err, local_files_only=local_files_only)
            if clear is None:
                raise
            raise clear from err
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
