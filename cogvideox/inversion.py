"""DDIM inversion: from clean latents back to the noise that the deterministic DDIM sampler turns into them.

    for t in timesteps, least noisy first:          (x: the latents at the level below t; at first the clean ones)
        output = model(x_t_guess, t)                guided as the regeneration will be
        x_t    = DDIMSampler.invert_step(output, t, x)   the x_t from which DDIM's step with this output lands on x

DDIM's step from ``x_t`` to the level below, ``x_s = keep * x_t + toward * x0(x_t)``, is affine in ``x_t`` once
the model output is fixed, so it can be solved for ``x_t`` exactly (:meth:`DDIMSampler.invert_step`). The output
itself depends on the unknown ``x_t``: plain DDIM inversion (Song et al. 2021; diffusers' DDIMInverseScheduler,
CogVideo's ``inference/ddim_inversion.py``) uses the output at ``x_s`` instead, which is where reconstructions
drift. ``fixed_point_iterations`` re-evaluates the model at the new guess and solves again (a fixed-point
iteration, as in "exact" inversion methods such as Pan et al. 2023, arXiv 2303.09615); each iteration costs one more
model pass per step and brings the regenerated latents closer to the original ones (docs/editing.md has the
measured effect).

:func:`invert` is a plain function like :func:`cogvideox.denoise.denoise`: a model callable, a sampler, latents in,
latents out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .denoise import ModelFn, predict
from .samplers import DDIMSampler


def require_ddim(sampler: Any) -> DDIMSampler:
    """The sampler, if it is the deterministic DDIM sampler (the only one with an exact inverse step)."""
    if not isinstance(sampler, DDIMSampler):
        raise ValueError(
            f"inversion runs the deterministic DDIM sampler backwards; this pipeline samples with "
            f"{type(sampler).__name__}. Switch with pipe.set_sampler('ddim') (the same schedule), invert, and "
            "regenerate with that sampler (the DPM sampler's multistep, noise-drawing update has no inverse)"
        )
    return sampler


def invert(
    model: ModelFn,
    sampler: DDIMSampler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    condition: torch.Tensor | None = None,
    fixed_point_iterations: int = 0,
    on_step_end: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """The latents at ``timesteps[0]`` from which DDIM over ``timesteps`` regenerates ``latents``.

    Args:
        model: see :data:`cogvideox.denoise.ModelFn`.
        sampler: a :class:`DDIMSampler` on which ``set_timesteps`` ran.
        latents: ``[B, F, C, h, w]`` clean latents (scaled, in the model's layout).
        timesteps: ``[N]`` as ``set_timesteps`` returned them (noisiest first); visited in reverse.
        text_embeds: ``[B, L, D]``, or ``[2B, L, D]`` with the negative rows first when guided.
        guidance_scale: classifier-free guidance weight used for the model outputs (above 1: guided).
        condition: ``[B, F, C_c, h, w]`` joined to the model input (image-to-video latents).
        fixed_point_iterations: extra model passes per step that refine ``x_t`` (0: plain DDIM inversion).
        on_step_end: called after each step (a progress bar's ``update``).
    Returns:
        ``[B, F, C, h, w]`` latents in ``latents.dtype``.
    """
    guided = guidance_scale > 1.0
    dtype = latents.dtype
    x = latents
    for i in reversed(range(len(timesteps))):
        t = timesteps[i].item()
        guess = x
        for _ in range(1 + fixed_point_iterations):
            output = predict(model, sampler, guess, t, timesteps[i], text_embeds, guidance_scale, condition,
                             guided=guided)  # fmt: skip
            guess = sampler.invert_step(output, t, x.float()).to(dtype)
        x = guess
        if on_step_end is not None:
            on_step_end()
    return x


__all__ = ["invert", "require_ddim"]
