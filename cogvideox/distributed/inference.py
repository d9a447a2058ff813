"""``ParallelInference``: what :meth:`Pipeline.enable_parallel` installs, in one object.

It holds the process groups (:class:`ParallelState`), the transformer's Ulysses hooks and the guidance split,
and offers the pipeline the few calls its loop needs: which guidance half to compute and how to combine the
predictions, identical inputs on every rank, the parallel decode, rank-0-only output, and the failure guard.

The failure guard needs to know whether a call has started communicating (an error before that is re-raised and
tears nothing down, see failure.py): every method here that runs a collective marks it first. The pipeline's first
collective of a call is always one of these (the seed broadcast, or the broadcast of the initial inputs); the
Ulysses and guidance exchanges inside the transformer come after it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from .failure import fail_together
from .groups import ParallelConfig, ParallelState, collective_device
from .guidance import GuidanceSplit, broadcast_from_main, guidance_split, shared_generator
from .ulysses import UlyssesParallel, disable_sequence_parallel, enable_sequence_parallel
from .vae import decode_parallel

logger = logging.getLogger(__name__)


class ParallelInference:
    """Parallel inference of one pipeline's transformer over ``config.ulysses_degree x config.cfg_degree`` ranks.

    Every rank of ``group`` (default: the whole world) builds it together, with the same config, and then makes
    the same pipeline calls with the same arguments (and the same generator seed).
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        config: ParallelConfig,
        group: dist.ProcessGroup | None = None,
        *,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        self.state = ParallelState(config, group, timeout=timeout)
        self.transformer = transformer
        self.ulysses: UlyssesParallel | None = enable_sequence_parallel(transformer, self.state.ulysses_group)
        self.guidance: GuidanceSplit | None = guidance_split(self.state)
        self.communicating = False  # set when the current call starts its first collective (see guard)

    @property
    def config(self) -> ParallelConfig:
        return self.state.config

    @property
    def is_main(self) -> bool:
        """True on the rank that returns the decoded frames, writes files and shows progress."""
        return self.state.is_main

    def release(self) -> None:
        """Drop every reference to the process groups and restore the single-process transformer."""
        disable_sequence_parallel(self.transformer)
        self.ulysses = self.guidance = None

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around one pipeline call: an error on any rank after the call's first collective ends the call on every
        rank and tears down this package's groups; an earlier error (argument checks) only propagates (see
        failure.py)."""
        self.communicating = False
        try:
            with fail_together(self.state, self.release, started=lambda: self.communicating):
                yield
        finally:
            self.communicating = False

    def _collective(self) -> None:
        """Mark that the current call communicates from now on (call before each collective)."""
        self.communicating = True

    # ------------------------------------------------------------------------------------------ the loop

    def guidance_split(self, guided: bool) -> GuidanceSplit | None:
        """The split for a call with (``guided``) or without guidance. Without guidance both branch ranks compute
        the same thing (correct, but half the world is idle work): say so once per call."""
        if self.guidance is not None and not guided:
            logger.warning(
                "cfg_degree=2 but guidance is off (guidance_scale <= 1): both halves of the world compute the "
                "same prediction; use cfg_degree=1 for unguided runs"
            )
            return None
        return self.guidance

    def wrap_model(self, model: Callable[..., torch.Tensor], guided: bool) -> Callable[..., torch.Tensor]:
        """The denoising loop's model callable for this rank: under guidance parallel, each rank computes its
        guidance half and the predictions are gathered every step (:meth:`GuidanceSplit.wrap`); otherwise
        ``model`` itself (Ulysses runs inside the transformer, through its hooks)."""
        split = self.guidance_split(guided)
        return model if split is None else split.wrap(model)

    def same_on_every_rank(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Rank 0's copies (the initial latents, image latents, text embeddings)."""
        self._collective()
        return broadcast_from_main(self.state, *tensors)

    def generator(
        self, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Generator | list[torch.Generator]:
        """``generator`` when given; otherwise one seeded alike on every rank (one broadcast)."""
        if generator is not None:
            return generator
        self._collective()
        return shared_generator(self.state, None)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any: one decision for choices made from per-rank facts
        (the free memory that decides automatic VAE tiling), so that no rank decodes alone while others wait."""
        self._collective()
        value = torch.tensor([int(flag)], device=collective_device(self.state.group))
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.state.group)
        return bool(value.item())

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank of the call (a step cache's distance: Ulysses token shards and
        guidance halves together), the same on every rank."""
        self._collective()
        total = tensor.to(collective_device(self.state.group)).clone()
        dist.all_reduce(total, group=self.state.group)
        return total.to(tensor.device)

    def decode(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor | None:
        """Tiles over the whole world, video on rank 0 (None elsewhere); see :func:`decode_parallel`."""
        self._collective()
        return decode_parallel(vae, z, self.state.group, dst=0)

    def __repr__(self) -> str:
        return f"ParallelInference({self.state!r})"
