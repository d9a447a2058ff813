"""The CPU linear kernel (cogvideox/ops/linear.py): models are built from plain nn.Linear; use_onednn_linear_ turns
them into OneDNNLinear layers in place, which take oneDNN for large float32 inference products and F.linear
everywhere else, the same numbers either way (to summation order); use_aten_linear_ turns them back."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cogvideox import Transformer
from cogvideox.configs import T5Config, TransformerConfig
from cogvideox.ops.fp8 import Fp8Linear
from cogvideox.ops.linear import (
    ONEDNN_MIN_MACS,
    OneDNNLinear,
    is_plain_linear,
    onednn_linear,
    onednn_linear_available,
    use_aten_linear_,
    use_onednn_linear_,
)
from cogvideox.text.t5 import T5Encoder
from tests.helpers import TINY_TRANSFORMER, randomize_, rel_err

linear_module = importlib.import_module("cogvideox.ops.linear")
needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN linear")


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
        out, names = run(lambda: onednn_linear(x, weight, bias))
        expected = F.linear(x, weight, bias)
        no_bias, _ = run(lambda: onednn_linear(x, weight))
    assert names == ["mkldnn::_linear_pointwise"]
    assert out.shape == (2, 300, 512) and out.dtype == torch.float32
    assert rel_err(out, expected) <= 1e-6  # summation order only
    assert rel_err(no_bias, F.linear(x, weight)) <= 1e-6
    # A 2-row product with a wide weight (the adaLN and time-embedding layers) is also large enough.
    row = torch.randn(2, 512)
    wide = torch.randn(18432, 512)
    with torch.no_grad():
        out, names = run(lambda: onednn_linear(row, wide))
    assert names == ["mkldnn::_linear_pointwise"] and rel_err(out, F.linear(row, wide)) <= 1e-6


@pytest.mark.parametrize(
    "case",
    ["small product", "bfloat16", "autograd", "autocast", "jit trace", "swapped back"],
)
def test_everything_else_runs_f_linear_bit_for_bit(case):
    shape = (4, 16, 32) if case == "small product" else (300, 256, 512)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    x, weight, bias = tensors(*shape, dtype=dtype, requires_grad=case == "autograd")
    layer = OneDNNLinear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight, layer.bias = nn.Parameter(weight, weight.requires_grad), nn.Parameter(bias, bias.requires_grad)
    if case == "swapped back":
        assert use_aten_linear_(layer) == 1 and type(layer) is nn.Linear
    with torch.set_grad_enabled(case == "autograd"), torch.autocast("cpu", enabled=case == "autocast"):
        if case == "jit trace":
            traced = torch.jit.trace(layer, (x,))
            out, names = run(lambda: traced(x))
        else:
            out, names = run(lambda: layer(x))
        expected = F.linear(x, weight, bias)
    assert "mkldnn::_linear_pointwise" not in names
    assert torch.equal(out, expected)
    if case == "autocast":
        assert out.dtype == torch.bfloat16  # autocast's cast still happened
    if case == "autograd":
        (grad_ours,) = torch.autograd.grad(out.sum(), layer.weight)
        (grad_ref,) = torch.autograd.grad(expected.sum(), weight)
        assert torch.equal(grad_ours, grad_ref)


def tiny_models() -> list[nn.Module]:
    """The 1.0 transformer (convolution patch), the 1.5 one (linear patch) and T5, all with random weights."""
    config_15 = {**TINY_TRANSFORMER, "patch_size_t": 2, "use_rotary_positional_embeddings": True}
    t5 = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    models = [Transformer(TransformerConfig(**TINY_TRANSFORMER)), Transformer(TransformerConfig(**config_15))]
    return [randomize_(m, std=0.1).eval() for m in [*models, T5Encoder(t5)]]


def model_inputs(model: nn.Module) -> tuple:
    gen = torch.Generator().manual_seed(1)
    if isinstance(model, T5Encoder):
        return (torch.randint(0, 32, (2, 9), generator=gen),)
    frames = 2 * (model.config.patch_size_t or 1)
    latents = torch.randn(2, frames, 4, 6, 10, generator=gen)
    return latents, torch.randn(2, 7, 12, generator=gen), torch.tensor([981.0, 37.5])


def test_models_are_plain_and_the_swap_makes_every_projection_onednn_in_place(monkeypatch):
    """Built from plain nn.Linear; after use_onednn_linear_ every projection of the Transformer (1.0 and 1.5, whose
    patch embedding is a linear layer) and of T5Encoder is a OneDNNLinear holding the very same Parameter objects,
    and the outputs stay within the model-level bound on the oneDNN path (threshold 0)."""
    monkeypatch.setattr(linear_module, "ONEDNN_MIN_MACS", 0)
    for model in tiny_models():
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert layers and all(type(m) is nn.Linear for m in layers)
        params = [id(p) for p in model.parameters()]
        args = model_inputs(model)
        with torch.no_grad():
            expected = model(*args)
            assert use_onednn_linear_(model) == len(layers)
            assert all(type(m) is OneDNNLinear and is_plain_linear(m) for m in layers)
            assert [id(p) for p in model.parameters()] == params  # the same tensors: nothing copied
            assert use_onednn_linear_(model) == 0  # idempotent
            # The 1.0 convolutional patch embedding computes its product itself, and follows the swap too.
            own = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
            out, names = run(lambda m=model, a=args: m(*a))
            assert names.count("mkldnn::_linear_pointwise") == len(layers) + len(own)
            assert rel_err(out, expected) <= 1e-5
            assert use_aten_linear_(model) == len(layers) and all(type(m) is nn.Linear for m in layers)
            assert not any(getattr(m, "onednn_linear", False) for m in model.modules())
            assert torch.equal(model(*args), expected)
    assert is_plain_linear(nn.Linear(2, 2)) and not is_plain_linear(nn.Identity())


def test_fusing_qkv_keeps_the_layer_class():
    transformer = Transformer(TransformerConfig(**TINY_TRANSFORMER))
    use_onednn_linear_(transformer)
    transformer.fuse_qkv_projections()
    attn = transformer.transformer_blocks[0].attn1
    assert type(attn.to_qkv) is OneDNNLinear and is_plain_linear(attn.to_qkv)
    transformer.unfuse_qkv_projections()
    assert type(attn.to_q) is OneDNNLinear and type(attn.to_out[0]) is OneDNNLinear
    plain = Transformer(TransformerConfig(**TINY_TRANSFORMER))
    plain.fuse_qkv_projections()
    assert type(plain.transformer_blocks[0].attn1.to_qkv) is nn.Linear


@needs_onednn
def test_forward_mode_ad_and_func_transforms_keep_f_linear():
    """The op has no derivative at all: forward-mode AD and torch.func would silently get zero tangents."""
    x, weight, bias = tensors(300, 256, 512)
    tangent = torch.ones_like(x)
    with torch.no_grad():
        _, jvp_out = torch.func.jvp(lambda a: onednn_linear(a, weight, bias), (x,), (tangent,))
        _, expected = torch.func.jvp(lambda a: F.linear(a, weight, bias), (x,), (tangent,))
    assert torch.equal(jvp_out, expected) and expected.abs().max() > 0
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        out_tangent = fwAD.unpack_dual(onednn_linear(dual, weight, bias)).tangent
    assert out_tangent is not None and torch.equal(out_tangent, expected)


@needs_onednn
def test_strided_and_expanded_operands_give_the_same_sums():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, 512, generator=gen)[..., ::2]  # every other column
    weight = torch.randn(512, 512, generator=gen)[:, ::2]
    biases = {"strided": torch.randn(1024, generator=gen)[::2], "expanded": torch.randn(1, generator=gen).expand(512)}
    for bias in biases.values():
        with torch.no_grad():
            out, names = run(lambda b=bias: onednn_linear(x, weight, b))
        assert names[-1] == "mkldnn::_linear_pointwise"
        assert rel_err(out, F.linear(x, weight, bias)) <= 1e-6


@needs_onednn
def test_a_model_on_the_onednn_path_matches_f_linear_and_compiles(monkeypatch):
    """The tiny models are below the threshold; with it at 0 every projection of the swapped model takes oneDNN.
    The result matches the plain (F.linear) model, and torch.compile (which cannot lower the op) still compiles the
    whole forward."""
    monkeypatch.setattr(linear_module, "ONEDNN_MIN_MACS", 0)
    config = {**TINY_TRANSFORMER, "use_rotary_positional_embeddings": True, "num_layers": 1}
    model = randomize_(Transformer(TransformerConfig(**config)), std=0.1).eval()
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 2, 4, 6, 10, generator=gen)
    text = torch.randn(2, 7, 12, generator=gen)
    timestep = torch.tensor([981.0, 37.5])
    with torch.no_grad():
        expected = model(latents, text, timestep)
        use_onednn_linear_(model)
        out, names = run(lambda: model(latents, text, timestep))
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(latents, text, timestep)
    assert names.count("mkldnn::_linear_pointwise") >= 10
    assert rel_err(out, expected) <= 1e-5
    assert rel_err(compiled, expected) <= 1e-5


@needs_onednn
def test_layers_with_their_own_product_follow_the_swap(monkeypatch):
    """The 1.0 convolutional patch embedding and fp8 layers compute their product themselves: the swap sets their
    flag, so the whole model runs one kernel choice (fp8 made from a swapped layer keeps it)."""
    monkeypatch.setattr(linear_module, "ONEDNN_MIN_MACS", 0)
    conv_model = Transformer(TransformerConfig(**TINY_TRANSFORMER))  # 1.0: Conv2d patch embedding
    assert isinstance(conv_model.patch_embed.proj, nn.Conv2d) and conv_model.patch_embed.onednn_linear is False
    use_onednn_linear_(conv_model)
    assert conv_model.patch_embed.onednn_linear is True
    conv_model.enable_fp8_weight_storage()
    fp8 = [m for m in conv_model.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.onednn_linear for m in fp8)
    x = torch.randn(3, fp8[0].in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, names = run(lambda: fp8[0](x))
        assert names.count("mkldnn::_linear_pointwise") == 1
        reference = F.linear(x, fp8[0].dequantized_weight(torch.float32), fp8[0].bias)
        assert rel_err(out, reference) <= 1e-6
    use_aten_linear_(conv_model)
    assert not conv_model.patch_embed.onednn_linear and not any(m.onednn_linear for m in fp8)
