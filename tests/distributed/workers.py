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


class MaskFreeKernel:
    """An attention backend, registered as ``"refuse_mask"``, that raises on any mask (the "flash" and "sage"
    kernels take none: they would fall back to SDPA with a warning) and otherwise runs SDPA; counts its calls.
    The text encoder falls back to SDPA for backends without bias support, so only the transformer's attention
    reaches it."""

    NAME = "refuse_mask"

    def __init__(self) -> None:
        from cogvideox.ops import BACKENDS, attention_sdpa

        self.calls = 0
        self._sdpa = attention_sdpa
        BACKENDS[self.NAME] = self

    def __call__(self, q, k, v, attn_mask=None, scale=None):
        if attn_mask is not None:
            raise ValueError(f"the {self.NAME!r} test backend does not take a mask")
        self.calls += 1
        return self._sdpa(q, k, v, scale=scale)


def _masked_forward(pipe) -> torch.Tensor:
    """The transformer's output ``[1, 3, C, 6, 6]`` on fixed random inputs with a ``frame_mask`` hiding the last of
    3 latent frames (48x48 pixels, 9 frames: 27 video tokens, padded under Ulysses 2 and 4)."""
    config = pipe.transformer.config
    gen = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 3, config.in_channels, 6, 6, generator=gen)  # 48x48 pixels, 9 frames: 27 tokens
    embeds = torch.randn(1, TEXT_LEN, config.text_embed_dim, generator=gen)
    frame_mask = torch.tensor([[True, True, False]])
    with torch.no_grad():
        return pipe.transformer(latents, embeds, torch.tensor([500]), frame_mask=frame_mask)


# ------------------------------------------------------------------------------------------------ jobs


def parity(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """For each case: rank 0 runs the single-process pipeline, then every rank runs it parallel with the same
    seed; rank 0 reports the relative error of the frames, every rank its collective counts. A case with
    ``halves`` runs on two caller-made sub-groups side by side (ranks [0, W/2) and [W/2, W)): the first rank of
    each half holds frames, and every rank checks its half's group and the world still work afterwards."""
    from cogvideox import Pipeline
    from cogvideox.distributed import ParallelConfig
    from cogvideox.distributed.groups import collective_device
    from cogvideox.ops import use_attention_backend

    kernel = MaskFreeKernel()
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
        group = None
        if case.get("halves"):
            halves = [dist.new_group(list(range(h * world // 2, (h + 1) * world // 2))) for h in range(2)]
            group = halves[2 * rank // world]
        holds_frames = dist.get_rank(group) == 0
        expected = pipe(**kwargs, generator=torch.Generator().manual_seed(7)).frames if holds_frames else None
        masked_single = _masked_forward(pipe) if case.get("frame_mask") else None
        pipe.enable_parallel(ParallelConfig(**case["parallel"]), group=group)
        entry = {"name": case["name"], "collective_device": str(collective_device(pipe.parallel.state.group))}
        if case.get("bad_call_first"):  # refused by the argument checks on every rank, before any collective
            try:
                pipe(**{**kwargs, "num_frames": 10}, generator=torch.Generator().manual_seed(7))
                entry["bad_call"] = "returned"
            except Exception as err:
                entry["bad_call"] = f"{type(err).__name__}: {err}"
            entry["aborted_after_bad_call"] = pipe.parallel.state.aborted is not None
        counter = CollectiveCounter()
        kernel.calls = 0
        try:
            with use_attention_backend(kernel.NAME):  # no mask may reach the kernel: padding keys are dropped
                got = pipe(**kwargs, generator=torch.Generator().manual_seed(7)).frames
        finally:
            counts = counter.close()
        if masked_single is not None:  # a caller's frame_mask under Ulysses: the one case that needs a mask
            entry["frame_mask_rel_err"] = rel_err(_masked_forward(pipe), masked_single)
        pipe.disable_parallel()
        entry.update(counts=counts, kernel_calls=kernel.calls, frames_is_none=got is None)
        if group is not None:  # the caller's groups were never touched: both still reduce
            for name, checked in (("half_all_reduce", group), ("world_all_reduce", None)):
                total = torch.ones(1)
                dist.all_reduce(total, group=checked)
                entry[name] = float(total)
        if holds_frames:
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
    seconds = time.monotonic() - start
    aborted = pipe.parallel.state.aborted is not None
    alive_after = {}
    try:
        alive_after["call_after_abort"] = "returned"
        pipe(**_call_kwargs({"call": {"num_frames": 9, "height": 32, "width": 48}}))
    except Exception as err:
        alive_after["call_after_abort"] = f"{type(err).__name__}: {err}"
    # Only this package's groups were destroyed: the caller's default group still works, and so do new groups.
    total = torch.ones(1)
    dist.all_reduce(total)
    alive_after["world_all_reduce"] = float(total)
    if mode == "raise":
        pipe.enable_parallel(ParallelConfig(ulysses_degree=world))
        frames = pipe(**_call_kwargs({"call": {"num_frames": 9, "height": 32, "width": 48, "num_inference_steps": 1}}),
                      generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
        alive_after["new_groups_call"] = "frames" if frames is not None else "none"
    return {"ended": ended, "seconds": seconds, "aborted": aborted, **alive_after}


# ------------------------------------------------------------------------------------------------ step caching

CACHE_STEPS = 10


def cached(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """For each case: rank 0 runs the single-process pipeline with the case's step cache, then every rank runs it
    parallel; every rank reports what its cache ran and skipped (and TeaCache's decisions, MagCache's
    calibration), rank 0 the relative error of the frames."""
    from cogvideox import Pipeline
    from cogvideox.distributed import ParallelConfig

    out = []
    for case in cases:
        pipe = Pipeline.from_pretrained(case["folder"])
        pipe.set_progress_bar_config(disable=True)
        cache = pipe.enable_cache(case["method"], **case["options"])
        kwargs = {**_call_kwargs(case), "num_inference_steps": CACHE_STEPS}

        def report(cache=cache) -> dict:
            return {
                "stats": dict(cache.stats),
                "decisions": getattr(cache, "decisions", None),
                "calibration": getattr(cache, "calibration", None),
            }

        entry = {"name": case["name"]}
        expected = None
        if rank == 0:
            expected = pipe(**kwargs, generator=torch.Generator().manual_seed(7)).frames
            entry["single"] = report()
        pipe.enable_parallel(ParallelConfig(**case["parallel"]))
        got = pipe(**kwargs, generator=torch.Generator().manual_seed(7)).frames
        entry["parallel"] = report()
        pipe.disable_parallel()
        if rank == 0:
            entry["rel_err"] = rel_err(torch.from_numpy(got), torch.from_numpy(expected))
        out.append(entry)
    return out
