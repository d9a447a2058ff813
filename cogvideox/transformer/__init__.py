"""The denoising transformer: patch + text embedding, expert-adaptive blocks with joint 3D attention."""

from .attention import JointAttention
from .block import ExpertAdaLayerNorm, FeedForward, TransformerBlock
from .model import Transformer
from .patch import PatchEmbed

__all__ = ["ExpertAdaLayerNorm", "FeedForward", "JointAttention", "PatchEmbed", "Transformer", "TransformerBlock"]
