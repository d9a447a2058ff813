"""The "flash" and "sage" attention backends, tested on the CPU with fake kernel packages put in ``sys.modules``:
selection resolves the package once (one-line ImportError when missing), calls a kernel cannot take fall back to
SDPA with one warning per reason, and the kernels are custom ops that ``torch.compile(fullgraph=True)`` keeps
opaque."""

from __future__ import annotations

import importlib
import importlib.machinery
import re
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from cogvideox.ops import (
    BACKENDS,
    attention,
    attention_sdpa,
    get_attention_backend,
    set_attention_backend,
    use_attention_backend,
)

attn = importlib.import_module("cogvideox.ops.attention")  # the module (cogvideox.ops.attention is the function)
AttentionFallbackWarning = attn.AttentionFallbackWarning
unsupported_reason = attn.unsupported_reason

PACKAGES = ("flash_attn_interface", "flash_attn", "sageattention")
MISSING_FLASH = (
    "attention backend 'flash' needs FlashAttention: pip install flash-attn (FlashAttention 2) or "
    "flash_attn_interface (FlashAttention 3, built from the flash-attention repo's hopper/ folder); or use 'sdpa'"
)
MISSING_SAGE = "attention backend 'sage' needs SageAttention: pip install sageattention; or use 'sdpa'"


class FakeKernel:
    """A kernel package's function: SDPA on ``[B, L, H, D]`` tensors, counting its calls. It reads a value on the
    host, as a compiled extension is opaque to dynamo: traced inline, it would break a fullgraph compile."""

    def __init__(self, returns_lse: bool = False) -> None:
        self.calls = 0
        self.returns_lse = returns_lse
        self.scales: list[float | None] = []

    def __call__(self, q, k, v, **kwargs):
        if "tensor_layout" in kwargs:  # sageattn's keywords
            assert kwargs["tensor_layout"] == "NHD" and kwargs["is_causal"] is False
            scale = kwargs["sm_scale"]
        else:  # flash_attn_func's
            scale = kwargs["softmax_scale"]
        self.calls += 1
        self.scales.append(scale)
        _ = q.sum().item()  # host read: dynamo cannot trace through this without a graph break
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        out = out.transpose(1, 2)
        return (out, torch.zeros(())) if self.returns_lse else out


def install(monkeypatch, module_name: str, kernel: FakeKernel) -> None:
    """Put a fake ``module_name`` holding ``kernel`` under the function name its package uses."""
    module = types.ModuleType(module_name)
    module.__spec__ = importlib.machinery.ModuleSpec(module_name, loader=None)  # find_spec reads it
    setattr(module, "sageattn" if module_name == "sageattention" else "flash_attn_func", kernel)
    monkeypatch.setitem(sys.modules, module_name, module)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """No kernel package (a None entry makes find_spec say "absent" even where one is installed), sdpa selected,
    nothing resolved or warned yet; the tensors' device (cpu) admitted unless a test says otherwise."""
    for name in PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(attn, "_backend_name", "sdpa")
    monkeypatch.setattr(attn, "_kernels", {})
    monkeypatch.setattr(attn, "_warned", set())
    monkeypatch.setattr(attn, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))


def qkv(dtype=torch.bfloat16, head_dim=64, requires_grad=False):
    """q, k, v ``[2, 3, 10, head_dim]`` (``[B, H, L, D]``)."""
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(2, 3, 10, head_dim, generator=gen, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def recorded(fn):
    """Run ``fn`` and return (its result, the AttentionFallbackWarning messages it gave), every warning shown
    (Python's own once-per-location filter off, so the once-only rule tested is the module's)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, AttentionFallbackWarning)]


# ------------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize(("backend", "message"), [("flash", MISSING_FLASH), ("sage", MISSING_SAGE)])
def test_selecting_a_missing_package_raises_one_line_and_keeps_the_backend(backend, message):
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        set_attention_backend(backend)
    assert "\n" not in message
    assert get_attention_backend() == "sdpa"
    with pytest.raises(ImportError, match=re.escape(message)), use_attention_backend(backend):
        pass  # the context manager raises on entry and leaves the backend alone
    assert get_attention_backend() == "sdpa"


def test_selection_resolves_the_package_once_fa3_before_fa2(monkeypatch):
    fa3, fa2 = FakeKernel(returns_lse=True), FakeKernel()
    install(monkeypatch, "flash_attn_interface", fa3)
    install(monkeypatch, "flash_attn", fa2)
    set_attention_backend("flash")
    # Uninstalled after selection: a call must not import anything, only call what selection resolved.
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    q, k, v = qkv()
    out = attention(q, k, v)
    assert (fa3.calls, fa2.calls) == (1, 0)
    assert torch.equal(out, attention_sdpa(q, k, v))  # the (out, lse) pair of FA3 was unpacked

    install(monkeypatch, "flash_attn", fa2)  # FlashAttention 2 alone
    set_attention_backend("flash")
    attention(q, k, v)
    assert (fa3.calls, fa2.calls) == (1, 1)


def test_a_kernel_called_without_selection_says_how_to_select_it():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"^attention backend 'flash' is not loaded: call set_attention_backend"):
        BACKENDS["flash"](q, k, v)


# ---------------------------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize(("backend", "module_name"), [("flash", "flash_attn"), ("sage", "sageattention")])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_selected_kernel_runs_and_equals_sdpa(monkeypatch, backend, module_name, scale):
    kernel = FakeKernel()
    install(monkeypatch, module_name, kernel)
    q, k, v = qkv()
    with use_attention_backend(backend):
        monkeypatch.setitem(sys.modules, module_name, None)  # uninstalled after selection: calls import nothing
        out, warned = recorded(lambda: attention(q, k, v, scale=scale))
    assert get_attention_backend() == "sdpa"
    assert warned == []
    assert kernel.calls == 1 and kernel.scales == [scale]
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert torch.equal(out, attention_sdpa(q, k, v, scale=scale))


@pytest.mark.parametrize(("backend", "module_name"), [("flash", "flash_attn"), ("sage", "sageattention")])
def test_under_autograd_flash_calls_the_package_and_sage_falls_back(monkeypatch, backend, module_name):
    """The custom op has no backward. FlashAttention's own function has one, so "flash" calls it directly;
    SageAttention has none, so "sage" falls back to SDPA. Gradients flow either way."""
    kernel = FakeKernel()
    install(monkeypatch, module_name, kernel)
    set_attention_backend(backend)
    monkeypatch.setitem(sys.modules, module_name, None)  # uninstalled after selection: calls import nothing
    q, k, v = qkv(requires_grad=True)
    out, warned = recorded(lambda: attention(q, k, v))
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    if backend == "flash":
        assert kernel.calls == 1 and warned == []
    else:
        assert kernel.calls == 0
        assert warned == [
            "attention backend 'sage' cannot take inputs that require grad (SageAttention has no backward pass); "
            "these calls run on 'sdpa' instead (warned once per reason)"
        ]


# --------------------------------------------------------------------------------------------- the reasons


def test_unsupported_reason_names_each_reason():
    q, k, v = qkv()
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    assert unsupported_reason("flash", q, k, v) is None
    assert unsupported_reason("sage", q, k, v) is None
    assert unsupported_reason("flash", q, k, v, mask) == "a mask (the kernel takes none)"
    assert unsupported_reason("flash", q[0], k[0], v[0]) == (
        "tensors of rank 3, 3, 3 (the kernel takes 4-D [B, H, L, D] q, k and v)"
    )
    dtype_rule = "(the kernel takes float16 or bfloat16 q, k and v: run the model in bf16)"
    assert unsupported_reason("flash", *qkv(torch.float32)) == f"dtype float32 {dtype_rule}"
    assert unsupported_reason("sage", q.half(), k, v) == f"dtype bfloat16, float16 {dtype_rule}"
    assert unsupported_reason("flash", *qkv(torch.float16, head_dim=256)) is None
    flash_rule = "(FlashAttention takes one head dim, at most 256, a multiple of 8)"
    assert unsupported_reason("flash", *qkv(head_dim=264)) == f"head dim 264 {flash_rule}"
    assert unsupported_reason("flash", *qkv(head_dim=60)) == f"head dim 60 {flash_rule}"
    assert unsupported_reason("flash", q, k, v[..., :32]) == f"head dim 32, 64 {flash_rule}"
    assert unsupported_reason("sage", *qkv(head_dim=128)) is None
    sage_rule = "(SageAttention takes one head dim, 64 or 128)"
    assert unsupported_reason("sage", *qkv(head_dim=96)) == f"head dim 96 {sage_rule}"
    grads = qkv(requires_grad=True)
    assert unsupported_reason("sage", *grads) == "inputs that require grad (SageAttention has no backward pass)"
    assert unsupported_reason("flash", *grads) is None
    with torch.no_grad():
        assert unsupported_reason("sage", *grads) is None


def test_tensors_off_cuda_are_a_reason(monkeypatch):
    monkeypatch.setattr(attn, "KERNEL_DEVICE_TYPES", ("cuda",))  # the real setting
    assert unsupported_reason("flash", *qkv()) == "tensors on cpu (the kernel runs on CUDA GPUs only)"
    assert unsupported_reason("sage", *qkv()) == "tensors on cpu (the kernel runs on CUDA GPUs only)"


# ------------------------------------------------------------------------------------------------- fallback


def test_fallback_to_sdpa_warns_once_per_reason(monkeypatch):
    kernel = FakeKernel()
    install(monkeypatch, "flash_attn", kernel)
    set_attention_backend("flash")
    q32, k32, v32 = qkv(torch.float32)
    q, k, v = qkv()
    mask = torch.rand(2, 1, 10, 10) > 0.3

    with pytest.warns(AttentionFallbackWarning, match=r"^attention backend 'flash' cannot take dtype float32 \("):
        out = attention(q32, k32, v32)
    assert torch.equal(out, attention_sdpa(q32, k32, v32))
    _, again = recorded(lambda: [attention(q32, k32, v32) for _ in range(3)])
    assert again == []  # the same reason: said once per process

    masked, warned = recorded(lambda: attention(q, k, v, attn_mask=mask))  # used to raise ValueError
    assert warned == [
        "attention backend 'flash' cannot take a mask (the kernel takes none); these calls run on 'sdpa' instead "
        "(warned once per reason)"
    ]
    assert torch.equal(masked, attention_sdpa(q, k, v, attn_mask=mask))
    _, warned = recorded(lambda: attention(*qkv(head_dim=100)))
    assert len(warned) == 1 and "cannot take head dim 100 (FlashAttention takes" in warned[0]
    assert kernel.calls == 0  # no unsupported call reached the kernel
    attention(q, k, v)
    assert kernel.calls == 1


@pytest.mark.parametrize(("backend", "module_name"), [("flash", "flash_attn"), ("sage", "sageattention")])
def test_mask_and_cpu_tensors_fall_back_for_both_kernels(monkeypatch, backend, module_name):
    kernel = FakeKernel()
    install(monkeypatch, module_name, kernel)
    set_attention_backend(backend)
    q, k, v = qkv()
    mask = torch.rand(2, 1, 10, 10) > 0.3
    masked, warned = recorded(lambda: attention(q, k, v, attn_mask=mask))
    assert torch.equal(masked, attention_sdpa(q, k, v, attn_mask=mask))
    assert len(warned) == 1 and warned[0].startswith(f"attention backend {backend!r} cannot take a mask")
    monkeypatch.setattr(attn, "KERNEL_DEVICE_TYPES", ("cuda",))
    out, warned = recorded(lambda: attention(q, k, v))
    assert torch.equal(out, attention_sdpa(q, k, v))
    assert len(warned) == 1 and "cannot take tensors on cpu (the kernel runs on CUDA GPUs only)" in warned[0]
    assert kernel.calls == 0


# -------------------------------------------------------------------------------------------- torch.compile


def test_compiled_fullgraph_keeps_the_kernel_one_opaque_op(monkeypatch):
    """The fake kernel reads a host value, which dynamo cannot trace under fullgraph=True: compiling succeeds
    only because the call is the custom op (an opaque node with a fake implementation), reached with no import."""
    kernel = FakeKernel()
    install(monkeypatch, "flash_attn", kernel)
    set_attention_backend("flash")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def block(q, k, v):
        return attention(q * 2, k, v).float().sum(dim=-1)

    q, k, v = qkv()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(block, fullgraph=True, backend=capture)
            out = compiled(q, k, v)
            aot = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v)  # runs the fake implementation
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, block(q, k, v)) and torch.equal(aot, out)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.cogvideox.flash_attention.default) == 1
    assert kernel.calls == 3  # compiled, aot_eager, eager


def test_compiled_fullgraph_fallback_warns_once_at_trace_time(monkeypatch):
    install(monkeypatch, "sageattention", FakeKernel())
    set_attention_backend("sage")
    q, k, v = qkv(torch.float32)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda q, k, v: attention(q, k, v) + 1, fullgraph=True, backend="eager")
        (first, warned) = recorded(lambda: compiled(q, k, v))
        _, again = recorded(lambda: compiled(q, k, v))
    finally:
        torch._dynamo.reset()
    assert torch.equal(first, attention_sdpa(q, k, v) + 1)
    assert len(warned) == 1 and warned[0].startswith("attention backend 'sage' cannot take dtype float32 (")
    assert again == []
