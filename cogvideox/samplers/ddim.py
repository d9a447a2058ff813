"""Deterministic DDIM (Song et al. 2021, eta = 0), as ``diffusers.CogVideoXDDIMScheduler`` runs it.

From x_t at timestep t to x_s at s = t - T // N (alphas are cumulative, ``a_s`` = 1 below timestep 0):

    x0  = the model's clean estimate (v-prediction: sqrt(a_t) x_t - sqrt(1 - a_t) v)
    x_s = sqrt((1 - a_s) / (1 - a_t)) x_t + (sqrt(a_s) - sqrt(a_t) sqrt((1 - a_s) / (1 - a_t))) x0

which is DDIM's "x0 plus the noise direction" rewritten as a blend of x_t and x0. No noise is drawn, whatever
``eta`` and ``generator`` are: the reference class accepts both and uses neither, so neither do we.

The step is affine in x_t for a given model output (x0 = A x_t + B output, :meth:`Sampler.x0_coefficients`), so
:meth:`DDIMSampler.invert_step` solves it for x_t exactly: DDIM inversion (:mod:`cogvideox.inversion`).
"""

from __future__ import annotations

import torch

from .base import Sampler, SamplerState, StepResult
from .noise import Generator


class DDIMSampler(Sampler):
    """CogVideoX's DDIM sampler; see the module docstring for the update and :class:`Sampler` for the API."""

    kind = "ddim"
    reference_class = "CogVideoXDDIMScheduler"

    def _coefficients(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a_t, keep, toward_x0) of the step from ``t``: ``x_s = keep * x_t + toward_x0 * x0``. They stay 0-dim
        tensors of the table dtype (see Sampler.alpha_cumprod for why)."""
        alpha_t = self.alpha_cumprod(t)
        alpha_prev = self.alpha_cumprod(self.previous_timestep(t))
        keep = ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5
        return alpha_t, keep, alpha_prev**0.5 - alpha_t**0.5 * keep

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
        """One deterministic DDIM update; ``state`` is passed through (updated) only to keep the API uniform."""
        self._note_eta(eta)
        t = self._check_timestep(timestep)
        alpha_t, keep, toward_x0 = self._coefficients(t)
        x0 = self.predict_x0(model_output, sample, alpha_t)
        prev_sample = keep * sample + toward_x0 * x0
        return StepResult(prev_sample, x0, SamplerState(previous_x0=x0, previous_timestep=t))

    def invert_step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """The latents x_t at ``timestep`` from which :meth:`step` with this ``model_output`` lands on ``sample``
        (the latents at ``previous_timestep(timestep)``): ``x_t = (x_s - toward B output) / (keep + toward A)``.

        Exact when ``model_output`` is the model's output at the returned x_t; DDIM inversion does not know x_t
        yet, so it passes the output at ``sample`` (the usual approximation) and may iterate
        (:func:`cogvideox.inversion.invert`)."""
        t = self._check_timestep(timestep)
        alpha_t, keep, toward_x0 = self._coefficients(t)
        a, b = self.x0_coefficients(alpha_t)
        slope = keep + toward_x0 * a
        if slope == 0:
            raise ValueError(
                f"the DDIM step from timestep {t} does not depend on the latents (prediction_type "
                f"{self.config.prediction_type!r}: it returns the model's x0), so it has no inverse"
            )
        return (sample - toward_x0 * b * model_output) / slope
