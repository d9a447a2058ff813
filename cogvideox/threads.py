"""How many CPU threads a pipeline call uses for its own work.

A tiny model (the bundled demo: a 128-wide, 6-layer transformer over 60 tokens) gains nothing from a second
intra-op thread: each product is a few microseconds of work, and the threads' start and join cost more. On a busy
machine it loses a lot, because every parallel region waits for its slowest thread, and a thread that was
descheduled stalls all of them. benchmarks/threads.py measured this on a 2-core CPU. At idle, the demo call took
about the same with one thread or two. With the cores busy, one thread was several times faster. From a few
GFLOP per transformer pass on, two threads win again.

So a call on the CPU whose transformer pass is below :data:`SMALL_PASS_FLOPS` runs with one intra-op thread, set
for the call and restored afterwards. The process's setting (``torch.set_num_threads``) is the caller's again when
the call returns. Set ``Pipeline.cpu_threads`` to an int to force a count, or to ``"all"`` to keep the process's
setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: FLOPs of one transformer pass (guidance batch included) below which a CPU call runs on one intra-op thread
SMALL_PASS_FLOPS = 2e9


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
