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

from .pinned import HostBuffer, page_aligned_bytes, storage_ptr, view_in

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
    """Host -> ``device`` copies of flat byte buffers: asynchronous on a side CUDA stream when ``device`` is a GPU,
    plain copies otherwise (events are then None). :meth:`copy` starts a copy, :meth:`wait` makes the compute stream
    wait for it, :meth:`mark` records how far the compute stream has got (to know when a buffer is free again)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Any:
        """Copy host ``src`` into device ``dst`` once the compute stream has passed event ``after`` (the kernels
        that last read ``dst``); returns the copy's event."""
        if not self.is_cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for a copy."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def wait_all(self) -> None:
        """Make the compute stream wait for every copy issued so far (abandoned ones included)."""
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def mark(self) -> Any:
        """An event at the compute stream's current position (None off CUDA, where everything is in order)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


# ------------------------------------------------------------------------------------------------ blocks

RING = 2  # device buffers a streamer holds: the block computing and the next one on its way


class BlockStreamer:
    """Stream the blocks of an ``nn.ModuleList`` from host memory to ``device`` one at a time, the next block's
    copy overlapping the current block's compute.

    Host side: each block's tensors live in one flat page-locked buffer (:class:`~cogvideox.pinned.HostBuffer`;
    pinned bytes = the weights, not the ~1.6x of pinning each tensor). Device side: a ring of two flat buffers,
    each the size of the largest block, allocated at the first copy and freed by :meth:`drop_all`. A block's copy
    into a ring buffer waits (on the copy stream, not the CPU) for the compute that last read that buffer, so the
    device memory is exactly two blocks however far the CPU runs ahead of the GPU (copying into fresh allocations
    instead would let freed-but-still-read blocks pile up in the caching allocator's reserve).

    Hooks: before block ``i`` runs, its copy is waited for (or made, if no prefetch was started) and block
    ``(i + 1) % n`` starts copying into the other ring buffer; after block ``i`` runs, its parameters point back
    at the host views. The wrap-around prefetch of block 0 overlaps the sampler step between two denoising steps.
    ``events`` (when a list) records ``("load", i)``, ``("run", i)`` and ``("drop", i)`` in order, for tests.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, *, events: list | None = None) -> None:
        self.blocks = blocks
        self.transfers = Transfers(device)
        self.events = events
        # Per block: the slots (owner, name, is_parameter) and the host buffer their tensors live in.
        self._slots: list[list[tuple[nn.Module, str, bool]]] = []
        self._host: list[HostBuffer] = []
        for block in blocks:
            slots = list(_own_tensors(block))
            buffer = HostBuffer([(_get(*slot).dtype, _get(*slot).shape) for slot in slots])
            for i, slot in enumerate(slots):
                _set_data(*slot, buffer.fill(i, _get(*slot).data))  # the original is freed here, one at a time
            if self.transfers.is_cuda:
                buffer.lock(self.transfers.device)
            self._slots.append(slots)
            self._host.append(buffer)
        self._ring: list[torch.Tensor] | None = None
        self._holder: list[int | None] = [None] * RING  # block whose copy a ring buffer holds (or is receiving)
        self._free_after: list[Any] = [None] * RING  # compute event after which a ring buffer may be overwritten
        self._where: dict[int, int] = {}  # block -> its ring buffer, while resident or pending
        # Per block in flight: (copy event, slot versions when the copy started).
        self._pending: dict[int, tuple[Any, list[int | None]]] = {}
        self._resident: set[int] = set()
        self._running: int | None = None
        self._handles: list[Any] = []
        for index, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(_StreamerHook(self, self._before(index))))
            self._handles.append(block.register_forward_hook(_StreamerHook(self, self._after(index))))

    @property
    def resident(self) -> set[int]:
        """Indices of the blocks whose weights are on the device now (copied or being copied)."""
        return self._resident | set(self._pending)

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory the blocks occupy (page-locked on CUDA): the weights plus alignment padding."""
        return sum(buffer.nbytes for buffer in self._host)

    @property
    def weight_bytes(self) -> int:
        return sum(buffer.weight_bytes for buffer in self._host)

    @property
    def device_bytes(self) -> int:
        """Bytes the ring of device buffers holds now (0 until the first copy and after :meth:`drop_all`)."""
        return 0 if self._ring is None else sum(buffer.numel() for buffer in self._ring)

    def _log(self, kind: str, index: int) -> None:
        if self.events is not None:
            self.events.append((kind, index))

    def _ring_buffer_for(self, index: int) -> int:
        """A ring buffer for block ``index``: a free one, else one whose block is only on its way, else one whose
        block is resident but not running (left behind by a forward that raised)."""
        if self._ring is None:
            size = max(buffer.nbytes for buffer in self._host)
            self._ring = [page_aligned_bytes(size, self.transfers.device) for _ in range(RING)]
            if self.transfers.is_cuda:
                for buffer in self._ring:
                    # Written on the copy stream: if the ring is ever freed without drop_all() (the streamer
                    # dropped mid-call), the allocator then waits for the copies queued so far before reusing it.
                    buffer.record_stream(self.transfers.stream)
            # The allocator may hand out memory that kernels queued on the compute stream still use: the first copy
            # into each buffer waits for them.
            self._free_after = [self.transfers.mark()] * RING
        choices = [r for r in range(RING) if self._running is None or self._holder[r] != self._running]
        for r in choices:
            if self._holder[r] is None:
                return r
        for r in choices:
            if self._holder[r] in self._pending:
                self.drop(self._holder[r])
                return r
        self.drop(self._holder[choices[0]])
        return choices[0]

    def _copy(self, index: int, ring: int) -> None:
        versions = [_version(*slot) for slot in self._slots[index]]
        host = self._host[index].flat
        event = self.transfers.copy(self._ring[ring][: host.numel()], host, after=self._free_after[ring])
        self._free_after[ring] = None  # the copy stream has waited for it; later copies into this buffer follow
        self._pending[index] = (event, versions)
        self._log("load", index)

    def prefetch(self, index: int) -> None:
        """Start copying block ``index`` (no-op when it is already resident or on its way)."""
        if index in self._resident or index in self._pending:
            return
        ring = self._ring_buffer_for(index)
        self._holder[ring], self._where[index] = index, ring
        self._copy(index, ring)

    def _install(self, index: int) -> None:
        if index in self._resident:  # left installed by a forward that raised: its weights are there
            return
        self.prefetch(index)
        ring = self._where[index]
        event, versions = self._pending.pop(index)
        if versions != [_version(*slot) for slot in self._slots[index]]:
            # Written in place since the copy started (e.g. fuse_lora() between two calls, with block 0's
            # wrap-around prefetch pending): that copy holds the old values, so copy again. It follows the stale
            # copy on the same stream, so it lands after it.
            self._copy(index, ring)
            event, _ = self._pending.pop(index)
        self.transfers.wait(event)
        device = self._ring[ring]
        if torch.is_grad_enabled():
            # Autograd may save views of the weights for the backward pass (W^T for the input's gradient, even with
            # frozen weights), which the ring's next copies would overwrite: under grad the block computes with a
            # copy of its own, kept alive as long as the graph needs it (one device-to-device copy).
            device = device[: self._host[index].nbytes].clone()
        for slot, entry in zip(self._slots[index], self._host[index].layout, strict=True):
            _set_data(*slot, view_in(device, entry))
        self._resident.add(index)

    def drop(self, index: int) -> None:
        """Point block ``index`` back at its host views; its ring buffer is free again once the compute queued so
        far (which may still read it) has run. A copy still on its way is abandoned: the next copy into the
        buffer follows it on the same stream."""
        if index not in self._resident and index not in self._pending:
            return
        ring = self._where.pop(index)
        if self._pending.pop(index, None) is None:
            for slot, view in zip(self._slots[index], self._host_views(index), strict=True):
                _set_data(*slot, view)
            self._resident.discard(index)
            self._free_after[ring] = self.transfers.mark()
        self._holder[ring] = None
        self._log("drop", index)

    def _host_views(self, index: int) -> list[torch.Tensor]:
        buffer = self._host[index]
        return [view_in(buffer.flat, entry) for entry in buffer.layout]

    def drop_all(self) -> None:
        """Every block back on the host and the ring of device buffers freed (the VAE, say, may use the memory)."""
        # The allocator may reuse the ring as soon as the compute stream passes here, so every copy into it (also
        # one abandoned for another block) must have landed by then.
        self.transfers.wait_all()
        for index in sorted(self.resident):
            self.drop(index)
        self._ring, self._free_after, self._running = None, [None] * RING, None

    def _before(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._install(index)
            self._running = index
            self._log("run", index)
            if len(self.blocks) > 1:
                self.prefetch((index + 1) % len(self.blocks))

        return hook

    def _after(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._running = None
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
    which are copied back. At rest a component's tensors are views of flat page-locked host buffers
    (:class:`~cogvideox.pinned.HostBuffer`; :attr:`host_bytes`), packed when it is added and topped up when it is
    next loaded if tensors were added or replaced meanwhile.
    """

    def __init__(self, device: torch.device | str, *, events: list | None = None) -> None:
        self.device = torch.device(device)
        self.events = events
        self.active: str | None = None
        self._modules: dict[str, nn.Module] = {}
        self._streamed: dict[str, BlockStreamer] = {}
        # Per component, while on the device: (id(owner), name) -> (host copy, tensor put in the slot, its version).
        self._host: dict[str, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int | None]]] = {}
        self._buffers: dict[str, list[HostBuffer]] = {}  # per component: the host buffers its tensors live in
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
        self._pack(name)
        for trigger in triggers:
            self._handles.append(trigger.register_forward_pre_hook(self._before(name), with_kwargs=True))
            if leave_after:
                self._handles.append(trigger.register_forward_hook(self._after(name)))

    def _unstreamed_slots(self, name: str) -> list[tuple[nn.Module, str, bool]]:
        """Slots of component ``name`` that this offload moves (not those of the blocks a streamer moves)."""
        streamer = self._streamed.get(name)
        skip = set() if streamer is None else {id(t) for b in streamer.blocks for t in [*b.parameters(), *b.buffers()]}
        return [slot for slot in _own_tensors(self._modules[name]) if id(_get(*slot)) not in skip]

    def _pack(self, name: str) -> None:
        """Put the tensors of component ``name`` (at rest on the host) that are not in one of its host buffers yet
        into a new one: all of them when it is added, later the tensors added or replaced since (a LoRA's, fp8
        storage's). A buffer that lost more than 2% of its bytes to replaced tensors is repacked with them, so that
        no dead weight stays page-locked."""
        buffers = {buffer.storage_ptr: buffer for buffer in self._buffers.get(name, [])}
        slots = self._unstreamed_slots(name)
        live = dict.fromkeys(buffers, 0)
        counted: set[int] = set()
        for slot in slots:
            tensor = _get(*slot)
            if storage_ptr(tensor) in live and id(tensor) not in counted:
                counted.add(id(tensor))
                live[storage_ptr(tensor)] += tensor.numel() * tensor.element_size()
        keep = {ptr for ptr, buffer in buffers.items() if live[ptr] >= 0.98 * buffer.weight_bytes}
        todo: dict[int, list[tuple[nn.Module, str, bool]]] = {}  # one entry per tensor object (shared ones once)
        for slot in slots:
            if storage_ptr(_get(*slot)) not in keep:
                todo.setdefault(id(_get(*slot)), []).append(slot)
        kept = [buffers[ptr] for ptr in keep]
        if todo:
            groups = list(todo.values())
            buffer = HostBuffer([(_get(*group[0]).dtype, _get(*group[0]).shape) for group in groups])
            for i, group in enumerate(groups):
                view = buffer.fill(i, _get(*group[0]).data)  # each original is freed here, one at a time
                for slot in group:
                    _set_data(*slot, view)
            if self.transfers.is_cuda:
                buffer.lock(self.device)
            kept.append(buffer)
        self._buffers[name] = kept

    def host_bytes(self, name: str) -> int:
        """Bytes of host memory component ``name``'s buffers hold (page-locked on CUDA), streamed blocks aside."""
        return sum(buffer.nbytes for buffer in self._buffers.get(name, []))

    def _move(self, name: str, *, onto_device: bool) -> None:
        """Going back to the host re-points each tensor at the host view it came from (no device-to-host copy);
        only tensors that appeared or were written in place meanwhile are copied back. Loading copies from the
        page-locked host buffers, asynchronously on CUDA."""
        streamer = self._streamed.get(name)
        host_of = self._host.setdefault(name, {})
        if onto_device:
            self._pack(name)
        with torch.no_grad():
            for owner, tensor_name, is_param in self._unstreamed_slots(name):
                tensor = _get(owner, tensor_name, is_param)
                key = (id(owner), tensor_name)
                if not onto_device:
                    host, loaded, version = host_of.pop(key, (None, None, None))
                    if host is None or tensor is not loaded or host.shape != tensor.shape or host.dtype != tensor.dtype:
                        host = tensor.data.to(HOST)  # a tensor added or replaced while on the device
                    elif _version_of(tensor) != version:
                        host.copy_(tensor.data)  # written in place on the device (e.g. fuse_lora()): keep it
                    _set_data(owner, tensor_name, is_param, host)
                elif key not in host_of:
                    host = tensor.data
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
            self._pack(name)  # tensors that came back as new ones join a buffer; a buffer of dead weights goes

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
