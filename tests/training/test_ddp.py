"""DistributedDataParallel: two gloo processes, each with half the batch, step exactly like one process with the
whole batch (gradients are averaged, and the loss is a mean over clips); only rank 0 writes the LoRA file; a saved
state gives each rank back its own random stream."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cogvideox.training import Trainer, TrainingBatch, TrainingConfig, inject_lora, lora_parameters
from tests.training.conftest import fixed_batch, objective, tiny_transformer

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(lora: bool):
    model = tiny_transformer("5b", seed=8)
    if lora:
        inject_lora(model, rank=2, alpha=4, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():  # B = 0 at init would make the first step's A gradient zero: start from non-zero B
            for p in lora_parameters(model)[1::2]:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    trainer = Trainer(model, objective(), TrainingConfig(learning_rate=1e-3, warmup_steps=0))
    return model, trainer


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, trainer = _setup(lora=True)
        assert trainer.model is not model  # wrapped in DDP
        full = fixed_batch(batch=4)
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in full.items()}
        trainer.step(TrainingBatch(**half))
        trainer.step(TrainingBatch(**half))
        path = trainer.save_lora(folder)
        torch.save([p.detach() for p in lora_parameters(model)], f"{folder}/rank{rank}.pt")
        assert path.is_file()
        # Resume into a fresh random stream: each rank must continue its own, as if never interrupted.
        trainer.save_state(f"{folder}/state.pt")
        uninterrupted = torch.rand(8, generator=trainer.generator)
        trainer.generator = torch.Generator().manual_seed(123)
        trainer.load_state(f"{folder}/state.pt")
        torch.save([uninterrupted, torch.rand(8, generator=trainer.generator)], f"{folder}/draws{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_step_like_one_with_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model, trainer = _setup(lora=True)
    batch = TrainingBatch(**fixed_batch(batch=4))
    trainer.step(batch)
    trainer.step(batch)
    expected = [p.detach() for p in lora_parameters(model)]
    worst = 0.0
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b in zip(got, expected, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (rank, (a - b).abs().max())
            worst = max(worst, (a - b).abs().max().item())
    print(f"DDP vs one process: max |difference| {worst:.1e}")
    files = ["draws0.pt", "draws1.pt", "pytorch_lora_weights.safetensors", "rank0.pt", "rank1.pt", "state.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files

    draws = [torch.load(tmp_path / f"draws{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for uninterrupted, resumed in draws:
        assert torch.equal(resumed, uninterrupted)
    assert not torch.equal(draws[0][1], draws[1][1])  # the ranks' streams differ after the resume too
    with pytest.raises(ValueError, match=r"saved by 2 process\(es\) but this run has 1: .* --nproc_per_node=2"):
        trainer.load_state(tmp_path / "state.pt")
