"""``MemoryManager``: the pipeline's offload mode and its rule for tiling the VAE (the plan that chooses the mode
from the free memory is :mod:`cogvideox.memory_plan`).

The pipeline holds one manager (``pipe.memory``) and asks it which device computes
(:attr:`MemoryManager.execution_device`), to bring a component onto that device before calling it outside a forward
(:meth:`MemoryManager.activate`), and how the VAE must run a given encode or decode (:meth:`MemoryManager.vae_mode`).

VAE rule (docs/performance.md, "VAE decode"): the untiled decode of latents ``[B, C, F', h, w]`` needs about
``VAE_DECODE_FACTOR * c0 * 9 * 8h * 8w * bytes`` for its first frame chunk (``c0`` = the last up block's width,
128 for every published VAE; 9 = the video frames of the first chunk of 3 latent frames), plus the decoded video
it accumulates (``3 * F * 8h * 8w * bytes``), times the batch unless slicing is on. The encode of ``[B, 3, F, H, W]``
needs ``VAE_ENCODE_FACTOR_* * c0 * H * W * bytes`` per video. When the estimate exceeds the budget, the VAE runs one
video at a time (slicing, exact), then also in its tiles (240x360 pixels by default; tiles blend at the seams, as
in the reference). The budget is ``vae_memory_budget`` when set, else the free device memory (``free_bytes``: on
CUDA the free memory plus what PyTorch's allocator holds unused) and unlimited where that is unknown (the CPU);
under sequential offload it is at most 4 GiB (``SEQUENTIAL_VAE_BUDGET``), so that the VAE never sets the peak there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
# Peak live bytes of an untiled encode of one video over c0 * H * W * element size, same meter and config
# (benchmarks/memory.py --part factors): 20.6 for one frame (an image-to-video image) at 32x32 and 64x64 pixels;
# 50.1 for 9 frames, 56.4 for 17 to 49 frames (the encoder works in chunks of 8 frames with a causal cache, so the
# peak stops growing after the second chunk). Same margin as the decode.
VAE_ENCODE_FACTOR_IMAGE = 21.0
VAE_ENCODE_FACTOR_VIDEO = 57.0
OFFLOAD_MODES = (None, "text", "model", "sequential")
# How the VAE runs one encode or decode, from the least work to the least memory: as it is set, one video at a
# time (exact), and in tiles (one video at a time when there are several).
VAE_MODES = ("untiled", "sliced", "tiled")
# Default decode budget under sequential offload: the 5B/1.5 decode in 240x360 tiles needs ~2.4 GiB (bf16), so the
# whole generation stays under 6 GB (a 5B on an 8 GB GPU); the untiled 49x480x720 decode would need ~9.3 GiB.
SEQUENTIAL_VAE_BUDGET = 4 * 2**30


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def tensor_bytes(module: Any, device: torch.device | None = None) -> int:
    """Bytes of a module's parameters and buffers (each tensor once), as they are now, counting only those on
    ``device`` when given; 0 for a non-module (a fork's component)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()] if device is None or t.device == device}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def vae_tile(vae: Any) -> tuple[int, int]:
    """The VAE's tile size in pixels (height, width): its own setting, 240x360 by default."""
    return vae.tile_sample_min_height, vae.tile_sample_min_width


def vae_decode_bytes(
    vae: Any, latent_shape: tuple[int, ...], *, tile: tuple[int, int] | None = None, sliced: bool | None = None
) -> int:
    """Estimated peak bytes of ``vae.decode`` on latents of ``latent_shape`` ``[B, C, F', h, w]``, untiled, or
    with tiles of ``tile`` = (height, width) pixels (each tile decodes like a small untiled video); ``sliced``
    (default: the VAE's ``use_slicing``) decodes one video at a time."""
    batch, _, frames, h, w = latent_shape
    ratio = vae.spatial_compression
    height, width = h * ratio, w * ratio
    element = element_size(vae.dtype)
    sliced = vae.use_slicing if sliced is None else sliced
    batch_at_once = 1 if sliced else batch
    work_h, work_w = (height, width) if tile is None else (min(height, tile[0]), min(width, tile[1]))
    c0 = vae.decode_memory_channels
    work = VAE_DECODE_FACTOR * VAE_DECODE_MARGIN * c0 * 9 * work_h * work_w * element * batch_at_once
    output = 3 * (4 * frames) * height * width * element * batch
    return int(work + output)


def vae_encode_bytes(
    vae: Any, video_shape: tuple[int, ...], *, tile: tuple[int, int] | None = None, sliced: bool | None = None
) -> int:
    """Estimated peak bytes of ``vae.encode`` on a video ``[B, 3, F, H, W]`` (the input included), untiled or in
    tiles of ``tile`` pixels; ``sliced`` as in :func:`vae_decode_bytes`."""
    batch, _, frames, height, width = video_shape
    element = element_size(vae.dtype)
    sliced = vae.use_slicing if sliced is None else sliced
    batch_at_once = 1 if sliced else batch
    work_h, work_w = (height, width) if tile is None else (min(height, tile[0]), min(width, tile[1]))
    factor = VAE_ENCODE_FACTOR_IMAGE if frames == 1 else VAE_ENCODE_FACTOR_VIDEO
    work = factor * VAE_DECODE_MARGIN * vae.decode_memory_channels * work_h * work_w * element * batch_at_once
    return int(work + 3 * frames * height * width * element * batch)


def choose_vae_mode(
    estimate: Callable[[tuple[int, int] | None, bool | None], int],
    vae: Any,
    batch: int,
    budget: int | None,
    *,
    tiles: bool = True,
    slices: bool = True,
) -> tuple[str, int]:
    """(mode, estimated bytes): the first of :data:`VAE_MODES` whose ``estimate(tile, sliced)`` fits ``budget``
    (the last one tried when none fits; untiled when the budget is unknown). ``tiles=False`` tries only the exact
    modes, ``slices=False`` too leaves the VAE as it is set. A VAE its user set to tile or slice stays so."""
    tile = vae_tile(vae) if vae.use_tiling else None
    options = [("untiled", tile, None)]
    if batch > 1 and not vae.use_slicing and slices:
        options.append(("sliced", tile, True))
    if tile is None and tiles:
        options.append(("tiled", vae_tile(vae), batch > 1 or None))
    for mode, tile_, sliced in options:
        need = estimate(tile_, sliced)
        if budget is None or need <= budget:
            return mode, need
    return options[-1][0], need


def require_device(device: torch.device, what: str) -> None:
    """Raise, naming ``what`` asked for it, when ``device`` is a CUDA device this PyTorch build or machine lacks."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{what}{device}: CUDA is not available in this PyTorch build or machine (torch {torch.__version__}); "
            "use device='cpu', or install the CUDA build of torch for your driver"
        )


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can get: free memory plus the allocator's unused cache (CUDA); None
    (no limit known) elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


class MemoryManager:
    """Where the pipeline's weights live and how the VAE runs. Change it through the pipeline's ``memory=`` plan
    (``from_pretrained``, ``set_memory_plan``), ``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``,
    ``disable_cpu_offload`` and ``set_vae_memory_budget``.

    ``setting``: the plan the pipeline follows (``"auto"`` re-plans at each call; a mode name keeps it; None: the
    user's own switches), on ``plan_device``. ``plan``: the last :class:`~cogvideox.memory_plan.MemoryPlan` made.
    ``free_bytes``: how the free memory of a device is read (None: unknown, no plan); replace it to simulate a
    GPU. ``events``: when a list, the offload hooks append what they do to it (tests).
    """

    def __init__(self) -> None:
        self.mode: str | None = None
        self.device: torch.device | None = None
        self.auto_vae_tiling = True
        self.vae_memory_budget: int | None = None
        self.setting: str | None = None
        self.plan: Any = None
        self.plan_device: torch.device | None = None
        self.applied: tuple[str, torch.device] | None = None  # (mode, device) the plan put in place
        self.free_bytes: Callable[[torch.device], int | None] = free_device_bytes
        self.events: list | None = None
        self._offload: ComponentOffload | None = None

    # ---------------------------------------------------------------------------------------------- offload

    def enable(self, pipe: Any, mode: str, device: torch.device | str) -> None:
        """Install ``mode`` for the pipeline's components, computing on ``device``: "text" (only the text encoder
        waits in host memory and visits the device to encode), "model" or "sequential"."""
        if mode not in OFFLOAD_MODES[1:]:
            raise ValueError(f"offload mode {mode!r}: choose 'text', 'model' or 'sequential'")
        device = torch.device(device)
        require_device(device, "offload to ")
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

    def forget_plan(self) -> None:
        """Stop following a memory plan: the offload stays as it is, and the user's switches decide from now."""
        self.setting, self.plan, self.plan_device, self.applied = None, None, None, None

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

    def vae_budget(self, device: torch.device) -> int | None:
        """Bytes an encode or decode may use on ``device`` now (see the module docstring); None: no limit."""
        budget = self.vae_memory_budget if self.vae_memory_budget is not None else self.free_bytes(device)
        if self.mode == "sequential" and self.vae_memory_budget is None:
            # Sequential offload is the lowest-memory mode: the VAE must not be what sets the peak.
            budget = SEQUENTIAL_VAE_BUDGET if budget is None else min(budget, SEQUENTIAL_VAE_BUDGET)
        return budget

    def vae_mode(self, vae: Any, kind: str, shape: tuple[int, ...], device: torch.device) -> str:
        """How the VAE must run a ``kind`` ("encode": video ``[B, 3, F, H, W]``; "decode": latents ``[B, C, F', h,
        w]``) to fit the budget: one of :data:`VAE_MODES` ("untiled" leaves the VAE as it is set)."""
        if not self.auto_vae_tiling:
            return "untiled"
        size = vae_encode_bytes if kind == "encode" else vae_decode_bytes
        budget = self.vae_budget(device)
        mode, need = choose_vae_mode(lambda tile, sliced: size(vae, shape, tile=tile, sliced=sliced), vae, shape[0],
                                     budget)  # fmt: skip
        if mode != "untiled":
            logger.info(
                "VAE %s: as set it needs more than the %.2f GiB budget; %s (~%.2f GiB)",
                kind,
                budget / 2**30,
                "one video at a time" if mode == "sliced" else "in tiles",
                need / 2**30,
            )
            if need > budget:
                logger.warning(
                    "VAE %s: even in %dx%d tiles it needs ~%.2f GiB, over the %.2f GiB budget; it may run out of "
                    "memory (enable model or sequential CPU offload, or call pipe.vae.enable_tiling() with smaller "
                    "tiles)", kind, *vae_tile(vae), need / 2**30, budget / 2**30,
                )  # fmt: skip
        return mode
