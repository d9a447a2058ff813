"""3D rotary position tables for the video tokens (CogVideoX-5B, 5B-I2V and 1.5).

Each attention head of size ``hd`` is split into a temporal part (``hd/4`` channels) and two spatial parts
(``3hd/8`` each for height and width); each part rotates channel pairs by ``position * theta^(-2i/d)``.
Positions come from one of two grids:

- ``"crop"`` (CogVideoX 1.0): the latent patch grid is fitted, keeping its aspect ratio, into the training grid
  (``sample_height/p x sample_width/p`` = 30 x 45 patches) and centred; positions are spread over that crop with
  ``linspace``, so a smaller or larger video reuses the trained position range rather than extrapolating.
- ``"slice"`` (CogVideoX 1.5): plain integer positions ``0..n-1`` per axis.

Tables are computed in float32, as the reference does (``get_3d_rotary_pos_embed`` in diffusers' embeddings.py,
built by the pipelines' ``_prepare_rotary_positional_embeddings``), and applied in float32.

RIFLEx (Zhao et al. 2025, arXiv 2502.15894; thu-ml/RIFLEx ``riflex_utils.py``): to generate ``L`` latent frames,
longer than the model was trained on, the temporal component ``k`` (1-based; its frequency is
``theta^(-2(k-1)/d_t)``), the "intrinsic" one whose period is closest to the training length, gets the frequency
``0.9 * 2 * pi / L``: one period then covers the whole extended video (with 10 % to spare), so no position repeats
a phase the model saw at another time. Every other frequency is unchanged. See :func:`riflex_frequency`.
"""

from __future__ import annotations

import math

import torch


def _crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left and bottom-right corners of a ``grid_h x grid_w`` grid resized to fit inside ``base_h x base_w``
    with its aspect ratio kept, centred. Python's ``round`` (half to even) is what the reference uses."""
    if grid_h / grid_w > base_h / base_w:
        height, width = base_h, int(round(base_h / grid_h * grid_w))
    else:
        width, height = base_w, int(round(base_w / grid_w * grid_h))
    top = int(round((base_h - height) / 2.0))
    left = int(round((base_w - width) / 2.0))
    return (top, left), (top + height, left + width)


def _axis_positions_crop(start: float, stop: float, n: int, device: torch.device) -> torch.Tensor:
    # The reference spans [start, stop * (n - 1) / n] with n points: the crop's cells, left edges.
    return torch.linspace(start, stop * (n - 1) / n, n, device=device, dtype=torch.float32)


# RIFLEx's factor: the new period is L / 0.9 latent frames (thu-ml/RIFLEx riflex_utils.py).
RIFLEX_MARGIN = 0.9


def riflex_frequency(latent_frames: int) -> float:
    """RIFLEx's frequency for the intrinsic temporal component when generating ``latent_frames`` frames."""
    return RIFLEX_MARGIN * 2 * math.pi / latent_frames


def rotary_periods(dim: int, theta: float = 10000.0) -> list[float]:
    """The period (in positions) of each frequency of a ``dim``-channel rotary part: ``2 pi theta^(2i/dim)``
    (CogVideoX-5B's temporal part, ``dim`` 16: 6.3, 19.9, 62.8, 198.7, ...)."""
    return [2 * math.pi * theta ** (i / dim) for i in range(0, dim, 2)]


def _rotary_angles(
    dim: int, positions: torch.Tensor, theta: float, riflex: tuple[int, int] | None = None
) -> torch.Tensor:
    """``[n, dim/2]`` angles ``position * theta^(-2i/dim)`` in float32; ``riflex`` = (k, latent frames) replaces
    frequency ``k - 1`` by :func:`riflex_frequency`."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    inv_freq = 1.0 / (theta**exponents)
    if riflex is not None:
        k, latent_frames = riflex
        inv_freq[k - 1] = riflex_frequency(latent_frames)
    return torch.outer(positions, inv_freq)


def rotary_tables(
    head_dim: int,
    frames: int,
    height: int,
    width: int,
    *,
    grid: str,
    base_height: int,
    base_width: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    riflex: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``frames x height x width`` video patches, each ``[frames*height*width, head_dim]``
    in float32, token order (t, h, w) as the patch embedding lays tokens out.

    Args:
        head_dim: attention head size (64 in every published model; must be a multiple of 8).
        frames, height, width: the patch grid (latent frames / patch_size_t, latent height / p, latent width / p).
        grid: ``"crop"`` (1.0) or ``"slice"`` (1.5); see the module docstring.
        base_height, base_width: the training patch grid, ``sample_height // p`` and ``sample_width // p``.
        riflex: (k, latent frames L): RIFLEx's lowered intrinsic temporal frequency (module docstring).
    """
    if head_dim % 8:
        raise ValueError(f"head_dim={head_dim}: 3D RoPE splits the head 2:3:3, so it must be a multiple of 8")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if grid == "crop":
        (top, left), (bottom, right) = _crop_region(height, width, base_height, base_width)
        pos_h = _axis_positions_crop(top, bottom, height, device)
        pos_w = _axis_positions_crop(left, right, width, device)
        pos_t = _axis_positions_crop(0, frames, frames, device)
    elif grid == "slice":
        # The reference slices arange(base) to the grid, so it fails past the training grid; integer positions
        # extrapolate naturally, and the caller warns in that case.
        pos_h = torch.arange(height, dtype=torch.float32, device=device)
        pos_w = torch.arange(width, dtype=torch.float32, device=device)
        pos_t = torch.arange(frames, dtype=torch.float32, device=device)
    else:
        raise ValueError(f"grid={grid!r}: use 'crop' (CogVideoX 1.0) or 'slice' (CogVideoX 1.5)")

    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    angles_t = _rotary_angles(dim_t, pos_t, theta, riflex)[:, None, None, :].expand(frames, height, width, -1)
    angles_h = _rotary_angles(dim_hw, pos_h, theta)[None, :, None, :].expand(frames, height, width, -1)
    angles_w = _rotary_angles(dim_hw, pos_w, theta)[None, None, :, :].expand(frames, height, width, -1)
    angles = torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(frames * height * width, -1)
    # Each angle rotates one interleaved channel pair (x[2i], x[2i+1]), hence the repeat_interleave.
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def fold_sign(sin: torch.Tensor) -> torch.Tensor:
    """The sine table with its even channels negated, the form :func:`rotate_pairs` takes."""
    signed = sin.clone()
    signed[..., 0::2] = -signed[..., 0::2]
    return signed


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved channel pair ``(x[2i], x[2i+1])`` of ``x [..., N, H, hd]`` by the angles whose
    cosine and (sign-folded, :func:`fold_sign`) sine are ``cos, sin_signed [N, 1, hd]``.

    ``(a, b) -> (a cos - b sin, b cos + a sin)``: the reference's ``x * cos + stack(-odd, even) * sin`` with the
    minus sign moved into the table, so the pair swap is one copy and no negation pass. The product is done in
    float32 (the tables' dtype: bf16 inputs promote) and cast back, as the reference does.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin_signed).to(x.dtype)
