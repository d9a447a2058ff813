"""Offload hooks: which weights sit on the accelerator when (the plan that uses them: :mod:`cogvideox.memory`).

Two offload modes, both exact (the same kernels run on the same values; only where the weights live changes):

- **model offload** (:class:`ComponentOffload`): every component waits in host memory and moves to the
  accelerator as a whole when it is called. The text encoder leaves right after encoding; the transformer stays
  for the whole denoising loop; the VAE comes in for encode/decode. Peak = the largest component plus its work.
- **sequential offload** (:class:`BlockStreamer` for the repeated blocks, :class:`ComponentOffload` for the rest):
  the transformer's and the text encoder's blocks live in pinned host memory; block ``i + 1`` is copied on a
  side stream while block ``i`` computes, and a block's device copy is dropped as soon as it has run, so at most
  two blocks are resident. The diffusers/accelerate sequential offload copies every layer synchronously right
  before it runs (3-5x slower: the CogVideoX model cards; >3x in diffusers#2266); overlapping the copy hides it
  whenever a block's compute takes longer than its copy (5B at 49x480x720: ~0.25 GiB per block in bf16 is ~10 ms
  at 25 GB/s over PCIe 4/5, against ~50 ms of compute per block in a guided step of ~2.2 s).

The streaming logic does not depend on the device: :class:`Transfers` hides the CUDA streams and events, and on any
other target it copies synchronously, so the CPU tests exercise the same hooks (a "load" is a real copy even when
the target is the CPU, so a test can see which blocks hold a device copy at each moment).

Switches that replace layers inside streamed blocks (LoRA load/unload, q/k/v fusion, fp8 storage) ask
:func:`is_streamed` and refuse (:func:`require_not_streamed`): the streamer copies only the tensors each block held
when it started. Switches that change weights in place (fusing a LoRA) work under both modes: a pending block copy
made before the change is made again, and a component changed on the device is copied back when it leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

logger = logging.getLogger(__name__)

HOST = torch.device("cpu")


def _move_tensors(value: Any, device: torch.device) -> Any:
    """Every tensor inside ``value`` (nested tuples, lists, dicts, dataclass-free containers) moved to ``device``."""
    return tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, value)


def _own_tensors(module: nn.Module) -> Iterable[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) of every parameter and buffer of ``module`` and its children."""
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                yield owner, name, True
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                yield owner, name, False


def _get(owner: nn.Module, name: str, is_parameter: bool) -> torch.Tensor:
    return owner._parameters[name] if is_parameter else owner._buffers[name]


def _set_data(owner: nn.Module, name: str, is_parameter: bool, data: torch.Tensor) -> None:
    if is_parameter:
        owner._parameters[name].data = data
    else:
        owner._buffers[name] = data


def _version_of(tensor: torch.Tensor) -> int | None:
    """The in-place write counter of a tensor; None for tensors made under ``torch.inference_mode``, which keep
    none (their in-place writes cannot be seen). A Parameter keeps its own counter across ``.data`` re-pointing
    (which the hooks do and which does not count), so writes through the parameter (``add_``, ``copy_``: what
    fusing a LoRA does) show on it whichever storage it points at."""
    return None if tensor.is_inference() else tensor._version


def _version(owner: nn.Module, name: str, is_parameter: bool) -> int | None:
    return _version_of(_get(owner, name, is_parameter))


# ------------------------------------------------------------------------------------------------ queries


class _StreamerHook:
    """A forward (pre-)hook that :class:`BlockStreamer` installs on a block; :func:`is_streamed` finds it by type."""

    def __init__(self, streamer: BlockStreamer, fn: Callable) -> None:
        self.streamer = streamer
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def is_streamed(module: nn.Module) -> bool:
    """Whether a :class:`BlockStreamer` streams ``module`` or any module inside it (sequential CPU offload).

    Read from the hooks the streamer installs on its blocks, so it is true from the streamer's creation to its
    :meth:`~BlockStreamer.remove` (``disable_cpu_offload()``) and says nothing about other offload modes."""
    # nn.Module has no public way to list hooks; _forward_pre_hooks is the dict register_forward_pre_hook fills.
    return any(isinstance(hook, _StreamerHook) for m in module.modules() for hook in m._forward_pre_hooks.values())


def require_not_streamed(module: nn.Module, switch: str) -> None:
    """Raise RuntimeError naming ``switch`` (e.g. ``"load_lora()"``) when ``module``'s blocks are streamed: a
    switch that replaces layers inside the blocks would leave the new tensors behind in host memory (the streamer
    copies only the tensors each block held when it started) and the streamer holding the old ones."""
    if is_streamed(module):
        raise RuntimeError(
            f"{switch} cannot change the layers of blocks that sequential CPU offload is streaming (the streamer "
            f"moves only the tensors the blocks held when it started): call {switch} before "
            f"enable_sequential_cpu_offload(), or call disable_cpu_offload() first and enable the offload again after "
            "(under a memory plan: pipe.set_memory_plan('model'), the switch, then pipe.set_memory_plan('auto'))"
        )


# ------------------------------------------------------------------------------------------------ transfers


class Transfers:
    """Host -> ``device`` copies, asynchronous on a side CUDA stream when ``device`` is a GPU, plain copies
    otherwise. ``copy`` starts a copy and returns a handle; ``wait`` makes the compute stream wait for it."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A page-locked host copy (so the copy engine can read it without a staging buffer); as is off CUDA."""
        return tensor.pin_memory() if self.is_cuda and not tensor.is_pinned() else tensor

    def copy(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Start copying ``tensors`` to the device: (device tensors, event to wait on or None)."""
        if not self.is_cuda:
            return [torch.empty_like(t, device=self.device).copy_(t) for t in tensors], None
        # The side stream must not read weights the compute stream may still be writing (a first load after
        # module.to()), so it starts after the work queued so far.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = [t.to(self.device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def wait(self, tensors: Sequence[torch.Tensor], event: Any) -> None:
        """Make the current (compute) stream wait for the copy, and tell the allocator that the compute stream
        uses memory allocated on the side stream (else it could hand it out again while a kernel still reads)."""
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for tensor in tensors:
            tensor.record_stream(compute)


# ------------------------------------------------------------------------------------------------ blocks


class BlockStreamer:
    """Stream the blocks of an ``nn.ModuleList`` from (pinned) host memory to ``device`` one at a time, the next
    block's copy overlapping the current block's compute.

    Hooks: before block ``i`` runs, its copy is waited for (or made, if no prefetch was started) and block
    ``(i + 1) % n`` starts copying; after block ``i`` runs, its parameters point back to the host tensors and the
    device copy is freed. The wrap-around prefetch of block 0 overlaps the sampler step between two denoising
    steps. ``events`` (when a list) records ``("load", i)``, ``("run", i)`` and ``("drop", i)`` in order, for tests.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, *, events: list | None = None) -> None:
        self.blocks = blocks
        self.transfers = Transfers(device)
        self.events = events
        # Per block: the slots (owner, name, is_parameter) and their host tensors, pinned once here.
        self._slots: list[list[tuple[nn.Module, str, bool]]] = []
        self._host: list[list[torch.Tensor]] = []
        # Per block in flight: (device tensors, copy event, slot versions when the copy started).
        self._pending: dict[int, tuple[list[torch.Tensor], Any, list[int | None]]] = {}
        self._resident: set[int] = set()
        self._handles: list[Any] = []
        with torch.no_grad():
            for block in blocks:
                slots = list(_own_tensors(block))
                host = []
                for owner, name, is_param in slots:
                    tensor = _get(owner, name, is_param).data.to(HOST)
                    tensor = self.transfers.pin(tensor)
                    _set_data(owner, name, is_param, tensor)
                    host.append(tensor)
                self._slots.append(slots)
                self._host.append(host)
        for index, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(_StreamerHook(self, self._before(index))))
            self._handles.append(block.register_forward_hook(_StreamerHook(self, self._after(index))))

    @property
    def resident(self) -> set[int]:
        """Indices of the blocks whose weights are on the device now (copied or being copied)."""
        return self._resident | set(self._pending)

    def _log(self, kind: str, index: int) -> None:
        if self.events is not None:
            self.events.append((kind, index))

    def prefetch(self, index: int) -> None:
        """Start copying block ``index`` (no-op when it is already resident or on its way)."""
        if index in self._resident or index in self._pending:
            return
        versions = [_version(*slot) for slot in self._slots[index]]
        self._pending[index] = (*self.transfers.copy(self._host[index]), versions)
        self._log("load", index)

    def _install(self, index: int) -> None:
        self.prefetch(index)
        tensors, event, versions = self._pending.pop(index)
        if versions != [_version(*slot) for slot in self._slots[index]]:
            # Written in place since the copy started (e.g. fuse_lora() between two calls, with block 0's
            # wrap-around prefetch pending): that copy holds the old values, so copy again. The stale copy was
            # made on the same side stream, so its memory is reused only after it has landed.
            tensors, event = self.transfers.copy(self._host[index])
            self._log("load", index)
        self.transfers.wait(tensors, event)
        for (owner, name, is_param), tensor in zip(self._slots[index], tensors, strict=True):
            _set_data(owner, name, is_param, tensor)
        self._resident.add(index)

    def drop(self, index: int) -> None:
        """Point block ``index`` back at its host tensors; the device copy is freed with its last reference."""
        if index in self._pending:
            self._install(index)  # a copy in flight must land before its memory can be given back
        if index not in self._resident:
            return
        for (owner, name, is_param), tensor in zip(self._slots[index], self._host[index], strict=True):
            _set_data(owner, name, is_param, tensor)
        self._resident.discard(index)
        self._log("drop", index)

    def drop_all(self) -> None:
        for index in sorted(self.resident):
            self.drop(index)

    def _before(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._install(index)
            self._log("run", index)
            if len(self.blocks) > 1:
                self.prefetch((index + 1) % len(self.blocks))

        return hook

    def _after(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.drop(index)

        return hook

    def remove(self) -> None:
        """Remove the hooks; the blocks stay in host memory."""
        self.drop_all()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ------------------------------------------------------------------------------------------------ components


class ComponentOffload:
    """Keep components in host memory and move one at a time to ``device`` when it is called.

    :meth:`add` registers a component with the modules whose forward brings it in (``triggers``). A component
    added with ``leave_after=True`` goes back to the host right after that forward (the text encoder: its output
    is all the pipeline needs); otherwise it stays until another component is called. For a component with a
    ``streamer`` only the parts outside the streamed blocks move here. Going back to the host re-points each
    tensor at its host copy instead of copying it back, except tensors written in place on the device (fusing a
    LoRA while the component is there: their in-place write counter moved) and tensors added or replaced there,
    which are copied back.
    """

    def __init__(self, device: torch.device | str, *, events: list | None = None) -> None:
        self.device = torch.device(device)
        self.events = events
        self.active: str | None = None
        self._modules: dict[str, nn.Module] = {}
        self._streamed: dict[str, BlockStreamer] = {}
        # Per component, while on the device: (id(owner), name) -> (host copy, tensor put in the slot, its version).
        self._host: dict[str, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int | None]]] = {}
        self.transfers = Transfers(self.device)
        self._handles: list[Any] = []

    def add(
        self,
        name: str,
        module: nn.Module,
        triggers: Sequence[nn.Module],
        *,
        leave_after: bool = False,
        streamer: BlockStreamer | None = None,
    ) -> None:
        self._modules[name] = module
        if streamer is not None:
            self._streamed[name] = streamer
        module.to(HOST)  # streamed blocks are there already (no copy)
        for trigger in triggers:
            self._handles.append(trigger.register_forward_pre_hook(self._before(name), with_kwargs=True))
            if leave_after:
                self._handles.append(trigger.register_forward_hook(self._after(name)))

    def _move(self, name: str, *, onto_device: bool) -> None:
        """Going back to the host re-points each tensor at the host copy it came from (no device-to-host copy);
        only tensors that appeared or were written in place meanwhile are copied back. The host copies are pinned
        on CUDA (once), so loading is a fast asynchronous copy."""
        module = self._modules[name]
        streamer = self._streamed.get(name)
        skip = set() if streamer is None else {id(t) for b in streamer.blocks for t in [*b.parameters(), *b.buffers()]}
        host_of = self._host.setdefault(name, {})
        with torch.no_grad():
            for owner, tensor_name, is_param in _own_tensors(module):
                tensor = _get(owner, tensor_name, is_param)
                key = (id(owner), tensor_name)
                if id(tensor) in skip:
                    continue
                if not onto_device:
                    host, loaded, version = host_of.pop(key, (None, None, None))
                    if host is None or tensor is not loaded or host.shape != tensor.shape or host.dtype != tensor.dtype:
                        host = tensor.data.to(HOST)  # a tensor added or replaced while on the device
                    elif _version_of(tensor) != version:
                        host.copy_(tensor.data)  # written in place on the device (e.g. fuse_lora()): keep it
                    _set_data(owner, tensor_name, is_param, host)
                elif key not in host_of:
                    host = self.transfers.pin(tensor.data.to(HOST))
                    # copy=True: a real copy even when the target is the host itself (what the CPU tests watch).
                    _set_data(owner, tensor_name, is_param, host.to(self.device, non_blocking=True, copy=True))
                    # What to compare on the way back: the object now in the slot (a buffer is replaced by its
                    # device copy, a parameter stays) and its write counter.
                    loaded = _get(owner, tensor_name, is_param)
                    host_of[key] = (host, loaded, _version_of(loaded))
        if not onto_device:
            # Host copies of tensors that left the module while it was on the device (layers replaced by fp8
            # storage or q/k/v fusion): nothing will ask for them again.
            host_of.clear()
            if streamer is not None:
                streamer.drop_all()

    def manages(self, name: str) -> bool:
        """Whether component ``name`` is moved by this offload."""
        return name in self._modules

    def activate(self, name: str) -> None:
        """Put ``name`` on the device and send the active component (if another) back to the host."""
        if self.active == name:
            return
        if self.active is not None:
            self.offload(self.active)
        self._move(name, onto_device=True)
        self.active = name
        if self.events is not None:
            self.events.append(("on", name))

    def offload(self, name: str) -> None:
        self._move(name, onto_device=False)
        if self.active == name:
            self.active = None
        if self.events is not None:
            self.events.append(("off", name))

    def offload_all(self) -> None:
        if self.active is not None:
            self.offload(self.active)

    def _before(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self.activate(name)
            return _move_tensors(args, self.device), _move_tensors(kwargs, self.device)

        return hook

    def _after(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.offload(name)

        return hook

    def remove(self) -> None:
        self.offload_all()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for streamer in self._streamed.values():
            streamer.remove()
