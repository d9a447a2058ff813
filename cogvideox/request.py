"""A generation request, resolved and checked before any heavy work.

Defaults follow the published models: CogVideoX 1.0 generates 49 frames at 480x720 and 8 fps (its training size,
``sample_* x 8``); CogVideoX 1.5 generates 81 frames at 768x1360 and 16 fps, and 1.5 image-to-video takes its size
from the image (short side 768, long side the nearest multiple of 16 to the image's aspect ratio, at most 1360: the
rule of the official ``sat/sample_video.py`` plus the README's limit).

What the architecture cannot do is an error (frames not 4k+1, sizes not multiples of 16, the 5B-I2V away from
480x720); what it can do but was not trained for is a warning (CogVideoX 1.0 trained on 8N+1 frames, 1.5 on
16N+1).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from .configs import TransformerConfig

logger = logging.getLogger(__name__)

VAE_SPATIAL, VAE_TEMPORAL = 8, 4  # the CogVideoX VAE compresses 8x8 in space and 4x in time
V15_SIZE, V15_FRAMES, V15_FPS = (768, 1360), 81, 16
V15_I2V_SHORT_SIDE, V15_MAX_SIDE = 768, 1360


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


def default_size(config: TransformerConfig, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) in pixels when the caller gives none; ``image_size`` is the conditioning image's (w, h)."""
    if not is_v15(config):
        return config.sample_height * VAE_SPATIAL, config.sample_width * VAE_SPATIAL
    if image_size is not None:
        return size_from_image(*image_size)
    return V15_SIZE


def check_num_frames(num_frames: int, config: TransformerConfig) -> None:
    """4k+1 frames or an error; the trained counts (8N+1 for 1.0, 16N+1 for 1.5) or a warning."""
    family, step, example = ("CogVideoX 1.5", 16, 81) if is_v15(config) else ("CogVideoX 1.0", 8, 49)
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL:
        raise ValueError(
            f"num_frames={num_frames}: {family} needs {step}N+1 frames (e.g. {example}); the VAE needs at least "
            f"{VAE_TEMPORAL}k+1"
        )
    if (num_frames - 1) % step:
        logger.warning(
            "num_frames=%d: %s was trained on %dN+1 frames (e.g. %d); other 4k+1 counts run but may look worse",
            num_frames, family, step, example,
        )  # fmt: skip


def check_size(height: int, width: int, config: TransformerConfig) -> None:
    """Multiples of 16 pixels (8 for the VAE x the 2x2 patch), and the 5B-I2V only at its training size."""
    multiple = VAE_SPATIAL * config.patch_size
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < multiple or value % multiple:
            raise ValueError(f"{name}={value}: must be a positive multiple of {multiple} pixels (e.g. 480 or 720)")
    if config.use_learned_positional_embeddings:
        trained = (config.sample_height * VAE_SPATIAL, config.sample_width * VAE_SPATIAL)
        if (height, width) != trained:
            raise ValueError(
                f"height x width = {height}x{width}: this checkpoint (CogVideoX-5B-I2V) has learned positions for "
                f"{trained[0]}x{trained[1]} only; omit height= and width= (the image is resized to that size)"
            )
    if not is_v15(config) and (height, width) != (config.sample_height * 8, config.sample_width * 8):
        logger.warning(
            "%dx%d: CogVideoX 1.0 was trained at %dx%d; other sizes run but may look worse",
            height, width, config.sample_height * 8, config.sample_width * 8,
        )  # fmt: skip


def check_text_length(max_sequence_length: int, config: TransformerConfig) -> None:
    """The 5B-I2V's learned positions fix the prompt length; other models take any length, trained on one."""
    if not isinstance(max_sequence_length, int) or max_sequence_length < 2:
        raise ValueError(f"max_sequence_length={max_sequence_length}: must be an integer of at least 2")
    if max_sequence_length == config.max_text_seq_length:
        return
    if config.use_learned_positional_embeddings:
        raise ValueError(
            f"max_sequence_length={max_sequence_length}: this checkpoint's learned positions cover exactly "
            f"{config.max_text_seq_length} prompt tokens"
        )
    logger.warning(
        "max_sequence_length=%d: the model was trained on %d prompt tokens", max_sequence_length,
        config.max_text_seq_length,
    )  # fmt: skip


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


@dataclasses.dataclass(frozen=True)
class Mode:
    """Which generation a call asks for."""

    name: str  # "t2v" | "i2v" | "v2v"

    @staticmethod
    def resolve(image_to_video_checkpoint: bool, image: Any, video: Any) -> Mode:
        if image_to_video_checkpoint:
            if image is None:
                raise ValueError("this is an image-to-video checkpoint: pass image= (a path, PIL image or array)")
            if video is not None:
                raise ValueError("image-to-video checkpoints take image=, not video=")
            return Mode("i2v")
        if image is not None:
            raise ValueError(
                "image= needs an image-to-video checkpoint (CogVideoX-5b-I2V or CogVideoX1.5-5B-I2V); "
                "this one is text-to-video (for video-to-video pass video=)"
            )
        return Mode("v2v" if video is not None else "t2v")
