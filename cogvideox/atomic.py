"""Writing files whole or not at all: every file the package writes goes through :func:`atomic_path`."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path


def usual_mode(folder: Path, *, directory: bool = False) -> int:
    """The permission bits a new file (or folder) in ``folder`` gets: 0o666 (0o777) less the umask, read from a
    probe rather than by setting the process-wide umask, which would race with other threads."""
    probe = folder / f".mode-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        if directory:
            probe.mkdir()
        else:
            with open(probe, "x"):
                pass
    except OSError as err:  # name the folder the caller chose, not our hidden probe
        err.filename = str(folder)
        raise
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir() if directory else probe.unlink(missing_ok=True)


def check_parent_folder(path: str | os.PathLike) -> Path:
    """``path`` as a Path, after checking that its folder exists or can be created: no ancestor may be a file.

    Raises NotADirectoryError naming the file in the way. Run it before long work whose result goes to ``path``.
    """
    path = Path(path)
    for ancestor in path.parents:  # nearest first; the first one that exists decides
        if ancestor.is_dir():
            break
        if ancestor.exists():
            raise NotADirectoryError(
                f"cannot write {path}: {ancestor} is a file, not a folder; choose an output path in a folder "
                "(or move that file away)"
            )
    return path


def _hide_temporary_name(err: BaseException, tmp: Path, path: Path) -> None:
    """Rewrite ``err`` in place so that it names ``path``, the file the caller asked for, never ``tmp``, a name
    the caller has never seen (the exception keeps its type and traceback)."""
    if isinstance(err, OSError):
        for attribute in ("filename", "filename2"):
            if getattr(err, attribute, None) is not None and str(getattr(err, attribute)).endswith(tmp.name):
                setattr(err, attribute, str(path))
    # tmp and path share a folder, so replacing the name also fixes messages quoting the full temporary path.
    err.args = tuple(a.replace(tmp.name, path.name) if isinstance(a, str) else a for a in err.args)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds and
    removed when it raises, so ``path`` is never left half-written.

    The temporary name keeps the suffix (writers that pick a format from it still work), is hidden and unique per
    process and call, and lives in the same folder (the rename is atomic). Before the rename the file gets the
    permissions a plainly created file would have: some writers (``tempfile.mkstemp``, safetensors' ``save_file``
    since 0.8) create private 0600 files, which a shared cluster's other users could not read. The folder is
    created if missing (:func:`check_parent_folder` first). Errors raised in the block name ``path``, never the
    temporary name.
    """
    path = check_parent_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = usual_mode(path.parent)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        if not tmp.exists():  # e.g. ffmpeg failed, printed why, and imageio did not raise
            raise RuntimeError(f"writing {path} failed: the writer created no file (see its messages above)")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except Exception as err:
        _hide_temporary_name(err, tmp, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_component(folder: str | os.PathLike, config: dict, state: dict, weights_name: str) -> Path:
    """One component folder in the published layout: ``config.json`` and one safetensors file of ``state``
    (tensors made contiguous), each written whole by :func:`atomic_path`. Returns the folder."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with atomic_path(folder / weights_name) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    return folder
