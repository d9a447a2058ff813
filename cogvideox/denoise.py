"""The denoising loop as a plain function: a model callable, a sampler, latents in, latents out.

    for t in timesteps:
        input      = [latents; latents] under guidance (+ the I2V condition on channels)
        prediction = model(input, text_embeds, t)            float32 from here on
        prediction = uncond + w * (cond - uncond)            w constant, or CogVideoX's dynamic schedule
        latents    = sampler.step(prediction, t, latents)

:func:`denoise` knows nothing of the transformer, the VAE, offload or parallelism. Everything that changes how
the model is run wraps the model callable instead of branching here: guidance parallelism
(:meth:`cogvideox.distributed.ParallelInference.wrap_model` computes one guidance half per rank and gathers both),
sequence parallelism (hooks inside the transformer), offload (hooks on the modules), step caching. A fork swaps
the sampler (anything with the :class:`cogvideox.protocols.Sampler` methods; timesteps may be floats), the model
(any callable with the signature of :data:`ModelFn`), or the guidance, and reuses the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .protocols import Sampler
from .samplers import classifier_free_guidance, dynamic_guidance_scale

#: ``model(latents [B, F, C_in, h, w], text_embeds [B, L, D], timestep [B]) -> prediction [B, F, C_out, h, w]``
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``callback(step, timestep, latents, text_embeds) -> None | {"latents": ..., "text_embeds": ...}`` after each step
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "dict[str, torch.Tensor] | None"]

# Steps between the host syncs that check the latents are finite: a sync per step would stall a GPU pipeline.
CHECK_FINITE_EVERY = 5


def denoise(
    model: ModelFn,
    sampler: Sampler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    dynamic_guidance: bool = False,
    num_steps: int | None = None,
    condition: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
    interrupted: Callable[[], bool] | None = None,
    on_step_end: Callable[[], Any] | None = None,
    check_finite_every: int = CHECK_FINITE_EVERY,
) -> torch.Tensor:
    """Run ``sampler`` over ``timesteps`` from ``latents``; returns the final latents (same shape and dtype).

    Args:
        model: see :data:`ModelFn`; its output is cast to float32 before guidance, as in the reference.
        sampler: ``scale_model_input`` and ``step`` are called once per step (``set_timesteps`` already ran).
        latents: ``[B, F, C, h, w]`` initial latents (noise, or noised video latents).
        timesteps: ``[N]`` (int or float, on the latents' device), noisiest first.
        text_embeds: ``[B, L, D]``, or ``[2B, L, D]`` with the negative rows first when guidance is on.
        guidance_scale: classifier-free guidance is on when it is above 1 (the model then sees batch ``2B``).
        dynamic_guidance: CogVideoX's cosine schedule of the scale (computed from the raw timestep value, a
            reference quirk: see :func:`~cogvideox.samplers.dynamic_guidance_scale`).
        num_steps: the step count of that schedule (video-to-video: the steps actually run); default ``N``.
        condition: ``[B, F, C_c, h, w]`` joined to the model input on channels (image-to-video latents).
        generator, eta: passed to ``sampler.step``.
        callback: after each step; may return replacement ``latents`` and ``text_embeds``.
        interrupted: asked before each step; True stops the loop there.
        on_step_end: called after each step (a progress bar's ``update``).
        check_finite_every: look for NaN/inf in the latents every this many steps and after the last (0: never).
            The first bad step is remembered on the device, so a check costs one sync, not one per step.

    Raises:
        FloatingPointError: the latents became NaN or infinite (naming the first such step).
    """
    guided = guidance_scale > 1.0
    num_steps = len(timesteps) if num_steps is None else num_steps
    steps = timesteps.tolist()  # one host sync, before the loop
    dtype = latents.dtype
    state = None
    first_nonfinite = torch.full((), -1, device=latents.device)
    for i, t in enumerate(steps):
        if interrupted is not None and interrupted():
            break
        scale = dynamic_guidance_scale(guidance_scale, t, num_steps) if dynamic_guidance and guided else guidance_scale
        prediction = predict(model, sampler, latents, t, timesteps[i], text_embeds, scale, condition, guided=guided)
        result = sampler.step(prediction, t, latents, state, generator=generator, eta=eta)
        latents, state = result.prev_sample.to(dtype), result.state

        if check_finite_every:
            bad = ~torch.isfinite(latents).all()
            first_nonfinite = torch.where(bad & (first_nonfinite < 0), i, first_nonfinite)
            if (i + 1) % check_finite_every == 0 or i == len(steps) - 1:
                raise_if_nonfinite(first_nonfinite, steps)
        if callback is not None:
            replaced = callback(i, timesteps[i], latents, text_embeds) or {}
            latents = replaced.get("latents", latents)
            text_embeds = replaced.get("text_embeds", text_embeds)
        if on_step_end is not None:
            on_step_end()
    if check_finite_every:
        raise_if_nonfinite(first_nonfinite, steps)
    return latents


def predict(
    model: ModelFn,
    sampler: Sampler,
    latents: torch.Tensor,
    t: float,
    timestep: torch.Tensor,
    text_embeds: torch.Tensor,
    guidance_scale: float,
    condition: torch.Tensor | None = None,
    *,
    guided: bool,
) -> torch.Tensor:
    """The model's float32 prediction at ``latents`` and timestep ``t`` (``timestep``: the same as a 0-dim tensor
    on the latents' device), ``guided`` by classifier-free guidance with weight ``guidance_scale`` (the model then
    sees both halves: ``text_embeds`` holds the negative rows first), with ``condition`` joined on channels."""
    model_input = torch.cat([latents, latents]) if guided else latents
    model_input = sampler.scale_model_input(model_input, t)
    if condition is not None:
        model_input = torch.cat([model_input, torch.cat([condition, condition]) if guided else condition], dim=2)
    prediction = model(model_input, text_embeds, timestep.expand(model_input.shape[0])).float()
    if not guided:
        return prediction
    uncond, cond = prediction.chunk(2)
    return classifier_free_guidance(uncond, cond, guidance_scale)


def raise_if_nonfinite(first_nonfinite: torch.Tensor, timesteps: list) -> None:
    """Raise if ``first_nonfinite`` (a 0-dim step index, -1 for none) names a step."""
    step = int(first_nonfinite)
    if step >= 0:
        raise FloatingPointError(
            f"the latents became NaN or infinite at step {step} (timestep {timesteps[step]}); in float16 this "
            "is a known failure of CogVideoX 5B / 1.5: use dtype=torch.bfloat16 or torch.float32"
        )


def diffusers_callback(
    pipe: Any, callback: Callable[..., dict], names: Sequence[str], negative: torch.Tensor | None
) -> StepCallback:
    """diffusers' ``callback_on_step_end(pipe, i, t, tensors) -> dict`` as the loop's step callback. As in
    diffusers, ``prompt_embeds`` is the batch the transformer sees ([negative; positive] under guidance), and a
    returned ``negative_prompt_embeds`` replaces that batch's first half."""

    def on_step(step: int, timestep: torch.Tensor, latents: torch.Tensor, embeds: torch.Tensor) -> dict:
        nonlocal negative
        tensors = {"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": negative}
        outputs = callback(pipe, step, timestep, {k: tensors[k] for k in names}) or {}
        embeds = outputs.get("prompt_embeds", embeds)
        if negative is not None and "negative_prompt_embeds" in outputs:
            negative = outputs["negative_prompt_embeds"]
            embeds = torch.cat([negative, embeds[negative.shape[0] :]])
        return {"latents": outputs.get("latents", latents), "text_embeds": embeds}

    return on_step


__all__ = [
    "CHECK_FINITE_EVERY",
    "ModelFn",
    "StepCallback",
    "denoise",
    "diffusers_callback",
    "predict",
    "raise_if_nonfinite",
]
