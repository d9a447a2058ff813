"""SAT checkpoints: a tiny random reference model is written in the SAT layout with the published key map (written
here, independently of cogvideox.loading.sat: published -> SAT), converted back by ours, and the converted
transformer gives the reference's outputs. The VAE key map round-trips too."""

from __future__ import annotations

import json

import pytest
import torch

from cogvideox import Transformer
from cogvideox.atomic import usual_mode
from cogvideox.loading.sat import convert_sat, load_sat_transformer, read_sat_checkpoint, sat_vae_state_dict
from tests.helpers import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel  # noqa: E402

CONFIG = {
    "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 3, "text_embed_dim": 12,
    "time_embed_dim": 24, "in_channels": 4, "out_channels": 4, "sample_height": 4, "sample_width": 6,
    "sample_frames": 9, "max_text_seq_length": 7,
}  # fmt: skip
VARIANTS = {
    "2b": {},
    "5b-i2v": {"use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True, "in_channels": 8},
    "1.5-i2v": {
        "use_rotary_positional_embeddings": True,
        "patch_size_t": 2,
        "patch_bias": False,
        "sample_frames": 17,
        "ofs_embed_dim": 24,
    },  # fmt: skip
}

# Published (diffusers) block key -> SAT key, per block; {i} is the block index.
BLOCK_TO_SAT = {
    "norm1.norm": "transformer.layers.{i}.input_layernorm",
    "norm2.norm": "transformer.layers.{i}.post_attention_layernorm",
    "attn1.to_out.0": "transformer.layers.{i}.attention.dense",
    "ff.net.0.proj": "transformer.layers.{i}.mlp.dense_h_to_4h",
    "ff.net.2": "transformer.layers.{i}.mlp.dense_4h_to_h",
    "attn1.norm_q": "mixins.adaln_layer.query_layernorm_list.{i}",
    "attn1.norm_k": "mixins.adaln_layer.key_layernorm_list.{i}",
}
TOP_TO_SAT = {
    "norm_final": "transformer.final_layernorm",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "ofs_embedding.linear_1": "ofs_embed.0",
    "ofs_embedding.linear_2": "ofs_embed.2",
    "patch_embed.proj": "mixins.patch_embed.proj",
    "patch_embed.text_proj": "mixins.patch_embed.text_proj",
    "norm_out.norm": "mixins.final_layer.norm_final",
    "proj_out": "mixins.final_layer.linear",
    "norm_out.linear": "mixins.final_layer.adaLN_modulation.1",
}


def to_sat(published: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Published transformer keys -> the SAT checkpoint layout (prefix ``model.diffusion_model.``)."""
    sat = {}
    for i in range(num_layers):
        block = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [published.pop(f"{block}attn1.to_{p}.{leaf}") for p in "qkv"]
            sat[f"transformer.layers.{i}.attention.query_key_value.{leaf}"] = torch.cat(qkv)
            n1 = published.pop(f"{block}norm1.linear.{leaf}").chunk(6)
            n2 = published.pop(f"{block}norm2.linear.{leaf}").chunk(6)
            # SAT: video attn (3), video ff (3), text attn (3), text ff (3).
            sat[f"mixins.adaln_layer.adaLN_modulations.{i}.1.{leaf}"] = torch.cat(n1[:3] + n2[:3] + n1[3:] + n2[3:])
            for ours, theirs in BLOCK_TO_SAT.items():
                sat[f"{theirs.format(i=i)}.{leaf}"] = published.pop(f"{block}{ours}.{leaf}")
    for key in list(published):
        module, _, leaf = key.rpartition(".")
        if key == "patch_embed.pos_embedding":
            sat["mixins.pos_embed.pos_embedding"] = published.pop(key)
        elif module in TOP_TO_SAT:
            sat[f"{TOP_TO_SAT[module]}.{leaf}"] = published.pop(key)
    assert not published, f"test key map misses {list(published)}"
    sat["mixins.pos_embed.freqs_sin"] = torch.zeros(3)  # SAT buffers the converter must drop
    sat["transformer.layers.0.attention.query_key_value.matrix_A.0"] = torch.zeros(2, 32)
    return {f"model.diffusion_model.{k}": v for k, v in sat.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sat_transformer_converts_to_the_reference(variant, tmp_path):
    config = {**CONFIG, **VARIANTS[variant]}
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**config)
    randomize_(ref, seed=7, std=0.1).eval()
    sat = to_sat(dict(ref.state_dict()), config["num_layers"])
    if variant == "2b":
        sat["model.diffusion_model.mixins.pos_embed.pos_embedding"] = torch.zeros(1, 31, 32)  # fixed sin-cos
    torch.save({"module": sat}, tmp_path / "mp_rank_00_model_states.pt")
    out = convert_sat(tmp_path / "mp_rank_00_model_states.pt", tmp_path / "converted", transformer_config=config)
    assert sorted(p.name for p in (out / "transformer").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"
    ]  # fmt: skip
    # Readable like any folder the user makes (mkdtemp staging and safetensors' writer are private otherwise).
    assert out.stat().st_mode & 0o777 == usual_mode(tmp_path, directory=True)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777 == usual_mode(tmp_path)
    ours = Transformer.from_pretrained(out / "transformer").eval()

    gen = torch.Generator().manual_seed(0)
    frames = 4 if "patch_size_t" in config else 3
    latents = torch.randn(1, frames, config["in_channels"], 4, 6, generator=gen)
    text = torch.randn(1, 7, 12, generator=gen)
    extra = {"ofs": torch.tensor([2.0])} if "ofs_embed_dim" in config else {}
    rotary = None
    if config.get("use_rotary_positional_embeddings"):
        import types

        from diffusers import CogVideoXPipeline

        fake = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, 32, 48, frames, torch.device("cpu"))
    with torch.no_grad():
        expected = ref(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500]),
                       image_rotary_emb=rotary, return_dict=False, **extra)[0]  # fmt: skip
        got = ours(latents, text, torch.tensor([500]), **extra)
    err = rel_err(got, expected)
    print(f"SAT {variant}: rel err {err:.2e}")
    assert err < 1e-5
    direct = load_sat_transformer(tmp_path / "mp_rank_00_model_states.pt", config).eval()
    with torch.no_grad():
        assert rel_err(direct(latents, text, torch.tensor([500]), **extra), got) < 1e-6


def test_sat_conversion_errors(tmp_path):
    config = dict(CONFIG)
    ref = CogVideoXTransformer3DModel(**config)
    sat = to_sat(dict(ref.state_dict()), config["num_layers"])
    path = tmp_path / "ckpt.pt"
    torch.save(sat, path)
    with pytest.raises(ValueError, match="does not match the given config.*missing.*transformer_blocks.3"):
        convert_sat(path, tmp_path / "out", transformer_config={**config, "num_layers": 4})
    assert not (tmp_path / "out").exists()
    torch.save({**sat, "model.diffusion_model.mystery.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="'mystery.weight' is not part of the CogVideoX transformer key map"):
        convert_sat(path, tmp_path / "out", transformer_config=config)
    torch.save({"module": sat}, path)
    assert set(read_sat_checkpoint(path)) == set(sat)


def test_sat_vae_key_map():
    sat = {
        "encoder.down.1.block.0.conv1.conv.weight": torch.zeros(1),
        "encoder.down.0.downsample.conv.weight": torch.zeros(1),
        "encoder.mid.block_2.norm1.weight": torch.zeros(1),
        "decoder.up.0.block.1.nin_shortcut.weight": torch.zeros(1),
        "decoder.up.3.upsample.conv.weight": torch.zeros(1),
        "loss.logvar": torch.zeros(1),
    }
    assert sorted(sat_vae_state_dict(sat)) == sorted([
        "encoder.down_blocks.1.resnets.0.conv1.conv.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid_block.resnets.1.norm1.weight",
        "decoder.up_blocks.3.resnets.1.conv_shortcut.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
    ])  # fmt: skip


def test_cli_convert_sat(tmp_path, capsys):
    from cogvideox import cli

    ref = CogVideoXTransformer3DModel(**CONFIG)
    torch.save({"module": to_sat(dict(ref.state_dict()), CONFIG["num_layers"])}, tmp_path / "t.pt")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    code = cli.main(["convert-sat", str(tmp_path / "t.pt"), str(tmp_path / "out"),
                     "--config", str(tmp_path / "config.json")])  # fmt: skip
    assert code == 0
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (
        cli.main(
            ["convert-sat", str(tmp_path / "t.pt"), str(tmp_path / "out"), "--config", str(tmp_path / "config.json")]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    # A published config of another size: the converted keys do not fit, nothing is written.
    assert cli.main(["convert-sat", str(tmp_path / "t.pt"), str(tmp_path / "big"), "--config", "CogVideoX-2b"]) == 2
    assert "does not match the given config" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def vae_to_sat(published: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published VAE keys -> SAT ``3d-vae.pt`` keys (the inverse of the VAE map of diffusers' conversion script)."""
    sat = {}
    for key, tensor in published.items():
        for ours, theirs in (("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
                             ("resnets.", "block."), ("down_blocks.", "down."), ("downsamplers.0", "downsample"),
                             ("upsamplers.0", "upsample"), ("conv_shortcut", "nin_shortcut")):  # fmt: skip
            key = key.replace(ours, theirs)
        if key.startswith("decoder.up_blocks."):
            index, rest = key[len("decoder.up_blocks.") :].split(".", 1)
            key = f"decoder.up.{3 - int(index)}.{rest}"
        sat[key] = tensor
    sat["loss.logvar"] = torch.zeros(())
    return sat


def test_sat_vae_round_trips_the_reference_keys():
    vae = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4
    )
    published = vae.state_dict()
    back = sat_vae_state_dict(vae_to_sat(dict(published)))
    assert sorted(back) == sorted(published)
    assert all(back[k] is published[k] for k in published)
