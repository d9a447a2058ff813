"""The pipeline's opt-in switches (CPU offload, several processes, LoRA, the CPU linear kernel) and the rules of
their order, as errors in code.

:class:`PipelineSwitches` is the half of :class:`~cogvideox.Pipeline` that changes *how* components run, not what
they compute; every switch here is exact (the frames do not change, except by a LoRA's own weights). Rules that
hold between switches:

- model or sequential offload and parallel inference exclude each other (the collectives expect every rank's
  transformer and tensors on its own GPU; the two are untested together);
- the transformer-level rules (fuse QKV, LoRA, fp8 storage, sequential offload streaming the blocks) are checked by
  the switches themselves, in :mod:`cogvideox.lora`, :mod:`cogvideox.transformer` and :mod:`cogvideox.offload`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .cache import StepCache, make_cache
from .distributed import ParallelConfig, ParallelInference
from .memory import MemoryManager, require_device, tensor_bytes
from .memory_plan import (
    MODE_NAMES,
    MODES,
    CallSize,
    MemoryPlan,
    check_plan_name,
    default_call_size,
    format_bytes,
    plan_memory,
)

logger = logging.getLogger(__name__)

# Offload modes that move the transformer off its device between uses: untested with parallel inference (the
# collectives expect every rank's transformer and tensors on its own GPU), so the two are refused together. The
# text encoder's offload ("text") keeps the transformer in place and is on by default for CUDA pipelines.
_OFFLOAD_MODES_REFUSED_WITH_PARALLEL = ("model", "sequential")


def _offload_with_parallel_message(mode: str) -> str:
    return (
        f"CPU offload {mode!r} (enable_{mode}_cpu_offload, --offload {mode}) and parallel inference "
        "(enable_parallel / parallel=, --ulysses-degree / --cfg-parallel) cannot be combined: they are untested "
        "together. Use one of them: parallel ranks each hold the whole model on their own GPU, or run one process "
        "with offload (disable_cpu_offload() or disable_parallel() switches)"
    )


def fail_together_when_parallel(call: Callable) -> Callable:
    """Under parallel inference, an error on any rank ends the call on every rank (cogvideox.distributed)."""

    @functools.wraps(call)
    def guarded(self: PipelineSwitches, *args: Any, **kwargs: Any) -> Any:
        if self.parallel is None:
            return call(self, *args, **kwargs)
        with self.parallel.guard():
            return call(self, *args, **kwargs)

    return guarded


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` as the current CUDA device (``cuda:0``), so that placements compare equal."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


class PipelineSwitches:
    """Mixed into :class:`~cogvideox.Pipeline`; expects ``transformer``, ``memory`` and ``parallel`` attributes
    (``step_cache`` is this mixin's own)."""

    transformer: Any
    memory: MemoryManager
    parallel: ParallelInference | None
    # None until enable_cache(); a class-level default so that the LoRA switches work on a pipeline built without
    # __init__ (a fork assembling one by hand), as they did before caching existed.
    step_cache: StepCache | None = None

    text_encoder: Any
    vae: Any
    image_to_video: bool
    device: torch.device

    # ------------------------------------------------------------------------------------------- CPU kernel

    def set_cpu_linear(self, kind: str = "onednn") -> int:
        """Which matrix product the transformer's and text encoder's linear layers use for float32 CPU inference:
        ``"onednn"`` (what every pipeline starts with: oneDNN's product, 0.58-0.85x the time of MKL's sgemm on the
        published models' projections, ~1e-6 relative difference) or ``"aten"`` (``F.linear`` everywhere). A module
        swap (:func:`cogvideox.ops.use_onednn_linear_`): same layer objects, parameters and keys; GPUs, bf16,
        training and ``torch.compile`` always take ``F.linear``. Returns how many layers changed."""
        from .ops import use_aten_linear_, use_onednn_linear_

        swaps = {"onednn": use_onednn_linear_, "aten": use_aten_linear_}
        if kind not in swaps:
            raise ValueError(f"set_cpu_linear({kind!r}): choose 'onednn' or 'aten'")
        # A fork's component need not be an nn.Module (the protocols ask for none): there is nothing to swap.
        return sum(swaps[kind](c) for c in (self.transformer, self.text_encoder) if isinstance(c, torch.nn.Module))

    # ---------------------------------------------------------------------------------------- memory plan

    def enable_text_encoder_offload(self, device: torch.device | str = "cuda") -> None:
        """Keep only the text encoder in (pinned) host memory: it visits ``device`` to encode and leaves right
        after, so the 9 GB of T5-XXL are not resident during denoising and decoding. Costs one host-to-device copy
        of the encoder per call (~0.4 s for T5-XXL on PCIe 4); on by default for pipelines loaded onto CUDA."""
        self._enable_offload("text", device)

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        """Keep the components in host memory; each moves to ``device`` while it runs (the text encoder leaves
        right after encoding, the transformer stays for the denoising loop, the VAE comes in to encode/decode).
        Exact; costs one host-device copy of each component per call. See docs/performance.md."""
        self._enable_offload("model", device)

    def enable_sequential_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        """As :meth:`enable_model_cpu_offload`, and the transformer's and text encoder's blocks stream from pinned
        host memory one at a time, the next block's copy overlapping the current block's compute. Exact; lowest
        memory. See :mod:`cogvideox.offload`."""
        self._enable_offload("sequential", device)

    def _enable_offload(self, mode: str, device: torch.device | str) -> None:
        if mode in _OFFLOAD_MODES_REFUSED_WITH_PARALLEL and self.parallel is not None:
            raise ValueError(_offload_with_parallel_message(mode))
        self.memory.enable(self, mode, device)
        self.memory.forget_plan()  # the user's own switch: no plan overrides it

    def disable_cpu_offload(self) -> None:
        """Remove the offload hooks; the components stay in host memory (move them with ``.to(device)``)."""
        self.memory.disable()
        self.memory.forget_plan()

    def set_memory_plan(self, memory: str = "auto", device: torch.device | str | None = None) -> MemoryPlan | None:
        """Place the components by a memory plan (:mod:`cogvideox.memory_plan`, docs/usage.md) on ``device``
        (default: the device the pipeline computes on). ``"auto"`` picks the fastest plan whose estimated peak
        fits the free memory, and re-plans at every call for that call's size; ``"none"``, ``"text"``, ``"model"``
        or ``"sequential"`` keeps that offload mode (a warning when it would not fit). Any ``enable_*`` offload
        call afterwards replaces the plan. Returns the plan for a default call (also ``pipe.memory_plan``), or
        None when no plan is needed because the device's free memory is unknown (the CPU)."""
        check_plan_name(memory)
        device = _concrete(torch.device(device) if device is not None else self.device)
        require_device(device, "set_memory_plan on ")
        if memory in _OFFLOAD_MODES_REFUSED_WITH_PARALLEL and self.parallel is not None:
            raise ValueError(_offload_with_parallel_message(memory))
        if memory == "auto" and self.memory.free_bytes(device) is None:
            logger.warning(
                "memory='auto' on %s: no memory plan is needed there (its free memory is not limited the way a "
                "GPU's is); the components stay where they are", device,
            )  # fmt: skip
            self.memory.forget_plan()
            return None
        self.memory.setting, self.memory.plan_device = memory, device
        return self._follow_plan(self._default_call_size(), at_call=False)

    @property
    def memory_plan(self) -> MemoryPlan:
        """The plan in force: the last one chosen (``memory=`` or :meth:`set_memory_plan`), else the estimate for
        the current offload mode on the device the pipeline computes on, for a call with the default size.
        ``print(pipe.memory_plan)`` shows where each component lives, each phase's peak and the headroom."""
        if self.memory.plan is not None:
            return self.memory.plan
        device = _concrete(self.device)
        plan = plan_memory(self.text_encoder, self.transformer, self.vae, self._default_call_size(),
                           self._capacity(device), memory=self.memory.mode or "none", device=str(device),
                           vae_budget=self.memory.vae_memory_budget)  # fmt: skip
        return dataclasses.replace(plan, chosen_by="the pipeline's switches")

    def _default_call_size(self) -> CallSize:
        return default_call_size(self.transformer.config, self.vae, image_to_video=self.image_to_video)

    def _capacity(self, device: torch.device) -> int | None:
        """Bytes this pipeline may use on ``device``: the free memory, plus on CUDA what its own tensors occupy
        there now (they move when the plan changes). Elsewhere (a simulated device: ``memory.free_bytes`` replaced
        to report a figure for the CPU) the figure is taken as it is."""
        free = self.memory.free_bytes(device)
        if free is None or device.type != "cuda":
            return free
        parts = (self.text_encoder, self.transformer, self.vae)
        return free + sum(tensor_bytes(part, device) for part in parts)

    def _follow_plan(self, size: CallSize, *, at_call: bool) -> MemoryPlan | None:
        """Choose the plan for a call of ``size`` (the setting's mode, or "auto"'s choice), move the components
        if it differs from the one in place, and say so. Called at every call while a plan is set."""
        setting, device = self.memory.setting, self.memory.plan_device
        capacity = self._capacity(device)
        if capacity is None and setting == "auto":
            return None  # nothing to fit (set_memory_plan said so); a forced mode is still put in place
        modes = MODES if self.parallel is None else ("none", "text")
        try:
            plan = plan_memory(self.text_encoder, self.transformer, self.vae, size, capacity, memory=setting,
                               modes=modes, device=str(device), vae_budget=self.memory.vae_memory_budget,
                               vae_may_tile=self.memory.auto_vae_tiling)  # fmt: skip
        except (AttributeError, TypeError) as error:
            # A fork's component without the configs the estimates read: place the mode without an estimate
            # ("auto": the text encoder's offload, what loading onto CUDA did before plans existed).
            mode = "text" if setting == "auto" else setting
            if self.memory.applied != (mode, device):
                logger.warning("the memory plan cannot estimate these components (%s); using memory=%r without an "
                               "estimate (pass memory= to choose another)", error, mode)  # fmt: skip
                self._place(mode, device)
            self.memory.plan = None
            return None
        if not plan.fits:
            self._say_it_does_not_fit(plan, modes, at_call=at_call)
        if self.memory.applied != (plan.mode, device):
            self._place(plan.mode, device)
            logger.info("%s", plan.summary())
        self.memory.plan = plan
        return plan

    def _say_it_does_not_fit(self, plan: MemoryPlan, modes: tuple[str, ...], *, at_call: bool) -> None:
        """Warn that ``plan`` may run out of memory, with the plan that would fit; at a call, refuse when not even
        the smallest plan's decode fits (denoising would take minutes before the decode ran out of memory)."""
        smallest = plan
        if plan.forced:
            smallest = plan_memory(self.text_encoder, self.transformer, self.vae, plan.size, plan.capacity,
                                   modes=modes, device=plan.device, vae_budget=self.memory.vae_memory_budget,
                                   vae_may_tile=self.memory.auto_vae_tiling)  # fmt: skip
        tiles = "in tiles" if self.memory.auto_vae_tiling else "untiled"
        free = f"{plan.device} has {format_bytes(plan.capacity)} free"
        decode = smallest.phases[-1]
        if at_call and plan.size.decodes and not smallest.fits and decode.peak > plan.capacity:
            raise ValueError(
                f"the decode of {plan.size} cannot fit: even with {MODE_NAMES[smallest.mode]} and the VAE {tiles} it "
                f"needs ~{format_bytes(decode.peak)}, and {free}. Generate fewer frames, a smaller size or fewer "
                "videos at once; or decode in smaller tiles (pipe.vae.enable_tiling(tile_sample_min_height=..., "
                "tile_sample_min_width=...)); or return latents (output_type='latent') and decode them elsewhere"
            )
        if plan.forced:
            instead = (f"memory={smallest.mode!r} would fit, with a peak of ~{format_bytes(smallest.peak)}"
                       if smallest.fits else "no plan fits it (see pipe.memory_plan)")  # fmt: skip
            logger.warning("memory=%r needs ~%s at its peak (%s) for %s, but %s: it may run out of memory; %s",
                           plan.mode, format_bytes(plan.peak), plan.peak_phase, plan.size, free, instead)  # fmt: skip
        else:
            logger.warning(
                "no memory plan fits %s: even %s with the VAE %s needs ~%s at its peak (%s), and %s; it may run out "
                "of memory (generate fewer frames, a smaller size or fewer videos at once)", plan.size,
                MODE_NAMES[plan.mode], tiles, format_bytes(plan.peak), plan.peak_phase, free,
            )  # fmt: skip

    @contextlib.contextmanager
    def _plan_offload_paused(self) -> Iterator[None]:
        """Run a switch that cannot run under model or sequential offload (layer changes inside streamed blocks,
        parallel inference) when a memory plan installed that offload: the offload is removed for the switch, and
        the plan places the components again after it, for the size of its last call."""
        memory = getattr(self, "memory", None)  # None on a pipeline a fork assembled without __init__
        if memory is None or memory.setting is None or memory.mode not in _OFFLOAD_MODES_REFUSED_WITH_PARALLEL:
            yield
            return
        size = self.memory.plan.size if self.memory.plan is not None else self._default_call_size()
        self.memory.disable()
        self.memory.applied = None
        try:
            yield
        finally:
            self._follow_plan(size, at_call=False)

    def _place(self, mode: str, device: torch.device) -> None:
        """Put the components where offload ``mode`` wants them on ``device``."""
        self.memory.disable()
        if mode in ("none", "text"):
            resident = [self.transformer, self.vae] + ([self.text_encoder] if mode == "none" else [])
            for part in resident:
                if isinstance(part, torch.nn.Module):
                    part.to(device)
        if mode != "none":
            self.memory.enable(self, mode, device)
        self.memory.applied = (mode, device)

    def set_vae_memory_budget(self, budget_bytes: int | None = None, *, auto_tiling: bool = True) -> None:
        """The memory the VAE decode may use before it switches to tiles (default None: the free device memory on
        CUDA, no limit elsewhere); ``auto_tiling=False`` never tiles on its own (``vae.enable_tiling()`` still
        does)."""
        self.memory.vae_memory_budget = budget_bytes
        self.memory.auto_vae_tiling = auto_tiling

    # ------------------------------------------------------------------------------------------- multi-GPU

    def enable_parallel(
        self,
        config: ParallelConfig | None = None,
        *,
        ulysses_degree: int = 1,
        cfg_degree: int = 1,
        group: torch.distributed.ProcessGroup | None = None,
        timeout: datetime.timedelta | None = None,
    ) -> ParallelInference:
        """Split each call over the processes of ``group`` (default: the whole torch.distributed world), which
        must all call this together and then make the same calls: Ulysses sequence parallel over
        ``ulysses_degree`` ranks, guidance branches over ``cfg_degree`` (1 or 2) halves, tiles of the VAE decode
        over every rank. Rank 0 gets the frames; the others get ``frames=None`` (latents everywhere for
        ``output_type="latent"``) and show no progress. ``timeout`` bounds each collective of the new groups.
        An error on one rank ends the call on all (docs/distributed.md). Callbacks must act alike on every rank
        (an ``interrupt`` set on one rank only leaves the others waiting until the timeout).
        """
        if self.memory.mode in _OFFLOAD_MODES_REFUSED_WITH_PARALLEL and self.memory.setting is None:
            raise ValueError(_offload_with_parallel_message(self.memory.mode))
        config = config or ParallelConfig(ulysses_degree=ulysses_degree, cfg_degree=cfg_degree)
        if self.step_cache is not None:
            self.step_cache.check_parallel(config.cfg_degree > 1)
        if self.memory.setting in _OFFLOAD_MODES_REFUSED_WITH_PARALLEL:
            raise ValueError(_offload_with_parallel_message(self.memory.setting))
        # An offload the memory plan chose is replaced by the plan itself, which then keeps to the modes parallel
        # inference allows (everything resident, or the text encoder's offload).
        with self._plan_offload_paused():
            self.disable_parallel()
            self.parallel = ParallelInference(self.transformer, config, group, timeout=timeout)
        return self.parallel

    def disable_parallel(self) -> None:
        """Back to single-process calls (the process groups stay; destroy them with torch.distributed)."""
        if self.parallel is not None:
            self.parallel.release()
            self.parallel = None

    # ------------------------------------------------------------------------------------------- step caching

    def enable_cache(self, method: str | StepCache, **options: Any) -> StepCache:
        """Reuse work across denoising steps (docs/caching.md): ``method`` is ``"teacache"``, ``"first_block"``,
        ``"pab"``, ``"faster"``, ``"taylorseer"`` or ``"mag"``; ``options`` are named, mean and default as in
        diffusers' cache configs (TeaCache: ``threshold``, ``coefficients``). Every option is checked here,
        before any work. Replaces a cache enabled before; the cache's state is reset at the start of every call.
        A fork's own method: pass an instance of a :class:`cogvideox.cache.StepCache` subclass as ``method``.
        Returns the cache (``cache.stats`` counts what the last call ran and skipped; MagCache's
        ``cache.calibration`` holds the ratios a ``calibrate=True`` call measured)."""
        cache = make_cache(method, self.transformer.config, **options)
        if self.parallel is not None:
            cache.check_parallel(self.parallel.guidance is not None)
        cache.check_model(self.transformer)
        self.disable_cache()
        cache.attach(self.transformer)
        self.step_cache = cache
        return cache

    def _reattach_cache(self) -> None:
        """Re-install the step cache after a switch that replaced transformer submodules (LoRA wrappers), so a
        cache that overrides named layers acts on the layers that now run."""
        if self.step_cache is not None:
            self.step_cache.attach(self.transformer)

    def disable_cache(self) -> None:
        """Back to computing every step in full (frames bitwise those of a pipeline that never cached)."""
        if self.step_cache is not None:
            self.step_cache.detach()
            self.step_cache = None

    # ------------------------------------------------------------------------------------------------ LoRA

    def load_lora(
        self, path_or_hub_id: str | Path, adapter_name: str | None = None, scale: float = 1.0, **kwargs: Any
    ) -> str:
        """Load a transformer LoRA (diffusers/peft or SAT layout) and activate it with weight ``scale``; returns
        its name. ``kwargs``: ``allow_pickle``, ``revision``, ``cache_dir``. See :mod:`cogvideox.lora`."""
        from . import lora

        with self._plan_offload_paused():  # the plan's sequential offload records each block's tensors
            name = lora.load_lora(self.transformer, path_or_hub_id, adapter_name, scale, **kwargs)
        self._reattach_cache()
        return name

    def set_adapters(
        self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None
    ) -> None:
        """Make exactly these adapters active, with these weights (diffusers' ``set_adapters``)."""
        from . import lora

        lora.set_adapters(self.transformer, adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Add the active adapters into the transformer's weights (undo with :meth:`unfuse_lora`)."""
        from . import lora

        lora.fuse_lora(self.transformer, lora_scale)

    def unfuse_lora(self) -> None:
        """Restore the weights saved by :meth:`fuse_lora`, bit for bit."""
        from . import lora

        lora.unfuse_lora(self.transformer)

    def unload_lora(self) -> None:
        """Remove every adapter (fused ones stay in the weights: unfuse first to drop them)."""
        from . import lora

        with self._plan_offload_paused():
            lora.unload_lora(self.transformer)
        self._reattach_cache()
