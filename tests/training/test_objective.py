"""DiffusionObjective against diffusers' CogVideoX schedulers and CogVideo's finetune loss formula."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import rel_err
from tests.training.conftest import objective

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("variant,shift", [("2b", 3.0), ("5b", 1.0)])
def test_noising_velocity_and_loss_match_the_reference(variant, shift):
    from diffusers import CogVideoXDPMScheduler

    from cogvideox.presets import SCHEDULER_2B, SCHEDULER_5B

    config = {k: v for k, v in (SCHEDULER_2B if variant == "2b" else SCHEDULER_5B).items() if k != "_class_name"}
    ref = CogVideoXDPMScheduler(**config)
    ours = objective(variant)
    assert ours.config.snr_shift_scale == shift
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 3, 4, 6, 10, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    prediction = torch.randn(latents.shape, generator=gen)
    timesteps = torch.tensor([0, 321, 998, 999])  # both ends: a ~ 1 and the zero-SNR a = 0

    noisy = ours.add_noise(latents, noise, timesteps)
    assert rel_err(noisy, ref.add_noise(latents, noise, timesteps)) < 1e-6
    assert rel_err(ours.velocity(latents, noise, timesteps), ref.get_velocity(latents, noise, timesteps)) < 1e-6

    # CogVideo finetune compute_loss: x0_hat = get_velocity(v_hat, x_t, t); mean(w (x0_hat - x0)^2), w = 1/(1-a);
    # evaluated in float64 here. At t = 0 the x0 form divides a float32 cancellation by 1 - a ~ 1e-3, so a
    # float32 evaluation (ours, or the official trainer's) is only good to ~1e-5 relative there; the reference's own
    # float32 evaluation is off by 1.3e-5 at t = 0 too.
    x0_hat = ref.get_velocity(prediction.double(), noisy.double(), timesteps)
    weights = (1 / (1 - ref.alphas_cumprod[timesteps])).reshape(-1, 1, 1, 1, 1)
    per_clip = (weights * (x0_hat - latents.double()) ** 2).reshape(4, -1).mean(dim=1)
    ours_per_clip = ours.loss(prediction, noisy, latents, timesteps, reduction="none").double()
    relative = ((ours_per_clip - per_clip) / per_clip).abs()
    assert relative[0] < 5e-5, relative
    assert relative[1:].max() < 1e-6, relative
    assert abs(ours.loss(prediction, noisy, latents, timesteps).item() / per_clip.mean().item() - 1) < 2e-5
    # ...which is the plain v-prediction MSE (x0_hat - x0 = -sqrt(1 - a) (v_hat - v)); not at t = 0, where the
    # float32 rounding of x_t itself, divided by 1 - a, dominates.
    velocity = ours.velocity(latents, noise, timesteps)
    plain = (prediction.double() - velocity.double()).square().flatten(1).mean(dim=1)
    assert rel_err(per_clip[1:], plain[1:]) < 1e-6


def test_frame_mask_averages_over_real_frames_only():
    ours = objective()
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 4, 6, 10, generator=gen)
    prediction = torch.randn(latents.shape, generator=gen)
    timesteps = torch.tensor([100, 600])
    noisy = ours.add_noise(latents, torch.randn(latents.shape, generator=gen), timesteps)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    masked = ours.loss(prediction, noisy, latents, timesteps, mask, reduction="none")
    short = ours.loss(prediction[:1, :2], noisy[:1, :2], latents[:1, :2], timesteps[:1], reduction="none")
    assert rel_err(masked[:1], short) < 1e-6
    with pytest.raises(ValueError, match="reduction='sum': use 'mean'"):
        ours.loss(prediction, noisy, latents, timesteps, reduction="sum")
