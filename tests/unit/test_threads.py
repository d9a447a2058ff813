"""The thread rule of a pipeline call (cogvideox/threads.py): one intra-op thread for tiny models on the CPU,
set for the call only; the process's own setting is untouched outside it."""

from __future__ import annotations

import pytest
import torch

from cogvideox import Pipeline
from cogvideox.presets import transformer_config
from cogvideox.threads import SMALL_PASS_FLOPS, intra_op_threads, pass_flops, threads_for_call


def threads_seen(demo_pipe: Pipeline) -> list[int]:
    seen = []

    def record(_pipe, step, timestep, tensors):
        seen.append(torch.get_num_threads())
        return {}

    demo_pipe("a red circle moves up", num_inference_steps=2, output_type="latent", callback_on_step_end=record)
    return seen


def test_demo_call_runs_on_one_thread_and_restores_the_process_setting(demo_pipe):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert threads_seen(demo_pipe) == [1, 1]
        assert torch.get_num_threads() == 2
        demo_pipe.cpu_threads = "all"
        assert threads_seen(demo_pipe) == [2, 2]
        demo_pipe.cpu_threads = 3
        assert threads_seen(demo_pipe) == [3, 3]
        assert torch.get_num_threads() == 2
    finally:
        demo_pipe.cpu_threads = None
        torch.set_num_threads(previous)


def test_the_rule_keeps_every_thread_for_the_published_models():
    config = transformer_config("CogVideoX-2b")
    flops = pass_flops(config.inner_dim, config.num_layers, 13 * 30 * 45 + 226, 2)
    assert flops > 1000 * SMALL_PASS_FLOPS
    assert threads_for_call(torch.device("cpu"), flops) is None
    assert threads_for_call(torch.device("cpu"), SMALL_PASS_FLOPS / 2) == 1
    assert threads_for_call(torch.device("cuda"), SMALL_PASS_FLOPS / 2) is None
    with pytest.raises(ValueError, match="cpu_threads=0: a positive int, 'all' or None"):
        threads_for_call(torch.device("cpu"), 1.0, 0)


def test_threads_are_restored_when_the_call_fails():
    previous = torch.get_num_threads()
    with pytest.raises(RuntimeError), intra_op_threads(previous + 1):
        assert torch.get_num_threads() == previous + 1
        raise RuntimeError
    assert torch.get_num_threads() == previous
