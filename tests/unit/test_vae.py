"""Unit tests of ``cogvideox.VAE`` and its parts: causal cache, frame chunks, tiling geometry, errors, dtypes."""

from __future__ import annotations

import json

import pytest
import torch

from cogvideox import VAE
from cogvideox.configs import VAEConfig, config_from_dict
from cogvideox.vae import DiagonalGaussian, frame_chunks
from cogvideox.vae.conv import CausalConv3d, conv3d_in_time_chunks
from cogvideox.vae.tiling import TileGrid, run_tiled
from tests.helpers import randomize_, rel_err

TINY = VAEConfig(
    block_out_channels=(8, 16, 16, 32),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_height=64,
    sample_width=80,
)


@pytest.fixture(scope="module")
def vae() -> VAE:
    torch.manual_seed(0)
    return randomize_(VAE(TINY), seed=2, std=0.1).eval()


# ------------------------------------------------------------------------------------------------ causal cache
@pytest.mark.parametrize("chunks", [[1, 8], [3, 2, 2, 2], [9, 8, 8]])
def test_causal_conv_in_chunks_equals_one_pass(chunks):
    conv = randomize_(CausalConv3d(4, 6, kernel_size=3), seed=0, std=0.2)
    x = torch.randn(1, 4, sum(chunks), 5, 7)
    whole, _ = conv(x)
    past, outs, start = None, [], 0
    for n in chunks:
        out, past = conv(x[:, :, start : start + n], past)
        outs.append(out)
        start += n
    assert past.shape == (1, 4, 2, 5, 7)
    assert rel_err(torch.cat(outs, dim=2), whole) <= 1e-6


def test_causal_conv_first_frame_depends_only_on_itself():
    conv = randomize_(CausalConv3d(2, 2, kernel_size=3), seed=0, std=0.2)
    x = torch.randn(1, 2, 4, 6, 6)
    y = x.clone()
    y[:, :, 1:] = torch.randn_like(y[:, :, 1:])
    assert torch.equal(conv(x)[0][:, :, 0], conv(y)[0][:, :, 0])


@pytest.mark.parametrize("kernel", [1, 3])
def test_time_chunked_convolution_equals_plain(kernel):
    conv = randomize_(torch.nn.Conv3d(3, 5, kernel, padding=(0, kernel // 2, kernel // 2)), seed=0, std=0.2)
    x = torch.randn(2, 3, 11, 6, 5)
    # A tiny element limit forces the split into several pieces, as 2**30 elements do at full size.
    assert rel_err(conv3d_in_time_chunks(conv, x, max_elements=x.numel() // 3), conv(x)) <= 1e-6


@torch.no_grad()
def test_decoder_consumes_the_cache_it_is_given(vae):
    def tensors(cache):
        return sum(tensors(v) for v in cache.values()) if isinstance(cache, dict) else int(cache is not None)

    z = torch.randn(1, 4, 5, 2, 3)
    _, cache = vae.decoder(z[:, :, :3])
    # conv_in + 2 convs per ResNet (2 in the mid block, 2 per up level x 4 levels) + conv_out
    assert tensors(cache) == 1 + 2 * (2 + 2 * 4) + 1
    _, new_cache = vae.decoder(z[:, :, 3:], cache)
    assert tensors(cache) == 0 and tensors(new_cache) > 0


@torch.no_grad()
def test_repeated_calls_give_identical_results(vae):
    """No state survives a call: the cache lives only inside encode/decode."""
    z = torch.randn(1, 4, 5, 2, 3)
    first = vae.decode(z)
    assert torch.equal(vae.decode(z), first)
    assert list(vae.buffers()) == []


# ------------------------------------------------------------------------------------------------ frame chunks
@pytest.mark.parametrize(
    ("frames", "per_chunk", "expected"),
    [
        (1, 8, [(0, 1)]),
        (5, 8, [(0, 5)]),
        (9, 8, [(0, 9)]),
        (13, 8, [(0, 13)]),
        (49, 8, [(0, 9), (9, 17), (17, 25), (25, 33), (33, 41), (41, 49)]),
        (13, 2, [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]),
        (12, 2, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]),
        (2, 2, [(0, 2)]),
    ],
)
def test_frame_chunks_follow_reference(frames, per_chunk, expected):
    assert [(s.start, s.stop) for s in frame_chunks(frames, per_chunk)] == expected


# ------------------------------------------------------------------------------------------------ shapes, grad
@torch.no_grad()
@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (9, 3), (17, 5), (49, 13)])
def test_encode_decode_shapes(vae, frames, latent_frames):
    posterior = vae.encode(torch.rand(1, 3, frames, 16, 8) * 2 - 1)
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mode().shape == posterior.std.shape == (1, 4, latent_frames, 2, 1)
    assert vae.decode(posterior.mode()).shape == (1, 3, frames, 16, 8)


def test_autograd_path_matches_inference_path(vae):
    """With autograd on, the in-place shortcuts are off: same numbers, and gradients flow."""
    z = torch.randn(1, 4, 3, 2, 3)
    with torch.no_grad():
        expected = vae.decode(z)
    z.requires_grad_(True)
    out = vae.decode(z)
    assert rel_err(out.detach(), expected) <= 1e-6
    out.square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@torch.no_grad()
def test_input_is_cast_to_weights_dtype(vae):
    z = torch.randn(1, 4, 1, 2, 3, dtype=torch.float64)
    out = vae.decode(z)
    assert out.dtype == torch.float32
    assert rel_err(out, vae.decode(z.float())) == 0


@torch.no_grad()
def test_bfloat16_weights_run_and_stay_close():
    model = randomize_(VAE(TINY), seed=2, std=0.1).eval()
    z = torch.randn(1, 4, 3, 2, 3)
    expected = model.decode(z)
    out = model.to(torch.bfloat16).decode(z)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), expected) < 0.05


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 4, 9, 16, 16), r"video has 4 channels in dim 1; this VAE takes 3"),
        ((1, 3, 8, 16, 16), r"num_frames=8: encode needs 4k\+1 frames"),
        ((1, 3, 0, 16, 16), r"num_frames=0: encode needs 4k\+1 frames"),
        ((1, 3, 9, 20, 16), r"height=20, width=16: both must be positive multiples of 8"),
        ((1, 3, 9, 16, 12), r"height=16, width=12: both must be positive multiples of 8"),
        ((3, 9, 16, 16), r"encode expects \[B, 3, F, H, W\]"),
    ],
)
def test_encode_rejects_bad_video(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_bad_latents(vae):
    with pytest.raises(ValueError, match=r"decode expects \[B, 4, F, H, W\].*use z.permute\(0, 2, 1, 3, 4\)"):
        vae.decode(torch.zeros(1, 3, 4, 2, 2))  # [B, F, C, H, W] by mistake
    with pytest.raises(ValueError, match=r"latents of shape \(1, 5, 3, 2, 2\)"):
        vae.decode(torch.zeros(1, 5, 3, 2, 2))
    with pytest.raises(TypeError, match="latents must be a floating-point tensor"):
        vae.decode(torch.zeros(1, 4, 3, 2, 2, dtype=torch.long))


def test_float16_on_cpu_is_refused():
    model = VAE(TINY).half()
    with pytest.raises(ValueError, match="float16 on the CPU: half precision is for GPUs.*use float32"):
        model.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match="float16 on the CPU"):
        model.encode(torch.zeros(1, 3, 1, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_sample_min_height": 0}, "tile_sample_min_height=0: a tile size is a positive number of pixels"),
        ({"tile_sample_min_width": 4}, "smaller than one latent"),
        ({"tile_overlap_factor_height": 1.0}, r"tile_overlap_factor_height=1.0: .* in \[0, 1\)"),
        ({"tile_overlap_factor_width": -0.1}, r"tile_overlap_factor_width=-0.1"),
    ],
)
def test_enable_tiling_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(TINY).enable_tiling(**kwargs)


def test_enable_tiling_keeps_unset_values():
    model = VAE(TINY)
    assert (model.tile_sample_min_height, model.tile_sample_min_width) == (32, 40)  # half the sample size
    model.enable_tiling(tile_sample_min_width=48, tile_overlap_factor_height=0.25)
    assert model.use_tiling
    assert (model.tile_sample_min_height, model.tile_sample_min_width) == (32, 48)
    assert (model.tile_latent_min_height, model.tile_latent_min_width) == (4, 6)
    assert (model.tile_overlap_factor_height, model.tile_overlap_factor_width) == (0.25, 0.2)
    model.disable_tiling()
    assert not model.use_tiling


@torch.no_grad()
def test_inconsistent_tile_geometry_is_an_error(vae):
    # 1/6 of a 32-pixel tile: latent step int(4 * 5/6) = 3 (24 pixels) but 32 - int(32/6) = 27 pixels kept.
    vae.enable_tiling(32, 40, 1 / 6, 1 / 5)
    try:
        with pytest.raises(ValueError, match="tile crops add up to 70x80, not 64x80"):
            vae.decode(torch.zeros(1, 4, 1, 8, 10))
    finally:
        vae.disable_tiling()


def test_run_tiled_places_and_blends_tiles():
    """Identity 'model': a tiled pass must give back the input where tiles agree (blending of equal values)."""
    x = torch.arange(2 * 1 * 1 * 9 * 11, dtype=torch.float32).reshape(2, 1, 1, 9, 11)
    grid_h = TileGrid(tile=4, stride=3, blend=1, limit=3)
    grid_w = TileGrid(tile=5, stride=4, blend=1, limit=4)
    out = run_tiled(x, lambda t: t.clone(), grid_h, grid_w, out_of=lambda n: n)
    assert rel_err(out, x) <= 1e-6


# ------------------------------------------------------------------------------------------------ posterior
def test_posterior_statistics_and_generators():
    moments = torch.randn(2, 8, 3, 2, 2)
    moments[:, 4:, 0] = 50.0  # log-variance beyond the reference's clamp at 20
    posterior = DiagonalGaussian(moments)
    assert torch.equal(posterior.mode(), moments[:, :4])
    assert torch.allclose(posterior.std[:, :, 0], torch.exp(torch.tensor(10.0)))
    a = posterior.sample(torch.Generator().manual_seed(0))
    b = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="got 3 generators for a batch of 2"):
        posterior.sample([torch.Generator() for _ in range(3)])


# ------------------------------------------------------------------------------------------------ config, loading
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"down_block_types": ["DownEncoderBlock2D"] * 4}, "down_block_types=.*must be 4 x 'CogVideoXDownBlock3D'"),
        ({"up_block_types": ["CogVideoXUpBlock3D"] * 3}, "up_block_types=.*must be 4 x 'CogVideoXUpBlock3D'"),
        ({"act_fn": "gelu"}, "act_fn='gelu': only 'silu'"),
        ({"norm_num_groups": 24}, "norm_num_groups=24: must divide every width"),
        ({"temporal_compression_ratio": 3}, "temporal_compression_ratio=3: must be a power of two from 1 to 8"),
        ({"temporal_compression_ratio": 16}, "temporal_compression_ratio=16"),
        ({"use_quant_conv": True}, "use_quant_conv/use_post_quant_conv=true: unsupported"),
        ({"scaling_factor": 0}, "scaling_factor=0: must be > 0"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(VAEConfig, change)


def test_config_reads_published_keys():
    two_levels = {
        "block_out_channels": [32, 64],
        "down_block_types": ["CogVideoXDownBlock3D"] * 2,
        "up_block_types": ["CogVideoXUpBlock3D"] * 2,
        "temporal_compression_ratio": 2.0,
    }
    cfg = config_from_dict(VAEConfig, {"scaling_factor": 0.7, "invert_scale_latents": True, **two_levels})
    assert cfg.scaling_factor == 0.7 and cfg.invert_scale_latents
    assert cfg.block_out_channels == (32, 64) and cfg.spatial_compression_ratio == 2
    assert cfg.temporal_compression_ratio == 2 and isinstance(cfg.temporal_compression_ratio, int)


def test_from_pretrained_reads_pipeline_root_and_casts(tmp_path):
    from safetensors.torch import save_file

    from cogvideox.configs import config_to_dict

    model = randomize_(VAE(TINY), seed=4, std=0.1)
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(json.dumps(config_to_dict(TINY, "AutoencoderKLCogVideoX")))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, vae_dir / "diffusion_pytorch_model.safetensors"
    )
    (tmp_path / "model_index.json").write_text("{}")
    loaded = VAE.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.config == TINY and loaded.dtype == torch.bfloat16 and not loaded.training
    assert torch.equal(loaded.decoder.conv_out.conv.weight, model.decoder.conv_out.conv.weight.bfloat16())
