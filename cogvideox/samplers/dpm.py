"""Stochastic DPM-Solver++(2M) (Lu et al. 2022), as ``diffusers.CogVideoXDPMScheduler`` and CogVideoX's SAT
``VPSDEDPMPP2MSampler`` run it: the sampler the official demo uses for every model.

With half log-SNR lambda(a) = log sqrt(a / (1 - a)), a step from t to s = t - T // N has h = lambda_s - lambda_t and

    x_s = sqrt((1 - a_s) / (1 - a_t)) e^-h x_t + sqrt(a_s) (1 - e^-2h) D + sqrt(1 - a_s) sqrt(1 - e^-2h) z

with z ~ N(0, I) and
- first step (no previous x0) and last step (s < 0): D = x0, the current clean estimate;
- otherwise, with r = (lambda_t - lambda_back) / h, where "back" is the previous step's timestep:
  D = (1 + 1 / (2r)) x0 - 1 / (2r) x0_previous.

Noise: every step draws z once; a second-order step then draws a second z and uses only that one. The reference
does this (it computes the first-order result before deciding), so we draw and discard the same tensor to keep
the generator in step: one seed gives one video in both. ``eta`` is ignored, as in the reference: the amount of
noise is fixed by the schedule.

At the first trailing/linspace step, t = T - 1 has a_t = 0 (zero terminal SNR), so lambda_t = -inf and h = +inf;
the coefficients then come out exactly as 0, -1 and sqrt(1 - a_s), which torch's IEEE arithmetic gives
without special cases.
"""

from __future__ import annotations

import torch

from .base import Sampler, SamplerState, StepResult
from .noise import Generator, randn


def half_log_snr(alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda = log sqrt(a / (1 - a)): -inf at a = 0, +inf at a = 1 (a 0-dim tensor in, one of its dtype out)."""
    return ((alpha_cumprod / (1 - alpha_cumprod)) ** 0.5).log()


class DPMSampler(Sampler):
    """CogVideoX's stochastic DPM-Solver++(2M); see the module docstring for the update and :class:`Sampler` for
    the API. The previous x0 and timestep come in through ``state``, never from hidden attributes."""

    kind = "dpm"
    reference_class = "CogVideoXDPMScheduler"

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        state: SamplerState | None = None,
        *,
        generator: Generator = None,
        eta: float = 0.0,
    ) -> StepResult:
        """One DPM-Solver++(2M) update; draws one noise tensor (first/last step) or two (other steps)."""
        self._note_eta(eta)
        state = state if state is not None else SamplerState()
        if (state.previous_x0 is None) != (state.previous_timestep is None):
            raise ValueError(
                "SamplerState needs both previous_x0 and previous_timestep, or neither: pass the state returned by "
                "the previous step() (or SamplerState() for the first step)"
            )
        t = self._check_timestep(timestep)
        prev_t = self.previous_timestep(t)
        alpha_t = self.alpha_cumprod(t)
        alpha_prev = self.alpha_cumprod(prev_t)
        x0 = self.predict_x0(model_output, sample, alpha_t)

        # Coefficients stay 0-dim tensors of the table dtype (see Sampler.alpha_cumprod for why).
        lam_t, lam_prev = half_log_snr(alpha_t), half_log_snr(alpha_prev)
        h = lam_prev - lam_t
        keep = ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5 * (-h).exp()
        # expm1(-2h) sqrt(a_s) = -(1 - e^-2h) sqrt(a_s): the x0 term enters with a minus sign below.
        toward_x0 = (-2 * h).expm1() * alpha_prev**0.5
        noise_scale = (1 - alpha_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        new_state = SamplerState(previous_x0=x0, previous_timestep=t)

        noise = randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        if state.previous_x0 is None or prev_t < 0:
            prev_sample = keep * sample - toward_x0 * x0 + noise_scale * noise
            return StepResult(prev_sample, x0, new_state)

        # Second order. The draw above is discarded, as in the reference (see the module docstring).
        lam_back = half_log_snr(self.alpha_cumprod(self._check_timestep(state.previous_timestep)))
        r = (lam_t - lam_back) / h
        weight_x0, weight_previous = 1 + 1 / (2 * r), 1 / (2 * r)
        blended_x0 = weight_x0 * x0 - weight_previous * state.previous_x0
        noise = randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = keep * sample - toward_x0 * blended_x0 + noise_scale * noise
        return StepResult(prev_sample, x0, new_state)
