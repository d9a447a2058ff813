"""``VAE``: the CogVideoX causal 3D autoencoder (diffusers ``AutoencoderKLCogVideoX`` weights and behaviour).

It compresses video 4x in time and 8x8 in space: ``4k + 1`` frames become ``k + 1`` latent frames, the first frame
encoded alone. Encoding walks the video 8 frames at a time (the first chunk takes the leftover frames too, so it holds
9 frames for 8k + 1 videos) and decoding walks the latents 2 frames at a time (3 in the first chunk for an odd count),
carrying the causal-convolution cache from chunk to chunk; see docs/vae.md for what each mode costs in memory.

The VAE works on unscaled latents: the pipeline multiplies encoded latents by ``scaling_factor`` (or divides, when
``invert_scale_latents`` is set, for 1.5 image latents) and divides by it before decoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..configs import VAEConfig
from ..loading import load_component
from .coders import Decoder3D, Encoder3D
from .conv import ConvCache
from .posterior import DiagonalGaussian
from .tiling import TileGrid, make_grid, run_tiled

logger = logging.getLogger(__name__)

# Chunk sizes of the reference (diffusers num_sample_frames_batch_size / num_latent_frames_batch_size). The VAE was
# trained on these chunkings, so other sizes change the output; they are fixed, not options.
SAMPLE_FRAMES_PER_CHUNK = 8
LATENT_FRAMES_PER_CHUNK = 2

# The reference's default tile overlaps, tuned for 480x720 (diffusers AutoencoderKLCogVideoX.__init__).
DEFAULT_OVERLAP_HEIGHT = 1 / 6
DEFAULT_OVERLAP_WIDTH = 1 / 5


def frame_chunks(num_frames: int, per_chunk: int) -> list[slice]:
    """The reference's frame batching: chunks of ``per_chunk`` frames, the leftover ``num_frames % per_chunk``
    frames joining the *first* chunk (so the lone first frame of a 4k+1 video rides with the first full chunk).

    >>> frame_chunks(13, 2)[:2]
    [slice(0, 3, None), slice(3, 5, None)]
    """
    if num_frames <= per_chunk:
        return [slice(0, num_frames)]
    first = per_chunk + num_frames % per_chunk
    ends = range(first, num_frames + 1, per_chunk)
    starts = [0, *ends[:-1]]
    return [slice(start, end) for start, end in zip(starts, ends, strict=True)]


def _check_overlap(name: str, value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"{name}={value}: an overlap factor is a fraction of a tile, in [0, 1)")
    return float(value)


def _check_tile(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: a tile size is a positive number of pixels")
    return value


class VAE(nn.Module):
    """Causal 3D VAE. ``encode`` [B, 3, F, H, W] in [-1, 1] -> :class:`DiagonalGaussian` over
    [B, C, (F - 1) / 4 + 1, H / 8, W / 8]; ``decode`` [B, C, F', H', W'] -> video [B, 3, F, 8H', 8W'].

    Inputs are cast to the weights' dtype and device; outputs come in the weights' dtype.
    """

    def __init__(
        self,
        config: VAEConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else VAEConfig()
        self.encoder = Encoder3D(self.config, device=device, dtype=dtype)
        self.decoder = Decoder3D(self.config, device=device, dtype=dtype)
        self.use_slicing = False
        self.use_tiling = False
        # As the reference: tiles are half the trained size, with overlaps tuned for 480x720.
        self.tile_sample_min_height = self.config.sample_height // 2
        self.tile_sample_min_width = self.config.sample_width // 2
        self.tile_overlap_factor_height = DEFAULT_OVERLAP_HEIGHT
        self.tile_overlap_factor_width = DEFAULT_OVERLAP_WIDTH

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_pickle: bool = False,
        **hub_kwargs,
    ) -> VAE:
        """Load ``vae/`` of a pipeline folder or hub id, or a VAE folder itself (config.json + safetensors).

        Args:
            dtype: floating weights are cast to it; None keeps the file's dtype (the published VAE is float32
                for 5B and 1.5). bfloat16 or float16 need a GPU to run.
            device: where the weights go; default CPU.
            allow_pickle: accept ``.bin``/``.pt`` weights, read with ``torch.load(weights_only=True)``.
            hub_kwargs: passed to the hub download (revision, cache_dir, local_files_only, token).
        """
        return load_component(
            cls, VAEConfig, path_or_hub_id, "vae", dtype=dtype, device=device, allow_pickle=allow_pickle, **hub_kwargs
        )

    # ---------------------------------------------------------------------------------------------- settings
    @property
    def scaling_factor(self) -> float:
        """Latent scale of the diffusion model (config): z_model = z * factor, or z / factor when inverted."""
        return self.config.scaling_factor

    @property
    def invert_scale_latents(self) -> bool:
        """1.5 checkpoints divide image latents by ``scaling_factor`` instead of multiplying (config)."""
        return self.config.invert_scale_latents

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along height and width (config ``spatial_compression_ratio``; 8 when published)."""
        return self.config.spatial_compression_ratio

    @property
    def temporal_compression(self) -> int:
        """Video frames per latent frame after the first (config ``temporal_compression_ratio``; 4 when published)."""
        return self.config.temporal_compression_ratio

    @property
    def decode_memory_channels(self) -> int:
        """Channels of the decoder's full-resolution blocks (its last up block), which size its memory peak."""
        return self.config.block_out_channels[0]

    def offload_modules(self) -> tuple[nn.Module, nn.Module]:
        """The submodules whose forward runs in :meth:`encode` and :meth:`decode`: offload hooks attach there."""
        return self.encoder, self.decoder

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def tile_latent_min_height(self) -> int:
        return int(self.tile_sample_min_height / self.config.spatial_compression_ratio)

    @property
    def tile_latent_min_width(self) -> int:
        return int(self.tile_sample_min_width / self.config.spatial_compression_ratio)

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_overlap_factor_height: float | None = None,
        tile_overlap_factor_width: float | None = None,
    ) -> None:
        """Encode and decode frames larger than a tile in overlapping spatial tiles (reference meaning).

        Args:
            tile_sample_min_height, tile_sample_min_width: tile size in pixels; inputs larger than this along an
                axis are tiled (default: half the config's sample size, 240x360). Latent tiles are this / 8.
            tile_overlap_factor_height, tile_overlap_factor_width: fraction of a tile that overlaps the next one
                (default 1/6 and 1/5). None keeps the current value. Unlike the reference, 0 means no overlap
                (the reference treats 0 like None).
        """
        if tile_sample_min_height is not None:
            self.tile_sample_min_height = _check_tile("tile_sample_min_height", tile_sample_min_height)
        if tile_sample_min_width is not None:
            self.tile_sample_min_width = _check_tile("tile_sample_min_width", tile_sample_min_width)
        if tile_overlap_factor_height is not None:
            self.tile_overlap_factor_height = _check_overlap("tile_overlap_factor_height", tile_overlap_factor_height)
        if tile_overlap_factor_width is not None:
            self.tile_overlap_factor_width = _check_overlap("tile_overlap_factor_width", tile_overlap_factor_width)
        ratio = self.config.spatial_compression_ratio
        if self.tile_latent_min_height < 1 or self.tile_latent_min_width < 1:
            raise ValueError(
                f"tiles of {self.tile_sample_min_height}x{self.tile_sample_min_width} pixels are smaller than one "
                f"latent ({ratio}x{ratio} pixels); use tiles of at least {ratio} pixels"
            )
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode one batch element at a time (peak memory of a batch of 1, same result)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # ----------------------------------------------------------------------------------------------- checks
    def _check_runnable(self) -> None:
        device, dtype = self.device, self.dtype
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError(
                "the VAE's weights are float16 on the CPU: half precision is for GPUs (the CPU kernels are slow "
                "and the published 5B/1.5 VAEs overflow in float16); use float32 on the CPU (vae.float()), or "
                "move the VAE to a GPU"
            )

    def _prepare(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        self._check_runnable()
        return x.to(device=self.device, dtype=self.dtype)

    def _check_video(self, video: torch.Tensor) -> None:
        cfg = self.config
        ratio_t, ratio_s = cfg.temporal_compression_ratio, cfg.spatial_compression_ratio
        if video.ndim != 5:
            raise ValueError(f"video of shape {tuple(video.shape)}: encode expects [B, {cfg.in_channels}, F, H, W]")
        _, channels, frames, height, width = video.shape
        if channels != cfg.in_channels:
            raise ValueError(
                f"video has {channels} channels in dim 1; this VAE takes {cfg.in_channels} (config in_channels): "
                f"pass [B, {cfg.in_channels}, F, H, W], channels before frames"
            )
        if frames < 1 or (frames - 1) % ratio_t:
            raise ValueError(
                f"num_frames={frames}: encode needs {ratio_t}k+1 frames (1, {ratio_t + 1}, {2 * ratio_t + 1}, ..., "
                f"49): the first frame is encoded alone and every {ratio_t} later frames become one latent frame; "
                "trim or pad the video"
            )
        if height < 1 or width < 1 or height % ratio_s or width % ratio_s:
            raise ValueError(
                f"height={height}, width={width}: both must be positive multiples of {ratio_s} (the VAE downsamples "
                f"{ratio_s}x); resize or crop the video"
            )

    def prepare_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Check unscaled latents ``[B, C, F', h, w]`` for :meth:`decode` and cast them to the weights' dtype and
        device (the parallel decode calls this once before it hands tiles to :meth:`decode_tile`)."""
        self._check_latents(z)
        return self._prepare(z, "latents")

    def _check_latents(self, z: torch.Tensor) -> None:
        cfg = self.config
        if z.ndim != 5 or z.shape[1] != cfg.latent_channels or 0 in z.shape:
            hint = ""
            if z.ndim == 5 and z.shape[2] == cfg.latent_channels:
                hint = " (this looks like the transformer's [B, F, C, H, W] layout: use z.permute(0, 2, 1, 3, 4))"
            raise ValueError(
                f"latents of shape {tuple(z.shape)}: decode expects [B, {cfg.latent_channels}, F, H, W] with "
                f"{cfg.latent_channels} = config latent_channels{hint}"
            )

    # ---------------------------------------------------------------------------------------------- encoding
    def _encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] -> moments [B, 2C, F', H/8, W/8], chunk by chunk with the causal cache."""
        cache: ConvCache | None = None
        moments = []
        for chunk in frame_chunks(x.shape[2], SAMPLE_FRAMES_PER_CHUNK):
            out, cache = self.encoder(x[:, :, chunk], cache)
            moments.append(out)
        return torch.cat(moments, dim=2) if len(moments) > 1 else moments[0]

    def encode_tile_grids(self) -> tuple[TileGrid, TileGrid]:
        """(rows, columns) geometry of the tiled encode: pixel tiles in, latent tiles out (see
        :meth:`decode_tile_grids` for the way back)."""
        return self._tile_grids(decoding=False)

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.use_tiling and (height > self.tile_sample_min_height or width > self.tile_sample_min_width):
            ratio = self.config.spatial_compression_ratio
            rows, cols = self.encode_tile_grids()
            return run_tiled(x, self._encode_frames, rows, cols, out_of=lambda n: n // ratio)
        return self._encode_frames(x)

    def encode(self, video: torch.Tensor) -> DiagonalGaussian:
        """Encode ``video`` [B, 3, F, H, W] (values in [-1, 1], F = 4k + 1, H and W multiples of 8).

        Returns the posterior over unscaled latents [B, C, k + 1, H / 8, W / 8]: ``.mode()`` or ``.sample(generator)``.
        """
        self._check_video(video)
        video = self._prepare(video, "video")
        if self.use_slicing and video.shape[0] > 1:
            moments = torch.cat([self._encode_one(item) for item in video.split(1)])
        else:
            moments = self._encode_one(video)
        return DiagonalGaussian(moments)

    # ---------------------------------------------------------------------------------------------- decoding
    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """Decode one latent tile (or a whole untiled input) ``[B, C, F', h, w]`` -> ``[B, 3, F, 8h, 8w]``, two latent
        frames at a time with the causal cache. ``z`` must come from :meth:`prepare_latents`; the tiled and the
        parallel decodes call this on each tile and blend the results."""
        cache: ConvCache | None = None
        frames = []
        for chunk in frame_chunks(z.shape[2], LATENT_FRAMES_PER_CHUNK):
            out, cache = self.decoder(z[:, :, chunk], cache)
            frames.append(out)
        return torch.cat(frames, dim=2) if len(frames) > 1 else frames[0]

    def decodes_in_tiles(self, height: int, width: int) -> bool:
        """True when latents of ``height x width`` decode in tiles (tiling on and larger than one tile)."""
        return self.use_tiling and (height > self.tile_latent_min_height or width > self.tile_latent_min_width)

    def decode_tile_grids(self) -> tuple[TileGrid, TileGrid]:
        """(rows, columns) geometry of the tiled decode, latent tiles in and pixel tiles out; shared with the
        parallel decode of :mod:`cogvideox.distributed`, which decodes tiles on several ranks and blends alike."""
        return self._tile_grids(decoding=True)

    def _tile_grids(self, *, decoding: bool) -> tuple[TileGrid, TileGrid]:
        """Both directions share one tiling, in pixels and in latents; only which side is the input differs."""
        grids = []
        for axis, sample, latent, overlap in (
            ("height", self.tile_sample_min_height, self.tile_latent_min_height, self.tile_overlap_factor_height),
            ("width", self.tile_sample_min_width, self.tile_latent_min_width, self.tile_overlap_factor_width),
        ):
            tile_in, tile_out = (latent, sample) if decoding else (sample, latent)
            grids.append(
                make_grid(tile_in, tile_out, overlap, name=f"tile_sample_min_{axis} / tile_overlap_factor_{axis}")
            )
        return grids[0], grids[1]

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        if self.decodes_in_tiles(*z.shape[-2:]):
            ratio = self.config.spatial_compression_ratio
            rows, cols = self.decode_tile_grids()
            return run_tiled(z, self.decode_tile, rows, cols, out_of=lambda n: n * ratio)
        return self.decode_tile(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode unscaled latents ``z`` [B, C, F', H', W'] into video [B, 3, F, 8H', 8W'] (about [-1, 1]).

        F = 4(F' - 1) + 1 for the odd latent counts of 4k+1-frame videos (13 -> 49); an even count F' decodes to
        4F' frames, as in the reference.
        """
        z = self.prepare_latents(z)
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode_one(item) for item in z.split(1)])
        return self._decode_one(z)

    def forward(
        self, video: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reconstruct ``video``: encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)
