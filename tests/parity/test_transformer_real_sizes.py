"""The five published transformer configs, built on the meta device (no weights): our model has exactly the
reference's keys, shapes and parameter count."""

from __future__ import annotations

import pytest
import torch

from cogvideox import Transformer
from cogvideox.presets import TRANSFORMER_CONFIGS, transformer_config

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel  # noqa: E402

# Parameter counts of the published checkpoints (transformer only), from the meta-built reference.
EXPECTED_PARAMS_BILLIONS = {
    "CogVideoX-2b": 1.69,
    "CogVideoX-5b": 5.57,
    "CogVideoX-5b-I2V": 5.63,
    "CogVideoX1.5-5B": 5.57,
    "CogVideoX1.5-5B-I2V": 5.57,
}


@pytest.mark.parametrize("name", list(TRANSFORMER_CONFIGS))
def test_published_config_matches_reference_on_meta(name):
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**TRANSFORMER_CONFIGS[name])
        ours = Transformer(transformer_config(name))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(our_shapes) == sorted(ref_shapes)
    assert our_shapes == ref_shapes
    ref_count = sum(v.numel() for v in ref.state_dict().values())
    our_count = sum(v.numel() for v in ours.state_dict().values())
    assert our_count == ref_count
    assert round(our_count / 1e9, 2) == EXPECTED_PARAMS_BILLIONS[name]
