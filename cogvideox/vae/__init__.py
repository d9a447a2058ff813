"""The CogVideoX causal 3D VAE: video <-> latents, 4x in time and 8x8 in space."""

from .autoencoder import VAE, frame_chunks
from .posterior import DiagonalGaussian

__all__ = ["VAE", "DiagonalGaussian", "frame_chunks"]
