"""Conditioning for training: I2V image latents (against the inference pipeline), the image noise distribution,
caption dropout, ofs; an image-to-video training step on the tiny 1.5-I2V pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from cogvideox.training import (
    Trainer,
    TrainingBatch,
    TrainingConfig,
    drop_captions,
    encode_video,
    image_latents,
    noise_image,
    ofs_for,
)
from tests.helpers import rel_err
from tests.training.conftest import objective, tiny_transformer

pytest.importorskip("diffusers")
pytest.importorskip("google.protobuf", reason="the tiny pipeline's tokenizer is read through protobuf")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from cogvideox import Pipeline
    from tests.tiny_checkpoints import reference_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("i2v") / "checkpoint"
    reference_pipeline("1.5-i2v", root)
    ours = Pipeline.from_pretrained(root)
    ours.set_progress_bar_config(disable=True)
    return ours


def test_noise_image_sigma_distribution():
    images = torch.zeros(4000, 3, 1, 2, 2)
    noised = noise_image(images, generator=torch.Generator().manual_seed(0))
    log_sigma = noised.flatten(1).std(dim=1).log()  # per image: sigma estimated from its 12 values
    # log of a 12-sample std is biased low by about 1/(2*11) + ...; compare the mean with a loose, derived bound.
    assert abs(log_sigma.median().item() - (-3.0)) < 0.1
    assert 0.5 < log_sigma.std().item() < 0.6  # 0.5 from sigma, plus the sampling spread of 12 values (~0.21)
    assert torch.equal(noise_image(images, generator=torch.Generator().manual_seed(0)), noised)  # seeded


def test_image_latents_without_noise_are_the_inference_conditioning(pipe):
    """noise=False gives exactly what the pipeline builds at inference (1.5: divided by the scaling factor)."""
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1
    from PIL import Image

    pil = Image.fromarray(((image[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    from cogvideox.processing import image_to_tensor

    pixels = image_to_tensor(pil, 32, 48)
    seen = []  # the pipeline's model input at its one step: [noise ; image condition] on channels
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        pipe("a red circle", image=pil, num_frames=9, height=32, width=48, num_inference_steps=1, guidance_scale=1.0,
             max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(7))  # fmt: skip
    finally:
        hook.remove()
    reference = seen[0][:, :, pipe.transformer.config.output_channels :]  # 9 frames: 3 latents, padded to 4
    ours = image_latents(pipe.vae, pixels[None], 4, generator=torch.Generator().manual_seed(7), noise=False)
    assert ours.shape == (1, 4, 4, 4, 6) and not ours[:, 1:].any()
    assert rel_err(ours, reference) < 1e-6
    noised = image_latents(pipe.vae, pixels[None], 4, generator=torch.Generator().manual_seed(7))
    assert noised.shape == reference.shape and rel_err(noised, reference) > 1e-4
    dropped = image_latents(pipe.vae, pixels[None], 4, generator=torch.Generator().manual_seed(7), dropout=1.0)
    assert not dropped.any()


def test_encode_video_scales_by_the_factor(pipe):
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = encode_video(pipe.vae, video, generator=torch.Generator().manual_seed(2))
    raw = pipe.vae.encode(video).sample(generator=torch.Generator().manual_seed(2)).permute(0, 2, 1, 3, 4)
    assert latents.shape == (1, 2, 4, 4, 6)
    assert rel_err(latents, raw * pipe.vae.scaling_factor) < 1e-6


def test_image_to_video_training_step(pipe):
    """1.5-I2V: first-frame padding, noised image latents on channels, ofs = 2.0; the loss falls."""
    transformer = pipe.transformer
    transformer.requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 9, 32, 48, generator=gen) * 2 - 1
    from cogvideox.training import pad_to_temporal_patch

    latents = pad_to_temporal_patch(encode_video(pipe.vae, video, generator=gen), 2)  # 3 latents -> 4
    assert latents.shape == (2, 4, 4, 4, 6)
    text = pipe.encode_text(["a red circle", "a steam train"], 16)
    trainer = Trainer(transformer, objective(), TrainingConfig(learning_rate=1e-3, warmup_steps=0), vae=pipe.vae)
    batch = TrainingBatch(latents, text, images=video[:, :, 0], timesteps=torch.tensor([300, 600]),
                          noise=torch.randn(latents.shape, generator=gen))  # fmt: skip
    losses = [trainer.step(batch).loss for _ in range(10)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_drop_captions_and_ofs():
    text = torch.ones(1000, 2, 3)
    dropped = drop_captions(text, 0.1, generator=torch.Generator().manual_seed(0))
    rate = (dropped[:, 0, 0] == 0).float().mean().item()
    assert 0.07 < rate < 0.13 and torch.equal(text, torch.ones(1000, 2, 3))
    null = torch.full((1, 2, 3), 5.0)
    replaced = drop_captions(text, 1.0, null_embeds=null)
    assert torch.equal(replaced, null.expand(1000, 2, 3))
    assert drop_captions(text, 0.0) is text
    with pytest.raises(ValueError, match="do not match text_embeds"):
        drop_captions(text, 0.5, null_embeds=torch.zeros(1, 4, 3))
    assert ofs_for(tiny_transformer("1.5-i2v").config, 3).tolist() == [2.0, 2.0, 2.0]
    assert ofs_for(tiny_transformer("5b").config, 3) is None
