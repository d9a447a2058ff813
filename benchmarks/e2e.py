"""The whole pipeline (T5 -> denoising loop with guidance -> VAE decode) for a given number of steps, once per
memory mode: no offload, text-encoder offload, model CPU offload, sequential CPU offload, and the plan "auto"
chooses (the CUDA default; on the CPU no plan is needed and it runs as "none"). Each row also gives the memory
plan's predicted peak for that mode, to compare with the measured ``max_memory_reserved`` on a GPU.

    python benchmarks/e2e.py                                   # CPU: 5B widths, 2 blocks, 9x64x96, ~2 minutes
    python benchmarks/e2e.py --tiny --no-results               # CPU smoke test: tiny widths, seconds
    python benchmarks/e2e.py --device cuda --steps 4           # GPU: 5B, 49x480x720, bf16, every block

One process builds the pipeline once (on the device when it is a GPU: random fill is fast there) and runs the
modes one after the other: "none" moves every component to the device, the offload modes start from host memory.
Before each timed call the allocator cache is emptied and the peak counter reset, so each mode's peak
(``torch.cuda.max_memory_allocated``) is its own. Each mode first runs a one-step call that stops at the latents
(CUDA/cuBLAS start-up, position tables; the first mode's also decodes), then the timed call. Per-step time comes
from ``callback_on_step_end`` (one synchronisation per step, for the clock only). On the CPU the execution device
is the host, so the offload modes save nothing there (their copies are host to host) and the memory column is
empty: the CPU run checks that every mode runs end to end.
Appends to benchmarks/RESULTS.md, section "End to end".
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_result, command_line, fill_random_, machine, markdown_table, today  # noqa: E402
from cogvideox import Pipeline  # noqa: E402
from cogvideox.configs import SchedulerConfig, T5Config, VAEConfig  # noqa: E402
from cogvideox.loading import build_on_meta  # noqa: E402
from cogvideox.memory_plan import CallSize, plan_memory  # noqa: E402
from cogvideox.presets import T5_XXL, TRANSFORMER_CONFIGS, transformer_config  # noqa: E402
from cogvideox.samplers import make_sampler  # noqa: E402
from cogvideox.text import T5Encoder, T5Tokenizer  # noqa: E402
from cogvideox.transformer import Transformer  # noqa: E402
from cogvideox.vae import VAE  # noqa: E402

logger = logging.getLogger("e2e")

MODES = ("none", "text", "model", "sequential", "auto")
CPU_DEFAULTS = {"layers": 2, "text_layers": 2, "frames": 9, "height": 64, "width": 96, "steps": 2, "dtype": "float32"}
GPU_DEFAULTS = {"layers": None, "text_layers": None, "frames": 49, "height": 480, "width": 720, "steps": 4,
                "dtype": "bfloat16"}  # fmt: skip
# The published 5B scheduler_config.json (v-prediction on a zero-terminal-SNR schedule).
SCHEDULER_5B = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
                "timestep_spacing": "trailing", "snr_shift_scale": 1.0}  # fmt: skip
PROMPT = "a panda in a red jacket plays a small guitar in a bamboo forest"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CogVideoX-5b", choices=sorted(TRANSFORMER_CONFIGS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 CPU, bf16 GPU")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 2 on CPU, 4 on GPU)")
    parser.add_argument("--layers", type=int, help="transformer blocks (default: 2 on CPU, all on GPU)")
    parser.add_argument("--text-layers", type=int, help="T5 blocks (default: 2 on CPU, all 24 on GPU)")
    parser.add_argument("--frames", type=int, help="video frames (default: 9 on CPU, 49 on GPU)")
    parser.add_argument("--height", type=int, help="pixels (default: 64 on CPU, 480 on GPU)")
    parser.add_argument("--width", type=int, help="pixels (default: 96 on CPU, 720 on GPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths everywhere (smoke test of the script)")
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    defaults = GPU_DEFAULTS if torch.device(args.device).type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"--modes {sorted(unknown)}: choose from {MODES}")
    return args


def component_configs(args: argparse.Namespace):
    """(transformer, T5, VAE) configs: the published ones, cut to ``--layers``/``--text-layers``, or tiny."""
    transformer = transformer_config(args.model)
    t5 = dict(T5_XXL)
    vae = VAEConfig(scaling_factor=0.7)
    if args.layers:
        transformer = dataclasses.replace(transformer, num_layers=args.layers)
    if args.text_layers:
        t5["num_layers"] = args.text_layers
    if args.tiny:
        transformer = dataclasses.replace(
            transformer, num_attention_heads=2, attention_head_dim=16, text_embed_dim=32, time_embed_dim=16
        )
        t5.update(d_model=32, d_kv=8, d_ff=64, num_heads=4, vocab_size=256)
        vae = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, scaling_factor=0.7)
    return transformer, T5Config(**t5), vae


def build_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, folder: Path) -> Pipeline:
    """Random-weight components of the configured shapes, filled on ``device``; a tokenizer trained on the spot
    (ids only need to be valid: the weights are random)."""
    from tests.helpers import train_t5_spiece

    transformer_cfg, t5_cfg, vae_cfg = component_configs(args)
    corpus = [PROMPT, "a steam train crosses a stone viaduct at dawn", "waves roll onto a sandy beach"] * 40
    tokenizer = T5Tokenizer.from_pretrained(train_t5_spiece(folder / "tokenizer", corpus, vocab_size=120))
    parts = []
    factories = (
        lambda: Transformer(transformer_cfg, dtype=dtype),
        lambda: T5Encoder(t5_cfg, dtype=dtype),
        lambda: VAE(vae_cfg, dtype=dtype),
    )
    for seed, factory in enumerate(factories):
        module = build_on_meta(factory).to_empty(device=device).eval()
        parts.append(fill_random_(module, seed=seed))
    transformer, text_encoder, vae = parts
    sampler = make_sampler(SchedulerConfig(**SCHEDULER_5B), kind="dpm")
    pipe = Pipeline(transformer, vae, text_encoder, tokenizer, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_host_all(pipe: Pipeline) -> None:
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        module.to("cpu")


def run_mode(pipe: Pipeline, mode: str, args: argparse.Namespace, device: torch.device, *, first: bool) -> dict:
    pipe.disable_cpu_offload()
    _to_host_all(pipe)
    # The pipeline's own placement for each mode (cogvideox.memory_plan); "auto" chooses by the free memory.
    plan = pipe.set_memory_plan(mode, device)
    size = CallSize(1, args.frames, args.height, args.width, text_length=pipe.transformer.config.max_text_seq_length)
    predicted = plan_memory(pipe.text_encoder, pipe.transformer, pipe.vae, size, None,
                            memory=plan.mode if plan is not None else "none")  # fmt: skip
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    call = {"num_frames": args.frames, "height": args.height, "width": args.width, "guidance_scale": 6.0}
    # Warm-up: one step; the first mode also decodes, so that no mode's timing pays the decoder's first run
    # (page faults of its work buffers on the CPU, convolution algorithm choice on the GPU).
    pipe(PROMPT, num_inference_steps=1, output_type="pt" if first else "latent", **call)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    stamps: list[float] = []

    def clock(pipe_, i, t, tensors):
        _sync(device)
        stamps.append(time.perf_counter())
        return {}

    _sync(device)
    start = time.perf_counter()
    frames = pipe(
        PROMPT, num_inference_steps=args.steps, output_type="pt", generator=torch.Generator().manual_seed(0),
        callback_on_step_end=clock, **call,
    ).frames  # fmt: skip
    _sync(device)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    result = {
        "mode": mode,
        "total_s": total,
        "step_s": statistics.median(steps) if steps else float("nan"),
        "first_step_s": stamps[0] - start,  # text encoding (and the offload moves) plus the first step
        "shape": tuple(frames.shape),
        "finite": bool(torch.isfinite(frames).all()),
        "decode_s": total - (stamps[-1] - start),  # after the last step: decode, postprocess, offload back
    }
    result["plan"] = f"{predicted.mode}, VAE {predicted.vae_decode}"
    result["predicted_gib"] = predicted.peak / 2**30
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        result["base_gib"] = base / 2**30
    pipe.disable_cpu_offload()
    _to_host_all(pipe)
    return result


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    build_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(args, device, dtype, Path(tmp))
    logger.info("built in %.1f s", time.perf_counter() - build_start)
    runs = []
    for index, mode in enumerate(args.modes):
        runs.append(run_mode(pipe, mode, args, device, first=index == 0))
        logger.info("%s", runs[-1])
    report(args, runs, device, pipe)


def report(args: argparse.Namespace, runs: list[dict], device: torch.device, pipe: Pipeline) -> None:
    cfg = pipe.transformer.config
    what = "tiny widths" if args.tiny else f"{args.model}"
    header = ["mode", "plan", "total s", "s / step (median)", "text + first step s", "decode s", "peak GiB",
              "reserved GiB", "predicted GiB", "predicted / reserved", "ratio to none"]  # fmt: skip
    base = next((r for r in runs if r["mode"] == "none"), None)
    rows = []
    for r in runs:
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        reserved = f"{r['reserved_gib']:.2f}" if "reserved_gib" in r else "-"
        accuracy = f"{r['predicted_gib'] / r['reserved_gib']:.2f}" if "reserved_gib" in r else "-"
        ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        rows.append([r["mode"], r["plan"], f"{r['total_s']:.2f}", f"{r['step_s']:.3f}", f"{r['first_step_s']:.2f}",
                     f"{r['decode_s']:.2f}", peak, reserved, f"{r['predicted_gib']:.2f}", accuracy,
                     ratio])  # fmt: skip
    table = markdown_table(header, rows)
    summary = (
        f"{what}, {cfg.num_layers} blocks, T5 {pipe.text_encoder.config.num_layers} blocks, "
        f"{args.frames}x{args.height}x{args.width}, {args.steps} steps with guidance, {args.dtype}; output "
        f"{runs[0]['shape']}, finite: {all(r['finite'] for r in runs)}. Peak = max_memory_allocated and reserved = "
        "max_memory_reserved of the timed call (GPU only); predicted = the memory plan's estimated peak for the mode "
        "(target: within 15 % of reserved, never below)."
    )
    print(f"\n{summary}\n\n{table}\n")
    if not args.no_results:
        entry = f"### {today()}: {machine(device)}\n\n`{command_line()}`\n\n{summary}\n\n{table}\n"
        append_result("End to end", entry)


if __name__ == "__main__":
    main()
