"""The training step and loop: the loss falls when a tiny model overfits one batch; checkpointing, accumulation,
warmup and resuming change nothing they should not; an image-to-video step with noised first frames runs."""

from __future__ import annotations

import os

import pytest
import torch

from cogvideox.training import Trainer, TrainingBatch, TrainingConfig, constant_with_warmup
from tests.training.conftest import fixed_batch, objective, tiny_transformer


def test_loss_falls_steadily_when_overfitting_a_fixed_batch():
    """40 AdamW steps on one batch with fixed timesteps and noise (full fine-tuning of a tiny 5B-style model)."""
    model = tiny_transformer("5b", seed=2)
    trainer = Trainer(model, objective(), TrainingConfig(learning_rate=2e-3, warmup_steps=5))
    batch = TrainingBatch(**fixed_batch())
    losses = trainer.fit([batch] * 40, num_steps=40, log_every=0)
    assert len(losses) == 40 and trainer.step_count == 40
    assert losses[-1] < 0.6 * losses[0], losses
    window = 5
    averages = [sum(losses[i : i + window]) / window for i in range(0, 40, window)]
    assert all(later < earlier for earlier, later in zip(averages, averages[1:], strict=False)), averages


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_transformer("1.5", seed=3)
        trainer = Trainer(model, objective(), TrainingConfig(gradient_checkpointing=checkpointing))
        loss = trainer.compute_loss(TrainingBatch(**fixed_batch(frames=4)))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-7)
    assert grads[0].abs().max() > 0


def test_micro_batches_accumulate_to_the_full_batch_step():
    full = fixed_batch(batch=4)
    halves = [TrainingBatch(**{k: v[i : i + 2] for k, v in full.items()}) for i in (0, 2)]
    params = []
    for batches in ([TrainingBatch(**full)], halves):
        model = tiny_transformer("2b", seed=5)
        trainer = Trainer(model, objective("2b"), TrainingConfig(learning_rate=1e-3, warmup_steps=0))
        trainer.step(batches)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], rtol=0, atol=1e-6)


def test_warmup_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.optimization import get_constant_schedule_with_warmup

    optimizers = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0) for _ in range(2)]
    ours = constant_with_warmup(optimizers[0], 4)
    ref = get_constant_schedule_with_warmup(optimizers[1], 4)
    seen = []
    for _ in range(7):
        seen.append((ours.get_last_lr()[0], ref.get_last_lr()[0]))
        for optimizer in optimizers:
            optimizer.step()
        ours.step(), ref.step()
    assert [a for a, _ in seen] == [b for _, b in seen] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert diffusers is not None


def test_save_and_resume_continue_identically(tmp_path):
    batch = TrainingBatch(**{k: v for k, v in fixed_batch().items() if k in ("latents", "text_embeds")})
    config = TrainingConfig(learning_rate=1e-3, warmup_steps=3)
    straight = Trainer(tiny_transformer("5b", seed=6), objective(), config)
    expected = [straight.step(batch).loss for _ in range(4)]

    first = Trainer(tiny_transformer("5b", seed=6), objective(), config)
    first.step(batch), first.step(batch)
    first.save_state(tmp_path / "state.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "state.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not private, as a mkstemp file is
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left
    resumed = Trainer(tiny_transformer("5b", seed=6), objective(), config)
    resumed.load_state(tmp_path / "state.pt")
    assert resumed.step_count == 2
    assert [resumed.step(batch).loss for _ in range(2)] == expected[2:]


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_image_dropout_applies_to_precomputed_image_latents(dropout):
    """image_dropout zeroes image latents passed in the batch, as it does for images the trainer encodes."""
    trainer = Trainer(tiny_transformer("1.5-i2v", seed=7), objective(), TrainingConfig(image_dropout=dropout))
    batch = fixed_batch(frames=4)
    image = torch.randn(2, 4, 4, 6, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = trainer.compute_loss(TrainingBatch(**batch, image_latents=image), reduction="none")
        trainer.config.image_dropout = 0.0
        kept = trainer.compute_loss(TrainingBatch(**batch, image_latents=image), reduction="none")
        zeroed = trainer.compute_loss(TrainingBatch(**batch, image_latents=torch.zeros_like(image)), reduction="none")
    assert not torch.equal(kept, zeroed)  # the image latents do reach the model
    assert torch.equal(got, zeroed if dropout == 1.0 else kept)


def test_batch_errors():
    trainer = Trainer(tiny_transformer("5b"), objective())
    batch = fixed_batch()
    with pytest.raises(ValueError, match="text_embeds batch 1 != latents batch 2"):
        trainer.compute_loss(TrainingBatch(batch["latents"], batch["text_embeds"][:1]))
    with pytest.raises(ValueError, match="this transformer is text-to-video"):
        trainer.compute_loss(TrainingBatch(batch["latents"], batch["text_embeds"], images=torch.zeros(2, 3, 8, 8)))
    i2v = Trainer(tiny_transformer("1.5-i2v"), objective())
    with pytest.raises(ValueError, match="this transformer is image-to-video: give the batch images"):
        i2v.compute_loss(TrainingBatch(fixed_batch(frames=4)["latents"], batch["text_embeds"]))
