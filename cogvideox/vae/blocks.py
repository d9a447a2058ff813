"""The VAE's building blocks: the latent-conditioned spatial norm, the 3D ResNet block, and the level blocks.

Every block takes the causal-convolution cache of the previous chunk of frames (a nested dict keyed by child names,
see :mod:`cogvideox.vae.conv`), consumes it, and returns its output with the cache for the next chunk.

Memory: under ``torch.no_grad()`` the activations and the spatial-norm affine are applied in place, so a ResNet
block holds about three activations of its resolution at once (input for the residual, the normalised copy, the
convolution's padded input or output). With autograd on, the same arithmetic runs out of place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conv import CausalConv3d, ConvCache, conv3d_in_time_chunks
from .sampling import Downsample3D, Upsample3D

# The reference hard-codes this epsilon for the decoder's spatial norms (and the encoder's output norm),
# whatever the config's ``norm_eps`` (diffusers CogVideoXSpatialNorm3D, CogVideoXEncoder3D.norm_out).
SPATIAL_NORM_EPS = 1e-6


def _in_place_ok() -> bool:
    """In-place updates of fresh intermediates are safe when autograd records nothing."""
    return not torch.is_grad_enabled()


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=_in_place_ok())


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _nearest_view(small: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor | None:
    """``small`` [B, C, t, h, w] as an 8D view that broadcasts like its nearest upsampling to ``size`` (T, H, W).

    Only for power-of-two ratios, where nearest interpolation is exactly "repeat each element r times" (the float
    scale ``in / out`` is exact); returns None otherwise so the caller interpolates.
    """
    b, c, t, h, w = small.shape
    ratios = [out // inp if out % inp == 0 else 0 for inp, out in zip((t, h, w), size, strict=True)]
    if not all(_is_power_of_two(r) for r in ratios):
        return None
    return small.reshape(b, c, t, 1, h, 1, w, 1)


class SpatialNorm3D(nn.Module):
    """GroupNorm whose scale and shift are 1x1x1 convolutions of the latents (spatially conditioned norm,
    arXiv 2209.09002), used everywhere in the decoder.

    ``f`` [B, C, T, H, W] is normalised and modulated by ``conv_y(z)`` and ``conv_b(z)``, where ``z`` [B, C_z, t, h, w]
    is the chunk of latents being decoded, brought to f's size by nearest-neighbour interpolation. When T is odd and
    larger than 1, the first frame of ``z`` is matched to the first frame of ``f`` alone and the rest to the rest
    (reference behaviour).

    The 1x1x1 convolutions commute with nearest interpolation, so we apply them at the latent resolution and
    broadcast the result instead of interpolating ``z`` to full resolution first: same values, far less memory.
    """

    def __init__(
        self,
        channels: int,
        latent_channels: int,
        groups: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=SPATIAL_NORM_EPS, device=device, dtype=dtype)
        self.conv_y = CausalConv3d(latent_channels, channels, kernel_size=1, device=device, dtype=dtype)
        self.conv_b = CausalConv3d(latent_channels, channels, kernel_size=1, device=device, dtype=dtype)

    def _modulate(self, f_norm: torch.Tensor, z: torch.Tensor, in_place: bool) -> torch.Tensor:
        """f_norm * conv_y(z') + conv_b(z'), z' = z interpolated (nearest) to f_norm's [T, H, W].

        With ``in_place`` the result is written into ``f_norm`` (which may be a slice of a larger tensor).
        """
        scale = self.conv_y.conv(z)
        shift = self.conv_b.conv(z)
        size = tuple(f_norm.shape[-3:])
        scale_view, shift_view = _nearest_view(scale, size), _nearest_view(shift, size)
        if scale_view is None or shift_view is None:
            scale = F.interpolate(scale, size=size, mode="nearest")
            shift = F.interpolate(shift, size=size, mode="nearest")
            return f_norm.mul_(scale).add_(shift) if in_place else f_norm * scale + shift
        b, c = f_norm.shape[:2]
        t, h, w = scale.shape[-3:]
        tt, hh, ww = size
        # Splitting each axis into (latent index, repeat) is a view even when f_norm is a slice.
        f_view = f_norm.view(b, c, t, tt // t, h, hh // h, w, ww // w)
        if in_place:
            f_view.mul_(scale_view).add_(shift_view)
            return f_norm
        return (f_view * scale_view + shift_view).reshape(f_norm.shape)

    def forward(self, f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``f`` [B, C, T, H, W], ``z`` [B, C_z, t, h, w] -> [B, C, T, H, W]."""
        f_norm = self.norm_layer(f)
        in_place = _in_place_ok()
        num_frames = f.shape[2]
        if num_frames > 1 and num_frames % 2 == 1:
            parts = [(f_norm[:, :, :1], z[:, :, :1]), (f_norm[:, :, 1:], z[:, :, 1:])]
        else:
            parts = [(f_norm, z)]
        outputs = [self._modulate(f_part, z_part, in_place) for f_part, z_part in parts]
        if in_place:
            return f_norm  # every part was modulated inside it
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


class ResnetBlock3D(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> dropout -> causal conv, plus a (1x1x1) shortcut.

    The norms are GroupNorm in the encoder and :class:`SpatialNorm3D` (conditioned on the latents ``z``) in the
    decoder. Shapes: [B, C_in, T, H, W] -> [B, C_out, T, H, W].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        eps: float,
        dropout: float = 0.0,
        latent_channels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conditioned = latent_channels is not None
        if latent_channels is None:
            self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, **factory)
            self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, **factory)
        else:
            self.norm1 = SpatialNorm3D(in_channels, latent_channels, groups, **factory)
            self.norm2 = SpatialNorm3D(out_channels, latent_channels, groups, **factory)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3, **factory)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3, **factory)
        # The published weights use a plain 1x1x1 convolution (not causal, no cache) when the width changes.
        self.conv_shortcut = (
            nn.Conv3d(in_channels, out_channels, kernel_size=1, **factory) if in_channels != out_channels else None
        )

    def _norm(self, norm: nn.Module, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if self.conditioned:
            if z is None:
                raise ValueError("a decoder ResNet block needs the latents z for its spatial norms")
            return norm(x, z)
        return norm(x)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor | None = None, cache: ConvCache | None = None
    ) -> tuple[torch.Tensor, ConvCache]:
        cache = cache or {}
        new_cache: ConvCache = {}
        # Each convolution input is dropped once its padded copy exists: the peak is then x, the padded input and
        # the output (three activations) instead of four.
        h = _silu(self._norm(self.norm1, x, z))
        padded, new_cache["conv1"] = self.conv1.pad(h, cache.pop("conv1", None))
        del h
        h = self.conv1.convolve(padded)
        del padded
        h = self.dropout(_silu(self._norm(self.norm2, h, z)))
        padded, new_cache["conv2"] = self.conv2.pad(h, cache.pop("conv2", None))
        del h
        h = self.conv2.convolve(padded)
        del padded
        shortcut = x if self.conv_shortcut is None else conv3d_in_time_chunks(self.conv_shortcut, x)
        h = h.add_(shortcut) if _in_place_ok() else h + shortcut
        return h, new_cache


def _run_resnets(
    resnets: nn.ModuleList, x: torch.Tensor, z: torch.Tensor | None, cache: ConvCache | None
) -> tuple[torch.Tensor, ConvCache]:
    cache = cache or {}
    new_cache: ConvCache = {}
    for i, resnet in enumerate(resnets):
        x, new_cache[f"resnets.{i}"] = resnet(x, z, cache.pop(f"resnets.{i}", None))
    return x, new_cache


class DownBlock3D(nn.Module):
    """One encoder level: ``num_layers`` ResNet blocks, then (except on the last level) a 2x downsample."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        add_downsample: bool,
        compress_time: bool,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=eps,
                          dropout=dropout, **factory)
            for i in range(num_layers)
        )  # fmt: skip
        # A one-element list so that the keys read "downsamplers.0.conv.weight" as published.
        self.downsamplers = (
            nn.ModuleList([Downsample3D(out_channels, out_channels, compress_time, **factory)])
            if add_downsample
            else None
        )

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> tuple[torch.Tensor, ConvCache]:
        x, new_cache = _run_resnets(self.resnets, x, None, cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x, new_cache


class MidBlock3D(nn.Module):
    """Two ResNet blocks at the lowest resolution (GroupNorm in the encoder, spatial norm in the decoder)."""

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        eps: float,
        latent_channels: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, channels, groups=groups, eps=eps, dropout=dropout, latent_channels=latent_channels,
                          device=device, dtype=dtype)
            for _ in range(num_layers)
        )  # fmt: skip

    def forward(
        self, x: torch.Tensor, z: torch.Tensor | None = None, cache: ConvCache | None = None
    ) -> tuple[torch.Tensor, ConvCache]:
        return _run_resnets(self.resnets, x, z, cache)


class UpBlock3D(nn.Module):
    """One decoder level: ``num_layers`` spatially-normed ResNet blocks, then (except last) a 2x upsample."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        latent_channels: int,
        add_upsample: bool,
        compress_time: bool,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=eps,
                          dropout=dropout, latent_channels=latent_channels, **factory)
            for i in range(num_layers)
        )  # fmt: skip
        self.upsamplers = (
            nn.ModuleList([Upsample3D(out_channels, out_channels, compress_time, **factory)]) if add_upsample else None
        )

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, cache: ConvCache | None = None
    ) -> tuple[torch.Tensor, ConvCache]:
        x, new_cache = _run_resnets(self.resnets, x, z, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x, new_cache


def temporal_levels(temporal_compression_ratio: int) -> int:
    """How many levels (from the top) halve time: log2 of the ratio (4 -> the first two levels)."""
    return int(math.log2(temporal_compression_ratio))
