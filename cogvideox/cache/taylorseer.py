"""TaylorSeer (Liu et al., arXiv 2503.06923), as diffusers' ``TaylorSeerCacheConfig`` defines it.

Each hooked module keeps finite-difference derivatives of its output over the steps it computed,

    f0 = y(s);  f(k+1) = (f(k)(s) - f(k)(s_prev)) / (s - s_prev)       up to ``max_order``

(stored in ``taylor_factors_dtype``)
and on the other steps returns the Taylor prediction ``sum_k f(k) * (step - s)^k / k!``. A module computes during
the first ``disable_cache_before_step`` steps, then every ``cache_interval``-th step (``(step - before - 1) %
interval == 0``), and on every step from ``disable_cache_after_step`` on. Modules named by
``skip_predict_identifiers`` return zeros of their recorded shape instead of a prediction (cheap placeholders for
work whose result a later cached module replaces); ``use_lite_mode`` hooks the blocks that way and predicts
``proj_out``, so a predicted step costs almost nothing.

Default modules: diffusers means "every attention layer" but its default patterns (``^transformer_blocks.*attn``
with ``re.fullmatch``) match no CogVideoX module name (``transformer_blocks.0.attn1`` ends in ``1``), which makes
its default a silent no-op for CogVideoX; here the default is every ``transformer_blocks.N.attn1``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import StepCache, check_positive_int, named_matches, override_forward

DEFAULT_CACHE_IDENTIFIERS = (r"transformer_blocks\.\d+\.attn1",)
LITE_SKIP_IDENTIFIERS = (r"^[^.]*block[^.]*\.[^.]+$",)
LITE_CACHE_IDENTIFIERS = ("^proj_out$",)


class TaylorSeerCache(StepCache):
    method = "taylorseer"
    defaults = {
        "cache_interval": 5,
        "disable_cache_before_step": 3,
        "disable_cache_after_step": None,
        "max_order": 1,
        "taylor_factors_dtype": torch.bfloat16,
        "skip_predict_identifiers": None,
        "cache_identifiers": None,
        "use_lite_mode": False,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_positive_int(self.method, "cache_interval", o["cache_interval"])
        check_positive_int(self.method, "max_order", o["max_order"])
        check_positive_int(self.method, "disable_cache_after_step", o["disable_cache_after_step"], allow_none=True)
        before = o["disable_cache_before_step"]
        if isinstance(before, bool) or not isinstance(before, int) or before < 0:
            raise ValueError(f"taylorseer cache: disable_cache_before_step={before!r} must be an integer >= 0")
        if before == 0 and o["cache_interval"] > 1:
            # (0 - 0 - 1) % interval != 0: step 0 would be predicted from nothing
            raise ValueError(
                "taylorseer cache: disable_cache_before_step=0 would predict step 0 before any step was computed; "
                "use disable_cache_before_step >= 1"
            )
        if o["taylor_factors_dtype"] is not None and not isinstance(o["taylor_factors_dtype"], torch.dtype):
            raise ValueError("taylorseer cache: taylor_factors_dtype must be a torch.dtype or None")
        self.modules: dict[str, dict[str, Any]] = {}

    def _patterns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(skip_predict, cache) identifiers in effect."""
        o = self.options
        if o["use_lite_mode"]:
            return LITE_SKIP_IDENTIFIERS, LITE_CACHE_IDENTIFIERS
        return tuple(o["skip_predict_identifiers"] or ()), tuple(
            o["cache_identifiers"] or ()
        ) or DEFAULT_CACHE_IDENTIFIERS

    def check_model(self, transformer: nn.Module) -> None:
        skip, cache = self._patterns()
        if next(named_matches(transformer, (*skip, *cache), full=True), None) is None:
            raise ValueError(
                f"taylorseer cache: no module name matches {list(skip) + list(cache)} (re.fullmatch); names look "
                "like transformer_blocks.0.attn1, transformer_blocks.0.ff, proj_out"
            )

    def install(self, transformer: nn.Module) -> None:
        skip, cache = self._patterns()
        for name, module in named_matches(transformer, (*skip, *cache), full=True):
            inactive = any(re.fullmatch(pattern, name) for pattern in skip)
            self._restore.append(override_forward(module, self._module(name, inactive)))

    def reset(self) -> None:
        self.modules = {}

    def _computes(self, step: int) -> bool:
        o = self.options
        before, after = o["disable_cache_before_step"], o["disable_cache_after_step"]
        return step < before or (step - before - 1) % o["cache_interval"] == 0 or (after is not None and step >= after)

    def _module(self, name: str, inactive: bool) -> Callable[..., Any]:
        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not self.stepping:
                return original(*args, **kwargs)
            state = self.modules.setdefault(name, {"step": -1, "last": None, "factors": {}, "shapes": None})
            state["step"] += 1
            if self._computes(state["step"]):
                output = original(*args, **kwargs)
                self._update(state, (output,) if torch.is_tensor(output) else tuple(output), inactive)
                self.stats["modules_run"] += 1
                return output
            self.stats["modules_predicted"] += 1
            predicted = self._predict(state, inactive)
            return predicted[0] if len(predicted) == 1 else tuple(predicted)

        return forward

    def _update(self, state: dict[str, Any], outputs: tuple[torch.Tensor, ...], inactive: bool) -> None:
        state["dtypes"] = tuple(out.dtype for out in outputs)
        state["device"] = outputs[0].device
        if inactive:
            state["shapes"] = tuple(out.shape for out in outputs)
        else:
            keep = self.options["taylor_factors_dtype"]
            for i, value in enumerate(outputs):
                factors = {0: value}
                previous = state["factors"].get(i, {})
                if state["last"] is not None:
                    gap = state["step"] - state["last"]
                    for order in range(self.options["max_order"]):
                        before = previous.get(order)
                        if before is None or before.shape != factors[order].shape:
                            break
                        factors[order + 1] = (factors[order] - before.to(value.dtype)) / gap
                state["factors"][i] = {k: f.to(keep or f.dtype) for k, f in factors.items()}
        state["last"] = state["step"]

    def _predict(self, state: dict[str, Any], inactive: bool) -> list[torch.Tensor]:
        if inactive:
            return [torch.zeros(shape, dtype=dtype, device=state["device"])
                    for shape, dtype in zip(state["shapes"], state["dtypes"], strict=True)]  # fmt: skip
        offset = state["step"] - state["last"]
        outputs = []
        for i, dtype in enumerate(state["dtypes"]):
            factors = state["factors"][i]
            value = torch.zeros_like(factors[0], dtype=dtype)
            for order in range(len(factors)):
                value = value + factors[order].to(dtype) * (offset**order / math.factorial(order))
            outputs.append(value)
        return outputs
