"""LoRA parity with diffusers + peft: the same adapter files loaded by ``CogVideoXPipeline.load_lora_weights`` and
by ours give the same transformer outputs in float32 (one and two adapters with weights, fused and unfused), and
unfusing restores the weights bit for bit.

The adapters are random tiny LoRAs written in the published diffusers layout (``pytorch_lora_weights.safetensors``
with ``lora_adapter_metadata``), every matrix non-zero (a zero ``lora_B``, peft's init, would hide bugs).
"""

from __future__ import annotations

import json

import pytest
import torch

from cogvideox import Transformer
from cogvideox.lora import fuse_lora, load_lora, set_adapters, unfuse_lora, unload_lora
from tests.helpers import randomize_, rel_err

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TOL = 1e-5
CONFIG = {
    "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "text_embed_dim": 12,
    "time_embed_dim": 24, "in_channels": 4, "out_channels": 4, "sample_height": 4, "sample_width": 6,
    "sample_frames": 9, "max_text_seq_length": 7,
}  # fmt: skip
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(folder, seed: int, rank: int, alpha: float, targets=TARGETS, num_layers: int = 2, dim: int = 32):
    """A random adapter in the diffusers layout with peft's metadata; returns the folder."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(num_layers):
        for target in targets:
            key = f"transformer.transformer_blocks.{block}.attn1.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, dim, generator=gen) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(dim, rank, generator=gen) * 0.2
    metadata = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": list(targets)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**CONFIG, use_rotary_positional_embeddings=False)
    randomize_(ref, seed=3, std=0.1).eval()
    ref.save_pretrained(root / "transformer")
    first = write_lora(root / "first", seed=1, rank=4, alpha=2.0)
    second = write_lora(root / "second", seed=2, rank=8, alpha=8.0, targets=("to_q", "to_v"))
    gen = torch.Generator().manual_seed(5)
    inputs = (torch.randn(1, 3, 4, 4, 6, generator=gen), torch.randn(1, 7, 12, generator=gen), torch.tensor([400]))
    return root, first, second, inputs


def reference_output(root, adapters, weights, fuse: bool, inputs):
    ref = CogVideoXTransformer3DModel.from_pretrained(root / "transformer").eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref, scheduler=None)
    for name, folder in adapters.items():
        pipe.load_lora_weights(str(folder), adapter_name=name)
    pipe.set_adapters(list(adapters), weights)
    if fuse:
        pipe.fuse_lora()
    latents, text, timestep = inputs
    with torch.no_grad():
        return ref(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, return_dict=False)[0]


def our_output(model, inputs):
    with torch.no_grad():
        return model(*inputs)


CASES = {
    "one": ({"first": 0}, [0.7]),
    "two": ({"first": 0, "second": 1}, [0.6, 1.3]),
}


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["qkv", "fused_qkv"])
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_diffusers(setup, case, fuse, fused_qkv):
    root, first, second, inputs = setup
    folders = {"first": first, "second": second}
    names, weights = CASES[case]
    adapters = {name: folders[name] for name in names}
    expected = reference_output(root, adapters, weights, fuse, inputs)

    ours = Transformer.from_pretrained(root / "transformer").eval()
    if fused_qkv:
        ours.fuse_qkv_projections()
    plain = our_output(ours, inputs)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    for name, folder in adapters.items():
        load_lora(ours, folder, adapter_name=name)
    set_adapters(ours, list(adapters), weights)
    if fuse:
        fuse_lora(ours)
    got = our_output(ours, inputs)
    err = rel_err(got, expected)
    print(f"lora parity {case} fuse={fuse} fused_qkv={fused_qkv}: rel err {err:.2e}")
    assert err < TOL
    assert rel_err(plain, expected) > 1e-2, "the adapters must change the output for the test to mean anything"
    if fuse:
        unfuse_lora(ours)
        assert rel_err(our_output(ours, inputs), expected) < TOL  # unfused adapters give the same output
    unload_lora(ours)
    restored = ours.state_dict()
    assert list(restored) == list(original)
    for key, value in original.items():
        assert torch.equal(restored[key], value), f"{key} not restored bit for bit"
    assert torch.equal(our_output(ours, inputs), plain)


SAT_PARTS = {"to_q": "query_key_value.matrix_{}.0", "to_k": "query_key_value.matrix_{}.1",
             "to_v": "query_key_value.matrix_{}.2", "to_out.0": "dense.matrix_{}.0"}  # fmt: skip


def test_sat_lora_matches_the_official_recipe(setup, tmp_path):
    """A SAT-layout adapter loaded by ours equals the official route: export to the diffusers layout without
    metadata (alpha = rank), then ``set_adapters([name], [1 / rank])`` (CogVideo tools/load_cogvideox_lora.py)."""
    root, first, _, inputs = setup
    from safetensors.torch import load_file

    diffusers_layout = load_file(str(first / "pytorch_lora_weights.safetensors"))
    sat = {}
    for key, tensor in diffusers_layout.items():
        block = key.split(".")[2]
        target = key.split(".attn1.")[1].rsplit(".lora_", 1)[0]
        side = "A" if ".lora_A." in key else "B"
        sat[f"model.diffusion_model.transformer.layers.{block}.attention.{SAT_PARTS[target].format(side)}"] = tensor
    save_file(sat, str(tmp_path / "sat_lora.safetensors"))
    exported = tmp_path / "exported"
    exported.mkdir()
    save_file(diffusers_layout, str(exported / "pytorch_lora_weights.safetensors"))  # no metadata
    rank = 4
    expected = reference_output(root, {"sat": exported}, [1.0 / rank], False, inputs)

    ours = Transformer.from_pretrained(root / "transformer").eval()
    load_lora(ours, tmp_path / "sat_lora.safetensors")
    err = rel_err(our_output(ours, inputs), expected)
    print(f"SAT lora parity: rel err {err:.2e}")
    assert err < TOL
