"""Parallel layout checks and launcher errors: in-process, no spawned ranks."""

from __future__ import annotations

import pytest

from cogvideox.cli import main
from cogvideox.distributed import ParallelConfig, ParallelState, init_from_env


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
