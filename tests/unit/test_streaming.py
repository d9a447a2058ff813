"""What the CUDA offload path depends on, checked on the CPU: no computation reads a weight where it rests in host
memory, the streamer's device memory is two blocks however far the CPU runs ahead, and the page-locked host
buffers cost the weights (not the ~1.6x of pinning each tensor through PyTorch's power-of-two host allocator).

On the CPU a "device" copy is a real copy to fresh memory, so a weight read from its resting place (the host
buffers) can be told from one read from its device copy by the storage it lives in."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cogvideox import Pipeline
from cogvideox.configs import T5Config, TransformerConfig
from cogvideox.offload import RING, BlockStreamer, ComponentOffload, Transfers
from cogvideox.pinned import storage_ptr
from cogvideox.presets import transformer_config
from cogvideox.text.t5 import T5Encoder
from cogvideox.transformer import Transformer

aten = torch.ops.aten
# Ops that move or re-view data rather than compute with it: reading a host tensor there is how it gets moved.
_MOVES = {aten.copy_.default, aten._to_copy.default}


class HostReads(TorchDispatchMode):
    """Records every computing op that reads a tensor living in one of the storages ``host`` (by address)."""

    def __init__(self, host: set[int]) -> None:
        super().__init__()
        self.host = host
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aliases = any(r.alias_info is not None for r in func._schema.returns)  # views and in-place ops
        if func not in _MOVES and not aliases:
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and leaf.numel() and storage_ptr(leaf) in self.host:
                    self.reads.append(f"{func}{list(leaf.shape)}")
        return func(*args, **kwargs)


def _resting_storages(*modules: nn.Module) -> set[int]:
    return {storage_ptr(t) for m in modules for t in [*m.parameters(), *m.buffers()] if t.numel()}


def _tiny_t5() -> T5Encoder:
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                      feed_forward_proj="gated-gelu")  # fmt: skip
    model = T5Encoder(config).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model


def test_t5_under_sequential_offload_reads_no_weight_from_host_memory():
    """The relative-position bias table sits in block 0, which the streamer holds on the host until block 0 runs:
    the bias must be computed from a copy on the hidden states' device (on CUDA a CPU bias next to CUDA q/k/v
    failed the first prompt)."""
    model = _tiny_t5()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        expected = model(ids)
    offload = ComponentOffload("cpu")
    offload.add("text_encoder", model, [model], leave_after=True, streamer=BlockStreamer(model.offload_blocks(), "cpu"))
    spy = HostReads(_resting_storages(model))
    with torch.no_grad(), spy:
        out = model(ids)
    assert spy.reads == []
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["sequential", "model", "text"])
def test_pipeline_under_offload_reads_no_weight_from_host_memory(mode):
    """The whole demo pipeline (T5, transformer, VAE, guidance): every weight a kernel reads is a device copy."""
    pipe = Pipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0), "output_type": "pt"}
    expected = pipe("a red circle moves to the right", **call).frames
    getattr(pipe, {"sequential": "enable_sequential_cpu_offload", "model": "enable_model_cpu_offload",
                   "text": "enable_text_encoder_offload"}[mode])(device="cpu")  # fmt: skip
    offloaded = [pipe.text_encoder] if mode == "text" else [pipe.text_encoder, pipe.transformer, pipe.vae]
    spy = HostReads(_resting_storages(*offloaded))
    call["generator"] = torch.Generator().manual_seed(0)
    with spy:
        frames = pipe("a red circle moves to the right", **call).frames
    assert spy.reads == []
    assert torch.equal(frames, expected)


# ------------------------------------------------------------------------------------------------ device memory


class RecordingTransfers(Transfers):
    """CPU transfers that hand out numbered events and record, for each copy, its destination buffer, the event it
    waited for, and the event the test expected it to wait for (``expect``: buffer address -> event)."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.count = 0
        self.expect: dict[int, object] = {}
        self.copies: list[tuple[int, object, object]] = []  # (destination buffer, waited for, expected)

    def mark(self):
        self.count += 1
        return ("compute", self.count)

    def copy(self, dst, src, after=None):
        dst.copy_(src)
        self.copies.append((storage_ptr(dst), after, self.expect.get(storage_ptr(dst))))
        self.count += 1
        return ("copy", self.count)

    def wait(self, event) -> None:
        pass


class Stack(nn.Module):
    def __init__(self, n: int, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def test_streamer_holds_two_device_blocks_and_each_copy_waits_for_the_last_reader():
    """However far the CPU runs ahead, the device holds two blocks: copies go into a ring of two buffers, and the
    copy into a buffer waits (on the copy stream) for the compute event recorded when its last block was dropped
    (the first copy into each, for the compute queued when the ring was allocated)."""
    model = Stack(5)
    x = torch.randn(3, 16)
    expected = model(x)
    streamer = BlockStreamer(model.blocks, "cpu")
    streamer.transfers = transfers = RecordingTransfers()
    block_bytes = max(buffer.nbytes for buffer in streamer._host)
    drop = streamer.drop

    def recording_drop(index):
        ring, resident = streamer._where.get(index), index in streamer._resident
        drop(index)
        if resident:  # the buffer's last reader: the next copy into it must wait for this event
            transfers.expect[storage_ptr(streamer._ring[ring])] = streamer._free_after[ring]

    streamer.drop = recording_drop
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)
            assert streamer.device_bytes == RING * block_bytes
    ring = [storage_ptr(buffer) for buffer in streamer._ring]
    # Each block once per forward, plus block 0 once more: the last block's wrap-around prefetch for a next call.
    assert len(transfers.copies) == 3 * 5 + 1
    assert {dst for dst, _, _ in transfers.copies} == set(ring)  # all into the two ring buffers
    first, second, *rest = transfers.copies
    assert first == (ring[0], ("compute", 1), None) and second == (ring[1], ("compute", 1), None)
    assert all(after == last_reader and after is not None for _, after, last_reader in rest)
    streamer.drop_all()
    assert streamer.device_bytes == 0


# ------------------------------------------------------------------------------------------------ host memory


def _empty_on_cpu(factory, dtype: torch.dtype) -> nn.Module:
    """A model of real tensor shapes, uninitialised (the byte count is what is tested, not the values)."""
    with torch.device("meta"):
        model = factory()
    return model.to_empty(device="cpu").to(dtype)


def _config(name: str) -> TransformerConfig:
    return dataclasses.replace(transformer_config(name), num_layers=1)


def _per_tensor_pinned_bytes(tensors) -> int:
    """What pinning each tensor through PyTorch's caching host allocator takes: sizes rounded up to powers of two."""
    return sum(1 << max(t.numel() * t.element_size() - 1, 0).bit_length() for t in tensors)


def test_streamed_blocks_pin_their_weights_within_two_percent():
    """One block of the 5B transformer at its real width, bf16: the host buffer is the weights plus padding."""
    config = _config("CogVideoX-5b")
    model = _empty_on_cpu(lambda: Transformer(config), torch.bfloat16)
    block = list(model.offload_blocks()[0].parameters())
    per_tensor = _per_tensor_pinned_bytes(block)
    streamer = BlockStreamer(model.offload_blocks(), "cpu")
    assert streamer.weight_bytes == sum(t.numel() * t.element_size() for t in block)
    assert streamer.host_bytes <= 1.02 * streamer.weight_bytes
    assert per_tensor > 1.3 * streamer.weight_bytes  # what each tensor pinned on its own would have cost


def test_offloaded_component_pins_its_weights_within_two_percent():
    """Model offload of the 2B transformer at its real width (one layer), bf16: one host buffer, weights plus
    padding; a tensor added later (a LoRA's) joins a buffer at the next load, and the count still holds."""
    config = _config("CogVideoX-2b")
    model = _empty_on_cpu(lambda: Transformer(config), torch.bfloat16)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    offload = ComponentOffload("cpu")
    offload.add("transformer", model, [model])
    assert weights <= offload.host_bytes("transformer") <= 1.02 * weights
    model.extra = nn.Linear(1920, 1920, dtype=torch.bfloat16)
    offload.activate("transformer")
    offload.offload_all()
    weights += 1920 * 1921 * 2
    assert weights <= offload.host_bytes("transformer") <= 1.02 * weights


# ------------------------------------------------------------------------------------------------ autograd, failures


def test_gradients_through_streamed_blocks_equal_the_plain_ones():
    """Autograd saves views of the weights (W^T for the input's gradient, frozen weights too): under grad a block
    computes with a copy of its own, so the ring's later copies cannot overwrite what the backward pass reads."""
    torch.manual_seed(0)
    plain = Stack(4)
    for p in plain.parameters():
        nn.init.normal_(p, std=0.5)  # large weights: a block computed with another block's weights shows
    streamed = Stack(4)
    streamed.load_state_dict(plain.state_dict())
    BlockStreamer(streamed.blocks, "cpu")
    x = torch.randn(3, 16)
    grads = []
    for model in (plain, streamed):
        xi = x.clone().requires_grad_(True)
        model(xi).square().sum().backward()
        grads.append([xi.grad, *(p.grad for p in model.parameters())])
    for ours, expected in zip(grads[1], grads[0], strict=True):
        assert torch.equal(ours, expected)


def test_a_failure_inside_sequential_offload_leaves_the_next_call_working(monkeypatch):
    """Out of memory (say) while T5's first block runs under sequential offload: the call fails, the components go
    back to the host, and the next call gives the frames of a pipeline that never failed."""
    pipe = Pipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 2, "output_type": "pt"}
    expected = pipe("a red circle moves to the right", generator=torch.Generator().manual_seed(0), **call).frames
    pipe.enable_sequential_cpu_offload(device="cpu")
    block = pipe.text_encoder.offload_blocks()[0]
    failing = block.forward

    def out_of_memory(*args, **kwargs):
        block.forward = failing  # once
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    block.forward = out_of_memory
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        pipe("a red circle moves to the right", generator=torch.Generator().manual_seed(0), **call)
    assert pipe.memory._offload.active is None  # everything back on the host
    frames = pipe("a red circle moves to the right", generator=torch.Generator().manual_seed(0), **call).frames
    assert torch.equal(frames, expected)


def test_a_block_that_raised_stays_usable_without_a_release():
    """A block's forward raised (the after-hook never ran, so it stays installed) and nobody released the
    streamer: the next forward installs nothing twice and computes as before."""
    model = Stack(3)
    x = torch.randn(2, 16)
    expected = model(x)
    streamer = BlockStreamer(model.blocks, "cpu")
    block = model.blocks[0]
    failing = block.forward

    def fail_once(*args, **kwargs):
        block.forward = failing
        raise RuntimeError("simulated")

    block.forward = fail_once
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="simulated"):
            model(x)
        assert 0 in streamer.resident
        assert torch.equal(model(x), expected)


def test_page_locking_goes_through_the_driver_and_a_refusal_falls_back(monkeypatch, caplog):
    """Registration is a driver call (portable flag) made after a runtime call on the device; a refusal leaves
    the buffer pageable with one warning (torch's cudaHostRegister binding would leave the error pending for the
    next kernel to raise); a locked buffer is unlocked, after synchronising its device, when it is collected."""
    import gc

    import cogvideox.pinned as pinned

    calls = []

    class Driver:
        answer = 0

        def cuMemHostRegister_v2(self, ptr, size, flags):
            calls.append(("register", size, flags))
            return self.answer

        def cuMemHostUnregister(self, ptr):
            calls.append(("unregister",))
            return 0

    driver = Driver()
    monkeypatch.setattr(pinned, "_cuda_driver", lambda: driver)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", str(device))))
    monkeypatch.setattr(pinned, "_warned_register", False)
    buffer = pinned.HostBuffer([(torch.float32, torch.Size([1000]))])
    assert buffer.lock("cuda:1") and buffer.pinned
    assert calls == [("synchronize", "cuda:1"), ("register", 4096, 0x01)]
    del buffer
    gc.collect()
    assert calls[2:] == [("synchronize", "cuda:1"), ("unregister",)]
    driver.answer = 2  # CUDA_ERROR_OUT_OF_MEMORY
    with caplog.at_level("WARNING", logger="cogvideox.pinned"):
        refused = [pinned.HostBuffer([(torch.uint8, torch.Size([10]))]) for _ in range(2)]
        assert [b.lock("cuda") for b in refused] == [False, False]
    assert [r.message for r in caplog.records] == [
        "could not page-lock 0.0 MiB of host memory for offload (cuMemHostRegister error 2; a locked-memory limit, "
        "`ulimit -l`?): the weights stay in pageable memory and each copy to the GPU is slower"
    ]
