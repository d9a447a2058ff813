"""Loading the published checkpoints: file discovery, strict meta-device loading, hub folders."""

from .build import WeightLoadingError, build_on_meta, load_weights
from .files import find_weight_files, iter_tensors
from .hub import component_folder, is_hub_id, resolve_pretrained

__all__ = [
    "WeightLoadingError",
    "build_on_meta",
    "component_folder",
    "find_weight_files",
    "is_hub_id",
    "iter_tensors",
    "load_weights",
    "resolve_pretrained",
]
