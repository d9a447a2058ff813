"""LoRA without the reference: formats, scales, bad input (clear errors, model unchanged), published state-dict
keys, fp8 storage, torch.compile, the Pipeline methods and the CLI options."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cogvideox import Transformer
from cogvideox.configs import TransformerConfig
from cogvideox.lora import (
    LoraLinear,
    fuse_lora,
    load_lora,
    loaded_adapters,
    lora_layers,
    parse_lora,
    set_adapters,
    unfuse_lora,
    unload_lora,
)
from tests.helpers import randomize_, rel_err

TINY = {
    "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "text_embed_dim": 12,
    "time_embed_dim": 24, "in_channels": 4, "out_channels": 4, "sample_height": 4, "sample_width": 6,
    "sample_frames": 9, "max_text_seq_length": 7, "use_rotary_positional_embeddings": True,
}  # fmt: skip
DIM = 32


def make(**overrides) -> Transformer:
    return randomize_(Transformer(TransformerConfig(**{**TINY, **overrides})), seed=0, std=0.1).eval()


def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 4, 4, 6, generator=gen), torch.randn(1, 7, 12, generator=gen), torch.tensor([300])


def lora_tensors(num_layers=2, rank=4, dim=DIM, seed=0, targets=("to_q", "to_k", "to_v", "to_out.0")):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(num_layers):
        for target in targets:
            key = f"transformer.transformer_blocks.{block}.attn1.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, dim, generator=gen) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(dim, rank, generator=gen) * 0.2
    return tensors


def write(path, tensors, metadata=None):
    meta = {"format": "pt"}
    if metadata is not None:
        meta["lora_adapter_metadata"] = json.dumps(metadata)
    save_file(tensors, str(path), metadata=meta)
    return path


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [type(m) for m in model.modules()] == types


# ------------------------------------------------------------------------------------------------ scales


def test_scale_is_alpha_over_rank_from_metadata_alpha_keys_or_one():
    tensors = lora_tensors(num_layers=1, rank=4)
    path = "transformer_blocks.0.attn1.to_q"
    assert parse_lora(tensors, None, "t").layers[path].scale == 1.0  # diffusers: alpha = rank without metadata
    meta = {"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.alpha_pattern": {"to_k": 8}}
    parsed = parse_lora(tensors, meta, "t")
    assert parsed.layers[path].scale == 0.5
    assert parsed.layers["transformer_blocks.0.attn1.to_k"].scale == 2.0
    rs = parse_lora(tensors, {"transformer.lora_alpha": 4, "transformer.use_rslora": True}, "t")
    assert rs.layers[path].scale == 2.0  # rsLoRA: alpha / sqrt(r)
    with_alpha = {**tensors, f"transformer.{path}.alpha": torch.tensor(1.0)}
    assert parse_lora(with_alpha, None, "t").layers[path].scale == 0.25


def test_sat_layout_any_number_of_layers_scale_one_over_rank():
    gen = torch.Generator().manual_seed(0)
    sat = {}
    for layer in range(3):
        for index in range(3):
            base = f"model.diffusion_model.transformer.layers.{layer}.attention.query_key_value"
            sat[f"{base}.matrix_A.{index}"] = torch.randn(8, DIM, generator=gen)
            sat[f"{base}.matrix_B.{index}"] = torch.randn(DIM, 8, generator=gen)
        dense = f"model.diffusion_model.transformer.layers.{layer}.attention.dense"
        sat[f"{dense}.matrix_A.0"], sat[f"{dense}.matrix_B.0"] = torch.randn(8, DIM), torch.randn(DIM, 8)
    sat["model.diffusion_model.transformer.layers.0.attention.dense.weight"] = torch.randn(DIM, DIM)  # ignored
    parsed = parse_lora(sat, None, "sat")
    assert parsed.layout == "sat" and len(parsed.layers) == 12
    v = parsed.layers["transformer_blocks.2.attn1.to_v"]
    assert v.scale == 1 / 8
    assert torch.equal(v.A, sat["model.diffusion_model.transformer.layers.2.attention.query_key_value.matrix_A.2"])
    assert "transformer_blocks.1.attn1.to_out.0" in parsed.layers


def test_unfused_lora_adds_weight_times_up_down_exactly_on_one_layer():
    layer = torch.nn.Linear(6, 5)
    wrapped = LoraLinear(layer)
    from cogvideox.lora import LoraAdapter

    down, up = torch.randn(2, 6), torch.randn(5, 2)
    wrapped.adapters["a"] = LoraAdapter(down, up)
    wrapped.adapters["a"].weight = 0.5
    x = torch.randn(3, 6)
    torch.testing.assert_close(wrapped(x), layer(x) + 0.5 * (x @ down.T @ up.T), rtol=1e-6, atol=1e-6)
    assert list(wrapped.state_dict()) == ["weight", "bias"]


# ------------------------------------------------------------------------------------------------ behaviour


def test_state_dict_keeps_published_keys_and_loads_them_back(tmp_path):
    model = make()
    keys = list(model.state_dict())
    load_lora(model, write(tmp_path / "a.safetensors", lora_tensors()))
    assert list(model.state_dict()) == keys
    other = make()
    load_lora(other, write(tmp_path / "b.safetensors", lora_tensors(seed=3)))
    other.load_state_dict(model.state_dict())  # the published keys go into the wrapped layers
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))


def test_set_adapters_weights_and_deactivation(tmp_path):
    model = make()
    args = inputs()
    with torch.no_grad():
        plain = model(*args)
        load_lora(model, write(tmp_path / "a.safetensors", lora_tensors(seed=1)), adapter_name="a")
        load_lora(model, write(tmp_path / "b.safetensors", lora_tensors(seed=2)), adapter_name="b", scale=0.5)
        assert loaded_adapters(model) == {"a": 1.0, "b": 0.5}
        set_adapters(model, ["b"], [0.0])
        assert loaded_adapters(model) == {"a": None, "b": 0.0}
        assert torch.equal(model(*args), plain)  # weight 0 adds exact zeros
        set_adapters(model, "a")
        only_a = model(*args)
        assert rel_err(only_a, plain) > 1e-3
        fuse_lora(model)
        assert rel_err(model(*args), only_a) < 1e-5
        with pytest.raises(RuntimeError, match=r"call unfuse_lora\(\) first"):
            set_adapters(model, "b")
        unfuse_lora(model)
        assert torch.equal(model(*args), only_a)
        unload_lora(model)
        assert lora_layers(model) == {} and torch.equal(model(*args), plain)


def test_fuse_then_unload_bakes_the_lora_in(tmp_path):
    model = make()
    args = inputs()
    with torch.no_grad():
        load_lora(model, write(tmp_path / "a.safetensors", lora_tensors()))
        with_lora = model(*args)
        fuse_lora(model)
        unload_lora(model)
        assert lora_layers(model) == {}
        assert rel_err(model(*args), with_lora) < 1e-5


def test_unfused_lora_with_fp8_storage_and_fuse_refused(tmp_path):
    model = make()
    model.enable_fp8_weight_storage()
    args = inputs()
    with torch.no_grad():
        plain = model(*args)
        load_lora(model, write(tmp_path / "a.safetensors", lora_tensors()))
        assert rel_err(model(*args), plain) > 1e-3
        before = snapshot(model)
        with pytest.raises(TypeError, match="fuse_lora\\(\\) needs nn.Linear base layers.*Fp8Linear"):
            fuse_lora(model)
        assert_unchanged(model, before)


def test_compiled_block_runs_unfused_lora(tmp_path):
    model = make(num_layers=1)
    load_lora(model, write(tmp_path / "a.safetensors", lora_tensors(num_layers=1)))
    args = inputs()
    with torch.no_grad():
        expected = model(*args)
        model.transformer_blocks[0] = torch.compile(model.transformer_blocks[0], fullgraph=True, dynamic=False)
        assert rel_err(model(*args), expected) < 1e-5


# ------------------------------------------------------------------------------------------------ bad input


def test_adapter_for_another_size_names_key_and_shapes_and_changes_nothing(tmp_path):
    model = make()
    load_lora(model, write(tmp_path / "ok.safetensors", lora_tensors()), adapter_name="ok")
    before = snapshot(model)
    bad = lora_tensors(dim=48)
    # safetensors stores keys sorted, so to_k is the file's first key.
    expected = (
        r"'transformer.transformer_blocks.0.attn1.to_k.lora_A.weight' has shape \(4, 48\) but "
        r"transformer_blocks.0.attn1.to_k of this model needs \(4, 32\)"
    )
    with pytest.raises(ValueError, match=expected):
        load_lora(model, write(tmp_path / "big.safetensors", bad))
    deeper = lora_tensors(num_layers=3)
    with pytest.raises(ValueError, match="targets transformer_blocks.2.attn1.to_k, which this model does not have"):
        load_lora(model, write(tmp_path / "deep.safetensors", deeper))
    assert_unchanged(model, before)
    assert loaded_adapters(model) == {"ok": 1.0}


def test_bad_files_and_names_are_refused_and_change_nothing(tmp_path):
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        load_lora(model, write(tmp_path / "none.safetensors", {"proj_out.weight": torch.zeros(2, 2)}))
    torch.save(lora_tensors(), tmp_path / "adapter.bin")
    with pytest.raises(ValueError, match="pickle file.*allow_pickle=True"):
        load_lora(model, tmp_path / "adapter.bin")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; loaded: \[\]"):
        set_adapters(model, "nope")
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        fuse_lora(model)
    assert_unchanged(model, before)
    name = load_lora(model, tmp_path / "adapter.bin", allow_pickle=True)
    assert name == "default_0"
    with pytest.raises(ValueError, match="an adapter named 'default_0' is already loaded"):
        load_lora(model, tmp_path / "adapter.bin", adapter_name="default_0", allow_pickle=True)
    with pytest.raises(ValueError, match="adapter_name 'a.b'"):
        load_lora(model, tmp_path / "adapter.bin", adapter_name="a.b", allow_pickle=True)


def test_pipeline_methods_delegate(tmp_path):
    from cogvideox import Pipeline

    model = make()
    pipe = Pipeline.__new__(Pipeline)
    pipe.transformer = model
    path = write(tmp_path / "pytorch_lora_weights.safetensors", lora_tensors())
    assert pipe.load_lora(tmp_path, adapter_name="x", scale=0.3) == "x"  # a folder finds the published name
    pipe.set_adapters(["x"], [0.7])
    assert loaded_adapters(model) == {"x": 0.7}
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora()
    assert lora_layers(model) == {} and path.is_file()


def test_cli_lora_options(tmp_path):
    from cogvideox import cli

    args = cli.build_parser().parse_args(
        ["generate", "--model", "m", "--prompt", "p", "--lora", "a", "--lora", "b", "--lora_scale", "0.5"]
    )
    assert args.lora == ["a", "b"] and args.lora_scale == [0.5]
    calls = []

    class FakePipe:
        def load_lora(self, path, adapter_name=None, scale=1.0):
            calls.append((path, adapter_name, scale))

    cli._load_loras(FakePipe(), args.lora, args.lora_scale)
    assert calls == [("a", "lora_0", 0.5), ("b", "lora_1", 0.5)]
    calls.clear()
    cli._load_loras(FakePipe(), ["a", "b"], [0.1, 0.2])
    assert calls == [("a", "lora_0", 0.1), ("b", "lora_1", 0.2)]
    with pytest.raises(ValueError, match="2 --lora but 3 --lora-scale"):
        cli._load_loras(FakePipe(), ["a", "b"], [1.0, 2.0, 3.0])


def test_fusing_qkv_after_a_lora_is_refused(tmp_path):
    model = make()
    load_lora(model, write(tmp_path / "a.safetensors", lora_tensors()))
    before = snapshot(model)
    with pytest.raises(TypeError, match="needs plain nn.Linear q/k/v projections"):
        model.fuse_qkv_projections()
    assert_unchanged(model, before)


def test_unfuse_is_bit_exact_in_bfloat16(tmp_path):
    model = make().to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load_lora(model, write(tmp_path / "a.safetensors", lora_tensors()))
    assert next(iter(lora_layers(model).values())).adapters["default_0"].down.dtype == torch.bfloat16
    fuse_lora(model)
    assert not torch.equal(model.state_dict()["transformer_blocks.0.attn1.to_q.weight"],
                           state["transformer_blocks.0.attn1.to_q.weight"])  # fmt: skip
    unfuse_lora(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_lora_with_model_and_sequential_offload(tmp_path):
    """Unfused adapters run under both offload modes (on the CPU the offload hooks make real copies, so a tensor
    left behind would still be caught by the pointer checks of the offload tests, and the outputs must match)."""
    pytest.importorskip("diffusers")
    from cogvideox import Pipeline
    from tests.tiny_checkpoints import TEXT_LEN, reference_pipeline

    reference_pipeline("5b", tmp_path / "ckpt")
    adapter = write(tmp_path / "a.safetensors", lora_tensors(seed=4))
    small = {"height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 2, "max_sequence_length": TEXT_LEN}

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a panda", generator=torch.Generator().manual_seed(0), output_type="latent", **small).frames

    plain_pipe = Pipeline.from_pretrained(tmp_path / "ckpt")
    plain = run(plain_pipe)
    plain_pipe.load_lora(adapter, scale=0.8)
    expected = run(plain_pipe)
    assert rel_err(expected, plain) > 1e-3

    sequential = Pipeline.from_pretrained(tmp_path / "ckpt")
    sequential.load_lora(adapter, scale=0.8)  # before enabling: the streamer records each block's tensors
    sequential.enable_sequential_cpu_offload(device="cpu")
    assert torch.equal(run(sequential), expected)

    model = Pipeline.from_pretrained(tmp_path / "ckpt")
    model.enable_model_cpu_offload(device="cpu")
    model.load_lora(adapter, scale=0.8)  # after enabling: moved with the transformer at each call
    assert torch.equal(run(model), expected)
    model.fuse_lora()  # while idle: the transformer is back in host memory
    assert rel_err(run(model), expected) < 1e-5
    model.unfuse_lora()
    assert torch.equal(run(model), expected)
