"""The memory plan: offload hooks move components and blocks at the right moments, results equal the run without
offload bitwise (float32, CPU), and the VAE decode switches to tiles when the injected budget is too small.

On the CPU a "load" is a real copy to fresh memory, so a test sees which blocks hold a device copy while each
block runs. A GPU test (opt-in, ``-m gpu``) checks the CUDA stream path and the memory it saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cogvideox import Pipeline
from cogvideox.memory import MemoryManager, vae_decode_bytes
from cogvideox.offload import BlockStreamer
from tests.tiny_checkpoints import TEXT_LEN, reference_pipeline

SMALL = {"height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 2, "max_sequence_length": TEXT_LEN}


class Toy(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _ptrs(module: nn.Module) -> list[int]:
    return [t.data_ptr() for t in [*module.parameters(), *module.buffers()]]


def test_block_streamer_loads_one_ahead_and_drops_after_run():
    model = Toy(4)
    x = torch.randn(3, 8)
    expected = model(x)
    events: list = []
    streamer = BlockStreamer(model.blocks, "cpu", events=events)
    host = [_ptrs(b) for b in model.blocks]
    seen = []

    def spy(index):
        def hook(module, args):
            # Runs after the streamer's pre-hook: this block is a device copy, only the next one is on its way.
            seen.append((index, sorted(streamer.resident), _ptrs(module) != host[index]))

        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(spy(i))
    with torch.no_grad():
        out = model(x)
        out_again = model(x)
    assert torch.equal(out, expected) and torch.equal(out_again, expected)
    assert seen[:4] == [(0, [0, 1], True), (1, [1, 2], True), (2, [2, 3], True), (3, [0, 3], True)]
    assert seen[4:] == seen[:4]
    first = events[: events.index(("run", 1))]
    assert first == [("load", 0), ("run", 0), ("load", 1), ("drop", 0)]
    # After a forward only the wrap-around prefetch of block 0 is resident; everything else points at the host.
    assert streamer.resident == {0}
    assert [_ptrs(b) for b in model.blocks][1:] == host[1:]
    streamer.remove()
    assert streamer.resident == set() and [_ptrs(b) for b in model.blocks] == host
    assert torch.equal(model(x), expected)


def test_block_streamer_with_gradients_off_keeps_parameters():
    model = Toy(2)
    names = [n for n, _ in model.named_parameters()]
    BlockStreamer(model.blocks, "cpu")
    assert [n for n, _ in model.named_parameters()] == names
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


# ------------------------------------------------------------------------------------------------ pipeline

pytest.importorskip("diffusers")
pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload") / "checkpoint"
    reference_pipeline("5b", root)
    return root


def _pipe(checkpoint) -> Pipeline:
    pipe = Pipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe: Pipeline) -> torch.Tensor:
    return pipe("a panda plays a guitar", generator=torch.Generator().manual_seed(0), output_type="pt", **SMALL).frames


@pytest.fixture(scope="module")
def expected(checkpoint):
    return _run(_pipe(checkpoint))


def test_text_encoder_offload_moves_only_the_text_encoder(checkpoint, expected):
    assert Pipeline.from_pretrained(checkpoint, text_encoder_offload=True).memory.mode == "text"  # CUDA default
    pipe = _pipe(checkpoint)
    pipe.memory.events = events = []
    pipe.enable_text_encoder_offload(device="cpu")
    host = _ptrs(pipe.text_encoder)
    transformer = _ptrs(pipe.transformer)
    assert torch.equal(_run(pipe), expected)
    # On and straight off again for each encode (prompt, negative prompt); nothing else moves.
    assert events == [("on", "text_encoder"), ("off", "text_encoder")] * 2
    assert _ptrs(pipe.text_encoder) == host and _ptrs(pipe.transformer) == transformer
    assert Pipeline.from_pretrained(checkpoint).memory.mode is None  # off by default for a CPU pipeline


def test_model_offload_moves_components_at_the_right_moments(checkpoint, expected):
    pipe = _pipe(checkpoint)
    pipe.memory.events = events = []
    pipe.enable_model_cpu_offload(device="cpu")
    active_during = {}
    host = {name: _ptrs(getattr(pipe, name)) for name in ("transformer", "text_encoder", "vae")}
    copied_during = {}

    def spy(name):
        def hook(module, args):
            active_during.setdefault(name, pipe.memory._offload.active)
            copied_during.setdefault(name, {n: _ptrs(getattr(pipe, n)) != host[n] for n in host})

        return hook

    pipe.transformer.register_forward_pre_hook(spy("transformer"))
    pipe.vae.decoder.register_forward_pre_hook(spy("decoder"))
    out = _run(pipe)
    assert torch.equal(out, expected)
    assert active_during == {"transformer": "transformer", "decoder": "vae"}
    # A load is a real copy (even to the host); only the running component holds one.
    assert copied_during["transformer"] == {"transformer": True, "text_encoder": False, "vae": False}
    assert copied_during["decoder"] == {"transformer": False, "text_encoder": False, "vae": True}
    assert {n: _ptrs(getattr(pipe, n)) for n in host} == host  # back on the very same host tensors
    # Text encoder: on and straight off again for each of the two encodes (prompt, negative prompt); the
    # transformer comes once for the whole loop; the VAE once for the decode; all leave at the end of the call.
    assert events == [
        ("on", "text_encoder"), ("off", "text_encoder"), ("on", "text_encoder"), ("off", "text_encoder"),
        ("on", "transformer"), ("off", "transformer"), ("on", "vae"), ("off", "vae"),
    ]  # fmt: skip
    assert pipe.device == torch.device("cpu") and pipe.memory.mode == "model"


def test_sequential_offload_streams_blocks_and_equals_plain_run(checkpoint, expected):
    pipe = _pipe(checkpoint)
    pipe.memory.events = events = []
    pipe.enable_sequential_cpu_offload(device="cpu")
    blocks = pipe.transformer.transformer_blocks
    host = [_ptrs(b) for b in blocks]
    streamer = blocks[0]._forward_pre_hooks  # the streamer's hook comes first
    assert len(streamer) == 1
    resident_while_running = []

    def spy(index):
        def hook(module, args):
            resident = [i for i, b in enumerate(blocks) if _ptrs(b) != host[i]]
            resident_while_running.append((index, resident))

        return hook

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(spy(i))
    out = _run(pipe)
    assert torch.equal(out, expected)
    # Two blocks, two denoising steps with guidance batched: four block runs, each with only itself installed
    # (the next block's copy is pending, not yet installed).
    assert resident_while_running == [(0, [0]), (1, [1]), (0, [0]), (1, [1])]
    assert ("load", 0) in events and ("drop", 1) in events
    assert events[-1] == ("off", "vae")
    assert all(_ptrs(b) == host[i] for i, b in enumerate(blocks))  # everything back on the host after the call
    pipe.disable_cpu_offload()
    assert torch.equal(_run(pipe), expected)


def test_offload_errors():
    plan = MemoryManager()
    with pytest.raises(ValueError, match="offload mode 'group': choose 'text', 'model' or 'sequential'"):
        plan.enable(None, "group", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="offload to cuda: CUDA is not available in this PyTorch build"):
            plan.enable(None, "model", "cuda")


# ------------------------------------------------------------------------------------------------ VAE tiling


def test_decode_tiles_when_the_budget_is_too_small(checkpoint):
    pipe = _pipe(checkpoint)
    latents = torch.randn(1, 3, 4, 8, 12)  # [B, F', C, h, w]: 64x96 pixels, larger than the 16x24 tiles
    shape = (1, 4, 3, 8, 12)
    need = vae_decode_bytes(pipe.vae, shape)
    assert vae_decode_bytes(pipe.vae, shape, tile=(32, 48)) < need
    untiled = pipe.decode_latents(latents)  # no budget on the CPU: untiled
    # 2x2 tiles without overlap (the tiny VAE's default tiles with the 1/6, 1/5 overlaps do not tile 64x96).
    pipe.vae.enable_tiling(32, 48, 0, 0)
    tiled = pipe.decode_latents(latents)
    pipe.vae.disable_tiling()
    assert not torch.equal(tiled, untiled)  # tiles blend at the seams: a different (valid) result

    pipe.set_vae_memory_budget(need - 1)
    assert torch.equal(pipe.decode_latents(latents), tiled)
    assert pipe.vae.use_tiling is False  # the switch is for this decode only
    pipe.set_vae_memory_budget(need)
    assert torch.equal(pipe.decode_latents(latents), untiled)
    pipe.set_vae_memory_budget(1, auto_tiling=False)
    assert torch.equal(pipe.decode_latents(latents), untiled)


def test_decode_estimate_scales_with_size_batch_and_slicing(checkpoint):
    vae = _pipe(checkpoint).vae
    one = vae_decode_bytes(vae, (1, 4, 13, 60, 90))
    assert vae_decode_bytes(vae, (2, 4, 13, 60, 90)) == 2 * one
    vae.enable_slicing()
    sliced = vae_decode_bytes(vae, (2, 4, 13, 60, 90))
    assert one < sliced < 2 * one  # one element's work at a time, both outputs kept
    vae.disable_slicing()
    assert vae_decode_bytes(vae, (1, 4, 13, 60, 90), tile=(240, 360)) < one


def test_sequential_offload_caps_the_decode_budget(checkpoint):
    vae = _pipe(checkpoint).vae
    plan = MemoryManager()
    cpu = torch.device("cpu")
    big = (1, 4, 13, 2048, 2048)  # ~ 16k x 16k pixels: over 4 GiB even for the tiny VAE
    assert vae_decode_bytes(vae, big) > 4 * 2**30
    assert plan.vae_mode(vae, "decode", big, cpu) == "untiled"  # no budget known on the CPU
    plan.mode = "sequential"
    assert plan.vae_mode(vae, "decode", big, cpu) == "tiled"
    assert plan.vae_mode(vae, "decode", (1, 4, 13, 60, 90), cpu) == "untiled"
    plan.vae_memory_budget = 2**50  # an explicit budget wins
    assert plan.vae_mode(vae, "decode", big, cpu) == "untiled"


@pytest.mark.gpu
def test_sequential_offload_on_cuda_is_exact_and_small(checkpoint, expected):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    plain = _pipe(checkpoint)
    for module in (plain.transformer, plain.vae, plain.text_encoder):
        module.to("cuda")
    reference = _run(plain).cpu()
    del plain
    pipe = _pipe(checkpoint)
    pipe.enable_sequential_cpu_offload(device="cuda")
    torch.cuda.reset_peak_memory_stats()
    out = _run(pipe).cpu()
    assert torch.allclose(out, reference, atol=1e-5, rtol=0)
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())  # all back on the host
