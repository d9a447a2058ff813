"""Sinusoidal tables: the 3D sin-cos position embedding of CogVideoX-2B and the timestep embedding of all models.

The 3D table gives each video token a vector whose first quarter encodes its frame and whose last three quarters
encode its (x, y) position on the patch grid. Positions are divided by interpolation scales (spatial 1.875 in the
published configs, temporal 1.0), as in diffusers' ``get_3d_sincos_pos_embed``. The frequencies are computed in
float64 there; we do the same and return float32.
"""

from __future__ import annotations

import math

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[n, dim]``: ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000^(-i/(dim/2))``, in float64."""
    if dim % 2:
        raise ValueError(f"dim={dim}: a sin-cos embedding needs an even width")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.outer(positions.reshape(-1).double(), omega)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(
    dim: int,
    frames: int,
    height: int,
    width: int,
    *,
    spatial_interpolation_scale: float = 1.0,
    temporal_interpolation_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[frames*height*width, dim]`` float32 table in token order (t, h, w).

    Channel layout per token: ``[time (dim/4) | x (3dim/8) | y (3dim/8)]``. The spatial half that comes first is
    the one driven by the column (x) coordinate: the reference builds its grid with ``meshgrid(..., indexing="xy")``
    and encodes ``grid[0]`` (the x coordinates) first.
    """
    if dim % 16:
        raise ValueError(f"dim={dim}: the 3D sin-cos embedding needs a width divisible by 16")
    dim_t, dim_s = dim // 4, 3 * dim // 4
    # Positions are scaled in float32 (as the reference does) before the float64 frequency product.
    ys = torch.arange(height, dtype=torch.float32, device=device) / spatial_interpolation_scale
    xs = torch.arange(width, dtype=torch.float32, device=device) / spatial_interpolation_scale
    ts = torch.arange(frames, dtype=torch.float32, device=device) / temporal_interpolation_scale
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [height, width] each
    spatial = torch.cat([sincos_1d(dim_s // 2, grid_x), sincos_1d(dim_s // 2, grid_y)], dim=1)  # [h*w, dim_s]
    temporal = sincos_1d(dim_t, ts)  # [frames, dim_t]
    table = torch.cat(
        [
            temporal[:, None, :].expand(frames, height * width, dim_t),
            spatial[None, :, :].expand(frames, height * width, dim_s),
        ],
        dim=-1,
    )
    return table.reshape(frames * height * width, dim).float()


def timestep_sinusoids(
    timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 1e4
) -> torch.Tensor:
    """``[B, dim]`` float32 embedding of (possibly fractional) timesteps ``[B]``.

    ``freq_i = max_period^(-i / (dim/2 - freq_shift))``; with ``flip_sin_to_cos`` the cosines come first
    (all published configs: True, shift 0). An odd ``dim`` gets one zero column, as in the reference.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [B], got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps.float()[:, None] * freqs[None, :]
    parts = [angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
