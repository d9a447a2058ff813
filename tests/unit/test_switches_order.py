"""Order between the model switches: fused q/k/v, LoRA, fp8 weight storage, the CPU linear kernel and offload.

Orders that would silently break (new layers a block streamer never moves, a LoRA adapter that cannot be split, fp8
weights that unfuse_lora() cannot restore, a half-fused model) raise at the switch call, naming both switches and
the order that works, and leave the model as it was. Orders that work are shown to give the expected outputs.
Everything runs on a tiny transformer on the CPU, where an offload "load" is a real copy to fresh memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from cogvideox.lora import fuse_lora, load_lora, lora_layers, set_adapters, unfuse_lora, unload_lora
from cogvideox.offload import BlockStreamer, ComponentOffload, is_streamed
from cogvideox.ops.fp8 import Fp8Linear
from cogvideox.ops.linear import OneDNNLinear, use_onednn_linear_
from tests.helpers import rel_err
from tests.unit.test_lora import assert_unchanged, inputs, lora_tensors, make, snapshot

ARGS = inputs()


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*ARGS)


def ptrs(module: nn.Module) -> list[int]:
    return [t.data_ptr() for t in [*module.parameters(), *module.buffers()]]


def stream(model: nn.Module) -> BlockStreamer:
    """Sequential offload of the blocks (as enable_sequential_cpu_offload() installs it), after one call, so that
    block 0's wrap-around copy is pending as it is between two denoising steps."""
    streamer = BlockStreamer(model.transformer_blocks, "cpu")
    run(model)
    return streamer


# ------------------------------------------------------------------------------------------------ the query


def test_is_streamed_follows_the_block_streamer_hooks():
    model = make()
    offload = ComponentOffload("cpu")
    offload.add("transformer", model, [model])
    assert not is_streamed(model)  # model offload moves the whole component: not streamed
    offload.remove()
    streamer = BlockStreamer(model.transformer_blocks, "cpu")
    assert is_streamed(model) and is_streamed(model.transformer_blocks[1])
    assert not is_streamed(model.patch_embed)
    streamer.remove()
    assert not is_streamed(model)


# ------------------------------------------------------------------------------------------------ refused orders

# switch -> (what to do before the blocks are streamed, the switch itself)
LAYER_SWITCHES = {
    "load_lora": (lambda m: None, lambda m: load_lora(m, lora_tensors())),
    "unload_lora": (lambda m: load_lora(m, lora_tensors()), unload_lora),
    "fuse_qkv_projections": (lambda m: None, lambda m: m.fuse_qkv_projections()),
    "unfuse_qkv_projections": (lambda m: m.fuse_qkv_projections(), lambda m: m.unfuse_qkv_projections()),
    "enable_fp8_weight_storage": (lambda m: None, lambda m: m.enable_fp8_weight_storage()),
}


@pytest.mark.parametrize("switch", list(LAYER_SWITCHES))
def test_switches_that_replace_layers_are_refused_while_blocks_are_streamed(switch):
    """The streamer copies only the tensors each block held when it started: layers made afterwards would stay in
    host memory (a device mismatch on a GPU) and the streamer would keep the old ones alive."""
    prepare, apply = LAYER_SWITCHES[switch]
    model = make()
    prepare(model)
    streamer = stream(model)
    before, expected = snapshot(model), run(model)
    message = (
        rf"{switch}\(\) cannot change the layers of blocks that sequential CPU offload is streaming .*: call "
        rf"{switch}\(\) before enable_sequential_cpu_offload\(\), or call disable_cpu_offload\(\) first and enable "
        "the offload again after"
    )
    with pytest.raises(RuntimeError, match=message):
        apply(model)
    assert_unchanged(model, before)
    assert torch.equal(run(model), expected)
    streamer.remove()  # the order that works: offload off, switch, offload on again
    apply(model)
    switched = run(model)
    BlockStreamer(model.transformer_blocks, "cpu")
    assert torch.equal(run(model), switched)


def test_unfusing_qkv_under_a_lora_is_refused_and_changes_nothing():
    """A LoRA loaded on fused q/k/v is one block-diagonal adapter on to_qkv: there is no q, k, v layer to give back
    (today's failure emptied to_q/k/v and to_qkv before raising)."""
    model = make()
    model.fuse_qkv_projections()
    load_lora(model, lora_tensors())
    before, expected = snapshot(model), run(model)
    message = (
        r"unfuse_qkv_projections\(\) cannot split to_qkv, a LoraLinear: .* Call unload_lora\(\) first .*or unfuse "
        r"q/k/v before load_lora\(\)"
    )
    with pytest.raises(TypeError, match=message):
        model.unfuse_qkv_projections()
    assert_unchanged(model, before)
    assert torch.equal(run(model), expected)
    unload_lora(model)
    model.unfuse_qkv_projections()
    assert model.transformer_blocks[0].attn1.to_q is not None


def test_fusing_qkv_checks_every_block_before_fusing_any():
    """A LoRA on block 1 only: block 0 used to be fused before block 1 raised, leaving a half-fused model."""
    model = make()
    load_lora(model, {k: v for k, v in lora_tensors().items() if ".transformer_blocks.1." in k})
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"needs plain nn.Linear q/k/v projections, found \['LoraLinear'\]"):
        model.fuse_qkv_projections()
    assert_unchanged(model, before)
    assert not any(block.attn1.is_fused for block in model.transformer_blocks)


def test_fp8_storage_while_a_lora_is_fused_is_refused():
    """unfuse_lora() would copy the saved full-precision weights into fp8 tensors without their scales (5e-2 wrong
    before this check)."""
    model = make()
    load_lora(model, lora_tensors())
    fuse_lora(model)
    before = snapshot(model)
    message = (
        r"enable_fp8_weight_storage\(\) while a LoRA is fused into the weights of 8 layers \(e.g. "
        r"transformer_blocks.0.attn1.to_q\): .*Call unfuse_lora\(\) first .*or unload_lora\(\) to bake"
    )
    with pytest.raises(RuntimeError, match=message):
        model.enable_fp8_weight_storage()
    assert_unchanged(model, before)
    unfuse_lora(model)  # the order that works: unfused adapters on fp8 layers
    model.enable_fp8_weight_storage()
    reference = make()
    reference.enable_fp8_weight_storage()
    load_lora(reference, lora_tensors())
    assert torch.equal(run(model), run(reference))


# ------------------------------------------------------------------------------------------------ orders that work


def test_fp8_after_an_unfused_lora_equals_fp8_before_it():
    model, reference = make(), make()
    load_lora(model, lora_tensors())
    model.enable_fp8_weight_storage()
    reference.enable_fp8_weight_storage()
    load_lora(reference, lora_tensors())
    assert isinstance(model.transformer_blocks[0].attn1.to_q.base, Fp8Linear)
    assert torch.equal(run(model), run(reference))


def test_lora_on_fused_qkv_matches_lora_on_separate_projections():
    model, reference = make(), make()
    model.fuse_qkv_projections()
    load_lora(model, lora_tensors())
    load_lora(reference, lora_tensors())
    assert set(lora_layers(model)) >= {"transformer_blocks.0.attn1.to_qkv"}
    assert rel_err(run(model), run(reference)) < 1e-5  # one stacked adapter product: summation order only


def test_every_switch_before_streaming_streams_all_the_new_tensors():
    """fused q/k/v, fp8 and LoRA first, then sequential offload: every tensor of a running block (fp8 weights and
    exponents, adapter buffers) is a fresh device copy, and the output is the unstreamed one."""
    model = make()
    model.fuse_qkv_projections()
    model.enable_fp8_weight_storage()
    load_lora(model, lora_tensors())
    expected = run(model)
    blocks = model.transformer_blocks
    host = [ptrs(block) for block in blocks]
    BlockStreamer(blocks, "cpu")
    copied = []
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, args, i=index: copied.append(set(ptrs(module)) & set(host[i])))
    assert torch.equal(run(model), expected)
    assert copied == [set(), set()]


def test_lora_weight_switches_work_while_blocks_are_streamed():
    """fuse_lora / set_adapters / unfuse_lora change values, not layers: allowed while streamed. Block 0's pending
    copy, made before the change, is made again (it used to run one step with the old weights: 5e-2 off)."""
    model, reference = make(), make()
    for m in (model, reference):
        load_lora(m, lora_tensors())
    stream(model)
    fuse_lora(model)
    fuse_lora(reference)
    assert torch.equal(run(model), run(reference))
    unfuse_lora(model)
    unfuse_lora(reference)
    assert torch.equal(run(model), run(reference))
    set_adapters(model, "default_0", 0.5)
    set_adapters(reference, "default_0", 0.5)
    assert torch.equal(run(model), run(reference))


def test_fusing_a_lora_while_model_offload_holds_the_transformer_survives_the_offload():
    """Model offload leaves the transformer on the device after a call. A LoRA fused there used to be dropped when
    the transformer went back to the host (its host copies were the unfused weights): 7e-2 off from then on."""
    model, reference = make(), make()
    for m in (model, reference):
        load_lora(m, lora_tensors())
    offload = ComponentOffload("cpu")
    offload.add("transformer", model, [model])
    run(model)
    assert offload.active == "transformer"
    fuse_lora(model)
    fuse_lora(reference)
    offload.offload_all()
    assert torch.equal(run(model), run(reference))
    unfuse_lora(model)  # on the device again
    unfuse_lora(reference)
    offload.offload_all()
    assert torch.equal(run(model), run(reference))


def test_layers_replaced_under_model_offload_leave_no_host_copies_behind():
    """fuse_qkv_projections() while model offload holds the transformer on the device: the new to_qkv goes back
    to the host, and the host copies of the old q/k/v weights are freed (they used to stay for good)."""
    model = make()
    expected = run(model)
    offload = ComponentOffload("cpu")
    offload.add("transformer", model, [model])
    # On the CPU the host copy shares the original tensor's storage; a storage's Python object lives as long as
    # the storage does, so a weak reference to it says when the memory is freed.
    old = weakref.ref(model.transformer_blocks[0].attn1.to_q.weight.untyped_storage())
    run(model)
    model.fuse_qkv_projections()
    offload.offload_all()
    gc.collect()
    assert old() is None
    assert torch.equal(run(model), expected)


def test_onednn_swap_works_on_streamed_blocks(monkeypatch):
    """use_onednn_linear_ changes the class of the layers, not the layers: the streamer keeps moving them."""
    import cogvideox.ops.linear as linear_module

    monkeypatch.setattr(linear_module, "ONEDNN_MIN_MACS", 0)
    model = make()
    expected = run(model)
    blocks = model.transformer_blocks
    host = [ptrs(block) for block in blocks]
    stream(model)
    assert use_onednn_linear_(model) > 0 and type(blocks[0].ff.net[2]) is OneDNNLinear
    copied = []
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, args, i=index: copied.append(set(ptrs(module)) & set(host[i])))
    assert rel_err(run(model), expected) <= 1e-5
    assert copied == [set(), set()]


def test_the_other_switches_accept_onednn_layers():
    """fp8 storage, LoRA (loaded and fused) and q/k/v fusion treat OneDNNLinear as the plain layer it is."""
    model, reference = make(), make()
    use_onednn_linear_(model)
    for m in (model, reference):
        m.fuse_qkv_projections()
        load_lora(m, lora_tensors())
        fuse_lora(m)
        unload_lora(m)  # baked in
        m.enable_fp8_weight_storage()
    assert isinstance(model.transformer_blocks[0].attn1.to_qkv, Fp8Linear)
    assert type(model.proj_out) is OneDNNLinear
    assert rel_err(run(model), run(reference)) <= 1e-5


def test_offload_hooks_run_under_inference_mode():
    """The write counters the hooks compare do not exist for tensors made under torch.inference_mode (device copies
    made by a hook inside it, or a whole model built inside it): the hooks still run and give the same outputs."""
    model = make()
    load_lora(model, lora_tensors())  # adapter buffers: replaced by their device copies under model offload
    expected = run(model)
    offload = ComponentOffload("cpu")
    offload.add("transformer", model, [model])
    with torch.inference_mode():
        assert torch.equal(model(*ARGS), expected)
        offload.offload_all()
        assert torch.equal(model(*ARGS), expected)
        built_inside = make()
        load_lora(built_inside, lora_tensors())
        BlockStreamer(built_inside.transformer_blocks, "cpu")
        assert torch.equal(built_inside(*ARGS), expected)
        assert torch.equal(built_inside(*ARGS), expected)
