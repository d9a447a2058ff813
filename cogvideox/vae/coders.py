"""The VAE's encoder (video -> Gaussian moments) and decoder (latents -> video), one chunk of frames per call.

Each ``forward`` processes one chunk and takes/returns the causal-convolution cache that links it to the previous
chunk; :mod:`cogvideox.vae.autoencoder` walks the chunks. Module names follow the published state-dict keys
(``encoder.down_blocks.0.resnets.0.conv1.conv.weight``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import VAEConfig
from .blocks import SPATIAL_NORM_EPS, DownBlock3D, MidBlock3D, SpatialNorm3D, UpBlock3D, temporal_levels
from .conv import CausalConv3d, ConvCache


class Encoder3D(nn.Module):
    """[B, C_in, T, H, W] -> moments [B, 2 * latent_channels, T', H / 8, W / 8] (mean and log-variance stacked).

    conv_in -> down levels (the first ``log2(temporal ratio)`` also halve time) -> mid block -> GroupNorm -> SiLU ->
    conv_out.
    """

    def __init__(
        self, config: VAEConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        channels = config.block_out_channels
        groups, eps = config.norm_num_groups, config.norm_eps
        time_levels = temporal_levels(config.temporal_compression_ratio)
        self.conv_in = CausalConv3d(config.in_channels, channels[0], kernel_size=3, **factory)
        self.down_blocks = nn.ModuleList(
            DownBlock3D(
                channels[max(i - 1, 0)],
                channels[i],
                num_layers=config.layers_per_block,
                groups=groups,
                eps=eps,
                add_downsample=i < len(channels) - 1,
                compress_time=i < time_levels,
                **factory,
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock3D(channels[-1], groups=groups, eps=eps, **factory)
        # Reference quirk: this norm uses eps 1e-6 whatever config.norm_eps says (diffusers CogVideoXEncoder3D).
        self.norm_out = nn.GroupNorm(groups, channels[-1], eps=SPATIAL_NORM_EPS, **factory)
        self.conv_out = CausalConv3d(channels[-1], 2 * config.latent_channels, kernel_size=3, **factory)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> tuple[torch.Tensor, ConvCache]:
        cache = cache or {}
        new_cache: ConvCache = {}
        h, new_cache["conv_in"] = self.conv_in(x, cache.pop("conv_in", None))
        for i, block in enumerate(self.down_blocks):
            h, new_cache[f"down_blocks.{i}"] = block(h, cache.pop(f"down_blocks.{i}", None))
        h, new_cache["mid_block"] = self.mid_block(h, None, cache.pop("mid_block", None))
        h = F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())
        h, new_cache["conv_out"] = self.conv_out(h, cache.pop("conv_out", None))
        return h, new_cache


class Decoder3D(nn.Module):
    """latents [B, latent_channels, t, h, w] -> video [B, C_out, T, 8h, 8w]; every norm is conditioned on the latents.

    conv_in -> mid block -> up levels (the first ``log2(temporal ratio)`` also double time; each has one more ResNet
    block than the encoder's levels) -> spatial norm -> SiLU -> conv_out.
    """

    def __init__(
        self, config: VAEConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        channels = tuple(reversed(config.block_out_channels))
        groups, eps, latent = config.norm_num_groups, config.norm_eps, config.latent_channels
        time_levels = temporal_levels(config.temporal_compression_ratio)
        self.conv_in = CausalConv3d(latent, channels[0], kernel_size=3, **factory)
        self.mid_block = MidBlock3D(channels[0], groups=groups, eps=eps, latent_channels=latent, **factory)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(
                channels[max(i - 1, 0)],
                channels[i],
                num_layers=config.layers_per_block + 1,
                groups=groups,
                eps=eps,
                latent_channels=latent,
                add_upsample=i < len(channels) - 1,
                compress_time=i < time_levels,
                **factory,
            )
            for i in range(len(channels))
        )
        self.norm_out = SpatialNorm3D(channels[-1], latent, groups, **factory)
        self.conv_out = CausalConv3d(channels[-1], config.out_channels, kernel_size=3, **factory)

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None) -> tuple[torch.Tensor, ConvCache]:
        cache = cache or {}
        new_cache: ConvCache = {}
        h, new_cache["conv_in"] = self.conv_in(z, cache.pop("conv_in", None))
        h, new_cache["mid_block"] = self.mid_block(h, z, cache.pop("mid_block", None))
        for i, block in enumerate(self.up_blocks):
            h, new_cache[f"up_blocks.{i}"] = block(h, z, cache.pop(f"up_blocks.{i}", None))
        h = F.silu(self.norm_out(h, z), inplace=not torch.is_grad_enabled())
        h, new_cache["conv_out"] = self.conv_out(h, cache.pop("conv_out", None))
        return h, new_cache
