"""Tiny random CogVideoX checkpoints written by the reference (diffusers + transformers) in the published layout.

Every parameter is randomised. The tokenizer folder is replaced by the published layout (``spiece.model`` +
``tokenizer_config.json``), trained here with sentencepiece in about a second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.helpers import randomize_, train_t5_spiece

TEXT_LEN = 16  # max_sequence_length of the tiny pipelines (226 for the published ones)
LATENT_H, LATENT_W = 4, 6  # the tiny transformers' training size: 32x48 pixels
CORPUS = [
    "a red circle moves to the right across a black background",
    "a steam train crosses a stone viaduct at dawn with mist in the valley",
    "a panda in a red jacket plays a small guitar in a bamboo forest",
    "waves roll onto a sandy beach under a purple evening sky",
    "the camera pans over a neon city street at night in the rain",
]

VARIANTS = {
    "2b": {"transformer": {}, "scheduler": "CogVideoXDDIMScheduler", "vae": {"scaling_factor": 1.15258426}},
    "5b": {
        "transformer": {"use_rotary_positional_embeddings": True},
        "scheduler": "CogVideoXDPMScheduler",
        "vae": {"scaling_factor": 0.7},
    },
    "5b-i2v": {
        "transformer": {
            "use_rotary_positional_embeddings": True,
            "use_learned_positional_embeddings": True,
            "in_channels": 8,
        },
        "scheduler": "CogVideoXDDIMScheduler",
        "vae": {"scaling_factor": 0.7},
        "i2v": True,
    },
    # CogVideoX-Fun control (alibaba-pai): noise + control-video latents; the reference pipeline runs DDIM only.
    "5b-control": {
        "transformer": {"use_rotary_positional_embeddings": True, "in_channels": 8},
        "scheduler": "CogVideoXDDIMScheduler",
        "vae": {"scaling_factor": 0.7},
        "control": True,
    },
    "1.5": {
        "transformer": {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False},
        "scheduler": "CogVideoXDPMScheduler",
        "vae": {"scaling_factor": 0.7, "invert_scale_latents": True},
    },
    "1.5-i2v": {
        "transformer": {
            "use_rotary_positional_embeddings": True,
            "patch_size_t": 2,
            "patch_bias": False,
            "in_channels": 8,
            "ofs_embed_dim": 8,
        },
        "scheduler": "CogVideoXDDIMScheduler",
        "vae": {"scaling_factor": 0.7, "invert_scale_latents": True},
        "i2v": True,
    },
}


def train_spiece(folder: Path) -> Path:
    """The tiny pipelines' ``tokenizer/`` folder (no sentinels, ``model_max_length`` = TEXT_LEN)."""
    return train_t5_spiece(folder, CORPUS * 40, vocab_size=120, model_max_length=TEXT_LEN)


def reference_pipeline(variant: str, root: Path, seed: int = 0, transformer_overrides: dict | None = None):
    """Build the diffusers pipeline of ``variant`` at a tiny size, save it to ``root`` in the published layout,
    and return it (float32, CPU, eval). ``transformer_overrides``: config keys changed for one test."""
    import diffusers
    import transformers

    spec = VARIANTS[variant]
    tokenizer_folder = train_spiece(root.parent / f"{root.name}-spiece")
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(tokenizer_folder))
    text_config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    text_encoder = transformers.T5EncoderModel(text_config)
    transformer_config = {
        "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "text_embed_dim": 16,
        "time_embed_dim": 8, "in_channels": 4, "out_channels": 4, "sample_height": LATENT_H,
        "sample_width": LATENT_W, "sample_frames": 17 if "patch_size_t" in spec["transformer"] else 9,
        "max_text_seq_length": TEXT_LEN, **spec["transformer"], **(transformer_overrides or {}),
    }  # fmt: skip
    transformer = diffusers.CogVideoXTransformer3DModel(**transformer_config)
    vae = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
        norm_eps=1e-4, sample_height=32, sample_width=48, **spec["vae"],
    )  # fmt: skip
    scheduler_class = getattr(diffusers, spec["scheduler"])
    scheduler = scheduler_class(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing", snr_shift_scale=3.0 if variant == "2b" else 1.0,
    )  # fmt: skip
    for offset, module in enumerate((text_encoder, transformer, vae)):
        randomize_(module, seed=seed + offset, std=0.1).eval()
    # A quieter decoder keeps decoded pixels inside [-1, 1], so clamping hides no difference.
    with torch.no_grad():
        vae.decoder.conv_out.conv.weight.mul_(0.2)
    pipeline_class = diffusers.CogVideoXPipeline
    if spec.get("i2v"):
        pipeline_class = diffusers.CogVideoXImageToVideoPipeline
    elif spec.get("control"):
        pipeline_class = diffusers.CogVideoXFunControlPipeline
    pipe = pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root)
    shutil.rmtree(root / "tokenizer")
    shutil.copytree(tokenizer_folder, root / "tokenizer")  # the published layout: spiece.model
    return pipe
