"""What every step cache shares: options checked by name, the step it is at, the slots it uses, its counters.

A step cache reuses work across denoising steps. It touches the model in at most three places, all installed by
:meth:`StepCache.attach` and removed by :meth:`StepCache.detach`:

- the model callable (:meth:`StepCache.wrap_model`): counts the steps and may change the batch the transformer
  sees (FasterCache computes only the conditional half on some steps);
- the transformer's block loop (``Transformer.set_step_cache``): :meth:`StepCache.run_blocks` may run all blocks,
  some, or none (TeaCache, First Block Cache, MagCache);
- named submodules (:func:`override_forward`): a module's output may come from a cache instead of its forward
  (Pyramid Attention Broadcast, FasterCache's attention, TaylorSeer).

The pipeline calls :meth:`StepCache.begin_call` before each denoising loop with the call's timesteps, so every
decision knows the step index and timestep without a host sync, and state never leaks from one call to the next.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: ``run(video, text, start=0, stop=None) -> (video, text)``: the transformer's blocks ``start:stop``
RunBlocks = Callable[..., tuple[torch.Tensor, torch.Tensor]]
#: all-reduce (sum) of a small tensor over the ranks computing one call (None: a single process)
Reduce = Callable[[torch.Tensor], torch.Tensor]


class StepCache:
    """Base class of the six methods. Subclasses set ``method`` and ``defaults`` (option name -> default, named
    and defaulted as in diffusers' cache configs where diffusers has the method) and override what they use."""

    method: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"{self.method} cache: unknown option {unknown[0]!r}; valid options: {', '.join(self.defaults)}"
            )
        self.options = {**self.defaults, **options}
        self.reduce: Reduce | None = None
        self.stats: Counter = Counter()
        self.transformer: nn.Module | None = None
        self._restore: list[Callable[[], None]] = []
        self.timesteps: list[float] = []
        self.guided = False
        self.index = -1

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options.items() if v is not self.defaults[k] and v != self.defaults[k]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ---------------------------------------------------------------------------------------------- lifecycle

    def attach(self, transformer: nn.Module) -> None:
        """Install the cache's slots on ``transformer`` (see the module docstring)."""
        self.detach()
        self.transformer = transformer
        transformer.set_step_cache(self)
        self.install(transformer)

    def install(self, transformer: nn.Module) -> None:
        """Override named submodules' forwards (module-level methods); the default installs nothing."""

    def check_model(self, transformer: nn.Module) -> None:
        """Raise when this cache cannot attach to ``transformer`` (called before anything changes)."""

    def detach(self) -> None:
        """Remove everything :meth:`attach` installed and drop the cached tensors."""
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        if self.transformer is not None and self.transformer.step_cache is self:
            self.transformer.set_step_cache(None)
        self.transformer = None
        self.reset()

    def begin_call(self, timesteps: Sequence[float], guided: bool) -> None:
        """Start a denoising loop over ``timesteps`` (noisiest first), under classifier-free guidance or not:
        every cached tensor and counter from an earlier call is dropped."""
        self.timesteps = [float(t) for t in timesteps]
        self.guided = guided
        self.index = -1
        self.stats = Counter()
        self.reset()

    def end_call(self) -> None:
        """The loop is over (or failed): later direct calls of the transformer run uncached. The counters, and
        what a method reports (TeaCache's decisions, MagCache's calibration), stay readable."""
        self.index = -1

    @property
    def stepping(self) -> bool:
        """True inside a denoising loop, between its first model call and :meth:`end_call`."""
        return 0 <= self.index < self.num_steps

    def reset(self) -> None:
        """Drop the per-call state (subclasses)."""

    def check_parallel(self, guidance_split: bool) -> None:
        """Raise when this cache cannot run with one guidance branch per rank (subclasses)."""

    # ----------------------------------------------------------------------------------------- the step

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def timestep(self) -> float:
        """The current step's timestep value (as the sampler gives it: 999, 979, ...)."""
        return self.timesteps[self.index]

    def wrap_model(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The denoising loop's model callable, counting the steps (one model call per step)."""

        def step_model(latents: torch.Tensor, text_embeds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            self.index += 1
            if self.index >= self.num_steps:
                raise RuntimeError(
                    f"{self.method} cache: model call {self.index + 1} in a loop of {self.num_steps} steps; the "
                    "pipeline calls begin_call() before each loop (call it yourself when you drive the loop)"
                )
            return self.predict(model, latents, text_embeds, timestep)

        return step_model

    def predict(
        self, model: Callable[..., torch.Tensor], latents: torch.Tensor, text_embeds: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """One step's prediction; FasterCache overrides it."""
        return model(latents, text_embeds, t)

    def run_blocks(
        self, run: RunBlocks, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's block loop for this step; the default runs every block."""
        return self.run(run, video, text)

    def run(
        self, run: RunBlocks, video: torch.Tensor, text: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run blocks ``start:stop`` and count them (``stats["blocks_run"]``)."""
        total = len(self.transformer.transformer_blocks)
        self.stats["blocks_run"] += (total if stop is None else stop) - start
        return run(video, text, start, stop)

    def skip_blocks(self, count: int) -> None:
        self.stats["blocks_skipped"] += count

    def real_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """``video [B, S_loc, ...]`` without the padding tokens Ulysses adds to the last ranks' shares (the whole
        tensor when the transformer runs on one process)."""
        parallel = self.transformer.sequence_parallel
        return video if parallel is None else video[:, : parallel.real_local_tokens()]

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """``mean|current - previous| / mean|previous|`` as a host float, over every rank's share when the
        call runs on several (Ulysses token shards, guidance halves): every rank then makes the same decision."""
        if self.reduce is None:
            return ((current - previous).abs().mean() / previous.abs().mean()).item()
        sums = torch.stack([(current - previous).abs().sum(), previous.abs().sum()]).float()
        sums = self.reduce(sums)
        return (sums[0] / sums[1]).item()


# ------------------------------------------------------------------------------------------- module overrides


def override_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Make ``module(...)`` call ``forward(original_forward, *args, **kwargs)``; returns the undo function.

    The override is an instance attribute, so ``nn.Module.__call__`` still runs the module's hooks (offload)
    around it, parameters and ``state_dict()`` keys are untouched, and removing it restores the class's method.
    It runs outside compiled graphs (its decisions are Python state); compiled submodules inside it still run
    compiled.
    """
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = torch.compiler.disable(functools.partial(forward, module.forward))

    def restore() -> None:
        if had_own:
            module.forward = previous
        else:
            module.__dict__.pop("forward", None)

    return restore


def named_matches(
    root: nn.Module, patterns: Sequence[str], *, full: bool, kind: type | tuple[type, ...] | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """Submodules of ``root`` whose name matches one of ``patterns`` (``re.fullmatch`` when ``full``, else
    ``re.search``, as diffusers' configs use them), optionally only instances of ``kind``."""
    for name, module in root.named_modules():
        if not name or (kind is not None and not isinstance(module, kind)):
            continue
        match = re.fullmatch if full else re.search
        if any(match(pattern, name) for pattern in patterns):
            yield name, module


def in_open_range(value: float, bounds: Sequence[float]) -> bool:
    """``low < value < high``: diffusers' timestep ranges exclude both ends."""
    return bounds[0] < value < bounds[1]


def check_positive_int(method: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{method} cache: {name}={value!r} must be a positive integer")


def check_range(method: str, name: str, value: Any) -> None:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        or value[0] >= value[1]
    ):
        raise ValueError(f"{method} cache: {name}={value!r} must be a (low, high) pair of numbers with low < high")


def check_threshold(method: str, value: Any, name: str = "threshold") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{method} cache: {name}={value!r} must be a number >= 0")
