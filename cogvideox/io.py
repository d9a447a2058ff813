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
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .atomic import atomic_path, check_parent_folder

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
# A scheme such as https:// or s3://; Windows drive paths (C:\Users) have no "//" after the colon.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def input_file(source: Any, kind: str, accepted: str) -> Path:
    """``source`` as the path of an existing local file, or a clear error: raw bytes and objects that are not paths
    are a TypeError, URLs a ValueError (nothing is downloaded), a missing file a FileNotFoundError.

    Args:
        source: what the caller passed as a file.
        kind: what it is for, e.g. ``"image"`` or ``"video"``, to start the messages.
        accepted: every kind of value the caller takes, to say what to pass instead.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        wrap = (
            "bytes, write them to a file (Path('input.mp4').write_bytes(data)) and pass its path"
            if kind == "video"
            else "bytes, open them with PIL.Image.open(io.BytesIO(data))"
        )
        raise TypeError(f"{kind}: got {type(source).__name__} ({len(source)} bytes); pass {accepted}; for raw {wrap}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{kind}: got {type(source).__name__}; pass {accepted}")
    text = os.fspath(source)
    if isinstance(text, str) and _URL.match(text):
        raise ValueError(
            f"{kind} {text!r} is a URL: URLs are not downloaded; download the file first (e.g. "
            f"urllib.request.urlretrieve(url, 'input{Path(text).suffix}')) and pass its local path"
        )
    path = Path(os.fsdecode(text))
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
        raise FileNotFoundError(f"{kind} {path} not found: no such file{where}; check the path")
    if not path.is_file():
        raise IsADirectoryError(f"{kind} {path} is a folder, not a file: pass {accepted}")
    return path


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if ``save_video`` can write it: a suffix it writes, not a folder, and a folder that exists
    or can be created (no ancestor is a file). Cheap: run it before the generation whose video goes there."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"cannot write {path.name!r}: use one of {', '.join(VIDEO_SUFFIXES)}")
    if path.is_dir():
        raise IsADirectoryError(
            f"cannot write {path}: it is a folder; give a file name in it, e.g. {path / 'output.mp4'}"
        )
    return check_parent_folder(path)


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
    if 0 in frames.shape[:3]:  # ffmpeg and Pillow fail on these with messages about their own internals
        raise ValueError(
            f"frames of shape {frames.shape} (frames, height, width, channels): a video needs at least 1 frame of at "
            "least 1x1 pixels; check how the frames were made (e.g. a crop or slice that came out empty)"
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
    path = check_output_path(path)
    suffix = path.suffix.lower()
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps={fps}: must be positive and finite (e.g. 8 or 16)")
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
        image = Image.open(input_file(image, "image", "a file path or a PIL image"))
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    if image.mode == "I;16" or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def load_video(video: str | os.PathLike | Sequence[Image.Image]) -> list[Image.Image]:
    """The frames of a video file (mp4 and anything ffmpeg reads, gif, webp) as RGB PIL images."""
    if isinstance(video, (list, tuple)):
        return [load_image(frame) for frame in video]
    path = input_file(video, "video", "a video file path or a list of PIL images or image paths")
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
