"""Patch embedding of video latents and projection of text embeddings into the transformer's width.

Video latents ``[B, F, C, H, W]`` become ``F/pt * H/p * W/p`` tokens in (t, h, w) order, each the flattened
``(c, pt, ph, pw)`` patch projected to ``D`` channels:

- CogVideoX 1.0 stores the projection as ``Conv2d(C, D, kernel=p, stride=p)`` applied frame by frame
  (``pt = 1``); a stride-``p`` convolution is exactly a linear map of the flattened patch, which is how we run it.
- CogVideoX 1.5 stores ``Linear(C*pt*p*p, D)`` (``patch_size_t = 2``); it always has a bias, whatever
  ``patch_bias`` says (the reference ignores the flag there, and the checkpoints carry the bias).

Text embeddings ``[B, L, D_text]`` go through ``text_proj``. Positional information is added by the model
(sin-cos or learned tables) or applied inside attention (RoPE); this module only embeds.

The 1.0 convolution runs as ``F.linear`` on its flattened weight whatever kernel the linear layers use
(:func:`~cogvideox.ops.linear.use_onednn_linear_` changes ``nn.Linear`` layers only): with 64 or 128 inputs per
patch it is under 0.2 % of the multiply-adds of a step even at 2 layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..configs import TransformerConfig
from ..ops.linear import onednn_linear


class PatchEmbed(nn.Module):
    """Keys: ``proj.{weight,bias}``, ``text_proj.{weight,bias}``, and ``pos_embedding`` for learned positions."""

    def __init__(self, config: TransformerConfig, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dim, p, pt = config.inner_dim, config.patch_size, config.patch_size_t
        self.patch_size = p
        self.patch_size_t = pt or 1
        if pt is None:
            self.proj = nn.Conv2d(
                config.in_channels, dim, kernel_size=p, stride=p, bias=config.patch_bias, device=device, dtype=dtype
            )
        else:
            self.proj = nn.Linear(config.in_channels * pt * p * p, dim, device=device, dtype=dtype)
        self.text_proj = nn.Linear(config.text_embed_dim, dim, device=device, dtype=dtype)
        self.onednn_linear = False  # the 1.0 convolution's product: see ops.use_onednn_linear_
        if config.use_learned_positional_embeddings:
            # Covers exactly [text tokens; video tokens] of the training size (5B-I2V: 226 + 13*30*45).
            frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
            tokens = frames * (config.sample_height // p) * (config.sample_width // p)
            self.pos_embedding = nn.Parameter(
                torch.zeros(1, config.max_text_seq_length + tokens, dim, device=device, dtype=dtype)
            )
        else:
            self.pos_embedding = None

    def embed_video(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, F, C, H, W]`` -> ``[B, F/pt * H/p * W/p, D]``."""
        patches = rearrange(
            latents,
            "b (f pt) c (h ph) (w pw) -> b (f h w) (c pt ph pw)",
            pt=self.patch_size_t,
            ph=self.patch_size,
            pw=self.patch_size,
        )
        if isinstance(self.proj, nn.Conv2d):
            product = onednn_linear if self.onednn_linear else F.linear  # set by ops.use_onednn_linear_
            return product(patches, self.proj.weight.flatten(1), self.proj.bias)
        return self.proj(patches)  # the layer's own forward: whatever linear kernel the model was given

    def embed_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """``[B, L, D_text]`` -> ``[B, L, D]``."""
        return self.text_proj(text_embeds)
