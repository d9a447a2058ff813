"""LoRA adapters for the transformer: the diffusers/peft and SAT layouts, several at once, fused or not."""

from .adapters import fuse_lora, load_lora, loaded_adapters, lora_layers, set_adapters, unfuse_lora, unload_lora
from .formats import LoraFile, LoraWeights, lora_file_path, parse_lora, read_state_dict
from .layers import LoraAdapter, LoraLinear

__all__ = [
    "LoraAdapter",
    "LoraFile",
    "LoraLinear",
    "LoraWeights",
    "fuse_lora",
    "load_lora",
    "loaded_adapters",
    "lora_file_path",
    "lora_layers",
    "parse_lora",
    "read_state_dict",
    "set_adapters",
    "unfuse_lora",
    "unload_lora",
]
