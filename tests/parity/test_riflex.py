"""RIFLEx (arXiv 2502.15894): the rotary tables against the paper's formula, derived here independently; the
pipeline against diffusers' CogVideoXPipeline whose rotary tables are given the same frequency; the bad input."""

from __future__ import annotations

import math
import types

import pytest
import torch

from cogvideox import Pipeline
from cogvideox.rope.rotary import rotary_tables
from tests.helpers import rel_err
from tests.tiny_checkpoints import TEXT_LEN, reference_pipeline

THETA = 10000.0


def paper_frequencies(dim_t: int, k: int, latent_frames: int) -> list[float]:
    """RIFLEx, Sec. 3: theta_j = b^(-2(j-1)/d) for j = 1..d/2, and the intrinsic component k set to
    0.9 * 2 pi / L so that one period spans the L generated frames (with 10 % to spare)."""
    freqs = [THETA ** (-2 * (j - 1) / dim_t) for j in range(1, dim_t // 2 + 1)]
    freqs[k - 1] = 0.9 * 2 * math.pi / latent_frames
    return freqs


def test_temporal_frequencies_follow_the_paper():
    # CogVideoX-5B: head 64, temporal part 16 channels (8 frequencies); 97 frames = 25 latent frames, k = 2.
    frames, height, width = 25, 2, 3
    cos, sin = rotary_tables(64, frames, height, width, grid="crop", base_height=30, base_width=45, riflex=(2, 25))
    plain_cos, _ = rotary_tables(64, frames, height, width, grid="crop", base_height=30, base_width=45)
    freqs = paper_frequencies(16, 2, 25)
    for t in range(frames):
        row = t * height * width  # token (t, 0, 0)
        for j, f in enumerate(freqs):
            for channel in (2 * j, 2 * j + 1):  # each frequency rotates one interleaved channel pair
                assert cos[row, channel].item() == pytest.approx(math.cos(t * f), abs=1e-6)
                assert sin[row, channel].item() == pytest.approx(math.sin(t * f), abs=1e-6)
    assert torch.equal(cos[:, 16:], plain_cos[:, 16:])  # the spatial parts are untouched
    changed = [c for c in range(16) if not torch.equal(cos[:, c], plain_cos[:, c])]
    assert changed == [2, 3]  # only the pair of component k = 2
    assert 2 * math.pi / freqs[1] == pytest.approx(25 / 0.9)  # one period covers the video


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 5B-style model with the published head size (64: the same 8 temporal frequencies) trained on 49
    frames (13 latent frames), so that 97 frames (25 latent frames) exceed the period 19.9 of component k = 2."""
    root = tmp_path_factory.mktemp("riflex") / "checkpoint"
    ref = reference_pipeline("5b", root, transformer_overrides={"num_attention_heads": 1, "attention_head_dim": 64,
                                                                 "sample_frames": 49})  # fmt: skip
    return root, ref


def _with_riflex_tables(ref, k: int):
    """The reference pipeline with its temporal rotary channels rebuilt from :func:`paper_frequencies`."""
    original = type(ref)._prepare_rotary_positional_embeddings

    def prepare(self, height, width, num_frames, device):
        cos, sin = original(self, height, width, num_frames, device)
        freqs = torch.tensor(paper_frequencies(16, k, num_frames), dtype=torch.float64)
        positions = torch.arange(num_frames, dtype=torch.float64)
        angles = torch.outer(positions, freqs).repeat_interleave(2, dim=1)  # [T, 16], pairs interleaved
        tokens_per_frame = cos.shape[0] // num_frames
        angles = angles.repeat_interleave(tokens_per_frame, dim=0).float()
        cos, sin = cos.clone(), sin.clone()
        cos[:, :16], sin[:, :16] = angles.cos(), angles.sin()
        return cos, sin

    ref._prepare_rotary_positional_embeddings = types.MethodType(prepare, ref)
    return ref


def test_pipeline_with_riflex_equals_the_reference_with_riflex_tables(checkpoint):
    root, ref = checkpoint
    call = {
        "num_frames": 97,
        "num_inference_steps": 3,
        "guidance_scale": 6.0,
        "output_type": "latent",
        "max_sequence_length": TEXT_LEN,
    }
    prompt = "a panda plays a guitar"
    pipe = Pipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(prompt, riflex=True, generator=torch.Generator().manual_seed(0), **call).frames
    plain = pipe(prompt, generator=torch.Generator().manual_seed(0), **call).frames
    assert pipe.transformer.riflex is None  # only for that call
    expected = _with_riflex_tables(ref, 2)(prompt, generator=torch.Generator().manual_seed(0), **call).frames
    assert rel_err(ours, expected) < 1e-5
    assert rel_err(plain, expected) > 1e-3  # the frequency change is visible
    # 97 frames set by riflex_frames: the same tables for a shorter call of that model (the fine-tuned setting).
    fine_tuned = pipe(prompt, num_frames=97, riflex_frames=97, generator=torch.Generator().manual_seed(0),
                      **{k: v for k, v in call.items() if k != "num_frames"}).frames  # fmt: skip
    assert torch.equal(fine_tuned, ours)
    # Within the period of component 2 (49 frames: 13 < 19.9) RIFLEx changes nothing, as in thu-ml/RIFLEx.
    short = {**call, "num_frames": 49}
    assert torch.equal(pipe(prompt, riflex=True, generator=torch.Generator().manual_seed(0), **short).frames,
                       pipe(prompt, generator=torch.Generator().manual_seed(0), **short).frames)  # fmt: skip


def test_riflex_bad_input(checkpoint, tmp_path):
    root, _ = checkpoint
    pipe = Pipeline.from_pretrained(root)
    call = {"num_inference_steps": 1, "output_type": "latent"}
    with pytest.raises(
        ValueError,
        match=r"105 frames with RIFLEx: 27 temporal positions, beyond its range of about "
        r"2x the 13 .* at most 101 frames",
    ):
        pipe("x", num_frames=105, riflex=True, **call)
    with pytest.raises(ValueError, match="num_frames=97 with riflex_frames=81: the RIFLEx frequency covers 81 frames"):
        pipe("x", num_frames=97, riflex_frames=81, **call)
    with pytest.raises(ValueError, match=r"riflex_k=9: must be 1..8"):
        pipe("x", num_frames=97, riflex_k=9, **call)
    reference_pipeline("2b", tmp_path / "2b")
    with pytest.raises(ValueError, match="this model has no rotary embeddings .CogVideoX-2B uses sin-cos"):
        Pipeline.from_pretrained(tmp_path / "2b")("x", num_frames=17, riflex=True, **call)
    reference_pipeline("1.5", tmp_path / "15")
    with pytest.raises(
        ValueError,
        match="riflex=True on CogVideoX 1.5: RIFLEx publishes a setting for CogVideoX-5B only .k=2.. Pass riflex_k",
    ):
        Pipeline.from_pretrained(tmp_path / "15")("x", riflex=True, **call)
