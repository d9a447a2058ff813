"""Loading the published checkpoints: file discovery, strict meta-device loading, hub folders, the dtype check,
``model_index.json``, and the one ``from_pretrained`` body the components share."""

from .build import WeightLoadingError, build_on_meta, load_weights
from .component import load_component
from .dtypes import check_dtype
from .files import find_weight_files, iter_tensors
from .hub import PIPELINE_FILES, component_folder, is_hub_id, resolve_pretrained
from .model_index import PIPELINE_CLASSES, is_control, is_image_to_video, read_model_index
from .sat import convert_sat, load_sat_transformer, read_sat_checkpoint, sat_transformer_state_dict, sat_vae_state_dict

__all__ = [
    "PIPELINE_CLASSES",
    "PIPELINE_FILES",
    "WeightLoadingError",
    "build_on_meta",
    "check_dtype",
    "component_folder",
    "convert_sat",
    "find_weight_files",
    "is_hub_id",
    "is_control",
    "is_image_to_video",
    "iter_tensors",
    "load_component",
    "load_sat_transformer",
    "load_weights",
    "read_model_index",
    "read_sat_checkpoint",
    "resolve_pretrained",
    "sat_transformer_state_dict",
    "sat_vae_state_dict",
]
