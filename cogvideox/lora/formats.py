"""Reading LoRA files in the two published layouts into one form: per target layer, ``(A, B, scale)``.

diffusers / peft (``pytorch_lora_weights.safetensors``, what CogVideo's ``finetune/`` and diffusers' trainers
save)::

    transformer.transformer_blocks.{N}.attn1.to_q.lora_A.weight    [r, in]
    transformer.transformer_blocks.{N}.attn1.to_q.lora_B.weight    [out, r]

The scale is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). ``lora_alpha``, ``r`` and their per-module
patterns come from the file's ``lora_adapter_metadata`` (diffusers >= 0.33 writes it, keys prefixed
``transformer.``); without metadata, from ``<module>.alpha`` keys if any, else ``alpha = r`` (scale 1), which is
what diffusers assumes (``diffusers/utils/peft_utils.py: get_peft_kwargs``). Older ``lora.down`` / ``lora.up``
names are accepted too.

SAT (CogVideo ``sat/`` training, SwissArmyTransformer ``LoraMixin``)::

    [module.][model.diffusion_model.]transformer.layers.{N}.attention.query_key_value.matrix_A.{0,1,2}   [r, in]
    ...query_key_value.matrix_B.{0,1,2}  [out/3, r]   (q, k, v)
    ...attention.dense.matrix_{A,B}.0                  (the output projection)

SAT trains with ``lora_alpha = 1``, so the scale is ``1 / r`` (CogVideo's ``tools/load_cogvideox_lora.py``
passes ``set_adapters(alpha / rank)`` = 1/128 for rank 128). Any number of layers is accepted (the official
export script insists on 240 keys, i.e. 2B only).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import torch

from ..configs import parse_json

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_SAT_KEY = re.compile(
    r"^(?:module\.)?(?:model\.diffusion_model\.)?transformer\.layers\.(\d+)\.attention\."
    r"(query_key_value|dense)\.matrix_([AB])\.(\d+)$"
)
_SAT_PARTS = {"query_key_value": ("to_q", "to_k", "to_v"), "dense": ("to_out.0",)}
_PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora.down.weight": "A", ".lora.up.weight": "B"}
_PREFIXES = ("transformer.", "base_model.model.")


@dataclasses.dataclass
class LoraWeights:
    """One adapter's tensors for one layer: ``A [r, in]``, ``B [out, r]``, ``scale`` (alpha / r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


@dataclasses.dataclass
class LoraFile:
    """A parsed adapter: ``layers`` maps a published layer path (``transformer_blocks.0.attn1.to_q``) to its
    weights, in file order; ``keys`` maps the same path to the file key of its ``A`` (for error messages)."""

    source: str
    layout: str  # "diffusers" or "sat"
    layers: dict[str, LoraWeights]
    keys: dict[str, tuple[str, str]]


# ---------------------------------------------------------------------------------------------------- files


def lora_file_path(path_or_hub_id: str | Path, **hub_kwargs) -> Path:
    """The adapter file for a file path, a folder holding ``pytorch_lora_weights.safetensors`` (or one
    ``*.safetensors``), or a hub id (downloaded with huggingface_hub)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        from ..loading import resolve_pretrained

        path = resolve_pretrained(path_or_hub_id, allow_patterns=("*.safetensors", "*.json"), **hub_kwargs)
    if (path / LORA_WEIGHT_NAME).is_file():
        return path / LORA_WEIGHT_NAME
    candidates = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if len(candidates) != 1:
        found = [p.name for p in candidates]
        raise FileNotFoundError(
            f"{path} has no {LORA_WEIGHT_NAME} and {len(candidates)} other weight files {found}: pass the file itself"
        )
    return candidates[0]


def read_state_dict(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, diffusers LoRA metadata or None) from a safetensors file, or a pickle if allowed."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        if not raw:
            return tensors, None
        what = "diffusers' LoRA metadata (the adapter's LoraConfig as a JSON object)"
        return tensors, parse_json(raw, source=f"the {METADATA_KEY!r} metadata of {path}", what=what)
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickle file, which can run code when opened, so it is refused: convert it to "
            "safetensors, or pass allow_pickle=True to read it with torch.load(weights_only=True)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles; all mean the same to the caller
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True): {err}") from err
    for wrapper in ("module", "model", "state_dict"):  # SAT / DeepSpeed checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, None


# ---------------------------------------------------------------------------------------------------- layouts


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict | None, source: str) -> LoraFile:
    """Recognise the layout and return the per-layer weights. Raises ValueError for a file with no LoRA keys
    or with adapter kinds we do not run (DoRA, LoRA biases, text-encoder adapters)."""
    if any(_SAT_KEY.match(k) for k in tensors):
        return _parse_sat(tensors, source)
    if any(k.endswith(tuple(_PEFT_SUFFIXES)) for k in tensors):
        return _parse_peft(tensors, metadata, source)
    sample = list(tensors)[:3]
    raise ValueError(
        f"{source} holds no LoRA weights ({len(tensors)} tensors, e.g. {sample}): expected diffusers/peft keys "
        "like 'transformer.transformer_blocks.0.attn1.to_q.lora_A.weight' or SAT keys like "
        "'transformer.layers.0.attention.query_key_value.matrix_A.0'"
    )


def _parse_sat(tensors: dict[str, torch.Tensor], source: str) -> LoraFile:
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _SAT_KEY.match(key)
        if match is None:
            continue  # a full SAT checkpoint also holds the base weights
        layer, kind, side, index = match.groups()
        parts = _SAT_PARTS[kind]
        if int(index) >= len(parts):
            raise ValueError(f"{source}: {key!r} has part {index}, but {kind} has {len(parts)} part(s)")
        path = f"transformer_blocks.{layer}.attn1.{parts[int(index)]}"
        pairs.setdefault(path, {})[side] = (key, tensor)
    layers, keys = {}, {}
    for path, sides in pairs.items():
        _require_both(sides, path, source)
        a, b = sides["A"][1], sides["B"][1]
        layers[path] = LoraWeights(a, b, 1.0 / a.shape[0])  # SAT: lora_alpha = 1
        keys[path] = (sides["A"][0], sides["B"][0])
    logger.info("%s: SAT LoRA layout, %d layers", source, len(layers))
    return LoraFile(source, "sat", layers, keys)


def _parse_peft(tensors: dict[str, torch.Tensor], metadata: dict | None, source: str) -> LoraFile:
    unsupported = [k for k in tensors if "lora_magnitude_vector" in k or (".lora_B." in k and k.endswith(".bias"))]
    if unsupported:
        raise ValueError(f"{source}: DoRA / LoRA-bias adapters are not supported (e.g. {unsupported[0]!r})")
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if name.startswith("text_encoder."):
            raise ValueError(
                f"{source}: text-encoder LoRA ({key!r}) is not supported; CogVideoX adapts the transformer"
            )
        if name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = float(tensor)
            continue
        suffix = next((s for s in _PEFT_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{source}: {key!r} is not a LoRA key (expected *.lora_A.weight / *.lora_B.weight)")
        pairs.setdefault(name[: -len(suffix)], {})[_PEFT_SUFFIXES[suffix]] = (key, tensor)
    config = _transformer_metadata(metadata)
    layers, keys = {}, {}
    for path, sides in pairs.items():
        _require_both(sides, path, source)
        a, b = sides["A"][1], sides["B"][1]
        layers[path] = LoraWeights(a, b, _peft_scale(path, a.shape[0], config, alphas))
        keys[path] = (sides["A"][0], sides["B"][0])
    return LoraFile(source, "diffusers", layers, keys)


def _require_both(sides: dict, path: str, source: str) -> None:
    if set(sides) != {"A", "B"}:
        have = [key for key, _ in sides.values()]
        raise ValueError(f"{source}: layer {path} has {have} but needs both the A (down) and B (up) matrices")


def _transformer_metadata(metadata: dict | None) -> dict | None:
    """The transformer's LoraConfig fields from diffusers' metadata (``transformer.r`` ...), or None."""
    if not metadata:
        return None
    prefixed = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    return prefixed or metadata


def _pattern_value(path: str, patterns: dict | None):
    """peft matches a pattern key against the end of a module path (``re.match(rf"(.*\\.)?{key}$", path)``)."""
    for key, value in (patterns or {}).items():
        if path == key or path.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return None


def _peft_scale(path: str, rank: int, config: dict | None, alphas: dict[str, float]) -> float:
    """``lora_alpha / r`` for this layer (peft's ``LoraLayer.update_layer``); ``/ sqrt(r)`` for rsLoRA."""
    if config is not None:
        alpha = _pattern_value(path, config.get("alpha_pattern"))
        if alpha is None:
            alpha = config.get("lora_alpha", rank)
        denominator = math.sqrt(rank) if config.get("use_rslora") else rank
        return float(alpha) / denominator
    return alphas.get(path, rank) / rank
