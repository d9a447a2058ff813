"""Reading and writing videos and images.

``save_video`` writes mp4 (H.264, yuv420p, through imageio-ffmpeg), gif or webp (through Pillow). The file is
written under a temporary name in the same folder and renamed when complete, so an interrupted run never leaves a
half-written video under the final name.

Accepted frame layouts (what the pipeline returns for each ``output_type``):
- numpy ``[F, H, W, 3]``, float in [0, 1] or uint8 (``output_type="np"``, one video of ``out.frames``);
- torch ``[F, 3, H, W]`` float in [0, 1] (``output_type="pt"``) or ``[F, H, W, 3]`` uint8;
- a list of PIL images (``output_type="pil"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .atomic import atomic_path

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")


def frames_to_uint8(frames: Any) -> np.ndarray:
    """Any accepted frame layout -> ``uint8 [F, H, W, 3]``."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("no frames to save")
        if all(isinstance(f, Image.Image) for f in frames):
            return np.stack([np.asarray(f.convert("RGB")) for f in frames])
        frames = np.stack([np.asarray(f) for f in frames])
    if isinstance(frames, torch.Tensor):
        array = frames.detach().float().cpu() if frames.is_floating_point() else frames.detach().cpu()
        if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.permute(0, 2, 3, 1)  # [F, C, H, W] -> [F, H, W, C]
        frames = array.numpy()
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[0] == 1:
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(
            f"frames of shape {frames.shape}: expected one video [F, H, W, 3] (numpy), [F, 3, H, W] (torch) or a "
            "list of PIL images; for a pipeline result pass out.frames[0]"
        )
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames of dtype {frames.dtype}: expected uint8 or floats in [0, 1]")
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _write_mp4(frames: np.ndarray, path: Path, fps: float, quality: float) -> None:
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary comes with it)
    except ImportError as err:
        raise ImportError("writing mp4 needs imageio-ffmpeg: pip install imageio-ffmpeg") from err
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        # yuv420p stores colour at half resolution, so H.264 players need even sizes: repeat the last row/column.
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    writer = imageio.get_writer(
        str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
        quality=quality, macro_block_size=1, ffmpeg_log_level="error",
    )  # fmt: skip
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _write_animated(frames: np.ndarray, path: Path, fps: float) -> None:
    images = [Image.fromarray(f) for f in frames]
    duration_ms = max(1, round(1000.0 / fps))
    extra = {"lossless": False, "quality": 90} if path.suffix.lower() == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0, **extra)


def save_video(frames: Any, path: str | os.PathLike, fps: float = 8, quality: float = 8.0) -> Path:
    """Write frames to ``path`` (``.mp4``, ``.gif`` or ``.webp``) and return the path.

    Args:
        frames: one video in any layout listed in the module docstring.
        path: destination; its folder is created if missing.
        fps: frames per second (8 for CogVideoX 1.0, 16 for 1.5).
        quality: mp4 quality on imageio's 0-10 scale.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"cannot write {path.name!r}: use one of {', '.join(VIDEO_SUFFIXES)}")
    if not fps > 0:
        raise ValueError(f"fps={fps}: must be positive")
    array = frames_to_uint8(frames)
    with atomic_path(path) as tmp:  # same suffix: the writers pick the format from it
        if suffix == ".mp4":
            _write_mp4(array, tmp, fps, quality)
        else:
            _write_animated(array, tmp, fps)
    logger.info("wrote %d frames to %s", len(array), path)
    return path


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or an image, whatever its mode (palette, RGBA, grey, CMYK, 16-bit)."""
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found")
        image = Image.open(path)
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    if image.mode == "I;16" or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def load_video(video: str | os.PathLike | Sequence[Image.Image]) -> list[Image.Image]:
    """The frames of a video file (mp4 and anything ffmpeg reads, gif, webp) as RGB PIL images."""
    if isinstance(video, (list, tuple)):
        return [load_image(frame) for frame in video]
    path = Path(video)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    if path.suffix.lower() in (".gif", ".webp"):
        with Image.open(path) as animation:
            frames = []
            for index in range(getattr(animation, "n_frames", 1)):
                animation.seek(index)
                frames.append(animation.convert("RGB"))
            return frames
    try:
        import imageio.v2 as imageio
    except ImportError as err:  # pragma: no cover - imageio is a dependency
        raise ImportError("reading videos needs imageio and imageio-ffmpeg") from err
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return [Image.fromarray(frame).convert("RGB") for frame in reader]
    finally:
        reader.close()
