"""CogVideoX in plain PyTorch: text-, image- and video-to-video with the published checkpoints.

Importing this package does no work: it only binds the public names. They are bound lazily (module
``__getattr__``), so that ``cogvideox --help`` answers before torch is imported; ``from cogvideox import Pipeline``
works as with eager imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from .display import show
    from .io import load_image, load_video, save_video
    from .ops import set_attention_backend
    from .pipeline import Pipeline, PipelineOutput
    from .samplers import DDIMSampler, DPMSampler, make_sampler
    from .text import T5Encoder, T5Tokenizer
    from .transformer import Transformer
    from .vae import VAE

__version__ = "0.1.0.dev0"

# Public name -> the submodule that defines it (imported on first access).
_SOURCES = {
    "Pipeline": ".pipeline",
    "PipelineOutput": ".pipeline",
    "load_image": ".io",
    "load_video": ".io",
    "save_video": ".io",
    "show": ".display",
    "DDIMSampler": ".samplers",
    "DPMSampler": ".samplers",
    "T5Encoder": ".text",
    "T5Tokenizer": ".text",
    "Transformer": ".transformer",
    "VAE": ".vae",
    "make_sampler": ".samplers",
    "set_attention_backend": ".ops",
}

__all__ = [
    "Pipeline",
    "PipelineOutput",
    "load_image",
    "load_video",
    "save_video",
    "DDIMSampler",
    "DPMSampler",
    "T5Encoder",
    "T5Tokenizer",
    "Transformer",
    "VAE",
    "make_sampler",
    "set_attention_backend",
    "show",
]


def __getattr__(name: str):
    source = _SOURCES.get(name)
    if source is None:
        # An AttributeError (not an ImportError) lets ``from cogvideox import cli`` fall back to the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source, __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
