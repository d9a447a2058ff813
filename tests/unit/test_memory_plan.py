"""The memory plan (cogvideox.memory_plan): the plan chosen for the published models on simulated GPUs of six
sizes, the estimates against a live-tensor meter, and the pipeline following a plan on a simulated device (the
CPU with an injected free-memory figure): placement, per-call re-planning, exact frames, and the bad input."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from cogvideox import Pipeline, cli
from cogvideox.configs import T5Config, VAEConfig
from cogvideox.loading import build_on_meta
from cogvideox.memory_plan import (
    PLANS,
    CallSize,
    Weights,
    candidates,
    default_call_size,
    plan_for_mode,
    plan_memory,
    transformer_step_bytes,
)
from cogvideox.presets import T5_XXL, transformer_config
from cogvideox.text import T5Encoder
from cogvideox.transformer import Transformer
from cogvideox.vae import VAE

GiB = 2**30
FREE_GIB = (80, 40, 24, 16, 12, 8)
# Published dtypes: 2B in float16, the 5B models in bfloat16 (their model cards).
MODELS = {"CogVideoX-2b": torch.float16, "CogVideoX-5b": torch.bfloat16, "CogVideoX1.5-5B": torch.bfloat16}
# (offload mode, VAE decode) chosen at the model's default size for each free-memory figure of FREE_GIB; the table
# of docs/performance.md ("The plan per GPU").
EXPECTED = {
    "CogVideoX-2b": ["none/untiled", "none/untiled", "none/untiled", "text/untiled", "model/untiled",
                     "sequential/tiled"],
    "CogVideoX-5b": ["none/untiled", "none/untiled", "text/untiled", "model/untiled", "sequential/tiled",
                     "sequential/tiled"],
    "CogVideoX1.5-5B": ["none/untiled", "text/untiled", "text/tiled", "sequential/tiled", "sequential/tiled",
                        "sequential/tiled"],
}  # fmt: skip


@functools.cache
def published(name: str) -> tuple[T5Encoder, Transformer, VAE]:
    """The published model's components at real size on the meta device (no weights)."""
    dtype = MODELS[name]
    text_encoder = build_on_meta(lambda: T5Encoder(T5Config(**T5_XXL), dtype=dtype))
    transformer = build_on_meta(lambda: Transformer(transformer_config(name), dtype=dtype))
    vae = build_on_meta(lambda: VAE(VAEConfig(), dtype=dtype))
    return text_encoder, transformer, vae


@pytest.mark.parametrize("name", list(MODELS))
def test_the_plan_for_each_published_model_and_gpu_size(name):
    text_encoder, transformer, vae = published(name)
    size = default_call_size(transformer.config, vae, image_to_video=False)
    chosen = []
    for free in FREE_GIB:
        plan = plan_memory(text_encoder, transformer, vae, size, free * GiB)
        chosen.append(f"{plan.mode}/{plan.vae_decode}")
        if (name, free) == ("CogVideoX1.5-5B", 8):
            # Nothing fits: sequential offload needs ~9.7 GiB for the 81x768x1360 step (the model card says
            # "from 10 GB" for 1.5 with sequential offload and tiling). The pipeline warns at load and refuses a
            # call only when the decode cannot fit.
            assert not plan.fits and 8 * GiB < plan.peak < 10 * GiB and plan.peak_phase == "denoising"
        else:
            assert plan.fits and plan.peak <= free * GiB
        # Auto picks the first candidate that fits: every earlier one must not fit.
        for mode, tiles in candidates():
            if (mode, tiles) == (plan.mode, plan.vae_decode == "tiled"):
                break
            earlier = plan_for_mode(mode, text_encoder, transformer, vae, size, free * GiB, tiles=tiles)
            if earlier.vae_decode != "tiled" or tiles:
                assert not earlier.fits, (free, mode, tiles)
    assert chosen == EXPECTED[name]


def test_weights_are_the_published_sizes():
    weights = Weights.of(*published("CogVideoX-5b"))
    assert weights.text_encoder == 2 * 4_762_310_656  # T5-XXL encoder, bf16
    assert weights.transformer == 2 * sum(p.numel() for p in published("CogVideoX-5b")[1].parameters())
    assert 10.3 * GiB < weights.transformer < 10.4 * GiB
    # Sequential offload keeps the non-block parts and two blocks: 42 blocks of ~0.24 GiB each.
    block = (weights.transformer - weights.transformer_streamed) / 40
    assert 0.24 * GiB < block < 0.25 * GiB


def test_forced_modes_order_their_peaks():
    text_encoder, transformer, vae = published("CogVideoX-5b")
    size = default_call_size(transformer.config, vae, image_to_video=False)
    peaks = [plan_memory(text_encoder, transformer, vae, size, None, memory=mode).peak for mode in PLANS[1:]]
    assert peaks == sorted(peaks, reverse=True)  # each mode needs less than the one before
    assert all(p.forced for p in [plan_memory(text_encoder, transformer, vae, size, None, memory="model")])


def test_larger_calls_need_larger_plans():
    text_encoder, transformer, vae = published("CogVideoX1.5-5B")
    small = CallSize(1, 49, 480, 720)
    large = CallSize(1, 81, 768, 1360)
    at_40 = [plan_memory(text_encoder, transformer, vae, size, 40 * GiB) for size in (small, large)]
    assert [(p.mode, p.vae_decode) for p in at_40] == [("none", "untiled"), ("text", "untiled")]
    # Two videos at once decode one at a time before they tile.
    two = plan_memory(text_encoder, transformer, vae, CallSize(2, 49, 480, 720), 32 * GiB)
    assert (two.mode, two.vae_decode) == ("none", "sliced")
    latents_only = plan_memory(text_encoder, transformer, vae, CallSize(1, 81, 768, 1360, decodes=False), 40 * GiB)
    assert latents_only.vae_decode is None and latents_only.mode == "none"


# ---------------------------------------------------------------------------------------------- estimates


def test_transformer_estimate_covers_the_measured_step():
    from benchmarks._common import LiveTensorBytes, fill_random_

    config = transformer_config("CogVideoX-5b")
    config = type(config)(**{**config.__dict__, "num_layers": 2})
    model = fill_random_(build_on_meta(lambda: Transformer(config)).to_empty(device="cpu").eval(), seed=0)
    size = CallSize(1, 13, 96, 128, text_length=226)  # 4 latent frames of 12x16: 384 video tokens
    latents = torch.randn(2, 4, 16, 12, 16)  # guided: batch 2
    meter = LiveTensorBytes()
    with torch.no_grad(), meter:
        model(latents, torch.randn(2, 226, 4096), torch.full((2,), 500.0))
    estimate = transformer_step_bytes(config, size, torch.float32, 8, 4)
    # The estimate holds the 1.25 margin over the measured factor (13.1 at these widths) plus the loop's state.
    assert meter.peak < estimate < 1.5 * meter.peak


def test_vae_encode_estimate_covers_the_measured_encode():
    from benchmarks._common import LiveTensorBytes, fill_random_
    from cogvideox.memory import vae_encode_bytes

    vae = fill_random_(build_on_meta(lambda: VAE(VAEConfig())).to_empty(device="cpu").eval(), seed=0)
    for shape in [(1, 3, 1, 32, 48), (1, 3, 17, 32, 32)]:
        video = torch.rand(shape) * 2 - 1
        meter = LiveTensorBytes()
        with torch.no_grad(), meter:
            vae.encode(video)
        estimate = vae_encode_bytes(vae, shape) - video.numel() * 4  # the input is counted by the estimate only
        assert meter.peak < estimate < 1.4 * meter.peak, shape


# ---------------------------------------------------------------------------------------------- the pipeline

PROMPT = "a red circle moves to the right"
CALL = {"num_inference_steps": 2, "output_type": "pt"}


def _demo() -> Pipeline:
    pipe = Pipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(pipe: Pipeline, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**CALL, **kwargs}).frames


def _simulate(pipe: Pipeline, free: int) -> None:
    """Make the CPU a device with ``free`` bytes of free memory."""
    pipe.memory.free_bytes = lambda device: free


@pytest.fixture(scope="module")
def baseline():
    pipe = _demo()
    return {"small": _frames(pipe), "large": _frames(pipe, num_videos_per_prompt=3)}


def _peaks(pipe: Pipeline, size: CallSize) -> dict[str, int]:
    parts = (pipe.text_encoder, pipe.transformer, pipe.vae)
    return {mode: plan_for_mode(mode, *parts, size, None, tiles=False).peak for mode in PLANS[1:]}


def test_auto_places_the_components_by_the_free_memory(baseline):
    pipe = _demo()
    peaks = _peaks(pipe, pipe._default_call_size())
    for free, mode in [(10 * GiB, "none"), (peaks["text"], "text"), (peaks["model"], "model"),
                       (peaks["sequential"], "sequential")]:  # fmt: skip
        _simulate(pipe, free)
        plan = pipe.set_memory_plan("auto", "cpu")
        assert plan.mode == mode and plan.fits and pipe.memory_plan is plan
        assert pipe.memory.mode == (None if mode == "none" else mode)  # the offload hooks of that mode
        assert torch.equal(_frames(pipe), baseline["small"])  # every plan is exact
    assert "memory plan 'auto' (sequential)" in repr(pipe)
    text = repr(pipe.memory_plan)
    assert "transformer: host memory; its blocks stream to cpu two at a time" in text
    assert "headroom" in text and "decoding:" in text


def test_components_load_where_the_plan_keeps_them(monkeypatch):
    """Under a plan on a GPU each component loads where the plan for a default call keeps it (estimated from the
    configs on the meta device, before any weight is read): resident ones straight onto the GPU, visiting ones into
    host memory, never onto the GPU and back. Checked with a simulated GPU of each size."""
    import cogvideox.memory as memory_module
    from cogvideox.demo import demo_model_path
    from cogvideox.pipeline import _where_to_load

    pipe = _demo()
    peaks = _peaks(pipe, pipe._default_call_size())
    gpu, host = torch.device("cuda"), torch.device("cpu")
    names = ("transformer", "vae", "text_encoder")
    expected = {"none": dict.fromkeys(names, gpu), "text": {"transformer": gpu, "vae": gpu, "text_encoder": host},
                "model": dict.fromkeys(names, host), "sequential": dict.fromkeys(names, host)}  # fmt: skip
    given = dict.fromkeys(names)
    for free, mode in [(10 * GiB, "none"), (peaks["text"], "text"), (peaks["model"], "model"),
                       (peaks["sequential"], "sequential")]:  # fmt: skip
        monkeypatch.setattr(memory_module, "free_device_bytes", lambda device, free=free: free)
        where = _where_to_load(demo_model_path(), torch.float32, "auto", gpu, given, image_to_video=None,
                               control=False, parallel=False)  # fmt: skip
        assert where == expected[mode], mode
        # A forced plan loads as that plan keeps the components, whatever the free memory.
        forced = _where_to_load(demo_model_path(), torch.float32, "text", gpu, given, image_to_video=None,
                                control=False, parallel=False)  # fmt: skip
        assert forced == expected["text"]
    # Under parallel inference the plan keeps to "none" and "text": the most it offloads is the text encoder.
    where = _where_to_load(demo_model_path(), torch.float32, "auto", gpu, given, image_to_video=None, control=False,
                           parallel=True)  # fmt: skip
    assert where == expected["text"]
    # Without a plan everything loads on the device asked for; a plan on the CPU loads on the host.
    assert _where_to_load(demo_model_path(), torch.float32, None, gpu, given, image_to_video=None, control=False,
                          parallel=False) == dict.fromkeys(names, gpu)  # fmt: skip


def test_auto_re_plans_for_each_call_size(baseline, caplog):
    pipe = _demo()
    small = pipe._default_call_size()
    large = CallSize(3, 9, 32, 32, text_length=small.text_length)
    _simulate(pipe, _peaks(pipe, small)["none"])  # everything fits at the default size, not for three videos
    assert pipe.set_memory_plan("auto", "cpu").mode == "none"
    with caplog.at_level(logging.INFO, logger="cogvideox.switches"):
        frames = _frames(pipe, num_videos_per_prompt=3)
    plan = pipe.memory_plan
    assert plan.size == large and (plan.mode, plan.vae_decode) == ("text", "sliced") and pipe.memory.mode == "text"
    # One video at a time: the same arithmetic per video, up to the convolution kernels' batch blocking.
    assert (frames - baseline["large"]).abs().max() < 1e-6
    assert pipe.vae.use_slicing is False  # the VAE's own switch is back as it was
    assert f"memory plan '{plan.mode}'" in caplog.text and "for 3 videos of 9x32x32, guided" in caplog.text
    assert torch.equal(_frames(pipe), baseline["small"])
    assert pipe.memory_plan.mode == "none" and pipe.memory.mode is None  # back to resident for the small call


def test_a_refused_call_moves_nothing():
    pipe = _demo()
    _simulate(pipe, _peaks(pipe, pipe._default_call_size())["none"])
    plan = pipe.set_memory_plan("auto", "cpu")
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        _frames(pipe, num_videos_per_prompt=3, num_inference_steps=0)  # three videos would need another plan
    assert pipe.memory.mode is None and pipe.memory_plan is plan


def test_without_automatic_tiling_the_plan_counts_on_no_slicing_either():
    pipe = _demo()
    _simulate(pipe, 30 * 2**20)  # three videos decoded at once (~24.5 MiB with the VAE) fit, not with all weights
    pipe.set_vae_memory_budget(auto_tiling=False)
    pipe.set_memory_plan("auto", "cpu")
    decoded = []
    original = pipe.vae.decode
    pipe.vae.decode = lambda z: decoded.append((z.shape[0], pipe.vae.use_slicing)) or original(z)
    _frames(pipe, num_videos_per_prompt=3)
    assert pipe.memory_plan.vae_decode == "untiled"  # as the VAE runs: the whole batch at once
    assert decoded == [(3, False)]


def test_lora_switches_work_under_the_plans_sequential_offload(tmp_path):
    """A plan that chose sequential offload steps aside for load_lora/unload_lora (which change layers inside
    the streamed blocks) and places the components again after: the frames are those of a plain pipeline."""
    from tests.unit.test_lora import lora_tensors, write

    plain = _demo()
    dim, layers = plain.transformer.config.inner_dim, len(plain.transformer.transformer_blocks)
    lora = write(tmp_path / "lora.safetensors", lora_tensors(num_layers=layers, dim=dim, seed=5))
    plain.load_lora(lora)
    expected = _frames(plain)
    pipe = _demo()
    _simulate(pipe, _peaks(pipe, pipe._default_call_size())["sequential"])
    assert pipe.set_memory_plan("auto", "cpu").mode == "sequential"
    pipe.load_lora(lora)
    assert pipe.memory.mode == "sequential" and pipe.memory.setting == "auto"
    assert torch.equal(_frames(pipe), expected)
    pipe.unload_lora()
    assert pipe.memory.mode == "sequential"


def test_components_the_plan_cannot_estimate_get_the_old_default(caplog):
    """A fork's text encoder without a config: "auto" places the text encoder's offload (what loading onto CUDA
    did before plans) and says why, instead of failing."""
    pipe = _demo()
    _simulate(pipe, 10 * GiB)
    pipe.text_encoder.config = object()  # no d_model
    with caplog.at_level(logging.WARNING):
        assert pipe.set_memory_plan("auto", "cpu") is None
    assert pipe.memory.mode == "text" and pipe.memory.setting == "auto"
    assert "the memory plan cannot estimate these components" in caplog.text and "using memory='text'" in caplog.text


def test_a_switch_of_the_user_replaces_the_plan(baseline):
    pipe = _demo()
    _simulate(pipe, 10 * GiB)
    pipe.set_memory_plan("auto", "cpu")
    pipe.enable_model_cpu_offload("cpu")
    assert pipe.memory.setting is None
    _frames(pipe, num_videos_per_prompt=3)
    assert pipe.memory.mode == "model"  # not re-planned
    assert pipe.memory_plan.chosen_by == "the pipeline's switches" and pipe.memory_plan.mode == "model"


def test_forced_plan_that_does_not_fit_warns_with_the_plan_that_would(caplog):
    pipe = _demo()
    peaks = _peaks(pipe, pipe._default_call_size())
    _simulate(pipe, peaks["model"])
    with caplog.at_level(logging.WARNING):
        plan = pipe.set_memory_plan("none", "cpu")
    assert plan.mode == "none" and not plan.fits and pipe.memory.mode is None
    expected = (
        f"memory='none' needs ~{plan.peak / 2**20:.1f} MiB at its peak (decoding) for 1 video of 9x32x32, guided, but "
        f"cpu has {peaks['model'] / 2**20:.1f} MiB free: it may run out of memory; memory='model' would fit"
    )
    assert expected in caplog.text


def test_auto_where_free_memory_is_unknown_says_no_plan_is_needed(caplog):
    pipe = _demo()
    with caplog.at_level(logging.WARNING):
        assert pipe.set_memory_plan("auto", "cpu") is None
    assert "memory='auto' on cpu: no memory plan is needed there" in caplog.text
    assert pipe.memory.setting is None and pipe.memory.mode is None
    with caplog.at_level(logging.WARNING):
        Pipeline.from_pretrained(memory="auto")
    assert caplog.text.count("no memory plan is needed") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_loading():
    with pytest.raises(RuntimeError, match="device=cuda: CUDA is not available in this PyTorch build or machine"):
        Pipeline.from_pretrained("/no/such/folder", device="cuda")
    with pytest.raises(RuntimeError, match="set_memory_plan on cuda: CUDA is not available"):
        _demo().set_memory_plan("model", "cuda")


def test_unknown_plan_is_refused_before_loading():
    message = "memory='fast': choose one of 'auto', 'none', 'text', 'model', 'sequential'"
    with pytest.raises(ValueError, match=message):
        Pipeline.from_pretrained("/no/such/folder", memory="fast")
    with pytest.raises(ValueError, match="pass one of them"):
        Pipeline.from_pretrained("/no/such/folder", memory="model", text_encoder_offload=True)
    with pytest.raises(ValueError, match=message):
        _demo().set_memory_plan("fast")


def test_a_decode_that_cannot_fit_even_in_tiles_is_refused_before_denoising():
    pipe = _demo()
    size = CallSize(1, 9, 64, 64, text_length=pipe._default_call_size().text_length)
    smallest = plan_for_mode("sequential", pipe.text_encoder, pipe.transformer, pipe.vae, size, 1)
    decode = smallest.phases[-1]
    assert smallest.vae_decode == "tiled" and decode.name == "decoding"
    _simulate(pipe, decode.peak - 1)
    pipe.set_memory_plan("auto", "cpu")
    runs = []
    pipe.transformer.register_forward_pre_hook(lambda *args: runs.append(1))
    need = decode.peak / 2**20
    with pytest.raises(
        ValueError,
        match=rf"the decode of 1 video of 9x64x64, guided cannot fit: even with sequential "
        rf"CPU offload and the VAE in tiles it needs ~{need:.1f} MiB, and cpu has ",
    ):
        _frames(pipe, height=64, width=64)
    assert runs == []  # refused before any denoising
    assert _frames(pipe, height=64, width=64, output_type="latent").shape[-1] == 8  # latents need no decode


def test_cli_memory_options(tmp_path, capsys):
    assert cli.MEMORY_PLANS == PLANS
    out = str(tmp_path / "x.gif")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "x", "--memory", "fast", "--output", out])
    assert exit_info.value.code == 2
    assert "argument --memory: invalid choice: 'fast'" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "x", "--memory", "model", "--offload", "model", "--output", out]) == 2
    assert "--memory model and --offload model: give one of them" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", PLANS[1:])
def test_predicted_peak_is_never_below_the_measured_one_on_cuda(mode, tmp_path):
    """5B widths with 2 of 42 blocks, T5-XXL widths with 2 of 24 blocks, the published VAE, 49x480x720, bf16, one
    guided step: the plan's peak against ``max_memory_reserved`` (benchmarks/e2e.py measures the whole model)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from benchmarks import e2e

    args = e2e.parse_args(["--device", "cuda", "--layers", "2", "--text-layers", "2", "--no-results"])
    pipe = e2e.build_pipeline(args, torch.device("cuda"), torch.bfloat16, tmp_path)
    e2e._to_host_all(pipe)
    torch.cuda.empty_cache()
    plan = pipe.set_memory_plan(mode, "cuda")
    torch.cuda.reset_peak_memory_stats()
    pipe("a panda", num_inference_steps=1, num_frames=49, height=480, width=720, output_type="pt")
    measured = torch.cuda.max_memory_reserved()
    predicted = plan_memory(pipe.text_encoder, pipe.transformer, pipe.vae, plan.size, None, memory=mode).peak
    print(f"{mode}: predicted {predicted / GiB:.2f} GiB, reserved {measured / GiB:.2f} GiB")
    assert measured <= predicted
