"""Parallel layout checks and launcher errors: in-process, no spawned ranks."""

from __future__ import annotations

import pytest
import torch

from cogvideox.cli import main
from cogvideox.distributed import ParallelConfig, ParallelState, groups, init_from_env


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ulysses_degree": 0}, r"ulysses_degree=0: must be a positive integer \(1 turns sequence parallel off\)"),
        ({"ulysses_degree": 2.0}, r"ulysses_degree=2.0: must be a positive integer"),
        ({"cfg_degree": 4}, r"cfg_degree=4: must be 1 .* or 2 .*guidance has only two branches"),
    ],
)
def test_config_refuses_bad_degrees(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_world_size_must_be_the_product_of_the_degrees():
    config = ParallelConfig(ulysses_degree=2, cfg_degree=2)
    assert config.world_size == 4
    config.check_world_size(4)
    with pytest.raises(
        ValueError,
        match=r"ulysses_degree=2 x cfg_degree=2 = 4 processes, but the process group has 6: .*"
        r"\(e\.g\. ulysses_degree=3, cfg_degree=2 or ulysses_degree=6, cfg_degree=1",
    ):
        config.check_world_size(6)


def test_state_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match=r"torch.distributed is not initialized: launch with torchrun"):
        ParallelState(ParallelConfig())


def test_init_from_env_names_the_missing_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set: start .* torchrun"):
        init_from_env()


def test_cli_parallel_flags_without_torchrun_fail_before_loading(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code = main(["generate", "--model", "no/such/model", "--prompt", "p", "--cfg-parallel", "--output", "x.mp4"])
    assert code == 2
    assert "not set: start the processes with torchrun" in capsys.readouterr().err


def test_cli_refuses_offload_with_parallel_before_loading(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; the refusal comes before init and loading
    code = main(["generate", "--model", "no/such/model", "--prompt", "p", "--offload", "model", "--ulysses-degree",
                 "2", "--output", "x.mp4"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--offload model with --ulysses-degree / --cfg-parallel" in err
    assert "not combined with CPU offload" in err


@pytest.fixture(scope="module")
def demo_pipe():
    from cogvideox import Pipeline

    return Pipeline.from_pretrained()  # the bundled demo model: a real pipeline in a second


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_enable_parallel_refuses_cpu_offload(demo_pipe, mode):
    getattr(demo_pipe, f"enable_{mode}_cpu_offload")("cpu")
    try:
        with pytest.raises(
            ValueError,
            match=rf"CPU offload '{mode}' \(enable_{mode}_cpu_offload, --offload {mode}\) and parallel inference "
            r"\(enable_parallel / parallel=, --ulysses-degree / --cfg-parallel\) cannot be combined",
        ):
            demo_pipe.enable_parallel(cfg_degree=2)  # refused before it looks for torch.distributed
        assert demo_pipe.parallel is None
    finally:
        demo_pipe.disable_cpu_offload()


def test_cpu_offload_refused_while_parallel(demo_pipe):
    demo_pipe.parallel = object()  # stands for an enabled ParallelInference (needs no process group here)
    try:
        with pytest.raises(ValueError, match=r"CPU offload 'model' .* cannot be combined"):
            demo_pipe.enable_model_cpu_offload("cpu")
        assert demo_pipe.memory.mode is None
        demo_pipe.enable_text_encoder_offload("cpu")  # the transformer stays in place: allowed (default on CUDA)
        assert demo_pipe.memory.mode == "text"
    finally:
        demo_pipe.parallel = None
        demo_pipe.disable_cpu_offload()


def test_control_tensors_follow_the_backend_not_the_model(monkeypatch):
    """NCCL moves CUDA tensors only, on the current device, whatever device the (maybe offloaded) model is on."""
    monkeypatch.setattr(groups.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(groups.torch.cuda, "current_device", lambda: 3)
    assert groups.collective_device() == torch.device("cuda", 3)
    for backend in ("gloo", "mpi", "cpu:gloo,cuda:nccl"):
        monkeypatch.setattr(groups.dist, "get_backend", lambda group=None, name=backend: name)
        assert groups.collective_device() == torch.device("cpu")


def test_global_rank_of_the_default_group_is_the_rank_itself():
    assert groups.global_rank(None, 3) == 3
