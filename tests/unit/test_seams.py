"""The seams a research fork uses: one latent contract for the pipeline and training, a sampler brought from
outside (a flow-matching Euler sampler written here against the documented protocol), the loop as a function."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox import Pipeline, make_sampler
from cogvideox.denoise import denoise
from cogvideox.latents import LatentCodec
from cogvideox.processing import video_to_tensor
from cogvideox.protocols import Autoencoder, Denoiser, Sampler, TextEncoder
from cogvideox.training import encode_video, pad_to_temporal_patch

pytest.importorskip("diffusers")
pytest.importorskip("google.protobuf", reason="the tiny pipeline's tokenizer is read through protobuf")

TEXT_LEN = 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The tiny random CogVideoX 1.5 text-to-video pipeline (temporal patch 2: the padded case)."""
    from tests.tiny_checkpoints import reference_pipeline

    root = tmp_path_factory.mktemp("v15") / "checkpoint"
    reference_pipeline("1.5", root)
    ours = Pipeline.from_pretrained(root)
    ours.set_progress_bar_config(disable=True)
    return ours


def random_frames(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(count)]


class RecordingSampler:
    """Wraps a sampler and records what ``add_noise`` receives: the pipeline's clean v2v latents."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.clean: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def add_noise(self, original, noise, timestep):
        self.clean.append(original)
        return self.inner.add_noise(original, noise, timestep)


def test_components_satisfy_the_protocols(pipe):
    assert isinstance(pipe.transformer, Denoiser)
    assert isinstance(pipe.vae, Autoencoder)
    assert isinstance(pipe.text_encoder, TextEncoder)
    assert isinstance(pipe.sampler, Sampler)
    assert pipe.vae.spatial_compression == 8 and pipe.vae.temporal_compression == 4  # read from the VAE config


def test_training_latents_equal_the_pipelines_video_to_video_latents(pipe):
    """One contract: the latents training sees for a clip are what the pipeline's v2v encodes from it."""
    frames = random_frames(9, seed=3)  # 9 frames -> 3 latents, padded to 4 by repeating the first in front
    recorder = RecordingSampler(pipe.sampler)
    original, pipe.sampler = pipe.sampler, recorder
    try:
        gen = torch.Generator().manual_seed(11)
        pipe("a red circle", video=frames, strength=0.5, num_inference_steps=2, height=32, width=48,
             max_sequence_length=TEXT_LEN, output_type="latent", generator=gen)  # fmt: skip
    finally:
        pipe.sampler = original
    (seen,) = recorder.clean
    pixels = video_to_tensor(frames, 32, 48)[None]
    trained = pad_to_temporal_patch(encode_video(pipe.vae, pixels, generator=torch.Generator().manual_seed(11)), 2)
    assert seen.shape == trained.shape == (1, 4, 4, 4, 6)
    assert torch.equal(seen, trained)
    assert torch.equal(trained[:, 0], trained[:, 1])  # the pad frame repeats the first latent frame


def test_codec_round_trip_geometry(pipe):
    codec = pipe.latent_codec
    assert codec.shape(2, 17, 32, 48, 4) == (2, 6, 4, 4, 6)  # 17 frames: 5 latents + 1 pad
    assert codec.padding(17) == 1 and codec.padding(9) == 1 and codec.padding(13) == 0
    latents = torch.randn(1, 6, 4, 4, 6)
    z = codec.to_vae(latents, num_pad_frames=1)
    assert z.shape == (1, 4, 5, 4, 6)
    assert torch.equal(z, (1 / pipe.vae.scaling_factor) * latents[:, 1:].permute(0, 2, 1, 3, 4))


@dataclasses.dataclass
class EulerState:
    steps_taken: int = 0


class FlowMatchEuler:
    """A rectified-flow Euler sampler in a few lines, against the documented protocol (cogvideox.protocols):
    x_t = (1 - s) x0 + s noise with s = t / 1000; the model predicts the velocity noise - x0."""

    init_noise_sigma = 1.0

    def __init__(self) -> None:
        self.sigmas: torch.Tensor | None = None
        self.seen_timesteps: list[float] = []

    def set_timesteps(self, num_inference_steps, device=None):
        self.sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        return (self.sigmas[:-1] * 1000).float().to(device)  # float timesteps: 1000.0, 875.0, ...

    def timesteps_for_strength(self, num_inference_steps, strength, device=None):
        timesteps = self.set_timesteps(num_inference_steps, device)
        kept = max(1, int(num_inference_steps * strength))
        return timesteps[num_inference_steps - kept :], kept

    def scale_model_input(self, sample, timestep=None):
        return sample

    def add_noise(self, original, noise, timestep):
        s = (torch.as_tensor(timestep, dtype=torch.float32) / 1000).view(-1, *[1] * (original.ndim - 1))
        return (1 - s) * original + s * noise

    def step(self, model_output, timestep, sample, state=None, *, generator=None, eta=0.0):
        state = state or EulerState()
        self.seen_timesteps.append(timestep)
        s, s_next = timestep / 1000, float(self.sigmas[state.steps_taken + 1])
        prev = sample + (s_next - s) * model_output
        return type("Result", (), {"prev_sample": prev, "state": EulerState(state.steps_taken + 1)})()


def test_a_forks_flow_matching_sampler_runs_end_to_end(pipe):
    sampler = FlowMatchEuler()
    fork = Pipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, sampler)
    fork.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    try:
        gen = torch.Generator().manual_seed(0)
        out = fork("a red circle", num_frames=9, height=32, width=48, num_inference_steps=4, guidance_scale=3.0,
                   max_sequence_length=TEXT_LEN, output_type="np", generator=gen)  # fmt: skip
    finally:
        hook.remove()
    assert out.frames.shape == (1, 9, 32, 48, 3) and np.isfinite(out.frames).all()
    assert sampler.seen_timesteps == [1000.0, 750.0, 500.0, 250.0]  # floats reach step() unchanged
    assert [t.tolist() for t in seen] == [[1000.0, 1000.0], [750.0, 750.0], [500.0, 500.0], [250.0, 250.0]]
    assert all(t.dtype == torch.float32 for t in seen)  # and the transformer (batch 2: guidance)


def test_sampler_objects_through_from_pretrained_and_set_sampler(pipe, tmp_path_factory):
    root = next(iter(tmp_path_factory.getbasetemp().glob("v15*"))) / "checkpoint"
    sampler = FlowMatchEuler()
    loaded = Pipeline.from_pretrained(root, sampler=sampler)
    assert loaded.sampler is sampler
    with pytest.raises(ValueError, match="configure it before passing it"):
        Pipeline.from_pretrained(root, sampler=sampler, timestep_spacing="trailing")
    with pytest.raises(TypeError, match=r"sampler object lacks \['init_noise_sigma', 'set_timesteps'"):
        Pipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, object())
    with pytest.raises(ValueError, match="the current sampler has no scheduler config"):
        loaded.set_sampler("dpm")
    loaded.set_sampler(make_sampler(kind="ddim"))
    assert type(loaded.sampler).__name__ == "DDIMSampler"


def test_denoise_is_a_plain_function():
    """The loop over a toy model and the built-in DDIM sampler, without any pipeline."""
    sampler = make_sampler(kind="ddim", prediction_type="v_prediction", timestep_spacing="trailing")
    timesteps = sampler.set_timesteps(5)
    calls = []

    def model(latents, text_embeds, timestep):
        calls.append((latents.shape[0], text_embeds.shape[0], timestep.tolist()))
        return torch.zeros_like(latents)

    latents = torch.randn(1, 2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    out = denoise(model, sampler, latents, timesteps, torch.zeros(2, 3, 8), guidance_scale=2.0)
    assert out.shape == latents.shape and len(calls) == 5
    assert calls[0][:2] == (2, 2)  # guidance: the model sees [latents; latents] and both embedding rows
    with pytest.raises(FloatingPointError, match="step 0"):
        denoise(lambda x, e, t: torch.full_like(x, float("nan")), sampler, latents, timesteps, torch.zeros(1, 3, 8))
    codec_free = denoise(model, sampler, latents, timesteps[:0], torch.zeros(1, 3, 8))
    assert torch.equal(codec_free, latents)  # no steps: the latents come back as they are


def test_latent_codec_is_built_from_the_models(pipe):
    codec = LatentCodec.for_models(pipe.transformer.config, pipe.vae)
    assert codec.patch_size_t == 2 and codec.ofs(2, "cpu") is None
    assert "invert_scale_latents=True" in repr(codec)
