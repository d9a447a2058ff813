"""TeaCache against the published rule, written here independently on diffusers' transformer.

diffusers has no TeaCache. ali-vilab/TeaCache (``TeaCache4CogVideoX1.5/teacache_sample_video.py``) replaces the
forward of diffusers' CogVideoX transformer; :func:`teacache_forward` below restates that rule from its description:

- the indicator is the time embedding ``emb`` (plus the ofs embedding on 1.5-I2V);
- ``d = mean|emb - emb_prev| / mean|emb_prev|``, rescaled by the published degree-4 polynomial, is accumulated;
- the first and the last step always compute; otherwise a step is skipped while the sum stays below the threshold,
  and the sum restarts at 0 whenever a step computes;
- a computed step keeps ``blocks(x) - x`` for the video and the text streams; a skipped one adds it to its input.

Our pipeline with ``enable_cache("teacache", ...)`` must make the same compute/skip decision at every step and give
the same latents (float32, 1e-5 relative).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from einops import rearrange

from cogvideox import Pipeline
from cogvideox.cache import TEACACHE_COEFFICIENTS, published_variant
from cogvideox.presets import TRANSFORMER_CONFIGS, transformer_config
from tests.tiny_checkpoints import TEXT_LEN, reference_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")

STEPS = 12
COEFFICIENTS = (0.0, 0.0, 0.5, 0.5, 0.0)  # (d^2 + d) / 2: any polynomial will do, both sides read it


def teacache_forward(self, hidden_states, encoder_hidden_states, timestep, timestep_cond=None, ofs=None,
                     image_rotary_emb=None, attention_kwargs=None, return_dict=True):  # fmt: skip
    state = self.teacache
    batch, frames, _, height, width = hidden_states.shape
    emb = self.time_embedding(self.time_proj(timestep).to(hidden_states.dtype), timestep_cond)
    if self.ofs_embedding is not None:
        emb = emb + self.ofs_embedding(self.ofs_proj(ofs).to(hidden_states.dtype))
    joined = self.patch_embed(encoder_hidden_states, hidden_states)
    text_len = encoder_hidden_states.shape[1]
    text, video = joined[:, :text_len], joined[:, text_len:]

    step = len(state["decisions"])
    compute = True
    if 0 < step < state["steps"] - 1:
        previous = state["emb"]
        distance = ((emb - previous).abs().mean() / previous.abs().mean()).item()
        state["sum"] += float(np.polyval(state["coefficients"], distance))
        compute = state["sum"] >= state["threshold"]
    if compute:
        state["sum"] = 0.0
    state["emb"] = emb
    state["decisions"].append(compute)

    if compute:
        video_in, text_in = video, text
        for block in self.transformer_blocks:
            video, text = block(hidden_states=video, encoder_hidden_states=text, temb=emb,
                                image_rotary_emb=image_rotary_emb)  # fmt: skip
        state["residual"] = (video - video_in, text - text_in)
    else:
        video, text = video + state["residual"][0], text + state["residual"][1]

    video = self.norm_final(torch.cat([text, video], dim=1))[:, text_len:]
    video = self.proj_out(self.norm_out(video, temb=emb))
    p, pt = self.config.patch_size, self.config.patch_size_t or 1
    out = rearrange(video, "b (f h w) (c pt ph pw) -> b (f pt) c (h ph) (w pw)",
                    f=(frames + pt - 1) // pt, h=height // p, w=width // p, pt=pt, ph=p, pw=p)  # fmt: skip
    return (out,) if not return_dict else types.SimpleNamespace(sample=out)


@pytest.mark.parametrize("variant", ["5b", "1.5"])
def test_teacache_follows_the_published_rule_step_by_step(variant, tmp_path):
    ref = reference_pipeline(variant, tmp_path / "checkpoint")
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(tmp_path / "checkpoint")
    ours.set_progress_bar_config(disable=True)
    threshold = 0.6
    ref.transformer.teacache = {"steps": STEPS, "coefficients": COEFFICIENTS, "threshold": threshold, "sum": 0.0,
                                "decisions": []}  # fmt: skip
    ref.transformer.forward = types.MethodType(teacache_forward, ref.transformer)
    cache = ours.enable_cache("teacache", threshold=threshold, coefficients=COEFFICIENTS)

    kwargs = {"prompt": "a red circle moves to the right", "num_inference_steps": STEPS, "guidance_scale": 6.0,
              "output_type": "latent", "max_sequence_length": TEXT_LEN, "height": 32, "width": 48,
              "num_frames": 17 if variant == "1.5" else 9}  # fmt: skip
    reference = ref(generator=torch.Generator().manual_seed(0), **kwargs).frames.numpy()
    cached = ours(generator=torch.Generator().manual_seed(0), **kwargs).frames.numpy()

    decisions = ref.transformer.teacache["decisions"]
    assert cache.decisions == decisions
    assert 2 <= decisions.count(False) <= STEPS - 4, f"choose a threshold that skips some steps: {decisions}"
    blocks = len(ours.transformer.transformer_blocks)
    assert cache.stats["blocks_skipped"] == decisions.count(False) * blocks
    err = float(np.abs(cached - reference).max() / np.abs(reference).max())
    assert err <= 1e-5, f"relative error {err:.2e}"

    # the same call again starts from a clean cache: the same latents, bitwise
    again = ours(generator=torch.Generator().manual_seed(0), **kwargs).frames.numpy()
    assert np.array_equal(again, cached)


def test_published_coefficients_are_chosen_from_the_config():
    for name in TRANSFORMER_CONFIGS:
        assert published_variant(transformer_config(name)) == name
    assert TEACACHE_COEFFICIENTS["CogVideoX1.5-5B"][0] == 2.50210439e02
