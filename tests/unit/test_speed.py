"""Speed and memory switches of the transformer: fused q/k/v, fp8 weight storage, no host synchronisation in the
forward pass, whole-model compilation without graph breaks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cogvideox import Transformer
from cogvideox.configs import TransformerConfig, config_to_dict
from cogvideox.ops.fp8 import FP8, Fp8Linear, quantize_rows, weight_bytes
from cogvideox.presets import transformer_config
from tests.helpers import TINY_TRANSFORMER, randomize_, rel_err

TINY = TINY_TRANSFORMER
ROPE = {"use_rotary_positional_embeddings": True}
VARIANTS = {"2b": {}, "5b": ROPE, "1.5-i2v": {**ROPE, "patch_size_t": 2, "in_channels": 8, "ofs_embed_dim": 24}}


def make(seed=0, **overrides) -> Transformer:
    return randomize_(Transformer(TransformerConfig(**{**TINY, **overrides})), seed=seed, std=0.1).eval()


def inputs(model: Transformer, frames=2, batch=2):
    c = model.config
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, frames, c.in_channels, 6, 10, generator=gen)
    text = torch.randn(batch, c.max_text_seq_length, c.text_embed_dim, generator=gen)
    extra = {"ofs": torch.full((batch,), 2.0)} if c.ofs_embed_dim else {}
    return (latents, text, torch.tensor([981.0, 37.5])), extra


# ---------------------------------------------------------------------------------------------- fused q/k/v


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_qkv_is_bitwise_equal_and_keeps_published_keys(variant):
    model = make(**VARIANTS[variant])
    args, extra = inputs(model)
    published = model.state_dict()
    with torch.no_grad():
        expected = model(*args, **extra)
        model.fuse_qkv_projections()
        fused = model(*args, **extra)
    attn = model.transformer_blocks[0].attn1
    assert attn.to_q is None and attn.to_qkv.weight.shape == (3 * 32, 32)
    assert torch.equal(fused, expected)  # float32 on the CPU: the fused product is bit for bit the same
    state = model.state_dict()
    assert list(state) == list(published)  # same keys, same order
    assert all(torch.equal(state[k], published[k]) for k in published)
    model.unfuse_qkv_projections()
    with torch.no_grad():
        assert torch.equal(model(*args, **extra), expected)


def test_fused_model_saves_and_loads_published_keys(tmp_path):
    model = make(**ROPE)
    args, _ = inputs(model)
    with torch.no_grad():
        expected = model(*args)
    model.fuse_qkv_projections()
    # safetensors refuses overlapping views; the published keys are disjoint row blocks of the fused weight.
    save_file(model.state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(model.config, "CogVideoXTransformer3DModel")))
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.transformer_blocks[0].attn1.to_q is not None  # loading gives the published (unfused) layout

    other = make(seed=9, **ROPE)
    other.fuse_qkv_projections()
    other.load_state_dict(loaded.state_dict())  # a fused model accepts the published keys in one go
    with torch.no_grad():
        assert torch.equal(loaded(*args), expected)
        assert torch.equal(other(*args), expected)


def test_fused_model_refuses_a_partial_qkv_load():
    model = make()
    model.fuse_qkv_projections()
    partial = {"transformer_blocks.0.attn1.to_q.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match=r"to_qkv is fused but this state dict has only .*call fuse_qkv_projections"):
        model.load_state_dict(partial, strict=False)


# ---------------------------------------------------------------------------------------------- fp8 storage


def test_quantize_rows_uses_the_full_range_with_power_of_two_scales():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=gen) * torch.logspace(-4, 1, 64)[:, None]
    weight[3] = 0.0
    fp8, exponent = quantize_rows(weight)
    assert fp8.dtype == FP8 and exponent.dtype == torch.int8
    peak = fp8.float().abs().amax(dim=1)
    nonzero = weight.abs().amax(dim=1) > 0
    assert torch.all(peak[nonzero] >= 224) and torch.all(peak <= 448)  # top binade used, nothing saturates
    assert torch.all(peak[~nonzero] == 0)
    scale = torch.exp2(exponent.float())[:, None]
    back = fp8.float() * scale
    # e4m3 has 3 mantissa bits: half an ulp is 2^-4 relative for normal values, 2^-10 x scale for subnormals.
    bound = torch.maximum(weight.abs() * 2.0**-4, scale * 2.0**-10)
    assert torch.all((back - weight).abs() <= bound)
    again, again_exponent = quantize_rows(back)  # values already on the fp8 grid come back unchanged
    assert torch.equal(again.float() * torch.exp2(again_exponent.float())[:, None], back)


def test_fp8_storage_types_error_and_dtype_moves():
    model = make(**ROPE)
    args, _ = inputs(model)
    with torch.no_grad():
        expected = model(*args)
        bf16_err = rel_err(make(**ROPE).to(torch.bfloat16)(*args).float(), expected)
        model.fuse_qkv_projections()  # fp8 after fusing: the two switches combine
        names = model.enable_fp8_weight_storage()
        assert len(names) == 2 * 6  # per block: to_qkv, to_out.0, ff in and out, two modulation projections
        block = model.transformer_blocks[0]
        for layer in (block.attn1.to_qkv, block.attn1.to_out[0], block.ff.net[0].proj, block.ff.net[2]):
            assert isinstance(layer, Fp8Linear) and layer.weight.dtype == FP8 and layer.bias.dtype == torch.float32
        assert block.norm1.linear.weight.dtype == FP8
        for kept in (block.norm1.norm.weight, block.attn1.norm_q.weight, model.proj_out.weight,
                     model.patch_embed.text_proj.weight, model.time_embedding.linear_1.weight):  # fmt: skip
            assert kept.dtype == torch.float32
        fp8_err = rel_err(model(*args), expected)
        model.to(torch.bfloat16)  # casts biases and the kept layers; the fp8 weights stay fp8
        assert block.attn1.to_qkv.weight.dtype == FP8 and block.attn1.to_qkv.bias.dtype == torch.bfloat16
        fp8_bf16_err = rel_err(model(*args).float(), expected)
    # Measured: fp8 2-layer tiny model ~1e-2 (float32 compute), ~1.4e-2 (bf16 compute); plain bf16 ~8e-3.
    assert 1e-4 < fp8_err < 2e-2
    assert fp8_bf16_err < 3e-2
    assert bf16_err < 2e-2
    assert set(model.state_dict()) >= {"transformer_blocks.0.attn1.to_q.weight_exponent"}


def test_fp8_layers_unfuse_exactly_and_refuse_to_fuse():
    model = make(**ROPE, num_layers=1)
    args, _ = inputs(model)
    model.fuse_qkv_projections()
    model.enable_fp8_weight_storage()
    with torch.no_grad():
        expected = model(*args)
        model.unfuse_qkv_projections()  # splits the fp8 rows and their exponents
        assert isinstance(model.transformer_blocks[0].attn1.to_k, Fp8Linear)
        assert torch.equal(model(*args), expected)
    with pytest.raises(
        TypeError, match=r"found \['Fp8Linear'\]: fuse q/k/v first, then load LoRA adapters or enable fp8"
    ):
        model.fuse_qkv_projections()


def test_fp8_halves_the_weight_memory_of_the_5b():
    with torch.device("meta"):
        model = Transformer(transformer_config("CogVideoX-5b"), dtype=torch.bfloat16)
    before = weight_bytes(model)
    block_linears = sum(m.weight.numel() for m in model.transformer_blocks.modules() if isinstance(m, nn.Linear))
    model.enable_fp8_weight_storage()
    after = weight_bytes(model)
    rows = sum(m.out_features for m in model.transformer_blocks.modules() if isinstance(m, Fp8Linear))
    assert before - after == block_linears - rows  # 2 -> 1 byte per weight, plus one int8 exponent per row
    assert after / before < 0.51  # 10.4 GiB -> 5.2 GiB


# ---------------------------------------------------------------------------------------------- no host sync


class DeviceAudit(TorchDispatchMode):
    """Records operators that read a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()`` all
    go through ``_local_scalar_dense``) and any tensor that is not on the expected device."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device, self.host_reads, self.foreign, self.ops = device, [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads.append(str(func))
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device.type != self.device:
                self.foreign.append(f"{func}: {t.device} {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("name", ["CogVideoX-2b", "CogVideoX-5b", "CogVideoX-5b-I2V", "CogVideoX1.5-5B-I2V"])
def test_forward_never_reads_device_values_on_the_host(name):
    """The full-size model at 49x480x720 on the meta device: any .item(), data-dependent branch or tensor made on
    the host during the forward pass would show up (meta tensors have no values to read)."""
    config = transformer_config(name)
    with torch.device("meta"):
        model = Transformer(config, dtype=torch.bfloat16).eval()
        frames = 14 if config.patch_size_t else 13
        latents = torch.empty(2, frames, config.in_channels, 60, 90, dtype=torch.bfloat16)
        text = torch.empty(2, 226, 4096, dtype=torch.bfloat16)
        timestep = torch.empty(2)
    extra = {"ofs": 2.0} if config.ofs_embed_dim else {}
    model(latents, text, timestep, **extra)  # builds the position tables (on meta)
    with DeviceAudit("meta") as audit:
        out = model(latents, text, 999.0, **extra)  # a Python timestep: filled on the device, not copied
    assert out.shape == (2, frames, 16, 60, 90) and out.dtype == torch.bfloat16
    assert audit.ops > 20 * config.num_layers  # the audit saw every block
    assert audit.host_reads == []
    assert audit.foreign == []
    assert len(model._position_cache) <= 1


def test_whole_forward_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of the whole model raises on any graph break (a host read, a data-dependent
    branch); the warm position cache is read as a constant. The compiled model equals eager."""
    model = make(**VARIANTS["5b"], num_layers=1)
    args, _ = inputs(model)
    with torch.no_grad():
        expected = model(*args)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        assert rel_err(compiled(*args), expected) <= 1e-5


# ---------------------------------------------------------------------------------------------- benchmarks


def test_results_are_appended_inside_their_section(tmp_path):
    from benchmarks._common import append_result

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## VAE\n\nvae entry\n")
    append_result("Transformer step", "first", results)
    append_result("Loading", "load entry", results)
    append_result("Transformer step", "second", results)
    text = results.read_text()
    assert text.index("vae entry") < text.index("## Transformer step") < text.index("first")
    assert text.index("first") < text.index("second") < text.index("## Loading") < text.index("load entry")


def test_step_benchmark_runs_at_a_tiny_size(capsys):
    """The benchmark's code path (weights shared with the reference, rotary tables as its pipeline makes them,
    memory meter) at one 5B-width layer and 4 video tokens."""
    pytest.importorskip("diffusers")
    from benchmarks import step

    argv = ["--layers", "1", "--frames", "1", "--height", "32", "--width", "32", "--repeats", "1", "--no-results"]
    step.main(argv + ["--text-len", "8", "--fuse-qkv"])
    out = capsys.readouterr().out
    assert "| ours |" in out and "| reference |" in out
    err = float(out.split("max |ours - ref| / max |ref| = ")[1].split(";")[0])
    assert err < 1e-5
