"""Guidance parallel, and keeping every rank's inputs identical.

Classifier-free guidance runs the transformer on ``[unconditional; conditional]`` inputs that differ only in the
text embeddings. With ``cfg_degree=2`` each half of the world computes one branch (batch ``B`` instead of ``2B``),
and one all-gather of the predictions per step (``B x F x C x H x W`` values from each side: the latent size, since
every rank holds its branch's whole prediction after the Ulysses gather) gives
every rank both halves. Every rank then runs the same guidance formula and the same sampler step on the same
numbers, so the latents stay identical everywhere without further communication.

That holds only if every rank starts from the same numbers: :func:`broadcast_from_main` sends the initial
latents, the image latents and the text embeddings from rank 0 (the text encoder and the VAE encoder may pick
different kernels in different processes), and :func:`shared_generator` gives every rank the same random
stream when the caller passed no generator (the DPM sampler draws noise at every step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .groups import ParallelState, collective_device


class GuidanceSplit:
    """One guidance branch per rank: ``cfg_rank`` 0 computes the unconditional half, 1 the conditional one."""

    def __init__(self, group: dist.ProcessGroup, branch: int) -> None:
        self.group = group
        self.branch = branch

    def local_half(self, pair: torch.Tensor) -> torch.Tensor:
        """``[2B, ...]`` (unconditional rows first, as the pipeline batches them) -> this rank's ``[B, ...]``."""
        return pair.chunk(2)[self.branch]

    def wrap(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``model(latents, text_embeds, timestep)`` over the guidance batch ``[2B, ...]`` run as this rank's half:
        the wrapped callable takes and returns ``[2B, ...]`` like ``model``, so the denoising loop is unchanged."""

        def one_branch(latents: torch.Tensor, text_embeds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            half = self.local_half
            return self.combine(model(half(latents), half(text_embeds), half(timestep)))

        return one_branch

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        """This rank's ``[B, ...]`` prediction -> ``[2B, ...]`` (unconditional first), identical on every rank."""
        parts = [torch.empty_like(prediction) for _ in range(2)]
        dist.all_gather(parts, prediction.contiguous(), group=self.group)
        return torch.cat(parts)


def guidance_split(state: ParallelState) -> GuidanceSplit | None:
    """The guidance split of ``state``, or None when both branches run on each rank (``cfg_degree=1``)."""
    if state.cfg_group is None:
        return None
    return GuidanceSplit(state.cfg_group, state.cfg_rank)


def broadcast_from_main(state: ParallelState, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Rank 0's copy of each tensor on every rank (None stays None; shapes and dtypes must agree across ranks)."""
    src = state.main_global_rank()
    out = []
    for tensor in tensors:
        if tensor is not None:
            tensor = tensor.contiguous().clone()
            dist.broadcast(tensor, src=src, group=state.group)
        out.append(tensor)
    return out


def shared_generator(
    state: ParallelState, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Generator | list[torch.Generator]:
    """``generator`` itself when given (every rank must pass the same seed: the CLI does); otherwise a CPU
    generator seeded by rank 0's global random state, the same on every rank. The seed travels on the device the
    group's backend needs (:func:`~cogvideox.distributed.groups.collective_device`: the current GPU under NCCL)."""
    if generator is not None:
        return generator
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(collective_device(state.group))
    dist.broadcast(seed, src=state.main_global_rank(), group=state.group)
    return torch.Generator().manual_seed(int(seed.item()))
