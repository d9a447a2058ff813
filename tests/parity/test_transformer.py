"""Transformer parity with diffusers' CogVideoXTransformer3DModel for all five variants.

The reference builds a tiny model with every parameter randomised and saves it in the published layout (single
file and sharded); our Transformer loads the files; both run the same inputs in float32 on the CPU. The reference
gets its rotary tables exactly as its pipelines compute them.
"""

from __future__ import annotations

import types

import pytest
import torch

from cogvideox import Transformer
from tests.helpers import TINY_TRANSFORMER, randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel  # noqa: E402

TEXT_DIM, TEXT_LEN = 12, 7
BASE = TINY_TRANSFORMER
ROPE = {"use_rotary_positional_embeddings": True}
V15 = {**ROPE, "patch_size_t": 2, "patch_bias": False, "sample_height": 12, "sample_width": 16, "sample_frames": 17}
VARIANTS = {
    "2b": {},
    "5b": ROPE,
    "5b-i2v": {**ROPE, "use_learned_positional_embeddings": True, "in_channels": 8},
    "1.5": V15,
    "1.5-i2v": {**V15, "in_channels": 8, "ofs_embed_dim": 24},
}
# (latent frames, latent height, latent width): the training size, other sizes, non-square ones.
SIZES = {
    "2b": [(3, 6, 10), (2, 8, 8), (5, 4, 12)],
    "5b": [(3, 6, 10), (2, 8, 8), (5, 4, 12), (1, 10, 4)],
    "5b-i2v": [(3, 6, 10)],
    "1.5": [(4, 12, 16), (2, 8, 8), (6, 4, 12), (2, 12, 6)],
    "1.5-i2v": [(4, 12, 16), (2, 10, 6)],
}


def reference_rotary(ref: CogVideoXTransformer3DModel, frames: int, height: int, width: int):
    """The rotary tables exactly as the reference pipeline prepares them (pixel sizes are latent sizes x 8)."""
    if not ref.config.use_rotary_positional_embeddings:
        return None
    fake_pipe = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake_pipe, height * 8, width * 8, frames, torch.device("cpu")
    )


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**{**BASE, **VARIANTS[name]})
    randomize_(ref, seed=list(VARIANTS).index(name), std=0.1).eval()
    folder = tmp_path_factory.mktemp(name.replace(".", "_"))
    # Sharded on purpose: tiny shards exercise the index path the 5B checkpoints use.
    ref.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 1, "the test meant to write a sharded checkpoint"
    return name, ref, Transformer.from_pretrained(folder)


def run_both(ref, ours, frames, height, width, text_len=TEXT_LEN, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = ref.config.in_channels
    latents = torch.randn(2, frames, channels, height, width, generator=gen)
    text = torch.randn(2, text_len, TEXT_DIM, generator=gen)
    timestep = torch.tensor([981.0, 37.5])
    extra = {"ofs": torch.tensor([2.0, 2.0])} if ref.config.ofs_embed_dim else {}
    with torch.no_grad():
        expected = ref(
            latents, text, timestep, image_rotary_emb=reference_rotary(ref, frames, height, width), **extra
        ).sample
        actual = ours(latents, text, timestep, **extra)
    return actual, expected


def test_outputs_match_reference(pair):
    name, ref, ours = pair
    for frames, height, width in SIZES[name]:
        actual, expected = run_both(ref, ours, frames, height, width)
        assert actual.shape == (2, frames, 4, height, width)
        err = rel_err(actual, expected)
        assert err <= 1e-5, f"{name} at {frames}x{height}x{width}: relative error {err:.2e}"


def test_rope_models_take_any_text_length(pair):
    name, ref, ours = pair
    if name not in ("5b", "1.5"):
        pytest.skip("sin-cos and learned tables fix the text length in the reference")
    frames, height, width = SIZES[name][1]
    actual, expected = run_both(ref, ours, frames, height, width, text_len=3)
    assert rel_err(actual, expected) <= 1e-5


def test_single_file_checkpoint_loads_identically(tmp_path):
    ref = randomize_(CogVideoXTransformer3DModel(**BASE, **ROPE), seed=3, std=0.1).eval()
    ref.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    ours = Transformer.from_pretrained(tmp_path)
    actual, expected = run_both(ref, ours, 3, 6, 10)
    assert rel_err(actual, expected) <= 1e-5


def test_learned_positions_fall_back_to_sincos_on_other_frame_counts(pair, caplog):
    """The reference swaps the 5B-I2V's learned table for a sin-cos one when only the frame count differs."""
    name, ref, ours = pair
    if name != "5b-i2v":
        pytest.skip("5B-I2V only")
    actual, expected = run_both(ref, ours, 5, 6, 10)
    assert rel_err(actual, expected) <= 1e-5
    assert "sin-cos positions" in caplog.text
