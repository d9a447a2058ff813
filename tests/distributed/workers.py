"""What the spawned processes of the distributed tests run (importable, as ``spawn`` needs).

``launch`` starts ``world`` processes on gloo (a file store: no port to pick), each running one job function of
this module; every rank writes its result (or its error) to a JSON file that the test reads. Processes that are
still alive at the deadline are killed and reported, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from tests.helpers import rel_err
from tests.tiny_checkpoints import TEXT_LEN

STEPS = 2


# ------------------------------------------------------------------------------------------------ launching


def _entry(rank: int, world: int, store: str, job: str, args: dict, out_dir: str, timeout_s: float) -> None:
    torch.set_num_threads(1)  # 2-4 processes share 2 cores
    result: dict[str, Any] = {"rank": rank}
    start = time.monotonic()
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        result["value"] = globals()[job](rank, world, **args)
    except BaseException as err:  # reported to the test, which decides what was expected
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
    result["seconds"] = time.monotonic() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(job: str, world: int, tmp: Path, *, deadline_s: float = 150, timeout_s: float = 60, **args) -> list[dict]:
    """Run ``job(rank, world, **args)`` on ``world`` gloo processes; the per-rank result dicts, in rank order
    (``value`` or ``error``, ``seconds``; ``killed`` for a process that outlived the deadline)."""
    tmp.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    store = str(tmp / "store")
    procs = [
        context.Process(target=_entry, args=(rank, world, store, job, args, str(tmp), timeout_s))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    end = time.monotonic() + deadline_s
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
    results = []
    for rank, proc in enumerate(procs):
        if proc.is_alive():
            proc.kill()
            proc.join()
            results.append({"rank": rank, "killed": True})
            continue
        path = tmp / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"rank": rank, "exitcode": proc.exitcode})
    return results


# ------------------------------------------------------------------------------------------------ helpers


class CollectiveCounter:
    """Counts the collectives the library calls (they go through ``torch.distributed``'s module attributes)."""

    NAMES = ("all_to_all_single", "all_gather", "gather", "broadcast")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.NAMES, 0)
        self._originals = {name: getattr(dist, name) for name in self.NAMES}
        for name, original in self._originals.items():
            setattr(dist, name, self._counting(name, original))

    def _counting(self, name, original):
        def call(*args, **kwargs):
            self.counts[name] += 1
            return original(*args, **kwargs)

        return call

    def close(self) -> dict[str, int]:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        return self.counts


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))


def _call_kwargs(case: dict) -> dict:
    kwargs = {
        "prompt": "a red circle",
        "negative_prompt": "blurry",
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
        "use_dynamic_cfg": True,
        "output_type": "np",
        "max_sequence_length": TEXT_LEN,
        **case["call"],
    }
    if case.get("image"):
        kwargs["image"] = _image(case["image"])
    return kwargs


# ------------------------------------------------------------------------------------------------ jobs


def parity(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """For each case: rank 0 runs the single-process pipeline, then every rank runs it parallel with the same
    seed; rank 0 reports the relative error of the frames, every rank its collective counts."""
    from cogvideox import Pipeline
    from cogvideox.distributed import ParallelConfig

    pipes: dict[str, Pipeline] = {}
    out = []
    for case in cases:
        pipe = pipes.get(case["folder"])
        if pipe is None:
            pipe = pipes[case["folder"]] = Pipeline.from_pretrained(case["folder"])
            pipe.set_progress_bar_config(disable=True)
        if case.get("tiling"):
            pipe.vae.enable_tiling(**case["tiling"])
        else:
            pipe.vae.disable_tiling()
        if case.get("slicing"):
            pipe.vae.enable_slicing()
        else:
            pipe.vae.disable_slicing()
        kwargs = _call_kwargs(case)
        expected = pipe(**kwargs, generator=torch.Generator().manual_seed(7)).frames if rank == 0 else None
        pipe.enable_parallel(ParallelConfig(**case["parallel"]))
        counter = CollectiveCounter()
        try:
            got = pipe(**kwargs, generator=torch.Generator().manual_seed(7)).frames
        finally:
            counts = counter.close()
            pipe.disable_parallel()
        entry = {"name": case["name"], "counts": counts, "frames_is_none": got is None}
        if rank == 0:
            entry["shape"] = list(got.shape)
            entry["expected_shape"] = list(expected.shape)
            entry["rel_err"] = rel_err(torch.from_numpy(got), torch.from_numpy(expected))
        out.append(entry)
    return out


def failure(rank: int, world: int, folder: str, mode: str, fail_rank: int = 1, group_timeout_s: float = 30) -> dict:
    """A Ulysses run in which ``fail_rank`` raises (``mode="raise"``) or stops answering for a while
    (``mode="hang"``) at the end of step 0; reports how every rank's call ended."""
    from cogvideox import Pipeline
    from cogvideox.distributed import ParallelConfig

    pipe = Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_parallel(ParallelConfig(ulysses_degree=world), timeout=datetime.timedelta(seconds=group_timeout_s))

    def callback(pipeline, step, timestep, tensors):
        if rank == fail_rank and step == 0:
            if mode == "raise":
                raise ValueError("injected failure")
            time.sleep(group_timeout_s + 3)  # then it finds its peer gone
        return {}

    start = time.monotonic()
    try:
        pipe(
            **_call_kwargs({"call": {"num_frames": 9, "height": 32, "width": 48, "num_inference_steps": 3}}),
            generator=torch.Generator().manual_seed(0), callback_on_step_end=callback,
        )  # fmt: skip
        ended = "returned"
    except Exception as err:
        ended = f"{type(err).__name__}: {err}"
    return {"ended": ended, "seconds": time.monotonic() - start, "aborted": pipe.parallel.state.aborted is not None}
