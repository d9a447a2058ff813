"""Caches that skip the whole block stack and add the residual it produced at the last step it ran.

    computed step:  out = blocks(in);  residual = out - in   (video and text streams kept apart)
    skipped step:   out = in + residual

They differ in how they decide to skip:

- **TeaCache** (Liu et al., arXiv 2411.19108; the CogVideoX rule of ali-vilab/TeaCache ``TeaCache4CogVideoX1.5``):
  the relative L1 change of the time embedding ``temb`` since the previous step, rescaled by a polynomial fitted per
  model, is accumulated; a step is skipped while the sum stays below ``threshold``. The first and last steps always
  run.
- **First Block Cache** (ParaAttention; diffusers ``FirstBlockCacheConfig``): block 0 always runs; if the relative
  mean change of its video residual since the last computed step is at most ``threshold``, blocks 1.. are replaced
  by the residual they produced then (measured from block 0's output).
- **MagCache** (Ma et al., Zehong-Ma/MagCache; diffusers ``MagCacheConfig``): calibrated per-step magnitude ratios of
  the residual are multiplied up; a step is skipped while the accumulated error ``sum |1 - prod ratio|`` stays at
  most ``threshold`` and at most ``max_skip_steps`` steps in a row. As in diffusers, a skipped step passes the
  text stream through unchanged (only the video residual is kept).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..configs import TransformerConfig
from .base import RunBlocks, StepCache, check_positive_int, check_threshold

logger = logging.getLogger(__name__)


class FirstBlockCache(StepCache):
    method = "first_block"
    defaults = {"threshold": 0.05}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_threshold(self.method, self.options["threshold"])

    def reset(self) -> None:
        self.head_residual = None  # block 0's video residual at the last computed step
        self.tail = None  # (video, text) residual of blocks 1.. at the last computed step

    def run_blocks(
        self, run: RunBlocks, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head_video, head_text = self.run(run, video, text, 0, 1)
        residual = head_video - video
        previous = self.head_residual
        compute = (
            previous is None
            or self.relative_l1(self.real_tokens(residual), self.real_tokens(previous)) > self.options["threshold"]
        )
        rest = len(self.transformer.transformer_blocks) - 1
        if not compute:
            self.skip_blocks(rest)
            return self.tail[0] + head_video, self.tail[1] + head_text
        self.head_residual = residual
        out_video, out_text = self.run(run, head_video, head_text, 1, None)
        self.tail = (out_video - head_video, out_text - head_text)
        return out_video, out_text


# TeaCache's published rescaling polynomials (highest power first), fitted per model on the relative L1 change of
# the time embedding: ali-vilab/TeaCache, TeaCache4CogVideoX1.5/teacache_sample_video.py, ``coefficients_dict``.
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "CogVideoX-2b": (-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03),
    "CogVideoX-5b": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
    "CogVideoX-5b-I2V": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
    "CogVideoX1.5-5B": (2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02),
    "CogVideoX1.5-5B-I2V": (1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02),
}

# What tells the published models apart (sample sizes differ between copies of the 1.5 config, so they are left out).
_ARCHITECTURE = (
    "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
    "text_embed_dim", "patch_size", "patch_size_t", "ofs_embed_dim", "use_rotary_positional_embeddings",
    "use_learned_positional_embeddings",
)  # fmt: skip


def published_variant(config: TransformerConfig) -> str | None:
    """The published model whose architecture ``config`` has (a key of :data:`cogvideox.presets.TRANSFORMER_CONFIGS`),
    or None for any other model (the bundled demo, a fork's own size)."""
    from ..presets import transformer_config

    for name in TEACACHE_COEFFICIENTS:
        published = transformer_config(name)
        if all(getattr(config, key) == getattr(published, key) for key in _ARCHITECTURE):
            return name
    return None


def polynomial(coefficients: tuple[float, ...], x: float) -> float:
    """``c0 x^n + c1 x^(n-1) + ... + cn`` by Horner's rule in float64 (numpy.poly1d's arithmetic)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


class TeaCache(StepCache):
    method = "teacache"
    defaults = {"threshold": 0.1, "coefficients": None}

    def __init__(self, config: TransformerConfig | None = None, **options: Any) -> None:
        super().__init__(**options)
        check_threshold(self.method, self.options["threshold"])
        coefficients = self.options["coefficients"]
        if coefficients is None:
            variant = None if config is None else published_variant(config)
            if variant is None:
                raise ValueError(
                    "teacache: this transformer is none of the published CogVideoX models, so there is no published "
                    "rescaling polynomial for it; pass coefficients=[c0, c1, c2, c3, c4] (highest power first, "
                    "fitted as in ali-vilab/TeaCache), or use another method (first_block needs no calibration)"
                )
            coefficients = TEACACHE_COEFFICIENTS[variant]
            self.variant = variant
        else:
            self.variant = None
            if (
                isinstance(coefficients, (str, bytes))
                or not hasattr(coefficients, "__len__")
                or len(coefficients) != 5
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coefficients)
            ):
                raise ValueError(
                    f"teacache: coefficients={coefficients!r} must be 5 numbers (a degree-4 polynomial, highest "
                    "power first, as published in ali-vilab/TeaCache)"
                )
        self.coefficients = tuple(float(c) for c in coefficients)

    def reset(self) -> None:
        self.accumulated = 0.0
        self.previous_temb = None
        self.residual = None  # (video, text) of the whole block stack at the last computed step
        self.decisions: list[bool] = []  # True: computed, per step of the call

    def run_blocks(
        self, run: RunBlocks, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        compute = True
        if self.options["threshold"] > 0 and 0 < self.index < self.num_steps - 1:
            self.accumulated += polynomial(self.coefficients, self.relative_l1(temb, self.previous_temb))
            compute = self.accumulated >= self.options["threshold"]
        if compute:
            self.accumulated = 0.0
        self.previous_temb = temb
        self.decisions.append(compute)
        if not compute:
            self.skip_blocks(len(self.transformer.transformer_blocks))
            return video + self.residual[0], text + self.residual[1]
        out_video, out_text = self.run(run, video, text)
        self.residual = (out_video - video, out_text - text)
        return out_video, out_text


def nearest_resample(values: torch.Tensor, length: int) -> torch.Tensor:
    """``values`` resampled to ``length`` entries by nearest index (rounded half to even in float32, as
    diffusers' MagCache does), the first and last entries kept."""
    if length == 1:
        return values[-1:]
    positions = torch.arange(length, dtype=torch.float32) * ((len(values) - 1) / (length - 1))
    return values[torch.round(positions).long()]


class MagCache(StepCache):
    method = "mag"
    defaults = {
        "threshold": 0.06,
        "max_skip_steps": 3,
        "retention_ratio": 0.2,
        "num_inference_steps": None,
        "mag_ratios": None,
        "calibrate": False,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_threshold(self.method, o["threshold"])
        check_positive_int(self.method, "max_skip_steps", o["max_skip_steps"])
        check_positive_int(self.method, "num_inference_steps", o["num_inference_steps"], allow_none=True)
        if (
            isinstance(o["retention_ratio"], bool)
            or not isinstance(o["retention_ratio"], (int, float))
            or not (0 <= o["retention_ratio"] <= 1)
        ):
            raise ValueError(f"mag cache: retention_ratio={o['retention_ratio']!r} must be a number in [0, 1]")
        if o["mag_ratios"] is None and not o["calibrate"]:
            raise ValueError(
                "mag cache: mag_ratios are needed (they are measured per model and sampler): run once with "
                "enable_cache('mag', calibrate=True), read cache.calibration after the call, and pass it as "
                "mag_ratios=[...]"
            )
        self.mag_ratios = None
        if o["mag_ratios"] is not None:
            ratios = torch.as_tensor(o["mag_ratios"], dtype=torch.float32)
            if ratios.ndim != 1 or len(ratios) < 2 or not torch.isfinite(ratios).all():
                raise ValueError("mag cache: mag_ratios must be a list of at least 2 finite numbers, one per step")
            self.mag_ratios = ratios
        self.calibration: list[float] = []

    def begin_call(self, timesteps, guided: bool) -> None:
        super().begin_call(timesteps, guided)
        # diffusers takes the step count from the config (default 28); here the call's count is the default,
        # so the ratios always span the loop actually run.
        self.steps = self.options["num_inference_steps"] or self.num_steps
        if self.mag_ratios is not None:
            ratios = self.mag_ratios
            self.ratios = ratios if len(ratios) == self.steps else nearest_resample(ratios, self.steps)

    def reset(self) -> None:
        # Accumulators are float32 tensors, as diffusers' (its ratios are a float32 tensor), so that decisions
        # made at the threshold's edge agree.
        self.accumulated_ratio = torch.tensor(1.0)
        self.accumulated_err = torch.tensor(0.0)
        self.accumulated_steps = 0
        self.residual = None  # the video residual of the whole stack at the last computed step

    def _should_compute(self) -> bool:
        o = self.options
        if o["calibrate"]:
            return True
        step = self.index % self.steps
        scale = self.ratios[step] if step < len(self.ratios) else torch.tensor(1.0)
        if step < int(o["retention_ratio"] * self.steps + 0.5):
            return True
        self.accumulated_ratio = self.accumulated_ratio * scale
        self.accumulated_steps += 1
        self.accumulated_err = self.accumulated_err + (1.0 - self.accumulated_ratio).abs()
        if (
            self.residual is not None
            and bool(self.accumulated_err <= o["threshold"])
            and self.accumulated_steps <= o["max_skip_steps"]
        ):
            return False
        self.accumulated_ratio = torch.tensor(1.0)
        self.accumulated_err = torch.tensor(0.0)
        self.accumulated_steps = 0
        return True

    def run_blocks(
        self, run: RunBlocks, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index == 0:
            self.calibration = []  # kept after the call for the caller to read
        if not self._should_compute():
            self.skip_blocks(len(self.transformer.transformer_blocks))
            return video + self.residual, text
        out_video, out_text = self.run(run, video, text)
        residual = out_video - video
        if self.options["calibrate"]:
            self.calibration.append(self._ratio(residual))
        self.residual = residual
        if self.options["calibrate"] and self.index == self.num_steps - 1:
            logger.info("mag cache calibration (pass as mag_ratios=): %s", self.calibration)
        return out_video, out_text

    def _ratio(self, residual: torch.Tensor) -> float:
        """Mean over tokens of ``|residual_t| / |residual_t-1|`` (L2 over channels): MagCache's magnitude ratio."""
        if self.residual is None:
            return 1.0
        current = torch.linalg.norm(self.real_tokens(residual).float(), dim=-1)
        previous = torch.linalg.norm(self.real_tokens(self.residual).float(), dim=-1)
        ratio = current / (previous + 1e-8)
        if self.reduce is None:
            return ratio.mean().item()
        sums = self.reduce(torch.stack([ratio.sum(), torch.tensor(float(ratio.numel()), device=ratio.device)]))
        return (sums[0] / sums[1]).item()
