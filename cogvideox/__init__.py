"""CogVideoX in plain PyTorch: text-, image- and video-to-video with the published checkpoints.

Importing this package does no work: it only binds the public names.
"""

from .io import load_image, load_video, save_video
from .ops import set_attention_backend
from .pipeline import Pipeline, PipelineOutput
from .samplers import DDIMSampler, DPMSampler, make_sampler
from .text import T5Encoder, T5Tokenizer
from .transformer import Transformer
from .vae import VAE

__version__ = "0.1.0.dev0"

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
]
