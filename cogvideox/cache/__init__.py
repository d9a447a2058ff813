"""Step caching: reuse work across denoising steps, one switch for six published methods.

    pipe.enable_cache("teacache", threshold=0.1)      # or first_block, pab, faster, taylorseer, mag
    pipe.disable_cache()

The five methods diffusers has take the option names, meanings and defaults of its configs
(``FirstBlockCacheConfig``, ``PyramidAttentionBroadcastConfig``, ``FasterCacheConfig``, ``TaylorSeerCacheConfig``,
``MagCacheConfig``); the pipeline supplies the current timestep. See docs/caching.md for what each skips, what it
costs in memory and the measured speed and quality.
"""

from __future__ import annotations

import ast
from typing import Any

from ..configs import TransformerConfig
from .attention import PyramidAttentionBroadcast
from .base import StepCache, override_forward
from .faster import FasterCache
from .residual import TEACACHE_COEFFICIENTS, FirstBlockCache, MagCache, TeaCache, published_variant
from .taylorseer import TaylorSeerCache

CACHE_METHODS: dict[str, type[StepCache]] = {
    "teacache": TeaCache,
    "first_block": FirstBlockCache,
    "pab": PyramidAttentionBroadcast,
    "faster": FasterCache,
    "taylorseer": TaylorSeerCache,
    "mag": MagCache,
}


def make_cache(method: str | StepCache, config: TransformerConfig | None = None, **options: Any) -> StepCache:
    """A step cache of ``method`` with ``options``, every option checked here (before any model runs).
    ``config`` (the transformer's) picks TeaCache's published coefficients. A :class:`StepCache` instance (a
    fork's own method) is returned as it is."""
    if isinstance(method, StepCache):
        if options:
            raise TypeError(f"options {sorted(options)} go to the cache's constructor, not with a cache object")
        return method
    if method not in CACHE_METHODS:
        raise ValueError(f"unknown cache method {method!r}; choose one of: {', '.join(CACHE_METHODS)}")
    if method == "teacache":
        return TeaCache(config, **options)
    return CACHE_METHODS[method](**options)


def parse_cache_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """The CLI's ``METHOD[:k=v,...]`` -> (method, options); values are Python literals (numbers, tuples, lists,
    True/False/None), anything else a string. ``"teacache:threshold=0.1"`` -> ``("teacache", {"threshold": 0.1})``.
    Commas inside brackets belong to the value: ``mag:mag_ratios=[1.0,0.99,0.98],threshold=0.1``."""
    method, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in _split_top_level(rest):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"--cache {spec!r}: {item!r} is not name=value (e.g. teacache:threshold=0.1)")
        try:
            options[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[name.strip()] = value.strip()
    return method.strip(), options


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


__all__ = [
    "CACHE_METHODS",
    "TEACACHE_COEFFICIENTS",
    "FasterCache",
    "FirstBlockCache",
    "MagCache",
    "PyramidAttentionBroadcast",
    "StepCache",
    "TaylorSeerCache",
    "TeaCache",
    "make_cache",
    "override_forward",
    "parse_cache_spec",
    "published_variant",
]
