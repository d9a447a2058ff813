"""The GPU path at the 5B width (tests/gpu/real_width.py: the published 5B transformer with 2 of its 42 blocks):
every offload mode against everything resident, the attention backends against SDPA, fp8 weight storage against
bf16 weights, ``torch.compile`` against eager, and our bf16 transformer against the reference's.

Opt-in: ``pytest -m gpu tests/gpu`` on one CUDA GPU (~1 minute). ``COGVIDEOX_GPU_TESTS_ON_CPU=1`` runs the same
tests on the CPU at smaller sizes (tests/gpu/conftest.py), skipping or relaxing only what needs CUDA, each at an
explicit ``device.type == "cuda"`` branch.
"""

from __future__ import annotations

import gc
import importlib
import types
import warnings
from pathlib import Path

import pytest
import torch

from cogvideox import Pipeline, Transformer
from cogvideox.memory import tensor_bytes
from cogvideox.memory_plan import CallSize, plan_memory
from cogvideox.ops import attention, attention_math, use_attention_backend
from cogvideox.ops.fp8 import FP8, weight_bytes
from tests.gpu.real_width import PROMPT, TRANSFORMER, call_kwargs, rel_l2, transformer_inputs
from tests.helpers import rel_err
from tests.tiny_checkpoints import TEXT_LEN

pytestmark = pytest.mark.gpu

MiB = 2**20
SWITCHES = {
    "text": "enable_text_encoder_offload",
    "model": "enable_model_cpu_offload",
    "sequential": "enable_sequential_cpu_offload",
}


def _free(device: torch.device) -> None:
    """Release what earlier tests left, so that each peak measures one pipeline or model."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _load(checkpoint: Path, device: torch.device, memory: str | None = "none") -> Pipeline:
    pipe = Pipeline.from_pretrained(checkpoint, dtype=torch.bfloat16, device=device, memory=memory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: Pipeline, device: torch.device) -> tuple[torch.Tensor, int | None]:
    """The frames of one seeded call (on the host), and on CUDA the peak bytes this pipeline held on the GPU during
    it: its own tensors there before the call plus the most the call allocated on top. Whatever else is allocated
    (another test's leftovers) is left out, so the figure compares across tests. None on the CPU."""

    def call() -> torch.Tensor:
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call_kwargs(device)).frames.cpu()

    if device.type != "cuda":
        return call(), None
    gpu = torch.device("cuda", torch.cuda.current_device())  # tensors report cuda:0, not cuda
    torch.cuda.synchronize(gpu)
    own = sum(tensor_bytes(part, gpu) for part in (pipe.text_encoder, pipe.transformer, pipe.vae))
    before = torch.cuda.memory_allocated(gpu)
    torch.cuda.reset_peak_memory_stats(gpu)
    frames = call()  # .cpu() waits for the GPU
    return frames, torch.cuda.max_memory_allocated(gpu) - before + own


def _on_host(*modules: torch.nn.Module) -> bool:
    return all(t.device.type == "cpu" for m in modules for t in [*m.parameters(), *m.buffers()])


@pytest.fixture(scope="module")
def resident(checkpoint, device):
    """Everything resident (memory="none"): the frames every offload mode must give, and the peak it must beat."""
    _free(device)
    pipe = _load(checkpoint, device)
    frames, peak = _generate(pipe, device)
    again, _ = _generate(pipe, device)
    result = types.SimpleNamespace(
        frames=frames, again=again, peak=peak, text_encoder=tensor_bytes(pipe.text_encoder), vae=tensor_bytes(pipe.vae)
    )
    del pipe
    _free(device)
    return result


# ------------------------------------------------------------------------------------------------ offload


def test_resident_frames_are_repeatable_and_unsaturated(resident, device):
    """The baseline the offload tests compare to bitwise: two calls give the same frames, and the frames are not
    clamped flat (a saturated video would hide differences)."""
    kwargs = call_kwargs(device)
    assert resident.frames.shape == (1, kwargs["num_frames"], 3, kwargs["height"], kwargs["width"])
    assert torch.equal(resident.again, resident.frames)
    frames = resident.frames.float()
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    clamped = ((frames == 0) | (frames == 1)).float().mean().item()
    assert clamped <= 0.02, f"{clamped:.1%} of the pixels are clamped"  # 0.2 % on the CPU dry run
    assert frames.std().item() >= 0.01


@pytest.mark.parametrize("mode", list(SWITCHES))
def test_offload_switch_gives_the_resident_frames_in_less_memory(mode, checkpoint, device, resident):
    """Offload only changes where the weights live, so the frames equal the resident ones bitwise (same kernels on
    the same values). On CUDA the peak falls by at least half of what the mode keeps off the GPU while the
    transformer or VAE works: T5 ("text"), T5 and the VAE ("model", "sequential"); half, because allocator
    rounding and the call's own tensors move the two peaks by a few MiB."""
    _free(device)
    pipe = _load(checkpoint, device)
    getattr(pipe, SWITCHES[mode])(device=device)
    assert pipe.memory.mode == mode
    frames, peak = _generate(pipe, device)
    assert torch.equal(frames, resident.frames)
    if device.type == "cuda":
        kept_off = resident.text_encoder if mode == "text" else resident.text_encoder + resident.vae
        assert peak <= resident.peak - kept_off // 2, (
            f"{mode}: peak {peak / MiB:.1f} MiB, resident {resident.peak / MiB:.1f} MiB, expected at least "
            f"{kept_off / 2 / MiB:.1f} MiB less"
        )
        offloaded = [pipe.text_encoder] if mode == "text" else [pipe.text_encoder, pipe.transformer, pipe.vae]
        assert _on_host(*offloaded)  # back in host memory after the call


def test_auto_plan_with_room_keeps_everything_resident(checkpoint, device, resident):
    """memory="auto" (the CUDA default) on a GPU with room for everything picks the fastest plan: all resident,
    the same frames and the same peak (within 16 MiB of allocator noise)."""
    _free(device)
    pipe = _load(checkpoint, device, memory=None)  # from_pretrained's CUDA default: "auto" on the free memory
    if device.type != "cuda":
        # The CPU has no free-memory figure, so "auto" plans nothing there: report 1 TiB, as a large GPU would.
        pipe.memory.free_bytes = lambda _device: 2**40
        pipe.set_memory_plan("auto", device)
    frames, peak = _generate(pipe, device)
    assert pipe.memory.setting == "auto" and pipe.memory.plan.mode == "none"
    assert torch.equal(frames, resident.frames)
    if device.type == "cuda":
        assert peak <= resident.peak + 16 * MiB


def test_auto_plan_in_little_memory_offloads_and_matches(checkpoint, device, resident):
    """With a capacity between the estimated peaks of model offload and the text encoder's offload, "auto" must
    choose model offload with an untiled VAE (exact): the resident frames bitwise, a peak within the capacity it
    was given, and at least half of T5 + VAE below the resident peak (as for the switch)."""
    _free(device)
    pipe = _load(checkpoint, device="cpu", memory=None)  # weights on the host: the plan places them
    kwargs = call_kwargs(device)
    size = CallSize(1, kwargs["num_frames"], kwargs["height"], kwargs["width"], text_length=TEXT_LEN)
    peaks = {
        mode: plan_memory(pipe.text_encoder, pipe.transformer, pipe.vae, size, None, memory=mode).peak
        for mode in ("none", "text", "model")
    }
    assert peaks["model"] < peaks["text"] <= peaks["none"], peaks
    capacity = (peaks["model"] + peaks["text"]) // 2
    pipe.memory.free_bytes = lambda _device: capacity  # a smaller GPU, as the plan sees it
    pipe.set_memory_plan("auto", device)  # plans the default 49x480x720 call (nothing fits: a warning), then ...
    frames, peak = _generate(pipe, device)  # ... re-plans for this call's size
    plan = pipe.memory.plan
    assert (plan.mode, plan.vae_decode, plan.size) == ("model", "untiled", size)
    assert torch.equal(frames, resident.frames)
    if device.type == "cuda":
        assert peak <= capacity, f"peak {peak / MiB:.1f} MiB over the {capacity / MiB:.1f} MiB capacity"
        assert peak <= resident.peak - (resident.text_encoder + resident.vae) // 2
        assert _on_host(pipe.text_encoder, pipe.transformer, pipe.vae)


# ------------------------------------------------------------------------------------------------ kernels

# The package each optional backend imports (either name), for a skip that says what is missing.
KERNEL_PACKAGES = {"flash": ("flash_attn_interface", "flash_attn"), "sage": ("sageattention",)}


def _why_not_importable(backend: str) -> str | None:
    """None when one of the backend's packages imports; else each one's error. A package built for another torch
    or CUDA fails with OSError or RuntimeError rather than ImportError: that too means the backend cannot run here."""
    errors = []
    for name in KERNEL_PACKAGES[backend]:
        try:
            importlib.import_module(name)
            return None
        except Exception as error:  # not only ImportError: see the docstring
            errors.append(f"{name}: {type(error).__name__}: {error}")
    return "; ".join(errors)


@pytest.mark.parametrize("backend", ["math", "flash", "sage"])
def test_attention_backend_matches_sdpa_in_bf16(backend, device):
    """One guided step's attention at the 5B head shape (48 heads of 64; 226 text + 1536 video tokens on CUDA), bf16
    inputs, against SDPA. math and flash are exact attention rounded to bf16 (flash also rounds the probabilities
    to bf16 before the second product, as SDPA's flash kernel does): within a few bf16 steps (2**-8 relative) of the
    largest output, so max |diff| / max |sdpa| <= 1e-2. SageAttention quantizes q and k to int8 and P and V to fp8
    (e4m3: 3.6 % RMS rounding each): its relative L2 error from exact float32 attention is ~5 %, bound 0.1."""
    if backend in KERNEL_PACKAGES:
        why = _why_not_importable(backend)
        if why is not None:
            pytest.skip(f"attention backend {backend!r} needs {' or '.join(KERNEL_PACKAGES[backend])}: {why}")
        if device.type != "cuda":
            pytest.skip(f"the {backend!r} kernels run on CUDA only (on the CPU the call falls back to SDPA)")
    tokens = 226 + 1536 if device.type == "cuda" else 16 + 48
    heads, head_dim = TRANSFORMER["num_attention_heads"], TRANSFORMER["attention_head_dim"]
    gen = torch.Generator().manual_seed(0)
    # q and k as the blocks' q/k LayerNorms leave them (unit scale, here 1.5 for sharper attention than uniform).
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=gen) * s for s in (1.5, 1.5, 1.0))
    exact = attention_math(q, k, v)  # float32 in, float32 out
    q, k, v = (x.to(device, torch.bfloat16) for x in (q, k, v))
    with use_attention_backend("sdpa"):
        sdpa = attention(q, k, v)
    with use_attention_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attention(q, k, v)
    if device.type == "cuda":  # a call the kernel cannot take falls back to SDPA with a warning: it must not here
        assert not caught, [str(w.message) for w in caught]
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    if backend == "sage":
        err = rel_l2(out, exact)
        assert err <= 0.1, f"sage: relative L2 error {err:.2e} from exact attention"
    else:
        err = rel_err(out, sdpa)
        assert err <= 1e-2, f"{backend}: max |diff| / max |sdpa| = {err:.2e}"
        # and no further from exact attention than SDPA itself is, give or take bf16 rounding of the output
        assert rel_l2(out, exact) <= 1.5 * rel_l2(sdpa, exact) + 2**-9


def test_fp8_weight_storage_is_close_to_bf16_weights(checkpoint, device):
    """enable_fp8_weight_storage(): the blocks' linear weights stored as e4m3 with per-row power-of-two scales. The
    blocks' weight bytes halve (<= 0.52x: int8 exponents and bf16 biases stay), on CUDA so does what they allocate,
    and the output moves by weight rounding alone. e4m3 keeps 3 mantissa bits: ~2-3 % RMS error a weight,
    independent along a row, so each layer's output moves by about as much, relative. Bound: relative L2 <= 6e-2
    from the bf16-weight output (3.0e-2 on the CPU dry run; the weights round the same way on any device)."""
    _free(device)
    model = Transformer.from_pretrained(checkpoint / "transformer", dtype=torch.bfloat16, device=device)
    inputs = transformer_inputs(device, torch.bfloat16)
    with torch.no_grad():
        bf16_weights = model(*inputs)
    block_bytes = weight_bytes(model.transformer_blocks)
    allocated = torch.cuda.memory_allocated() if device.type == "cuda" else None
    names = model.enable_fp8_weight_storage()
    # q, k, v, out, the two feed-forward layers and the two adaptive-norm projections, in every block
    assert len(names) == 8 * TRANSFORMER["num_layers"]
    assert all(model.get_submodule(name).weight.dtype == FP8 for name in names)
    assert weight_bytes(model.transformer_blocks) <= 0.52 * block_bytes
    if device.type == "cuda":
        _free(device)
        assert torch.cuda.memory_allocated() <= allocated - 0.45 * block_bytes
    with torch.no_grad():
        fp8_weights = model(*inputs)
    err = rel_l2(fp8_weights, bf16_weights)
    assert 0 < err <= 6e-2, f"fp8 weights: relative L2 {err:.2e} from bf16 weights"


@pytest.fixture
def float32_exact(device):
    """Float32 references without TF32: cuDNN convolutions (the reference's patch embedding) default to TF32 on
    CUDA, 10 mantissa bits, which would blur the bf16 error the tests measure against them."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_compiled_transformer_matches_eager(checkpoint, device, float32_exact):
    """torch.compile(fullgraph=True) of the bf16 transformer: Inductor fuses the elementwise work and keeps it in
    float32 inside the fused kernels, so its rounding differs from eager's but is no worse. Bound: its relative L2
    error from the float32 model is at most 1.5x eager bf16's. On the CPU dry run the graph is traced whole and run
    by the aot_eager backend (no C++/Triton code generation, which takes minutes on a small CPU)."""
    _free(device)
    folder = checkpoint / "transformer"
    inputs = transformer_inputs(device, torch.bfloat16)
    with torch.no_grad():
        exact = Transformer.from_pretrained(folder, dtype=torch.float32, device=device)(
            *transformer_inputs(device, torch.float32)
        )
        _free(device)
        model = Transformer.from_pretrained(folder, dtype=torch.bfloat16, device=device)
        eager = model(*inputs)
        backend = "inductor" if device.type == "cuda" else "aot_eager"
        compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
        try:
            out = compiled(*inputs)
        finally:
            torch.compiler.reset()
    err_eager, err_compiled = rel_l2(eager, exact), rel_l2(out, exact)
    assert 0 < err_eager <= 3e-2, f"eager bf16: relative L2 {err_eager:.2e} from float32"
    assert err_compiled <= 1.5 * err_eager, f"compiled {err_compiled:.2e} vs eager {err_eager:.2e} (bf16 vs float32)"


def test_bf16_transformer_matches_the_reference_within_its_bf16_noise(checkpoint, device, float32_exact):
    """Ours and diffusers' CogVideoXTransformer3DModel load the same safetensors folder. The reference in float32 is
    the truth; the reference's own bf16 error from it is what bf16 costs. Ours in bf16 must be within 1.5x of that
    (relative L2 over the whole output: steady, where a max follows one element)."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    _free(device)
    folder = checkpoint / "transformer"
    latents, text, timestep = transformer_inputs(device, torch.float32)
    frames, _, _, height, width = latents.shape

    def reference(dtype: torch.dtype) -> torch.Tensor:
        ref = CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        # The rotary tables exactly as the reference pipeline prepares them (pixel sizes are latent sizes x 8).
        fake_pipe = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(
            fake_pipe, height * 8, width * 8, frames, device
        )
        with torch.no_grad():
            out = ref(latents.to(dtype), text.to(dtype), timestep, image_rotary_emb=rotary).sample
        del ref
        _free(device)
        return out

    exact, theirs = reference(torch.float32), reference(torch.bfloat16)
    ours = Transformer.from_pretrained(folder, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        mine = ours(latents.to(torch.bfloat16), text.to(torch.bfloat16), timestep)
    assert mine.shape == exact.shape == (2, frames, TRANSFORMER["out_channels"], height, width)
    err_ref, err_ours = rel_l2(theirs, exact), rel_l2(mine, exact)
    assert 0 < err_ref <= 3e-2, f"reference bf16: relative L2 {err_ref:.2e} from float32 (not bf16 noise)"
    assert err_ours <= 1.5 * err_ref, f"ours bf16 {err_ours:.2e} vs reference bf16 {err_ref:.2e} (from float32)"
