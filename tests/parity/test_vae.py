"""Parity of ``cogvideox.VAE`` with diffusers ``AutoencoderKLCogVideoX`` (float32, CPU, tiny random models).

Every parameter of the reference is randomised (std 0.1, norm scales 1 + noise): the decoder's output then stays
around [-3, 3], so nothing is hidden by clipping. The tiny config keeps the published structure (4 levels, time
compressed on the first two, 8x spatial) and sets ``norm_eps`` away from 1e-6 so that the reference's hard-coded
1e-6 epsilons (spatial norms, encoder output norm) are exercised.
"""

from __future__ import annotations

import json

import pytest
import torch

from cogvideox import VAE
from cogvideox.configs import VAEConfig, read_config
from cogvideox.loading import build_on_meta
from tests.helpers import PUBLISHED_VAE_5B as PUBLISHED_5B
from tests.helpers import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
AutoencoderKLCogVideoX = diffusers.AutoencoderKLCogVideoX

TOL = 1e-5
TINY = {
    "block_out_channels": (8, 16, 16, 32),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "norm_eps": 1e-4,
    "sample_height": 64,
    "sample_width": 80,
}
# Tile settings whose geometry is consistent at this tiny scale (the reference's 1/6 and 1/5 are tuned for 240x360
# tiles): 32x40-pixel tiles, 4x5 latents, overlapping 1/4 and 1/5. A 64x80 video spans 3x3 tiles both ways.
TILING = {
    "tile_sample_min_height": 32,
    "tile_sample_min_width": 40,
    "tile_overlap_factor_height": 0.25,
    "tile_overlap_factor_width": 0.2,
}

# The per-model differences from the published 5B VAE config: scaling_factor 1.15258426 for 2B, invert_scale_latents
# for 1.5.
PUBLISHED = {
    "2b": {**PUBLISHED_5B, "scaling_factor": 1.15258426},
    "5b": PUBLISHED_5B,
    "1.5-5b": {**PUBLISHED_5B, "invert_scale_latents": True},
}


@pytest.fixture(scope="module")
def _models(tmp_path_factory):
    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(**TINY).eval()
    randomize_(ref, seed=1, std=0.1)
    folder = tmp_path_factory.mktemp("tiny_vae")
    ref.save_pretrained(folder)
    return ref, VAE.from_pretrained(folder)


@pytest.fixture
def models(_models):
    """The reference and ours, with tiling and slicing switched off again after each test."""
    yield _models
    for model in _models:
        model.disable_tiling()
        model.disable_slicing()


def _video(batch: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=gen) * 2 - 1


def _latents(batch: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TINY["latent_channels"], frames, height, width, generator=gen)


@pytest.mark.parametrize("frames", [1, 5, 9, 13, 17, 25, 49])
@torch.no_grad()
def test_encode_matches_reference(models, frames):
    ref, ours = models
    video = _video(1, frames, 16, 24)
    expected = ref.encode(video).latent_dist
    got = ours.encode(video)
    assert got.mean.shape == (1, 4, (frames - 1) // 4 + 1, 2, 3)
    assert rel_err(got.mode(), expected.mode()) <= TOL
    assert rel_err(got.std, expected.std) <= TOL


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 4, 5, 7, 13])
@torch.no_grad()
def test_decode_matches_reference(models, latent_frames):
    ref, ours = models
    z = _latents(1, latent_frames, 2, 3)
    expected = ref.decode(z).sample
    got = ours.decode(z)
    frames = 4 * latent_frames if latent_frames % 2 == 0 else 4 * (latent_frames - 1) + 1
    assert got.shape == (1, 3, frames, 16, 24)
    # The output must be a real signal of moderate size (not saturated, not constant) for the bound to mean much.
    assert 0.05 < expected.std() and expected.abs().max() < 10
    assert rel_err(got, expected) <= TOL


@torch.no_grad()
def test_sample_draws_like_reference(models):
    ref, ours = models
    video = _video(2, 9, 16, 24, seed=3)
    expected_dist, got_dist = ref.encode(video).latent_dist, ours.encode(video)
    gen_ref, gen_ours = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    assert rel_err(got_dist.sample(gen_ours), expected_dist.sample(gen_ref)) <= TOL
    # Same consumption of the generator: the next draws agree exactly.
    assert torch.equal(torch.rand(4, generator=gen_ours), torch.rand(4, generator=gen_ref))
    # One generator per batch element, as the pipelines pass them.
    gens_ref = [torch.Generator().manual_seed(s) for s in (1, 2)]
    gens_ours = [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert rel_err(got_dist.sample(gens_ours), expected_dist.sample(gens_ref)) <= TOL


def _tiles_along(size: int, stride: int) -> int:
    return len(range(0, size, stride))


@torch.no_grad()
def test_tiled_encode_matches_reference(models):
    ref, ours = models
    for model in models:
        model.enable_tiling(**TILING)
    video = _video(1, 17, 64, 80, seed=5)  # 17 frames: two chunks per tile, so the cache crosses chunks in tiles
    assert _tiles_along(64, int(32 * 0.75)) >= 3 and _tiles_along(80, int(40 * 0.8)) >= 3
    expected = ref.encode(video).latent_dist
    got = ours.encode(video)
    assert got.mean.shape == (1, 4, 5, 8, 10)
    assert rel_err(got.mode(), expected.mode()) <= TOL
    assert rel_err(got.std, expected.std) <= TOL
    # Tiling really happened: the untiled encoding differs.
    ours.disable_tiling()
    assert rel_err(ours.encode(video).mode(), expected.mode()) > 1e-3


@torch.no_grad()
def test_tiled_decode_matches_reference(models):
    ref, ours = models
    for model in models:
        model.enable_tiling(**TILING)
    z = _latents(1, 5, 8, 10, seed=6)  # 5 latent frames: a 3-frame first chunk, then a 2-frame chunk, per tile
    assert _tiles_along(8, int(4 * 0.75)) >= 3 and _tiles_along(10, int(5 * 0.8)) >= 3
    expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (1, 3, 17, 64, 80)
    assert rel_err(got, expected) <= TOL
    ours.disable_tiling()
    assert rel_err(ours.decode(z), expected) > 1e-3


@torch.no_grad()
def test_sliced_decode_and_encode_batch_of_two(models):
    ref, ours = models
    z = _latents(2, 3, 2, 3, seed=7)
    video = _video(2, 9, 16, 24, seed=8)
    unsliced_decode, unsliced_encode = ours.decode(z), ours.encode(video).mode()
    for model in models:
        model.enable_slicing()
    expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 9, 16, 24)
    assert rel_err(got, expected) <= TOL
    assert rel_err(got, unsliced_decode) <= TOL
    assert rel_err(ours.encode(video).mode(), ref.encode(video).latent_dist.mode()) <= TOL
    assert rel_err(ours.encode(video).mode(), unsliced_encode) <= TOL


@torch.no_grad()
def test_tiled_and_sliced_together(models):
    ref, ours = models
    for model in models:
        model.enable_tiling(**TILING)
        model.enable_slicing()
    z = _latents(2, 3, 8, 10, seed=9)
    assert rel_err(ours.decode(z), ref.decode(z).sample) <= TOL


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_published_config_builds_reference_layout_on_meta(tmp_path, variant):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[variant]))
    config = read_config(tmp_path, VAEConfig)
    ours = build_on_meta(lambda: VAE(config))
    with torch.device("meta"):
        ref = AutoencoderKLCogVideoX.from_config(AutoencoderKLCogVideoX.load_config(tmp_path))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 215_583_907
    assert ours.scaling_factor == ref.config.scaling_factor
    assert ours.invert_scale_latents == ref.config.invert_scale_latents == (variant == "1.5-5b")
    assert (ours.tile_latent_min_height, ours.tile_latent_min_width) == (
        ref.tile_latent_min_height,
        ref.tile_latent_min_width,
    )
