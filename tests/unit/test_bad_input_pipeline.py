"""Bad call arguments are refused before any model runs, with a message that names the value and the rule.

Every case runs on the bundled demo model with every module's forward replaced by one that fails: an error that
came from a model pass would say so, and the test would see the wrong message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cogvideox import Pipeline


@pytest.fixture
def no_model_runs(demo_pipe, monkeypatch):
    """Any module call fails loudly: the checks must come first."""

    def forbidden(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} ran before the arguments were checked")

    monkeypatch.setattr(nn.Module, "__call__", forbidden)
    return demo_pipe


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, r"width=0: must be a positive multiple of 8 pixels"),
        ({"height": 0}, r"height=0: must be a positive multiple of 8 pixels"),
        ({"height": 40.0}, r"height=40.0: must be an integer"),
        ({"num_frames": 0}, r"num_frames=0: CogVideoX 1.0 needs 8N\+1 frames"),
        ({"num_frames": True}, r"num_frames=True: must be an integer"),
        ({"guidance_scale": float("nan")}, r"guidance_scale=nan: must be a finite number >= 0"),
        ({"guidance_scale": float("inf")}, r"guidance_scale=inf: must be a finite number >= 0"),
        ({"guidance_scale": -2.0}, r"guidance_scale=-2.0: must be a finite number >= 0"),
        ({"guidance_scale": "6"}, r"guidance_scale='6': must be a number"),
        ({"num_videos_per_prompt": 0}, r"num_videos_per_prompt=0: must be a positive integer"),
        ({"max_sequence_length": 0}, r"max_sequence_length=0: must be an integer of at least 2"),
        ({"output_type": "mp4"}, r"output_type='mp4': choose one of"),
        ({"prompt_embeds": torch.zeros(1, 8, 3), "prompt": None}, r"prompt_embeds of shape \(1, 8, 3\)"),
    ],
)
def test_bad_arguments_fail_before_any_model_runs(no_model_runs, kwargs, match):
    kwargs = {"prompt": "a red circle moves up", **kwargs}
    with pytest.raises(ValueError, match=match):
        no_model_runs(**kwargs)


def test_nan_latents_are_refused_before_any_model_runs(no_model_runs):
    shape = (1, 3, 8, 4, 4)  # the demo: 9 frames -> 3 latents, 8 channels, 32x32 -> 4x4
    latents = torch.zeros(shape)
    latents[0, 1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="latents contain NaN or infinite values"):
        no_model_runs("a red circle moves up", latents=latents)
    with pytest.raises(ValueError, match=r"latents of shape \(1, 3, 4, 4\): this call needs \(1, 3, 8, 4, 4\)"):
        no_model_runs("a red circle moves up", latents=torch.zeros(1, 3, 4, 4))


def test_bad_strength_fails_before_any_model_runs(no_model_runs):
    frames = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    for strength in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"strength={strength}: must be in \(0, 1\]"):
            no_model_runs("a red circle moves up", video=list(frames), strength=strength)


def test_bad_step_count_fails_before_the_text_encoder(no_model_runs):
    with pytest.raises(ValueError, match="num_inference_steps=0: must be from 1 to 1000"):
        no_model_runs("a red circle moves up", num_inference_steps=0)


def test_numpy_integers_are_sizes(demo_pipe):
    """height=np.int64(32) is an integer: it runs (and gives what height=32 gives)."""
    run = {"num_inference_steps": 2, "output_type": "latent"}
    ours = demo_pipe("a red circle moves up", height=np.int64(32), width=np.int32(32), num_frames=np.int64(9),
                generator=torch.Generator().manual_seed(0), **run).frames  # fmt: skip
    plain = demo_pipe("a red circle moves up", height=32, width=32, num_frames=9,
                 generator=torch.Generator().manual_seed(0), **run).frames  # fmt: skip
    assert torch.equal(ours, plain)


@pytest.fixture
def demo_copy(tmp_path):
    import shutil

    from cogvideox.demo import demo_model_path

    return Path(shutil.copytree(demo_model_path(), tmp_path / "demo"))


def test_model_index_that_is_not_json_names_the_file(demo_copy):
    (demo_copy / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_index.json is not valid JSON \(.* at line 1, column 2\)"):
        Pipeline.from_pretrained(demo_copy)


def test_model_index_of_another_pipeline_is_refused(demo_copy):
    index = json.loads((demo_copy / "model_index.json").read_text())
    (demo_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="pipeline class 'StableDiffusionPipeline', which is not a CogVideoX"):
        Pipeline.from_pretrained(demo_copy)


def test_config_value_of_the_wrong_type_names_key_and_file(demo_copy):
    config = json.loads((demo_copy / "transformer" / "config.json").read_text())
    (demo_copy / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": "6"}))
    with pytest.raises(ValueError, match=r'config.json: "num_layers": "6" is a JSON string, but .* must be an integer'):
        Pipeline.from_pretrained(demo_copy)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, "float8"])
def test_dtypes_that_cannot_compute_are_refused_at_load(dtype, monkeypatch):
    from cogvideox.transformer import Transformer

    monkeypatch.setattr(Transformer, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises((ValueError, TypeError), match="dtype"):
        Pipeline.from_pretrained(dtype=dtype)


def test_dtype_names_are_accepted():
    assert Pipeline.from_pretrained(dtype="float32").dtype == torch.float32


def test_negative_prompts_are_checked_before_any_model_runs(no_model_runs):
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts: give one, or one per prompt"):
        no_model_runs(["a red circle moves up", "a blue square moves down"], negative_prompt=["a", "b", "c"])
    with pytest.raises(TypeError, match="negative_prompt must be a string or a list of strings, got int"):
        no_model_runs("a red circle moves up", negative_prompt=3)
    embeds = torch.zeros(1, 12, 64)  # the demo: 12 prompt tokens of width 64
    with pytest.raises(ValueError, match=r"negative_prompt_embeds of shape \(2, 12, 64\) must match"):
        no_model_runs(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros(2, 12, 64))


def test_a_transformer_with_another_conditioning_is_refused(demo_pipe):
    """CogVideoX-Fun control / inpainting transformers take more input channels than noise (+ image): refused
    when the pipeline is built, not inside the first transformer pass."""
    import dataclasses

    config = demo_pipe.transformer.config
    wide = dataclasses.replace(config, in_channels=3 * config.output_channels)
    fake = type("Wide", (), {"config": wide})()
    with pytest.raises(ValueError, match=r"takes 24 input channels for 8 output channels; a text-to-video pipeline"):
        Pipeline(fake, demo_pipe.vae, demo_pipe.text_encoder, demo_pipe.tokenizer, demo_pipe.sampler)


def test_components_need_not_be_modules_and_prompt_embeds_need_no_text_encoder(demo_pipe):
    """A pipeline without text encoder or tokenizer runs from prompt embeddings (the oneDNN swap skips them)."""
    embeds = demo_pipe.encode_text(["a red circle moves up"])
    negative = demo_pipe.encode_text([""])
    bare = Pipeline(demo_pipe.transformer, demo_pipe.vae, None, None, demo_pipe.sampler)
    bare.set_progress_bar_config(disable=True)
    run = {"num_inference_steps": 2, "output_type": "latent"}
    gen = torch.Generator().manual_seed(0)
    ours = bare(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=gen, **run)
    full = demo_pipe("a red circle moves up", generator=torch.Generator().manual_seed(0), **run)
    assert torch.equal(ours.frames, full.frames)
