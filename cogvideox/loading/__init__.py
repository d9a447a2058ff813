"""Loading the published checkpoints: file discovery, strict meta-device loading, hub folders."""

from .build import WeightLoadingError, build_on_meta, load_weights
from .files import find_weight_files, iter_tensors
from .hub import component_folder, is_hub_id, resolve_pretrained
from .sat import convert_sat, load_sat_transformer, read_sat_checkpoint, sat_transformer_state_dict, sat_vae_state_dict

__all__ = [
    "WeightLoadingError",
    "build_on_meta",
    "component_folder",
    "convert_sat",
    "find_weight_files",
    "is_hub_id",
    "iter_tensors",
    "load_sat_transformer",
    "load_weights",
    "read_sat_checkpoint",
    "resolve_pretrained",
    "sat_transformer_state_dict",
    "sat_vae_state_dict",
]
