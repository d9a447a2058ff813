"""The opt-in GPU suite (``pytest -m gpu tests/gpu``) and its CPU dry run.

The tests take their device from the ``device`` fixture: CUDA normally. With ``COGVIDEOX_GPU_TESTS_ON_CPU=1`` it
is the CPU, and the tests in this folder are no longer skipped for the missing GPU, so that everything except the
CUDA-only checks (peak memory, streams, compiled Triton kernels) runs, and can be debugged, on a machine without
one. Without the variable nothing changes: ``-m gpu`` selects them and tests/conftest.py skips them without CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ON_CPU = os.environ.get("COGVIDEOX_GPU_TESTS_ON_CPU") == "1"
HERE = Path(__file__).resolve().parent


@pytest.hookimpl(trylast=True)  # after tests/conftest.py's hook has added its "needs CUDA" skips
def pytest_collection_modifyitems(config, items):
    if not ON_CPU:
        return
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue  # GPU tests elsewhere (tests/unit, tests/parity) need CUDA itself: they stay skipped
        item.own_markers[:] = [
            mark for mark in item.own_markers if not (mark.name == "skip" and mark.kwargs.get("reason") == "needs CUDA")
        ]


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the suite runs: ``cuda`` (the current CUDA device), or the CPU for a dry run."""
    return torch.device("cpu") if ON_CPU else torch.device("cuda")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The real-width 5B checkpoint (tests/gpu/real_width.py), built once for the session (~5 s, 0.6 GB)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")
    from tests.gpu.real_width import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("gpu") / "cogvideox-5b-2-layers")
