"""Down- and up-sampling between the VAE's resolution levels: 2x in space always, 2x in time on some levels.

Time is compressed only on the first ``log2(temporal_compression_ratio)`` levels (the first two in the published
config, which gives the 4x time compression). Both layers keep the first frame of an odd-length chunk on its own, so
that a video of ``4k + 1`` frames maps to ``k + 1`` latent frames with the first frame encoded alone (paper, 3.1).

The weights are the published per-frame ``nn.Conv2d`` ([C_out, C_in, 3, 3]); we apply them as a ``(1, 3, 3)``
convolution over the 5D tensor (``weight[:, :, None]``), which gives the same sums without the reference's
frames-into-batch permute and its copies of the full-resolution activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _per_frame_conv(conv: nn.Conv2d, x: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """Apply the 2D ``conv`` to every frame of ``x`` [B, C, T, H, W]."""
    weight = conv.weight.unsqueeze(2)  # [C_out, C_in, 1, kh, kw]
    return F.conv3d(x, weight, conv.bias, stride=(1, stride, stride), padding=(0, padding, padding))


def _halve_time(x: torch.Tensor) -> torch.Tensor:
    """Average frame pairs of ``x`` [B, C, T, H, W]; an odd first frame is kept alone (reference: avg_pool1d)."""
    if x.shape[2] % 2 == 1:
        first, rest = x[:, :, :1], x[:, :, 1:]
        if rest.shape[2] == 0:
            return x
        return torch.cat([first, 0.5 * (rest[:, :, 0::2] + rest[:, :, 1::2])], dim=2)
    return 0.5 * (x[:, :, 0::2] + x[:, :, 1::2])


def _doubled_time_index(num_frames: int, device: torch.device) -> torch.Tensor:
    """Frame indices that repeat every frame twice, except the first of an odd-length chunk (kept once).

    Reference (CogVideoXUpsample3D): odd T > 1 -> 1 + 2(T - 1) frames; even T -> 2T; T == 1 -> 1 frame.
    """
    index = torch.arange(num_frames, device=device).repeat_interleave(2)
    if num_frames % 2 == 1:
        index = index[1:]  # drop one copy of frame 0 (for T == 1 this leaves the single frame)
    return index


class Downsample3D(nn.Module):
    """[B, C, T, H, W] -> [B, C_out, T', H // 2, W // 2] with T' = T (no time compression) or ceil-halved T.

    With time compression, frames are averaged in pairs (an odd first frame is kept alone); then every frame is
    zero-padded by one pixel at the bottom and right and convolved with a 3x3 kernel at stride 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        compress_time: bool,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time:
            x = _halve_time(x)
        x = F.pad(x, (0, 1, 0, 1))  # right and bottom only, as the reference pads before its unpadded conv
        return _per_frame_conv(self.conv, x, stride=2, padding=0)


class Upsample3D(nn.Module):
    """[B, C, T, H, W] -> [B, C_out, T', 2H, 2W]: nearest-neighbour 2x (and in time on compressing levels), then 3x3.

    In time, every frame is doubled except the first frame of an odd-length chunk, which mirrors
    :class:`Downsample3D` (a chunk of 3 latent frames becomes 5, then 9 frames).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        compress_time: bool,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time and x.shape[2] > 1:
            # Repeat frames at the low resolution first, so only one full-resolution tensor is made below.
            x = x.index_select(2, _doubled_time_index(x.shape[2], x.device))
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return _per_frame_conv(self.conv, x, stride=1, padding=1)
