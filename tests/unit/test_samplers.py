"""Samplers without the reference: schedule properties, the step API, guidance, and every bad-input message."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from cogvideox.configs import SchedulerConfig
from cogvideox.presets import SCHEDULER_2B
from cogvideox.samplers import (
    DDIMSampler,
    DPMSampler,
    SamplerState,
    classifier_free_guidance,
    dynamic_guidance_scale,
    make_betas,
    make_sampler,
    randn,
    rescale_zero_terminal_snr,
    shift_snr,
    spaced_timesteps,
)

# CogVideoX-2B's scheduler_config.json (5B differs only in snr_shift_scale=1.0).
PUBLISHED_2B = SCHEDULER_2B


def latents(seed: int = 0, shape=(2, 3, 4, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ schedule


def test_published_spacings():
    assert spaced_timesteps(50, spacing="trailing").tolist() == list(range(999, 0, -20))
    assert spaced_timesteps(50, spacing="leading").tolist() == list(range(980, -1, -20))
    linspace = spaced_timesteps(50, spacing="linspace")
    assert linspace[0] == 999 and linspace[-1] == 0 and len(linspace) == 50
    assert spaced_timesteps(4, spacing="leading", steps_offset=1).tolist() == [751, 501, 251, 1]
    assert spaced_timesteps(1, spacing="trailing").tolist() == [999]
    # The reference's trailing arange gives 62 values (the last -1) for 61 steps; we give exactly 61.
    t61 = spaced_timesteps(61, spacing="trailing")
    assert len(t61) == 61 and t61.min() >= 0 and t61.dtype == torch.int64


def test_zero_terminal_snr_and_shift():
    sampler = make_sampler(PUBLISHED_2B)
    alphas = sampler.alphas_cumprod
    assert alphas.dtype == torch.float64 and alphas.shape == (1000,)
    assert alphas[-1] == 0.0 and torch.all(alphas[1:] < alphas[:-1])
    # The shift divides the SNR by the scale (checked before the rescale, which changes it again).
    base = torch.cumprod(1 - make_betas("scaled_linear", 0.00085, 0.012, 1000), 0)
    shifted = shift_snr(base, 3.0)
    torch.testing.assert_close(shifted / (1 - shifted), base / (1 - base) / 3.0, rtol=1e-12, atol=0)
    assert torch.equal(shift_snr(base, 1.0), base)
    # The rescale keeps the first value and pins the last to zero.
    rescaled = rescale_zero_terminal_snr(shifted)
    torch.testing.assert_close(rescaled[0], shifted[0], rtol=1e-14, atol=0)
    assert rescaled[-1] == 0


def test_scaled_linear_betas_endpoints():
    betas = make_betas("scaled_linear", 0.00085, 0.012, 1000)
    assert betas.dtype == torch.float64
    assert math.isclose(betas[0].item(), 0.00085, rel_tol=1e-12) and math.isclose(
        betas[-1].item(), 0.012, rel_tol=1e-12
    )


# ------------------------------------------------------------------ steps


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_last_step_returns_x0(kind):
    """With set_alpha_to_one the step below timestep 0 lands on alpha = 1: the result is the x0 estimate itself."""
    sampler = make_sampler(PUBLISHED_2B, kind=kind)
    timesteps = sampler.set_timesteps(5)
    x = latents()
    result = sampler.step(latents(1), timesteps[-1], x, SamplerState(latents(2), int(timesteps[-2])))
    assert torch.equal(result.prev_sample, result.pred_original_sample)
    alpha = sampler.alphas_cumprod[int(timesteps[-1])]
    expected_x0 = alpha**0.5 * x - (1 - alpha) ** 0.5 * latents(1)
    assert torch.equal(result.pred_original_sample, expected_x0)


def test_first_trailing_dpm_step_at_zero_snr_is_finite():
    """t = 999 has alpha = 0 (log-SNR -inf); the coefficients must still come out finite."""
    sampler = make_sampler(PUBLISHED_2B, kind="dpm")
    timesteps = sampler.set_timesteps(50)
    result = sampler.step(latents(1), timesteps[0], latents(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(result.prev_sample).all()
    assert result.state.previous_timestep == 999 and result.state.previous_x0 is result.pred_original_sample


def test_dpm_noise_draw_count():
    """First and last steps draw once, middle (second-order) steps draw twice: 1 + 2 + 2 + 2 + 1 for 5 steps."""
    sampler = make_sampler(PUBLISHED_2B, kind="dpm")
    timesteps = sampler.set_timesteps(5)
    gen, x, state = torch.Generator().manual_seed(3), latents(), SamplerState()
    for t in timesteps:
        out = sampler.step(torch.tanh(x), t, x, state, generator=gen)
        x, state = out.prev_sample, out.state
    counted = torch.Generator().manual_seed(3)
    for _ in range(8):
        torch.randn(x.shape, generator=counted)
    assert torch.equal(gen.get_state(), counted.get_state())


def test_ddim_is_deterministic_and_state_flows():
    sampler = make_sampler(PUBLISHED_2B)
    assert isinstance(sampler, DDIMSampler)
    timesteps = sampler.set_timesteps(3)
    x = latents()
    a = sampler.step(latents(1), timesteps[0], x, generator=torch.Generator().manual_seed(0))
    b = sampler.step(latents(1), timesteps[0], x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert a.state == SamplerState(a.pred_original_sample, int(timesteps[0]))


def test_eta_is_ignored_with_one_warning(caplog):
    sampler = make_sampler(PUBLISHED_2B, kind="ddim")
    timesteps = sampler.set_timesteps(2)
    x = latents()
    with caplog.at_level(logging.WARNING, logger="cogvideox.samplers"):
        first = sampler.step(latents(1), timesteps[0], x, eta=1.0).prev_sample
        sampler.step(latents(1), timesteps[0], x, eta=1.0)
    assert torch.equal(first, sampler.step(latents(1), timesteps[0], x).prev_sample)
    assert sum("eta=1.0 is ignored" in r.getMessage() for r in caplog.records) == 1


def test_strength_keeps_the_last_steps():
    sampler = make_sampler(PUBLISHED_2B, kind="dpm")
    timesteps, n = sampler.timesteps_for_strength(50, 0.8)
    assert n == 40 and timesteps.tolist() == list(range(799, 0, -20))
    assert sampler.num_inference_steps == 50  # the stride stays that of the full schedule
    full, n = sampler.timesteps_for_strength(10, 1.0)
    assert n == 10 and torch.equal(full, sampler.timesteps)


def test_add_noise_per_element_timesteps():
    sampler = make_sampler(PUBLISHED_2B)
    clean, noise = latents(1), latents(2)
    noisy = sampler.add_noise(clean, noise, torch.tensor([999, 0]))
    assert torch.equal(noisy[0], noise[0])  # alpha = 0: pure noise
    alpha0 = sampler.alphas_cumprod[0].float()
    assert torch.equal(noisy[1], alpha0**0.5 * clean[1] + (1 - alpha0) ** 0.5 * noise[1])
    assert torch.equal(sampler.add_noise(clean, noise, 500), sampler.add_noise(clean, noise, torch.tensor([500, 500])))


def test_scale_model_input_is_identity_and_init_sigma_is_one():
    sampler = make_sampler(PUBLISHED_2B, kind="dpm")
    x = latents()
    assert sampler.scale_model_input(x, 999) is x and sampler.init_noise_sigma == 1.0


# ------------------------------------------------------------------ noise


def test_randn_generator_list_draws_per_element():
    shape = (3, 2, 5)
    together = randn(shape, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for i, seed in enumerate((1, 2, 3)):
        assert torch.equal(together[i : i + 1], torch.randn((1, 2, 5), generator=torch.Generator().manual_seed(seed)))
    single = randn(shape, generator=[torch.Generator().manual_seed(5)] * 1)
    assert torch.equal(single, torch.randn(shape, generator=torch.Generator().manual_seed(5)))


def test_randn_bad_generator_list():
    with pytest.raises(ValueError, match=r"got 2 generators for a batch of 3: give one generator, or one per element"):
        randn((3, 4), generator=[torch.Generator(), torch.Generator()])


# ------------------------------------------------------------------ guidance


def test_cfg_is_float32():
    uncond, cond = latents(1).bfloat16(), latents(2).bfloat16()
    guided = classifier_free_guidance(uncond, cond, 6.0)
    assert guided.dtype == torch.float32
    assert torch.equal(guided, uncond.float() + 6.0 * (cond.float() - uncond.float()))
    assert torch.equal(classifier_free_guidance(uncond, cond, 1.0), cond.float())


def test_dynamic_guidance_uses_the_raw_timestep():
    # Values printed in diffusers PR #13172 for the reference formula (guidance 4, 50 trailing steps).
    expected = {999: 1.8610, 979: 2.0290, 959: 4.9829, 939: 4.6136, 919: 2.1921, 899: 3.1813, 879: 1.0251}
    for t, value in expected.items():
        assert round(dynamic_guidance_scale(4.0, torch.tensor(t), 50), 4) == value
    # The reference formula itself, term for term.
    for t in spaced_timesteps(50, spacing="trailing").tolist():
        reference = 1 + 6.0 * ((1 - math.cos(math.pi * ((50 - t) / 50) ** 5.0)) / 2)
        assert dynamic_guidance_scale(6.0, t, 50) == reference
    # Passing the step index instead gives the smooth schedule, from 1 + g down to 1.
    assert dynamic_guidance_scale(6.0, 0, 50) == 7.0 and dynamic_guidance_scale(6.0, 50, 50) == 1.0


# ------------------------------------------------------------------ factory


def test_make_sampler_kinds_and_overrides(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**PUBLISHED_2B, "_class_name": "CogVideoXDPMScheduler", "_diffusers_version": "x"}))
    assert isinstance(make_sampler(path), DPMSampler)
    demo = make_sampler(tmp_path, kind="ddim", timestep_spacing="linspace")
    assert isinstance(demo, DDIMSampler) and demo.config.timestep_spacing == "linspace"
    assert isinstance(make_sampler(SchedulerConfig()), DDIMSampler)
    assert make_sampler(SchedulerConfig(), kind="dpm").config == SchedulerConfig()


def test_unknown_config_keys_are_logged_not_used(caplog):
    with caplog.at_level(logging.WARNING, logger="cogvideox.configs"):
        sampler = make_sampler({**PUBLISHED_2B, "thresholding": False})
    assert "thresholding" in caplog.text and not hasattr(sampler.config, "thresholding")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_num_inference_steps(steps):
    sampler = make_sampler(PUBLISHED_2B)
    with pytest.raises(ValueError, match=r"num_inference_steps=.*: must be (an integer )?from 1 to 1000"):
        sampler.set_timesteps(steps)


@pytest.mark.parametrize("strength", [0, 0.0, -0.1, 1.5, True])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match=r"strength=.*: must be in \(0, 1\]"):
        make_sampler(PUBLISHED_2B).timesteps_for_strength(50, strength)


def test_strength_that_keeps_no_step():
    with pytest.raises(ValueError, match=r"strength=0.1 with num_inference_steps=5 keeps int\(5 \* 0.1\) = 0 steps"):
        make_sampler(PUBLISHED_2B).timesteps_for_strength(5, 0.1)


def test_bad_spacing_schedule_and_prediction_type():
    with pytest.raises(ValueError, match=r"timestep_spacing='even' is not supported: choose one of \['leading'"):
        make_sampler(PUBLISHED_2B, timestep_spacing="even")
    with pytest.raises(ValueError, match=r"beta_schedule='cosine' is not supported: choose one of \['linear'"):
        make_sampler({**PUBLISHED_2B, "beta_schedule": "cosine"})
    with pytest.raises(ValueError, match=r"prediction_type='flow' is not supported: choose one of \['epsilon'"):
        SchedulerConfig(prediction_type="flow")
    with pytest.raises(ValueError, match=r"timestep_spacing='even' is not supported"):
        spaced_timesteps(10, spacing="even")
    with pytest.raises(ValueError, match=r"beta_schedule='cosine' is not supported"):
        make_betas("cosine", 0.1, 0.2, 10)


def test_bad_config_values():
    with pytest.raises(ValueError, match=r"snr_shift_scale=0.0: must be > 0"):
        SchedulerConfig(snr_shift_scale=0.0)
    with pytest.raises(ValueError, match=r"trained_betas has 2 values but num_train_timesteps=1000"):
        SchedulerConfig(trained_betas=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"num_train_timesteps=0: must be a positive integer"):
        SchedulerConfig(num_train_timesteps=0)
    with pytest.raises(ValueError, match=r"steps_offset=5 with 1000 leading-spaced steps gives timestep 1004"):
        make_sampler(steps_offset=5).set_timesteps(1000)


def test_bad_factory_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"kind='euler' is not a sampler: choose one of \['ddim', 'dpm'\]"):
        make_sampler(PUBLISHED_2B, kind="euler")
    with pytest.raises(ValueError, match=r"unknown scheduler config keys \['spacing'\]"):
        make_sampler(PUBLISHED_2B, spacing="trailing")
    with pytest.raises(ValueError, match=r"names 'DDIMScheduler', which cogvideox does not implement: pass kind="):
        make_sampler({**PUBLISHED_2B, "_class_name": "DDIMScheduler"})
    assert isinstance(make_sampler({**PUBLISHED_2B, "_class_name": "DDIMScheduler"}, kind="dpm"), DPMSampler)
    with pytest.raises(FileNotFoundError, match=r"has neither scheduler_config.json nor scheduler/scheduler_config"):
        make_sampler(tmp_path)
    with pytest.raises(TypeError, match=r"takes a SchedulerConfig, a dict, a path or a hub id, not int"):
        make_sampler(3)


def test_bad_step_calls():
    sampler = make_sampler(PUBLISHED_2B, kind="dpm")
    x = latents()
    with pytest.raises(RuntimeError, match=r"call set_timesteps\(num_inference_steps\) on the DPMSampler before step"):
        sampler.step(x, 999, x)
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"timestep=1000: must be an integer from 0 to 999"):
        sampler.step(x, 1000, x)
    with pytest.raises(ValueError, match=r"step\(\) takes one timestep for the whole batch"):
        sampler.step(x, torch.tensor([999, 999]), x)
    with pytest.raises(ValueError, match=r"SamplerState needs both previous_x0 and previous_timestep, or neither"):
        sampler.step(x, 899, x, SamplerState(previous_x0=x))
    with pytest.raises(ValueError, match=r"add_noise: timesteps must be integers from 0 to 999"):
        sampler.add_noise(x, x, 1000)
    with pytest.raises(ValueError, match=r"add_noise: got 3 timesteps for a batch of 2"):
        sampler.add_noise(x, x, torch.tensor([1, 2, 3]))


def test_epsilon_with_zero_snr_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="cogvideox.samplers"):
        make_sampler(PUBLISHED_2B, prediction_type="epsilon")
    assert "divides by sqrt(alpha) = 0" in caplog.text
