"""A CogVideoX-5B checkpoint at the real width with random weights, and the sizes and measures the GPU suite uses.

The transformer is the published CogVideoX-5b config (3072 wide: 48 heads of 64, text width 4096, 16 latent
channels) with 2 of its 42 blocks: the kernels, the memory per block and the bf16 rounding are the real model's,
at ~0.56 GB in bf16 instead of 11. T5 keeps the real width (4096, so that the transformer's text projection is the
published one) with 2 narrow blocks; the VAE is the tiny one of the CPU tests with 16 latent channels. The reference
(diffusers + transformers) builds and saves it in the published layout, in bf16, so that every loader (ours in
bf16, the reference in float32 and bf16) reads the same values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cogvideox.presets import SCHEDULER_5B, TRANSFORMER_CONFIGS
from tests.helpers import randomize_
from tests.tiny_checkpoints import TEXT_LEN, train_spiece

LAYERS = 2
TRANSFORMER = {**TRANSFORMER_CONFIGS["CogVideoX-5b"], "num_layers": LAYERS}
# T5-XXL's width and position buckets; 2 blocks with 2 heads and a narrow feed-forward: ~30 M weights (60 MB in
# bf16), enough to see the text encoder's offload in max_memory_allocated, small enough to build in a second.
T5 = {
    "d_model": TRANSFORMER["text_embed_dim"],
    "d_kv": 64,
    "num_heads": 2,
    "d_ff": 1024,
    "num_layers": 2,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
}
VAE = {
    "block_out_channels": (8, 8, 8, 8),
    "latent_channels": TRANSFORMER["in_channels"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_height": 480,
    "sample_width": 720,
    "scaling_factor": 0.7,
}
PROMPT = "a panda plays a guitar"


def build_checkpoint(root: Path) -> Path:
    """Write the pipeline folder (``model_index.json``, ``transformer/``, ``text_encoder/``, ``vae/``,
    ``scheduler/``, ``tokenizer/``) to ``root``; returns ``root``."""
    import diffusers
    import transformers

    tokenizer_folder = train_spiece(root.parent / f"{root.name}-spiece")
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(tokenizer_folder))
    text_config = transformers.T5Config(
        vocab_size=len(tokenizer), is_encoder_decoder=False, use_cache=False, **T5
    )  # fmt: skip
    text_encoder = transformers.T5EncoderModel(text_config)
    with torch.device("meta"):  # every tensor is randomised below: skip the default init (~5 s for 0.3 B weights)
        transformer = diffusers.CogVideoXTransformer3DModel(**TRANSFORMER)
    assert not list(transformer.buffers()), "a buffer that randomize_ does not write would stay uninitialised"
    transformer.to_empty(device="cpu")
    vae = diffusers.AutoencoderKLCogVideoX(**VAE)
    scheduler_config = {k: v for k, v in SCHEDULER_5B.items() if not k.startswith("_")}
    scheduler = diffusers.CogVideoXDPMScheduler(**scheduler_config)
    # std ~ 1 / sqrt(width) for the wide models keeps activations near unit size through the blocks (0.1, the CPU
    # tests' value, would make every attention one-hot at width 3072); the 8-channel VAE keeps the CPU tests' 0.1.
    for seed, (module, std) in enumerate(((text_encoder, 0.02), (transformer, 0.02), (vae, 0.1))):
        randomize_(module, seed=seed, std=std).eval()
    with torch.no_grad():
        # A quieter decoder keeps decoded pixels inside [-1, 1], so the clamp to [0, 1] hides no difference.
        vae.decoder.conv_out.conv.weight.mul_(0.2)
    for module in (text_encoder, transformer, vae):
        module.to(torch.bfloat16)  # the published dtype: half the bytes to write and read
    pipe = diffusers.CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(root)
    shutil.rmtree(root / "tokenizer")
    shutil.copytree(tokenizer_folder, root / "tokenizer")  # the published layout: spiece.model
    assert json.loads((root / "transformer" / "config.json").read_text())["num_attention_heads"] == 48
    return root


def call_kwargs(device: torch.device) -> dict:
    """One guided text-to-video call, 2 DPM steps. On CUDA 13 frames of 256x384 (1536 video tokens a step): the
    denoising and decode work then outweighs the text encoder's, so each offload mode's saving shows in the peak.
    On the CPU (dry run) the smallest size the model takes, 9 frames of 32x48."""
    size = {"num_frames": 13, "height": 256, "width": 384} if device.type == "cuda" else {
        "num_frames": 9, "height": 32, "width": 48}  # fmt: skip
    return {"num_inference_steps": 2, "max_sequence_length": TEXT_LEN, "output_type": "pt", **size}


def transformer_inputs(
    device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents ``[2, F, 16, h, w]``, text embeddings ``[2, L, 4096]``, timesteps ``[2]``) for one guided step:
    on CUDA 4 latent frames of 32x48 (1536 video tokens) and the published 226 text tokens; on the CPU 2 frames of
    4x6 and 16 text tokens. Drawn in float32 on the CPU, then cast, so every dtype sees the same values."""
    frames, height, width, text_len = (4, 32, 48, 226) if device.type == "cuda" else (2, 4, 6, TEXT_LEN)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, frames, TRANSFORMER["in_channels"], height, width, generator=gen)
    text = torch.randn(2, text_len, TRANSFORMER["text_embed_dim"], generator=gen)
    timestep = torch.tensor([981.0, 37.5])
    return latents.to(device, dtype), text.to(device, dtype), timestep.to(device)


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| over all elements: the bound for bf16-level noise. It averages over every output,
    so it is steady from run to run where the max-based ``rel_err`` of the CPU parity tests follows one element."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()
