"""The diffusion training objective of CogVideoX: timestep sampling, noising, and the v-prediction loss.

The published checkpoints predict v (Salimans & Ho 2022): with a = alphas_cumprod[t],

    x_t = sqrt(a) x0 + sqrt(1 - a) eps,        v = sqrt(a) eps - sqrt(1 - a) x0.

The official fine-tuning (THUDM/CogVideo finetune/, and SAT's ``VideoDiffusionLoss``) does not regress v directly:
it turns the predicted v into an x0 estimate, x0_hat = sqrt(a) x_t - sqrt(1 - a) v_hat, and weights its squared
error by 1 / (1 - a). The two are the same loss: x0_hat - x0 = -sqrt(1 - a) (v_hat - v), so
(x0_hat - x0)^2 / (1 - a) = (v_hat - v)^2. We compute it the official way (x0 form) so that a fork comparing
against the official trainer sees the same numbers. That costs a little float32 accuracy near t = 0: there
a ~ 1, so x0_hat is a difference of nearly equal terms and 1 / (1 - a) (about 1200 at t = 0 for the 5B schedule)
multiplies its rounding error: the per-clip loss is good to about 1e-5 relative there
(``tests/training/test_objective.py`` bounds it by 5e-5 at t = 0, by 1e-6 elsewhere). The v form never forms x0_hat
and has no such cancellation; both forms are finite at every timestep.

The schedule is the sampler's (:func:`~cogvideox.samplers.alphas_cumprod_for`): scaled-linear betas, the SNR
shift and the zero-terminal-SNR rescale, so training and sampling agree on what timestep t means.
"""

from __future__ import annotations

import torch

from ..configs import SchedulerConfig
from ..samplers import alphas_cumprod_for


class DiffusionObjective:
    """The schedule a training run noises with, and the loss it optimises.

    Args:
        config: the checkpoint's scheduler config (``scheduler/scheduler_config.json``).
    Attributes:
        alphas_cumprod: ``[T]`` float64 on the CPU (moved to the batch's device on use).
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod_for(config).to(torch.float64)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _alphas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] as float32 ``[B, 1, 1, 1, 1]`` (broadcasts over ``[B, F, C, H, W]``)."""
        table = self._on_device.get(like.device)
        if table is None:
            table = self._on_device[like.device] = self.alphas_cumprod.to(like.device, torch.float32)
        alpha = table[timesteps.to(like.device).long()]
        return alpha.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(
        self, batch: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Uniform integer timesteps in [0, T), int64 ``[batch]`` (drawn on the generator's device, the CPU)."""
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)
        return t.to(device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a) x0 + sqrt(1 - a) eps; latents and noise ``[B, F, C, H, W]``, timesteps ``[B]``."""
        alpha = self._alphas(timesteps, latents)
        return (alpha.sqrt() * latents.float() + (1 - alpha).sqrt() * noise.float()).to(latents.dtype)

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v target, sqrt(a) eps - sqrt(1 - a) x0, ``[B, F, C, H, W]`` float32."""
        alpha = self._alphas(timesteps, latents)
        return alpha.sqrt() * noise.float() - (1 - alpha).sqrt() * latents.float()

    def loss(
        self,
        prediction: torch.Tensor,
        noisy: torch.Tensor,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The official loss: mean over the batch of mean((x0_hat - x0)^2 / (1 - a)) per clip.

        Args:
            prediction: the model's v, ``[B, F, C, H, W]``.
            noisy: x_t, the model's input latents (without the I2V image channels), ``[B, F, C, H, W]``.
            latents: the clean x0, ``[B, F, C, H, W]``.
            timesteps: ``[B]`` integer timesteps.
            frame_mask: ``[B, F]`` bool, False for Frame Pack padding frames; each clip's loss is the mean over
                its real frames only, so padding a clip changes nothing.
            reduction: ``"mean"`` (the training loss) or ``"none"`` (each clip's loss, ``[B]``: for logging, or to
                check that Frame Pack padding leaves a clip's loss unchanged).
        Returns:
            A float32 scalar, or ``[B]`` float32 with ``reduction="none"``.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction={reduction!r}: use 'mean' (the training loss) or 'none' (one loss per clip)")
        alpha = self._alphas(timesteps, latents)
        x0_hat = alpha.sqrt() * noisy.float() - (1 - alpha).sqrt() * prediction.float()
        error = (x0_hat - latents.float()).square() / (1 - alpha)
        if frame_mask is None:
            per_clip = error.flatten(1).mean(dim=1)
        else:
            weight = frame_mask.to(error.device, error.dtype)[:, :, None, None, None].expand_as(error)
            per_clip = (error * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1).clamp(min=1)
        return per_clip if reduction == "none" else per_clip.mean()
