"""Samplers for CogVideoX: DDIM and stochastic DPM-Solver++(2M), step for step equal to diffusers'
``CogVideoXDDIMScheduler`` and ``CogVideoXDPMScheduler``, plus classifier-free and dynamic guidance.

Samplers are plain classes that turn model outputs into the next latents; the model knows nothing of them. Both
samplers have the same API, so a denoising loop never branches on the kind::

    sampler = make_sampler(checkpoint_folder)              # the class scheduler_config.json names
    sampler = make_sampler(checkpoint_folder, kind="dpm", timestep_spacing="trailing")  # the official demo

    timesteps = sampler.set_timesteps(50, device)          # int64 [N], noisiest first
    # video-to-video instead: timesteps, n = sampler.timesteps_for_strength(50, strength, device)
    #                         latents = sampler.add_noise(video_latents, noise, timesteps[:1])
    latents = noise * sampler.init_noise_sigma             # t2v / i2v start
    state = SamplerState()
    for t in timesteps:
        model_in = sampler.scale_model_input(torch.cat([latents] * 2), t)      # identity for both samplers
        uncond, cond = model(model_in, t).float().chunk(2)
        scale = dynamic_guidance_scale(6.0, t, len(timesteps)) if use_dynamic_cfg else 6.0
        out = sampler.step(classifier_free_guidance(uncond, cond, scale), t, latents, state, generator=generator)
        latents, state = out.prev_sample.to(latents.dtype), out.state

``step`` returns a :class:`StepResult` (``prev_sample``, ``pred_original_sample``, ``state``); the
:class:`SamplerState` carries the previous x0 and timestep, which only the DPM update reads. See
docs/samplers.md for the formulas and the reference quirks kept for parity.
"""

from .base import Sampler, SamplerState, StepResult
from .ddim import DDIMSampler
from .dpm import DPMSampler
from .factory import SAMPLERS, choose_sampler, load_scheduler_config, make_sampler
from .guidance import classifier_free_guidance, dynamic_guidance_scale
from .noise import randn
from .schedule import (
    alphas_cumprod_for,
    make_betas,
    rescale_zero_terminal_snr,
    shift_snr,
    spaced_timesteps,
)

__all__ = [
    "SAMPLERS",
    "DDIMSampler",
    "DPMSampler",
    "Sampler",
    "SamplerState",
    "StepResult",
    "alphas_cumprod_for",
    "choose_sampler",
    "classifier_free_guidance",
    "dynamic_guidance_scale",
    "load_scheduler_config",
    "make_betas",
    "make_sampler",
    "randn",
    "rescale_zero_terminal_snr",
    "shift_snr",
    "spaced_timesteps",
]
