"""The CPU linear kernel choice (cogvideox/ops/linear.py): oneDNN for large float32 inference products, F.linear
everywhere else, the same numbers either way (to summation order)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cogvideox import Transformer
from cogvideox.configs import T5Config, TransformerConfig
from cogvideox.ops.linear import (
    ONEDNN_MIN_MACS,
    Linear,
    cpu_onednn_linear_enabled,
    is_plain_linear,
    linear,
    set_cpu_onednn_linear,
)
from cogvideox.text.t5 import T5Encoder
from tests.helpers import TINY_TRANSFORMER, randomize_, rel_err

# The module itself: ``cogvideox.ops.linear`` as an attribute is the function the package re-exports.
linear_module = importlib.import_module("cogvideox.ops.linear")
needs_onednn = pytest.mark.skipif(not cpu_onednn_linear_enabled(), reason="this PyTorch build has no oneDNN linear")


class OpNames(TorchDispatchMode):
    """Records the name of every ATen / mkldnn op the code inside runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def run(fn) -> tuple[torch.Tensor, list[str]]:
    with OpNames() as ops:
        out = fn()
    return out, ops.names


def tensors(rows: int, inp: int, out: int, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, rows, inp, generator=gen).to(dtype).requires_grad_(requires_grad)
    weight = (torch.randn(out, inp, generator=gen) / inp**0.5).to(dtype).requires_grad_(requires_grad)
    bias = torch.randn(out, generator=gen).to(dtype).requires_grad_(requires_grad)
    return x, weight, bias


@needs_onednn
def test_large_float32_inference_products_take_onednn_and_match_f_linear():
    x, weight, bias = tensors(300, 256, 512)  # 2 * 300 * 256 * 512 = 78.6M multiply-adds
    assert x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
    with torch.no_grad():
        out, names = run(lambda: linear(x, weight, bias))
        expected = F.linear(x, weight, bias)
        no_bias, _ = run(lambda: linear(x, weight))
    assert names == ["mkldnn::_linear_pointwise"]
    assert out.shape == (2, 300, 512) and out.dtype == torch.float32
    assert rel_err(out, expected) <= 1e-6  # summation order only
    assert rel_err(no_bias, F.linear(x, weight)) <= 1e-6
    # A 2-row product with a wide weight (the adaLN and time-embedding layers) is also large enough.
    row = torch.randn(2, 512)
    wide = torch.randn(18432, 512)
    with torch.no_grad():
        out, names = run(lambda: linear(row, wide))
    assert names == ["mkldnn::_linear_pointwise"] and rel_err(out, F.linear(row, wide)) <= 1e-6


@pytest.mark.parametrize(
    "case",
    ["small product", "bfloat16", "autograd", "autocast", "jit trace", "switched off"],
)
def test_everything_else_runs_f_linear_bit_for_bit(case):
    shape = (4, 16, 32) if case == "small product" else (300, 256, 512)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    x, weight, bias = tensors(*shape, dtype=dtype, requires_grad=case == "autograd")
    try:
        if case == "switched off":
            set_cpu_onednn_linear(False)
        with torch.set_grad_enabled(case == "autograd"), torch.autocast("cpu", enabled=case == "autocast"):
            if case == "jit trace":
                traced = torch.jit.trace(lambda a: linear(a, weight, bias), (x,))
                out, names = run(lambda: traced(x))
            else:
                out, names = run(lambda: linear(x, weight, bias))
            expected = F.linear(x, weight, bias)
    finally:
        set_cpu_onednn_linear(True)
    assert "mkldnn::_linear_pointwise" not in names
    assert torch.equal(out, expected)
    if case == "autocast":
        assert out.dtype == torch.bfloat16  # autocast's cast still happened
    if case == "autograd":
        (grad_ours,) = torch.autograd.grad(out.sum(), weight)
        (grad_ref,) = torch.autograd.grad(expected.sum(), weight)
        assert torch.equal(grad_ours, grad_ref)


def test_models_build_every_projection_as_ops_linear():
    transformer = Transformer(TransformerConfig(**TINY_TRANSFORMER))
    encoder = T5Encoder(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
    for model in (transformer, encoder):
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert layers and all(type(m) is Linear for m in layers)
    transformer.fuse_qkv_projections()
    attn = transformer.transformer_blocks[0].attn1
    assert type(attn.to_qkv) is Linear and is_plain_linear(attn.to_qkv)
    assert is_plain_linear(nn.Linear(2, 2)) and not is_plain_linear(nn.Identity())


@needs_onednn
def test_forward_mode_ad_and_func_transforms_keep_f_linear():
    """The op has no derivative at all: forward-mode AD and torch.func would silently get zero tangents."""
    x, weight, bias = tensors(300, 256, 512)
    tangent = torch.ones_like(x)
    with torch.no_grad():
        _, jvp_out = torch.func.jvp(lambda a: linear(a, weight, bias), (x,), (tangent,))
        _, expected = torch.func.jvp(lambda a: F.linear(a, weight, bias), (x,), (tangent,))
    assert torch.equal(jvp_out, expected) and expected.abs().max() > 0
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        out_tangent = fwAD.unpack_dual(linear(dual, weight, bias)).tangent
    assert out_tangent is not None and torch.equal(out_tangent, expected)


@needs_onednn
def test_strided_and_expanded_operands_give_the_same_sums():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, 512, generator=gen)[..., ::2]  # every other column
    weight = torch.randn(512, 512, generator=gen)[:, ::2]
    biases = {"strided": torch.randn(1024, generator=gen)[::2], "expanded": torch.randn(1, generator=gen).expand(512)}
    for bias in biases.values():
        with torch.no_grad():
            out, names = run(lambda b=bias: linear(x, weight, b))
        assert names[-1] == "mkldnn::_linear_pointwise"
        assert rel_err(out, F.linear(x, weight, bias)) <= 1e-6


@needs_onednn
def test_a_model_on_the_onednn_path_matches_f_linear_and_compiles(monkeypatch):
    """The tiny models are below the threshold; with it at 0 every projection takes oneDNN. The result matches the
    F.linear model, and torch.compile (which cannot lower the op) still compiles the whole forward."""
    monkeypatch.setattr(linear_module, "ONEDNN_MIN_MACS", 0)
    config = {**TINY_TRANSFORMER, "use_rotary_positional_embeddings": True, "num_layers": 1}
    model = randomize_(Transformer(TransformerConfig(**config)), std=0.1).eval()
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 2, 4, 6, 10, generator=gen)
    text = torch.randn(2, 7, 12, generator=gen)
    timestep = torch.tensor([981.0, 37.5])
    with torch.no_grad():
        out, names = run(lambda: model(latents, text, timestep))
        set_cpu_onednn_linear(False)
        try:
            expected = model(latents, text, timestep)
        finally:
            set_cpu_onednn_linear(True)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(latents, text, timestep)
    assert names.count("mkldnn::_linear_pointwise") >= 10
    assert rel_err(out, expected) <= 1e-5
    assert rel_err(compiled, expected) <= 1e-5
