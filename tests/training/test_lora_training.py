"""LoRA training: only LoRA parameters change, and a saved adapter reloads (ours and diffusers) to the same model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cogvideox.lora import fuse_lora, load_lora, loaded_adapters, set_adapters, unfuse_lora
from cogvideox.training import (
    Trainer,
    TrainingBatch,
    TrainingConfig,
    inject_lora,
    lora_parameters,
    save_lora,
)
from tests.helpers import rel_err
from tests.training.conftest import fixed_batch, objective, tiny_transformer

RANK, ALPHA = 4, 2.0
TOL = 1e-5
# 2B (sin-cos positions computed inside the model): diffusers' transformer applies RoPE only from tables its
# pipeline passes in, so a bare diffusers 5B transformer would not be the same model.
VARIANT = "2b"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2B-style model with a LoRA trained for 8 steps, the base weights before, and the saved file."""
    torch.set_num_threads(1)
    model = tiny_transformer(VARIANT, seed=4)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = inject_lora(model, rank=RANK, alpha=ALPHA, generator=torch.Generator().manual_seed(1))
    trainer = Trainer(model, objective(VARIANT), TrainingConfig(learning_rate=1e-2, warmup_steps=2))
    batch = TrainingBatch(**fixed_batch())
    before = [p.detach().clone() for p in lora_parameters(model)]
    losses = [trainer.step(batch).loss for _ in range(8)]
    folder = tmp_path_factory.mktemp("lora") / "out"
    path = trainer.save_lora(folder)
    return model, base, before, paths, losses, path


def test_inject_freezes_everything_else(trained):
    model, _, before, paths, _, _ = trained
    assert len(paths) == 2 * 4  # 2 blocks x (to_q, to_k, to_v, to_out.0)
    assert paths[3] == "transformer_blocks.0.attn1.to_out.0"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 16 and all(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for name in trainable)
    # peft init: B = 0 (the model starts as the base model), A uniform in +-1/sqrt(in).
    assert all(not b.any() for b in before[1::2]) and all(0 < a.abs().max() <= 32**-0.5 for a in before[::2])


def test_training_changes_only_lora_parameters(trained):
    model, base, before, _, losses, _ = trained
    after = model.state_dict()  # the published keys, plus the trainable adapters' parameters
    extra = sorted(set(after) - set(base))
    assert len(extra) == 16 and extra[0] == "transformer_blocks.0.attn1.to_k.adapters.default.lora_A"
    changed = [k for k in base if not torch.equal(base[k], after[k])]
    assert changed == []
    moved = [not torch.equal(a, b) for a, b in zip(before, lora_parameters(model), strict=True)]
    assert all(moved)
    assert losses[-1] < losses[0]


def test_saved_file_layout_and_metadata(trained):
    _, _, _, _, _, path = trained
    from safetensors import safe_open

    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = sorted(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert len(keys) == 16 and "transformer.transformer_blocks.1.attn1.to_out.0.lora_B.weight" in keys
    assert metadata["transformer.r"] == RANK and metadata["transformer.lora_alpha"] == ALPHA
    assert sorted(metadata["transformer.target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_saved_file_has_the_usual_permissions(trained):
    """Not private (0600, as a tempfile.mkstemp file would be): readable by whoever the umask lets read it."""
    _, _, _, _, _, path = trained
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _inputs():
    gen = torch.Generator().manual_seed(9)
    return torch.randn(2, 3, 4, 6, 10, generator=gen), torch.randn(2, 7, 12, generator=gen), torch.tensor([100, 900])


def test_reloaded_lora_reproduces_the_trained_model(trained):
    model, _, _, _, _, path = trained
    model.eval()
    with torch.no_grad():
        expected = model(*_inputs())
        fresh = tiny_transformer(VARIANT, seed=4).eval()
        plain = fresh(*_inputs())
        load_lora(fresh, path.parent)
        got = fresh(*_inputs())
        fuse_lora(fresh)
        fused = fresh(*_inputs())
        unfuse_lora(fresh)
    assert rel_err(plain, expected) > 1e-3  # the LoRA did change the model
    assert rel_err(got, expected) < TOL
    assert rel_err(fused, expected) < TOL


def test_diffusers_reads_the_saved_lora(trained, tmp_path):
    """diffusers + peft load our file (alpha from the metadata) and give the trained model's output."""
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from tests.helpers import TINY_TRANSFORMER

    model, _, _, _, _, path = trained
    fresh = tiny_transformer(VARIANT, seed=4)
    ref = diffusers.CogVideoXTransformer3DModel(**TINY_TRANSFORMER)
    ref.load_state_dict(fresh.state_dict())
    ref.eval()
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref, scheduler=None)
    pipe.load_lora_weights(str(path.parent))
    latents, text, timesteps = _inputs()
    with torch.no_grad():
        got = ref(hidden_states=latents, encoder_hidden_states=text, timestep=timesteps, return_dict=False)[0]
        expected = model.eval()(latents, text, timesteps)
    assert rel_err(got, expected) < TOL


def test_trained_adapter_next_to_an_inference_adapter(trained, tmp_path):
    """The trained adapter next to an inference adapter: both in the model, names kept apart, and with the
    inference adapter's weight at 0 the model is the trained one."""
    model, _, _, _, _, path = trained
    other = tiny_transformer(VARIANT, seed=4)
    inject_lora(other, rank=2, alpha=2, target_modules=["to_q", "ff.net.2"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # B = 0 at init would make it a no-op adapter
        for b in lora_parameters(other)[1::2]:
            b.normal_(0, 1.0, generator=torch.Generator().manual_seed(6))
    other_path = save_lora(other, tmp_path / "inference")

    fresh = tiny_transformer(VARIANT, seed=4).eval()
    assert load_lora(fresh, path, adapter_name="trained") == "trained"
    assert load_lora(fresh, other_path, adapter_name="inference", scale=0.5) == "inference"
    assert loaded_adapters(fresh) == {"trained": 1.0, "inference": 0.5}
    layer = fresh.transformer_blocks[0].attn1.to_q  # adapted by both, each keeping its own tensors (ranks 4, 2)
    assert list(layer.adapters) == ["trained", "inference"]
    assert [a.down.shape[0] for a in layer.adapters.values()] == [RANK, 2]
    assert list(fresh.transformer_blocks[0].attn1.to_k.adapters) == ["trained"]
    with torch.no_grad():
        expected = model.eval()(*_inputs())
        both = fresh(*_inputs())
        set_adapters(fresh, ["trained", "inference"], [1.0, 0.0])
        trained_only = fresh(*_inputs())
    print(f"inference adapter at 0.5 moves the output by {rel_err(both, expected):.1e}")
    assert rel_err(both, expected) > 1e-3  # the inference adapter does act at weight 0.5
    assert rel_err(trained_only, expected) < TOL


def test_inject_errors():
    model = tiny_transformer("5b")
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no linear layer"):
        inject_lora(model, target_modules=["nope"])
    with pytest.raises(ValueError, match="target module transformer_blocks.0.attn1.to_out is a ModuleList"):
        inject_lora(model, target_modules=["to_out"])
    inject_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        inject_lora(model, rank=2, alpha=2)
    fused = tiny_transformer("5b")
    fused.fuse_qkv_projections()
    with pytest.raises(ValueError, match=r"call transformer.unfuse_qkv_projections\(\) before training"):
        inject_lora(fused)
    with pytest.raises(ValueError, match="nothing to train: no parameter requires grad"):
        Trainer(tiny_transformer("5b").requires_grad_(False), objective())
    with pytest.raises(ValueError, match="no trainable LoRA adapter named 'default'"):
        save_lora(tiny_transformer("5b"), "unused")


def test_bfloat16_model_with_float32_lora():
    """The official mixed precision: frozen model in bfloat16, LoRA parameters (and their gradients) in float32."""
    model = tiny_transformer("5b").to(torch.bfloat16)
    inject_lora(model, rank=2, alpha=2)
    trainer = Trainer(model, objective(), TrainingConfig(warmup_steps=0, gradient_checkpointing=False))
    result = trainer.step(TrainingBatch(**fixed_batch()))
    params = lora_parameters(model)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert torch.isfinite(torch.tensor(result.loss))
