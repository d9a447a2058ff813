"""The whole pipeline (T5 -> denoising loop with guidance -> VAE decode) for a few steps, once per memory mode, ours
against the reference (diffusers' ``CogVideoXPipeline`` on the very same weights) in the same run:

    ours                                      diffusers
    "none"        everything resident          pipe.to(device)
    "text"        T5 offloaded after encoding  (no equivalent: ours only)
    "model"       model CPU offload            pipe.enable_model_cpu_offload()
    "sequential"  sequential CPU offload       pipe.enable_sequential_cpu_offload()
    "auto"        the memory plan's choice     (no equivalent: ours only; on the CPU it runs as "none")

    python benchmarks/e2e.py                                   # CPU: 5B widths, 2 blocks, 9x64x96, ~2 minutes
    python benchmarks/e2e.py --tiny --no-results               # CPU smoke test: tiny widths, seconds
    python benchmarks/e2e.py --device cuda --steps 3 --modes none,model,sequential   # GPU: 5B, 49x480x720, bf16

One process builds our pipeline once, in memory (random weights filled on the device when it is a GPU: seconds,
where writing and reading a 5B folder with T5-XXL would take minutes), and the reference pipeline on the same
tensors (diffusers' modules built on the meta device and given ours; the tokenizer is the same spiece model).
Both then move to host memory; for each mode, ours runs, goes back to the host, then the reference does, so only
one side is ever on the device. Before each timed call the allocator cache is emptied and the peak counters reset,
so each run's peaks (``max_memory_allocated`` and ``max_memory_reserved``, weights included) are its own. Each run
first makes a one-step call that stops at the latents (CUDA/cuBLAS start-up, position tables; a side's first run
also decodes), then the timed call of ``--steps`` steps. Per-step time comes from ``callback_on_step_end`` (one
synchronisation per step, for the clock only); a call of ``--extrapolate-to`` steps is estimated as text encoding +
first step + (N - 1) x the median step + decode. Each run's figures are printed (and written to ``--json``) as soon
as it ends, so a run cut short by a time limit still leaves the figures it had.

On the CPU the execution device is the host, so the offload modes save nothing there (their copies are host to
host), the memory columns are empty, and the reference's offload modes are skipped (diffusers' offload hooks need
an accelerator): the CPU run checks that every mode runs end to end. Appends to benchmarks/RESULTS.md, section
"End to end".
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    append_result,
    command_line,
    cuda_peaks,
    fill_random_,
    machine,
    markdown_table,
    today,
    write_json,
)
from cogvideox import Pipeline  # noqa: E402
from cogvideox.configs import SchedulerConfig, T5Config, VAEConfig, config_to_dict  # noqa: E402
from cogvideox.loading import build_on_meta  # noqa: E402
from cogvideox.memory_plan import CallSize, plan_memory  # noqa: E402
from cogvideox.presets import T5_XXL, TRANSFORMER_CONFIGS, transformer_config  # noqa: E402
from cogvideox.samplers import make_sampler  # noqa: E402
from cogvideox.text import T5Encoder, T5Tokenizer  # noqa: E402
from cogvideox.transformer import Transformer  # noqa: E402
from cogvideox.vae import VAE  # noqa: E402

logger = logging.getLogger("e2e")

MODES = ("none", "text", "model", "sequential", "auto")
REFERENCE_MODES = ("none", "model", "sequential")  # the modes diffusers has an equivalent of
SIDES = ("ours", "reference")
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
    parser.add_argument(
        "--sides",
        default=",".join(SIDES),
        help="ours,reference (default both; the reference runs the modes it has: " + ", ".join(REFERENCE_MODES) + ")",
    )
    parser.add_argument("--steps", type=int, help="denoising steps timed, at least 2 (default: 2 on CPU, 4 on GPU)")
    parser.add_argument("--extrapolate-to", type=int, default=50, help="steps of the estimated full call (50)")
    parser.add_argument("--layers", type=int, help="transformer blocks (default: 2 on CPU, all on GPU)")
    parser.add_argument("--text-layers", type=int, help="T5 blocks (default: 2 on CPU, all 24 on GPU)")
    parser.add_argument("--frames", type=int, help="video frames (default: 9 on CPU, 49 on GPU)")
    parser.add_argument("--height", type=int, help="pixels (default: 64 on CPU, 480 on GPU)")
    parser.add_argument("--width", type=int, help="pixels (default: 96 on CPU, 720 on GPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths everywhere (smoke test of the script)")
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures to this JSON file")
    args = parser.parse_args(argv)
    defaults = GPU_DEFAULTS if torch.device(args.device).type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"--modes {sorted(unknown)}: choose from {MODES}")
    args.sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    if set(args.sides) - set(SIDES) or not args.sides:
        parser.error(f"--sides {args.sides}: choose from {SIDES}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the time of a step is the time between two steps' ends)")
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
    into ``folder / "tokenizer"`` (ids only need to be valid: the weights are random)."""
    from tests.helpers import train_t5_spiece

    transformer_cfg, t5_cfg, vae_cfg = component_configs(args)
    corpus = [PROMPT, "a steam train crosses a stone viaduct at dawn", "waves roll onto a sandy beach"] * 40
    if not (folder / "tokenizer" / "spiece.model").exists():
        train_t5_spiece(folder / "tokenizer", corpus, vocab_size=120)
    tokenizer = T5Tokenizer.from_pretrained(folder / "tokenizer")
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


def _kwargs_for(cls: type, config) -> dict:
    """Our config dataclass as keyword arguments of the reference's constructor (the keys are the published ones)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config_to_dict(config).items() if k in accepted}


@torch.no_grad()
def build_reference(pipe: Pipeline, tokenizer_folder: Path):
    """diffusers' CogVideoXPipeline on our very tensors: transformer, T5EncoderModel and VAE built on the meta
    device and given our state dicts (``assign=True``: no copy), the same spiece model, the published 5B scheduler."""
    import diffusers
    import transformers

    with torch.device("meta"):
        transformer = diffusers.CogVideoXTransformer3DModel(
            **_kwargs_for(diffusers.CogVideoXTransformer3DModel, pipe.transformer.config)
        )
        t5_config = transformers.T5Config(
            **dataclasses.asdict(pipe.text_encoder.config), is_encoder_decoder=False, use_cache=False
        )
        text_encoder = transformers.T5EncoderModel(t5_config)
        vae = diffusers.AutoencoderKLCogVideoX(**_kwargs_for(diffusers.AutoencoderKLCogVideoX, pipe.vae.config))
    for ref, ours in ((transformer, pipe.transformer), (text_encoder, pipe.text_encoder), (vae, pipe.vae)):
        ref.load_state_dict(ours.state_dict(), strict=False, assign=True)
    # T5's input embedding is tied to ``shared`` (one tensor under two names, as from_pretrained ties them).
    text_encoder.encoder.embed_tokens.weight = text_encoder.shared.weight
    # Tables the reference transformer computes in its constructor (non-persistent buffers, e.g. the 2B's sincos
    # positions) come from a block-less copy, cast as from_pretrained(torch_dtype=) would cast them.
    meta_buffers = [name for name, buffer in transformer.named_buffers() if buffer.is_meta]
    if meta_buffers:
        small = diffusers.CogVideoXTransformer3DModel(
            **{**_kwargs_for(diffusers.CogVideoXTransformer3DModel, pipe.transformer.config), "num_layers": 0}
        )
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
        for name in meta_buffers:
            owner_name, _, leaf = name.rpartition(".")
            table = small.get_buffer(name)
            table = table.to(device, dtype if table.is_floating_point() else table.dtype)
            transformer.get_submodule(owner_name).register_buffer(leaf, table, persistent=False)
    for module in (transformer, text_encoder, vae):
        leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if leftover:
            raise SystemExit(f"reference {type(module).__name__}: tensors left unset: {leftover[:5]}")
        module.eval()
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(tokenizer_folder))
    scheduler = diffusers.CogVideoXDPMScheduler(**SCHEDULER_5B)
    ref = diffusers.CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_host_all(pipe) -> None:
    """Every component of ``pipe`` (ours or the reference) to host memory."""
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        module.to("cpu")


def _release_reference(ref) -> None:
    """Remove diffusers' offload hooks (which put sequentially offloaded weights back on the host) and move
    whatever is left on the device to the host."""
    try:
        ref.remove_all_hooks()
    except Exception as error:  # noqa: BLE001  (best effort: the next mode re-installs what it needs)
        logger.warning("reference: remove_all_hooks failed: %s", error)
    try:
        _to_host_all(ref)
    except Exception as error:  # noqa: BLE001
        logger.warning("reference: moving to the host failed: %s", error)


def measure(
    call: Callable[..., torch.Tensor], args: argparse.Namespace, device: torch.device, *, first: bool
) -> tuple[dict, torch.Tensor]:
    """One warm-up call (one step; ``first``: decoded too), then the timed call of ``args.steps`` steps.
    ``call(steps, output_type, callback)`` runs the pipeline and returns its frames."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Warm-up: one step; a side's first run also decodes, so that no run's timing pays the decoder's first run
    # (page faults of its work buffers on the CPU, convolution algorithm choice on the GPU).
    call(1, "pt" if first else "latent", None)
    _sync(device)
    base = 0
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
    frames = call(args.steps, "pt", clock)
    _sync(device)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step_s = statistics.median(steps) if steps else math.nan
    first_step_s = stamps[0] - start  # text encoding (and the offload moves) plus the first step
    decode_s = total - (stamps[-1] - start)  # after the last step: decode, postprocess, offload back
    result = {
        "total_s": total,
        "step_s": step_s,
        "first_step_s": first_step_s,
        "decode_s": decode_s,
        "estimate_s": first_step_s + (args.extrapolate_to - 1) * step_s + decode_s,
        "shape": list(frames.shape),
        "finite": bool(torch.isfinite(frames).all()),
    }
    if device.type == "cuda":
        peaks = cuda_peaks(device)
        result.update(
            peak_gib=peaks["allocated"] / 2**30, reserved_gib=peaks["reserved"] / 2**30, base_gib=base / 2**30
        )
    return result, frames


def _seeded_call(pipeline, args: argparse.Namespace):
    """(steps, output_type, callback) -> frames of one seeded, guided call of ``pipeline`` (ours or diffusers': they
    take the same arguments) at the benchmark's size."""
    size = {"num_frames": args.frames, "height": args.height, "width": args.width, "guidance_scale": 6.0}

    def call(steps, output_type, callback):
        return pipeline(
            PROMPT, num_inference_steps=steps, output_type=output_type, generator=torch.Generator().manual_seed(0),
            callback_on_step_end=callback, **size,
        ).frames  # fmt: skip

    return call


def run_ours(pipe: Pipeline, mode: str, args: argparse.Namespace, device: torch.device, *, first: bool):
    pipe.disable_cpu_offload()
    if mode != "none":  # "none" moves to the device whatever is not there yet (all of it, when built there)
        _to_host_all(pipe)
    # The pipeline's own placement for each mode (cogvideox.memory_plan); "auto" chooses by the free memory.
    plan = pipe.set_memory_plan(mode, device)
    size = CallSize(1, args.frames, args.height, args.width, text_length=pipe.transformer.config.max_text_seq_length)
    predicted = plan_memory(pipe.text_encoder, pipe.transformer, pipe.vae, size, None,
                            memory=plan.mode if plan is not None else "none")  # fmt: skip
    try:
        result, frames = measure(_seeded_call(pipe, args), args, device, first=first)
    finally:
        pipe.disable_cpu_offload()
        _to_host_all(pipe)
    result.update(plan=f"{predicted.mode}, VAE {predicted.vae_decode}", predicted_gib=predicted.peak / 2**30)
    return result, frames


def run_reference(ref, mode: str, args: argparse.Namespace, device: torch.device, *, first: bool):
    _release_reference(ref)
    if mode == "none":
        ref.to(device)
        how = f"pipe.to({str(device)!r})"
    elif mode == "model":
        ref.enable_model_cpu_offload(device=device)
        how = "enable_model_cpu_offload()"
    else:
        ref.enable_sequential_cpu_offload(device=device)
        how = "enable_sequential_cpu_offload()"
    try:
        result, frames = measure(_seeded_call(ref, args), args, device, first=first)
    finally:
        _release_reference(ref)
    result["plan"] = how
    return result, frames


def skip_reason(side: str, mode: str, device: torch.device) -> str | None:
    if side == "reference" and mode not in REFERENCE_MODES:
        return f"diffusers has no equivalent of our {mode!r} mode"
    if side == "reference" and mode != "none" and device.type != "cuda":
        return "diffusers' offload hooks need an accelerator (on the CPU they would copy host to host)"
    return None


def describe(run: dict) -> str:
    """One line for the log as soon as a run ends."""
    if "skipped" in run:
        return f"{run['side']} {run['mode']}: skipped ({run['skipped']})"
    if "failed" in run:
        return f"{run['side']} {run['mode']}: FAILED ({run['failed']})"
    memory = ""
    if "peak_gib" in run:
        memory = f", peak allocated {run['peak_gib']:.2f} GiB, reserved {run['reserved_gib']:.2f} GiB"
    return (
        f"{run['side']} {run['mode']} ({run['plan']}): {run['step_s']:.3f} s/step, text + first step "
        f"{run['first_step_s']:.2f} s, decode {run['decode_s']:.2f} s, total {run['total_s']:.2f} s, estimated "
        f"{run['estimate_s']:.1f} s for the full call{memory}"
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    record = {
        "item": "e2e",
        "model": args.model,
        "tiny": args.tiny,
        "video": f"{args.frames}x{args.height}x{args.width}",
        "steps": args.steps,
        "extrapolate_to": args.extrapolate_to,
        "dtype": args.dtype,
        "device": str(device),
        "runs": [],
    }
    build_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(args, device, dtype, Path(tmp))
        ref = build_reference(pipe, Path(tmp) / "tokenizer") if "reference" in args.sides else None
    if ref is not None:
        _to_host_all(ref)  # its own host copies: from here on the two sides share no tensor on the device
    if args.modes[0] != "none" or args.sides[0] != "ours":
        _to_host_all(pipe)  # else ours runs "none" first, where it was built: 2 x 20 GB of copies saved
    record.update(layers=pipe.transformer.config.num_layers, text_layers=pipe.text_encoder.config.num_layers)
    logger.info("built in %.1f s", time.perf_counter() - build_start)
    write_json(args.json, record)
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for mode in args.modes:
        for side in args.sides:
            run = {"side": side, "mode": mode}
            reason = skip_reason(side, mode, device)
            if reason:
                run["skipped"] = reason
            else:
                first = not any(r["side"] == side and "total_s" in r for r in record["runs"])
                runner = run_ours if side == "ours" else run_reference
                try:
                    result, frames = runner(pipe if side == "ours" else ref, mode, args, device, first=first)
                    run.update(result)
                    if mode == args.modes[0]:  # kept to compare the two sides' videos
                        outputs[(side, mode)] = frames.float().cpu()
                    del frames
                except Exception as error:  # noqa: BLE001  (one failing run must not cost the others)
                    logger.exception("%s %s failed", side, mode)
                    run["failed"] = f"{type(error).__name__}: {error}"[:300]
            record["runs"].append(run)
            if side == "reference" and ("ours", mode) in outputs and ("reference", mode) in outputs:
                ours_out, ref_out = outputs[("ours", mode)], outputs[("reference", mode)]
                if ours_out.shape == ref_out.shape:
                    record["error"] = ((ours_out - ref_out).abs().max() / ref_out.abs().max()).item()
                    logger.info("%s: max |ours - reference| / max |reference| = %.1e", mode, record["error"])
            print(describe(run), flush=True)
            write_json(args.json, record)
    report(args, record, device, pipe)


def report(args: argparse.Namespace, record: dict, device: torch.device, pipe: Pipeline) -> None:
    cfg = pipe.transformer.config
    runs = [r for r in record["runs"] if "total_s" in r]
    what = "tiny widths" if args.tiny else f"{args.model}"
    n = args.extrapolate_to
    header = ["side", "mode", "placement", "s / step (median)", "text + first step s", "decode s", "total s",
              f"est. {n} steps s", "vs reference", "vs own none", "peak allocated GiB", "peak reserved GiB",
              "predicted GiB"]  # fmt: skip
    rows = []
    for r in runs:
        ref = next((x for x in runs if x["side"] == "reference" and x["mode"] == r["mode"]), None)
        own_none = next((x for x in runs if x["side"] == r["side"] and x["mode"] == "none"), None)
        rows.append([
            r["side"], r["mode"], r["plan"], f"{r['step_s']:.3f}", f"{r['first_step_s']:.2f}", f"{r['decode_s']:.2f}",
            f"{r['total_s']:.2f}", f"{r['estimate_s']:.1f}",
            f"{r['estimate_s'] / ref['estimate_s']:.2f}" if ref else "-",
            f"{r['estimate_s'] / own_none['estimate_s']:.2f}" if own_none else "-",
            f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-",
            f"{r['reserved_gib']:.2f}" if "reserved_gib" in r else "-",
            f"{r['predicted_gib']:.2f}" if "predicted_gib" in r else "-",
        ])  # fmt: skip
    not_run = [f"{r['side']} {r['mode']}: {r.get('skipped') or 'FAILED ' + r['failed']}" for r in record["runs"]
               if "total_s" not in r]  # fmt: skip
    table = markdown_table(header, rows)
    error = ""
    if "error" in record:
        error = f"max |ours - reference| / max |reference| = {record['error']:.1e} ({args.modes[0]}); "
    summary = (
        f"{what}, {cfg.num_layers} blocks, T5 {pipe.text_encoder.config.num_layers} blocks, random weights shared "
        f"by both sides, {args.frames}x{args.height}x{args.width}, {args.steps} steps timed with guidance, "
        f"{args.dtype}; output {runs[0]['shape'] if runs else '-'}, finite: {all(r['finite'] for r in runs)}; "
        f"{error}est. = text + first step + {n - 1} x the median step + decode. Peaks (GPU only) = "
        "max_memory_allocated and max_memory_reserved of the timed call, weights included; predicted = our memory "
        "plan's estimated peak for the mode (to compare with reserved: within 15 %, never below)."
        + (" Not run: " + "; ".join(not_run) + "." if not_run else "")
    )
    print(f"\n{summary}\n\n{table}\n", flush=True)
    if not args.no_results and runs:
        entry = f"### {today()}: {machine(device)}\n\n`{command_line()}`\n\n{summary}\n\n{table}\n"
        append_result("End to end", entry)


if __name__ == "__main__":
    main()
