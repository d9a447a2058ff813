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

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import request
from .cache import StepCache
from .denoise import ModelFn, denoise, diffusers_callback
from .distributed import ParallelConfig, ParallelInference
from .latents import LatentCodec
from .loading import PIPELINE_FILES, check_dtype, is_control, is_image_to_video, resolve_pretrained
from .memory import MemoryManager, require_device
from .memory_plan import CallSize, check_plan_name
from .processing import image_to_tensor, postprocess_video, video_to_tensor
from .protocols import Sampler, check_sampler
from .request import default_fps
from .samplers import choose_sampler, randn
from .samplers.noise import Generator
from .switches import PipelineSwitches, fail_together_when_parallel
from .text import T5Encoder, T5Tokenizer
from .threads import intra_op_threads, pass_flops, threads_for_call
from .transformer import Transformer
from .vae import VAE

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineOutput:
    """``frames``: ``np`` ``[B, F, H, W, 3]`` floats in [0, 1]; ``pt`` ``[B, F, 3, H, W]``; ``pil`` a list of
    lists of PIL images; ``latent`` the final latents ``[B, F', C, H/8, W/8]`` (1.5: with the leading pad frame,
    as the reference returns them).

    In Jupyter, an output that ends a cell shows its videos inline, each with its prompt (:func:`cogvideox.show`);
    ``fps`` is the model's (8 for 1.0, 16 for 1.5) and ``prompts`` the prompt of each video (None: embeddings)."""

    frames: Any
    fps: int = 8
    prompts: list[str] | None = None

    def _repr_html_(self) -> str | None:
        """The videos as HTML (None for latents, or for the ranks that get no frames under parallel inference:
        Jupyter then shows the plain repr)."""
        if self.frames is None or self.output_is_latent():
            return None
        from .display import show

        return show(self.frames, fps=self.fps, prompts=self.prompts)._repr_html_()

    def output_is_latent(self) -> bool:
        """True when ``frames`` holds latents (``output_type="latent"``: 16 channels, not pixels)."""
        frames = self.frames
        return isinstance(frames, torch.Tensor) and frames.ndim == 5 and frames.shape[2] not in (1, 3)


class Pipeline(PipelineSwitches):
    """Text-, image- and video-to-video generation with one CogVideoX checkpoint.

    Build with :meth:`from_pretrained`, or from ready components (a research fork swapping one module).
    """

    source: str | None = None  # what from_pretrained loaded, for repr (None: built from components)
    #: intra-op CPU threads for a call: None chooses per call (one thread for tiny models, cogvideox/threads.py),
    #: "all" keeps the process's torch.get_num_threads(), an int forces that count
    cpu_threads: int | str | None = None

    def __init__(
        self,
        transformer: Transformer,
        vae: VAE,
        text_encoder: T5Encoder,
        tokenizer: T5Tokenizer,
        sampler: Sampler,
        *,
        image_to_video: bool | None = None,
        control: bool = False,
    ) -> None:
        check_sampler(sampler)
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.sampler = sampler
        config = transformer.config
        # An I2V transformer takes noise and image latents joined on the channel axis, a CogVideoX-Fun control
        # transformer noise and control-video latents: the same count, so control must be declared (model_index).
        self.control = bool(control)
        inferred = config.in_channels == 2 * config.output_channels and not self.control
        self.image_to_video = inferred if image_to_video is None else image_to_video
        if self.image_to_video and self.control:
            raise ValueError("a pipeline is image-to-video or CogVideoX-Fun control, not both")
        conditioned = self.image_to_video or self.control
        takes = 2 * config.output_channels if conditioned else config.output_channels
        if config.in_channels != takes:
            kind = "an image-to-video" if self.image_to_video else "a control" if self.control else "a text-to-video"
            extra = " + image latents" if self.image_to_video else " + control-video latents" if self.control else ""
            raise ValueError(
                f"the transformer takes {config.in_channels} input channels for {config.output_channels} output "
                f"channels; {kind} pipeline gives it {takes} (noise{extra}). Checkpoints with another conditioning "
                "(CogVideoX-Fun inpainting: noise + mask + masked-video latents) are not supported"
            )
        self.progress_bar_config: dict[str, Any] = {}
        self._interrupt = False
        self.memory = MemoryManager()
        self.parallel: ParallelInference | None = None  # see enable_parallel
        self.step_cache: StepCache | None = None  # see enable_cache
        self.set_cpu_linear("onednn")  # faster float32 CPU products; the same F.linear elsewhere (set_cpu_linear)

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path | None = None,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        sampler: str | Sampler | None = None,
        transformer: Transformer | None = None,
        vae: VAE | None = None,
        text_encoder: T5Encoder | None = None,
        tokenizer: T5Tokenizer | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        text_encoder_offload: bool | None = None,
        memory: str | None = None,
        parallel: ParallelConfig | None = None,
        **sampler_overrides: Any,
    ) -> Pipeline:
        """Load every component of a published pipeline folder (local path or hub id) onto ``device``.

        Without ``path_or_hub_id``, the tiny demo model bundled with the package (:mod:`cogvideox.demo`), which
        draws coloured shapes moving on 32x32 frames from prompts like "a red circle moves to the right".

        Args:
            dtype: weights and computation dtype (bfloat16 recommended on GPUs; float16 only for CogVideoX-2B), or
                its name (``"bfloat16"``, ``"bf16"``, ...). float8 is refused: see ``enable_fp8_weight_storage``.
            sampler: ``"ddim"`` or ``"dpm"`` (the checkpoint's schedule), or a sampler object (anything with the
                :class:`cogvideox.protocols.Sampler` methods, e.g. a fork's flow-matching sampler); default the
                class the checkpoint's ``scheduler_config.json`` names.
            transformer, vae, text_encoder, tokenizer: ready components used instead of loading those.
            revision, cache_dir, local_files_only, token: for a hub id, as in ``huggingface_hub.snapshot_download``
                (``token``: for gated or private repositories; default the saved login or ``HF_TOKEN``).
            memory: where the components live (docs/usage.md, "Memory plan"): ``"auto"`` (the default on CUDA)
                picks the fastest plan whose estimated peak fits the free GPU memory and re-checks it at each call;
                ``"none"`` (everything resident), ``"text"`` (the text encoder visits the GPU to encode),
                ``"model"`` or ``"sequential"`` (CPU offload) forces one. With a plan the weights load into host
                memory first and move as the plan says; ``pipe.memory_plan`` shows it. Default elsewhere: no plan,
                everything on ``device``.
            text_encoder_offload: ``True`` is ``memory="text"``, ``False`` is ``memory="none"`` (older spelling).
            parallel: run on several processes (torchrun; see :meth:`enable_parallel` and docs/distributed.md).
            sampler_overrides: scheduler config fields to change, e.g. ``timestep_spacing="trailing"`` (not with
                a sampler object: configure that one yourself).
        """
        require_device(torch.device(device), "device=")  # before minutes of loading
        memory = _memory_setting(memory, text_encoder_offload, torch.device(device))
        demo = path_or_hub_id is None
        if demo:
            from .demo import demo_model_path

            path_or_hub_id = demo_model_path()
        root = resolve_pretrained(
            path_or_hub_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            token=token, allow_patterns=PIPELINE_FILES,
        )  # fmt: skip
        # Everything that can be refused is checked before any weights load.
        image_to_video = is_image_to_video(root)  # model_index.json; None: inferred from the transformer
        control = is_control(root)
        sampler = choose_sampler(sampler, root / "scheduler", **sampler_overrides)
        dtype = check_dtype(dtype)
        given = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}
        where = _where_to_load(root, dtype, memory, torch.device(device), given, image_to_video=image_to_video,
                               control=control, parallel=parallel is not None)  # fmt: skip
        transformer = transformer or Transformer.from_pretrained(root / "transformer", dtype=dtype,
                                                                 device=where["transformer"])  # fmt: skip
        vae = vae or VAE.from_pretrained(root / "vae", dtype=dtype, device=where["vae"])
        text_encoder = text_encoder or T5Encoder.from_pretrained(root / "text_encoder", dtype=dtype,
                                                                 device=where["text_encoder"])  # fmt: skip
        tokenizer = tokenizer or T5Tokenizer.from_pretrained(root / "tokenizer")
        pipe = cls(transformer, vae, text_encoder, tokenizer, sampler, image_to_video=image_to_video, control=control)
        pipe.source = "the bundled demo model" if demo else str(path_or_hub_id)
        if parallel is not None:  # first: the plan then keeps to the modes parallel inference allows
            pipe.enable_parallel(parallel)
        if memory is not None:
            pipe.set_memory_plan(memory, device)
        return pipe

    def __repr__(self) -> str:
        """The model, where it computes, and the switches that are on: what a notebook shows for ``pipe``."""
        from .lora import loaded_adapters

        config = self.transformer.config
        task = ("image-to-video" if self.image_to_video else "CogVideoX-Fun control video" if self.control
                else "text-to-video / video-to-video")  # fmt: skip
        lines = [
            f"Pipeline({self.source or type(self.transformer).__name__}: {task}, "
            f"{getattr(config, 'num_layers', '?')} layers, {self.dtype}, {self.device})",
            f"  sampler: {type(self.sampler).__name__}",
        ]
        switches = []
        if self.memory.setting is not None:
            plan = self.memory.plan
            switches.append(f"memory plan {self.memory.setting!r}" + (f" ({plan.mode})" if plan is not None else ""))
        elif self.memory.mode is not None:
            switches.append(f"{self.memory.mode} CPU offload")
        adapters = loaded_adapters(self.transformer) if isinstance(self.transformer, torch.nn.Module) else {}
        if adapters:
            switches.append("LoRA " + ", ".join(f"{name} ({weight})" for name, weight in adapters.items()))
        if self.step_cache is not None:
            switches.append(f"step cache {self.step_cache!r}")
        if self.parallel is not None:
            switches.append(repr(self.parallel))
        lines.append("  switches: " + ("; ".join(switches) if switches else "none"))
        return "\n".join(lines)

    def set_sampler(self, kind: str | Sampler, **overrides: Any) -> None:
        """Switch between ``"ddim"`` and ``"dpm"`` (keeping the schedule), e.g. the official demo's
        ``set_sampler("dpm", timestep_spacing="trailing")``; or use a sampler object of your own."""
        self.sampler = choose_sampler(kind, getattr(self.sampler, "config", None), **overrides)

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
        if max_sequence_length is None:
            max_sequence_length = self.transformer.config.max_text_seq_length
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

    @property
    def latent_codec(self) -> LatentCodec:
        """The latent contract of this pipeline's transformer and VAE (scaling, layout, 1.5 padding, ofs)."""
        return LatentCodec.for_models(self.transformer.config, self.vae)

    def _image_condition(self, images: list, req: request.Request, generator: Generator) -> torch.Tensor:
        """I2V conditioning ``[B, F' + pad, C, h, w]``: each image encoded with its own generator (the reference
        encodes image i with ``generator[i]``), zero frames after, one row per video."""
        self.memory.activate("vae")
        codec = self.latent_codec
        encoded = torch.cat([
            self._encode_fitting(image_to_tensor(img, req.height, req.width)[None, :, None],
                                 lambda x, i=i: codec.encode_image(x, _nth(generator, i), dtype=self.dtype))
            for i, img in enumerate(images)
        ]).to(self.device)  # fmt: skip
        condition = codec.image_condition(encoded, req.shape[1])
        condition = condition.expand(req.num_prompts, -1, -1, -1, -1) if len(images) == 1 else condition
        return condition.repeat_interleave(req.batch // req.num_prompts, dim=0)

    def prepare_latents(
        self,
        req: request.Request,
        timesteps: torch.Tensor,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The starting latents ``req.shape`` and the I2V condition (None for t2v / v2v), in the pipeline's dtype.

        Random numbers are drawn in the reference's order: image encodes, then the noise (t2v, i2v); the video
        encode, then the noise (v2v). Caller's ``latents`` replace the noise (v2v: the noised video)."""
        device, dtype, sampler = self.device, self.dtype, self.sampler
        condition = None
        if req.task == "i2v":
            condition = self._image_condition(req.images, req, generator)
        if latents is not None:
            latents = latents.to(device, dtype)
        elif req.task == "control":  # the noise first, then the control video (its encode draws no numbers)
            latents = randn(req.shape, generator=generator, device=device, dtype=dtype)
        elif req.task == "v2v":
            encoded = self._encode_frames(req, generator=_nth(generator, 0))
            noise = randn(req.shape, generator=generator, device=device, dtype=dtype)
            clean = encoded.expand(req.batch, -1, -1, -1, -1)
            latents = sampler.add_noise(clean, noise, timesteps[:1].repeat(req.batch))
        else:
            latents = randn(req.shape, generator=generator, device=device, dtype=dtype)
        if req.task == "control":
            condition = self._control_condition(req)
        return latents * sampler.init_noise_sigma, condition

    def _control_condition(self, req: request.Request) -> torch.Tensor:
        """CogVideoX-Fun's control latents ``[B, F' + pad, C, h, w]``: the control video encoded to the posterior's
        mean (no random numbers, as the reference), scaled, one row per video."""
        return self._encode_frames(req, mode=True).expand(req.batch, -1, -1, -1, -1)

    def _encode_frames(self, req: request.Request, *, generator: Generator = None, mode: bool = False) -> torch.Tensor:
        """The request's video frames (v2v input, control video, video to invert) as scaled latents ``[1, F' + pad,
        C, h, w]`` on the pipeline's device: a posterior sample with ``generator``, or its mean with ``mode``."""
        self.memory.activate("vae")
        pixels = video_to_tensor(req.video_frames, req.height, req.width)[None]
        encode = functools.partial(self.latent_codec.encode_video, generator=generator, dtype=self.dtype, mode=mode)
        return self._encode_fitting(pixels, encode).to(self.device)

    def _model_fn(self, guided: bool, *, cached: bool = True) -> ModelFn:
        """The transformer as the denoising loop's model callable (with ``ofs`` for 1.5-I2V), wrapped by the step
        cache (unless ``cached`` is False: inversion computes every step) and for guidance parallelism when those
        are on."""
        ofs = self.latent_codec.ofs(1, self.device, self.dtype)
        model = functools.partial(self.transformer, ofs=ofs) if ofs is not None else self.transformer
        if self.step_cache is not None and cached:  # inside the guidance split: the cache sees its rank's work
            model = self.step_cache.wrap_model(model)
        return model if self.parallel is None else self.parallel.wrap_model(model, guided)

    # ------------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    @fail_together_when_parallel
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
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        riflex: bool = False,
        riflex_k: int | None = None,
        riflex_frames: int | None = None,
        control_video: Any = None,
    ) -> PipelineOutput | tuple:
        """Generate videos. Arguments carry diffusers' names and meanings (docs/usage.md lists where we differ).

        Every argument is checked before any model runs (:func:`cogvideox.request.resolve`); a bad one is a
        ValueError or TypeError naming the value and the rule.

        Args:
            prompt: one text or a list (a batch). Optional when ``prompt_embeds`` is given.
            negative_prompt: what guidance steers away from; one text for all prompts or one per prompt
                (default: the empty text). Ignored without guidance.
            image: image-to-video (I2V checkpoints only): a path, PIL image, ``np`` array ``[H, W, 3]`` (uint8
                0..255 or float 0..1) or tensor; one image for every prompt, or a list with one per prompt.
            video: video-to-video (text-to-video checkpoints): a path, a list of frames, or an array
                ``[F, H, W, 3]``; the first ``num_frames`` frames are used.
            strength: video-to-video only, in (0, 1]: how much of the schedule runs (1: from pure noise).
            height, width: pixels, multiples of 16. Default: the checkpoint's trained size (480x720 for 1.0
                models, 768x1360 for CogVideoX 1.5; 1.5 I2V: from the image's aspect ratio; the demo 32x32).
            num_frames: ``4k + 1`` frames (the trained counts are 8N+1 for 1.0, 16N+1 for 1.5; others warn).
                Default: the checkpoint's ``sample_frames`` (49; 81 for 1.5; the demo 9).
            num_inference_steps: sampler steps (default 50; video-to-video runs ``strength`` of them).
            guidance_scale: classifier-free guidance weight, a finite number >= 0 (default 6.0); 1 or less turns
                guidance off and halves the work.
            use_dynamic_cfg: CogVideoX's cosine schedule of the guidance scale over the steps (default off, as in
                diffusers; the official ``cli_demo.py`` turns it on), computed from the raw timestep value as the
                reference does.
            num_videos_per_prompt: videos per prompt, adjacent in the batch (``[p0, p0, p1, p1]``); diffusers
                silently makes it 1.
            eta: DDIM's noise weight (0: deterministic).
            generator: a ``torch.Generator`` (or one per video) for reproducible noise; the same seed gives the
                reference pipeline's video.
            latents: starting noise ``[B, F', C, H/8, W/8]`` instead of drawing it (checked for shape and NaN).
            prompt_embeds, negative_prompt_embeds: text-encoder outputs ``[B, L, 4096]`` instead of prompts.
            output_type: ``"pil"`` (default: lists of PIL images), ``"np"`` (``[B, F, H, W, 3]`` floats in
                [0, 1]), ``"pt"`` (``[B, F, 3, H, W]``) or ``"latent"`` (the final latents).
            return_dict: False returns ``(frames,)``.
            callback_on_step_end: ``callback(pipe, step, timestep, tensors) -> dict`` after each step, with the
                tensors named in ``callback_on_step_end_tensor_inputs`` (``latents``, ``prompt_embeds``,
                ``negative_prompt_embeds``); returned tensors replace them. Set ``pipe.interrupt = True`` to stop.
            max_sequence_length: prompt tokens; default the transformer's ``max_text_seq_length`` (226 for every
                published model; the bundled demo model was trained on 12).
            riflex: RIFLEx length extrapolation (models with 3D RoPE; docs/editing.md): lowers the intrinsic
                temporal RoPE frequency so that e.g. CogVideoX-5B makes 97 frames (twice its 49) without
                training. ``riflex_k``: the component (default 2, the published 5B setting; required for 1.5);
                ``riflex_frames``: the length the frequency is set for (default ``num_frames``; 97 for
                thu-ml/CogVideoX-RIFLEx-diffusers, fine-tuned at that setting). Either implies ``riflex=True``.
            control_video: CogVideoX-Fun control checkpoints only (required there): the pose / depth / edge video
                (a path or a list of frames, ``4k + 1`` of them) whose latents join the noise on the channel axis;
                it sets ``num_frames``, ``height`` and ``width`` (explicit values must equal its own).

        Returns:
            :class:`PipelineOutput` with ``.frames`` (rank 0 only under parallel inference; None elsewhere).

        Switches that change how a call runs, not its arguments: offload (``enable_model_cpu_offload``), step
        caching (``enable_cache``), LoRA (``load_lora``), several GPUs (``enable_parallel``); ``repr(pipe)``
        shows which are on.
        """
        req = request.resolve(
            self.transformer.config, self.latent_codec, image_to_video=self.image_to_video, prompt=prompt,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            image=image, video=video, strength=strength, height=height, width=width, num_frames=num_frames,
            guidance_scale=guidance_scale,
            num_videos_per_prompt=num_videos_per_prompt, latents=latents, output_type=output_type,
            callback_tensors=callback_on_step_end_tensor_inputs, max_sequence_length=max_sequence_length,
            control=self.control, control_video=control_video,
        )  # fmt: skip
        riflex_setting = request.resolve_riflex(
            self.transformer.config, req.num_frames, temporal=self.latent_codec.temporal, riflex=riflex, k=riflex_k,
            frames=riflex_frames,
        )  # fmt: skip
        if riflex_setting is not None and not hasattr(self.transformer, "set_riflex"):
            raise TypeError(f"riflex: {type(self.transformer).__name__} has no set_riflex((k, frames)) method")
        request.check_dtypes(
            self.transformer, self.vae, self.device, decodes=req.task != "t2v" or output_type != "latent"
        )
        # A tiny model runs faster on one CPU thread, and much faster on a busy machine (cogvideox/threads.py).
        threads = threads_for_call(self.device, self._pass_flops(req), self.cpu_threads)
        with intra_op_threads(threads):
            sampler = self.sampler
            if req.task == "v2v":
                timesteps, num_steps = sampler.timesteps_for_strength(num_inference_steps, req.strength, self.device)
            else:
                timesteps, num_steps = sampler.set_timesteps(num_inference_steps, self.device), num_inference_steps
            split = self.parallel is not None and self.parallel.guidance is not None and req.guided
            if self.step_cache is not None:  # before the first collective: a refusal here tears nothing down
                self.step_cache.check_parallel(split)
            if self.memory.setting is not None:
                # Re-plan for this call's size after every check (a refused call moves no weights), before any
                # work. The execution device is the plan's in every mode, so the timesteps stay where they are.
                self._follow_plan(_call_size(req, output_type), at_call=True)
            if self.step_cache is not None:
                self.step_cache.reduce = None if self.parallel is None else self.parallel.sum_over_ranks
                self.step_cache.begin_call(timesteps.tolist(), req.guided)
            if self.parallel is not None:  # every rank draws the same numbers (DPM noise too)
                generator = self.parallel.generator(generator)
            previous_riflex = getattr(self.transformer, "riflex", None)
            progress = None
            # From the first component's forward on, a failure (out of memory while T5 encodes, say) must still send
            # the components back to the host: an offload's hooks left half-way would break the next call.
            try:
                positive, negative = self.encode_prompt(
                    req.prompts, negative_prompt, do_classifier_free_guidance=req.guided, prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=req.max_sequence_length,
                )  # fmt: skip
                # Videos per prompt are adjacent: [p0, p0, p1, p1] (the reference forces num_videos_per_prompt to 1).
                per_prompt = req.batch // req.num_prompts
                positive = positive.repeat_interleave(per_prompt, dim=0)
                negative = None if negative is None else negative.repeat_interleave(per_prompt, dim=0)
                latents, condition = self.prepare_latents(req, timesteps, generator, latents)
                embeds = torch.cat([negative, positive]) if req.guided else positive
                if self.parallel is not None:
                    latents, condition, embeds = self.parallel.same_on_every_rank(latents, condition, embeds)

                self._interrupt = False
                quiet = {} if self.parallel is None or self.parallel.is_main else {"disable": True}
                progress = tqdm(total=len(timesteps), **{"desc": "denoising", **self.progress_bar_config, **quiet})
                callback = None
                if callback_on_step_end is not None:
                    callback = diffusers_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                                  negative)  # fmt: skip
                if riflex_setting is not None:
                    self.transformer.set_riflex(riflex_setting)
                latents = denoise(
                    self._model_fn(req.guided), sampler, latents, timesteps, embeds, guidance_scale=req.guidance_scale,
                    dynamic_guidance=use_dynamic_cfg, num_steps=num_steps, condition=condition, generator=generator,
                    eta=eta, callback=callback, interrupted=lambda: self._interrupt, on_step_end=progress.update,
                )  # fmt: skip
                if output_type == "latent":
                    frames = latents
                else:
                    video = self.decode_latents(latents, num_pad_frames=req.pad_frames)  # None off rank 0 when parallel
                    frames = None if video is None else postprocess_video(video, output_type)
            finally:
                if riflex_setting is not None:
                    self.transformer.set_riflex(previous_riflex)
                if progress is not None:
                    progress.close()
                if self.step_cache is not None:
                    self.step_cache.end_call()
                self.memory.release()  # components go back to the host even when a step fails
            if not return_dict:
                return (frames,)
            prompts = None if req.prompts is None else [p for p in req.prompts for _ in range(per_prompt)]
            return PipelineOutput(frames=frames, fps=default_fps(self.transformer.config), prompts=prompts)

    def _pass_flops(self, req: request.Request) -> float:
        """FLOPs of one transformer pass of this call (guidance batch included), for the thread rule."""
        config = self.transformer.config
        _, frames, _, height, width = req.shape
        p, pt = config.patch_size, config.patch_size_t or 1
        tokens = -(-frames // pt) * (height // p) * (width // p) + req.max_sequence_length
        batch = req.batch * (2 if req.guided else 1)
        return pass_flops(config.inner_dim, config.num_layers, tokens, batch)

    # ------------------------------------------------------------------------------------------------ inversion

    @torch.no_grad()
    @fail_together_when_parallel
    def invert(
        self,
        video: Any,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        fixed_point_iterations: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
    ) -> torch.Tensor:
        """DDIM inversion (:mod:`cogvideox.inversion`, docs/editing.md): the starting latents from which
        ``pipe(prompt, latents=..., num_inference_steps=N, guidance_scale=w)`` regenerates ``video``; regenerate
        with another prompt to edit it. Text-to-video checkpoints, with the DDIM sampler
        (``pipe.set_sampler("ddim")``).

        Args:
            video: a path or a list of frames (the first ``num_frames``, default the longest 4k+1 prefix), resized
                to ``height x width`` (default: the checkpoint's size), encoded to the posterior's mean.
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_sequence_length: as in a call;
                usually the prompt that describes the video.
            num_inference_steps: the DDIM steps; regenerate with the same number.
            guidance_scale: guidance of the model outputs while inverting (default 1: none, the most faithful
                reconstruction); regenerating with the same weight and prompt gives the video back.
            fixed_point_iterations: extra model passes per step that solve each inverse step for the model output
                at its own result (0: plain DDIM inversion).
        Returns:
            ``[B, F' + pad, C, H/8, W/8]`` latents in the pipeline's dtype (``B``: one per prompt).
        """
        from .inversion import invert, require_ddim

        sampler = require_ddim(self.sampler)
        if self.image_to_video or self.control:
            raise ValueError(
                "invert() works with text-to-video checkpoints; this one is "
                f"{'image-to-video' if self.image_to_video else 'a CogVideoX-Fun control model'}"
            )
        iterations = request.as_int(fixed_point_iterations, "fixed_point_iterations", "0 or more")
        if iterations < 0:
            raise ValueError(f"fixed_point_iterations={fixed_point_iterations}: must be 0 or more")
        req = request.resolve(
            self.transformer.config, self.latent_codec, image_to_video=False, prompt=prompt,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            image=None, video=video, strength=1.0, height=height, width=width, num_frames=num_frames,
            guidance_scale=guidance_scale, num_videos_per_prompt=1, latents=None, output_type="latent",
            callback_tensors=(), max_sequence_length=max_sequence_length,
        )  # fmt: skip
        request.check_dtypes(self.transformer, self.vae, self.device, decodes=True)
        threads = threads_for_call(self.device, self._pass_flops(req), self.cpu_threads)
        with intra_op_threads(threads):
            timesteps = sampler.set_timesteps(num_inference_steps, self.device)
            if self.memory.setting is not None:  # after every check, as in a call
                self._follow_plan(_call_size(req, "latent"), at_call=True)
            positive, negative = self.encode_prompt(
                req.prompts, negative_prompt, do_classifier_free_guidance=req.guided, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=req.max_sequence_length,
            )  # fmt: skip
            embeds = torch.cat([negative, positive]) if req.guided else positive
            clean = self._encode_frames(req, mode=True)
            if self.parallel is not None:  # rank 0's encode and embeddings everywhere, as in a call
                clean, _, embeds = self.parallel.same_on_every_rank(clean, None, embeds)
            clean = clean.expand(req.batch, -1, -1, -1, -1)
            progress = tqdm(total=len(timesteps), **{"desc": "inverting", **self.progress_bar_config})
            try:
                model = self._model_fn(req.guided, cached=False)
                return invert(model, sampler, clean, timesteps, embeds, guidance_scale=req.guidance_scale,
                              fixed_point_iterations=iterations, on_step_end=progress.update)  # fmt: skip
            finally:
                progress.close()
                self.memory.release()

    # ------------------------------------------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, num_pad_frames: int = 0) -> torch.Tensor | None:
        """Model latents ``[B, F' + pad, C, h, w]`` -> video ``[B, 3, F, H, W]`` in about [-1, 1], the first
        ``num_pad_frames`` (CogVideoX 1.5's temporal padding) dropped. Parallel: tiles are decoded on every rank
        and the video comes back on rank 0 only (None elsewhere)."""
        z = self.latent_codec.to_vae(latents, num_pad_frames)
        self.memory.activate("vae")
        decode = self.vae.decode if self.parallel is None else functools.partial(self.parallel.decode, self.vae)
        mode = self.memory.vae_mode(self.vae, "decode", tuple(z.shape), self.vae.device)
        if self.parallel is not None:  # free memory differs between ranks: the smallest mode any rank needs
            if self.parallel.any_rank(mode == "tiled"):
                mode = "tiled"
            elif self.parallel.any_rank(mode == "sliced"):
                mode = "sliced"
        with _vae_running(self.vae, mode):
            return decode(z.to(self.vae.device, self.vae.dtype))

    def _encode_fitting(self, pixels: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``encode(pixels)`` (``[B, 3, F, H, W]``) with the VAE sliced or tiled when the budget asks for it."""
        mode = self.memory.vae_mode(self.vae, "encode", tuple(pixels.shape), self.vae.device)
        with _vae_running(self.vae, mode):
            return encode(pixels)


@contextlib.contextmanager
def _vae_running(vae: Any, mode: str) -> Iterator[None]:
    """For one encode or decode: ``"sliced"`` (one video at a time) or ``"tiled"`` (and one video at a time);
    ``"untiled"`` leaves the VAE as its user set it. The VAE's own switches are restored after."""
    if mode == "untiled":
        yield
        return
    tiling, slicing = vae.use_tiling, vae.use_slicing
    vae.enable_slicing()
    if mode == "tiled":
        vae.enable_tiling()
    try:
        yield
    finally:
        if not tiling:
            vae.disable_tiling()
        if not slicing:
            vae.disable_slicing()


def _call_size(req: request.Request, output_type: str) -> CallSize:
    """What a checked call asks of memory (:mod:`cogvideox.memory_plan`)."""
    encode = {"i2v": "image", "v2v": "video", "control": "video"}.get(req.task)
    return CallSize(req.batch, req.num_frames, req.height, req.width, guided=req.guided, prompts=req.num_prompts,
                    text_length=req.max_sequence_length, encode=encode, decodes=output_type != "latent")  # fmt: skip


def _nth(generator: Generator, index: int) -> torch.Generator | None:
    """The generator for batch element ``index``: the reference encodes image i with ``generator[i]``."""
    return generator[min(index, len(generator) - 1)] if isinstance(generator, (list, tuple)) else generator


_LOADERS = {"transformer": Transformer, "vae": VAE, "text_encoder": T5Encoder}


def _where_to_load(
    root: Path,
    dtype: torch.dtype | None,
    memory: str | None,
    device: torch.device,
    given: dict[str, Any],
    *,
    image_to_video: bool | None,
    control: bool,
    parallel: bool,
) -> dict[str, torch.device]:
    """Where ``from_pretrained`` loads each component. Without a plan: on ``device``. Under a plan on a GPU: where
    the plan for a default call keeps it, estimated from the configs before any weight is read, so that a
    component that stays on the GPU loads straight there (shard by shard: the host holds one shard at a time, not
    the whole model) and one that waits in host memory loads there (never onto the GPU and back: 9 GB of T5-XXL
    under text-encoder offload). ``set_memory_plan`` then re-plans with the loaded components and moves whatever
    the two plans disagree on. When the plan cannot be estimated (a fork's components without the configs the
    estimate reads), everything loads into host memory, as before the plan existed."""
    host = torch.device("cpu")
    if memory is None:
        return dict.fromkeys(_LOADERS, device)
    if device.type != "cuda" or dtype is None:  # None: the files' dtypes, which the configs do not give
        return dict.fromkeys(_LOADERS, host)
    from .memory import free_device_bytes
    from .memory_plan import MODES, default_call_size, plan_memory

    try:
        parts = {name: given[name] if given[name] is not None else loader.from_pretrained(root / name, dtype=dtype,
                                                                                             device="meta")
                 for name, loader in _LOADERS.items()}  # fmt: skip
        config = parts["transformer"].config
        if image_to_video is None:  # as the pipeline infers it (see __init__)
            image_to_video = config.in_channels == 2 * config.output_channels and not control
        size = default_call_size(config, parts["vae"], image_to_video=image_to_video)
        modes = ("none", "text") if parallel else MODES
        plan = plan_memory(parts["text_encoder"], parts["transformer"], parts["vae"], size, free_device_bytes(device),
                           memory=memory, modes=modes, device=str(device))  # fmt: skip
    except (AttributeError, TypeError):
        return dict.fromkeys(_LOADERS, host)
    resident = {"none": set(_LOADERS), "text": {"transformer", "vae"}}.get(plan.mode, set())
    return {name: device if name in resident else host for name in _LOADERS}


def _memory_setting(memory: str | None, text_encoder_offload: bool | None, device: torch.device) -> str | None:
    """The plan ``from_pretrained`` follows: ``memory`` as given, the older ``text_encoder_offload`` spelling, or
    "auto" on CUDA (None elsewhere: everything stays on ``device``). Checked before any weights load."""
    if memory is not None and text_encoder_offload is not None:
        raise ValueError(
            f"memory={memory!r} and text_encoder_offload={text_encoder_offload}: pass one of them "
            "(text_encoder_offload=True is memory='text', False is memory='none')"
        )
    if text_encoder_offload is not None:
        return "text" if text_encoder_offload else "none"
    if memory is None:
        return "auto" if device.type == "cuda" else None
    return check_plan_name(memory)
