"""What each component must provide to the pipeline, to offload and to the parallel code: the seams of a fork.

The pipeline composes a tokenizer, a text encoder, a denoiser (the transformer), an autoencoder (the VAE) and a
sampler. It talks to each only through the members listed here, and so do the memory plan
(:mod:`cogvideox.memory`), the offload hooks and the parallel code (:mod:`cogvideox.distributed`): nothing outside
a component reads its private attributes. A research fork that replaces one component gives its class these
members and passes an instance to :class:`~cogvideox.Pipeline` (or to ``Pipeline.from_pretrained(transformer=...,
vae=..., sampler=...)``); the rest of the library is unchanged. See docs/architecture.md.

These are :class:`typing.Protocol` classes (structural: no inheritance needed). The pipeline checks a sampler
against :class:`Sampler` when it is given one, so a missing method is an error at construction, not mid-call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Tokenizer(Protocol):
    """Prompts -> token ids. ``__call__(texts, max_length=L)`` returns an object with ``input_ids`` ``[B, L]``
    (int64), padded and truncated to exactly ``max_length``."""

    def __call__(self, texts: Sequence[str], max_length: int) -> Any: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Token ids ``[B, L]`` -> embeddings ``[B, L, D]`` (``D`` = the denoiser's ``text_embed_dim``)."""

    device: torch.device
    dtype: torch.dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...

    def offload_blocks(self) -> nn.ModuleList:
        """The repeated blocks that sequential offload streams one at a time (T5: its encoder layers); the rest of
        the module moves as a whole."""
        ...


@runtime_checkable
class Denoiser(Protocol):
    """The diffusion model: ``(latents [B, F, C_in, h, w], text_embeds [B, L, D], timestep [B], ofs=None)
    -> prediction [B, F, C_out, h, w]``. Timesteps may be fractional.

    ``config`` is read for the request checks and the latent contract: ``in_channels``, ``output_channels``
    (``in_channels`` twice that means image-to-video), ``patch_size``, ``patch_size_t``, ``ofs_embed_dim``,
    ``max_text_seq_length``, ``sample_height/width/frames``, ``use_learned_positional_embeddings``,
    ``use_rotary_positional_embeddings``, ``num_attention_heads``.
    """

    config: Any
    device: torch.device
    dtype: torch.dtype

    def __call__(
        self, latents: torch.Tensor, text_embeds: torch.Tensor, timestep: torch.Tensor, ofs: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def offload_blocks(self) -> nn.ModuleList:
        """The repeated blocks that sequential offload streams (every other weight moves with the module)."""
        ...

    def set_sequence_parallel(self, hooks: Any | None) -> None:
        """Install (or with None remove) the Ulysses hooks of :mod:`cogvideox.distributed` in the model's attention
        layers: the slot sequence parallelism plugs into."""
        ...

    def set_step_cache(self, cache: Any | None) -> None:
        """Install (or with None remove) a step cache (:mod:`cogvideox.cache`): each forward then hands its block
        loop to ``cache.run_blocks(run, video, text, temb)``. Needed only by :meth:`Pipeline.enable_cache`; caches
        that override named layers also expect the published module names (``transformer_blocks.N.attn1``)."""
        ...


@runtime_checkable
class LatentAutoencoder(Protocol):
    """What the latent contract (:class:`~cogvideox.latents.LatentCodec`) reads of a VAE.

    ``encode(video [B, 3, F, H, W] in [-1, 1])`` returns a posterior with ``.sample(generator=)`` and ``.mode()``
    over unscaled latents ``[B, C, F', H / s, W / s]``; ``decode(z)`` returns the video ``[B, 3, F, H, W]``.
    """

    device: torch.device
    dtype: torch.dtype
    scaling_factor: float
    invert_scale_latents: bool
    spatial_compression: int
    temporal_compression: int

    def encode(self, video: torch.Tensor) -> Any: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Autoencoder(LatentAutoencoder, Protocol):
    """A :class:`LatentAutoencoder` with what offload, automatic tiling and the parallel decode need.

    - ``offload_modules()``: the submodules whose forward runs during encode/decode (offload moves the VAE onto
      the device when one of them is called);
    - ``use_tiling`` / ``use_slicing``, ``enable_tiling()`` / ``disable_tiling()``,
      ``tile_sample_min_height`` / ``tile_sample_min_width``: the tiling state the memory plan reads and sets;
    - ``decode_memory_channels``: the widest decoder feature map at full resolution (sizes the decode estimate);
    - ``decode_tile_grids()``, ``decodes_in_tiles(h, w)``, ``prepare_latents(z)`` and ``decode_tile(z)``: the
      pieces of the tiled decode, which the parallel decode spreads over ranks.
    """

    use_tiling: bool
    use_slicing: bool
    tile_sample_min_height: int
    tile_sample_min_width: int
    decode_memory_channels: int

    def offload_modules(self) -> Sequence[nn.Module]: ...

    def enable_tiling(self) -> None: ...

    def disable_tiling(self) -> None: ...

    def decodes_in_tiles(self, height: int, width: int) -> bool: ...

    def decode_tile_grids(self) -> tuple[Any, Any]: ...

    def prepare_latents(self, z: torch.Tensor) -> torch.Tensor: ...

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    """Model outputs -> the next latents; never sees a model. The built-in DDIM and DPM samplers and any fork's
    (flow matching, few-step solvers) provide:

    - ``set_timesteps(num_inference_steps, device) -> timesteps [N]``, noisiest first, int or float;
    - ``timesteps_for_strength(num_inference_steps, strength, device) -> (timesteps [n], n)``: video-to-video's
      schedule, starting part-way (``n`` is what dynamic guidance counts);
    - ``init_noise_sigma``: the initial noise scale;
    - ``scale_model_input(latents, t)``: the model input at ``t`` (the identity for DDIM/DPM);
    - ``add_noise(clean, noise, timesteps)``: the forward process to ``timesteps`` (video-to-video's start);
    - ``step(model_output, t, latents, state, *, generator, eta) -> result`` with ``result.prev_sample`` and
      ``result.state`` (handed to the next step; the first step gets ``None``).
    """

    init_noise_sigma: float

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> torch.Tensor: ...

    def timesteps_for_strength(
        self, num_inference_steps: int, strength: float, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, int]: ...

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor: ...

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: Any) -> torch.Tensor: ...

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        state: Any = None,
        *,
        generator: Any = None,
        eta: float = 0.0,
    ) -> Any: ...


def check_sampler(sampler: Any) -> None:
    """Raise a TypeError naming what ``sampler`` lacks of the :class:`Sampler` protocol."""
    needed = ("init_noise_sigma", "set_timesteps", "timesteps_for_strength", "scale_model_input", "add_noise", "step")
    missing = [name for name in needed if not hasattr(sampler, name)]
    if missing:
        raise TypeError(
            f"sampler {type(sampler).__name__} lacks {missing}: a sampler needs {list(needed)} "
            "(see cogvideox.protocols.Sampler; the built-in ones are made by make_sampler or a name, 'ddim' / 'dpm')"
        )


__all__ = ["Autoencoder", "Denoiser", "LatentAutoencoder", "Sampler", "TextEncoder", "Tokenizer", "check_sampler"]
