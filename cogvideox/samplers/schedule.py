"""The noise schedule both samplers share, and the inference timestep spacings.

The published CogVideoX checkpoints were trained on a ``scaled_linear`` beta schedule (0.00085 -> 0.012 over
1000 steps) whose cumulative alphas are first shifted towards noise by ``snr_shift_scale`` (3.0 for 2B, 1.0 for
5B) and then rescaled to zero terminal SNR (``alphas_cumprod[-1] == 0``). See docs/samplers.md for the formulas.

The tables live on the CPU in the dtype the reference uses (float64 for the published ``scaled_linear`` schedule,
float32 for the others). The samplers compute every step coefficient as a 0-dim tensor of that dtype, exactly as
the reference does, so that the trajectories agree bit for bit (see ``Sampler.alpha_cumprod``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..configs import BETA_SCHEDULES, TIMESTEP_SPACINGS, SchedulerConfig


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """``squaredcos_cap_v2``: the cosine schedule of Nichol & Dhariwal (2021), each beta capped at ``max_beta``.

    Returns:
        ``[num_train_timesteps]`` float32 (computed in Python floats, stored in float32 like the reference).
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
) -> torch.Tensor:
    """The training betas, ``[num_train_timesteps]``.

    ``scaled_linear`` (every published CogVideoX checkpoint) is linear in sqrt(beta) and computed in float64.
    ``linear`` and ``squaredcos_cap_v2`` come out in float32 because the reference computes them so, and the
    table's dtype carries through every step coefficient: float64 would change trajectories by up to ~1e-5
    relative and break seed-for-seed parity for configs that use them.
    """
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported: choose one of {list(BETA_SCHEDULES)}")


def shift_snr(alphas_cumprod: torch.Tensor, snr_shift_scale: float) -> torch.Tensor:
    """Divide the signal-to-noise ratio of every timestep by ``snr_shift_scale`` (CogVideoX's shift, as in SD3).

    With SNR = a / (1 - a), dividing it by s gives a' = a / (s + (1 - s) a). s = 1 leaves the schedule unchanged.
    """
    return alphas_cumprod / (snr_shift_scale + (1 - snr_shift_scale) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Make the last timestep pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1), applied to the cumulative alphas as the CogVideoX reference does (after the SNR shift).

    sqrt(a) is shifted so that its last value is 0 and scaled so that its first value is unchanged.
    """
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


def alphas_cumprod_for(config: SchedulerConfig) -> torch.Tensor:
    """The cumulative alphas the samplers index by timestep: betas -> cumprod -> SNR shift -> zero-SNR rescale.

    Returns:
        ``[num_train_timesteps]`` on the CPU: float64 for ``scaled_linear``, float32 otherwise (see
        :func:`make_betas`; ``trained_betas`` are float32 in the reference too).
    """
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    else:
        betas = make_betas(config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    # Order matters and follows the reference: shift first, then rescale (the rescale pins the last value to 0).
    alphas_cumprod = shift_snr(alphas_cumprod, config.snr_shift_scale)
    if config.rescale_betas_zero_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    """Raise a ValueError unless ``1 <= num_inference_steps <= num_train_timesteps``."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r}: must be an integer from 1 to {num_train_timesteps}"
        )
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps}: must be from 1 to {num_train_timesteps} "
            f"(the number of timesteps the model was trained on)"
        )


def spaced_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "trailing",
    steps_offset: int = 0,
) -> torch.Tensor:
    """The inference timesteps, from noisiest to cleanest, as int64 ``[num_inference_steps]``.

    The three spacings of Lin et al. (2023), Table 2, computed as the reference computes them (with numpy, whose
    float rounding fixes which integer each step lands on):

    - ``leading``:  k * (T // N) + steps_offset, for k = N-1 .. 0 (50 steps: 980, 960, ..., 0);
    - ``trailing``: round(T - k * T / N) - 1, for k = 0 .. N-1 (50 steps: 999, 979, ..., 19);
    - ``linspace``: round(linspace(0, T - 1, N)), reversed (50 steps: 999, 979, ..., 0).

    ``steps_offset`` only applies to ``leading``, as in the reference.

    Divergence from the reference: for 62 step counts (61, 103, 121, ...), numpy's ``arange`` in ``trailing``
    yields one extra value, -1, and the reference then runs N + 1 steps, the last at timestep -1. We keep the first
    N values, which equal the reference's.
    """
    check_num_inference_steps(num_inference_steps, num_train_timesteps)
    if spacing == "leading":
        stride = num_train_timesteps // num_inference_steps
        steps = (np.arange(num_inference_steps) * stride).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_inference_steps
        steps = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64)[:num_inference_steps] - 1
    elif spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported: choose one of {list(TIMESTEP_SPACINGS)}")
    if steps[0] >= num_train_timesteps:
        raise ValueError(
            f"steps_offset={steps_offset} with {num_inference_steps} leading-spaced steps gives timestep {steps[0]}, "
            f"beyond the last training timestep {num_train_timesteps - 1}: lower steps_offset or num_inference_steps"
        )
    return torch.from_numpy(steps.copy())
