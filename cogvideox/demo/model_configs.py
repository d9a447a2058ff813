"""The demo model's component configs: the CogVideoX architecture at a width that trains on two CPU cores.

Sizes are those a trial run measured to train in about 20 minutes on two CPU cores: 32x32 pixels and 9 frames,
a 4-level VAE with 8 latent channels (latents 8 x 3 x 4 x 4), a 6-layer transformer of 4 heads x 32 with 3D RoPE
and patch size 1 (48 video tokens), a 2-layer T5 of width 64 and 12 text tokens. The scheduler is the 5B's
(v-prediction, zero terminal SNR, no SNR shift), sampled with DDIM.
"""

from __future__ import annotations

from ..configs import SchedulerConfig, T5Config, TransformerConfig, VAEConfig
from ..presets import SCHEDULER_5B
from . import data

TEXT_LENGTH = 12  # "a yellow square moves to the right" is 7 word tokens + </s>

VAE = VAEConfig(
    block_out_channels=(16, 32, 32, 32),
    latent_channels=8,
    layers_per_block=1,
    norm_num_groups=8,
    sample_height=data.SIZE,
    sample_width=data.SIZE,
    scaling_factor=1.0,  # replaced by 1 / std of the trained VAE's latents (about 1/1.42), or decoding is mis-scaled
)

LATENT = data.SIZE // VAE.spatial_compression_ratio  # 4


def text_encoder(vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
    )  # fmt: skip


TRANSFORMER = TransformerConfig(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=VAE.latent_channels,
    out_channels=VAE.latent_channels,
    time_embed_dim=128,
    text_embed_dim=64,
    num_layers=6,
    sample_width=LATENT,
    sample_height=LATENT,
    sample_frames=data.FRAMES,
    patch_size=1,
    max_text_seq_length=TEXT_LENGTH,
    use_rotary_positional_embeddings=True,
)

SCHEDULER = SchedulerConfig(**{k: v for k, v in SCHEDULER_5B.items() if not k.startswith("_")})
