"""What a generated demo video shows: its dominant colour and the direction its bright blob moves.

Used by the functional test (tests/test_demo.py) and by the training script's final report. Frames are
``[F, H, W, 3]`` floats in [0, 1] (the pipeline's ``output_type="np"``).
"""

from __future__ import annotations

import numpy as np

from .data import COLOURS, DIRECTIONS

FOREGROUND = 0.35  # a pixel whose brightest channel exceeds this belongs to the shape (background is 0)
MIN_TRAVEL = 2.0  # pixels the centroid must move for a clip to count as moving


def dominant_colour(frames: np.ndarray) -> str | None:
    """The palette colour nearest to the mean colour of the foreground pixels; None for a blank video."""
    pixels = frames.reshape(-1, 3)
    foreground = pixels[pixels.max(axis=1) > FOREGROUND]
    if len(foreground) == 0:
        return None
    mean = foreground.mean(axis=0)
    names = list(COLOURS)
    distances = [np.linalg.norm(mean - np.array(COLOURS[n])) for n in names]
    return names[int(np.argmin(distances))]


def centroids(frames: np.ndarray) -> np.ndarray:
    """``[F, 2]`` (row, column) brightness-weighted centroid of each frame's foreground (NaN where empty)."""
    weight = frames.max(axis=-1)
    weight = np.where(weight > FOREGROUND, weight, 0.0)
    rows, cols = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    total = weight.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(weight * rows).sum(axis=(1, 2)) / total, (weight * cols).sum(axis=(1, 2)) / total], -1)


def motion_direction(frames: np.ndarray) -> str | None:
    """The direction (a key of :data:`DIRECTIONS`) of the centroid's motion, from a least-squares line through
    the per-frame centroids; None if it moves less than :data:`MIN_TRAVEL` pixels or the video is blank."""
    points = centroids(frames)
    valid = ~np.isnan(points).any(axis=1)
    if valid.sum() < 2:
        return None
    t = np.arange(len(points))[valid]
    slope = np.polyfit(t, points[valid], 1)[0]  # pixels per frame, (row, column)
    travel = slope * (len(points) - 1)
    if np.abs(travel).max() < MIN_TRAVEL:
        return None
    axis = int(np.argmax(np.abs(travel)))
    step = (int(np.sign(travel[0])), 0) if axis == 0 else (0, int(np.sign(travel[1])))
    return next(name for name, unit in DIRECTIONS.items() if unit == step)


def describe(frames: np.ndarray) -> tuple[str | None, str | None]:
    """(dominant colour, motion direction) of one video ``[F, H, W, 3]`` in [0, 1]."""
    return dominant_colour(frames), motion_direction(frames)
