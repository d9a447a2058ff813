"""What both samplers share: the schedule, the timesteps, x0 prediction, ``add_noise`` and the ``strength`` rule.

A sampler holds only what ``set_timesteps`` sets (the timesteps and their count). Everything a multistep update
carries from one step to the next (the previous x0 estimate and its timestep) travels in an explicit
:class:`SamplerState` that ``step`` takes and returns, so a fork can inspect, replace or restart it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch

from ..configs import SchedulerConfig
from .noise import Generator
from .schedule import alphas_cumprod_for, check_num_inference_steps, spaced_timesteps

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplerState:
    """What one step hands to the next; the loop starts from ``SamplerState()``.

    Attributes:
        previous_x0: the x0 estimate of the previous step, shaped like the latents (``None`` before the first).
        previous_timestep: the timestep of the previous step (``None`` before the first).
    """

    previous_x0: torch.Tensor | None = None
    previous_timestep: int | None = None


@dataclasses.dataclass(frozen=True)
class StepResult:
    """The outcome of one ``step``.

    Attributes:
        prev_sample: the latents for the next (less noisy) timestep, shaped like ``sample``.
        pred_original_sample: this step's x0 estimate (a preview of the clean latents).
        state: what the next ``step`` needs.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    state: SamplerState


class Sampler:
    """Base class of :class:`DDIMSampler` and :class:`DPMSampler`; subclasses implement :meth:`step`.

    Attributes:
        config: the :class:`SchedulerConfig` the sampler was built from.
        alphas_cumprod: ``[num_train_timesteps]`` on the CPU, indexed by timestep (float64 for the published
            ``scaled_linear`` schedule; see :func:`~cogvideox.samplers.schedule.make_betas`).
        final_alpha_cumprod: the alpha a step that goes below timestep 0 lands on (1.0 with ``set_alpha_to_one``).
        init_noise_sigma: the scale of the initial noise (1.0: variance-preserving).
        timesteps: int64 ``[N]`` set by :meth:`set_timesteps`, noisiest first.
        num_inference_steps: the N given to :meth:`set_timesteps` (a ``strength`` cut does not change it).
    """

    kind: ClassVar[str] = ""
    #: the diffusers class whose steps this sampler reproduces (the ``_class_name`` of scheduler_config.json).
    reference_class: ClassVar[str] = ""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config if config is not None else SchedulerConfig()
        self.alphas_cumprod = alphas_cumprod_for(self.config)
        # A 0-dim tensor of the table's dtype, like every other alpha, so the step coefficients keep one dtype.
        table_dtype = self.alphas_cumprod.dtype
        self.final_alpha_cumprod = (
            torch.tensor(1.0, dtype=table_dtype) if self.config.set_alpha_to_one else self.alphas_cumprod[0].clone()
        )
        self.init_noise_sigma = 1.0
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._warned_eta = False
        if self.config.prediction_type == "epsilon" and float(self.alphas_cumprod.min()) == 0.0:
            # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a): the reference divides by zero there too and returns NaN.
            logger.warning(
                "prediction_type='epsilon' with a zero-terminal-SNR schedule: a step at the last training timestep "
                "(trailing or linspace spacing) divides by sqrt(alpha) = 0 and gives NaN; use 'v_prediction' or "
                "rescale_betas_zero_snr=False"
            )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}(prediction_type={c.prediction_type!r}, timestep_spacing={c.timestep_spacing!r}, "
            f"snr_shift_scale={c.snr_shift_scale}, num_inference_steps={self.num_inference_steps})"
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ timesteps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Choose ``num_inference_steps`` timesteps with the configured spacing; returns (and keeps) int64 ``[N]``."""
        c = self.config
        timesteps = spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing, c.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        return self.timesteps

    def timesteps_for_strength(
        self, num_inference_steps: int, strength: float, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, int]:
        """Set ``num_inference_steps`` timesteps and keep the last ``int(num_inference_steps * strength)`` of them.

        Video-to-video starts from the input video noised to the first kept timestep (:meth:`add_noise`), so
        ``strength`` 1 is a full generation and small strengths change little. As in the reference, the step size
        stays that of the full schedule, and the count returned is the one dynamic guidance should use.

        Returns:
            ``(timesteps [n], n)``.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(
                f"strength={strength!r}: must be in (0, 1], the fraction of the num_inference_steps steps to run "
                "on the noised input video"
            )
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        if kept == 0:
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} keeps "
                f"int({num_inference_steps} * {strength}) = 0 steps: raise strength or num_inference_steps "
                f"(at least {1 / num_inference_steps:.3g} for {num_inference_steps} steps)"
            )
        timesteps = self.set_timesteps(num_inference_steps, device)
        return timesteps[num_inference_steps - kept :], kept

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """The model input at ``timestep``: the latents unchanged (variance-preserving samplers need no scaling).

        Kept so that a loop written for samplers that do scale (Euler-type) runs unchanged.
        """
        return sample

    def previous_timestep(self, timestep: int) -> int:
        """The timestep a step from ``timestep`` lands on: ``timestep - T // N``.

        This is the reference's rule for every spacing. With ``trailing`` spacing and an N that does not divide T,
        or with ``linspace``, it is not always the next entry of :attr:`timesteps`; kept for parity.
        """
        if self.num_inference_steps is None:
            raise RuntimeError(f"call set_timesteps(num_inference_steps) on the {type(self).__name__} before step()")
        return timestep - self.num_train_timesteps // self.num_inference_steps

    def _check_timestep(self, timestep: int | torch.Tensor) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError(f"call set_timesteps(num_inference_steps) on the {type(self).__name__} before step()")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(
                    f"step() takes one timestep for the whole batch, got a tensor of shape {tuple(timestep.shape)}"
                )
            timestep = timestep.item()
        t = int(timestep)
        if t != timestep or not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep={timestep!r}: must be an integer from 0 to {self.num_train_timesteps - 1}")
        return t

    def alpha_cumprod(self, timestep: int) -> torch.Tensor:
        """Cumulative alpha at ``timestep`` as a 0-dim CPU tensor; below 0 it is ``final_alpha_cumprod``.

        The coefficients derived from it multiply the latents as 0-dim tensors (float64 for the published schedule),
        exactly as in the reference. This matters: torch rounds a 0-dim tensor operand to the latent dtype before
        multiplying, but computes with a Python float in float32, so with bfloat16 latents the two differ and only
        the former reproduces the reference's videos.
        """
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    # ------------------------------------------------------------------ updates

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
        """The clean-latent estimate from the model output, per ``prediction_type`` (both ``[B, ...]``)."""
        kind = self.config.prediction_type
        if kind == "v_prediction":
            # v = sqrt(a) eps - sqrt(1 - a) x0 and x_t = sqrt(a) x0 + sqrt(1 - a) eps give this.
            return alpha_t**0.5 * sample - (1 - alpha_t) ** 0.5 * model_output
        if kind == "epsilon":
            return (sample - (1 - alpha_t) ** 0.5 * model_output) / alpha_t**0.5
        return model_output  # "sample": the model predicts x0 itself

    def x0_coefficients(self, alpha_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with :meth:`predict_x0` = ``A * sample + B * model_output`` (it is affine in both)."""
        kind = self.config.prediction_type
        if kind == "v_prediction":
            return alpha_t**0.5, -((1 - alpha_t) ** 0.5)
        if kind == "epsilon":
            return 1 / alpha_t**0.5, -((1 - alpha_t) ** 0.5) / alpha_t**0.5
        return torch.zeros_like(alpha_t), torch.ones_like(alpha_t)

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
        """One update from ``timestep`` to :meth:`previous_timestep`.

        Args:
            model_output: the (guided) model prediction ``[B, F, C, H, W]``; the pipeline passes float32.
            timestep: the current timestep (an element of :attr:`timesteps`).
            sample: the current latents, same shape; their dtype is the dtype noise is drawn in.
            state: the previous step's ``result.state`` (``None`` or ``SamplerState()`` on the first step).
            generator: where the DPM sampler draws its noise (one generator, or one per batch element).
            eta: accepted for diffusers' call signature and ignored, as both reference classes ignore it.
        """
        raise NotImplementedError

    def _note_eta(self, eta: float) -> None:
        if eta != 0 and not self._warned_eta:
            self._warned_eta = True
            logger.warning(
                "eta=%s is ignored: the CogVideoX %s sampler (like diffusers' %s) has a fixed amount of noise",
                eta,
                self.kind,
                self.reference_class,
            )

    # ------------------------------------------------------------------ forward process

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """Noise clean latents to ``timestep``: sqrt(a_t) x0 + sqrt(1 - a_t) noise.

        Args:
            original: clean latents ``[B, ...]``.
            noise: standard normal noise of the same shape.
            timestep: one timestep, or int ``[B]`` with one per batch element.

        The reference casts the alpha table to the latent dtype before taking the square roots; so do we.
        """
        table = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        timestep = torch.as_tensor(timestep, device=original.device)
        if timestep.is_floating_point() or timestep.min() < 0 or timestep.max() >= self.num_train_timesteps:
            raise ValueError(f"add_noise: timesteps must be integers from 0 to {self.num_train_timesteps - 1}")
        alpha = table[timestep.long()].flatten()
        if alpha.numel() not in (1, original.shape[0]):
            raise ValueError(
                f"add_noise: got {alpha.numel()} timesteps for a batch of {original.shape[0]}: "
                "give one, or one per element"
            )
        view = (-1,) + (1,) * (original.ndim - 1)
        return (alpha**0.5).view(view) * original + ((1 - alpha) ** 0.5).view(view) * noise
