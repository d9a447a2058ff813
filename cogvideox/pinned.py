"""Host memory for offloaded weights: one flat buffer per group of tensors, page-locked at exactly its size.

Offload copies weights from host memory to the GPU again and again; the copy engine reads page-locked ("pinned")
memory directly and asynchronously, pageable memory only through a staging buffer. ``tensor.pin_memory()`` is the
obvious way to get it, and the wrong one for weights: PyTorch's caching host allocator rounds every request up to
a power of two (``CachingHostAllocator.h``, "Round up the allocation to the nearest power of two"), so pinning
each weight on its own costs about 1.6x the weights (5B transformer in bf16: 10.4 GiB of weights, 18.4 GiB
pinned; T5-XXL: 8.9 -> 12.3 GiB). Here the tensors of one block (sequential offload) or one component (model
offload) are copied into one flat byte buffer that is page-locked in place (``cuMemHostRegister``), and views
of it replace the tensors: the cost is the weights plus alignment padding (under 256 bytes a tensor and one page
a buffer), and one copy moves a whole block.

On a machine without CUDA the buffers are packed the same way and simply not pinned, so the CPU tests exercise
the layout the GPU path uses.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import weakref
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

# Offset granularity inside a buffer: a multiple of every dtype's size, and the alignment cudaMalloc gives, which
# vectorised kernels (and the scaled fp8 products) expect of their operands.
ALIGN = 256
PAGE = 4096  # buffers start and end on page boundaries, so two registered ranges never share a page

Layout = tuple[int, torch.dtype, torch.Size]  # (byte offset, dtype, shape) of one tensor in a buffer


def _aligned(n: int, to: int) -> int:
    return -(-n // to) * to


def layout_of(specs: Sequence[tuple[torch.dtype, torch.Size]]) -> tuple[list[Layout], int]:
    """Where each tensor (given by dtype and shape) goes in a flat buffer, and the buffer's size in bytes (whole
    pages)."""
    entries, offset = [], 0
    for dtype, shape in specs:
        entries.append((offset, dtype, torch.Size(shape)))
        offset = _aligned(offset + shape.numel() * _itemsize(dtype), ALIGN)
    return entries, _aligned(max(offset, 1), PAGE)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def view_in(flat: torch.Tensor, entry: Layout) -> torch.Tensor:
    """The tensor ``entry`` describes, as a view of the byte buffer ``flat`` (host or device)."""
    offset, dtype, shape = entry
    size = shape.numel() * _itemsize(dtype)
    return flat[offset : offset + size].view(dtype).view(shape)


def page_aligned_bytes(nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised ``nbytes`` byte tensor starting on a page boundary (pages are committed on first write)."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, device=device)
    start = (-raw.data_ptr()) % PAGE
    return raw[start : start + nbytes]


# cuMemHostRegister flag: the pages count as pinned in every CUDA context (each GPU), not only the current one.
_PORTABLE = 0x01


@functools.cache
def _cuda_driver() -> ctypes.CDLL | None:
    """The CUDA driver library, or None where it cannot be loaded.

    Registration goes through the driver API rather than ``torch.cuda.cudart().cudaHostRegister``: that binding
    returns the runtime's error code but leaves it set as the thread's "last error", and the next kernel launch
    check then raises it as its own failure (vllm-project/vllm#50070), so a refused registration would crash an
    unrelated kernel instead of falling back. Driver calls leave the runtime's error state alone."""
    try:
        driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return None
    driver.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    driver.cuMemHostRegister_v2.restype = ctypes.c_int
    driver.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
    driver.cuMemHostUnregister.restype = ctypes.c_int
    return driver


def _unregister(ptr: int, device: torch.device) -> None:
    try:
        # A copy to ``device`` may still be reading the buffer (queued, not yet run): let it finish first.
        torch.cuda.synchronize(device)
        _cuda_driver().cuMemHostUnregister(ptr)
    except Exception:  # interpreter shutdown, CUDA already torn down: nothing left to unlock
        pass


_warned_register = False


def page_lock(flat: torch.Tensor, device: torch.device | str) -> bool:
    """Page-lock host buffer ``flat`` in place, for copies to CUDA ``device``, for as long as the object ``flat``
    lives. False (with one warning per process) when the driver refuses (a locked-memory limit, say) or cannot be
    loaded: the copies then go through a staging buffer, slower but equal."""
    global _warned_register
    if flat.numel() == 0:
        return False
    device = torch.device(device)
    driver = _cuda_driver()
    # A runtime call on ``device`` first: it makes the device's primary context current on this thread, which the
    # driver call below registers with.
    torch.cuda.synchronize(device)
    error = -1 if driver is None else driver.cuMemHostRegister_v2(flat.data_ptr(), flat.numel(), _PORTABLE)
    if error != 0:
        if not _warned_register:
            _warned_register = True
            logger.warning(
                "could not page-lock %.1f MiB of host memory for offload (%s): the weights stay in pageable memory "
                "and each copy to the GPU is slower",
                flat.numel() / 2**20,
                "the CUDA driver library could not be loaded" if driver is None
                else f"cuMemHostRegister error {error}; a locked-memory limit, `ulimit -l`?",
            )  # fmt: skip
        return False
    # Unlocked when ``flat`` is collected. Views of it may outlive the object, but never the storage: at worst
    # they end up in ordinary pageable memory, which is still correct.
    weakref.finalize(flat, _unregister, flat.data_ptr(), device)
    return True


class HostBuffer:
    """One flat host byte buffer (``flat``) with room for tensors of the given dtypes and shapes, each at an
    aligned offset (``layout``). :meth:`fill` copies a tensor into its place and returns the view that stands in
    for it; :meth:`lock` page-locks the buffer once it is full.

    Fill and re-point one tensor at a time (``slot = buffer.fill(i, slot)``): each original is then freed as soon
    as its copy is made, and the host peak stays near the weights plus one tensor instead of twice the weights."""

    def __init__(self, specs: Sequence[tuple[torch.dtype, torch.Size]]) -> None:
        self.layout, nbytes = layout_of(specs)
        self.weight_bytes = sum(shape.numel() * _itemsize(dtype) for dtype, shape in specs)
        self.flat = page_aligned_bytes(nbytes)
        self.pinned = False

    def fill(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` (any device) into place ``index``; returns the view of the buffer that holds it."""
        view = view_in(self.flat, self.layout[index])
        with torch.no_grad():
            view.copy_(tensor)
        return view

    def lock(self, device: torch.device | str) -> bool:
        """Page-lock the buffer for copies to CUDA ``device`` (after filling: locking commits every page).
        Returns whether it is locked."""
        self.pinned = page_lock(self.flat, device)
        return self.pinned

    @property
    def nbytes(self) -> int:
        """Bytes of host memory the buffer holds (page-locked when ``pinned``)."""
        return self.flat.numel()

    @property
    def storage_ptr(self) -> int:
        return storage_ptr(self.flat)


def storage_ptr(tensor: torch.Tensor) -> int:
    """The address of the storage ``tensor`` is a view of (what tells one buffer's views from another's)."""
    return tensor.untyped_storage().data_ptr()
