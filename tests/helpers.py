"""Shared test helpers: randomised reference models and error measures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

# A tiny transformer config (2 heads of 16, 2 layers, 6x10 latents, 7 text tokens) shared by the transformer tests.
TINY_TRANSFORMER = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "text_embed_dim": 12,
    "time_embed_dim": 24,
    "in_channels": 4,
    "out_channels": 4,
    "sample_height": 6,
    "sample_width": 10,
    "sample_frames": 9,  # 3 latent frames
    "max_text_seq_length": 7,
}


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Give every saved tensor (parameters and persistent buffers) random values: zero- or one-initialised
    layers hide bugs. Non-persistent buffers are computed tables (positions) and are left alone.

    Weights get N(0, std); norm scales get 1 + N(0, std) so activations keep a sane size.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std
        leaf = name.rsplit(".", 1)[-1]
        is_scale = leaf == "weight" and tensor.ndim == 1 and "norm" in name.lower()
        tensor.copy_((1.0 + noise) if is_scale else noise)
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the relative error the parity bounds are stated in."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def train_t5_spiece(
    folder: Path,
    corpus: list[str],
    *,
    vocab_size: int,
    extra_ids: int = 0,
    model_max_length: int = 226,
    user_defined_symbols: tuple[str, ...] = (),
) -> Path:
    """Write a T5-layout ``tokenizer/`` folder: a sentencepiece Unigram ``spiece.model`` (``<pad>``=0, ``</s>``=1,
    ``<unk>``=2, no ``<s>``) trained on ``corpus`` in about a second, and its ``tokenizer_config.json``."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(folder / "spiece"),
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        user_defined_symbols=list(user_defined_symbols),
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    config = {"extra_ids": extra_ids, "model_max_length": model_max_length}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# vae/config.json as published (CogVideoX-5b; kijai/ComfyUI-CogVideoXWrapper configs/vae_config.json).
PUBLISHED_VAE_5B = {
    "_class_name": "AutoencoderKLCogVideoX",
    "_diffusers_version": "0.31.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512],
    "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 3,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_height": 480,
    "sample_width": 720,
    "scaling_factor": 0.7,
    "shift_factor": None,
    "temporal_compression_ratio": 4,
    "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
