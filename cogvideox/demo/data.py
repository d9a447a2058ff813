"""Synthetic videos for the demo model: one coloured shape moving across a black square.

Every clip is described exactly by its caption, "a {colour} {shape} moves {direction}", which makes the demo model's
output checkable by a few lines of arithmetic (:mod:`cogvideox.demo.evaluate`). A few colour-direction pairs are
never shown in training (:data:`HELD_OUT`), so a generated "red circle moving up" tests composition rather than
recall.

Clips are ``[3, F, H, W]`` float tensors in [-1, 1] (the VAE's input range), background -1. Shapes are drawn with
a one-pixel soft edge (the coverage of each pixel), so that motion by fractions of a pixel is visible.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

# RGB in [0, 1]. Primary and secondary colours far apart, so that the dominant colour of a blurry generated clip is
# unambiguous.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("circle", "square")
# (row, column) unit steps; "up" decreases the row index, as images are stored top row first.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "to the right": (0, 1),
    "to the left": (0, -1),
    "up": (-1, 0),
    "down": (1, 0),
}
# Colour-direction pairs never seen in training (each colour and each direction is still seen in other pairs).
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("red", "up"), ("green", "to the left"), ("blue", "down")})

FRAMES = 9  # 4k + 1 pixel frames -> 3 latent frames
SIZE = 32  # pixels; the VAE makes 4x4 latents of it
RADIUS = 5.0  # circle radius, and half the side of a square of equal area is ~4.4
TRAVEL = (11.0, 15.0)  # pixels travelled over the clip


@dataclasses.dataclass(frozen=True)
class Motion:
    """What one clip shows."""

    colour: str
    shape: str
    direction: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.direction) in HELD_OUT


def all_motions() -> list[Motion]:
    """Every colour x shape x direction (40), in a fixed order."""
    return [Motion(c, s, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


def training_motions() -> list[Motion]:
    """The 34 motions the demo model is trained on (all but the held-out colour-direction pairs)."""
    return [m for m in all_motions() if not m.held_out]


def captions() -> list[str]:
    """Every caption, held-out ones included (the tokenizer should know every word)."""
    return [m.caption for m in all_motions()]


def render(motion: Motion, generator: torch.Generator, *, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """One clip ``[3, frames, size, size]`` in [-1, 1], with a random start, speed and cross-axis position.

    The shape stays wholly inside the frame for the whole clip.
    """
    dr, dc = DIRECTIONS[motion.direction]
    travel = TRAVEL[0] + (TRAVEL[1] - TRAVEL[0]) * torch.rand((), generator=generator).item()
    margin = RADIUS + 1.0
    along_span = size - 2 * margin - travel  # free room for the start along the motion axis
    start_along = margin + along_span * torch.rand((), generator=generator).item()
    across = margin + (size - 2 * margin) * torch.rand((), generator=generator).item()
    t = torch.linspace(0.0, 1.0, frames)
    # Position along the axis: from start_along to start_along + travel, flipped for left / up.
    along = start_along + travel * t
    if dr + dc < 0:
        along = size - along
    rows = along if dr else torch.full_like(t, across)
    cols = along if dc else torch.full_like(t, across)

    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    dy = grid[None, :, None] - rows[:, None, None]  # [F, H, 1]
    dx = grid[None, None, :] - cols[:, None, None]  # [F, 1, W]
    if motion.shape == "circle":
        distance = (dy.square() + dx.square()).sqrt()
        coverage = (RADIUS + 0.5 - distance).clamp(0.0, 1.0)
    else:
        half = RADIUS * 0.886  # same area as the circle
        coverage = (half + 0.5 - torch.maximum(dy.abs(), dx.abs())).clamp(0.0, 1.0)
    colour = torch.tensor(COLOURS[motion.colour])[:, None, None, None]
    return coverage[None] * colour * 2.0 - 1.0


def sample_batch(motions: list[Motion], batch: int, generator: torch.Generator) -> tuple[torch.Tensor, list[Motion]]:
    """``batch`` random clips of the given motions: (videos ``[batch, 3, F, H, W]``, their motions)."""
    picks = torch.randint(len(motions), (batch,), generator=generator).tolist()
    chosen = [motions[i] for i in picks]
    return torch.stack([render(m, generator) for m in chosen]), chosen
