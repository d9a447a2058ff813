"""Strict loading: file discovery, clear errors, dtype/device placement, configs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cogvideox.configs import TransformerConfig, config_from_dict, config_to_dict, read_config
from cogvideox.loading import (
    WeightLoadingError,
    build_on_meta,
    component_folder,
    find_weight_files,
    load_weights,
    resolve_pretrained,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))


def tiny_state(seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "linear.weight": torch.randn(4, 3, generator=gen),
        "linear.bias": torch.randn(4, generator=gen),
        "norm.weight": torch.randn(4, generator=gen),
        "norm.bias": torch.randn(4, generator=gen),
        "step": torch.tensor(7),
    }


def write(folder, state, name="model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / name))
    return folder


def write_sharded(folder, state):
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, part in shards.items():
        write(folder, {k: state[k] for k in part}, name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_loads_every_tensor_into_dtype_and_device(tmp_path, layout):
    state = tiny_state()
    folder = write(tmp_path, state) if layout == "single" else write_sharded(tmp_path, state)
    model = load_weights(build_on_meta(Tiny), folder, dtype=torch.bfloat16, device="cpu")
    assert model.linear.weight.dtype == torch.bfloat16
    assert model.step.dtype == torch.long and model.step.item() == 7  # integers keep their dtype
    assert torch.equal(model.norm.bias, state["norm.bias"].to(torch.bfloat16))
    assert not model.training
    assert not any(t.is_meta for t in model.state_dict().values())


def test_keep_float32_and_rename(tmp_path):
    state = {("old." + k if k.startswith("linear") else k): v for k, v in tiny_state().items()}
    folder = write(tmp_path, {**state, "tied.copy": torch.zeros(1)})

    def rename(key):
        return None if key == "tied.copy" else key.removeprefix("old.")

    model = load_weights(
        build_on_meta(Tiny), folder, dtype=torch.float16, rename=rename, keep_float32=lambda k: k.startswith("norm")
    )
    assert model.linear.weight.dtype == torch.float16
    assert model.norm.weight.dtype == torch.float32


def test_strict_report_lists_every_problem(tmp_path):
    state = tiny_state()
    del state["norm.bias"]
    state["linear.weight"] = torch.zeros(4, 5)
    state["extra.weight"] = torch.zeros(2)
    folder = write(tmp_path, state)
    with pytest.raises(WeightLoadingError) as err:
        load_weights(build_on_meta(Tiny), folder)
    text = str(err.value)
    assert "missing keys (2):" in text and "norm.bias" in text  # linear.weight is misshaped, so also unloaded
    assert "unexpected keys (1):\n    extra.weight in model.safetensors" in text
    assert "linear.weight: model expects [4, 3], model.safetensors has [4, 5]" in text


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder .*nope does not exist"):
        find_weight_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"holds no weights \(\*.safetensors"):
        find_weight_files(tmp_path)


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    folder = write(tmp_path / "trunc", tiny_state())
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"model.safetensors.*(truncated or corrupt)"):
        load_weights(build_on_meta(Tiny), folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"bad/model.safetensors is not a readable safetensors file"):
        load_weights(build_on_meta(Tiny), bad)


def test_shard_index_naming_a_missing_shard(tmp_path):
    folder = write_sharded(tmp_path, tiny_state())
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lists shards that are not there"):
        find_weight_files(folder)


def test_pickle_is_refused_unless_allowed_and_then_weights_only(tmp_path):
    torch.save(tiny_state(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle files can run code when opened, so they are refused"):
        load_weights(build_on_meta(Tiny), tmp_path)
    model = load_weights(build_on_meta(Tiny), tmp_path, allow_pickle=True)
    assert model.step.item() == 7

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"x": Evil()}, evil / "model.pt")
    with pytest.raises(ValueError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        load_weights(build_on_meta(Tiny), evil, allow_pickle=True)


def test_precision_variants_do_not_confuse_the_plain_file(tmp_path):
    write(tmp_path, tiny_state(0), "diffusion_pytorch_model.safetensors")
    write(tmp_path, tiny_state(1), "diffusion_pytorch_model.fp16.safetensors")
    assert [p.name for p in find_weight_files(tmp_path)] == ["diffusion_pytorch_model.safetensors"]
    write(tmp_path, tiny_state(2), "other.safetensors")
    with pytest.raises(ValueError, match="several safetensors files and no index"):
        find_weight_files(tmp_path)


def test_precision_variant_indexes_do_not_confuse_the_plain_index(tmp_path):
    write_sharded(tmp_path, tiny_state())
    variant = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / "model.fp16.safetensors.index.json").write_text(json.dumps(variant))
    assert [p.name for p in find_weight_files(tmp_path)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_config_defaults_unknown_keys_and_round_trip(tmp_path, caplog):
    data = {"_class_name": "CogVideoXTransformer3DModel", "num_layers": 3, "new_key": 1, "sample_frames": 81}
    with caplog.at_level(logging.WARNING):
        config = config_from_dict(TransformerConfig, data, source="x/config.json")
    assert config.num_layers == 3 and config.num_attention_heads == 30  # missing keys take the defaults
    assert caplog.text.count("ignoring config keys ['new_key']") == 1
    round_trip = config_to_dict(config, class_name="CogVideoXTransformer3DModel")
    (tmp_path / "config.json").write_text(json.dumps(round_trip))
    assert read_config(tmp_path, TransformerConfig) == config


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_config(tmp_path, TransformerConfig)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_config(tmp_path, TransformerConfig)
    (tmp_path / "config.json").write_text(json.dumps({"use_learned_positional_embeddings": True}))
    with pytest.raises(ValueError, match="needs use_rotary_positional_embeddings=True"):
        read_config(tmp_path, TransformerConfig)


def test_component_folder_accepts_root_or_component(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    assert component_folder(tmp_path, "transformer") == tmp_path / "transformer"
    assert component_folder(tmp_path / "transformer", "transformer") == tmp_path / "transformer"
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub id"):
        resolve_pretrained(str(tmp_path / "missing" / "deeper" / "path"))
