"""Loading, combining, fusing and removing LoRA adapters on a :class:`~cogvideox.Transformer`.

Every public function checks everything first and changes the model only when all checks pass, so a failed call
leaves the model exactly as it was. The state lives in the model's :class:`LoraLinear` layers (no global
registry): which adapters are loaded, their weights, whether they are fused.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..offload import require_not_streamed
from ..ops.linear import is_plain_linear
from .formats import LoraFile, lora_file_path, parse_lora, read_state_dict
from .layers import LoraAdapter, LoraLinear

logger = logging.getLogger(__name__)

_QKV = ("to_q", "to_k", "to_v")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every :class:`LoraLinear` under ``model`` by its module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def loaded_adapters(model: nn.Module) -> dict[str, float | None]:
    """Adapter name -> its weight (None when inactive), in load order."""
    found: dict[str, float | None] = {}
    for layer in lora_layers(model).values():
        for name, adapter in layer.adapters.items():
            found.setdefault(name, adapter.weight)
    return found


def _is_fused(model: nn.Module) -> bool:
    return any(layer.is_fused for layer in lora_layers(model).values())


def _require_unfused(model: nn.Module, action: str) -> None:
    if _is_fused(model):
        raise RuntimeError(f"cannot {action} while LoRA is fused into the weights: call unfuse_lora() first")


def _finite_weight(value: object, where: str) -> float:
    """``value`` as a float, or an error naming it: ``where`` is a template for ``str.format(value)`` such as
    ``"load_lora(scale={!r})"``. A NaN or infinite adapter weight would turn every output into NaN or inf without
    any other sign."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where.format(value)}: an adapter weight is a number, e.g. 1.0") from None
    if not math.isfinite(weight):
        raise ValueError(
            f"{where.format(value)}: an adapter weight must be a finite number, e.g. 1.0 (0.0 leaves the adapter "
            "without effect)"
        )
    return weight


# ---------------------------------------------------------------------------------------------------- load


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    return module.out_features, module.in_features


def _plan(model: nn.Module, lora: LoraFile) -> dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]]:
    """Map each adapter layer onto a model layer, checking shapes. Returns, per model layer path, its parts
    ``(row_start, rows, A, B * scale)``: one part for a plain layer; up to three for a fused ``to_qkv``."""
    plan: dict[str, list] = {}
    for path, weights in lora.layers.items():
        parent_path, _, leaf = path.rpartition(".")
        if leaf == "0" and parent_path.endswith(".to_out"):
            parent_path, leaf = parent_path[: -len(".to_out")], "to_out.0"
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            parent = None
        target, row_start, row_count, target_path = None, 0, None, path
        if parent is not None and leaf in _QKV and getattr(parent, "to_qkv", None) is not None:
            target, target_path = parent.to_qkv, f"{parent_path}.to_qkv"
            row_count = _base(target).out_features // 3
            row_start = _QKV.index(leaf) * row_count
        elif parent is not None:
            try:
                target = parent.get_submodule(leaf)
            except AttributeError:
                target = None
        if target is None or not hasattr(_base(target), "in_features"):
            raise ValueError(
                f"{lora.source}: {lora.keys[path][0]!r} targets {path}, which this model does not have as a "
                f"linear layer ({len(getattr(model, 'transformer_blocks', []))} blocks): the adapter was made "
                "for another model size or variant"
            )
        out_features, in_features = _linear_shape(_base(target))
        rows = row_count or out_features
        rank = weights.A.shape[0]
        expected_a, expected_b = (rank, in_features), (rows, rank)
        for key, tensor, expected in ((lora.keys[path][0], weights.A, expected_a),
                                      (lora.keys[path][1], weights.B, expected_b)):  # fmt: skip
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{lora.source}: {key!r} has shape {tuple(tensor.shape)} but {path} of this model needs "
                    f"{expected}: the adapter was made for another model size or variant"
                )
        plan.setdefault(target_path, []).append((row_start, rows, weights.A, weights.B * weights.scale))
    return plan


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoraLinear) else module


def _stack_parts(parts: list, out_features: int, dtype: torch.dtype, device: torch.device) -> LoraAdapter:
    """One adapter from its parts: ``down`` = the A rows stacked, ``up`` = the scaled B blocks placed at their
    output rows (block-diagonal for a fused q/k/v)."""
    if len(parts) == 1 and parts[0][1] == out_features:
        _, _, a, b = parts[0]
        return LoraAdapter(a.to(device, dtype), b.to(device, dtype))
    down = torch.cat([a for _, _, a, _ in parts]).to(device, dtype)
    up = torch.zeros(out_features, down.shape[0], device=device, dtype=dtype)
    column = 0
    for row_start, rows, a, b in parts:
        up[row_start : row_start + rows, column : column + a.shape[0]] = b.to(device, dtype)
        column += a.shape[0]
    return LoraAdapter(down, up)


def load_lora(
    model: nn.Module,
    path_or_hub_id: str | Path | dict,
    adapter_name: str | None = None,
    scale: float = 1.0,
    *,
    allow_pickle: bool = False,
    **hub_kwargs,
) -> str:
    """Load an adapter (diffusers/peft or SAT layout) and make it active with weight ``scale`` next to the
    already active ones. ``path_or_hub_id``: a ``.safetensors`` file, a folder holding
    ``pytorch_lora_weights.safetensors``, a hub id, or a state dict. Returns the adapter name
    (default ``default_<k>``, as diffusers names them).

    Raises:
        ValueError: no LoRA keys; a layer this model lacks or a shape mismatch (names the key and both shapes);
            a pickle file without ``allow_pickle=True``; an adapter name already loaded or not a plain name;
            a ``scale`` that is NaN or infinite.
        RuntimeError: LoRA is fused (unfuse first); sequential CPU offload streams the blocks (load before
            enabling it).
    """
    scale = _finite_weight(scale, "load_lora(scale={!r})")
    _require_unfused(model, "load another adapter")
    require_not_streamed(model, "load_lora()")
    loaded = loaded_adapters(model)
    name = adapter_name if adapter_name is not None else f"default_{len(loaded)}"
    if not _NAME.match(name):
        raise ValueError(f"adapter_name {name!r}: use letters, digits, '_' or '-' (no dots)")
    if name in loaded:
        raise ValueError(f"an adapter named {name!r} is already loaded: pass another adapter_name, or unload_lora()")
    if isinstance(path_or_hub_id, dict):
        source, (tensors, metadata) = "state dict", (dict(path_or_hub_id), None)
    else:
        path = lora_file_path(path_or_hub_id, **hub_kwargs)
        source, (tensors, metadata) = str(path), read_state_dict(path, allow_pickle=allow_pickle)
    lora = parse_lora(tensors, metadata, source)
    plan = _plan(model, lora)

    # All checks passed: only now is the model changed.
    dtype = getattr(model, "dtype", None) or next(p.dtype for p in model.parameters() if p.is_floating_point())
    for target_path, parts in plan.items():
        layer = model.get_submodule(target_path)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            set_child(model, target_path, layer)
        base = layer.base
        device = (base.bias if base.bias is not None else base.weight).device
        adapter = _stack_parts(parts, base.out_features, dtype, device)
        adapter.weight = scale
        layer.adapters[name] = adapter
    logger.info("loaded LoRA %r from %s (%s layout, %d layers)", name, source, lora.layout, len(plan))
    return name


def set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (a ModuleList index or an attribute) by ``module``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


# ---------------------------------------------------------------------------------------------------- combine


def set_adapters(
    model: nn.Module, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None
) -> None:
    """Make exactly ``adapter_names`` active with ``adapter_weights`` (one per name, one for all, or 1.0);
    every other loaded adapter becomes inactive (still loaded). A NaN or infinite weight is a ValueError."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if adapter_weights is None:
        weights = [1.0] * len(names)
    elif isinstance(adapter_weights, (int, float)):
        weights = [adapter_weights] * len(names)
    else:
        weights = list(adapter_weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights: give one weight per name")
    loaded = loaded_adapters(model)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; loaded: {list(loaded)}")
    # Loaded names are plain (letters, digits, '_', '-'), so they are safe inside the message template.
    weights = [
        _finite_weight(weight, f"set_adapters(): weight {{!r}} for {name!r}")
        for name, weight in zip(names, weights, strict=True)
    ]
    _require_unfused(model, "change the active adapters")
    chosen = dict(zip(names, weights, strict=True))
    for layer in lora_layers(model).values():
        for name, adapter in layer.adapters.items():
            adapter.weight = chosen.get(name)


# ---------------------------------------------------------------------------------------------------- fuse


def fuse_lora(model: nn.Module, lora_scale: float = 1.0) -> None:
    """Add the active adapters into the base weights (no LoRA cost per step). The original weights are kept
    on the CPU, so :func:`unfuse_lora` restores them exactly. Needs full-precision base layers (not fp8) and a
    finite ``lora_scale``. Works under CPU offload (the weights are changed in place, and the offload hooks copy
    them again)."""
    lora_scale = _finite_weight(lora_scale, "fuse_lora(lora_scale={!r})")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("no LoRA is loaded: call load_lora() first")
    if _is_fused(model):
        return
    quantized = [path for path, layer in layers.items() if not is_plain_linear(layer.base)]
    if quantized:
        raise TypeError(
            f"fuse_lora() needs nn.Linear base layers, but {quantized[0]} is {type(layers[quantized[0]].base).__name__}"
            " (fp8 weight storage): keep the LoRA unfused with fp8 storage"
        )
    for layer in layers.values():
        layer.fuse(lora_scale)


def unfuse_lora(model: nn.Module) -> None:
    """Restore the base weights saved by :func:`fuse_lora` (bit-exact); the adapters run unfused again.

    With nothing fused (no LoRA loaded, or loaded but not fused, or unfused already) this is a no-op that logs
    "nothing to unfuse" at debug level: the model is already in the asked state, and cleanup code can call it
    unconditionally."""
    fused = [layer for layer in lora_layers(model).values() if layer.is_fused]
    if not fused:
        logger.debug("unfuse_lora(): nothing to unfuse (no LoRA is fused into the weights)")
        return
    for layer in fused:
        layer.unfuse()


def unload_lora(model: nn.Module) -> None:
    """Remove every adapter, putting the plain layers back. Fused adapters stay in the weights (as in
    diffusers: ``fuse_lora()`` then ``unload_lora()`` bakes the LoRA in); call ``unfuse_lora()`` first to get
    the original weights back.

    With no adapter loaded (never loaded, or unloaded already) this is a no-op that logs "nothing to unload" at
    debug level, so cleanup code can call it unconditionally. Raises RuntimeError, changing nothing, while
    sequential CPU offload streams the blocks (unload before enabling it)."""
    layers = lora_layers(model)
    if not layers:
        logger.debug("unload_lora(): nothing to unload (no LoRA is loaded)")
        return
    require_not_streamed(model, "unload_lora()")
    for path, layer in layers.items():
        set_child(model, path, layer.base)


__all__ = ["fuse_lora", "load_lora", "loaded_adapters", "lora_layers", "set_adapters", "unfuse_lora", "unload_lora"]
