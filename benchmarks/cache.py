"""Step caching: speed and quality of each method against the uncached pipeline (docs/caching.md).

    python benchmarks/cache.py --part quality   # demo model, 40 captions x 2 seeds, 50 steps: accuracy, PSNR
    python benchmarks/cache.py --part speed     # demo model (50 steps) and a 5B-width model (2 layers, 20 steps)
    python benchmarks/cache.py --part speed --device cuda   # 5B at 49x480x720, bf16, random weights (speed only)

Quality: ``cogvideox.demo.evaluate.describe`` reads colour and direction from every video; PSNR is against the
uncached video of the same caption and seed (frames in [0, 1]), averaged over the 80 videos. One video per call
(the decisions of First Block Cache are taken over the whole batch, so a batch would not show what a user's single
video gets). Speed, demo: the median of 5 timed calls after one warm-up. Speed, 5B width: the denoising loop on
the transformer alone (random weights and text embeddings), one timed loop per setting on the CPU (a loop takes
about a minute; the uncached loop is timed first and last, to show the drift), the median of 3 after a warm-up on a
GPU. "skipped": the share of block runs (TeaCache, First Block, Mag), attention runs (PAB, FasterCache, which run
the rest of each block; FasterCache also counts its skipped unconditional halves) or hooked-module runs
(TaylorSeer) that the cache skipped.

TeaCache on the demo model uses the raw relative distance of the time embedding (``coefficients=(0, 0, 0, 1, 0)``):
the published polynomials are fitted to the published models. MagCache's ratios are calibrated here, once, on the
first caption with seed 0 (``calibrate=True``), and printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_result, call_times, command_line, fill_random_, machine, markdown_table, today  # noqa: E402
from cogvideox import Pipeline, Transformer  # noqa: E402
from cogvideox.cache import TEACACHE_COEFFICIENTS, make_cache  # noqa: E402
from cogvideox.configs import SchedulerConfig, config_from_dict  # noqa: E402
from cogvideox.demo import data  # noqa: E402
from cogvideox.demo.evaluate import describe  # noqa: E402
from cogvideox.denoise import denoise  # noqa: E402
from cogvideox.presets import SCHEDULER_5B, transformer_config  # noqa: E402
from cogvideox.samplers import choose_sampler  # noqa: E402

RAW_DISTANCE = (0.0, 0.0, 0.0, 1.0, 0.0)


def demo_settings(mag_ratios: list[float]) -> list[tuple[str, dict]]:
    return [
        ("teacache", {"threshold": 0.1, "coefficients": RAW_DISTANCE}),
        ("teacache", {"threshold": 0.2, "coefficients": RAW_DISTANCE}),
        ("first_block", {"threshold": 0.1}),
        ("first_block", {"threshold": 0.2}),
        ("first_block", {"threshold": 0.3}),
        ("pab", {"spatial_attention_block_skip_range": 2}),
        ("pab", {"spatial_attention_block_skip_range": 3}),
        ("faster", {}),
        ("faster", {"unconditional_batch_skip_range": 2}),
        ("taylorseer", {}),
        ("taylorseer", {"use_lite_mode": True}),
        ("mag", {"mag_ratios": mag_ratios}),
        ("mag", {"mag_ratios": mag_ratios, "threshold": 0.12}),
    ]


def label(method: str, options: dict) -> str:
    shown = {k: v for k, v in options.items() if k not in ("coefficients", "mag_ratios")}
    return method + (" " + ", ".join(f"{k}={v}" for k, v in shown.items()) if shown else "")


def skipped_share(stats) -> str:
    """What the last call skipped: block runs (TeaCache, First Block, Mag), attention runs (PAB, FasterCache, with
    FasterCache's skipped unconditional halves), or module runs (TaylorSeer: predicted instead of computed)."""
    parts = []
    for kind, what in (("blocks", "blocks"), ("attention", "attention")):
        skipped = stats.get(f"{kind}_skipped", 0)
        if skipped:
            parts.append(f"{100 * skipped / (skipped + stats.get(f'{kind}_run', 0)):.0f} % {what}")
    if stats.get("uncond_skipped"):
        parts.append(f"{stats['uncond_skipped']} uncond halves")
    if stats.get("modules_predicted"):
        predicted = stats["modules_predicted"]
        parts.append(f"{100 * predicted / (predicted + stats['modules_run']):.0f} % modules")
    return ", ".join(parts) or "0 %"


def calibrate_mag(pipe: Pipeline, steps: int) -> list[float]:
    cache = pipe.enable_cache("mag", calibrate=True)
    pipe(data.captions()[0], num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.disable_cache()
    return [round(r, 5) for r in cache.calibration]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def quality(pipe: Pipeline, steps: int, seeds: tuple[int, ...]) -> str:
    motions = data.all_motions()
    mag = calibrate_mag(pipe, steps)
    print("mag ratios:", mag, flush=True)

    def videos() -> list[np.ndarray]:
        out = []
        for seed in seeds:
            for m in motions:
                gen = torch.Generator().manual_seed(seed)
                out.append(pipe(m.caption, num_inference_steps=steps, generator=gen, output_type="np").frames[0])
        return out

    def accuracy(frames: list[np.ndarray]) -> int:
        truth = [(m.colour, m.direction) for _ in seeds for m in motions]
        return sum(describe(f) == t for f, t in zip(frames, truth, strict=True))

    pipe.disable_cache()
    base = videos()
    rows = [["uncached", f"{accuracy(base)}/{len(base)}", "-"]]
    print(rows[-1], flush=True)
    for method, options in demo_settings(mag):
        pipe.enable_cache(method, **options)
        got = videos()
        rows.append([label(method, options), f"{accuracy(got)}/{len(got)}",
                     f"{statistics.mean(psnr(a, b) for a, b in zip(got, base, strict=True)):.1f}"])  # fmt: skip
        print(rows[-1], flush=True)
    pipe.disable_cache()
    header = ["method", "colour+direction right", "PSNR vs uncached (dB)"]
    return f"mag_ratios ({steps} steps): {mag}\n\n" + markdown_table(header, rows)


def timed(fn, repeats: int, warm_up: bool = True) -> float:
    return statistics.median(call_times(fn, repeats, warm_up))


def speed_demo(pipe: Pipeline, steps: int, repeats: int) -> str:
    mag = calibrate_mag(pipe, steps)
    caption = data.captions()[0]

    def call():
        pipe(caption, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")

    base = timed(call, repeats)
    rows = [["uncached", f"{base:.3f}", "1.00", "0 %"]]
    for method, options in demo_settings(mag):
        cache = pipe.enable_cache(method, **options)
        t = timed(call, repeats)
        rows.append([label(method, options), f"{t:.3f}", f"{base / t:.2f}", skipped_share(cache.stats)])
        print(rows[-1], flush=True)
    pipe.disable_cache()
    return markdown_table(["method", "s / video", "speed-up", "skipped"], rows)


def speed_5b(device: torch.device, steps: int, repeats: int) -> str:
    """The loop on a 5B-width transformer: CPU 2 layers at 9x128x192 in float32; GPU all 42 at 49x480x720 bf16."""
    cuda = device.type == "cuda"
    config = transformer_config("CogVideoX-5b")
    frames, height, width, dtype = (49, 480, 720, torch.bfloat16) if cuda else (9, 128, 192, torch.float32)
    if not cuda:
        config = type(config)(**{**config.__dict__, "num_layers": 2})
    model = fill_random_(Transformer(config, device=device, dtype=dtype))
    sampler = choose_sampler("ddim", config_from_dict(SchedulerConfig, SCHEDULER_5B))
    timesteps = sampler.set_timesteps(steps, device)
    gen = torch.Generator(device).manual_seed(0)
    latents = torch.randn(
        1, (frames - 1) // 4 + 1, 16, height // 8, width // 8, generator=gen, device=device, dtype=dtype
    )
    embeds = torch.randn(2, 226, 4096, generator=gen, device=device, dtype=dtype)
    # TeaCache: the published 5B polynomial (the 2-layer CPU model is no published architecture, but its time
    # embedding is the 5B's). MagCache: calibrated here, on this model, first.
    tea = {"coefficients": TEACACHE_COEFFICIENTS["CogVideoX-5b"]}
    cache = None

    def loop():
        model_fn = model if cache is None else cache.wrap_model(model)
        if cache is not None:
            cache.begin_call(timesteps.tolist(), True)
        with torch.no_grad():
            denoise(model_fn, sampler, latents, timesteps, embeds, guidance_scale=6.0)
        if cuda:
            torch.cuda.synchronize()
        if cache is not None:
            cache.end_call()

    def measure(method: str, options: dict) -> tuple[float, object]:
        nonlocal cache
        cache = make_cache(method, model.config, **options)
        cache.attach(model)
        t = timed(loop, repeats, warm_up=cuda)
        cache.detach()
        used, cache = cache, None
        return t, used

    base = timed(loop, repeats, warm_up=cuda)
    rows = [["uncached", f"{base:.2f}", "1.00", "-"]]
    print(rows[-1], flush=True)
    _, calibration = measure("mag", {"calibrate": True})
    mag = {"mag_ratios": calibration.calibration}
    settings = [
        ("teacache", {**tea, "threshold": 0.1}), ("teacache", {**tea, "threshold": 0.2}),
        ("first_block", {"threshold": 0.1}), ("pab", {"spatial_attention_block_skip_range": 2}), ("faster", {}),
        ("taylorseer", {}), ("taylorseer", {"use_lite_mode": True}), ("mag", mag),
    ]  # fmt: skip
    for method, options in settings:
        t, used = measure(method, options)
        rows.append([label(method, options), f"{t:.2f}", f"{base / t:.2f}", skipped_share(used.stats)])
        print(rows[-1], flush=True)
    again = timed(loop, repeats, warm_up=cuda)
    rows.append(["uncached, again at the end", f"{again:.2f}", f"{base / again:.2f}", "-"])
    shape = f"{frames}x{height}x{width}, {config.num_layers} layers, {str(dtype).removeprefix('torch.')}"
    return f"5B width ({shape}), DDIM, guidance 6, {steps} steps, s per loop:\n\n" + markdown_table(
        ["method", "s / loop", "speed-up", "skipped"], rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["quality", "speed"], required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    parts = []
    if args.part == "quality":
        pipe = Pipeline.from_pretrained()
        pipe.set_progress_bar_config(disable=True)
        parts.append(f"Demo model, {args.steps} steps, guidance 6, 40 captions x {args.seeds} seeds:\n\n"
                     + quality(pipe, args.steps, tuple(range(args.seeds))))  # fmt: skip
    else:
        if device.type == "cpu":
            pipe = Pipeline.from_pretrained()
            pipe.set_progress_bar_config(disable=True)
            parts.append(
                f"Demo model, {args.steps} steps, one video, s per call:\n\n" + speed_demo(pipe, args.steps, 5)
            )
        cpu = device.type == "cpu"
        parts.append(speed_5b(device, 20 if cpu else args.steps, 1 if cpu else 3))
    text = f"{today()} · `{command_line()}` · {machine(device)}\n\n" + "\n\n".join(parts)
    print(text)
    if not args.no_record:
        append_result("Step caching", text)


if __name__ == "__main__":
    main()
