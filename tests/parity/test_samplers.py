"""Samplers against diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler, driven as the reference pipelines
drive them (pipeline_cogvideox.py and pipeline_cogvideox_video2video.py): whole trajectories from a
deterministic fake model, the same noise draws, the same schedule tables."""

from __future__ import annotations

import json
import types

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXVideoToVideoPipeline

from cogvideox.presets import SCHEDULER_2B, SCHEDULER_5B
from cogvideox.samplers import DDIMSampler, DPMSampler, SamplerState, make_sampler
from tests.helpers import rel_err

# scheduler/scheduler_config.json of the published checkpoints (kijai/ComfyUI-CogVideoXWrapper configs/).
PUBLISHED = {"2b": SCHEDULER_2B, "5b": SCHEDULER_5B}
REFERENCE = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
TOL = 1e-6


def reference_scheduler(kind: str, model: str, **overrides):
    config = {k: v for k, v in PUBLISHED[model].items() if not k.startswith("_")}
    return REFERENCE[kind](**{**config, **overrides})


def fake_model(sample: torch.Tensor, timestep) -> torch.Tensor:
    """A deterministic stand-in for the transformer: a smooth function of the latents and the timestep value."""
    t = float(timestep)
    x = sample.float()
    return 0.8 * torch.sin(1.3 * x + t / 250.0) + 0.05 * x * (t / 1000.0) - 0.1


def run_reference(scheduler, timesteps, latents, *, eta, generator):
    """The reference pipeline's loop: float32 model output, DPM gets old x0 and timesteps[i - 1], cast back."""
    dtype = latents.dtype
    dpm = isinstance(scheduler, CogVideoXDPMScheduler)
    trajectory, old_x0 = [], None
    for i, t in enumerate(timesteps):
        noise_pred = fake_model(latents, t).float()
        if dpm:
            back = timesteps[i - 1] if i > 0 else None
            latents, old_x0 = scheduler.step(
                noise_pred, old_x0, t, back, latents, eta=eta, generator=generator, return_dict=False
            )
        else:
            latents = scheduler.step(noise_pred, t, latents, eta=eta, generator=generator, return_dict=False)[0]
        latents = latents.to(dtype)
        trajectory.append(latents)
    return trajectory


def run_ours(sampler, timesteps, latents, *, eta, generator):
    dtype = latents.dtype
    trajectory, state = [], SamplerState()
    for t in timesteps:
        result = sampler.step(fake_model(latents, t), t, latents, state, generator=generator, eta=eta)
        latents, state = result.prev_sample.to(dtype), result.state
        trajectory.append(latents)
    return trajectory


def start_latents(shape=(2, 3, 4, 6, 5), dtype=torch.float32, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def trajectory_error(ours, ref) -> float:
    assert len(ours) == len(ref)
    return max(rel_err(a, b) for a, b in zip(ours, ref, strict=True))


def compare_trajectories(kind, model, spacing, steps, eta, *, dtype=torch.float32, generator_of=None, **overrides):
    """Run both from the same latents and seed; return (max relative error over all steps, generators equal)."""
    ref = reference_scheduler(kind, model, timestep_spacing=spacing, **overrides)
    ours = make_sampler(PUBLISHED[model], kind=kind, timestep_spacing=spacing, **overrides)
    ref.set_timesteps(steps)
    timesteps = ours.set_timesteps(steps)
    assert torch.equal(timesteps, ref.timesteps)
    make_gen = generator_of or (lambda: torch.Generator().manual_seed(7))
    gen_ref, gen_ours = make_gen(), make_gen()
    latents = start_latents(dtype=dtype)
    ref_traj = run_reference(ref, ref.timesteps, latents.clone(), eta=eta, generator=gen_ref)
    our_traj = run_ours(ours, timesteps, latents.clone(), eta=eta, generator=gen_ours)
    gens_ref = gen_ref if isinstance(gen_ref, list) else [gen_ref]
    gens_ours = gen_ours if isinstance(gen_ours, list) else [gen_ours]
    same_draws = all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens_ref, gens_ours, strict=True))
    return trajectory_error(our_traj, ref_traj), same_draws


@pytest.mark.parametrize("steps", [1, 2, 5, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 1.0), ("dpm", 0.0), ("dpm", 1.0)])
@pytest.mark.parametrize("model", ["2b", "5b"])
def test_trajectory_matches_reference(model, kind, eta, spacing, steps):
    err, same_draws = compare_trajectories(kind, model, spacing, steps, eta)
    assert err <= TOL, f"max relative error over the trajectory {err:.3g}"
    assert same_draws, "the generators drew different amounts of noise"


def test_dpm_draws_noise_and_ddim_does_not():
    """Guards the test above against vacuous RNG checks: DPM consumes the generator, DDIM leaves it untouched."""
    for kind, consumes in [("dpm", True), ("ddim", False)]:
        sampler = make_sampler(PUBLISHED["5b"], kind=kind)
        gen = torch.Generator().manual_seed(7)
        before = gen.get_state()
        run_ours(sampler, sampler.set_timesteps(5), start_latents(), eta=1.0, generator=gen)
        assert torch.equal(gen.get_state(), before) != consumes


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("model", ["2b", "5b"])
def test_bfloat16_latents_bit_equal(model, kind):
    """The real pipeline keeps latents in bf16 with a float32 model output; noise is drawn in bf16. Same bits."""
    err, same_draws = compare_trajectories(kind, model, "trailing", 8, 0.0, dtype=torch.bfloat16)
    assert err == 0.0 and same_draws


def test_generator_list_matches_reference():
    def make():
        return [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]

    err, same_draws = compare_trajectories("dpm", "5b", "trailing", 6, 0.0, generator_of=make)
    assert err <= TOL and same_draws


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize(
    "overrides",
    [
        # Epsilon divides by sqrt(alpha), which is 0 at t = 999 with zero terminal SNR: NaN in both, so not with it.
        {"prediction_type": "epsilon", "rescale_betas_zero_snr": False},
        {"prediction_type": "sample"},
        {"set_alpha_to_one": False},
        {"steps_offset": 1},
        {"beta_schedule": "linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"rescale_betas_zero_snr": False},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_other_config_keys_match_reference(kind, overrides):
    spacing = "leading" if "steps_offset" in overrides else "trailing"
    err, same_draws = compare_trajectories(kind, "2b", spacing, 7, 0.0, **overrides)
    assert err <= TOL and same_draws


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [True, False])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_tables_equal_reference(beta_schedule, zero_snr, shift):
    overrides = {"beta_schedule": beta_schedule, "rescale_betas_zero_snr": zero_snr, "snr_shift_scale": shift}
    ref = reference_scheduler("ddim", "2b", **overrides)
    ours = make_sampler(PUBLISHED["2b"], **overrides)
    assert ours.alphas_cumprod.dtype == ref.alphas_cumprod.dtype
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod.double(), ref.final_alpha_cumprod.double())
    assert ours.init_noise_sigma == ref.init_noise_sigma


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_equal_reference_for_every_step_count(spacing):
    ref = reference_scheduler("ddim", "5b", timestep_spacing=spacing)
    ours = make_sampler(PUBLISHED["5b"], timestep_spacing=spacing)
    diverging = []
    for steps in range(1, 1001):
        ref.set_timesteps(steps)
        ours_ts = ours.set_timesteps(steps)
        if len(ref.timesteps) == steps:
            assert torch.equal(ours_ts, ref.timesteps), steps
        else:
            # Documented divergence: the reference's trailing spacing appends a timestep -1 for some counts.
            assert spacing == "trailing" and ref.timesteps[-1] == -1 and len(ref.timesteps) == steps + 1
            assert torch.equal(ours_ts, ref.timesteps[:steps])
            diverging.append(steps)
    if spacing == "trailing":
        assert diverging[:3] == [61, 103, 121] and len(diverging) == 62
    else:
        assert diverging == []


@pytest.mark.parametrize("steps,strength", [(50, 0.8), (50, 1.0), (10, 0.7), (7, 0.3), (25, 0.04), (1, 1.0)])
def test_strength_cut_matches_reference(steps, strength):
    ref = reference_scheduler("dpm", "5b")
    ref.set_timesteps(steps)
    fake_pipe = types.SimpleNamespace(scheduler=ref)
    ref_ts, ref_n = CogVideoXVideoToVideoPipeline.get_timesteps(fake_pipe, steps, ref.timesteps, strength, "cpu")
    ts, n = make_sampler(PUBLISHED["5b"], kind="dpm").timesteps_for_strength(steps, strength)
    assert torch.equal(ts, ref_ts) and n == ref_n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_matches_reference(dtype):
    ref = reference_scheduler("ddim", "2b")
    ours = make_sampler(PUBLISHED["2b"])
    clean, noise = start_latents(dtype=dtype, seed=2), start_latents(dtype=dtype, seed=3)
    for timestep in [torch.tensor([999, 3]), torch.tensor([500]), torch.tensor(0)]:
        expected = ref.add_noise(clean, noise, timestep)
        assert torch.equal(ours.add_noise(clean, noise, timestep), expected)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_video_to_video_trajectory_matches_reference(kind):
    """V2V: noise the clean latents to the first kept timestep, then run only the kept steps."""
    steps, strength = 12, 0.6
    ref, ours = reference_scheduler(kind, "5b"), make_sampler(PUBLISHED["5b"], kind=kind)
    ref.set_timesteps(steps)
    ref_ts, _ = CogVideoXVideoToVideoPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=ref), steps, ref.timesteps, strength, "cpu"
    )
    ts, _ = ours.timesteps_for_strength(steps, strength)
    clean, noise = start_latents(seed=4), start_latents(seed=5)
    start_ref = ref.add_noise(clean, noise, ref_ts[:1].repeat(clean.shape[0]))
    start_ours = ours.add_noise(clean, noise, ts[:1].repeat(clean.shape[0]))
    gen_ref, gen_ours = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ref_traj = run_reference(ref, ref_ts, start_ref, eta=0.0, generator=gen_ref)
    our_traj = run_ours(ours, ts, start_ours, eta=0.0, generator=gen_ours)
    assert trajectory_error(our_traj, ref_traj) <= TOL
    assert torch.equal(gen_ref.get_state(), gen_ours.get_state())


@pytest.mark.parametrize(
    "class_name,kind", [("CogVideoXDDIMScheduler", DDIMSampler), ("CogVideoXDPMScheduler", DPMSampler)]
)
def test_make_sampler_reads_the_saved_reference_config(tmp_path, class_name, kind):
    """A scheduler folder written by the reference's save_config builds the class it names, with equal tables."""
    ref = REFERENCE["ddim" if kind is DDIMSampler else "dpm"](
        **{k: v for k, v in PUBLISHED["2b"].items() if not k.startswith("_")}
    )
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    ref.save_config(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == class_name
    for path in [tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json"]:
        sampler = make_sampler(path)
        assert type(sampler) is kind
        assert torch.equal(sampler.alphas_cumprod, ref.alphas_cumprod)
    other = make_sampler(tmp_path, kind="dpm" if kind is DDIMSampler else "ddim")
    assert type(other) is not kind


@pytest.mark.parametrize("reference", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_defaults_equal_reference_defaults(tmp_path, reference):
    """A file that leaves every key out means the reference class's defaults (both classes share them)."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": reference.__name__}))
    ours, ref = make_sampler(tmp_path), reference()
    assert ours.reference_class == reference.__name__
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    for key, value in ref.config.items():
        if not key.startswith("_"):
            assert getattr(ours.config, key) == value, key


@pytest.mark.gpu
@pytest.mark.parametrize("video_to_video", [False, True])
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_cuda_bfloat16_trajectories_bit_equal(kind, video_to_video):
    """On CUDA, as the pipeline runs: timesteps and bf16 latents on the GPU, a CPU generator. For video-to-video the
    reference's add_noise moves its alpha table to the GPU, so its step coefficients live there from then on."""
    device = torch.device("cuda")
    steps = 12
    ref, ours = reference_scheduler(kind, "5b"), make_sampler(PUBLISHED["5b"], kind=kind)
    ref.set_timesteps(steps, device=device)
    ours.set_timesteps(steps, device=device)
    clean = start_latents(shape=(2, 3, 16, 12, 10), seed=4).to(device, torch.bfloat16)
    if video_to_video:
        fake_pipe = types.SimpleNamespace(scheduler=ref)
        ref_ts, _ = CogVideoXVideoToVideoPipeline.get_timesteps(fake_pipe, steps, ref.timesteps, 0.6, device)
        ts, _ = ours.timesteps_for_strength(steps, 0.6, device=device)
        noise = start_latents(shape=clean.shape, seed=5).to(device, torch.bfloat16)
        start_ref = ref.add_noise(clean, noise, ref_ts[:1].repeat(2))
        start_ours = ours.add_noise(clean, noise, ts[:1].repeat(2))
        assert torch.equal(start_ref, start_ours)
    else:
        ref_ts, ts, start_ref, start_ours = ref.timesteps, ours.timesteps, clean, clean.clone()
    assert torch.equal(ts, ref_ts) and ts.device.type == "cuda"
    gen_ref, gen_ours = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ref_traj = run_reference(ref, ref_ts, start_ref, eta=0.0, generator=gen_ref)
    our_traj = run_ours(ours, ts, start_ours, eta=0.0, generator=gen_ours)
    assert trajectory_error(our_traj, ref_traj) == 0.0
    assert torch.equal(gen_ref.get_state(), gen_ours.get_state())
