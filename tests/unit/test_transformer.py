"""Transformer behaviour that needs no reference: input checks, attention backends, dtypes, caching, compile."""

from __future__ import annotations

import pytest
import torch

from cogvideox import Transformer
from cogvideox.configs import TransformerConfig
from cogvideox.ops import use_attention_backend
from tests.helpers import TINY_TRANSFORMER, randomize_, rel_err

TINY = TINY_TRANSFORMER


def make(**overrides) -> Transformer:
    model = Transformer(TransformerConfig(**{**TINY, **overrides}))
    return randomize_(model, seed=0, std=0.1).eval()


def inputs(model: Transformer, frames=3, height=6, width=10, channels=None, text_len=7, batch=2):
    c = model.config
    latents = torch.randn(batch, frames, channels or c.in_channels, height, width)
    return latents, torch.randn(batch, text_len, c.text_embed_dim), torch.tensor([999.0] * batch)


@pytest.mark.parametrize(
    ("overrides", "shape", "kwargs", "message"),
    [
        ({}, {"channels": 5}, {}, "latents have 5 channels; this transformer takes in_channels=4"),
        ({"in_channels": 8}, {"channels": 4}, {}, r"in_channels=8 \(image-to-video models take noise and image"),
        ({}, {"height": 7}, {}, r"latent height x width = 7x10 is not divisible by patch_size=2"),
        ({}, {"width": 9}, {}, r"multiples of 16 pixels"),
        ({"patch_size_t": 2}, {"frames": 3}, {}, "3 latent frames: patch_size_t=2 needs a multiple of 2"),
        (
            {"use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True},
            {"height": 8},
            {},
            "learned positions cover only 6x10 latents",
        ),
        (
            {"use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True},
            {"text_len": 5},
            {},
            "5 text tokens: learned positions cover exactly max_text_seq_length=7",
        ),
        ({"ofs_embed_dim": 24, "patch_size_t": 2}, {"frames": 2}, {}, "needs ofs=; the reference pipeline passes 2.0"),
        ({}, {}, {"ofs": 2.0}, "ofs= is only used by checkpoints with ofs_embed_dim"),
    ],
)
def test_bad_inputs_raise_before_work(overrides, shape, kwargs, message):
    model = make(**overrides)
    latents, text, t = inputs(model, **shape)
    with pytest.raises(ValueError, match=message):
        model(latents, text, t, **kwargs)


def test_text_width_and_batch_are_checked():
    model = make()
    latents, text, t = inputs(model)
    with pytest.raises(ValueError, match=r"text_embeds must be \[B, L, 12\] \(text_embed_dim\), got \(2, 7, 11\)"):
        model(latents, text[..., :11], t)
    with pytest.raises(ValueError, match="text_embeds batch 1 != latents batch 2"):
        model(latents, text[:1], t)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or \[B=2\]"):
        model(latents, text, torch.ones(3))


def test_scalar_timestep_equals_batched():
    model = make(use_rotary_positional_embeddings=True)
    latents, text, _ = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(latents, text, 500), model(latents, text, torch.tensor([500, 500])))


@pytest.mark.parametrize("variant", [{}, {"use_rotary_positional_embeddings": True}, {"patch_size_t": 2}])
def test_sdpa_matches_math_reference(variant):
    model = make(**variant)
    latents, text, t = inputs(model, frames=2)
    with torch.no_grad(), use_attention_backend("math"):
        expected = model(latents, text, t)
    with torch.no_grad(), use_attention_backend("sdpa"):
        actual = model(latents, text, t)
    assert rel_err(actual, expected) <= 1e-5


def test_position_tables_are_cached_per_shape():
    model = make(use_rotary_positional_embeddings=True)
    with torch.no_grad():
        model(*inputs(model))
        model(*inputs(model))
        model(*inputs(model, frames=2))
    assert len(model._position_cache) == 2


def test_bfloat16_weights_run_and_stay_close_to_float32():
    model = make(use_rotary_positional_embeddings=True)
    latents, text, t = inputs(model)
    with torch.no_grad():
        expected = model(latents, text, t)
        actual = model.to(torch.bfloat16)(latents, text, t)  # float32 inputs are cast to the weights' dtype
    assert actual.dtype == torch.bfloat16
    assert rel_err(actual.float(), expected) < 5e-2


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make(use_rotary_positional_embeddings=True).train()
    latents, text, t = inputs(model)

    def grads():
        model.zero_grad()
        model(latents, text, t).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = grads()
    model.gradient_checkpointing = True
    assert rel_err(grads(), plain) <= 1e-6


def test_compiled_blocks_match_eager():
    """Regional compilation: each block compiles with fullgraph=True (no graph breaks) and equals eager."""
    model = make(use_rotary_positional_embeddings=True)
    latents, text, t = inputs(model)
    with torch.no_grad():
        expected = model(latents, text, t)
        for block in model.transformer_blocks:
            block.compile(fullgraph=True, dynamic=False)
        actual = model(latents, text, t)
    assert rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_rotary_positional_embeddings": True}, {"use_rotary_positional_embeddings": True, "patch_size_t": 2}],
    ids=["sincos", "rope", "rope-patch-t2"],
)
def test_frame_mask_makes_padding_frames_invisible(overrides):
    """A clip padded with masked frames gives its real frames the outputs of the unpadded clip (Frame Pack)."""
    model = make(**overrides)
    pt = model.config.patch_size_t or 1
    latents, text, t = inputs(model, frames=2 * pt, batch=1)
    padded = torch.cat([latents, torch.randn(1, 2 * pt, *latents.shape[2:])], dim=1)
    mask = torch.tensor([[True] * (2 * pt) + [False] * (2 * pt)])
    with torch.no_grad():
        alone = model(latents, text, t)
        packed = model(padded, text, t, frame_mask=mask)
        unmasked = model(padded, text, t)
    assert rel_err(packed[:, : 2 * pt], alone) < 1e-5
    assert rel_err(unmasked[:, : 2 * pt], alone) > 1e-3  # the mask is what hides the padding


def test_frame_mask_shape_is_checked():
    model = make()
    latents, text, t = inputs(model)
    with pytest.raises(ValueError, match=r"frame_mask must be a bool tensor \[B, 3\]"):
        model(latents, text, t, frame_mask=torch.ones(2, 2, dtype=torch.bool))
