"""Pixels in and out of the pipeline: resizing and normalising inputs, turning decoded videos into outputs.

Inputs are resized to exactly ``width x height`` (no crop, aspect not kept) and mapped to [-1, 1] as diffusers'
``VaeImageProcessor`` does for the CogVideoX pipelines, so the same input gives the same latents:
- PIL images, paths and uint8 arrays: Pillow's Lanczos filter, then ``x / 255 * 2 - 1``;
- float tensors and arrays (values in [0, 1], or already in [-1, 1]): nearest-neighbour ``F.interpolate``, then
  ``2x - 1`` unless some value is negative (then they are taken as already normalised), as the reference does.
Outputs map [-1, 1] back to [0, 1] (clamped) in the layout each ``output_type`` promises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .io import input_file, load_image, load_video

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
IMAGE_INPUTS = "a file path, a PIL image, a numpy array [H, W, 3] or a torch tensor [3, H, W]"
VIDEO_INPUTS = "a video file path, or a list of frames (each a file path, PIL image, numpy array or torch tensor)"


def _channels_last(image: torch.Tensor) -> torch.Tensor:
    """A torch image ``[3, H, W]`` (the usual torch layout) or ``[H, W, 3]`` as ``[H, W, 3]``."""
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        return image.permute(1, 2, 0)
    return image


def _is_float_pixels(image: Any) -> bool:
    if isinstance(image, torch.Tensor):
        return image.is_floating_point()
    return isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating)


def to_pil(image: Any) -> Image.Image:
    """A PIL image from a path, a PIL image (any mode), a uint8 or [0, 1] float array ``[H, W, 3]``, or a torch
    tensor ``[3, H, W]`` / ``[H, W, 3]`` (uint8, or floats in [0, 1])."""
    if isinstance(image, torch.Tensor):
        image = _channels_last(image.detach().cpu())
        image = image.numpy() if image.dtype == torch.uint8 else image.float().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(f"an image array must be [H, W, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        image = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        image = input_file(image, "image", IMAGE_INPUTS)  # names everything the pipeline takes, not only paths
    return load_image(image)


def image_to_tensor(image: Any, height: int, width: int) -> torch.Tensor:
    """One image -> ``[3, height, width]`` float32 in [-1, 1] (see the module docstring for the two paths)."""
    if _is_float_pixels(image):
        pixels = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
        pixels = _channels_last(pixels.detach().cpu().float()).permute(2, 0, 1)  # [3, H, W]
        pixels = F.interpolate(pixels[None], size=(height, width))[0]  # nearest, as the reference resizes tensors
        return pixels if pixels.min() < 0 else pixels * 2.0 - 1.0
    resized = to_pil(image).resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def load_video_frames(video: Any, name: str = "video") -> list:
    """A video given as a path, or a sequence of frames of any accepted kind, as a non-empty list of frames (each
    checked for its type, so that a bad frame fails before any model runs)."""
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
        frames = load_video(input_file(video, name, VIDEO_INPUTS))
    elif isinstance(video, (Sequence, np.ndarray, torch.Tensor)):
        frames = list(video)
    else:
        raise TypeError(f"{name}: got {type(video).__name__}; pass {VIDEO_INPUTS}")
    for frame in frames:
        if not isinstance(frame, (Image.Image, np.ndarray, torch.Tensor)):
            input_file(frame, f"{name} frame", IMAGE_INPUTS)
    if not frames:
        raise ValueError(f"{name} has no frames: it needs at least 1 frame (4k+1, e.g. 49)")
    return frames


def video_frames_for_v2v(video: Any, num_frames: int | None = None, *, temporal: int = 4) -> list:
    """The video-to-video input (a path, or a sequence of frames of any accepted kind) as a list of frames, cut to
    ``num_frames`` or, when that is None, to its longest ``temporal``k+1 prefix (with a warning); ``temporal`` is
    the VAE's temporal compression (``vae.temporal_compression``, 4 for every published VAE)."""
    frames = load_video_frames(video)
    if num_frames is not None:
        if num_frames > len(frames):
            raise ValueError(f"num_frames={num_frames} but the video has only {len(frames)} frames")
        return frames[:num_frames]
    usable = (len(frames) - 1) // temporal * temporal + 1
    if usable != len(frames):
        logger.warning("video has %d frames; using the first %d (the VAE takes %dk+1)", len(frames), usable, temporal)
    return frames[:usable]


def video_to_tensor(frames: Sequence[Any], height: int, width: int) -> torch.Tensor:
    """One video (a sequence of frames) -> ``[3, F, height, width]`` float32 in [-1, 1]."""
    return torch.stack([image_to_tensor(frame, height, width) for frame in frames], dim=1)


def postprocess_video(video: torch.Tensor, output_type: str) -> Any:
    """Decoded ``[B, 3, F, H, W]`` in [-1, 1] -> ``np`` ``[B, F, H, W, 3]`` float32 in [0, 1], ``pt``
    ``[B, F, 3, H, W]`` in [0, 1], or ``pil`` (a list per video of PIL frames)."""
    if output_type not in ("np", "pt", "pil"):
        raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")
    video = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
    if output_type == "pt":
        return video
    array = video.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, F, H, W, 3]
    if output_type == "np":
        return array
    uint8 = (array * 255).round().astype(np.uint8)
    return [[Image.fromarray(frame) for frame in clip] for clip in uint8]
