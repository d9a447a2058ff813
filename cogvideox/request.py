"""A generation request, resolved and checked before any heavy work.

:func:`resolve` turns the arguments of a pipeline call into a :class:`Request` (the task, the size, the frame count,
the loaded conditioning images or video frames) or raises an error that names the value, the rule and the fix.
Everything here runs before the text encoder: a bad argument never costs a model pass.

Defaults follow the published models: CogVideoX 1.0 generates 49 frames at 480x720 and 8 fps (its training size,
``sample_* x 8``); CogVideoX 1.5 generates 81 frames at 768x1360 and 16 fps, and 1.5 image-to-video takes its size
from the image (short side 768, long side the nearest multiple of 16 to the image's aspect ratio, at most 1360: the
rule of the official ``sat/sample_video.py`` plus the README's limit).

What the architecture cannot do is an error (frames not 4k+1, sizes not multiples of 16, the 5B-I2V away from
480x720); what it can do but was not trained for is a warning (CogVideoX 1.0 trained on 8N+1 frames, 1.5 on
16N+1). The VAE's compression (8x8 in space, 4x in time for every published VAE) comes from its config, through
the pipeline's :class:`~cogvideox.latents.LatentCodec`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch

from .configs import TransformerConfig
from .latents import LatentCodec
from .processing import OUTPUT_TYPES, load_video_frames, to_pil, video_frames_for_v2v

logger = logging.getLogger(__name__)

Task = Literal["t2v", "i2v", "v2v", "control"]
V15_SIZE, V15_FRAMES, V15_FPS = (768, 1360), 81, 16
V15_I2V_SHORT_SIDE, V15_MAX_SIDE = 768, 1360
CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")


def is_v15(config: TransformerConfig) -> bool:
    """CogVideoX 1.5 is the family with a temporal patch (``patch_size_t``)."""
    return config.patch_size_t is not None


def default_fps(config: TransformerConfig) -> int:
    return V15_FPS if is_v15(config) else 8


def default_num_frames(config: TransformerConfig) -> int:
    return V15_FRAMES if is_v15(config) else config.sample_frames


def _nearest_multiple_of_16(value: float) -> int:
    lower = int(value // 16) * 16
    return lower if abs(value - lower) < abs(value - (lower + 16)) else lower + 16  # ties go up, as in SAT


def size_from_image(image_width: int, image_height: int) -> tuple[int, int]:
    """(height, width) for CogVideoX 1.5 image-to-video: short side 768, aspect kept to a multiple of 16."""
    if image_height < image_width:
        long_side = _nearest_multiple_of_16(image_width / image_height * V15_I2V_SHORT_SIDE)
        height, width = V15_I2V_SHORT_SIDE, long_side
    else:
        long_side = _nearest_multiple_of_16(image_height / image_width * V15_I2V_SHORT_SIDE)
        height, width = long_side, V15_I2V_SHORT_SIDE
    if max(height, width) > V15_MAX_SIDE:
        logger.info("image aspect asks for a %dx%d video; capped at the long side %d", height, width, V15_MAX_SIDE)
        height, width = min(height, V15_MAX_SIDE), min(width, V15_MAX_SIDE)
    return height, width


def default_size(
    config: TransformerConfig, image_size: tuple[int, int] | None = None, *, spatial: int
) -> tuple[int, int]:
    """(height, width) in pixels when the caller gives none; ``image_size`` is the conditioning image's (w, h),
    ``spatial`` the VAE's pixels per latent (``vae.spatial_compression``)."""
    if not is_v15(config):
        return config.sample_height * spatial, config.sample_width * spatial
    if image_size is not None:
        return size_from_image(*image_size)
    return V15_SIZE


def as_int(value: Any, name: str, rule: str) -> int:
    """An integral number (Python or numpy, not bool) as ``int``; anything else is a ValueError with ``rule``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"{name}={value!r}: must be an integer ({rule})")


def check_num_frames(num_frames: int, config: TransformerConfig, *, temporal: int) -> int:
    """4k+1 frames or an error (``k`` = ``temporal``, the VAE's); the trained counts (8N+1 for 1.0, 16N+1 for 1.5)
    or a warning. Returns the count as ``int``."""
    family, step, example = ("CogVideoX 1.5", 16, 81) if is_v15(config) else ("CogVideoX 1.0", 8, 49)
    rule = f"{family} needs {step}N+1 frames (e.g. {example}); the VAE needs at least {temporal}k+1"
    num_frames = as_int(num_frames, "num_frames", rule)
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames={num_frames}: {rule}")
    if (num_frames - 1) % step:
        logger.warning(
            "num_frames=%d: %s was trained on %dN+1 frames (e.g. %d); other %dk+1 counts run but may look worse",
            num_frames, family, step, example, temporal,
        )  # fmt: skip
    return num_frames


# The published CogVideoX-5B setting of RIFLEx (thu-ml/RIFLEx README and cogvideox.py: k = 2, whose period is
# N_k = 20 latent frames; 49 -> 97 frames without training) and the paper's training-free range (about 2x).
RIFLEX_K_V10 = 2
RIFLEX_MAX_FACTOR = 2


def resolve_riflex(
    config: TransformerConfig, num_frames: int, *, temporal: int, riflex: bool, k: Any, frames: Any
) -> tuple[int, int] | None:
    """RIFLEx's ``(k, L)`` for a call of ``num_frames`` video frames, L in temporal positions (latent frames, or
    temporal patches for 1.5) of ``frames`` (default ``num_frames``); None when off, or when L is within the
    period of component k (nothing to change: thu-ml/RIFLEx applies it only then)."""
    if not riflex and k is None and frames is None:
        return None
    if not config.use_rotary_positional_embeddings:
        raise ValueError(
            "riflex=True: RIFLEx lowers a temporal rotary-embedding frequency, and this model has no rotary "
            "embeddings (CogVideoX-2B uses sin-cos position tables); use CogVideoX-5B or 1.5"
        )
    pt = config.patch_size_t or 1

    def positions(video_frames: int) -> int:
        return -(-((video_frames - 1) // temporal + 1) // pt)

    from .rope.rotary import rotary_periods

    periods = rotary_periods(config.attention_head_dim // 4)
    trained = positions(default_num_frames(config))
    if k is None:
        if is_v15(config):
            nearest = min(range(len(periods)), key=lambda i: abs(periods[i] - trained)) + 1
            raise ValueError(
                "riflex=True on CogVideoX 1.5: RIFLEx publishes a setting for CogVideoX-5B only (k=2). Pass "
                f"riflex_k: the temporal component whose period is nearest the {trained} trained positions is "
                f"k={nearest} (periods {', '.join(f'{p:.1f}' for p in periods[:4])}, ...)"
            )
        k = RIFLEX_K_V10
    k = as_int(k, "riflex_k", f"a temporal RoPE component, 1..{len(periods)}")
    if not 1 <= k <= len(periods):
        raise ValueError(f"riflex_k={k}: must be 1..{len(periods)} (the temporal RoPE components of this model)")
    target = num_frames if frames is None else check_num_frames(frames, config, temporal=temporal)
    length, limit = positions(target), RIFLEX_MAX_FACTOR * trained
    if positions(num_frames) > length:
        raise ValueError(
            f"num_frames={num_frames} with riflex_frames={frames}: the RIFLEx frequency covers {frames} frames; "
            "generate at most that many, or raise riflex_frames"
        )
    if length > limit:
        raise ValueError(
            f"{target} frames with RIFLEx: {length} temporal positions, beyond its range of about "
            f"{RIFLEX_MAX_FACTOR}x the {trained} this model was trained on (RIFLEx, arXiv 2502.15894: training-free "
            f"extrapolation to 2x); at most {(limit * pt - 1) * temporal + 1} frames"
        )
    if length <= periods[k - 1]:
        return None  # the video fits one period of component k already: RIFLEx changes nothing
    return k, length


def check_size(height: int, width: int, config: TransformerConfig, *, spatial: int) -> tuple[int, int]:
    """Multiples of ``spatial x patch_size`` pixels (16 when published), and the 5B-I2V only at its training size.
    Returns (height, width) as ``int``."""
    multiple = spatial * config.patch_size
    rule = f"a positive multiple of {multiple} pixels, e.g. 480 or 720"
    height, width = as_int(height, "height", rule), as_int(width, "width", rule)
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            raise ValueError(f"{name}={value}: must be {rule}")
    trained = (config.sample_height * spatial, config.sample_width * spatial)
    if config.use_learned_positional_embeddings and (height, width) != trained:
        raise ValueError(
            f"height x width = {height}x{width}: this checkpoint (CogVideoX-5B-I2V) has learned positions for "
            f"{trained[0]}x{trained[1]} only; omit height= and width= (the image is resized to that size)"
        )
    if not is_v15(config) and (height, width) != trained:
        logger.warning(
            "%dx%d: CogVideoX 1.0 was trained at %dx%d; other sizes run but may look worse", height, width, *trained
        )
    return height, width


def check_text_length(max_sequence_length: int, config: TransformerConfig) -> int:
    """The 5B-I2V's learned positions fix the prompt length; other models take any length, trained on one."""
    max_sequence_length = as_int(max_sequence_length, "max_sequence_length", "at least 2")
    if max_sequence_length < 2:
        raise ValueError(f"max_sequence_length={max_sequence_length}: must be an integer of at least 2")
    if max_sequence_length == config.max_text_seq_length:
        return max_sequence_length
    if config.use_learned_positional_embeddings:
        raise ValueError(
            f"max_sequence_length={max_sequence_length}: this checkpoint's learned positions cover exactly "
            f"{config.max_text_seq_length} prompt tokens"
        )
    logger.warning(
        "max_sequence_length=%d: the model was trained on %d prompt tokens", max_sequence_length,
        config.max_text_seq_length,
    )  # fmt: skip
    return max_sequence_length


def check_guidance_scale(guidance_scale: Any) -> float:
    """A finite number >= 0 (values up to 1 turn guidance off, as in the reference)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise ValueError(f"guidance_scale={guidance_scale!r}: must be a number (e.g. 6.0; 1 or less: no guidance)")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(
            f"guidance_scale={guidance_scale}: must be a finite number >= 0 (e.g. 6.0; 1 or less turns guidance off)"
        )
    return float(guidance_scale)


def check_strength(strength: Any) -> float:
    """Video-to-video strength in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(
            f"strength={strength!r}: must be in (0, 1], the fraction of the steps to run on the noised input video "
            "(1 ignores the input video)"
        )
    return float(strength)


def as_prompt_list(prompt: str | Sequence[str] | None, name: str = "prompt") -> list[str] | None:
    """A list of strings, or None; an empty list or a non-string is an error."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        prompts = list(prompt)
        if not prompts:
            raise ValueError(f"{name} is an empty list: give at least one prompt")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{name} must hold strings, found {bad[0]}")
        return prompts
    raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


def resolve_task(
    image_to_video_checkpoint: bool, image: Any, video: Any, control_checkpoint: bool = False, control_video: Any = None
) -> Task:
    """Which generation a call asks for: ``"i2v"`` (image-to-video checkpoints), ``"control"`` (CogVideoX-Fun
    control checkpoints), ``"v2v"`` or ``"t2v"``."""
    if control_checkpoint:
        if control_video is None:
            raise ValueError(
                "this is a CogVideoX-Fun control checkpoint: pass control_video= (the pose, depth or edge video "
                "that guides the motion: a path or a list of frames)"
            )
        if image is not None or video is not None:
            raise ValueError("CogVideoX-Fun control checkpoints take control_video=, not image= or video=")
        return "control"
    if control_video is not None:
        raise ValueError(
            "control_video= needs a CogVideoX-Fun control checkpoint (its transformer takes noise + control-video "
            "latents, e.g. alibaba-pai/CogVideoX-Fun-V1.1-5b-Pose); this one is "
            f"{'image' if image_to_video_checkpoint else 'text'}-to-video"
        )
    if image_to_video_checkpoint:
        if image is None:
            raise ValueError("this is an image-to-video checkpoint: pass image= (a path, PIL image or array)")
        if video is not None:
            raise ValueError("image-to-video checkpoints take image=, not video=")
        return "i2v"
    if image is not None:
        raise ValueError(
            "image= needs an image-to-video checkpoint (CogVideoX-5b-I2V or CogVideoX1.5-5B-I2V); "
            "this one is text-to-video (for video-to-video pass video=)"
        )
    return "v2v" if video is not None else "t2v"


def control_frames(control_video: Any, num_frames: int | None, height: Any, width: Any) -> tuple[list, int, int]:
    """The control video as PIL frames, all of one size, and (height, width): the frames' own size, which an
    explicit ``height``/``width`` must equal (the control latents are joined to the noise position by position)."""
    frames = [to_pil(frame) for frame in load_video_frames(control_video, "control_video")]
    if num_frames is not None and len(frames) != num_frames:
        raise ValueError(
            f"control_video has {len(frames)} frames but num_frames={num_frames}: they must be equal (leave "
            "num_frames out to take the control video's count)"
        )
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"control_video frames have different sizes {sorted(sizes)}: resize them to one size")
    frame_w, frame_h = sizes.pop()
    for name, asked, own in (("height", height, frame_h), ("width", width, frame_w)):
        if asked is not None and asked != own:
            raise ValueError(
                f"{name}={asked} but the control_video frames are {frame_w}x{frame_h} (width x height): resize the "
                f"control video, or leave {name} out to take its size"
            )
    return frames, frame_h, frame_w


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked call. ``images`` (i2v: PIL images, one or one per prompt) and ``video_frames`` (v2v) are loaded;
    ``shape`` is the transformer latents' ``[B, F' + pad, C, h, w]`` for ``batch`` videos."""

    task: Task
    prompts: list[str] | None
    num_prompts: int
    batch: int
    height: int
    width: int
    num_frames: int
    max_sequence_length: int
    guidance_scale: float
    guided: bool
    strength: float
    shape: tuple[int, ...]
    pad_frames: int
    images: list | None = None
    video_frames: list | None = None  # v2v: the input video; control: the control video


def resolve(
    config: TransformerConfig,
    codec: LatentCodec,
    *,
    image_to_video: bool,
    prompt: Any,
    negative_prompt: Any,
    prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    image: Any,
    video: Any,
    strength: Any,
    height: Any,
    width: Any,
    num_frames: Any,
    guidance_scale: Any,
    num_videos_per_prompt: Any,
    latents: torch.Tensor | None,
    output_type: str,
    callback_tensors: Sequence[str],
    max_sequence_length: Any,
    control: bool = False,
    control_video: Any = None,
) -> Request:
    """Check every argument of a pipeline call and fill in the defaults; see the module docstring. ``control``:
    the checkpoint is a CogVideoX-Fun control model (``control_video`` required)."""
    task = resolve_task(image_to_video, image, video, control, control_video)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")
    per_prompt = as_int(num_videos_per_prompt, "num_videos_per_prompt", "a positive integer")
    if per_prompt < 1:
        raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt}: must be a positive integer")
    unknown = set(callback_tensors) - set(CALLBACK_TENSORS)
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)}: allowed {CALLBACK_TENSORS}")
    prompts = as_prompt_list(prompt)
    if prompts is None and prompt_embeds is None:
        raise ValueError("pass prompt= (a string or a list of strings) or prompt_embeds=")
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is None:
            continue
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != config.text_embed_dim:
            found = f"of shape {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(
                f"{name} {found}: the transformer takes a tensor [B, L, {config.text_embed_dim}] (the text "
                "encoder's output)"
            )
    guidance_scale = check_guidance_scale(guidance_scale)
    strength = check_strength(strength) if task == "v2v" else float("nan")

    images = video_frames = None
    image_size = None
    if task == "i2v":
        images = [to_pil(i) for i in (image if isinstance(image, (list, tuple)) else [image])]
        image_size = images[0].size
    if task == "control":
        if num_frames is not None:
            num_frames = check_num_frames(num_frames, config, temporal=codec.temporal)
        video_frames, height, width = control_frames(control_video, num_frames, height, width)
        num_frames = check_num_frames(len(video_frames), config, temporal=codec.temporal)
    if num_frames is None and task not in ("v2v", "control"):
        num_frames = default_num_frames(config)
    if num_frames is not None:  # before a video is read: a bad count costs nothing
        num_frames = check_num_frames(num_frames, config, temporal=codec.temporal)
    if task == "v2v":
        video_frames = video_frames_for_v2v(video, num_frames, temporal=codec.temporal)
        if num_frames is None:  # the video's longest tk+1 prefix: valid, perhaps not a trained count
            num_frames = check_num_frames(len(video_frames), config, temporal=codec.temporal)
    default_h, default_w = default_size(config, image_size, spatial=codec.spatial)
    height, width = check_size(
        default_h if height is None else height, default_w if width is None else width, config, spatial=codec.spatial
    )
    max_sequence_length = check_text_length(
        config.max_text_seq_length if max_sequence_length is None else max_sequence_length, config
    )
    num_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    if images is not None and len(images) not in (1, num_prompts):
        raise ValueError(f"{len(images)} images for {num_prompts} prompts: give one image, or one per prompt")
    guided = guidance_scale > 1.0
    if guided and negative_prompt_embeds is None:
        negatives = as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) not in (1, num_prompts):
            raise ValueError(
                f"{len(negatives)} negative prompts for {num_prompts} prompts: give one, or one per prompt"
            )
    if guided and negative_prompt_embeds is not None:
        length = prompt_embeds.shape[1] if prompt_embeds is not None else max_sequence_length
        if tuple(negative_prompt_embeds.shape[:2]) != (num_prompts, length):
            raise ValueError(
                f"negative_prompt_embeds of shape {tuple(negative_prompt_embeds.shape)} must match the prompt "
                f"embeddings [{num_prompts}, {length}, {config.text_embed_dim}]"
            )

    batch = num_prompts * per_prompt
    shape = codec.shape(batch, num_frames, height, width, config.output_channels)
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            found = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            s = codec.spatial
            raise ValueError(f"latents of shape {found}: this call needs {shape} ([B, F', C, H/{s}, W/{s}])")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents contain NaN or infinite values: pass finite starting latents")
    return Request(
        task=task, prompts=prompts, num_prompts=num_prompts, batch=batch, height=height, width=width,
        num_frames=num_frames, max_sequence_length=max_sequence_length, guidance_scale=guidance_scale,
        guided=guided, strength=strength, shape=shape, pad_frames=codec.padding(num_frames),
        images=images, video_frames=video_frames,
    )  # fmt: skip


def check_dtypes(transformer: Any, vae: Any, device: torch.device, *, decodes: bool) -> None:
    """float16 is refused where it cannot run (the VAE on the CPU, when the call encodes or decodes) and warned
    about where it is known to fail (CogVideoX 5B / 1.5 were trained in bfloat16)."""
    if transformer.dtype == torch.float16 and transformer.config.use_rotary_positional_embeddings:
        logger.warning(
            "float16 with a CogVideoX 5B / 1.5 model: they were trained in bfloat16 and often give NaN or "
            "black frames in float16; use dtype=torch.bfloat16 (or float32)"
        )
    if vae.dtype == torch.float16 and device.type == "cpu" and decodes:
        raise ValueError(
            "float16 on the CPU: the VAE cannot run in half precision there; use dtype=torch.float32 (or "
            "bfloat16) on the CPU, or a GPU"
        )
