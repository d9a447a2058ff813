"""The latent contract: how pixels become the latents the transformer sees, and back. One place for the pipeline
and for training, so that what a model is trained on is what it is sampled with.

Two layouts meet here. The VAE works on ``[B, C, F', h, w]`` (channels before frames, as a 3D convolution wants)
and on *unscaled* latents; the transformer works on ``[B, F', C, h, w]`` (frames before channels, as its patch
embedding wants) and on *scaled* latents. :class:`LatentCodec` owns everything between the two:

- scaling: video latents are ``z * scaling_factor``. Image-to-video conditioning latents are ``z * factor`` too,
  except for CogVideoX 1.5, whose VAE config sets ``invert_scale_latents`` and whose image latents are
  ``z / factor`` (the reference I2V pipeline says the model was trained that way by mistake and keeps it);
- the frame count: ``F`` video frames give ``(F - 1) / t + 1`` latent frames (``t`` the VAE's temporal
  compression), and ``H x W`` pixels give ``H / s x W / s`` (``s`` its spatial compression), both read from the
  VAE config, never hard-coded;
- CogVideoX 1.5 patches two latent frames into one token (``patch_size_t`` 2): an odd latent count is padded by
  repeating the first latent frame in front (reference pipelines and CogVideo's fine-tuning code), and the pad
  frames are dropped again before decoding;
- ``ofs``: the 1.5 image-to-video model embeds an extra scalar, 2.0 in every published pipeline and trainer.

A research fork with another VAE keeps this contract by giving its VAE the same few attributes
(:class:`cogvideox.protocols.LatentAutoencoder`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .samplers.noise import Generator

if TYPE_CHECKING:
    from .configs import TransformerConfig
    from .protocols import LatentAutoencoder

# The ofs value of CogVideoX 1.5 image-to-video: the official SAT sample_video.py, diffusers' I2V pipeline and
# CogVideo's fine-tuning code all pass 2.0.
OFS = 2.0


def temporal_padding(latent_frames: int, patch_size_t: int | None) -> int:
    """How many frames :func:`pad_to_temporal_patch` adds in front: ``(-latent_frames) mod patch_size_t``."""
    return -latent_frames % (patch_size_t or 1)


def pad_to_temporal_patch(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """Repeat the first latent frame in front until the frame count is a multiple of ``patch_size_t``.

    CogVideoX 1.5 patches two latent frames into one token; 81 frames give 21 latents, padded to 22 (the
    reference pipelines and trainer repeat the first frame in front; the pipeline drops it after decoding). With
    ``patch_size_t`` None or 1 the input is returned unchanged.

    Args:
        latents: ``[B, F, C, h, w]`` (or one clip ``[F, C, h, w]``).
    Returns:
        ``[B, F + pad, C, h, w]`` with ``pad = (-F) mod patch_size_t``.
    """
    frame_dim = latents.ndim - 4
    if frame_dim not in (0, 1):
        raise ValueError(f"latents must be [B, F, C, H, W] or [F, C, H, W], got shape {tuple(latents.shape)}")
    pad = temporal_padding(latents.shape[frame_dim], patch_size_t)
    if pad == 0:
        return latents
    first = latents.narrow(frame_dim, 0, 1)
    sizes = [-1] * latents.ndim
    sizes[frame_dim] = pad
    return torch.cat([first.expand(*sizes), latents], dim=frame_dim)


class LatentCodec:
    """Pixels <-> transformer latents for one (transformer config, VAE) pair; see the module docstring.

    Args:
        vae: the autoencoder (anything with the :class:`~cogvideox.protocols.LatentAutoencoder` attributes).
        patch_size_t: the transformer's temporal patch (None or 1: no padding; 2: CogVideoX 1.5).
        ofs: the value of the ofs embedding input, or None for models without one.
    """

    def __init__(self, vae: LatentAutoencoder, *, patch_size_t: int | None = None, ofs: float | None = None) -> None:
        self.vae = vae
        self.patch_size_t = patch_size_t
        self.ofs_value = ofs

    @classmethod
    def for_models(cls, config: TransformerConfig, vae: LatentAutoencoder) -> LatentCodec:
        """The contract of a transformer (its ``config``) with ``vae``: temporal patch and ofs from the config."""
        return cls(vae, patch_size_t=config.patch_size_t, ofs=OFS if config.ofs_embed_dim else None)

    def __repr__(self) -> str:
        return (
            f"LatentCodec(scaling_factor={self.vae.scaling_factor}, invert_scale_latents="
            f"{self.vae.invert_scale_latents}, spatial={self.spatial}, temporal={self.temporal}, "
            f"patch_size_t={self.patch_size_t}, ofs={self.ofs_value})"
        )

    # ---------------------------------------------------------------------------------------------- geometry

    @property
    def spatial(self) -> int:
        """Pixels per latent along height and width (8 for every published VAE)."""
        return self.vae.spatial_compression

    @property
    def temporal(self) -> int:
        """Video frames per latent frame after the first (4 for every published VAE)."""
        return self.vae.temporal_compression

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a ``num_frames`` video, before any temporal padding: ``(F - 1) / t + 1``."""
        return (num_frames - 1) // self.temporal + 1

    def padding(self, num_frames: int) -> int:
        """Pad frames the transformer needs in front of a ``num_frames`` video's latents (1.5: 0 or 1)."""
        return temporal_padding(self.latent_frames(num_frames), self.patch_size_t)

    def shape(self, batch: int, num_frames: int, height: int, width: int, channels: int) -> tuple[int, ...]:
        """The transformer latents ``[B, F' + pad, C, H / s, W / s]`` of ``batch`` videos of this size."""
        frames = self.latent_frames(num_frames) + self.padding(num_frames)
        return (batch, frames, channels, height // self.spatial, width // self.spatial)

    # ----------------------------------------------------------------------------------- pixels -> latents

    def _sample(
        self, pixels: torch.Tensor, generator: Generator, dtype: torch.dtype | None, mode: bool = False
    ) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> a posterior sample (``mode``: the posterior's mean, no noise drawn),
        unscaled, ``[B, F', C, h, w]`` in ``dtype`` (default the VAE's) on the VAE's device."""
        posterior = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype))
        sample = posterior.mode() if mode else posterior.sample(generator=generator)
        # The reference casts to the pipeline dtype before scaling; so does this (it matters in bfloat16).
        return (sample if dtype is None else sample.to(dtype)).permute(0, 2, 1, 3, 4)

    def encode_video(
        self,
        pixels: torch.Tensor,
        generator: Generator = None,
        *,
        dtype: torch.dtype | None = None,
        pad: bool = True,
        mode: bool = False,
    ) -> torch.Tensor:
        """Video latents: a posterior sample times ``scaling_factor``, padded for the temporal patch.

        Args:
            pixels: ``[B, 3, F, H, W]`` in [-1, 1], ``F = tk + 1``.
            generator: for the posterior sample (one, or one per video).
            dtype: cast before scaling (the pipeline's dtype); None keeps the VAE's.
            pad: prepend the 1.5 pad frames (False gives the latents of exactly these frames).
            mode: the posterior's mean instead of a sample (no random numbers: CogVideoX-Fun's control video,
                DDIM inversion).
        Returns:
            ``[B, F' + pad, C, H / s, W / s]``.
        """
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W] in [-1, 1], got shape {tuple(pixels.shape)}")
        latents = self.vae.scaling_factor * self._sample(pixels, generator, dtype, mode)
        return pad_to_temporal_patch(latents, self.patch_size_t) if pad else latents

    def scale_image_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled image latents -> the conditioning scale: ``* factor``, or ``/ factor`` for 1.5 (see above)."""
        factor = self.vae.scaling_factor
        return (1 / factor) * latents if self.vae.invert_scale_latents else factor * latents

    def encode_image(
        self, pixels: torch.Tensor, generator: Generator = None, *, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One latent frame per image, scaled as conditioning: ``[B, 3, H, W]`` or ``[B, 3, 1, H, W]`` in [-1, 1]
        -> ``[B, 1, C, H / s, W / s]``."""
        if pixels.ndim == 4:
            pixels = pixels[:, :, None]
        if pixels.ndim != 5 or pixels.shape[1] != 3 or pixels.shape[2] != 1:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(pixels.shape)}")
        return self.scale_image_latents(self._sample(pixels, generator, dtype))

    @staticmethod
    def image_condition(image_latents: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """The image-to-video conditioning: the image's latent frame, then zero frames up to ``num_latent_frames``
        (the count after padding; for a padded 1.5 clip the image sits on the pad frame, as in the reference).

        Args:
            image_latents: ``[B, 1, C, h, w]`` from :meth:`encode_image`.
        Returns:
            ``[B, num_latent_frames, C, h, w]``; joined to the noisy latents on channels by the caller.
        """
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames={num_latent_frames}: must be at least 1")
        padding = image_latents.new_zeros(image_latents.shape[0], num_latent_frames - 1, *image_latents.shape[2:])
        return torch.cat([image_latents, padding], dim=1)

    def ofs(self, batch: int, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """``ofs`` ``[batch]`` for models with an ofs embedding (1.5 image-to-video), None for the others (the
        transformer refuses an ofs it has no embedding for)."""
        if self.ofs_value is None:
            return None
        return torch.full((batch,), self.ofs_value, device=device, dtype=dtype)

    # ----------------------------------------------------------------------------------- latents -> pixels

    def to_vae(self, latents: torch.Tensor, num_pad_frames: int = 0) -> torch.Tensor:
        """Transformer latents ``[B, F' + pad, C, h, w]`` -> what the VAE decodes: the pad frames dropped, the
        layout flipped and the scale undone, ``[B, C, F', h, w]``."""
        latents = latents[:, num_pad_frames:] if num_pad_frames else latents
        return (1 / self.vae.scaling_factor) * latents.permute(0, 2, 1, 3, 4)


__all__ = ["OFS", "LatentCodec", "pad_to_temporal_patch", "temporal_padding"]
