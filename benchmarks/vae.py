"""Benchmark the VAE decode: ours against diffusers' ``AutoencoderKLCogVideoX``, tiled and untiled.

The published VAE config with random weights decodes 13 latent frames (49 video frames). Each (implementation,
mode) pair runs in its own subprocess, one after the other, so that one run's memory cannot inflate another's:
- on a GPU: ``torch.cuda.max_memory_allocated`` (reset after a warm-up decode), that peak minus what was
  allocated before the decode (weights, latents), and ``torch.cuda.max_memory_reserved`` (what the caching
  allocator held at its peak, the warm-up's cached blocks included: what has to fit);
- on the CPU: the process's peak resident set (VmHWM, reset after loading via /proc/self/clear_refs), that peak
  minus the resident set before the decode, and the peak of live tensors allocated by the decode
  (``LiveTensorBytes``, the CPU stand-in for the CUDA figure; it ignores allocator caching and kernel scratch).
Both implementations decode the same latents; the script prints their relative difference and appends the
figures to benchmarks/RESULTS.md (section "VAE"); ``--json PATH`` writes them to a JSON file after every run
(benchmarks/gpu.sh builds its summary from it).

    python benchmarks/vae.py                         # CPU: reduced size (32x32 px, 2x2 tiles), ~3-4 minutes
    python benchmarks/vae.py --tiny --latent-frames 3 --no-record   # CPU smoke test: 8-channel VAE, seconds
    python benchmarks/vae.py --device cuda           # GPU: 49 x 480 x 720 in bfloat16, tiles 240 x 360
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    LiveTensorBytes,
    append_result,
    command_line,
    cuda_peaks,
    machine,
    markdown_table,
    today,
    write_json,
)

# CPU defaults: 13 latent frames at 32x32 pixels (4x4 latents) keeps all four runs at a few minutes on 2 cores.
# Tiles of 24x24 pixels with 1/3 overlap give a consistent 2x2 tiling at that size (the reference's 1/6 and 1/5
# overlaps are tuned for its 240x360 tiles and do not tile small frames cleanly).
CPU_DEFAULTS = {"height": 32, "width": 32, "tile": (24, 24), "overlap": (1 / 3, 1 / 3), "dtype": "float32"}
CPU_NOTE = (
    "CPU caveats: at this size a tile is at most 3x3 latents, where PyTorch sends the small 3D convolutions to its "
    "slow native kernel and per-call overheads dominate, so tiled timings say little about 240x360 tiles; RSS "
    "includes allocator caching and convolution scratch (the live-tensor column does not); wall times on a shared "
    "2-core machine vary by 20-30% between runs (other jobs compete for the cores)."
)
GPU_DEFAULTS = {"height": 480, "width": 720, "tile": None, "overlap": (None, None), "dtype": "bfloat16"}


def _mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _load(impl: str, weights: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    if impl == "ours":
        from cogvideox import VAE

        return VAE.from_pretrained(weights, dtype=dtype, device=device)
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(weights, torch_dtype=dtype).to(device).eval()


def _decode(model: torch.nn.Module, impl: str, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z) if impl == "ours" else model.decode(z).sample


def worker(args: argparse.Namespace) -> None:
    """One (implementation, mode) run; prints one JSON line with the figures."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    model = _load(args.impl, Path(args.weights), dtype, device)
    if args.mode == "tiled":
        model.enable_tiling(
            tile_sample_min_height=args.tile[0] if args.tile else None,
            tile_sample_min_width=args.tile[1] if args.tile else None,
            tile_overlap_factor_height=args.overlap[0],
            tile_overlap_factor_width=args.overlap[1],
        )
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(1, 16, args.latent_frames, args.height // 8, args.width // 8, generator=gen).to(device, dtype)

    # Our loader leaves CPU weights memory-mapped from the file; read them all once so that paging them in does
    # not count as decode memory (the reference copies them into memory while loading).
    for param in model.parameters():
        param.sum()
    cuda = device.type == "cuda"
    result: dict = {"impl": args.impl, "mode": args.mode}
    if not cuda:
        # The CPU peak covers the warm-up too: after it the C allocator keeps what it freed, so later decodes
        # would show only their growth beyond that.
        reset_ok = _reset_peak_rss()
        before = _proc_status_kib("VmRSS") * 1024
    # Warm-up: cuDNN picks algorithms; on the CPU oneDNN builds a kernel for every new convolution shape on first
    # use, which at small sizes can cost more than the decode itself.
    start = time.perf_counter()
    _decode(model, args.impl, z)
    if cuda:
        torch.cuda.synchronize()
    result["first_s"] = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times, cpu_times, live_peak, out = [], [], 0, None
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = _decode(model, args.impl, z)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # all threads: steadier than wall time on a busy host
    if not cuda:
        # The live-tensor meter in a decode of its own, untimed: its cost per operator (tens of microseconds) is
        # not negligible at small sizes, and the two implementations run different numbers of operators.
        with LiveTensorBytes() as meter:
            _decode(model, args.impl, z)
        live_peak = meter.peak
    if cuda:
        peaks = cuda_peaks(device)
        peak = peaks["allocated"]
        result.update(meter="cuda max_memory_allocated", peak_mib=_mib(peak), above_mib=_mib(peak - before),
                      reserved_mib=_mib(peaks["reserved"]))  # fmt: skip
    else:
        peak = _proc_status_kib("VmHWM") * 1024
        meter = "peak RSS (VmHWM)" if reset_ok else "peak RSS (VmHWM, includes loading)"
        result.update(meter=meter, peak_mib=_mib(peak), above_mib=_mib(peak - before), live_mib=_mib(live_peak))
    torch.save(out.float().cpu(), args.output)
    result.update(time_s=min(times), cpu_s=min(cpu_times), shape=list(out.shape))
    print(json.dumps(result))


TINY = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4}


def _make_weights(folder: Path, seed: int, tiny: bool = False) -> None:
    """The published config (diffusers defaults equal vae/config.json of 2B) with seeded random weights; ``tiny``:
    8 channels per level, one layer per block (a smoke test of the script)."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    AutoencoderKLCogVideoX(**(TINY if tiny else {})).save_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--height", type=int, default=None, help="video height in pixels")
    parser.add_argument("--width", type=int, default=None, help="video width in pixels")
    parser.add_argument("--latent-frames", type=int, default=13)
    parser.add_argument("--tile", type=int, nargs=2, default=None, metavar=("H", "W"), help="tile size in pixels")
    parser.add_argument("--overlap", type=float, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--impls", default="ours,ref")
    parser.add_argument("--modes", default="untiled,tiled")
    parser.add_argument("--repeats", type=int, default=2, help="timed decodes after the warm-up (best is kept)")
    parser.add_argument("--weights", default=None, help="a folder of saved random weights to reuse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="an 8-channel VAE (smoke test of the script)")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to RESULTS.md")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    args.dtype = args.dtype or defaults["dtype"]
    args.height = args.height or defaults["height"]
    args.width = args.width or defaults["width"]
    if args.tile is None and not args.worker:
        args.tile = defaults["tile"]
    if args.overlap is None:
        args.overlap = defaults["overlap"]
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights) if args.weights else Path(tmp) / "weights"
        if not args.weights:
            _make_weights(weights, args.seed, args.tiny)
        common = [
            "--device", args.device, "--dtype", args.dtype, "--height", str(args.height), "--width", str(args.width),
            "--latent-frames", str(args.latent_frames), "--repeats", str(args.repeats), "--weights", str(weights),
            "--seed", str(args.seed),
        ]  # fmt: skip
        if args.tile:
            common += ["--tile", *map(str, args.tile)]
        if None not in args.overlap:
            common += ["--overlap", *map(repr, args.overlap)]
        results = []
        record = {"item": "vae", "tiny": args.tiny, "device": args.device, "dtype": args.dtype, "runs": results,
                  "video": f"{args.latent_frames} latent frames, {args.height}x{args.width}"}  # fmt: skip
        for mode in args.modes.split(","):
            for impl in args.impls.split(","):
                output = Path(tmp) / f"{impl}-{mode}.pt"
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    "--impl",
                    impl,
                    "--mode",
                    mode,
                    "--output",
                    str(output),
                ]
                done = subprocess.run(cmd + common, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    # One failing run (out of memory, say) is reported; the others still run.
                    print(f"{impl:5s} {mode:8s} FAILED (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
                    record.setdefault("failed", []).append(f"{impl} {mode}: {done.stderr.strip()[-300:]}")
                    write_json(args.json, record)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["output"] = output
                results.append(result)
                write_json(args.json, record)
                live = f"  live tensors {result['live_mib']:7.0f} MiB" if "live_mib" in result else ""
                reserved = f"  reserved {result['reserved_mib']:7.0f} MiB" if "reserved_mib" in result else ""
                print(
                    f"{impl:5s} {mode:8s} {result['time_s']:8.2f} s (CPU {result['cpu_s']:.1f} s)  "
                    f"peak {result['peak_mib']:7.0f} MiB{reserved}  "
                    f"above pre-decode {result['above_mib']:7.0f} MiB{live}  ({result['meter']})",
                    flush=True,
                )
        if not results:
            raise SystemExit("every run failed")
        _report(args, results, record)


def _report(args: argparse.Namespace, results: list[dict], record: dict) -> None:
    """Print the table, the parity of the outputs, and append them to RESULTS.md."""
    by_key = {(r["impl"], r["mode"]): r for r in results}
    cuda = args.device.startswith("cuda")
    tile = f"tiles {args.tile[0]}x{args.tile[1]} px" if args.tile else "default tiles (240x360 px)"
    overlap = (
        "overlaps 1/6 and 1/5" if None in args.overlap else f"overlaps {args.overlap[0]:.3g} and {args.overlap[1]:.3g}"
    )
    errors = []
    for mode in args.modes.split(","):
        if ("ours", mode) in by_key and ("ref", mode) in by_key:
            ours = torch.load(by_key[("ours", mode)]["output"])
            ref = torch.load(by_key[("ref", mode)]["output"])
            error = ((ours - ref).abs().max() / ref.abs().max()).item()
            record.setdefault("errors", {})[mode] = error
            errors.append(f"{mode} max |ours - ref| / max |ref| = {error:.1e}")
    write_json(args.json, record)
    shape = "x".join(map(str, results[0]["shape"]))
    config = "Tiny (8-channel)" if args.tiny else "Published"
    facts = (
        f"{config} VAE config, random weights; decode of {args.latent_frames} latent frames to {shape} "
        f"({args.height}x{args.width} px), {args.dtype}, batch 1; tiled: {tile}, {overlap}; "
        f"each run in its own process: one warm-up decode ('first s'), then the best of {args.repeats} timed; "
        + "; ".join(errors)
    )
    if cuda:
        header = ["side", "mode", "time s", "ratio", "first s", "peak allocated MiB", "above weights+input MiB",
                  "peak reserved MiB"]  # fmt: skip
    else:
        header = ["side", "mode", "time s", "ratio", "CPU s", "ratio", "first s", "peak RSS MiB"]
        header += ["RSS above pre-decode MiB", "live tensors MiB"]
    rows = []
    for r in results:
        ref = by_key.get(("ref", r["mode"]))
        ratio = f"{r['time_s'] / ref['time_s']:.2f}" if ref else "-"
        row = [r["impl"] if r["impl"] == "ours" else "reference", r["mode"], f"{r['time_s']:.2f}", ratio]
        if not cuda:
            row += [f"{r['cpu_s']:.1f}", f"{r['cpu_s'] / ref['cpu_s']:.2f}" if ref else "-"]
        row.append(f"{r['first_s']:.1f}")
        row += [f"{r['peak_mib']:.0f}", f"{r['above_mib']:.0f}"]
        row += [f"{r['reserved_mib']:.0f}"] if cuda else [f"{r['live_mib']:.0f}"]
        rows.append(row)
    entry = f"### {today()}: {machine(torch.device(args.device))}\n\n`{command_line()}`\n\n{facts}.\n\n"
    entry += markdown_table(header, rows) + "\n"
    if not cuda:
        entry += f"\n{CPU_NOTE}\n"
    print()
    print(entry)
    if args.record:
        append_result("VAE", entry)


if __name__ == "__main__":
    main()
