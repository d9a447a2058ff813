"""DDIM inversion (cogvideox.inversion, Pipeline.invert): the inverse step undoes the sampler's step exactly, the
loop is exact for a model that ignores its input, the demo model's videos come back, and the bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvideox import Pipeline
from cogvideox.configs import SchedulerConfig, config_from_dict
from cogvideox.denoise import denoise
from cogvideox.inversion import invert
from cogvideox.presets import SCHEDULER_5B
from cogvideox.processing import postprocess_video, video_to_tensor
from cogvideox.samplers import make_sampler

PROMPT = "a red circle moves to the right"


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_invert_step_undoes_the_step(prediction_type):
    config = {
        **SCHEDULER_5B,
        "prediction_type": prediction_type,
        "rescale_betas_zero_snr": prediction_type != "epsilon",
    }
    sampler = make_sampler(config_from_dict(SchedulerConfig, config), kind="ddim")
    timesteps = sampler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    for t in timesteps.tolist():  # 999 (zero terminal SNR for v) down to 99, whose step lands on alpha = 1
        x_t = torch.randn(2, 3, 4, 5, 6, generator=generator, dtype=torch.float64)
        output = torch.randn(x_t.shape, generator=generator, dtype=torch.float64)
        landed = sampler.step(output, t, x_t).prev_sample
        if prediction_type == "sample" and sampler.previous_timestep(t) < 0:  # the last step returns x0 = output
            with pytest.raises(ValueError, match="does not depend on the latents .* so it has no inverse"):
                sampler.invert_step(output, t, landed)
            continue
        assert torch.allclose(sampler.invert_step(output, t, landed), x_t, atol=1e-9, rtol=0), t
        a, b = sampler.x0_coefficients(sampler.alpha_cumprod(t))
        assert torch.allclose(a * x_t + b * output, sampler.predict_x0(output, x_t, sampler.alpha_cumprod(t)))


def test_inversion_is_exact_for_a_model_that_ignores_its_input():
    """With the model output independent of the latents the usual approximation is no approximation: DDIM then
    regenerates the very latents that were inverted, through every step (guided too)."""
    sampler = make_sampler(config_from_dict(SchedulerConfig, SCHEDULER_5B), kind="ddim")
    timesteps = sampler.set_timesteps(20)
    clean = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    embeds = torch.randn(2, 5, 8, dtype=torch.float64)

    def model(latents, text, timestep):  # depends on the timestep and the prompt half, not on the latents
        return torch.sin(timestep[:, None, None, None, None] / 100 + text[:, :1, :4, None, None].sum())

    noise = invert(model, sampler, clean, timesteps, embeds, guidance_scale=3.0)
    back = denoise(model, sampler, noise, timesteps, embeds, guidance_scale=3.0)
    # Exact up to float32 rounding: both loops take the model output in float32, as the reference's loop does
    # (measured 1.7e-7 relative over 20 steps).
    assert (back - clean).norm() / clean.norm() < 1e-6


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


def test_the_demo_video_comes_back(demo_pipe):
    steps = 20
    original = demo_pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                         output_type="np").frames[0]  # fmt: skip
    with torch.no_grad():
        clean = demo_pipe.latent_codec.encode_video(video_to_tensor(list(original), 32, 32)[None], mode=True)
    round_trip = postprocess_video(demo_pipe.decode_latents(clean), "np")[0]
    errors = []
    for iterations in (0, 3):
        noise = demo_pipe.invert(list(original), PROMPT, num_inference_steps=steps,
                                 fixed_point_iterations=iterations)  # fmt: skip
        assert noise.shape == clean.shape and noise.dtype == demo_pipe.dtype
        regen = demo_pipe(PROMPT, latents=noise, num_inference_steps=steps, guidance_scale=1.0, output_type="latent")
        errors.append(float((regen.frames - clean).norm() / clean.norm()))
        video = postprocess_video(demo_pipe.decode_latents(regen.frames), "np")[0]
        assert _psnr(video, round_trip) > 35  # the inversion's own error, apart from the VAE's round trip
        assert _psnr(video, original) > 30
    assert errors[1] < 0.8 * errors[0]  # the fixed-point iterations solve each step more exactly


def test_inversion_bad_input(demo_pipe, tmp_path):
    frames = [np.zeros((32, 32, 3), np.float32)] * 9
    demo_pipe.set_sampler("dpm")
    try:
        with pytest.raises(
            ValueError,
            match=r"inversion runs the deterministic DDIM sampler backwards; this pipeline "
            r"samples with DPMSampler\. Switch with pipe\.set_sampler\('ddim'\)",
        ):
            demo_pipe.invert(frames, PROMPT)
    finally:
        demo_pipe.set_sampler("ddim")
    with pytest.raises(ValueError, match="fixed_point_iterations=-1: must be 0 or more"):
        demo_pipe.invert(frames, PROMPT, fixed_point_iterations=-1)
    with pytest.raises(ValueError, match="num_frames=8"):
        demo_pipe.invert(frames, PROMPT, num_frames=8)
    from tests.tiny_checkpoints import reference_pipeline

    reference_pipeline("5b-i2v", tmp_path / "i2v")
    i2v = Pipeline.from_pretrained(tmp_path / "i2v")
    i2v.set_sampler("ddim")
    with pytest.raises(
        ValueError, match="invert\\(\\) works with text-to-video checkpoints; this one is image-to-video"
    ):
        i2v.invert(frames, PROMPT)
