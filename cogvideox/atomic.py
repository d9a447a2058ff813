"""Writing files whole or not at all: every file the package writes goes through :func:`atomic_path`."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds and
    removed when it raises, so ``path`` is never left half-written.

    The temporary name keeps the suffix (writers that pick a format from it still work), is hidden and unique per
    process and call, and lives in the same folder (the rename is atomic). The writer creates the file itself, so
    it gets the user's usual permissions (``tempfile.mkstemp`` would make it private, 0600). The folder is created
    if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
