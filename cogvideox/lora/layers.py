"""``LoraLinear``: a linear layer plus any number of low-rank adapters, unfused or fused into its weight.

    y = base(x) + sum over active adapters of  weight_a * up_a(down_a(x))

``down`` is ``[R, in]`` (peft's ``lora_A``), ``up`` is ``[out, R]`` (``lora_B``) with the file's per-module scale
(``alpha / r``) already multiplied in, so the user's adapter weight is the only factor applied at run time.
For the fused q/k/v projection (``attn1.to_qkv``) one adapter's q, k and v parts are stacked: ``down`` holds
their ``lora_A`` rows one after the other and ``up`` is block-diagonal, which gives exactly
``[B_q A_q x; B_k A_k x; B_v A_v x]`` (the zero blocks add exact zeros).

The adapter tensors are non-persistent buffers: they follow ``module.to(device)`` (so offloading moves them) but
stay out of ``state_dict()``, which keeps the published keys (the post hook below drops the ``base.`` level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoraAdapter(nn.Module):
    """One adapter's tensors for one layer: ``down [R, in]``, ``up [out, R]`` (scale folded in)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        # The user's weight for this adapter (set_adapters); None = inactive. A plain float, so torch.compile
        # treats it as a constant (a new weight recompiles once).
        self.weight: float | None = 1.0

    def delta_weight(self) -> torch.Tensor:
        """``[out, in]`` float32: ``up @ down`` (without the user weight)."""
        return self.up.float() @ self.down.float()


class LoraLinear(nn.Module):
    """Wraps ``base`` (``nn.Linear``, its oneDNN form or :class:`~cogvideox.ops.fp8.Fp8Linear`) with named adapters.

    ``state_dict()`` gives the base layer's keys at this module's prefix (``to_q.weight``), as if unwrapped.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        # The base weight before fuse(), kept on the CPU so that unfuse() restores it bit for bit.
        self._original_weight: torch.Tensor | None = None
        self.register_state_dict_post_hook(_drop_base_level)
        self.register_load_state_dict_pre_hook(_add_base_level)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def is_fused(self) -> bool:
        return self._original_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in]`` -> ``[..., out]``."""
        y = self.base(x)
        if self._original_weight is not None:
            return y  # the active adapters are already in the weight
        for adapter in self.adapters.values():
            if adapter.weight is not None:
                y = y + F.linear(F.linear(x, adapter.down), adapter.up) * adapter.weight
        return y

    @torch.no_grad()
    def fuse(self, lora_scale: float = 1.0) -> None:
        """Add the active adapters (times their weights and ``lora_scale``) into the base weight."""
        if self.is_fused:
            return
        weight = self.base.weight
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for adapter in self.adapters.values():
            if adapter.weight is not None:
                delta += adapter.delta_weight().to(weight.device) * (adapter.weight * lora_scale)
        self._original_weight = weight.detach().to("cpu", copy=True)
        weight.add_(delta.to(weight.dtype))

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put back the exact base weight saved by :meth:`fuse`."""
        if not self.is_fused:
            return
        self.base.weight.copy_(self._original_weight)
        self._original_weight = None

    def extra_repr(self) -> str:
        active = {name: a.weight for name, a in self.adapters.items() if a.weight is not None}
        return f"adapters={list(self.adapters)}, active={active}, fused={self.is_fused}"


def _drop_base_level(module: LoraLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post hook: ``prefix.base.weight`` -> ``prefix.weight`` (the published key)."""
    base_prefix = prefix + "base."
    for key in [k for k in state_dict if k.startswith(base_prefix)]:
        state_dict[prefix + key[len(base_prefix) :]] = state_dict.pop(key)


def _add_base_level(
    module: LoraLinear, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """Load pre hook: accept the published ``prefix.weight`` keys for the wrapped layer."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "base.")]:
        rest = key[len(prefix) :]
        if "." not in rest:
            state_dict[prefix + "base." + rest] = state_dict.pop(key)
