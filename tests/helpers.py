"""Shared test helpers: randomised reference models and error measures."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Give every saved tensor (parameters and persistent buffers) random values: zero- or one-initialised
    layers hide bugs. Non-persistent buffers are computed tables (positions) and are left alone.

    Weights get N(0, std); norm scales get 1 + N(0, std) so activations keep a sane size.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std
        leaf = name.rsplit(".", 1)[-1]
        is_scale = leaf == "weight" and tensor.ndim == 1 and "norm" in name.lower()
        tensor.copy_((1.0 + noise) if is_scale else noise)
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the relative error the parity bounds are stated in."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
