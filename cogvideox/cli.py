"""The ``cogvideox`` command line (also ``python -m cogvideox``): the only argparse in the package.

    cogvideox generate --prompt "a red circle moves to the right"        # the bundled demo model, any CPU
    cogvideox generate --model THUDM/CogVideoX-5b --prompt "A steam train crosses a stone viaduct" --output train.mp4

Options follow the official ``inference/cli_demo.py`` (every one of its option names is accepted), plus
``--sampler``, ``--device`` and the VAE memory switches. Bad input ends with one line on stderr and exit code 2.

The defaults are the pipeline's, so that ``cogvideox generate --prompt P --seed S`` makes the same video as
``Pipeline.from_pretrained()(P, generator=torch.Generator().manual_seed(S))`` (dynamic guidance is off in both,
unlike the official demo): the fixed ones of ``Pipeline.__call__`` are repeated here (``CALL_DEFAULTS``, kept equal
by a test), and those that depend on the checkpoint (size, frames, prompt length) are not passed at all.
Nothing here imports torch before the arguments are parsed: ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")

logger = logging.getLogger(__name__)

# Pipeline.__call__'s defaults that do not depend on the checkpoint (tests/unit/test_cli_first_hour.py keeps them
# equal to its signature; importing the pipeline here would import torch before --help).
CALL_DEFAULTS = {
    "num_inference_steps": 50,
    "guidance_scale": 6.0,
    "use_dynamic_cfg": False,
    "num_videos_per_prompt": 1,
    "strength": 0.8,
}


# cogvideox.memory_plan.PLANS, spelled out for the same reason (the test keeps the two equal).
MEMORY_PLANS = ("auto", "none", "text", "model", "sequential")


class _Parser(argparse.ArgumentParser):
    """The top-level parser. argparse reports an option no subcommand knows with the top-level usage, which lists
    none of the options a user was looking for; this one reports it with the subcommand's usage."""

    subcommands: dict[str, argparse.ArgumentParser] | None = None

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = (self.subcommands or {}).get(getattr(parsed, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _option(parser: argparse.ArgumentParser, *names: str, **kwargs) -> None:
    """An option under its dashed name and the official demo's underscored one."""
    spellings = list(names) + ["--" + n[2:].replace("-", "_") for n in names if "-" in n[2:]]
    parser.add_argument(*dict.fromkeys(spellings), **kwargs)


def _finite_float(text: str) -> float:
    """An argparse ``type=``: a float that is not nan or inf (float() takes both, and they would run to the end)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give a plain number such as 1.5") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: give a plain number such as 1.5")
    return value


def _cache_spec(text: str) -> tuple[str, dict]:
    """An argparse ``type=``: ``METHOD[:name=value,...]``, the method and every option checked at once (TeaCache's
    default coefficients, which depend on the model, are checked after loading)."""
    from .cache import make_cache, parse_cache_spec

    try:
        method, options = parse_cache_spec(text)
        if method != "teacache" or "coefficients" in options:
            make_cache(method, None, **options)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return method, options


def _non_empty(text: str) -> str:
    """An argparse ``type=`` for paths and names: an empty one (an unset shell variable) would be taken for the
    current folder or for "not given", never for what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty value: give a path or name, or leave the option out for the default")
    return text


# Still images a user passes with --image; anything else (mp4, gif, webp, ...) is read as a video.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _generate_type(image_to_video: bool, input_path: str | None) -> str:
    """t2v, i2v or v2v from the checkpoint and the input file's type, as the Python API decides it from
    ``image=`` / ``video=``: an image goes to image-to-video, which needs an I2V checkpoint."""
    is_image = input_path is not None and Path(input_path).suffix.lower() in IMAGE_SUFFIXES
    if image_to_video:
        if input_path is not None and not is_image:
            raise ValueError(
                f"{input_path}: this is an image-to-video checkpoint, which starts from an image "
                f"({', '.join(IMAGE_SUFFIXES)}); for video-to-video use a text-to-video checkpoint"
            )
        return "i2v"
    if is_image:
        raise ValueError(
            f"{input_path} is an image: image-to-video needs an I2V checkpoint (--model THUDM/CogVideoX-5b-I2V or "
            "THUDM/CogVideoX1.5-5B-I2V); this one is text-to-video (give a video for video-to-video, or no file)"
        )
    return "v2v" if input_path is not None else "t2v"


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give a number >= 0 (e.g. 6.0)")
    return value


def _strength(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]: give a number above 0 and at most 1 (e.g. 0.8)")
    return value


def _positive_int(text: str, example: int = 8) -> int:
    """An argparse ``type=``: a whole number >= 1. Counts and sizes of 0 are refused here, before minutes of
    loading, never taken to mean "the default" (leave the option out for that)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give one such as {example}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text} is not positive: give a whole number >= 1 (e.g. {example}), or leave the option out for the "
            "default"
        )
    return value


def _positive(example: int):
    """``_positive_int`` whose messages give ``example``, a value that suits the option."""

    def parse(text: str) -> int:
        return _positive_int(text, example)

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cogvideox", description="CogVideoX video generation in plain PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate a video from a prompt (and an image or a video)")
    _option(gen, "--prompt", required=True, help="what the video shows")
    _option(gen, "--negative-prompt", default=None, help="what it should not show (default: none)")
    _option(gen, "--model", "--model-path", dest="model", type=_non_empty, default=None,
            help="local folder or hub id (e.g. THUDM/CogVideoX-5b; a string that is not an existing folder is taken "
                 "as a hub id); default: the tiny bundled demo model")  # fmt: skip
    _option(gen, "--image-or-video-path", "--image", "--video", dest="input_path", type=_non_empty, default=None,
            help="conditioning image (image-to-video checkpoints) or input video (video-to-video)")  # fmt: skip
    _option(gen, "--generate-type", choices=("t2v", "i2v", "v2v"), default=None,
            help="default: i2v for image-to-video checkpoints, v2v when a video is given, else t2v")  # fmt: skip
    _option(gen, "--output", "--output-path", dest="output", default="output.mp4",
            help=".mp4, .gif or .webp; default: output.mp4 in the current folder (wherever the command runs; the "
                 "path of each video written is printed at the end)")  # fmt: skip
    # The defaults below are the pipeline's (module docstring); None: the checkpoint's, chosen by the pipeline.
    _option(gen, "--guidance-scale", type=_non_negative_float, default=CALL_DEFAULTS["guidance_scale"],
            help="classifier-free guidance weight (default %(default)s; 1 or less turns guidance off)")  # fmt: skip
    _option(gen, "--num-inference-steps", type=_positive(50), default=CALL_DEFAULTS["num_inference_steps"],
            help="sampler steps (default %(default)s; video-to-video runs --strength of them)")  # fmt: skip
    _option(gen, "--num-frames", type=_positive(49), default=None,
            help="4k+1 frames; default: the checkpoint's (the demo: 9; CogVideoX 1.0: 49; 1.5: 81; video-to-video: "
                 "the input video's longest 4k+1 prefix)")  # fmt: skip
    _option(gen, "--width", type=_positive(720), default=None,
            help="pixels, a multiple of 16; default: the checkpoint's size (the demo: 32x32; CogVideoX 1.0: 480x720; "
                 "1.5: 768x1360; 1.5 image-to-video: from the image's aspect ratio)")  # fmt: skip
    _option(gen, "--height", type=_positive(480), default=None, help="pixels; default: as --width")
    _option(gen, "--fps", type=_positive_int, default=None,
            help="frames per second of the file; default: 8 (the demo and 1.0) or 16 (1.5)")  # fmt: skip
    _option(gen, "--num-videos-per-prompt", type=_positive(1), default=CALL_DEFAULTS["num_videos_per_prompt"],
            help="default %(default)s")  # fmt: skip
    _option(gen, "--strength", type=_strength, default=CALL_DEFAULTS["strength"],
            help="video-to-video: how much to change the input (default %(default)s)")  # fmt: skip
    _option(gen, "--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    _option(gen, "--device", type=_non_empty, default=None, help="default: cuda when available, else cpu")
    _option(gen, "--seed", type=int, default=42,
            help="noise seed (default 42, as the official demo; a Python call draws fresh noise unless given "
                 "generator=torch.Generator().manual_seed(42))")  # fmt: skip
    _option(
        gen,
        "--max-sequence-length",
        type=int,
        default=None,
        help="prompt tokens (default: the model's max_text_seq_length, 226 for every published model)",
    )
    _option(gen, "--sampler", choices=("ddim", "dpm"), default=None, help="default: the checkpoint's scheduler")
    _option(gen, "--timestep-spacing", choices=("trailing", "leading", "linspace"), default=None,
            help="default: the checkpoint's scheduler config")  # fmt: skip
    _option(gen, "--dynamic-cfg", dest="dynamic_cfg", action=argparse.BooleanOptionalAction,
            default=CALL_DEFAULTS["use_dynamic_cfg"],
            help="dynamic classifier-free guidance (default off, as in Python; the official cli_demo.py turns it on: "
                 "add --dynamic-cfg to match it)")  # fmt: skip
    _option(gen, "--memory", choices=MEMORY_PLANS, default=None,
            help="where the weights live (docs/usage.md): 'auto' (default on CUDA) picks the fastest plan that fits "
                 "the free GPU memory; 'none' keeps everything on the device, 'text' offloads the text encoder "
                 "after encoding, 'model' moves one component at a time, 'sequential' streams transformer blocks "
                 "(least memory)")  # fmt: skip
    _option(gen, "--offload", choices=("none", "model", "sequential"), default=None,
            help="the same as --memory with that mode (older spelling)")  # fmt: skip
    _option(gen, "--attention", choices=("sdpa", "math", "flash", "sage"), default=None,
            help="attention kernel (docs/performance.md): 'sdpa' (default), 'flash' (FlashAttention 3 or 2) or "
                 "'sage' (SageAttention) when installed; calls they cannot take run on 'sdpa'")  # fmt: skip
    _option(gen, "--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
            help="decode in overlapping tiles (less memory); default: tile when the decode would not fit in the "
                 "free GPU memory")  # fmt: skip
    _option(gen, "--vae-slicing", action=argparse.BooleanOptionalAction, default=True,
            help="decode one video of the batch at a time (default on)")  # fmt: skip
    _option(gen, "--lora", "--lora-path", action="append", type=_non_empty, default=[], metavar="PATH",
            help="LoRA adapter (file, folder or hub id; diffusers or SAT layout); repeat for several")  # fmt: skip
    _option(gen, "--lora-rank", type=_positive(128), default=None,
            help="accepted for cli_demo.py: the rank is read from the file (a warning says so when this one "
                 "differs); unlike cli_demo.py it does not scale the adapter by 1/rank (use --lora-scale)")  # fmt: skip
    # Negative LoRA weights are meaningful (they subtract an adapter), so only nan and inf are refused.
    _option(gen, "--lora-scale", type=_finite_float, action="append", default=[],
            help="weight of each --lora (one for all, or one per --lora; default 1.0)")  # fmt: skip
    _option(gen, "--cache", type=_cache_spec, default=None, metavar="METHOD[:k=v,...]",
            help="step caching (docs/caching.md): teacache, first_block, pab, faster, taylorseer or mag, with "
                 "options as in diffusers' cache configs, e.g. first_block:threshold=0.1")  # fmt: skip
    _option(gen, "--riflex", action="store_true", default=None,
            help="RIFLEx length extrapolation (3D-RoPE models, docs/editing.md): e.g. CogVideoX-5B at "
                 "--num-frames 97")  # fmt: skip
    _option(gen, "--riflex-k", type=_positive_int, default=None, help="RIFLEx component (default 2 on 1.0)")
    _option(gen, "--riflex-frames", type=_positive_int, default=None,
            help="frames the RIFLEx frequency is set for (default --num-frames)")  # fmt: skip
    _option(gen, "--quiet", action="store_true", help="no progress bar")
    _option(gen, "--ulysses-degree", type=_positive(2), default=1,
            help="processes sharing each transformer pass (sequence parallel; start them with torchrun)")  # fmt: skip
    _option(gen, "--cfg-parallel", action="store_true",
            help="run the two guidance branches on the two halves of the torchrun processes")  # fmt: skip
    sat = commands.add_parser("convert-sat", help="convert original SAT checkpoints to the published folder layout")
    sat.add_argument("input", help="SAT transformer checkpoint (mp_rank_00_model_states.pt)")
    sat.add_argument("output", help="new folder to write (transformer/, and vae/ with --vae)")
    _option(sat, "--config", required=True,
            help="transformer config: a published name (e.g. CogVideoX-5b) or a config.json path")  # fmt: skip
    _option(sat, "--vae", default=None, help="SAT VAE checkpoint (3d-vae.pt) to convert too")
    _option(sat, "--vae-config", default=None, help="VAE config.json path (default: the CogVideoX VAE)")
    _option(sat, "--dtype", choices=DTYPES, default=None, help="store the weights in this dtype")
    parser.subcommands = commands.choices
    return parser


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def _load_loras(pipe, paths: list[str], scales: list[float]) -> list[str]:
    """Load each ``--lora`` with its ``--lora-scale`` (one scale for all, or one per adapter); returns their
    adapter names."""
    if scales and not paths:
        raise ValueError("--lora-scale needs --lora")
    if len(scales) not in (0, 1, len(paths)):
        raise ValueError(f"{len(paths)} --lora but {len(scales)} --lora-scale: give one scale, or one per --lora")
    names = []
    for index, path in enumerate(paths):
        scale = scales[index] if len(scales) == len(paths) else (scales[0] if scales else 1.0)
        names.append(pipe.load_lora(path, adapter_name=f"lora_{index}", scale=scale))
    return names


def lora_ranks(transformer, name: str) -> list[int]:
    """The ranks of adapter ``name`` over the transformer's layers (fused q/k/v layers stack three, and are left
    out)."""
    from .lora import lora_layers

    return sorted(
        {layer.adapters[name].down.shape[0] for path, layer in lora_layers(transformer).items()
         if name in layer.adapters and not path.endswith("to_qkv")}
    )  # fmt: skip


def _check_lora_rank(transformer, rank: int | None, names: list[str], paths: list[str]) -> None:
    """cli_demo.py's ``--lora_rank`` against the files: the rank (and alpha) always come from the file, so a
    different value only earns a warning."""
    if rank is None:
        return
    for name, path in zip(names, paths, strict=True):
        ranks = lora_ranks(transformer, name)
        if ranks and ranks != [rank]:
            found = "rank " + "/".join(map(str, ranks))
            logger.warning(
                "--lora-rank %d but %s has %s: the file's rank was used (it is read from the file; the adapter's "
                "weight is --lora-scale)", rank, path, found,
            )  # fmt: skip


def _parallel_config(args: argparse.Namespace):
    """The ParallelConfig asked for by ``--ulysses-degree`` / ``--cfg-parallel`` or implied by torchrun's
    ``WORLD_SIZE``; None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and args.ulysses_degree == 1 and not args.cfg_parallel:
        return None
    from .distributed import ParallelConfig

    return ParallelConfig(ulysses_degree=args.ulysses_degree, cfg_degree=2 if args.cfg_parallel else 1)


def generate(args: argparse.Namespace) -> list[Path]:
    """Run one generation from parsed arguments; returns the written paths (none on ranks other than 0)."""
    import torch

    from .io import check_output_path, input_file, load_image, load_video, save_video
    from .pipeline import Pipeline
    from .request import default_fps

    # Paths first: a bad one found after minutes of loading and generating would throw the video away.
    output = check_output_path(args.output)
    if args.input_path is not None:
        input_file(args.input_path, "--image-or-video-path", "a path to an image or a video file")
    if args.lora_rank is not None and not args.lora:
        raise ValueError("--lora-rank needs --lora (or --lora_path): drop it, or give the LoRA file")
    device = args.device if args.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    parallel = _parallel_config(args)
    if args.memory is not None and args.offload is not None:
        raise ValueError(f"--memory {args.memory} and --offload {args.offload}: give one of them")
    memory = args.memory or args.offload
    if parallel is not None and memory in ("model", "sequential"):  # before init and minutes of loading
        raise ValueError(
            f"--memory/--offload {memory} with --ulysses-degree / --cfg-parallel (or under torchrun): parallel "
            "inference is not combined with CPU offload (untested); use --memory auto, none or text (each rank holds "
            "the model on its own GPU) or run one process"
        )
    if parallel is not None:
        from .distributed import init_from_env

        local_device, _, world = init_from_env()
        parallel.check_world_size(world)  # before minutes of loading
        # One GPU per process: a bare "cuda" means this process's own GPU (torchrun's LOCAL_RANK).
        device = str(local_device) if args.device in (None, "cuda") else args.device
    dtype_name = args.dtype if args.dtype is not None else ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    overrides = {"timestep_spacing": args.timestep_spacing} if args.timestep_spacing is not None else {}
    if memory is None and device.startswith("cuda"):
        memory = "auto"
    if args.attention is not None:  # before loading: a missing package is one line, not minutes later
        from .ops import set_attention_backend

        set_attention_backend(args.attention)
    # Under a memory plan on a GPU each component loads where the plan keeps it (from_pretrained); LoRAs loaded
    # after step aside from the plan's offload and let it place the components again. Parallel inference is
    # enabled after the LoRAs, so there the weights wait in host memory until the plan below places them.
    plan_on_load = memory if device.startswith("cuda") and parallel is None else None
    pipe = Pipeline.from_pretrained(args.model, dtype=dtype, device=device if plan_on_load else "cpu",
                                    sampler=args.sampler, memory=plan_on_load, **overrides)  # fmt: skip
    pipe.set_progress_bar_config(disable=args.quiet)
    names = _load_loras(pipe, args.lora, args.lora_scale)
    _check_lora_rank(pipe.transformer, args.lora_rank, names, args.lora)
    if parallel is not None:
        pipe.enable_parallel(parallel)
    if args.cache is not None:
        method, options = args.cache
        pipe.enable_cache(method, **options)
    if args.vae_tiling is False:  # before the plan, which then never counts on tiles
        pipe.set_vae_memory_budget(auto_tiling=False)
    if memory is not None:
        plan = pipe.set_memory_plan(memory, device)
        if plan is not None and not args.quiet:
            print(plan.summary(), file=sys.stderr)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.vae_slicing:
        pipe.vae.enable_slicing()

    has_input = args.input_path is not None
    kind = args.generate_type or _generate_type(pipe.image_to_video, args.input_path)
    if kind in ("i2v", "v2v") and not has_input:
        raise ValueError(f"--generate-type {kind} needs --image-or-video-path")
    if kind == "t2v" and has_input:
        raise ValueError("--image-or-video-path is for i2v or v2v; drop it, or set --generate-type")
    conditioning = {}
    if kind == "i2v":
        conditioning["image"] = load_image(args.input_path)
    elif kind == "v2v":
        conditioning["video"] = load_video(args.input_path)
    options = call_options(args, video_to_video=kind == "v2v")
    result = pipe(args.prompt, **conditioning, **options, generator=torch.Generator().manual_seed(args.seed),
                  output_type="np")  # fmt: skip
    if pipe.parallel is not None and not pipe.parallel.is_main:
        return []  # rank 0 holds the frames and writes the files
    fps = args.fps if args.fps is not None else default_fps(pipe.transformer.config)
    paths = _output_paths(output, len(result.frames))
    for frames, path in zip(result.frames, paths, strict=True):
        save_video(frames, path, fps=fps)
    return paths


# Pipeline arguments the command line may set: option dest -> pipeline keyword.
CALL_OPTIONS = {
    "negative_prompt": "negative_prompt",
    "num_frames": "num_frames",
    "height": "height",
    "width": "width",
    "num_inference_steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "dynamic_cfg": "use_dynamic_cfg",
    "num_videos_per_prompt": "num_videos_per_prompt",
    "max_sequence_length": "max_sequence_length",
    "riflex": "riflex",
    "riflex_k": "riflex_k",
    "riflex_frames": "riflex_frames",
}


def call_options(args: argparse.Namespace, *, video_to_video: bool) -> dict:
    """The pipeline keywords of the options. Those left at None are not passed: the pipeline then picks the
    checkpoint's value, exactly as a Python call without them; the others default to ``CALL_DEFAULTS``."""
    options = {keyword: getattr(args, dest) for dest, keyword in CALL_OPTIONS.items()}
    if video_to_video:
        options["strength"] = args.strength
    return {keyword: value for keyword, value in options.items() if value is not None}


def convert_sat_command(args: argparse.Namespace) -> list[Path]:
    """``cogvideox convert-sat IN OUT --config NAME|config.json [--vae 3d-vae.pt]``; returns [OUT]."""
    import torch

    from .loading.sat import convert_sat
    from .presets import TRANSFORMER_CONFIGS

    dtype = getattr(torch, args.dtype) if args.dtype else None
    transformer_config = _read_config(args.config, "--config", TRANSFORMER_CONFIGS)
    vae_config = _read_config(args.vae_config, "--vae-config", {}) if args.vae_config else None
    return [convert_sat(args.input, args.output, transformer_config=transformer_config, vae_checkpoint=args.vae,
                        vae_config=vae_config, dtype=dtype)]  # fmt: skip


def _read_config(value: str, option: str, known: dict[str, dict]) -> dict:
    """A config given as one of the ``known`` names (exact spelling) or as a config.json path."""
    from .configs import read_json

    if value in known:
        return dict(known[value])
    path = Path(value)
    if not path.is_file():
        # Names are matched exactly: a near miss is reported, never silently taken for another model.
        near = [name for name in known if name.lower() == value.lower()]
        hint = f"did you mean {near[0]!r} (names are case-sensitive)? " if near else ""
        names = f"a known name ({', '.join(known)}) or " if known else ""
        raise ValueError(
            f"{option} {value!r} is neither a known config name nor an existing file: {hint}give {names}the path of "
            "a config.json"
        )
    return read_json(path, what=f"the config.json given as {option}")


def _rank_prefix() -> str:
    """``[rank N] `` under torchrun, so that interleaved messages of several processes say whose they are."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return f"[rank {os.environ['RANK']}] "
    return ""


def _distributed_initialized() -> bool:
    if "torch.distributed" not in sys.modules:  # never imported: nothing to look at, nothing to import
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _end_distributed(owned: bool) -> None:
    """Destroy the process group the command created (not one its caller had set up)."""
    if owned and _distributed_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    owns_process_group = not _distributed_initialized()
    try:
        paths = convert_sat_command(args) if args.command == "convert-sat" else generate(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, ImportError, OSError, RuntimeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"cogvideox: error: {_rank_prefix()}{message}", file=sys.stderr)
        return 2
    finally:
        _end_distributed(owns_process_group)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
