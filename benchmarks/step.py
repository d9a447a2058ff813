"""One guided denoising step of the transformer (batch 2: unconditional and conditional), ours against the
reference (diffusers' CogVideoXTransformer3DModel), in one process, on the same random weights of real shape.

    python benchmarks/step.py --model CogVideoX-5b                 # CPU: reduced size (printed), ~1-2 minutes
    python benchmarks/step.py --model CogVideoX-5b --compile       # both sides torch.compile'd
    python benchmarks/step.py --model CogVideoX-5b --device cuda   # GPU: bf16, 49x480x720, all layers

The two models share their weight tensors (the reference is built on the meta device and assigned ours), so the
comparison costs one copy of the weights. The reference gets its rotary tables as its pipeline prepares them,
once, outside the timing; ours computes and caches its own on the warm-up call. Timings run in blocks (ours,
reference, reference, ours), each block after a change of side led by an untimed call; the median is reported.
On the CPU, ours runs its large float32 products through oneDNN (``use_onednn_linear_(ours)``, as the pipeline
does; ``cogvideox.ops.linear``) and the reference through ``F.linear`` (MKL); ``--aten-linear`` skips that swap,
so ours runs ``F.linear`` too, which isolates everything but the matrix products. Peak memory is what the step
allocates on top of weights and inputs: ``torch.cuda.max_memory_allocated`` on a GPU (with
``max_memory_reserved`` beside it, after emptying the allocator's cache), a live-tensor count (``LiveTensorBytes``)
on the CPU. ``--json PATH`` writes the headline figures (benchmarks/gpu.sh builds its summary from them).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    LiveTensorBytes,
    append_result,
    command_line,
    cuda_peaks,
    fill_random_,
    machine,
    markdown_table,
    step_flops,
    today,
    write_json,
)
from cogvideox import Transformer  # noqa: E402
from cogvideox.ops.fp8 import weight_bytes  # noqa: E402
from cogvideox.ops.linear import use_onednn_linear_  # noqa: E402
from cogvideox.presets import TRANSFORMER_CONFIGS, transformer_config  # noqa: E402

logger = logging.getLogger("step")

# CPU defaults: the model's real width, heads and FFN, but 2 layers and a small clip, so one side's step takes a
# few seconds on 2 cores. GPU defaults: everything real.
CPU_DEFAULTS = {"layers": 2, "frames": 9, "height": 128, "width": 192}
GPU_DEFAULTS = {"layers": None, "frames": 49, "height": 480, "width": 720}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CogVideoX-5b", choices=sorted(TRANSFORMER_CONFIGS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bf16")
    parser.add_argument("--layers", type=int, help="number of blocks (default: 2 on CPU, all on GPU)")
    parser.add_argument("--frames", type=int, help="video frames (default: 9 on CPU, 49 on GPU)")
    parser.add_argument("--height", type=int, help="video height in pixels (default: 128 on CPU, 480 on GPU)")
    parser.add_argument("--width", type=int, help="video width in pixels (default: 192 on CPU, 720 on GPU)")
    parser.add_argument("--text-len", type=int, default=226, help="text tokens (the pipelines pad to 226)")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (compile happens here)")
    parser.add_argument("--fuse-qkv", action="store_true", help="fused q/k/v projection on both sides")
    parser.add_argument("--fp8", action="store_true", help="ours with fp8 weight storage (the reference as is)")
    parser.add_argument(
        "--aten-linear", action="store_true", help="ours with F.linear on the CPU too (no use_onednn_linear_(ours))"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both whole models (fullgraph)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick CPU smoke test)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the (slower, untimed) CPU memory pass")
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--json", metavar="PATH", help="also write the headline figures to this JSON file")
    args = parser.parse_args(argv)
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


class Shape(types.SimpleNamespace):
    """Latent sizes of a ``frames x height x width`` video for one transformer config."""

    @classmethod
    def of(cls, config, frames: int, height: int, width: int) -> Shape:
        if height % 16 or width % 16:
            raise SystemExit(f"--height {height} --width {width}: both must be multiples of 16 pixels")
        latent_frames = (frames - 1) // config.temporal_compression_ratio + 1
        pt = config.patch_size_t or 1
        latent_frames += -latent_frames % pt  # the 1.5 pipelines pad to a multiple of patch_size_t
        h, w = height // 8, width // 8
        tokens = (latent_frames // pt) * (h // config.patch_size) * (w // config.patch_size)
        return cls(frames=latent_frames, height=h, width=w, video_tokens=tokens)


def build_models(args, device: torch.device, dtype: torch.dtype):
    """Ours with random weights, and the reference sharing the very same tensors."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    overrides = {} if args.layers is None else {"num_layers": args.layers}
    config = transformer_config(args.model)
    config = type(config)(**{**config.__dict__, **overrides})
    with torch.device("meta"):
        ours = Transformer(config, dtype=dtype)
    ours = ours.to_empty(device=device)  # allocated straight in the compute dtype: no float32 copy of a 5B
    fill_random_(ours, seed=0)
    ours.eval()

    ref_kwargs = {**TRANSFORMER_CONFIGS[args.model], **overrides}
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**ref_kwargs)
    # Tables the reference computes in its constructor (non-persistent buffers) come from a block-less copy,
    # cast as from_pretrained(torch_dtype=) would cast them.
    small = CogVideoXTransformer3DModel(**{**ref_kwargs, "num_layers": 0})
    ref.load_state_dict(ours.state_dict(), assign=True, strict=False)
    for name, buffer in list(ref.named_buffers()):
        if buffer.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = ref.get_submodule(owner_name)
            table = small.get_buffer(name)
            table = table.to(device, dtype if table.is_floating_point() else table.dtype)
            owner.register_buffer(leaf, table, persistent=False)
    del small
    leftover = [n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
    if leftover:
        raise SystemExit(f"reference tensors left unset: {leftover[:5]}")
    ref.eval()
    if args.fuse_qkv:
        ours.fuse_qkv_projections()
        ref.fuse_qkv_projections()
    if args.fp8:
        ours.enable_fp8_weight_storage()  # new fp8 tensors for ours; the reference keeps the originals

    def rotary(shape: Shape):
        if not config.use_rotary_positional_embeddings:
            return None
        fake_pipe = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
        return CogVideoXPipeline._prepare_rotary_positional_embeddings(
            fake_pipe, shape.height * 8, shape.width * 8, shape.frames, device
        )

    return config, ours, ref, rotary


def make_inputs(config, shape: Shape, text_len: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(
        2, shape.frames, config.in_channels, shape.height, shape.width, generator=gen, device=device, dtype=dtype
    )
    text = torch.randn(2, text_len, config.text_embed_dim, generator=gen, device=device, dtype=dtype)
    timestep = torch.full((2,), 999, device=device, dtype=torch.long)  # as the pipelines pass t.expand(B)
    ofs = torch.full((2,), 2.0, device=device) if config.ofs_embed_dim else None
    return latents, text, timestep, ofs


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn) -> float:
        """Seconds one call of ``fn`` takes (CUDA events on a GPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def peak_bytes(fn, device: torch.device) -> tuple[int, int | None]:
    """Bytes the call allocates at its peak on top of what existed before, and on a GPU the same for the memory
    the caching allocator reserves (its cache emptied first, so the other side's blocks do not count)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before, before_reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        fn()
        torch.cuda.synchronize(device)
        peaks = cuda_peaks(device)
        return peaks["allocated"] - before, peaks["reserved"] - before_reserved
    with LiveTensorBytes() as meter:
        fn()
    return meter.peak, None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config, ours, ref, rotary = build_models(args, device, dtype)
    if not args.aten_linear:
        # Ours only: the swap changes the class of our layers, not the weights the reference shares, and the
        # reference's nn.Linear layers always run F.linear. After fp8 (if asked), so fp8 layers stay as they are.
        use_onednn_linear_(ours)
    shape = Shape.of(config, args.frames, args.height, args.width)
    if config.use_learned_positional_embeddings and (args.frames, args.height, args.width) != (49, 480, 720):
        raise SystemExit(f"{args.model} has learned positions: run it at --frames 49 --height 480 --width 720")
    latents, text, timestep, ofs = make_inputs(config, shape, args.text_len, device, dtype)
    ref_rotary = rotary(shape)
    layers = config.num_layers
    tokens = shape.video_tokens + args.text_len
    logger.info(
        "%s: %d of %d layers, %dx%dx%d video (latents %dx%dx%d, %d tokens), batch 2, %s on %s%s%s",
        args.model, layers, transformer_config(args.model).num_layers, args.frames, args.height, args.width,
        shape.frames, shape.height, shape.width, tokens, args.dtype, device,
        ", fused qkv" if args.fuse_qkv else "", ", compiled" if args.compile else "",
    )  # fmt: skip

    run_ours_model, run_ref_model = ours, ref
    if args.compile:
        options = {"fullgraph": True, "dynamic": False, "mode": args.compile_mode, "backend": args.compile_backend}
        run_ours_model = torch.compile(ours, **options)
        run_ref_model = torch.compile(ref, **options)
    ofs_kwargs = {} if ofs is None else {"ofs": ofs}

    @torch.no_grad()
    def run_ours():
        return run_ours_model(latents, text, timestep, **ofs_kwargs)

    @torch.no_grad()
    def run_ref():
        return run_ref_model(latents, text, timestep, image_rotary_emb=ref_rotary, return_dict=False, **ofs_kwargs)[0]

    record = {
        "item": "compile" if args.compile else "step",
        "model": args.model,
        "layers": layers,
        "tokens": tokens,
        "video": f"{args.frames}x{args.height}x{args.width}",
        "dtype": args.dtype,
        "compiled": args.compile,
        "device": str(device),
    }
    timer = Timer(device)
    warm = {"ours": [], "reference": []}
    write_json(args.json, record)
    for _ in range(args.warmup):
        for side, fn in (("ours", run_ours), ("reference", run_ref)):
            warm[side].append(timer(fn))
            logger.info("%s: warm-up step %.2f s", side, warm[side][-1])
            record["first_s"] = {k: values[0] for k, values in warm.items() if values}  # compiling, when compiled
            write_json(args.json, record)
    ref_out = run_ref().float()
    err = (run_ours().float() - ref_out).abs().max().item() / ref_out.abs().max().item()
    del ref_out

    times = {"ours": [], "reference": []}
    sides = {"ours": run_ours, "reference": run_ref}
    # Blocks in ABBA order, so a slow drift of the machine (other work, clocks) weighs on both sides alike. Each
    # block after a change of side starts with an untimed call: on the CPU, the first call after the other side's
    # (whose products may run a different BLAS: MKL against oneDNN) is slower, by up to 10 % for the reference.
    half = max(args.repeats // 2, 1)
    blocks = [("ours", half), ("reference", half), ("reference", args.repeats - half), ("ours", args.repeats - half)]
    previous = None
    for side, count in blocks:
        if count and side != previous:
            sides[side]()
        for _ in range(count):
            times[side].append(timer(sides[side]))
        previous = side if count else previous
    linear, attn = step_flops(config.inner_dim, layers, tokens, batch=2)
    median = {k: statistics.median(v) for k, v in times.items()}
    record.update(
        ours_s=median["ours"], reference_s=median["reference"], ratio=median["ours"] / median["reference"], error=err
    )
    write_json(args.json, record)
    logger.info("median step: ours %.3f s, reference %.3f s", median["ours"], median["reference"])
    memory, reserved = {}, {}
    # The CPU meter is a dispatch mode, which compiled code cannot run under: no CPU memory figure when compiled.
    if device.type == "cuda" or not (args.no_memory or args.compile):
        for side, fn in (("ours", run_ours), ("reference", run_ref)):
            memory[side], reserved_bytes = peak_bytes(fn, device)
            if reserved_bytes is not None:
                reserved[side] = reserved_bytes
        record.update(peak_bytes=memory, reserved_bytes=reserved)
        write_json(args.json, record)

    weights = {"ours": weight_bytes(ours), "reference": weight_bytes(ref)}
    header = ["side", "median s", "min s", "ratio", "TFLOP/s", "peak MiB", "reserved MiB", "weights MiB"]
    header += ["compile s"] if args.compile else []
    rows = []
    for side in ("ours", "reference"):
        row = [
            "ours (fp8 weights)" if side == "ours" and args.fp8 else side,
            f"{median[side]:.3f}",
            f"{min(times[side]):.3f}",
            f"{median[side] / median['reference']:.3f}",
            f"{(linear + attn) / median[side] / 1e12:.3f}",
            f"{memory[side] / 2**20:.0f}" if side in memory else "-",
            f"{reserved[side] / 2**20:.0f}" if side in reserved else "-",
            f"{weights[side] / 2**20:.0f}",
        ]
        if args.compile:
            row.append(f"{warm[side][0]:.1f}" if warm[side] else "-")
        rows.append(row)
    table = markdown_table(header, rows)
    facts = (
        f"{args.model}, {layers} of {transformer_config(args.model).num_layers} layers, "
        f"{args.frames}x{args.height}x{args.width} ({tokens} tokens), batch 2, {args.dtype}, "
        f"{'fused' if args.fuse_qkv else 'separate'} q/k/v, "
        f"{f'compiled ({args.compile_backend})' if args.compile else 'eager'}"
        f"{', ours with fp8 weights' if args.fp8 else ''}"
        f"{', ours with F.linear (oneDNN off)' if args.aten_linear else ''}; "
        f"step = {(linear + attn) / 1e12:.3f} TFLOP ({attn / (linear + attn):.0%} attention); "
        f"max |ours - ref| / max |ref| = {err:.1e}; {args.repeats} timed steps per side after {args.warmup} warm-up; "
        "peak = allocated on top of weights and inputs (max_memory_allocated on a GPU, live tensors on the CPU), "
        "reserved = the same for max_memory_reserved (GPU only)"
    )
    print(f"\n{facts}\n\n{table}\n")
    if args.no_results:
        return
    entry = f"### {today()}: {machine(device)}\n\n`{command_line()}`\n\n{facts}.\n\n{table}\n"
    append_result("Transformer step", entry)
    logger.info("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
