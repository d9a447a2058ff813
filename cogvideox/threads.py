"""How many CPU threads a pipeline call uses for its own work.

A tiny model (the bundled demo: a 128-wide, 6-layer transformer over 60 tokens, 0.31 GFLOP a guided pass) gains
nothing from a second intra-op thread over a whole call, and loses a lot on a busy machine: every parallel region
waits for its slowest thread, and a descheduled thread stalls all of them. Measured by benchmarks/threads.py on a
2-core AMD EPYC (benchmarks/RESULTS.md, "Threads"), for a 50-step demo call:
- idle: 0.85 s on one thread, 0.82 s on two;
- with both cores kept busy: 1.31 s on one thread, 3.12 s on two (median; worst of five 1.35 s against 7.05 s).

From 1.45 GFLOP a pass (a 256-wide, 4-layer model) a pass alone runs 1.45x faster on two threads, and up to 1.74x
on larger ones. So a CPU call whose transformer pass is below :data:`SMALL_PASS_FLOPS` (1 GFLOP) runs with one
intra-op thread, set for the call and restored afterwards. When the call returns, the process's setting
(``torch.set_num_threads``) is the caller's again. ``Pipeline.cpu_threads`` forces a count (an int), or keeps the
process's setting (``"all"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: FLOPs of one transformer pass (guidance batch included) below which a CPU call runs on one intra-op thread
SMALL_PASS_FLOPS = 1e9


def pass_flops(width: int, layers: int, tokens: int, batch: int) -> float:
    """Multiply-adds x 2 of one transformer pass: ``24 d^2 N L`` in the linear layers and ``4 N^2 d L`` in
    attention, per sequence (the rest is under 1 %)."""
    return batch * layers * (24.0 * width * width * tokens + 4.0 * tokens * tokens * width)


def threads_for_call(device: torch.device, flops: float, setting: int | str | None = None) -> int | None:
    """The intra-op thread count for a call on ``device`` whose transformer pass costs ``flops``, or None to
    leave the process's setting alone. ``setting``: None (the rule above), ``"all"`` or a positive int."""
    if setting == "all" or device.type != "cpu":
        return None
    if setting is not None:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ValueError(f"cpu_threads={setting!r}: a positive int, 'all' or None (chosen per call)")
        return setting
    return 1 if flops < SMALL_PASS_FLOPS else None


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (None: unchanged), restoring the previous count after."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
