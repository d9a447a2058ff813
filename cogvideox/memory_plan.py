"""The memory plan: where each component lives during a call, chosen from what the call needs and the free memory.

A plan is one of four offload modes, fastest first, and how the VAE runs (untiled, one video at a time, or in
tiles: :data:`cogvideox.memory.VAE_MODES`):

============== ============================================== ==========================================
mode           on the accelerator                             cost per call
============== ============================================== ==========================================
``none``       every component, always                        nothing
``text``       transformer and VAE; T5 visits to encode        one host->device copy of T5
``model``      one component at a time                        one copy of each component
``sequential`` as ``model``, the blocks of the transformer    every block copied once per step,
               and of T5 streamed two at a time               overlapping the previous block's compute
============== ============================================== ==========================================

:func:`plan_memory` estimates the peak of each phase of a call (encode the prompt, encode the image or video,
denoise, decode) for each mode from

- the weights: bytes of every parameter and buffer, as loaded (dtype, fp8 storage, LoRA layers included);
  for sequential offload the parts outside the blocks plus the two largest blocks;
- the work of each phase: measured peaks of live tensors over the sizes that set them (the factors below,
  ``benchmarks/memory.py --part factors``), times 1.25 for what the CPU meter cannot see (kernel scratch,
  allocator rounding): the transformer step ``14 * B * N * D`` elements (N tokens, D its width; 12.1 measured
  with one block, 13.0-14.1 with two or more, 2B, 5B and 1.5 widths, float32 and bfloat16), T5
  ``17 * B * L * d_model`` (16.6 measured with T5-XXL's gated feed-forward), the VAE from :mod:`cogvideox.memory`;

and picks the first plan whose peak fits the free memory, in the order of :func:`candidates`: exact plans (an
untiled VAE) before tiled ones, faster modes before slower ones. The VAE runs in the cheapest of its modes that
fits the memory left by the weights resident at that moment. Nothing here touches a device: the estimates work
on modules built on the meta device, so a plan for any published model and any memory size can be computed (and
tested) anywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .memory import (
    SEQUENTIAL_VAE_BUDGET,
    choose_vae_mode,
    element_size,
    tensor_bytes,
    vae_decode_bytes,
    vae_encode_bytes,
)

PLANS = ("auto", "none", "text", "model", "sequential")
MODES = PLANS[1:]  # fastest first
MODE_NAMES = {
    "none": "everything resident",
    "text": "text encoder offloaded after encoding",
    "model": "model CPU offload",
    "sequential": "sequential CPU offload",
}
TRANSFORMER_STEP_FACTOR = 14.0
TEXT_ENCODE_FACTOR = 17.0
ACTIVATION_MARGIN = 1.25
GiB = 2**30


def format_bytes(n: int) -> str:
    """``12.34 GiB``, or ``5.6 MiB`` below one GiB (tiny models)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def check_plan_name(memory: str) -> str:
    if memory not in PLANS:
        raise ValueError(f"memory={memory!r}: choose one of {', '.join(repr(p) for p in PLANS)}")
    return memory


# ------------------------------------------------------------------------------------------------ sizes


@dataclasses.dataclass(frozen=True)
class CallSize:
    """What one call asks of memory: ``batch`` videos of ``frames x height x width`` pixels, with classifier-free
    guidance or not, ``prompts`` prompts of ``text_length`` tokens, an image or video to encode (``encode``:
    None, "image" or "video"), decoded or returned as latents."""

    batch: int
    frames: int
    height: int
    width: int
    guided: bool = True
    prompts: int = 1
    text_length: int = 226
    encode: str | None = None
    decodes: bool = True

    def __str__(self) -> str:
        videos = f"{self.batch} video{'s' if self.batch > 1 else ''}"
        extra = (", guided" if self.guided else "") + (f", {self.encode} encoded" if self.encode else "")
        return f"{videos} of {self.frames}x{self.height}x{self.width}{extra}"


def default_call_size(transformer_config: Any, vae: Any, *, image_to_video: bool) -> CallSize:
    """The size of a call with every default (one prompt, one video, the model's own frames and resolution)."""
    from .request import default_num_frames, default_size

    height, width = default_size(transformer_config, spatial=vae.spatial_compression)
    return CallSize(1, default_num_frames(transformer_config), height, width,
                    text_length=transformer_config.max_text_seq_length,
                    encode="image" if image_to_video else None)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Weights:
    """Bytes of each component's weights; ``*_streamed``: what sequential offload keeps on the device at once
    (the parts outside the blocks and the two largest blocks)."""

    text_encoder: int
    transformer: int
    vae: int
    text_encoder_streamed: int
    transformer_streamed: int

    @classmethod
    def of(cls, text_encoder: Any, transformer: Any, vae: Any) -> Weights:
        def streamed(module: Any) -> int:
            blocks = sorted((tensor_bytes(b) for b in module.offload_blocks()), reverse=True)
            return tensor_bytes(module) - sum(blocks) + sum(blocks[:2])

        return cls(tensor_bytes(text_encoder), tensor_bytes(transformer), tensor_bytes(vae),
                   streamed(text_encoder), streamed(transformer))  # fmt: skip


# ------------------------------------------------------------------------------------------------ phases


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a call: the weights resident during it and the bytes its work adds at its peak."""

    name: str
    weights: int
    work: int

    @property
    def peak(self) -> int:
        return self.weights + self.work


def _latent_grid(config: Any, size: CallSize, spatial: int, temporal: int) -> tuple[int, int, int]:
    """(latent frames with the temporal patch's padding, latent height, latent width) of a call."""
    pt = config.patch_size_t or 1
    frames = -(-((size.frames - 1) // temporal + 1) // pt) * pt
    return frames, size.height // spatial, size.width // spatial


def call_state_bytes(config: Any, size: CallSize, dtype: torch.dtype, spatial: int, temporal: int) -> int:
    """What a call keeps between its phases: the prompt embeddings (negative ones too when guided) and the
    latents (with the image condition)."""
    frames, h, w = _latent_grid(config, size, spatial, temporal)
    embeds = (2 if size.guided else 1) * size.batch * size.text_length * config.text_embed_dim
    return (embeds + size.batch * frames * config.in_channels * h * w) * element_size(dtype)


def transformer_step_bytes(config: Any, size: CallSize, dtype: torch.dtype, spatial: int, temporal: int) -> int:
    """Peak bytes one denoising step adds to the call's state: the transformer's activations over its batch
    (doubled by guidance), and the loop's latent copies (model input and output, guidance halves, sampler state:
    six)."""
    batch = size.batch * (2 if size.guided else 1)
    frames, h, w = _latent_grid(config, size, spatial, temporal)
    tokens = frames // (config.patch_size_t or 1) * (h // config.patch_size) * (w // config.patch_size)
    tokens += size.text_length
    element = element_size(dtype)
    activations = TRANSFORMER_STEP_FACTOR * ACTIVATION_MARGIN * batch * tokens * config.inner_dim * element
    latents = 6 * batch * frames * config.in_channels * h * w * element
    return int(activations + latents)


def text_encode_bytes(config: Any, size: CallSize, dtype: torch.dtype) -> int:
    """Peak bytes of encoding the prompts (and, when guided, the negative prompts: their embeddings kept)."""
    element = element_size(dtype)
    work = TEXT_ENCODE_FACTOR * ACTIVATION_MARGIN * size.prompts * size.text_length * config.d_model * element
    kept = (2 if size.guided else 1) * size.prompts * size.text_length * config.d_model * element
    return int(work + kept)


def _vae_phase(
    kind: str, vae: Any, size: CallSize, budget: int | None, latent_channels: int, tiles: bool, slices: bool
) -> tuple[str, int]:
    """(VAE mode, bytes) of the encode or decode of this call within ``budget`` (see ``choose_vae_mode``)."""
    spatial, temporal = vae.spatial_compression, vae.temporal_compression
    if kind == "encode":
        frames = 1 if size.encode == "image" else size.frames
        shape = (1, 3, frames, size.height, size.width)  # the pipeline encodes one image or video at a time
        estimate = lambda tile, sliced: vae_encode_bytes(vae, shape, tile=tile, sliced=sliced)  # noqa: E731
        return choose_vae_mode(estimate, vae, 1, budget, tiles=tiles, slices=slices)
    shape = (size.batch, latent_channels, (size.frames - 1) // temporal + 1, size.height // spatial,
             size.width // spatial)  # fmt: skip
    estimate = lambda tile, sliced: vae_decode_bytes(vae, shape, tile=tile, sliced=sliced)  # noqa: E731
    return choose_vae_mode(estimate, vae, size.batch, budget, tiles=tiles, slices=slices)


# ------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """A chosen plan: the offload ``mode``, how the VAE encodes and decodes, where each component lives, and the
    estimated peak of each phase against ``capacity`` (the free memory; None where unknown). ``fits`` is False
    when even this plan's estimate exceeds the capacity. ``chosen_by``: ``"auto"``, ``"memory='model'"`` (asked
    for by name) or ``"the pipeline's switches"`` (an estimate of the offload the user switched on)."""

    mode: str
    size: CallSize
    phases: tuple[Phase, ...]
    vae_encode: str | None
    vae_decode: str | None
    capacity: int | None
    device: str
    chosen_by: str = "auto"

    @property
    def forced(self) -> bool:
        return self.chosen_by != "auto"

    @property
    def peak(self) -> int:
        return max(phase.peak for phase in self.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda phase: phase.peak).name

    @property
    def headroom(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.peak

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= self.capacity

    @property
    def places(self) -> dict[str, str]:
        device = self.device
        visits = f"host memory; visits {device} while it runs"
        streamed = f"host memory; its blocks stream to {device} two at a time"
        return {
            "none": {"text_encoder": device, "transformer": device, "vae": device},
            "text": {"text_encoder": visits, "transformer": device, "vae": device},
            "model": {"text_encoder": visits, "transformer": visits, "vae": visits},
            "sequential": {"text_encoder": streamed, "transformer": streamed, "vae": visits},
        }[self.mode]

    def summary(self) -> str:
        """The one log line: the plan, the call size, the peak and the headroom."""
        vae = f"VAE decode {self.vae_decode}" if self.vae_decode else "no decode"
        if self.vae_encode:
            vae += f", encode {self.vae_encode}"
        free = "" if self.capacity is None else (
            f" of {format_bytes(self.capacity)} free ({'+' if self.headroom >= 0 else ''}"
            f"{format_bytes(self.headroom)} headroom)"
        )  # fmt: skip
        return (f"memory plan {self.mode!r} ({MODE_NAMES[self.mode]}; {vae}) for {self.size}: expected peak "
                f"{format_bytes(self.peak)} while {self.peak_phase}{free}")  # fmt: skip

    def __repr__(self) -> str:
        lines = [f"MemoryPlan({self.mode!r}: {MODE_NAMES[self.mode]}; chosen by {self.chosen_by})",
                 f"  call: {self.size}"]  # fmt: skip
        lines += [f"  {name}: {place}" for name, place in self.places.items()]
        lines.append(f"  VAE: encode {self.vae_encode or '-'}, decode {self.vae_decode or '-'}")
        lines += [f"  {p.name}: {format_bytes(p.peak)} ({format_bytes(p.weights)} weights + {format_bytes(p.work)} "
                  "work)" for p in self.phases]  # fmt: skip
        free = "unknown (no limit)" if self.capacity is None else format_bytes(self.capacity)
        room = "" if self.capacity is None else f", headroom {format_bytes(self.headroom)}"
        lines.append(f"  peak {format_bytes(self.peak)} while {self.peak_phase}; free {free}{room}")
        return "\n".join(lines)


def plan_for_mode(
    mode: str,
    text_encoder: Any,
    transformer: Any,
    vae: Any,
    size: CallSize,
    capacity: int | None,
    *,
    device: str = "cuda",
    vae_budget: int | None = None,
    weights: Weights | None = None,
    chosen_by: str = "auto",
    tiles: bool = True,
    slices: bool = True,
) -> MemoryPlan:
    """The plan of offload ``mode`` for a call of ``size`` (components may live on the meta device); ``tiles``:
    whether the VAE may tile (else only its exact modes are tried); ``slices``: whether it may decode one video at
    a time (False with ``tiles`` False: the VAE runs as it is set)."""
    weights = weights or Weights.of(text_encoder, transformer, vae)
    t5, dit, ae = weights.text_encoder, weights.transformer, weights.vae
    resident = {  # weights on the device during (prompt encode, VAE encode, denoise, decode)
        "none": (t5 + dit + ae,) * 4,
        "text": (t5 + dit + ae, dit + ae, dit + ae, dit + ae),
        "model": (t5, ae, dit, ae),
        "sequential": (weights.text_encoder_streamed, ae, weights.transformer_streamed, ae),
    }[mode]
    config = transformer.config
    spatial, temporal = vae.spatial_compression, vae.temporal_compression
    dtype = transformer.dtype
    text_dtype = getattr(text_encoder, "dtype", dtype)
    phases = [Phase("encoding the prompt", resident[0], text_encode_bytes(text_encoder.config, size, text_dtype))]
    state = call_state_bytes(config, size, dtype, spatial, temporal)

    def budget(weights_now: int) -> int | None:
        if vae_budget is not None:
            return vae_budget
        left = None if capacity is None else capacity - weights_now - state
        if mode == "sequential":
            left = SEQUENTIAL_VAE_BUDGET if left is None else min(left, SEQUENTIAL_VAE_BUDGET)
        return left

    encode_mode = decode_mode = None
    if size.encode:
        encode_mode, need = _vae_phase("encode", vae, size, budget(resident[1]), config.output_channels, tiles, slices)
        phases.append(Phase(f"encoding the {size.encode}", resident[1], state + need))
    phases.append(
        Phase("denoising", resident[2], state + transformer_step_bytes(config, size, dtype, spatial, temporal))
    )
    if size.decodes:
        decode_mode, need = _vae_phase("decode", vae, size, budget(resident[3]), config.output_channels, tiles, slices)
        phases.append(Phase("decoding", resident[3], state + need))
    return MemoryPlan(mode, size, tuple(phases), encode_mode, decode_mode, capacity, device, chosen_by)


def candidates(modes: tuple[str, ...] = MODES) -> list[tuple[str, bool]]:
    """(mode, VAE may tile) in the order "auto" tries them: the exact plans first (the reference's untiled VAE,
    or one video at a time), fastest mode first, then the same modes with a tiled VAE, sequential offload last.
    A tiled VAE blends its tiles at the seams (a different video) and redoes the overlaps (~1/3 more decode work),
    while offloading T5 or the whole model costs one host-to-device copy per call (~0.4-0.5 s for the 5B on PCIe
    4); sequential offload copies every block at every step."""
    fast = [m for m in modes if m != "sequential"]
    order = [(m, False) for m in fast] + [(m, True) for m in fast]
    return order + ([("sequential", True)] if "sequential" in modes else [])


def plan_memory(
    text_encoder: Any,
    transformer: Any,
    vae: Any,
    size: CallSize,
    capacity: int | None,
    *,
    memory: str = "auto",
    modes: tuple[str, ...] = MODES,
    device: str = "cuda",
    vae_budget: int | None = None,
    vae_may_tile: bool = True,
) -> MemoryPlan:
    """The plan named by ``memory``, or for ``"auto"`` the first of :func:`candidates` (over ``modes``) whose peak
    fits ``capacity`` (the last one, not fitting, when none does: the caller says so). ``vae_may_tile=False``: the
    VAE never tiles or slices on its own (``pipe.set_vae_memory_budget(auto_tiling=False)``)."""
    check_plan_name(memory)
    weights = Weights.of(text_encoder, transformer, vae)
    options = {"device": device, "vae_budget": vae_budget, "weights": weights}
    # The VAE's automatic modes follow pipe.set_vae_memory_budget(auto_tiling=...): off, it runs as it is set.
    options["slices"] = vae_may_tile
    if memory != "auto":
        return plan_for_mode(memory, text_encoder, transformer, vae, size, capacity, chosen_by=f"memory={memory!r}",
                             tiles=vae_may_tile, **options)  # fmt: skip
    for mode, tiles in candidates(modes):
        plan = plan_for_mode(mode, text_encoder, transformer, vae, size, capacity, tiles=tiles and vae_may_tile,
                             **options)  # fmt: skip
        if plan.fits:
            return plan
    return plan
