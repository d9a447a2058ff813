"""Step caching on the bundled demo model: option checks, exactness when nothing is skipped, a clean cache per call,
and the switches it must live with (batches, offload, compiled blocks, the CLI). Parity with diffusers and with the
published TeaCache rule: tests/parity/test_cache.py and test_teacache.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvideox import Pipeline, cli
from cogvideox.cache import CACHE_METHODS, make_cache, parse_cache_spec
from cogvideox.presets import transformer_config

STEPS = 12
RAW = (0.0, 0.0, 0.0, 1.0, 0.0)  # TeaCache on the raw distance (the demo model has no published polynomial)

# Settings that skip work on the demo model in a 12-step call ...
SKIPPING = {
    "teacache": {"threshold": 0.3, "coefficients": RAW},
    "first_block": {"threshold": 0.3},
    "pab": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1, 1000)},
    "faster": {
        "unconditional_batch_skip_range": 2,
        "unconditional_batch_timestep_skip_range": (-1, 1000),
        "spatial_attention_timestep_skip_range": (-1, 1000),
    },  # fmt: skip
    "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 2},
    "mag": {"mag_ratios": [1.0] + [0.99] * (STEPS - 1), "threshold": 0.1},
}
# ... and each method's setting that never skips.
NEVER = {
    "teacache": {"threshold": 0, "coefficients": RAW},
    "first_block": {"threshold": 0},
    "pab": {"spatial_attention_block_skip_range": 1},
    "faster": {"unconditional_batch_skip_range": 1, "spatial_attention_block_skip_range": 1},
    "taylorseer": {"cache_interval": 1},
    "mag": {"mag_ratios": [1.0] + [0.99] * (STEPS - 1), "threshold": 0},
}


def generate(demo_pipe: Pipeline, prompt="a red circle moves to the right", seed: int = 0, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return demo_pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).frames


def skipped(stats) -> int:
    return sum(v for k, v in stats.items() if k.endswith(("_skipped", "_predicted")))


@pytest.fixture(scope="module")
def uncached(demo_pipe) -> np.ndarray:
    return generate(demo_pipe)


@pytest.mark.parametrize("method", list(CACHE_METHODS))
def test_never_skip_setting_gives_bitwise_the_uncached_frames(demo_pipe, uncached, method):
    cache = demo_pipe.enable_cache(method, **NEVER[method])
    try:
        frames = generate(demo_pipe)
    finally:
        demo_pipe.disable_cache()
    assert skipped(cache.stats) == 0
    assert np.array_equal(frames, uncached)


@pytest.mark.parametrize("method", list(CACHE_METHODS))
def test_skipping_setting_skips_and_each_call_starts_clean(demo_pipe, uncached, method):
    cache = demo_pipe.enable_cache(method, **SKIPPING[method])
    try:
        first = generate(demo_pipe)
        stats = dict(cache.stats)
        generate(demo_pipe, prompt="a blue square moves up", seed=3)  # leaves its state behind
        again = generate(demo_pipe)
    finally:
        demo_pipe.disable_cache()
    assert skipped(stats) > 0, stats
    assert dict(cache.stats) == stats  # counters are per call
    assert np.array_equal(first, again)
    assert not np.array_equal(first, uncached)
    assert np.array_equal(generate(demo_pipe), uncached)  # disable_cache() restores the model
    assert all("forward" not in m.__dict__ for m in demo_pipe.transformer.modules())
    assert demo_pipe.transformer.step_cache is None


@pytest.mark.parametrize("method", ["teacache", "first_block", "faster", "mag"])
def test_batches_of_prompts_and_videos_per_prompt(demo_pipe, method):
    cache = demo_pipe.enable_cache(method, **SKIPPING[method])
    try:
        prompts = ["a red circle moves to the right", "a green square moves down"]
        frames = generate(demo_pipe, prompts, num_videos_per_prompt=2)
    finally:
        demo_pipe.disable_cache()
    assert frames.shape[0] == 4 and np.isfinite(frames).all()
    assert skipped(cache.stats) > 0


@pytest.mark.parametrize(("method", "offload"), [("first_block", "sequential"), ("pab", "sequential"),
                                                  ("taylorseer", "sequential"), ("teacache", "model")])  # fmt: skip
def test_offload_gives_the_same_frames(method, offload):
    plain, streamed = Pipeline.from_pretrained(), Pipeline.from_pretrained()
    for p in (plain, streamed):
        p.set_progress_bar_config(disable=True)
        p.enable_cache(method, **SKIPPING[method])
    getattr(streamed, f"enable_{offload}_cpu_offload")(device="cpu")
    assert np.array_equal(generate(streamed), generate(plain))
    assert skipped(streamed.step_cache.stats) > 0


@pytest.mark.parametrize("method", ["first_block", "pab", "taylorseer"])
def test_compiled_blocks_give_the_same_frames(method):
    eager, compiled = Pipeline.from_pretrained(), Pipeline.from_pretrained()
    for p in (eager, compiled):
        p.set_progress_bar_config(disable=True)
        p.enable_cache(method, **SKIPPING[method])
    torch._dynamo.reset()
    for block in compiled.transformer.transformer_blocks:
        block.compile(backend="eager")
    np.testing.assert_allclose(generate(compiled), generate(eager), rtol=0, atol=1e-6)
    assert skipped(compiled.step_cache.stats) > 0


def test_cli_cache_switch(tmp_path):
    output = tmp_path / "out.mp4"
    args = ["generate", "--prompt", "a red circle moves to the right", "--output", str(output), "--quiet",
            "--num-inference-steps", "8", "--cache", "first_block:threshold=0.2"]  # fmt: skip
    assert cli.main(args) == 0 and output.stat().st_size > 0


def test_cache_spec_parsing():
    assert parse_cache_spec("teacache:threshold=0.1") == ("teacache", {"threshold": 0.1})
    assert parse_cache_spec("pab") == ("pab", {})
    method, options = parse_cache_spec("mag:mag_ratios=[1.0,0.99,0.98],threshold=0.1,calibrate=False")
    assert (method, options) == ("mag", {"mag_ratios": [1.0, 0.99, 0.98], "threshold": 0.1, "calibrate": False})
    assert parse_cache_spec("pab:spatial_attention_timestep_skip_range=(100,800)")[1] == {
        "spatial_attention_timestep_skip_range": (100, 800)
    }
    with pytest.raises(ValueError, match="'threshold' is not name=value"):
        parse_cache_spec("first_block:threshold")


@pytest.mark.parametrize(
    ("method", "options", "error", "message"),
    [
        ("fastest", {}, ValueError, "unknown cache method 'fastest'; choose one of: teacache, first_block, pab"),
        ("first_block", {"treshold": 0.1}, TypeError, "unknown option 'treshold'; valid options: threshold"),
        ("pab", {"skip_range": 2}, TypeError, "valid options: spatial_attention_block_skip_range, "),
        ("first_block", {"threshold": -0.1}, ValueError, r"threshold=-0.1 must be a number >= 0"),
        ("teacache", {"threshold": -1, "coefficients": RAW}, ValueError, "threshold=-1 must be a number >= 0"),
        ("teacache", {"coefficients": [1.0, 2.0]}, ValueError, r"coefficients=\[1.0, 2.0\] must be 5 numbers"),
        ("teacache", {}, ValueError, "none of the published CogVideoX models"),
        ("mag", {}, ValueError, "mag_ratios are needed"),
        ("mag", {"calibrate": False, "mag_ratios": None}, ValueError, "run once with enable_cache\\('mag', calibr"),
        ("pab", {"spatial_attention_block_skip_range": 0}, ValueError, "must be a positive integer"),
        ("faster", {"unconditional_batch_timestep_skip_range": (641, -1)}, ValueError, "low < high"),
        ("taylorseer", {"disable_cache_before_step": 0}, ValueError, "would predict step 0"),
        ("taylorseer", {"cache_identifiers": ["nothing"]}, ValueError, "no module name matches"),
    ],
)
def test_bad_options_fail_at_enable_cache_and_change_nothing(demo_pipe, method, options, error, message):
    before = demo_pipe.enable_cache("first_block", threshold=0.1)
    try:
        with pytest.raises(error, match=message):
            demo_pipe.enable_cache(method, **options)
        assert demo_pipe.step_cache is before and demo_pipe.transformer.step_cache is before
    finally:
        demo_pipe.disable_cache()


def test_teacache_picks_the_published_polynomial_for_a_published_config():
    cache = make_cache("teacache", transformer_config("CogVideoX1.5-5B-I2V"))
    assert cache.variant == "CogVideoX1.5-5B-I2V" and cache.coefficients[0] == 1.22842302e02


def test_faster_cache_refuses_one_guidance_branch_per_rank():
    cache = make_cache("faster")
    with pytest.raises(ValueError, match="use cfg_degree=1"):
        cache.check_parallel(True)
    make_cache("faster", is_guidance_distilled=True).check_parallel(True)
    make_cache("first_block").check_parallel(True)


@pytest.mark.parametrize("method", ["first_block", "pab", "taylorseer"])
def test_caches_run_the_loaded_lora(demo_pipe, tmp_path, method):
    from tests.unit.test_lora import lora_tensors, write

    dim = demo_pipe.transformer.config.inner_dim
    lora = write(tmp_path / "lora.safetensors", lora_tensors(num_layers=len(demo_pipe.transformer.transformer_blocks),
                                                              dim=dim, seed=5))  # fmt: skip
    plain = generate(demo_pipe)
    demo_pipe.load_lora(lora)
    try:
        with_lora = generate(demo_pipe)
        demo_pipe.enable_cache(method, **NEVER[method])
        assert np.array_equal(generate(demo_pipe), with_lora)  # nothing skipped: exactly the LoRA's frames
        cache = demo_pipe.enable_cache(method, **SKIPPING[method])
        cached = generate(demo_pipe)
        assert skipped(cache.stats) > 0
        if method == "taylorseer":  # a cache on layers a LoRA wraps follows the wrappers in (and out)
            demo_pipe.unload_lora()
            cache = demo_pipe.enable_cache(method, cache_identifiers=[r"transformer_blocks\.\d+\.attn1\.to_q"])
            demo_pipe.load_lora(lora)
            generate(demo_pipe)
            assert cache.stats["modules_predicted"] > 0
            assert all(type(m).__name__ == "LoraLinear" for n, m in demo_pipe.transformer.named_modules()
                       if n.endswith("to_q") and "forward" in m.__dict__)  # fmt: skip
    finally:
        demo_pipe.disable_cache()
        demo_pipe.unload_lora()
    assert not np.array_equal(with_lora, plain)
    # the adapter is what the cached blocks compute: closer to the LoRA's uncached frames than to the plain ones
    assert np.abs(cached - with_lora).mean() < np.abs(cached - plain).mean()


def test_direct_transformer_calls_outside_a_call_run_uncached(demo_pipe):
    config = demo_pipe.transformer.config
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, config.in_channels, 4, 4, generator=gen)
    embeds = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=gen)
    timestep = torch.tensor([500, 500])
    with torch.no_grad():
        expected = demo_pipe.transformer(latents, embeds, timestep)
        for method in CACHE_METHODS:
            cache = demo_pipe.enable_cache(method, **SKIPPING[method])
            generate(demo_pipe, num_inference_steps=4)
            assert not cache.stepping
            assert torch.equal(demo_pipe.transformer(latents, embeds, timestep), expected), method
    demo_pipe.disable_cache()


def test_a_forks_cache_object_plugs_in(demo_pipe, uncached):
    from cogvideox.cache import StepCache

    class EveryOtherStep(StepCache):
        """Skips every block on odd steps, reusing the last residual: a minimal fork method."""

        method = "every_other"

        def reset(self):
            self.residual = None

        def run_blocks(self, run, video, text, temb):
            if self.index % 2 and self.residual is not None:
                self.skip_blocks(len(self.transformer.transformer_blocks))
                return video + self.residual[0], text + self.residual[1]
            out_video, out_text = self.run(run, video, text)
            self.residual = (out_video - video, out_text - text)
            return out_video, out_text

    cache = demo_pipe.enable_cache(EveryOtherStep())
    try:
        frames = generate(demo_pipe)
    finally:
        demo_pipe.disable_cache()
    blocks = len(demo_pipe.transformer.transformer_blocks)
    assert cache.stats == {"blocks_run": blocks * STEPS // 2, "blocks_skipped": blocks * STEPS // 2}
    assert frames.shape == uncached.shape and not np.array_equal(frames, uncached)
    with pytest.raises(TypeError, match="go to the cache's constructor"):
        demo_pipe.enable_cache(EveryOtherStep(), threshold=1)
