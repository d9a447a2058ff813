"""Step time of the transformer on 1, 2, 4 and 8 GPUs: Ulysses sequence parallel, guidance parallel, both.

One guided denoising step (unconditional and conditional branch, the pipeline's loop body without the sampler)
on random weights of real shape, for every layout ``ulysses x cfg`` of each process count, against the same step
on one GPU (batch 2). Optionally (``--vae``) the tiled VAE decode split over the ranks.

    python benchmarks/parallel.py --model CogVideoX-5b                   # every layout that fits the GPUs here
    python benchmarks/parallel.py --model CogVideoX1.5-5B --frames 81 --height 768 --width 1360 --gpus 1,8
    python benchmarks/parallel.py --device cpu --gpus 1,2 --layers 1 --height 64 --width 64 --no-results  # smoke

The launcher starts ``torchrun --standalone --nproc-per-node N`` for each layout and collects rank 0's timing;
a layout that fails is reported and the next one still runs. Figures are appended to benchmarks/RESULTS.md
(section "Parallel step") unless ``--no-results``. docs/distributed.md explains what to expect.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_result, command_line, fill_random_, machine, markdown_table, today  # noqa: E402
from cogvideox import Transformer  # noqa: E402
from cogvideox.presets import TRANSFORMER_CONFIGS, transformer_config  # noqa: E402

logger = logging.getLogger("parallel")
RESULT_MARK = "PARALLEL_RESULT "
CPU_DEFAULTS = {"layers": 2, "frames": 9, "height": 64, "width": 96}
GPU_DEFAULTS = {"layers": None, "frames": 49, "height": 480, "width": 720}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CogVideoX-5b", choices=sorted(TRANSFORMER_CONFIGS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo smoke run")
    parser.add_argument("--gpus", default="1,2,4,8", help="process counts to try (those above the GPUs are skipped)")
    parser.add_argument("--layers", type=int, help="number of blocks (default: all on GPU, 2 on CPU)")
    parser.add_argument("--frames", type=int, help="video frames (default 49; 9 on CPU)")
    parser.add_argument("--height", type=int, help="video height in pixels (default 480; 64 on CPU)")
    parser.add_argument("--width", type=int, help="video width in pixels (default 720; 96 on CPU)")
    parser.add_argument("--text-len", type=int, default=226)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--vae", action="store_true", help="also time the tiled VAE decode split over the ranks")
    parser.add_argument("--timeout-s", type=int, default=900, help="limit per layout")
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "U,C": run as one torchrun rank
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # passed on to the torchrun workers
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def layouts(world: int) -> list[tuple[int, int]]:
    """(ulysses, cfg) pairs for ``world`` processes: pure Ulysses, and guidance parallel when ``world`` is even."""
    out = [(world, 1)]
    if world % 2 == 0:
        out.append((world // 2, 2))
    return out


def latent_shape(config, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(latent frames, h, w, video tokens), the pipeline's padding included."""
    latent_frames = (frames - 1) // config.temporal_compression_ratio + 1
    pt = config.patch_size_t or 1
    latent_frames += -latent_frames % pt
    h, w = height // 8, width // 8
    return latent_frames, h, w, (latent_frames // pt) * (h // config.patch_size) * (w // config.patch_size)


# ------------------------------------------------------------------------------------------------ one rank


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from cogvideox.distributed import ParallelConfig, ParallelInference, decode_parallel, init_from_env

    device, rank, world = init_from_env(backend="gloo" if args.device == "cpu" else None)
    ulysses, cfg = (int(x) for x in args.worker.split(","))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = transformer_config(args.model)
    if args.layers is not None:
        config = type(config)(**{**config.__dict__, "num_layers": args.layers})
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    model = fill_random_(model.to_empty(device=device), seed=0).eval()  # same seed: same weights on every rank
    parallel = ParallelInference(model, ParallelConfig(ulysses_degree=ulysses, cfg_degree=cfg))
    split = parallel.guidance_split(True)

    frames, h, w, tokens = latent_shape(config, args.frames, args.height, args.width)
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, frames, config.in_channels, h, w, generator=gen, device=device, dtype=dtype)
    embeds = torch.randn(2, args.text_len, config.text_embed_dim, generator=gen, device=device, dtype=dtype)
    ofs = {"ofs": torch.full((1,), 2.0, device=device)} if config.ofs_embed_dim else {}

    @torch.no_grad()
    def step() -> torch.Tensor:
        if split is None:  # both branches in one batch, as the single-GPU pipeline runs them
            batch = torch.cat([latents, latents])
            return model(batch, embeds, torch.full((2,), 999, device=device), **ofs)
        prediction = model(latents, split.local_half(embeds), torch.full((1,), 999, device=device), **ofs)
        return split.combine(prediction)

    def timed(fn) -> float:
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = torch.tensor([time.perf_counter() - begin], device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
        return float(seconds)

    for _ in range(args.warmup):
        timed(step)
    times = [timed(step) for _ in range(args.repeats)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
    result = {
        "ulysses": ulysses, "cfg": cfg, "world": world, "median_s": statistics.median(times), "min_s": min(times),
        "tokens": tokens + args.text_len,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "machine": machine(device),
    }  # fmt: skip

    if args.vae:
        from cogvideox import VAE

        with torch.device("meta"):
            vae = VAE(dtype=dtype)
        vae = fill_random_(vae.to_empty(device=device), seed=2).eval()
        vae.enable_tiling()
        z = torch.randn(1, 16, frames, h, w, generator=gen, device=device, dtype=dtype)
        with torch.no_grad():
            decode_times = [timed(lambda: decode_parallel(vae, z)) for _ in range(2)]
        result["vae_s"] = decode_times[-1]
    if rank == 0:
        print(RESULT_MARK + json.dumps(result), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ launcher


def launch(args: argparse.Namespace, world: int, ulysses: int, cfg: int) -> dict | str:
    """Run one layout under torchrun; rank 0's result dict, or the reason it failed."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        str(Path(__file__).resolve()), *args.argv, "--worker", f"{ulysses},{cfg}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return f"over {args.timeout_s} s"
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return f"exit {done.returncode}: {' / '.join(tail)}"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    counts = [n for n in (int(x) for x in args.gpus.split(",")) if n <= available]
    if not counts:
        raise SystemExit(f"--gpus {args.gpus}: only {available} {args.device} devices here")
    config = transformer_config(args.model)
    layers = args.layers or config.num_layers
    _, _, _, tokens = latent_shape(config, args.frames, args.height, args.width)
    logger.info(
        "%s, %d layers, %dx%dx%d (%d tokens), one guided step per layout, process counts %s",
        args.model, layers, args.frames, args.height, args.width, tokens + args.text_len, counts,
    )  # fmt: skip
    rows, base, host = [], None, None
    for world in counts:
        for ulysses, cfg in layouts(world):
            result = launch(args, world, ulysses, cfg)
            if isinstance(result, str):
                logger.info("%d processes, ulysses %d x cfg %d: failed (%s)", world, ulysses, cfg, result)
                rows.append([str(world), str(ulysses), str(cfg), "failed", "-", "-", "-", "-", result[:80]])
                continue
            host = result["machine"]
            base = base if base is not None else (result["median_s"] if world == 1 else None)
            speedup = f"{base / result['median_s']:.2f}" if base else "-"
            logger.info("%d processes, ulysses %d x cfg %d: %.3f s/step", world, ulysses, cfg, result["median_s"])
            rows.append([
                str(world), str(ulysses), str(cfg), f"{result['median_s']:.3f}", f"{result['min_s']:.3f}", speedup,
                f"{result['peak_gib']:.1f}" if result["peak_gib"] is not None else "-",
                f"{result['reserved_gib']:.1f}" if result.get("reserved_gib") is not None else "-",
                f"{result['vae_s']:.2f}" if "vae_s" in result else "-",
            ])  # fmt: skip
    header = ["processes", "ulysses", "cfg", "median s/step", "min s", "speed-up", "peak allocated GiB/rank",
              "peak reserved GiB/rank", "VAE decode s"]  # fmt: skip
    table = markdown_table(header, rows)
    facts = (
        f"{args.model}, {layers} of {config.num_layers} layers, {args.frames}x{args.height}x{args.width} "
        f"({tokens + args.text_len} tokens), one guided step (batch 2 on one process), {args.repeats} timed steps "
        f"after {args.warmup} warm-up, random weights"
    )
    print(f"\n{facts}\n\n{table}\n")
    if args.no_results or host is None:
        return
    append_result("Parallel step", f"### {today()}: {host}\n\n`{command_line()}`\n\n{facts}.\n\n{table}\n")
    logger.info("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
