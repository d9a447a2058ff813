"""Trainable LoRA for the transformer, saved in the diffusers/peft layout that ``Pipeline.load_lora`` reads.

A LoRA adapter adds a low-rank update to a frozen linear layer (Hu et al. 2021)::

    y = W x + b + (alpha / r) * B (A x),     A [r, in], B [out, r]

Initialisation is peft's (``init_lora_weights=True``): ``A`` Kaiming-uniform with ``a = sqrt(5)`` (uniform in ``+-1
/ sqrt(in)``), ``B`` zero, so the model starts exactly as the base model. The official fine-tuning (CogVideo
``finetune/``, https://github.com/THUDM/CogVideo) adapts the attention projections ``to_q, to_k, to_v, to_out.0`` of
every block with ``r = 128, alpha = 64`` and keeps ``A, B`` in float32 while the frozen model runs in bfloat16.

The adapter plugs into :class:`cogvideox.lora.LoraLinear` (the layer that runs inference adapters), so a model
being trained also works with ``fuse_lora``, ``set_adapters``, ``load_lora`` of other adapters, offload and
``torch.compile``. :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` with the keys
``transformer.<layer>.lora_A.weight`` / ``lora_B.weight`` and diffusers' ``lora_adapter_metadata`` (the peft
``LoraConfig`` fields, prefixed ``transformer.``, carrying ``r`` and ``lora_alpha``), which both
``Pipeline.load_lora`` and diffusers' ``load_lora_weights`` read with scale ``alpha / r``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..lora import LoraLinear, lora_layers
from ..lora.adapters import set_child
from ..lora.formats import LORA_WEIGHT_NAME, METADATA_KEY

logger = logging.getLogger(__name__)

# CogVideo finetune/schemas/args.py defaults.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_RANK = 128
DEFAULT_ALPHA = 64


class TrainableLoraAdapter(nn.Module):
    """One trainable adapter of one layer: parameters ``lora_A [r, in]`` and ``lora_B [out, r]``.

    It offers what :class:`~cogvideox.lora.LoraLinear` runs (``down``, ``up`` with the scale folded in,
    ``weight``, ``delta_weight``), computed from the parameters on each call so gradients reach them. The
    parameters keep their own dtype (float32 by default); ``down`` and ``up`` are cast to the dtype of the
    layer's input, tracked by an empty buffer that follows ``module.to(dtype)`` like the base weights do.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        # peft LoraLayer.reset_lora_parameters: kaiming_uniform_(a=sqrt(5)) for A, zeros for B.
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.register_buffer("_compute", torch.empty(0, dtype=compute_dtype, device=device), persistent=False)
        self.weight: float | None = 1.0  # the adapter weight LoraLinear applies (set_adapters)

    @property
    def down(self) -> torch.Tensor:
        """``[r, in]`` in the compute dtype."""
        return self.lora_A.to(self._compute.dtype)

    @property
    def up(self) -> torch.Tensor:
        """``[out, r]`` times ``alpha / r``, in the compute dtype."""
        return (self.lora_B * self.scale).to(self._compute.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``[out, in]`` float32: ``(alpha / r) B A``."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}"


def _matches(path: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the module path is the name or ends with ``.name``."""
    return any(path == t or path.endswith("." + t) for t in targets)


def _targets(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Paths of the linear layers (plain, fp8, or already wrapped in LoraLinear) that ``target_modules`` name."""
    found = []
    for path, module in model.named_modules():
        if not _matches(path, target_modules):
            continue
        if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
            raise ValueError(
                f"target module {path} is a {type(module).__name__}; LoRA adapts linear layers only: name linear "
                "layers such as to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2"
            )
        found.append(path)
    return found


def inject_lora(
    model: nn.Module,
    *,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    freeze: bool = True,
) -> list[str]:
    """Add a trainable LoRA adapter to every linear layer of ``model`` named in ``target_modules``.

    Args:
        model: a :class:`~cogvideox.Transformer` (or any module with linear layers), not wrapped in DDP yet.
        rank, alpha: the adapter rank and ``lora_alpha`` (scale ``alpha / rank``); official 128 and 64.
        target_modules: layer names matched against the end of each module path (peft's rule), e.g.
            ``"to_q"`` matches ``transformer_blocks.3.attn1.to_q``.
        adapter_name: the name the adapter gets in the model (a model can also hold inference adapters).
        dtype: the parameters' dtype (float32 keeps small updates that bfloat16 would round away).
        generator: for the initialisation of ``A``.
        freeze: make every other parameter of ``model`` non-trainable (``requires_grad=False``).
    Returns:
        The adapted layer paths.
    Raises:
        ValueError: no layer matches, a matched layer is not linear, q/k/v are fused, or the name is taken.
    """
    if rank < 1:
        raise ValueError(f"rank={rank}: must be a positive integer")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    fused = [name for name, m in model.named_modules() if getattr(m, "to_qkv", None) is not None]
    if fused and any(t in ("to_q", "to_k", "to_v") for t in target_modules):
        raise ValueError(
            f"{fused[0]} has fused q/k/v projections: call transformer.unfuse_qkv_projections() before training "
            "LoRA on to_q/to_k/to_v (the saved adapter must use the published layer names)"
        )
    paths = _targets(model, target_modules)
    if not paths:
        raise ValueError(
            f"target_modules {list(target_modules)} match no linear layer of this model: use names such as "
            f"{list(DEFAULT_TARGET_MODULES)}, ff.net.0.proj, ff.net.2"
        )
    taken = [p for p in paths if isinstance(model.get_submodule(p), LoraLinear)
             and adapter_name in model.get_submodule(p).adapters]  # fmt: skip
    if taken:
        raise ValueError(f"{taken[0]} already has an adapter named {adapter_name!r}: pass another adapter_name")
    if freeze:
        model.requires_grad_(False)
    for path in paths:
        layer = model.get_submodule(path)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            set_child(model, path, layer)
        if layer.is_fused:
            raise RuntimeError(f"{path}: LoRA is fused into the weights; call unfuse_lora() before training")
        weight = layer.base.weight
        # The layer computes in its weight's dtype; an fp8-stored layer computes in the model's dtype.
        compute = weight.dtype if weight.element_size() > 1 else getattr(model, "dtype", torch.float32)
        layer.adapters[adapter_name] = TrainableLoraAdapter(
            layer.in_features, layer.out_features, rank, alpha,
            dtype=dtype, compute_dtype=compute, device=weight.device, generator=generator,
        )  # fmt: skip
    trainable = sum(p.numel() for p in lora_parameters(model, adapter_name))
    logger.info("LoRA %r: rank %d, alpha %g on %d layers, %d trainable parameters",
                adapter_name, rank, alpha, len(paths), trainable)  # fmt: skip
    return paths


def trainable_adapters(model: nn.Module, adapter_name: str = "default") -> dict[str, TrainableLoraAdapter]:
    """Layer path -> the trainable adapter ``adapter_name`` of that layer."""
    found = {}
    for path, layer in lora_layers(model).items():
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, TrainableLoraAdapter):
            found[path] = adapter
    return found


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The ``lora_A`` and ``lora_B`` parameters of the adapter ``adapter_name``, in module order."""
    return [p for adapter in trainable_adapters(model, adapter_name).values() for p in (adapter.lora_A, adapter.lora_B)]


def lora_state_dict(
    model: nn.Module, adapter_name: str = "default", *, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's tensors under diffusers' keys and its peft config (for the metadata).

    Returns:
        ``({"transformer.<layer>.lora_A.weight": [r, in], "...lora_B.weight": [out, r], ...}, config)`` with
        CPU tensors in ``dtype`` (default: the parameters' dtype).
    """
    model = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    adapters = trainable_adapters(model, adapter_name)
    if not adapters:
        raise ValueError(f"the model has no trainable LoRA adapter named {adapter_name!r}: call inject_lora() first")
    tensors = {}
    for path, adapter in adapters.items():
        for side, tensor in (("A", adapter.lora_A), ("B", adapter.lora_B)):
            value = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
            tensors[f"transformer.{path}.lora_{side}.weight"] = value
    ranks = {a.rank for a in adapters.values()}
    alphas = {a.alpha for a in adapters.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"adapter {adapter_name!r} mixes ranks {sorted(ranks)} / alphas {sorted(alphas)}")
    leaves = sorted({_leaf(path) for path in adapters})
    # The fields of peft's LoraConfig that decide the scale, as diffusers' trainers write them (to_dict()).
    config = {
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "target_modules": leaves,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return tensors, config


def _leaf(path: str) -> str:
    """``transformer_blocks.0.attn1.to_out.0`` -> ``to_out.0``; ``...attn1.to_q`` -> ``to_q``."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def save_lora(
    model: nn.Module,
    folder: str | Path,
    adapter_name: str = "default",
    *,
    dtype: torch.dtype | None = None,
    weight_name: str = LORA_WEIGHT_NAME,
) -> Path:
    """Write the adapter as ``folder/pytorch_lora_weights.safetensors`` (diffusers/peft layout + metadata).

    The file is written to a temporary name in ``folder`` and renamed (``cogvideox.atomic.atomic_path``), so a
    reader never sees half a file; it gets the user's usual permissions (umask), like any file they write.
    Call it on one process only (the trainer does it on rank 0).

    Returns:
        The file's path; ``Pipeline.load_lora(folder)`` or ``cogvideox.lora.load_lora(transformer, path)``
        reads it back.
    """
    from safetensors.torch import save_file

    tensors, config = lora_state_dict(model, adapter_name, dtype=dtype)
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                          indent=2, sort_keys=True)}  # fmt: skip
    target = Path(folder) / weight_name
    with atomic_path(target) as temporary:  # atomic_path also undoes save_file's private 0600 mode
        save_file(tensors, str(temporary), metadata=metadata)
    logger.info("saved LoRA %r (%d tensors) to %s", adapter_name, len(tensors), target)
    return target


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_RANK",
    "DEFAULT_TARGET_MODULES",
    "TrainableLoraAdapter",
    "inject_lora",
    "lora_parameters",
    "lora_state_dict",
    "save_lora",
    "trainable_adapters",
]
