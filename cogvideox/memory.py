"""``MemoryPlan``: the pipeline's offload mode and its rule for tiling the VAE decode.

The pipeline holds one plan (``pipe.memory``) and asks it three things: which device computes
(:attr:`MemoryPlan.execution_device`), to bring a component onto that device before calling it outside a forward
(:meth:`MemoryPlan.activate`), and whether a decode must be tiled (:meth:`MemoryPlan.decode_needs_tiling`).

VAE tiling rule (docs/performance.md, "VAE decode"): the untiled decode of latents ``[B, C, F', h, w]`` needs about
``VAE_DECODE_FACTOR * c0 * 9 * 8h * 8w * bytes`` for its first frame chunk (``c0`` = the last up block's width,
128 for every published VAE; 9 = the video frames of the first chunk of 3 latent frames), plus the decoded video
it accumulates (``3 * F * 8h * 8w * bytes``), times the batch unless slicing is on. When that exceeds the budget,
the decode runs in the VAE's tiles (240x360 pixels by default). The budget is ``vae_memory_budget`` when set, else
on CUDA the free device memory plus what PyTorch's allocator holds unused, and unlimited elsewhere; under
sequential offload it is at most 4 GiB (``SEQUENTIAL_VAE_BUDGET``), so that the decode never sets the peak there.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .offload import BlockStreamer, ComponentOffload

logger = logging.getLogger(__name__)

# Peak live bytes of an untiled decode over c0 * 9 * H * W * element size, measured with the published VAE config
# (float32, CPU, LiveTensorBytes in benchmarks/_common.py): 8.53 for one chunk (3 latent frames) at 32x32 and
# 64x64 pixels, 9.77 for 5 latent frames (the second chunk adds the causal conv cache), 9.86 for 13 (49 frames;
# the decoded video included, which the formula also counts separately, so it errs on the safe side). The margin
# covers what that meter cannot see: kernel scratch (cuDNN convolution work space) and allocator fragmentation.
VAE_DECODE_FACTOR = 9.9
VAE_DECODE_MARGIN = 1.25
OFFLOAD_MODES = (None, "text", "model", "sequential")
# Default decode budget under sequential offload: the 5B/1.5 decode in 240x360 tiles needs ~2.4 GiB (bf16), so the
# whole generation stays under 6 GB (a 5B on an 8 GB GPU); the untiled 49x480x720 decode would need ~9.3 GiB.
SEQUENTIAL_VAE_BUDGET = 4 * 2**30


def vae_decode_bytes(vae: Any, latent_shape: tuple[int, ...], *, tile: tuple[int, int] | None = None) -> int:
    """Estimated peak bytes of ``vae.decode`` on latents of ``latent_shape`` ``[B, C, F', h, w]``, untiled, or
    with tiles of ``tile`` = (height, width) pixels (each tile decodes like a small untiled video)."""
    batch, _, frames, h, w = latent_shape
    ratio = vae.spatial_compression
    height, width = h * ratio, w * ratio
    element = torch.empty((), dtype=vae.dtype).element_size()
    batch_at_once = 1 if vae.use_slicing else batch
    work_h, work_w = (height, width) if tile is None else (min(height, tile[0]), min(width, tile[1]))
    c0 = vae.decode_memory_channels
    work = VAE_DECODE_FACTOR * VAE_DECODE_MARGIN * c0 * 9 * work_h * work_w * element * batch_at_once
    output = 3 * (4 * frames) * height * width * element * batch
    return int(work + output)


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can get: free memory plus the allocator's unused cache (CUDA); None
    (no limit known) elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


class MemoryPlan:
    """Where the pipeline's weights live and when the VAE tiles. Change it through the pipeline's
    ``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``, ``disable_cpu_offload`` and
    ``set_vae_memory_budget``.

    ``events``: when a list, the offload hooks append what they do to it (tests).
    """

    def __init__(self) -> None:
        self.mode: str | None = None
        self.device: torch.device | None = None
        self.auto_vae_tiling = True
        self.vae_memory_budget: int | None = None
        self.events: list | None = None
        self._offload: ComponentOffload | None = None

    # ---------------------------------------------------------------------------------------------- offload

    def enable(self, pipe: Any, mode: str, device: torch.device | str) -> None:
        """Install ``mode`` for the pipeline's components, computing on ``device``: "text" (only the text encoder
        waits in host memory and visits the device to encode), "model" or "sequential"."""
        if mode not in OFFLOAD_MODES[1:]:
            raise ValueError(f"offload mode {mode!r}: choose 'text', 'model' or 'sequential'")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"offload to {device}: CUDA is not available in this PyTorch build or machine; pass the device "
                "that computes, e.g. device='cuda:0', or run without offload"
            )
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.disable()
        offload = ComponentOffload(device, events=self.events)
        text_blocks = transformer_blocks = None
        if mode == "sequential":
            text_blocks = BlockStreamer(pipe.text_encoder.offload_blocks(), device, events=self.events)
            transformer_blocks = BlockStreamer(pipe.transformer.offload_blocks(), device, events=self.events)
        offload.add("text_encoder", pipe.text_encoder, [pipe.text_encoder], leave_after=True, streamer=text_blocks)
        if mode != "text":  # "text": the transformer and the VAE stay where they are
            offload.add("transformer", pipe.transformer, [pipe.transformer], streamer=transformer_blocks)
            offload.add("vae", pipe.vae, list(pipe.vae.offload_modules()))
        self._offload, self.mode, self.device = offload, mode, device
        logger.info("%s CPU offload on %s", mode, device)

    def disable(self) -> None:
        """Remove the hooks; every component stays in host memory (move them with ``.to()`` as needed)."""
        if self._offload is not None:
            self._offload.remove()
        self._offload, self.mode, self.device = None, None, None

    def activate(self, name: str) -> None:
        """Bring component ``name`` onto the execution device now (no-op for components the plan does not move)."""
        if self._offload is not None and self._offload.manages(name):
            self._offload.activate(name)

    def release(self) -> None:
        """Send every component back to the host (end of a call; no-op without offload)."""
        if self._offload is not None:
            self._offload.offload_all()

    def execution_device(self, default: torch.device) -> torch.device:
        return self.device if self.device is not None else default

    # ---------------------------------------------------------------------------------------------- VAE

    def decode_needs_tiling(self, vae: Any, latent_shape: tuple[int, ...], device: torch.device) -> bool:
        """True when the untiled decode is estimated not to fit the budget (see the module docstring)."""
        if not self.auto_vae_tiling or vae.use_tiling:
            return False
        budget = self.vae_memory_budget if self.vae_memory_budget is not None else free_device_bytes(device)
        if self.mode == "sequential" and self.vae_memory_budget is None:
            # Sequential offload is the lowest-memory mode: its decode must not be what sets the peak.
            budget = SEQUENTIAL_VAE_BUDGET if budget is None else min(budget, SEQUENTIAL_VAE_BUDGET)
        if budget is None:
            return False
        need = vae_decode_bytes(vae, latent_shape)
        if need <= budget:
            return False
        tile = (vae.tile_sample_min_height, vae.tile_sample_min_width)
        tiled = vae_decode_bytes(vae, latent_shape, tile=tile)
        logger.info(
            "VAE decode: untiled needs ~%.2f GiB > budget %.2f GiB; decoding in tiles", need / 2**30, budget / 2**30
        )
        if tiled > budget:
            logger.warning(
                "VAE decode: even in %dx%d tiles it needs ~%.2f GiB, over the %.2f GiB budget; it may run out of "
                "memory (enable model or sequential CPU offload, decode fewer videos at once, or call "
                "pipe.vae.enable_tiling() with smaller tiles)", *tile, tiled / 2**30, budget / 2**30,
            )  # fmt: skip
        return True
