"""``Pipeline``: prompt (+ image or video) -> video, composed from the library's modules.

    prompts -> T5Tokenizer -> T5Encoder -> text embeddings [B, 226, 4096]
    noise (t2v) | noise + image latents (i2v) | noised video latents (v2v)   [B, F', 16, H/8, W/8]
    for t in timesteps: Transformer -> guidance (CFG, dynamic CFG) -> sampler step
    latents -> VAE.decode -> frames

The call takes diffusers' argument names and meanings, and with the same ``torch.Generator`` seed it gives the
same video as diffusers' ``CogVideoXPipeline``, ``CogVideoXImageToVideoPipeline`` and
``CogVideoXVideoToVideoPipeline``: random numbers are drawn in the same order and shapes. Where the reference is
wrong for users we differ, and say so in docs/usage.md: ``num_videos_per_prompt`` really gives that many videos,
sizes are checked against what the model can do, 1.5 video-to-video pads an odd latent count instead of failing.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import request
from .distributed import ParallelConfig, ParallelInference
from .loading import resolve_pretrained
from .memory import MemoryPlan
from .processing import OUTPUT_TYPES, image_to_tensor, postprocess_video, to_pil, video_frames_for_v2v, video_to_tensor
from .samplers import Sampler, SamplerState, classifier_free_guidance, dynamic_guidance_scale, make_sampler, randn
from .text import T5Encoder, T5Tokenizer
from .transformer import Transformer
from .vae import VAE

logger = logging.getLogger(__name__)

I2V_PIPELINE_CLASSES = ("CogVideoXImageToVideoPipeline",)
CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")
HUB_FILES = (
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
)
NAN_CHECK_EVERY = 5  # steps between the host syncs that check the latents are finite


@dataclasses.dataclass
class PipelineOutput:
    """``frames``: ``np`` ``[B, F, H, W, 3]`` floats in [0, 1]; ``pt`` ``[B, F, 3, H, W]``; ``pil`` a list of
    lists of PIL images; ``latent`` the final latents ``[B, F', C, H/8, W/8]`` (1.5: with the leading pad frame,
    as the reference returns them)."""

    frames: Any


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


def _fail_together_when_parallel(call: Callable) -> Callable:
    """Under parallel inference, an error on any rank ends the call on every rank (cogvideox.distributed)."""

    @functools.wraps(call)
    def guarded(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        if self.parallel is None:
            return call(self, *args, **kwargs)
        with self.parallel.guard():
            return call(self, *args, **kwargs)

    return guarded


class Pipeline:
    """Text-, image- and video-to-video generation with one CogVideoX checkpoint.

    Build with :meth:`from_pretrained`, or from ready components (a research fork swapping one module).
    """

    def __init__(
        self,
        transformer: Transformer,
        vae: VAE,
        text_encoder: T5Encoder,
        tokenizer: T5Tokenizer,
        sampler: Sampler,
        *,
        image_to_video: bool | None = None,
    ) -> None:
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.sampler = sampler
        config = transformer.config
        # An I2V transformer takes noise and image latents joined on the channel axis.
        inferred = config.in_channels == 2 * config.output_channels
        self.image_to_video = inferred if image_to_video is None else image_to_video
        self.progress_bar_config: dict[str, Any] = {}
        self._interrupt = False
        self.memory = MemoryPlan()
        self.parallel: ParallelInference | None = None  # see enable_parallel

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        sampler: str | None = None,
        transformer: Transformer | None = None,
        vae: VAE | None = None,
        text_encoder: T5Encoder | None = None,
        tokenizer: T5Tokenizer | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        text_encoder_offload: bool | None = None,
        parallel: ParallelConfig | None = None,
        **sampler_overrides: Any,
    ) -> Pipeline:
        """Load every component of a published pipeline folder (local path or hub id) onto ``device``.

        Without ``path_or_hub_id``, the tiny demo model bundled with the package (:mod:`cogvideox.demo`), which
        draws coloured shapes moving on 32x32 frames from prompts like "a red circle moves to the right".

        Args:
            dtype: weights and computation dtype (bfloat16 recommended on GPUs; float16 only for CogVideoX-2B).
            sampler: ``"ddim"`` or ``"dpm"``; default the checkpoint's ``scheduler_config.json``.
            transformer, vae, text_encoder, tokenizer: ready components used instead of loading those.
            text_encoder_offload: keep the text encoder in host memory between encodes (see
                :meth:`enable_text_encoder_offload`); default: on when ``device`` is a CUDA device.
            parallel: run on several processes (torchrun; see :meth:`enable_parallel` and docs/distributed.md).
            sampler_overrides: scheduler config fields to change, e.g. ``timestep_spacing="trailing"``.
        """
        if path_or_hub_id is None:
            from .demo import demo_model_path

            path_or_hub_id = demo_model_path()
        root = resolve_pretrained(
            path_or_hub_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=HUB_FILES,
        )  # fmt: skip
        components = {"dtype": dtype, "device": device}
        transformer = transformer or Transformer.from_pretrained(root / "transformer", **components)
        vae = vae or VAE.from_pretrained(root / "vae", **components)
        text_encoder = text_encoder or T5Encoder.from_pretrained(root / "text_encoder", **components)
        tokenizer = tokenizer or T5Tokenizer.from_pretrained(root / "tokenizer")
        scheduler = make_sampler(root / "scheduler", kind=sampler, **sampler_overrides)
        index = root / "model_index.json"
        image_to_video = None
        if index.is_file():
            image_to_video = json.loads(index.read_text()).get("_class_name") in I2V_PIPELINE_CLASSES
        pipe = cls(transformer, vae, text_encoder, tokenizer, scheduler, image_to_video=image_to_video)
        if text_encoder_offload is None:
            text_encoder_offload = torch.device(device).type == "cuda"
        if text_encoder_offload:
            pipe.enable_text_encoder_offload(device)
        if parallel is not None:
            pipe.enable_parallel(parallel)
        return pipe

    def set_sampler(self, kind: str, **overrides: Any) -> None:
        """Switch between ``"ddim"`` and ``"dpm"`` (keeping the schedule), e.g. the official demo's
        ``set_sampler("dpm", timestep_spacing="trailing")``."""
        self.sampler = make_sampler(self.sampler.config, kind=kind, **overrides)

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

    def disable_cpu_offload(self) -> None:
        """Remove the offload hooks; the components stay in host memory (move them with ``.to(device)``)."""
        self.memory.disable()

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
        if self.memory.mode in _OFFLOAD_MODES_REFUSED_WITH_PARALLEL:
            raise ValueError(_offload_with_parallel_message(self.memory.mode))
        self.disable_parallel()
        config = config or ParallelConfig(ulysses_degree=ulysses_degree, cfg_degree=cfg_degree)
        self.parallel = ParallelInference(self.transformer, config, group, timeout=timeout)
        return self.parallel

    def disable_parallel(self) -> None:
        """Back to single-process calls (the process groups stay; destroy them with torch.distributed)."""
        if self.parallel is not None:
            self.parallel.release()
            self.parallel = None

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the denoising loop, e.g. ``disable=True``."""
        self.progress_bar_config = dict(kwargs)

    @property
    def device(self) -> torch.device:
        return self.memory.execution_device(self.transformer.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def interrupt(self) -> bool:
        """Set to True (e.g. from ``callback_on_step_end``) to stop denoising after the current step."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    # ---------------------------------------------------------------------------------------------- prompts

    @torch.no_grad()
    def encode_text(self, prompts: list[str], max_sequence_length: int | None = None) -> torch.Tensor:
        """``[len(prompts), max_sequence_length, d_model]`` in the pipeline dtype. The reference runs T5 on the
        padded ids without an attention mask; so do we, for parity. The length defaults to the transformer's
        ``max_text_seq_length`` (226 for every published model)."""
        max_sequence_length = max_sequence_length or self.transformer.config.max_text_seq_length
        ids = self.tokenizer(prompts, max_length=max_sequence_length).input_ids
        embeds = self.text_encoder(ids.to(self.text_encoder.device))
        return embeds.to(device=self.device, dtype=self.dtype)

    def encode_prompt(
        self,
        prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        do_classifier_free_guidance: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(positive, negative) embeddings, one row per prompt; the negative prompt defaults to ``""``."""
        prompts = request.as_prompt_list(prompt)
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt= and prompt_embeds=")
        if prompt_embeds is None:
            prompt_embeds = self.encode_text(prompts, max_sequence_length)
        batch = prompt_embeds.shape[0]
        if not do_classifier_free_guidance:
            return prompt_embeds.to(self.device, self.dtype), None
        if negative_prompt_embeds is None:
            negatives = request.as_prompt_list(
                negative_prompt if negative_prompt is not None else "", "negative_prompt"
            )
            if len(negatives) == 1 and batch > 1:
                negatives = negatives * batch
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts: give one, or one per prompt")
            negative_prompt_embeds = self.encode_text(negatives, max_sequence_length)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match prompt_embeds "
                f"{tuple(prompt_embeds.shape)}"
            )
        return prompt_embeds.to(self.device, self.dtype), negative_prompt_embeds.to(self.device, self.dtype)

    # ---------------------------------------------------------------------------------------------- latents

    def _encode_pixels(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """``[3, F, H, W]`` in [-1, 1] -> unscaled latents ``[1, F', C, H/8, W/8]``, sampled with ``generator``
        exactly as the reference does (one encode per batch element, in order)."""
        self.memory.activate("vae")
        posterior = self.vae.encode(pixels[None].to(self.vae.device, self.vae.dtype))
        return posterior.sample(generator=generator).to(self.device, self.dtype).permute(0, 2, 1, 3, 4)

    def _image_latents(self, images: list, height: int, width: int, num_latent_frames: int, generator) -> torch.Tensor:
        """I2V conditioning ``[len(images), num_latent_frames, C, h, w]``: the encoded image, then zero frames."""
        encoded = [
            self._encode_pixels(image_to_tensor(img, height, width)[:, None], _nth(generator, index))
            for index, img in enumerate(images)
        ]
        latents = torch.cat(encoded)
        factor = self.vae.scaling_factor
        # 1.5 divides by the factor: "the CogVideoX team forgot to multiply during training" (reference pipeline).
        latents = (1 / factor) * latents if self.vae.invert_scale_latents else factor * latents
        padding = latents.new_zeros(latents.shape[0], num_latent_frames - 1, *latents.shape[2:])
        return torch.cat([latents, padding], dim=1)

    # ------------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    @_fail_together_when_parallel
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        image: Any = None,
        video: Any = None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
    ) -> PipelineOutput | tuple:
        """Generate videos; arguments as diffusers' CogVideoX pipelines (see docs/usage.md).

        ``image`` selects image-to-video (I2V checkpoints only), ``video`` video-to-video with ``strength``.
        ``max_sequence_length`` defaults to the transformer's ``max_text_seq_length`` (226, diffusers' default,
        for every published model; the bundled demo model was trained on fewer tokens).
        """
        config = self.transformer.config
        max_sequence_length = max_sequence_length or config.max_text_seq_length
        mode = request.Mode.resolve(self.image_to_video, image, video)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt}: must be a positive integer")
        unknown = set(callback_on_step_end_tensor_inputs) - set(CALLBACK_TENSORS)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)}: allowed {CALLBACK_TENSORS}")
        prompts = request.as_prompt_list(prompt)
        if prompts is None and prompt_embeds is None:
            raise ValueError("pass prompt= (a string or a list of strings) or prompt_embeds=")

        # Sizes and frame counts, checked before any model runs.
        images = video_frames = None
        image_size = None
        if mode.name == "i2v":
            images = [to_pil(i) for i in (image if isinstance(image, (list, tuple)) else [image])]
            image_size = images[0].size
        if mode.name == "v2v":
            video_frames = video_frames_for_v2v(video, num_frames)
            num_frames = len(video_frames)
        default_h, default_w = request.default_size(config, image_size)
        height, width = height or default_h, width or default_w
        num_frames = num_frames or request.default_num_frames(config)
        request.check_size(height, width, config)
        request.check_num_frames(num_frames, config)
        request.check_text_length(max_sequence_length, config)
        if mode.name == "v2v" and not 0 < strength <= 1:
            raise ValueError(f"strength={strength}: must be in (0, 1] (1 ignores the input video)")
        if self.dtype == torch.float16 and config.use_rotary_positional_embeddings:
            logger.warning(
                "float16 with a CogVideoX 5B / 1.5 model: they were trained in bfloat16 and often give NaN or "
                "black frames in float16; use dtype=torch.bfloat16 (or float32)"
            )

        if (
            self.vae.dtype == torch.float16
            and self.device.type == "cpu"
            and (mode.name != "t2v" or output_type != "latent")
        ):
            raise ValueError(
                "float16 on the CPU: the VAE cannot run in half precision there; use dtype=torch.float32 (or "
                "bfloat16) on the CPU, or a GPU"
            )
        num_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if images is not None and len(images) not in (1, num_prompts):
            raise ValueError(f"{len(images)} images for {num_prompts} prompts: give one image, or one per prompt")

        do_cfg = guidance_scale > 1.0
        if self.parallel is not None:  # every rank draws the same numbers (DPM noise too)
            generator = self.parallel.generator(generator)
        positive, negative = self.encode_prompt(
            prompts, negative_prompt, do_classifier_free_guidance=do_cfg, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length,
        )  # fmt: skip
        # Videos per prompt are adjacent: [p0, p0, p1, p1] (the reference forces num_videos_per_prompt to 1).
        positive = positive.repeat_interleave(num_videos_per_prompt, dim=0)
        negative = None if negative is None else negative.repeat_interleave(num_videos_per_prompt, dim=0)
        batch = positive.shape[0]

        device, dtype, sampler = self.device, self.dtype, self.sampler
        if mode.name == "v2v":
            timesteps, num_steps = sampler.timesteps_for_strength(num_inference_steps, strength, device)
        else:
            timesteps, num_steps = sampler.set_timesteps(num_inference_steps, device), num_inference_steps

        latent_frames = (num_frames - 1) // request.VAE_TEMPORAL + 1
        pt = config.patch_size_t or 1
        pad_frames = (pt - latent_frames % pt) % pt  # 1.5: an odd latent count gets one leading pad frame
        shape = (batch, latent_frames + pad_frames, config.output_channels,
                 height // request.VAE_SPATIAL, width // request.VAE_SPATIAL)  # fmt: skip

        image_latents = None
        if mode.name == "i2v":
            image_latents = self._image_latents(images, height, width, shape[1], generator)
            image_latents = image_latents.expand(num_prompts, -1, -1, -1, -1) if len(images) == 1 else image_latents
            image_latents = image_latents.repeat_interleave(num_videos_per_prompt, dim=0)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents of shape {tuple(latents.shape)}: this call needs {shape}")
            latents = latents.to(device, dtype)
        elif mode.name == "v2v":
            encoded = self._encode_pixels(video_to_tensor(video_frames, height, width), _nth(generator, 0))
            encoded = self.vae.scaling_factor * encoded
            if pad_frames:  # the reference refuses odd latent counts for 1.5; we pad as 1.5 t2v does
                encoded = torch.cat([encoded[:, :1].expand(-1, pad_frames, -1, -1, -1), encoded], dim=1)
            noise = randn(shape, generator=generator, device=device, dtype=dtype)
            latents = sampler.add_noise(encoded.expand(batch, -1, -1, -1, -1), noise, timesteps[:1].repeat(batch))
        else:
            latents = randn(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * sampler.init_noise_sigma

        embeds = torch.cat([negative, positive]) if do_cfg else positive
        split = None  # guidance parallel: this rank computes one branch, the predictions are combined per step
        if self.parallel is not None:
            latents, image_latents, embeds = self.parallel.same_on_every_rank(latents, image_latents, embeds)
            split = self.parallel.guidance_split(do_cfg)
        batched_cfg = do_cfg and split is None
        ofs = torch.full((1,), 2.0, device=device, dtype=dtype) if config.ofs_embed_dim else None
        timesteps_host = [int(t) for t in timesteps.cpu()]  # one sync, before the loop
        state = SamplerState()
        first_nonfinite = torch.full((), -1, device=device)
        self._interrupt = False
        quiet = {} if self.parallel is None or self.parallel.is_main else {"disable": True}
        progress = tqdm(total=len(timesteps_host), **{"desc": "denoising", **self.progress_bar_config, **quiet})
        try:
            for i, t in enumerate(timesteps_host):
                if self._interrupt:
                    break
                model_input = torch.cat([latents, latents]) if batched_cfg else latents
                model_input = sampler.scale_model_input(model_input, t)
                if image_latents is not None:
                    condition = torch.cat([image_latents, image_latents]) if batched_cfg else image_latents
                    model_input = torch.cat([model_input, condition], dim=2)
                step_embeds = embeds if split is None else split.local_half(embeds)
                timestep = timesteps[i].expand(model_input.shape[0])
                prediction = self.transformer(model_input, step_embeds, timestep, ofs=ofs)
                prediction = prediction if split is None else split.combine(prediction)
                prediction = prediction.float()
                if do_cfg:
                    scale = dynamic_guidance_scale(guidance_scale, t, num_steps) if use_dynamic_cfg else guidance_scale
                    uncond, cond = prediction.chunk(2)
                    prediction = classifier_free_guidance(uncond, cond, scale)
                result = sampler.step(prediction, t, latents, state, generator=generator, eta=eta)
                latents, state = result.prev_sample.to(dtype), result.state

                # Finite check without a host sync per step: remember the first bad step, look every few steps.
                bad = ~torch.isfinite(latents).all()
                first_nonfinite = torch.where(bad & (first_nonfinite < 0), i, first_nonfinite)
                if (i + 1) % NAN_CHECK_EVERY == 0 or i == len(timesteps_host) - 1:
                    self._raise_if_nonfinite(first_nonfinite, timesteps_host)

                if callback_on_step_end is not None:
                    # As diffusers: the timestep as a tensor, and prompt_embeds is the batch the transformer sees
                    # ([negative; positive] under guidance); returning it replaces that batch.
                    tensors = {"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": negative}
                    chosen = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, timesteps[i], chosen) or {}
                    latents = outputs.get("latents", latents)
                    embeds = outputs.get("prompt_embeds", embeds)
                    if do_cfg and "negative_prompt_embeds" in outputs:
                        negative = outputs["negative_prompt_embeds"]
                        embeds = torch.cat([negative, embeds[negative.shape[0] :]])
                progress.update()
            self._raise_if_nonfinite(first_nonfinite, timesteps_host)

            if output_type == "latent":
                frames = latents
            else:
                video = self.decode_latents(latents[:, pad_frames:])  # None on ranks other than 0 when parallel
                frames = None if video is None else postprocess_video(video, output_type)
        finally:
            progress.close()
            self.memory.release()  # components go back to the host even when a step fails
        return PipelineOutput(frames=frames) if return_dict else (frames,)

    # ------------------------------------------------------------------------------------------------ helpers

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Model latents ``[B, F', C, h, w]`` -> video ``[B, 3, F, H, W]`` in about [-1, 1]. Parallel: tiles are
        decoded on every rank and the video comes back on rank 0 only (None elsewhere)."""
        z = (1 / self.vae.scaling_factor) * latents.permute(0, 2, 1, 3, 4)
        self.memory.activate("vae")
        decode = self.vae.decode if self.parallel is None else functools.partial(self.parallel.decode, self.vae)
        needs_tiling = self.memory.decode_needs_tiling(self.vae, tuple(z.shape), self.vae.device)
        if self.parallel is not None:  # free memory differs between ranks: tile everywhere if any rank must
            needs_tiling = self.parallel.any_rank(needs_tiling)
        if not needs_tiling:
            return decode(z.to(self.vae.device, self.vae.dtype))
        self.vae.enable_tiling()
        try:
            return decode(z.to(self.vae.device, self.vae.dtype))
        finally:
            self.vae.disable_tiling()

    @staticmethod
    def _raise_if_nonfinite(first_nonfinite: torch.Tensor, timesteps: list[int]) -> None:
        step = int(first_nonfinite)
        if step >= 0:
            raise FloatingPointError(
                f"the latents became NaN or infinite at step {step} (timestep {timesteps[step]}); in float16 this "
                "is a known failure of CogVideoX 5B / 1.5: use dtype=torch.bfloat16 or torch.float32"
            )

    # ------------------------------------------------------------------------------------------------ LoRA

    def load_lora(
        self, path_or_hub_id: str | Path, adapter_name: str | None = None, scale: float = 1.0, **kwargs: Any
    ) -> str:
        """Load a transformer LoRA (diffusers/peft or SAT layout) and activate it with weight ``scale``; returns
        its name. ``kwargs``: ``allow_pickle``, ``revision``, ``cache_dir``. See :mod:`cogvideox.lora`."""
        from . import lora

        return lora.load_lora(self.transformer, path_or_hub_id, adapter_name, scale, **kwargs)

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

        lora.unload_lora(self.transformer)


def _nth(generator: torch.Generator | list[torch.Generator] | None, index: int) -> torch.Generator | None:
    """The generator for batch element ``index``: the reference encodes image i with ``generator[i]``."""
    return generator[min(index, len(generator) - 1)] if isinstance(generator, (list, tuple)) else generator
