"""The published ``transformer/config.json`` contents of the five CogVideoX models, and the two published
``scheduler/scheduler_config.json`` variants (as mirrored in kijai/ComfyUI-CogVideoXWrapper ``configs/`` and written
by diffusers' ``scripts/convert_cogvideox_to_diffusers.py``).

Used to build real-size models without weights (tests on the meta device, benchmarks with random weights).
The library itself never limits sizes by these values: limits come from a checkpoint's own config.
"""

from __future__ import annotations

from .configs import TransformerConfig, config_from_dict

_COMMON = {
    "attention_head_dim": 64,
    "out_channels": 16,
    "time_embed_dim": 512,
    "text_embed_dim": 4096,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_eps": 1e-5,
    "norm_elementwise_affine": True,
    "timestep_activation_fn": "silu",
    "dropout": 0.0,
}

_5B = {"num_attention_heads": 48, "num_layers": 42}

# 1.5: sample_height/width 300 as written by the diffusers conversion script (a maintainer confirmed 300 in
# huggingface/finetrainers#121); zai-org/CogVideo#758 reports 96/170 (768/8, 1360/8). Position tables do not depend
# on it below the 150x150 patch grid.
_15 = {**_5B, "sample_height": 300, "sample_width": 300, "sample_frames": 81, "patch_size_t": 2, "patch_bias": False}

TRANSFORMER_CONFIGS: dict[str, dict] = {
    "CogVideoX-2b": {
        **_COMMON,
        "num_attention_heads": 30,
        "num_layers": 30,
        "in_channels": 16,
        "sample_height": 60,
        "sample_width": 90,
        "sample_frames": 49,
        "use_rotary_positional_embeddings": False,
    },
    "CogVideoX-5b": {
        **_COMMON,
        **_5B,
        "in_channels": 16,
        "sample_height": 60,
        "sample_width": 90,
        "sample_frames": 49,
        "use_rotary_positional_embeddings": True,
    },
    "CogVideoX-5b-I2V": {
        **_COMMON,
        **_5B,
        "in_channels": 32,
        "sample_height": 60,
        "sample_width": 90,
        "sample_frames": 49,
        "use_rotary_positional_embeddings": True,
        "use_learned_positional_embeddings": True,
    },
    "CogVideoX1.5-5B": {
        **_COMMON,
        **_15,
        "in_channels": 16,
        "use_rotary_positional_embeddings": True,
        "use_learned_positional_embeddings": False,
    },
    "CogVideoX1.5-5B-I2V": {
        **_COMMON,
        **_15,
        "in_channels": 32,
        "ofs_embed_dim": 512,
        "use_rotary_positional_embeddings": True,
        "use_learned_positional_embeddings": False,
    },
}


def transformer_config(name: str) -> TransformerConfig:
    """The published transformer config of ``name`` (a key of :data:`TRANSFORMER_CONFIGS`)."""
    if name not in TRANSFORMER_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(TRANSFORMER_CONFIGS)}")
    return config_from_dict(TransformerConfig, TRANSFORMER_CONFIGS[name], source=name)


# scheduler/scheduler_config.json: CogVideoX-2B shifts the SNR by 3.0; the 5B models (and 1.5, per SAT) by 1.0.
SCHEDULER_2B: dict = {
    "_class_name": "CogVideoXDDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "snr_shift_scale": 3.0,
}
SCHEDULER_5B: dict = {**SCHEDULER_2B, "snr_shift_scale": 1.0}

# text_encoder/config.json of every published model: google/t5-v1_1-xxl's encoder (4.76 B parameters).
T5_XXL: dict = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
}
