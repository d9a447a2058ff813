"""Caches that reuse attention outputs across steps: Pyramid Attention Broadcast and FasterCache's attention part.

Both replace the output of the attention layers their identifiers name (regular expressions searched in module
names, as in diffusers; CogVideoX's only attention is ``transformer_blocks.N.attn1``, a self-attention over the
joined text and video tokens, which diffusers' identifiers class as *spatial*) by an earlier output on some steps:

- **PAB** (Zhao et al., arXiv 2408.12588; diffusers ``PyramidAttentionBroadcastConfig``): within the open timestep
  range, a layer computes every ``block_skip_range``-th call and returns its last output in between.
- **FasterCache** (Lv et al., arXiv 2410.19355; diffusers ``FasterCacheConfig``): on the steps where the
  unconditional branch is skipped (see :mod:`cogvideox.cache.faster`), a layer within its timestep range that is
  not at a multiple of ``block_skip_range`` returns ``o_t + w (o_t - o_t-2)`` from its two last conditional outputs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..transformer.attention import JointAttention
from .base import StepCache, check_positive_int, check_range, in_open_range, named_matches, override_forward

logger = logging.getLogger(__name__)

# diffusers' default identifiers (hooks/_common.py, faster_cache.py); only the spatial ones name CogVideoX layers.
SPATIAL_BLOCKS = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers", "visual_transformer_blocks")
TEMPORAL_BLOCKS = ("temporal_transformer_blocks",)
CROSS_BLOCKS = ("blocks", "transformer_blocks", "layers")
SPATIAL_ATTENTION = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn")
TEMPORAL_ATTENTION = ("^temporal_transformer_blocks.*attn",)

#: the attention classes a cache may wrap (a fork adds its own attention class here)
ATTENTION_CLASSES: tuple[type, ...] = (JointAttention,)


def attention_layers(
    root: nn.Module, spatial: tuple[str, ...], temporal: tuple[str, ...]
) -> list[tuple[str, nn.Module, str]]:
    """(name, module, "spatial" | "temporal") for the attention layers the identifiers name; spatial wins, as in
    diffusers. CogVideoX's attention is never cross-attention (text and video share one self-attention)."""
    found = []
    for name, module in named_matches(root, (*spatial, *temporal), full=False, kind=ATTENTION_CLASSES):
        kind = "spatial" if any(re.search(pattern, name) for pattern in spatial) else "temporal"
        found.append((name, module, kind))
    return found


class PyramidAttentionBroadcast(StepCache):
    method = "pab"
    defaults = {
        "spatial_attention_block_skip_range": None,
        "temporal_attention_block_skip_range": None,
        "cross_attention_block_skip_range": None,
        "spatial_attention_timestep_skip_range": (100, 800),
        "temporal_attention_timestep_skip_range": (100, 800),
        "cross_attention_timestep_skip_range": (100, 800),
        "spatial_attention_block_identifiers": SPATIAL_BLOCKS,
        "temporal_attention_block_identifiers": TEMPORAL_BLOCKS,
        "cross_attention_block_identifiers": CROSS_BLOCKS,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        for kind in ("spatial", "temporal", "cross"):
            check_positive_int(self.method, f"{kind}_attention_block_skip_range",
                               o[f"{kind}_attention_block_skip_range"], allow_none=True)  # fmt: skip
            bounds = f"{kind}_attention_timestep_skip_range"
            check_range(self.method, bounds, o[bounds])
        if all(o[f"{kind}_attention_block_skip_range"] is None for kind in ("spatial", "temporal", "cross")):
            # diffusers' behaviour, with its warning: PAB with nothing to skip falls back to spatial every 2nd call.
            logger.warning("pab cache: no *_attention_block_skip_range set; using spatial_attention_block_skip_range=2")
            o["spatial_attention_block_skip_range"] = 2
        self.layers: dict[str, dict[str, Any]] = {}

    def install(self, transformer: nn.Module) -> None:
        o = self.options
        spatial = o["spatial_attention_block_identifiers"] if o["spatial_attention_block_skip_range"] else ()
        temporal = o["temporal_attention_block_identifiers"] if o["temporal_attention_block_skip_range"] else ()
        for name, module, kind in attention_layers(transformer, tuple(spatial), tuple(temporal)):
            every = o[f"{kind}_attention_block_skip_range"]
            bounds = o[f"{kind}_attention_timestep_skip_range"]
            self._restore.append(override_forward(module, self._layer(name, every, bounds)))
        if not self._restore:
            logger.warning("pab cache: no attention layer matched the identifiers; nothing will be skipped")

    def reset(self) -> None:
        self.layers = {}

    def _layer(self, name: str, every: int, bounds: tuple[float, float]) -> Callable[..., Any]:
        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not self.stepping:
                return original(*args, **kwargs)
            state = self.layers.setdefault(name, {"calls": 0, "output": None})
            compute = (
                state["output"] is None
                or state["calls"] == 0
                or not in_open_range(self.timestep, bounds)
                or state["calls"] % every == 0
            )
            self.stats["attention_run" if compute else "attention_skipped"] += 1
            output = original(*args, **kwargs) if compute else state["output"]
            state["output"] = output
            state["calls"] += 1
            return output

        return forward


class FasterCacheAttention:
    """The attention half of FasterCache: installed and driven by :class:`~cogvideox.cache.faster.FasterCache`."""

    def __init__(self, cache: StepCache) -> None:
        self.cache = cache
        self.layers: dict[str, dict[str, Any]] = {}

    def install(self, transformer: nn.Module) -> None:
        o = self.cache.options
        spatial = o["spatial_attention_block_identifiers"] if o["spatial_attention_block_skip_range"] else ()
        temporal = o["temporal_attention_block_identifiers"] if o["temporal_attention_block_skip_range"] else ()
        # diffusers first narrows to layers named like transformer attention, then applies the config's identifiers
        candidates = {name for name, _, _ in attention_layers(transformer, SPATIAL_ATTENTION, TEMPORAL_ATTENTION)}
        for name, module, kind in attention_layers(transformer, tuple(spatial), tuple(temporal)):
            if name not in candidates:
                continue
            every = o[f"{kind}_attention_block_skip_range"]
            bounds = o[f"{kind}_attention_timestep_skip_range"]
            self.cache._restore.append(override_forward(module, self._layer(name, module, every, bounds)))

    def reset(self) -> None:
        self.layers = {}

    def _layer(self, name: str, module: nn.Module, every: int, bounds: tuple[float, float]) -> Callable[..., Any]:
        cache = self.cache

        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not cache.stepping:
                return original(*args, **kwargs)
            batch = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a)).shape[0]
            state = self.layers.setdefault(name, {"calls": 0, "batch": batch, "outputs": None})
            skip = in_open_range(cache.timestep, bounds) and not (state["calls"] > 0 and state["calls"] % every == 0)
            # Only on steps that run the conditional half alone (the batch shrank), unless distilled (diffusers).
            skip = skip and (cache.distilled or state["batch"] != batch)
            if skip:
                before, last = state["outputs"]
                weight = cache.options["attention_weight_callback"](module)
                output = last[-batch:] + (last[-batch:] - before[-batch:]) * weight
                cache.stats["attention_skipped"] += 1
            else:
                output = original(*args, **kwargs)
                cache.stats["attention_run"] += 1
            kept = output.chunk(2)[1] if not cache.distilled and output.shape[0] == state["batch"] else output
            state["outputs"] = (kept, kept) if state["outputs"] is None else (state["outputs"][1], kept)
            state["calls"] += 1
            return output

        return forward
