"""Videos inline in Jupyter: :func:`show`, and what a pipeline's output shows when it ends a cell.

Jupyter renders an object's ``_repr_html_``. :class:`VideoDisplay` makes that HTML by itself, with no IPython
import, so it also works where IPython is absent (``html = show(frames)._repr_html_()``, or ``str(...)``).

- A video up to :data:`SMALL_SIDE` pixels a side (the demo's 32x32) becomes an animated GIF, drawn larger with
  pixelated scaling. A video that small gains nothing from H.264, and yuv420p would blur its colours.
- A larger one becomes an H.264 mp4 (imageio-ffmpeg) in a looping, muted ``<video>``.

Either way the media is inlined as base64, so a saved notebook keeps it. A batch shows each video with its prompt
under it.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .io import frames_to_uint8, save_video

#: videos up to this many pixels a side show as an animated GIF, scaled up to :data:`SMALL_DISPLAY_WIDTH`
SMALL_SIDE = 128
SMALL_DISPLAY_WIDTH = 192


def split_videos(frames: Any) -> list[Any]:
    """A pipeline's ``frames`` (any output type but latent) or one video -> a list of single videos.

    np ``[B, F, H, W, 3]`` / ``[F, H, W, 3]``; pt ``[B, F, 3, H, W]`` / ``[F, 3, H, W]``; pil: a list of lists of
    images, or one list of images."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        return list(frames) if frames.ndim == 5 else [frames]
    if isinstance(frames, (list, tuple)) and frames:
        first = frames[0]
        if isinstance(first, Image.Image):
            return [frames]
        if isinstance(first, (list, tuple)) or (isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 4):
            return list(frames)
        return [frames]
    raise ValueError(f"nothing to show: {type(frames).__name__} {frames!r:.80}")


def _gif(video: np.ndarray, fps: float) -> str:
    buffer = io.BytesIO()
    images = [Image.fromarray(frame) for frame in video]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)  # fmt: skip
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    height, width = video.shape[1:3]
    scale = max(1, SMALL_DISPLAY_WIDTH // max(height, width))
    return (
        f'<img src="data:image/gif;base64,{data}" width="{width * scale}" height="{height * scale}" '
        'style="image-rendering: pixelated">'
    )


def _mp4(video: np.ndarray, fps: float) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = save_video(video, Path(folder) / "video.mp4", fps=fps)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    width = video.shape[2]
    return (
        f'<video controls autoplay loop muted playsinline width="{width}">'
        f'<source src="data:video/mp4;base64,{data}" type="video/mp4"></video>'
    )


class VideoDisplay:
    """One or more videos as HTML; Jupyter shows it when it ends a cell. ``str()`` gives the same HTML."""

    def __init__(self, videos: Sequence[np.ndarray], fps: float, captions: Sequence[str | None]) -> None:
        self.videos, self.fps, self.captions = list(videos), fps, list(captions)

    def _repr_html_(self) -> str:
        parts = []
        for video, caption in zip(self.videos, self.captions, strict=True):
            small = max(video.shape[1:3]) <= SMALL_SIDE
            media = _gif(video, self.fps) if small else _mp4(video, self.fps)
            text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
            parts.append(f'<figure style="display: inline-block; margin: 4px; text-align: center">{media}{text}'
                         "</figure>")  # fmt: skip
        return "<div>" + "".join(parts) + "</div>"

    __str__ = _repr_html_

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(map(str, v.shape[:3])) for v in self.videos)
        return f"<{len(self.videos)} video(s) at {self.fps} fps: {shapes} (frames x height x width)>"


def show(frames: Any, fps: float = 8, prompts: str | Sequence[str] | None = None) -> VideoDisplay:
    """Frames of one or more videos (``out.frames`` of any output type but latent, or one video) as an inline
    display: end a notebook cell with it. ``prompts``: a caption under each video (one for all, or one each)."""
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 < fps < float("inf")):
        raise ValueError(f"fps={fps!r}: must be a positive number (8 for CogVideoX 1.0, 16 for 1.5)")
    videos = [frames_to_uint8(video) for video in split_videos(frames)]
    if prompts is None or isinstance(prompts, str):
        captions = [prompts] * len(videos)
    else:
        captions = list(prompts)
        if len(captions) != len(videos):
            raise ValueError(f"{len(captions)} prompts for {len(videos)} videos: give one for all, or one each")
    return VideoDisplay(videos, fps, captions)
