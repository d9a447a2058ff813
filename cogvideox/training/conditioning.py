"""Model inputs for training: video and image latents, the 1.5 first-frame padding, ``ofs``, caption dropout.

Every function here turns data into what :class:`~cogvideox.Transformer` takes during training. Scaling, layout,
the 1.5 padding and ``ofs`` come from the latent contract the pipeline samples with
(:class:`cogvideox.latents.LatentCodec`), so that what the model is trained on is what it is sampled with:

- video latents: ``VAE.encode(video).sample() * scaling_factor``, ``[B, F', C, h, w]`` (CogVideo ``finetune/``,
  SAT ``encode_first_stage``);
- image-to-video conditioning: the first frame, noised in pixel space with sigma = exp(N(-3, 0.5)), encoded,
  scaled, padded with zero frames to the latent frame count; joined to the noisy latents on channels by the
  trainer (CogVideo ``finetune/models/cogvideox_i2v/lora_trainer.py``, SAT ``add_noise_to_first_frame``);
- CogVideoX 1.5: the latent frame count padded to a multiple of ``patch_size_t`` by repeating the first latent
  frame in front, and ``ofs = 2.0`` for the image-to-video model;
- caption dropout for classifier-free guidance (SAT ``ucg_rate`` 0.1 zeroes the T5 output of a sample).
"""

from __future__ import annotations

import torch

from ..configs import TransformerConfig
from ..latents import OFS, LatentCodec, pad_to_temporal_patch
from ..vae import VAE

# SAT diffusion_video.py ``add_noise_to_first_frame`` and CogVideo finetune: log sigma ~ N(-3, 0.5), so sigma is
# about 0.05 (pixels in [-1, 1]); inference adds no noise (the official I2V pipelines encode the clean image).
IMAGE_NOISE_LOG_MEAN = -3.0
IMAGE_NOISE_LOG_STD = 0.5


@torch.no_grad()
def encode_video(vae: VAE, video: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training latents of a video batch: a posterior sample times ``scaling_factor`` (unpadded: 1.5 clips are
    padded by :func:`pad_to_temporal_patch` or packed by :mod:`~cogvideox.training.framepack`).

    The same numbers as the pipeline's video-to-video encoding of the same clip with the same generator
    (:meth:`LatentCodec.encode_video`).

    Args:
        video: ``[B, 3, F, H, W]`` in [-1, 1], ``F = 4k + 1`` (an image is ``F = 1``).
        generator: for the posterior sample.
    Returns:
        ``[B, (F - 1) / 4 + 1, C, H / 8, W / 8]`` in the VAE's dtype.
    """
    return LatentCodec(vae).encode_video(video, generator, pad=False)


def noise_image(
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    log_mean: float = IMAGE_NOISE_LOG_MEAN,
    log_std: float = IMAGE_NOISE_LOG_STD,
) -> torch.Tensor:
    """The image-to-video noise augmentation: ``image + sigma * eps`` with ``sigma = exp(N(log_mean, log_std))``.

    One sigma per image, as SAT draws it (``size=(B,)``); CogVideo's ``finetune/`` draws one sigma for the whole
    batch, which is the same in distribution for batch 1. The model learns not to trust the conditioning pixels
    exactly, which makes it robust to the clean image it gets at inference.

    Args:
        images: ``[B, 3, H, W]`` or ``[B, 3, 1, H, W]`` in [-1, 1].
        generator: draws sigma and eps (on the generator's device, then moved to the images' device).
    Returns:
        The noised images, same shape and dtype.
    """
    batch = images.shape[0]
    draw_device = generator.device if generator is not None else images.device
    log_sigma = torch.randn(batch, generator=generator, device=draw_device) * log_std + log_mean
    eps = torch.randn(images.shape, generator=generator, device=draw_device, dtype=torch.float32)
    sigma = log_sigma.exp().to(images.device).reshape(batch, *([1] * (images.ndim - 1)))
    return (images.float() + sigma * eps.to(images.device)).to(images.dtype)


@torch.no_grad()
def image_latents(
    vae: VAE,
    images: torch.Tensor,
    num_latent_frames: int,
    *,
    generator: torch.Generator | None = None,
    noise: bool = True,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The image-to-video conditioning latents: the (noised) first frame encoded, then zero frames.

    Scaling is the pipeline's (:meth:`LatentCodec.scale_image_latents`) so that what the model sees in training
    is what it sees when generating: ``* scaling_factor``, or ``/ scaling_factor`` where the VAE config sets
    ``invert_scale_latents`` (CogVideoX 1.5). CogVideo's ``finetune/`` 1.5 trainer multiplies instead; that
    mismatches its own inference (https://github.com/a-r-r-o-w/finetrainers/issues/110), so we do not copy it.

    Args:
        images: ``[B, 3, H, W]`` in [-1, 1] (the clip's first frame).
        num_latent_frames: the latent frame count of the clip, after any 1.5 first-frame padding; the image
            latent sits at frame 0, which for a padded 1.5 clip is the repeated first frame (as in the reference).
        generator: draws the image noise, the posterior sample and the dropout.
        noise: add the exp(N(-3, 0.5)) noise (training); False gives the inference conditioning.
        dropout: probability of zeroing a sample's whole conditioning (SAT ``noised_image_dropout``: 0.05 in
            the 5B-I2V configs; CogVideo's diffusers ``finetune/`` uses none), so the model also sees no image.
    Returns:
        ``[B, num_latent_frames, C, H / 8, W / 8]`` in the VAE's dtype.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames={num_latent_frames}: must be at least 1")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout={dropout}: must be a probability in [0, 1]")
    pixels = images[:, :, None]
    if noise:
        pixels = noise_image(pixels, generator=generator)
    codec = LatentCodec(vae)
    latents = codec.image_condition(codec.encode_image(pixels, generator), num_latent_frames)
    return drop_image_latents(latents, dropout, generator=generator)


def drop_image_latents(
    latents: torch.Tensor, probability: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Image dropout: zero each sample's whole image conditioning with probability ``p`` (SAT
    ``noised_image_dropout``), so the model also learns to generate without the image.

    Args:
        latents: image latents ``[B, F, C, h, w]`` (from :func:`image_latents`, or made beforehand).
        probability: in [0, 1]; 0 returns ``latents`` itself and draws nothing from ``generator``.
        generator: draws one uniform number per sample.
    Returns:
        ``[B, F, C, h, w]``, a new tensor unless ``probability`` is 0 (the input is not modified).
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"image dropout probability={probability}: must be in [0, 1]")
    if probability == 0:
        return latents
    keep = torch.rand(latents.shape[0], generator=generator, device=_device_of(generator)) >= probability
    return latents * keep.to(latents.device, latents.dtype).reshape(-1, *([1] * (latents.ndim - 1)))


def ofs_for(config: TransformerConfig, batch: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``ofs`` for a training batch: ``[batch]`` filled with 2.0 for models with an ofs embedding (1.5-I2V),
    None for the others (the transformer refuses an ofs it has no embedding for). Early trainers passed None
    to the 1.5-I2V model and trained it off its inference condition (https://github.com/THUDM/CogVideo/issues/532).
    """
    return torch.full((batch,), OFS, device=device) if config.ofs_embed_dim else None


def drop_captions(
    text_embeds: torch.Tensor,
    probability: float,
    *,
    generator: torch.Generator | None = None,
    null_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Caption dropout for classifier-free guidance: each sample's text is replaced with probability ``p``.

    SAT (``GeneralConditioner``, ``ucg_rate: 0.1`` in every CogVideoX config) multiplies the T5 output of a
    dropped sample by zero, and samples its unconditional branch with zeros too. Our pipeline, like diffusers,
    uses the embedding of the empty prompt as the unconditional branch; pass it as ``null_embeds``
    (``pipe.encode_text([""])``) to train the model on what it will see. CogVideo's diffusers ``finetune/``
    does no caption dropout.

    Args:
        text_embeds: ``[B, L, D]``.
        probability: in [0, 1].
        null_embeds: ``[1, L, D]`` or ``[L, D]``; default zeros (SAT).
    Returns:
        ``[B, L, D]``, a new tensor (the input is not modified).
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"caption dropout probability={probability}: must be in [0, 1]")
    if probability == 0:
        return text_embeds
    batch = text_embeds.shape[0]
    drop = torch.rand(batch, generator=generator, device=_device_of(generator)) < probability
    drop = drop.to(text_embeds.device)[:, None, None]
    if null_embeds is None:
        null = torch.zeros_like(text_embeds[:1])
    else:
        null = null_embeds.reshape(1, *null_embeds.shape[-2:]).to(text_embeds.device, text_embeds.dtype)
        if null.shape[1:] != text_embeds.shape[1:]:
            raise ValueError(
                f"null_embeds of shape {tuple(null_embeds.shape)} do not match text_embeds {tuple(text_embeds.shape)}:"
                " encode the empty prompt with the same max_sequence_length"
            )
    return torch.where(drop, null, text_embeds)


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


__all__ = [
    "IMAGE_NOISE_LOG_MEAN",
    "IMAGE_NOISE_LOG_STD",
    "OFS",
    "drop_captions",
    "drop_image_latents",
    "encode_video",
    "image_latents",
    "noise_image",
    "ofs_for",
    "pad_to_temporal_patch",
]
