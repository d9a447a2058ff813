"""Bad inputs at load time: JSON files (missing, malformed, not an object), config values of the wrong type,
unsupported dtypes, ``model_index.json``, and the one ``from_pretrained`` body the components share."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cogvideox import VAE, T5Encoder, Transformer
from cogvideox.configs import (
    SchedulerConfig,
    T5Config,
    TransformerConfig,
    VAEConfig,
    config_from_dict,
    config_to_dict,
    read_config,
    read_json,
)
from cogvideox.loading import (
    PIPELINE_CLASSES,
    check_dtype,
    find_weight_files,
    is_image_to_video,
    load_component,
    read_model_index,
)
from cogvideox.lora import read_state_dict
from cogvideox.presets import SCHEDULER_2B, TRANSFORMER_CONFIGS
from cogvideox.samplers import load_scheduler_config
from cogvideox.text.t5 import read_t5_config
from cogvideox.text.vocab import load_vocab
from tests.helpers import PUBLISHED_VAE_5B, TINY_TRANSFORMER, randomize_

# ----------------------------------------------------------------------------------------------- read_json


def test_read_json_missing_file_names_it_and_what_it_should_be(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json not found: it should be the thing we need"):
        read_json(tmp_path / "nope.json", what="the thing we need")
    with pytest.raises(FileNotFoundError, match=r"is a folder, not a file: it should be a config"):
        read_json(tmp_path, what="a config")


def test_read_json_invalid_json_gives_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "num_layers": 2,\n  oops\n}')
    with pytest.raises(
        ValueError,
        match=r"config\.json is not valid JSON \(Expecting property name enclosed in double quotes at line 3, "
        r"column 3\): it should be a config; fix the file or download it again",
    ):
        read_json(path, what="a config")


@pytest.mark.parametrize(
    ("text", "kind"), [("[1, 2]", "array"), ('"x"', "string"), ("3", "number"), ("null", "null"), ("true", "boolean")]
)
def test_read_json_refuses_anything_but_an_object(tmp_path, text, kind):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"config\.json holds a JSON {kind}, not an object: it should be a config"):
        read_json(path, what="a config")


def test_read_json_refuses_non_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"config\.json is not UTF-8 text \(byte 7\): it should be a config"):
        read_json(path, what="a config")


def test_every_json_reader_names_the_file(tmp_path):
    bad = "{not json"
    (tmp_path / "config.json").write_text(bad)
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*the config\.json of a model folder"):
        read_config(tmp_path, TransformerConfig)
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*T5 text_encoder folder"):
        read_t5_config(tmp_path)

    (tmp_path / "scheduler_config.json").write_text(bad)
    with pytest.raises(ValueError, match=r"scheduler_config\.json is not valid JSON .*the scheduler config"):
        load_scheduler_config(tmp_path)

    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json holds a JSON array, not an object"):
        load_vocab(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": True}))
    with pytest.raises(ValueError, match=r"extra_ids=True must be a non-negative integer"):
        load_vocab(tmp_path)

    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text(bad)
    with pytest.raises(ValueError, match=r"tokenizer\.json is not valid JSON .*a T5 tokenizer\.json"):
        load_vocab(tmp_path)


def test_shard_index_errors_name_the_index(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON .*a shard index"):
        find_weight_files(tmp_path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"index\.json has no valid 'weight_map' \(found NoneType\): it should be"):
        find_weight_files(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": 3}}))
    with pytest.raises(ValueError, match=r"index\.json has no valid 'weight_map' \(found dict\)"):
        find_weight_files(tmp_path)


def test_lora_metadata_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"lora_adapter_metadata": "{broken"})
    with pytest.raises(ValueError, match=r"the 'lora_adapter_metadata' metadata of .*pytorch_lora_weights\.safetensors "
                       r"is not valid JSON"):  # fmt: skip
        read_state_dict(path)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 4})})
    assert read_state_dict(path)[1] == {"transformer.r": 4}


# ----------------------------------------------------------------------------------------------- config types


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "num_layers",
            "2",
            r'x/config\.json: "num_layers": "2" is a JSON string, but TransformerConfig\.num_layers must be an '
            r'integer \(default 30\); correct it in the file: write "num_layers": 2 without the quotes',
        ),
        ("num_layers", True, r'"num_layers": true is a JSON boolean, but TransformerConfig\.num_layers must be an '),
        ("num_layers", 2.5, r'"num_layers": 2\.5 is a JSON number, but TransformerConfig\.num_layers must be an int'),
        ("num_layers", None, r'"num_layers": null is a JSON null, but TransformerConfig\.num_layers must be an integ'),
        ("norm_eps", "1e-5", r'must be a number \(default 1e-05\); correct it in the file: write "norm_eps": 1e-5 '),
        ("norm_eps", False, r'"norm_eps": false is a JSON boolean, but TransformerConfig\.norm_eps must be a number'),
        ("use_rotary_positional_embeddings", 1, r"use_rotary_positional_embeddings must be true or false \(default"),
        ("use_rotary_positional_embeddings", "true", r'write "use_rotary_positional_embeddings": true without the q'),
        ("activation_fn", 3, r'"activation_fn": 3 is a JSON number, but TransformerConfig\.activation_fn must be a s'),
        ("patch_size_t", "2", r"patch_size_t must be an integer, or null \(default null\)"),
        ("out_channels", [16], r'"out_channels": \[16\] is a JSON array, but .* must be an integer, or null'),
    ],
)
def test_config_values_of_the_wrong_type_name_file_key_value_and_type(key, value, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(TransformerConfig, {key: value}, source="x/config.json")


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (VAEConfig, {"block_out_channels": [128, "256"]}, r"block_out_channels must be a list of integers"),
        (VAEConfig, {"down_block_types": "CogVideoXDownBlock3D"}, r"is a JSON string, .* must be a list of strings"),
        (VAEConfig, {"latents_mean": [0.1, None]}, r"latents_mean must be a list of numbers, or null"),
        (SchedulerConfig, {"trained_betas": "linear"}, r"trained_betas must be a list of numbers, or null"),
        (SchedulerConfig, {"num_train_timesteps": "1000"}, r"write \"num_train_timesteps\": 1000 without the quotes"),
        (T5Config, {"d_model": "4096"}, r'"d_model": "4096" is a JSON string, but T5Config\.d_model must be an int'),
    ],
)
def test_type_checks_cover_lists_optionals_and_every_config(cls, data, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(cls, data, source="c.json")


def test_mistyped_config_file_fails_at_read_not_deep_in_the_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_TRANSFORMER, "num_layers": "2"}))
    with pytest.raises(ValueError, match=r"config\.json: \"num_layers\": \"2\" is a JSON string"):
        Transformer.from_pretrained(tmp_path)


def test_lenient_where_json_writers_differ():
    # An int where a float is expected (JSON drops ".0"), an integral float where an int is expected (the reference
    # annotates the VAE's temporal_compression_ratio float), null for optional fields, lists for tuples.
    config = config_from_dict(
        TransformerConfig, {"norm_eps": 1, "num_layers": 2.0, "patch_size_t": None, "ofs_embed_dim": 8}
    )
    assert config.norm_eps == 1 and config.num_layers == 2 and isinstance(config.num_layers, int)
    vae = config_from_dict(VAEConfig, {"temporal_compression_ratio": 4.0, "latents_mean": [0, 0.5]})
    assert vae.temporal_compression_ratio == 4 and vae.latents_mean == (0, 0.5)


@pytest.mark.parametrize("name", sorted(TRANSFORMER_CONFIGS))
def test_every_published_transformer_config_loads(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "x", **TRANSFORMER_CONFIGS[name]}))
    read_config(tmp_path, TransformerConfig)


@pytest.mark.parametrize("cls", [VAEConfig, SchedulerConfig, T5Config, TransformerConfig])
def test_defaults_round_trip_through_the_type_check(tmp_path, cls):
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cls())))
    assert read_config(tmp_path, cls) == cls()


def test_published_scheduler_and_vae_values_load():
    config_from_dict(SchedulerConfig, SCHEDULER_2B)
    assert config_from_dict(VAEConfig, PUBLISHED_VAE_5B).scaling_factor == 0.7


# ----------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, None),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("FP16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
    ],
)
def test_check_dtype_accepts_the_compute_dtypes_and_their_names(given, expected):
    assert check_dtype(given) is expected


@pytest.mark.parametrize("given", [torch.float8_e4m3fn, torch.float8_e5m2, "float8_e4m3fn", "torch.float8_e5m2"])
def test_check_dtype_refuses_float8_and_points_to_fp8_storage(given):
    with pytest.raises(ValueError, match=r"weights cannot be loaded as float8.*Transformer\.enable_fp8_weight_storage"):
        check_dtype(given)


@pytest.mark.parametrize("given", [torch.int8, torch.float64, torch.bool, "float64", "int8", "half-ish"])
def test_check_dtype_refuses_other_dtypes_listing_the_accepted_ones(given):
    with pytest.raises(
        ValueError,
        match=r"is not a dtype cogvideox computes in: use torch\.float32, torch\.bfloat16 or torch\.float16 \(or their "
        r"names 'float32'/'fp32', 'bfloat16'/'bf16', 'float16'/'fp16'\), or None to keep the dtype stored in the file",
    ):
        check_dtype(given)


@pytest.mark.parametrize("given", [16, object(), [torch.float16]])
def test_check_dtype_refuses_non_dtypes(given):
    with pytest.raises(TypeError, match=r"is not a dtype: use torch\.float32, torch\.bfloat16 or torch\.float16"):
        check_dtype(given)


@pytest.mark.parametrize("cls", [Transformer, VAE, T5Encoder])
def test_from_pretrained_checks_the_dtype_before_reading_anything(tmp_path, cls):
    with pytest.raises(ValueError, match="weights cannot be loaded as float8"):
        cls.from_pretrained(tmp_path / "does-not-exist", dtype=torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------------------- load_component


def write_transformer(folder: Path) -> Transformer:
    model = randomize_(Transformer(TransformerConfig(**TINY_TRANSFORMER)), seed=1).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(model.config, "CogVideoXTransformer3DModel")))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


def test_from_pretrained_takes_a_dtype_name_and_a_pipeline_root(tmp_path):
    reference = write_transformer(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    loaded = Transformer.from_pretrained(tmp_path, dtype="bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.config == reference.config
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16)), key


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    width: int = 3


class Tiny(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.inner = nn.Linear(config.width, 2)
        self.out = nn.Linear(2, 2)


def test_load_component_hooks(tmp_path):
    folder = tmp_path / "part"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"width": 3}))
    gen = torch.Generator().manual_seed(0)
    stored = {
        "old.weight": torch.randn(2, 3, generator=gen),
        "old.bias": torch.randn(2, generator=gen),
        "out.weight": torch.randn(2, 2, generator=gen),
        "out.bias": torch.randn(2, generator=gen),
        "dropped": torch.zeros(1),
    }
    save_file(stored, str(folder / "model.safetensors"))
    seen: dict[str, object] = {}

    def rename(found: Path):
        seen["folder"] = found
        return lambda key: None if key == "dropped" else key.replace("old.", "inner.")

    def finish(model: Tiny) -> Tiny:
        seen["finished"] = True
        return model

    model = load_component(
        Tiny, TinyConfig, tmp_path, "part", dtype="fp16", rename=rename,
        keep_float32=lambda key, dtype: dtype == torch.float16 and key.startswith("out."), finish=finish,
    )  # fmt: skip
    assert seen == {"folder": folder, "finished": True}
    assert model.inner.weight.dtype == torch.float16 and model.out.weight.dtype == torch.float32
    assert torch.equal(model.out.weight, stored["out.weight"])  # kept float32: loaded exactly

    custom = load_component(Tiny, TinyConfig, folder, "part", config_reader=lambda f: TinyConfig(width=3),
                            rename=rename)  # fmt: skip
    assert custom.inner.weight.dtype == torch.float32  # dtype None: as stored


# ----------------------------------------------------------------------------------------------- model_index.json


def test_model_index_missing_is_allowed(tmp_path):
    assert read_model_index(tmp_path) is None and is_image_to_video(tmp_path) is None


@pytest.mark.parametrize(
    ("class_name", "i2v"),
    [
        ("CogVideoXPipeline", False),
        ("CogVideoXImageToVideoPipeline", True),
        ("CogVideoXVideoToVideoPipeline", False),
        ("CogVideoXFunControlPipeline", False),
        (None, None),
    ],
)
def test_model_index_names_the_task(tmp_path, class_name, i2v):
    index = {"vae": ["diffusers", "AutoencoderKLCogVideoX"]}
    if class_name is not None:
        index["_class_name"] = class_name
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert read_model_index(tmp_path) == index
    assert is_image_to_video(tmp_path) is i2v


def test_model_index_errors(tmp_path):
    path = tmp_path / "model_index.json"
    path.write_text('{"_class_name": "CogVideoXPipeline",}')
    with pytest.raises(ValueError, match=r"model_index\.json is not valid JSON \(.* at line 1, column 37\)"):
        read_model_index(tmp_path)
    path.write_text(json.dumps({"_class_name": "WanPipeline"}))
    accepted = r"\['CogVideoXPipeline', 'CogVideoXImageToVideoPipeline', 'CogVideoXVideoToVideoPipeline', " \
        r"'CogVideoXFunControlPipeline'\]"  # fmt: skip
    with pytest.raises(
        ValueError,
        match=rf"model_index\.json names the pipeline class 'WanPipeline', which is not a CogVideoX pipeline: "
        rf"cogvideox loads folders saved for {accepted}",
    ):
        is_image_to_video(tmp_path)
    path.write_text(json.dumps({"_class_name": ["CogVideoXPipeline"]}))
    with pytest.raises(ValueError, match=r"names the pipeline class \['CogVideoXPipeline'\]"):
        read_model_index(tmp_path)
    assert list(PIPELINE_CLASSES)[1] == "CogVideoXImageToVideoPipeline"
