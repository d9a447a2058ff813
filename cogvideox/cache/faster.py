"""FasterCache (Lv et al., arXiv 2410.19355), as diffusers' ``FasterCacheConfig`` defines it.

Two reuses. Attention (:class:`~cogvideox.cache.attention.FasterCacheAttention`): on some steps a layer's output is
extrapolated from its last two outputs. Guidance (here): on steps inside ``unconditional_batch_timestep_skip_range``
that are not a multiple of ``unconditional_batch_skip_range``, the transformer runs on the conditional half only,
and the unconditional prediction is rebuilt from it in the frequency domain:

    per latent frame, FFT over (h, w), centred; low = inside a disc of radius min(h, w) // 5, high = the rest
    computed step:  d_low = low(uncond) - low(cond);  d_high = high(uncond) - high(cond)
    skipped step:   d_low *= w_low;  d_high *= w_high   (kept: the scaling compounds over skipped steps)
                    uncond = real(IFFT(d_low + low(cond) + d_high + high(cond)))

``w_low`` is ``alpha_low_frequency`` inside ``low_frequency_weight_update_timestep_range`` and 1 outside (likewise
high). Without guidance in a call (or with ``is_guidance_distilled=True``) the guidance reuse is off and attention
layers extrapolate on every step their range and ``block_skip_range`` allow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .attention import SPATIAL_ATTENTION, TEMPORAL_ATTENTION, FasterCacheAttention
from .base import StepCache, check_positive_int, check_range, in_open_range


class FasterCache(StepCache):
    method = "faster"
    defaults = {
        "spatial_attention_block_skip_range": 2,
        "temporal_attention_block_skip_range": None,
        "spatial_attention_timestep_skip_range": (-1, 681),
        "temporal_attention_timestep_skip_range": (-1, 681),
        "low_frequency_weight_update_timestep_range": (99, 901),
        "high_frequency_weight_update_timestep_range": (-1, 301),
        "alpha_low_frequency": 1.1,
        "alpha_high_frequency": 1.1,
        "unconditional_batch_skip_range": 5,
        "unconditional_batch_timestep_skip_range": (-1, 641),
        "spatial_attention_block_identifiers": SPATIAL_ATTENTION,
        "temporal_attention_block_identifiers": TEMPORAL_ATTENTION,
        "attention_weight_callback": None,
        "low_frequency_weight_callback": None,
        "high_frequency_weight_callback": None,
        "tensor_format": "BFCHW",
        "is_guidance_distilled": False,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_positive_int(self.method, "spatial_attention_block_skip_range", o["spatial_attention_block_skip_range"],
                           allow_none=True)  # fmt: skip
        check_positive_int(self.method, "temporal_attention_block_skip_range",
                           o["temporal_attention_block_skip_range"], allow_none=True)  # fmt: skip
        check_positive_int(self.method, "unconditional_batch_skip_range", o["unconditional_batch_skip_range"])
        for name in (
            "spatial_attention_timestep_skip_range", "temporal_attention_timestep_skip_range",
            "low_frequency_weight_update_timestep_range", "high_frequency_weight_update_timestep_range",
            "unconditional_batch_timestep_skip_range",
        ):  # fmt: skip
            check_range(self.method, name, o[name])
        for name in ("alpha_low_frequency", "alpha_high_frequency"):
            if isinstance(o[name], bool) or not isinstance(o[name], (int, float)):
                raise ValueError(f"faster cache: {name}={o[name]!r} must be a number")
        # Latents here are always [B, F, C, h, w]; the split works per (h, w) plane, so diffusers' formats other
        # than BCHW give the same numbers. BCHW (images) has no meaning for a video model.
        if o["tensor_format"] not in ("BFCHW", "BCFHW"):
            raise ValueError(f"faster cache: tensor_format={o['tensor_format']!r}; CogVideoX latents are 'BFCHW'")
        for name in ("attention_weight_callback", "low_frequency_weight_callback", "high_frequency_weight_callback"):
            if o[name] is not None and not callable(o[name]):
                raise ValueError(f"faster cache: {name} must be a callable (module -> float) or None")
        if o["attention_weight_callback"] is None:
            o["attention_weight_callback"] = lambda module: 0.5  # diffusers' default weight
        if o["low_frequency_weight_callback"] is None:
            o["low_frequency_weight_callback"] = self._frequency_weight("low")
        if o["high_frequency_weight_callback"] is None:
            o["high_frequency_weight_callback"] = self._frequency_weight("high")
        self.attention = FasterCacheAttention(self)

    def _frequency_weight(self, band: str) -> Callable[[Any], float]:
        def weight(module: Any) -> float:
            inside = in_open_range(self.timestep, self.options[f"{band}_frequency_weight_update_timestep_range"])
            return self.options[f"alpha_{band}_frequency"] if inside else 1.0

        return weight

    def install(self, transformer: torch.nn.Module) -> None:
        self.attention.install(transformer)

    def check_parallel(self, guidance_split: bool) -> None:
        if guidance_split and not self.options["is_guidance_distilled"]:
            raise ValueError(
                "faster cache: its guidance reuse runs the conditional half alone on most steps, which cannot be "
                "split one branch per rank: use cfg_degree=1 (Ulysses is fine), or is_guidance_distilled=True"
            )

    @property
    def distilled(self) -> bool:
        return self.options["is_guidance_distilled"] or not self.guided

    def reset(self) -> None:
        self.attention.reset()
        self.calls = 0
        self.low_delta = self.high_delta = None

    def predict(
        self, model: Callable[..., torch.Tensor], latents: torch.Tensor, text_embeds: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        if self.distilled:
            self.calls += 1
            return model(latents, text_embeds, t)
        o = self.options
        skip = (
            self.calls > 0
            and in_open_range(self.timestep, o["unconditional_batch_timestep_skip_range"])
            and self.calls % o["unconditional_batch_skip_range"] != 0
        )
        if not skip:
            out = model(latents, text_embeds, t)
            uncond, cond = out.chunk(2)
            low_u, high_u = split_frequencies(uncond.flatten(0, 1).float())
            low_c, high_c = split_frequencies(cond.flatten(0, 1).float())
            self.low_delta, self.high_delta = low_u - low_c, high_u - high_c
            self.calls += 1
            return out
        self.stats["uncond_skipped"] += 1
        cond = model(latents.chunk(2)[1], text_embeds.chunk(2)[1], t.chunk(2)[1])
        self.low_delta = self.low_delta * o["low_frequency_weight_callback"](self.transformer)
        self.high_delta = self.high_delta * o["high_frequency_weight_callback"](self.transformer)
        low_c, high_c = split_frequencies(cond.flatten(0, 1).float())
        spectrum = (self.low_delta + low_c) + (self.high_delta + high_c)
        uncond = torch.fft.ifft2(torch.fft.ifftshift(spectrum)).real.unflatten(0, cond.shape[:2]).to(cond.dtype)
        self.calls += 1
        return torch.cat([uncond, cond])


@torch.no_grad()
def split_frequencies(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, C, h, w]`` -> (low, high) parts of its centred 2D spectrum (complex, same shape; they sum to it).

    The centring shift runs over every dimension, not only (h, w), as in diffusers; the inverse shift that
    rebuilds a tensor undoes it, so only the mask's placement matters: a disc of radius ``min(h, w) // 5``
    around ``(h // 2, w // 2)``."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x))
    height, width = x.shape[-2:]
    radius = min(height, width) // 5
    rows = torch.arange(height, device=x.device)[:, None]
    cols = torch.arange(width, device=x.device)[None, :]
    low = (cols - width // 2) ** 2 + (rows - height // 2) ** 2 <= radius**2
    return spectrum * low, spectrum * ~low
