"""Helpers shared by the benchmark scripts: the machine's description, the FLOP count, a live-tensor memory meter
for the CPU, random weights of real shape, and appending a run to ``benchmarks/RESULTS.md``.

Benchmarks are scripts, not library code: they print and they write files. They import diffusers (the reference).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


# ---------------------------------------------------------------------------------------------- machine and command


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line naming what ran the benchmark: the accelerator (or CPU model and threads) and the torch build."""
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        # The load average says whether other work shared the cores (timings on a busy machine are noisier).
        what = f"{cpu_name()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    return f"{what}; torch {torch.__version__}; Python {platform.python_version()}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def call_times(fn, repeats: int, warm_up: bool = True) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (after one untimed call when ``warm_up``)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def cuda_peaks(device: torch.device) -> dict[str, int]:
    """``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` (bytes) since the last reset: every script
    prints both (allocated is what tensors held at the peak; reserved is what the caching allocator took from the
    device, which is what has to fit)."""
    return {
        "allocated": torch.cuda.max_memory_allocated(device),
        "reserved": torch.cuda.max_memory_reserved(device),
    }


def write_json(path: str | os.PathLike | None, data: dict) -> None:
    """Write ``data`` to ``path`` (atomically: a reader never sees half a file) when a path is given. The scripts
    call it after every measurement, so a run cut short by a time limit still leaves the figures it had; gpu.sh's
    summary (benchmarks/summary.py) reads these files."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=1, default=str)
    os.replace(tmp.name, path)


# ---------------------------------------------------------------------------------------------- FLOPs


def step_flops(dim: int, layers: int, tokens: int, batch: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of ``batch`` forwards.

    Per forward: linear ``24 d^2 N L`` (q, k, v, out and the 4d feed-forward), attention ``4 N^2 d L`` (QK^T and
    PV). adaLN, patch embedding, output projection, norms, RoPE and softmax are left out (< 1 %).
    """
    linear = 24.0 * dim * dim * tokens * layers
    attn = 4.0 * tokens * tokens * dim * layers
    return batch * linear, batch * attn


# ---------------------------------------------------------------------------------------------- CPU memory


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors allocated by the operations run inside it (the CPU stand-in for
    ``torch.cuda.max_memory_allocated`` minus what existed before).

    Every operator output whose storage is new (it aliases none of the operator's inputs) is counted until the
    last Python tensor viewing that storage dies. Weights, inputs and cached tables existed before and are not
    counted; scratch memory inside a kernel (a fused attention's work space) is invisible, on both sides alike.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [tensors alive, bytes]

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self._storages.get(key)
            if entry is None:
                if key in inputs:
                    continue  # a view of, or in-place write into, a tensor that existed before
                entry = self._storages[key] = [0, storage.nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


# ---------------------------------------------------------------------------------------------- random weights


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Random values of every floating parameter and persistent buffer, on their own device (one tensor at a
    time): N(0, std), and 1 + N(0, std) for norm scales, so activations keep a sane size at real depth."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=gen, device=tensor.device, dtype=torch.float32) * std
        is_scale = name.endswith("weight") and tensor.ndim == 1 and "norm" in name
        tensor.copy_(noise + 1.0 if is_scale else noise)
    return module


# ---------------------------------------------------------------------------------------------- RESULTS.md


def append_result(section: str, entry: str, path: Path = RESULTS) -> None:
    """Add ``entry`` at the end of the ``## {section}`` section of RESULTS.md (created after the existing sections
    when absent). The file is re-read right before writing, others' sections are kept byte for byte, and the new
    text replaces the file atomically."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\nAppended by the scripts in benchmarks/.\n"
    heading = f"## {section}"
    match = re.search(rf"^{re.escape(heading)}\s*$", text, flags=re.MULTILINE)
    entry = entry.strip("\n") + "\n"
    if match is None:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{entry}"
    else:
        following = re.search(r"^## ", text[match.end() :], flags=re.MULTILINE)
        cut = match.end() + following.start() if following else len(text)
        text = text[:cut].rstrip("\n") + "\n\n" + entry + ("\n" + text[cut:] if following else "")
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def today() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
