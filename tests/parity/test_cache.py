"""Step caching against diffusers: each method diffusers has, enabled on both sides, gives the same latents.

The reference is diffusers' CogVideoX pipeline with ``transformer.enable_cache(<Config>(...))``; ours is the same
tiny random checkpoint with ``pipe.enable_cache(method, ...)``. Settings are chosen so that each method really
skips work on a few steps: the number of attention computations (calls of ``attn1.norm_q``, which runs only when
a layer computes) is counted on both sides, must be equal, and must be below the uncached count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvideox import Pipeline
from tests.tiny_checkpoints import TEXT_LEN, reference_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")

from diffusers.hooks import (  # noqa: E402
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

TOL = 1e-5
STEPS = 12
PROMPT = "a red circle moves to the right"
# MagCache ratios for a 12-step loop (any calibration would do: both sides read the same list)
MAG_RATIOS = [1.0, 1.02, 1.01, 0.995, 0.99, 0.995, 1.0, 0.99, 0.985, 0.99, 0.98, 0.97]


@pytest.fixture(scope="module", params=["5b", "1.5"])
def pipes(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param.replace(".", "_")) / "checkpoint"
    ref = reference_pipeline(request.param, root)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(root)
    ours.set_progress_bar_config(disable=True)
    return request.param, ref, ours


def count_attention(transformer: torch.nn.Module) -> list[int]:
    """A one-element list counting attention computations from now on (forward hooks on every ``norm_q``)."""
    count = [0]
    for name, module in transformer.named_modules():
        if name.endswith("attn1.norm_q"):
            module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def run(pipe, name: str, **kwargs) -> np.ndarray:
    kwargs = {
        "prompt": PROMPT, "num_inference_steps": STEPS, "guidance_scale": 6.0, "output_type": "latent",
        "max_sequence_length": TEXT_LEN, "height": 32, "width": 48, "num_frames": 17 if name == "1.5" else 9,
        "generator": torch.Generator().manual_seed(0), **kwargs,
    }  # fmt: skip
    return pipe(**kwargs).frames.float().numpy()


def settings(ref) -> dict[str, tuple[dict, object]]:
    """method -> (our options, diffusers' config) at settings that skip on these tiny models."""
    now = lambda: ref.current_timestep  # noqa: E731
    return {
        "first_block": ({"threshold": 0.5}, FirstBlockCacheConfig(threshold=0.5)),
        "pab": (
            {"spatial_attention_block_skip_range": 3, "spatial_attention_timestep_skip_range": (100, 900)},
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=3,
                spatial_attention_timestep_skip_range=(100, 900),
                current_timestep_callback=now,
            ),
        ),
        "faster": (
            {"unconditional_batch_skip_range": 3, "unconditional_batch_timestep_skip_range": (-1, 901)},
            FasterCacheConfig(
                unconditional_batch_skip_range=3,
                unconditional_batch_timestep_skip_range=(-1, 901),
                current_timestep_callback=now,
            ),
        ),
        "taylorseer": (
            {"cache_identifiers": [r"transformer_blocks\.\d+\.attn1"], "cache_interval": 3, "max_order": 2},
            TaylorSeerCacheConfig(cache_identifiers=[r"transformer_blocks\.\d+\.attn1"], cache_interval=3, max_order=2),
        ),
        "taylorseer_lite": (
            {"use_lite_mode": True, "taylor_factors_dtype": torch.float32, "disable_cache_before_step": 2},
            TaylorSeerCacheConfig(use_lite_mode=True, taylor_factors_dtype=torch.float32, disable_cache_before_step=2),
        ),
        "mag": (
            {"mag_ratios": MAG_RATIOS, "threshold": 0.05, "retention_ratio": 0.2},
            MagCacheConfig(mag_ratios=MAG_RATIOS, threshold=0.05, retention_ratio=0.2, num_inference_steps=STEPS),
        ),
    }


@pytest.mark.parametrize("method", ["first_block", "pab", "faster", "taylorseer", "taylorseer_lite", "mag"])
def test_same_latents_as_diffusers(pipes, method):
    name, ref, ours = pipes
    ours_count, ref_count = count_attention(ours.transformer), count_attention(ref.transformer)
    uncached = run(ours, name)
    full = ours_count[0]
    options, config = settings(ref)[method]
    ours.enable_cache(method.removesuffix("_lite"), **options)
    ref.transformer.enable_cache(config)
    try:
        ours_count[0] = ref_count[0] = 0
        cached = run(ours, name)
        reference = run(ref, name)
    finally:
        ours.disable_cache()
        ref.transformer.disable_cache()
    assert ours_count[0] == ref_count[0], f"attention computed {ours_count[0]} times here, {ref_count[0]} in diffusers"
    assert ours_count[0] < full, f"{method} skipped nothing ({full} attention computations)"
    err = float(np.abs(cached - reference).max() / np.abs(reference).max())
    assert err <= TOL, f"{method}: relative error {err:.2e}"
    assert not np.allclose(cached, uncached, rtol=0, atol=1e-6), "the cache changed nothing"
