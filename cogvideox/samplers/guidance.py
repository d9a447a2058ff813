"""Classifier-free guidance and CogVideoX's dynamic guidance scale.

Both follow the reference pipelines (diffusers ``pipeline_cogvideox*.py``): the model output is cast to float32
before guidance, and the dynamic scale is computed from the raw timestep value.
"""

from __future__ import annotations

import math

import torch


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond), in float32 whatever the input dtype (the reference casts first).

    Args:
        uncond: the prediction for the negative (empty) prompt, ``[B, F, C, H, W]``.
        cond: the prediction for the prompt, same shape.
        scale: the guidance scale (1 gives ``cond``).

    Returns:
        float32, same shape.
    """
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond {tuple(uncond.shape)} and cond {tuple(cond.shape)} must have the same shape")
    uncond, cond = uncond.float(), cond.float()
    return uncond + scale * (cond - uncond)


def dynamic_guidance_scale(
    guidance_scale: float, timestep: int | float | torch.Tensor, num_inference_steps: int
) -> float:
    """The guidance scale CogVideoX uses at ``timestep`` with ``use_dynamic_cfg=True``:

        w = 1 + g * (1 - cos(pi * ((N - t) / N) ** 5)) / 2

    **Quirk, kept on purpose:** ``t`` is the raw timestep value (0..999), not the step index, as in the reference
    pipelines and CogVideoX's SAT ``DynamicCFG``. So (N - t) / N is far below 0 for most steps and w oscillates
    between 1 and 1 + g from step to step instead of decaying smoothly (diffusers #9641; the CogVideo authors call
    the wave-like schedule intended, CogVideo #267). To get the smooth schedule instead, pass the step index
    ``i`` as ``timestep``. For video-to-video, N is the number of steps actually run (after the ``strength`` cut).

    Args:
        guidance_scale: g, the user's guidance scale.
        timestep: t, the current timestep value (an int, or a one-element tensor).
        num_inference_steps: N.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps}: must be at least 1")
    t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
    progress = (num_inference_steps - t) / num_inference_steps
    return 1 + guidance_scale * (1 - math.cos(math.pi * progress**5.0)) / 2
