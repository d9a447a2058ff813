"""Deterministic DDIM (Song et al. 2021, eta = 0), as ``diffusers.CogVideoXDDIMScheduler`` runs it.

From x_t at timestep t to x_s at s = t - T // N (alphas are cumulative, ``a_s`` = 1 below timestep 0):

    x0  = the model's clean estimate (v-prediction: sqrt(a_t) x_t - sqrt(1 - a_t) v)
    x_s = sqrt((1 - a_s) / (1 - a_t)) x_t + (sqrt(a_s) - sqrt(a_t) sqrt((1 - a_s) / (1 - a_t))) x0

which is DDIM's "x0 plus the noise direction" rewritten as a blend of x_t and x0. No noise is drawn, whatever
``eta`` and ``generator`` are: the reference class accepts both and uses neither, so neither do we.
"""

from __future__ import annotations

import torch

from .base import Sampler, SamplerState, StepResult
from .noise import Generator


class DDIMSampler(Sampler):
    """CogVideoX's DDIM sampler; see the module docstring for the update and :class:`Sampler` for the API."""

    kind = "ddim"
    reference_class = "CogVideoXDDIMScheduler"

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
        alpha_t = self.alpha_cumprod(t)
        alpha_prev = self.alpha_cumprod(self.previous_timestep(t))
        x0 = self.predict_x0(model_output, sample, alpha_t)
        # Coefficients stay 0-dim tensors of the table dtype (see Sampler.alpha_cumprod for why).
        keep = ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5
        toward_x0 = alpha_prev**0.5 - alpha_t**0.5 * keep
        prev_sample = keep * sample + toward_x0 * x0
        return StepResult(prev_sample, x0, SamplerState(previous_x0=x0, previous_timestep=t))
