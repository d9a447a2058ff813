"""The CogVideoX denoising transformer (all five published variants).

    latents [B, F, C, H, W], text embeddings [B, L, D_text], timestep [B] (and ofs [B] for 1.5-I2V)
      -> patch + text embedding           video [B, S, D], text [B, L, D]   (S = F/pt * H/p * W/p)
      -> + 3D sin-cos (2B) or learned (5B-I2V) positions; 3D RoPE inside attention (5B, 1.5)
      -> N blocks conditioned on the time (+ ofs) embedding
      -> final norm, adaptive norm, projection, un-patchify -> [B, F, C_out, H, W]

The variant is read from the config alone: ``patch_size_t`` (1.5), ``use_rotary_positional_embeddings``,
``use_learned_positional_embeddings`` (5B-I2V), ``ofs_embed_dim`` (1.5-I2V), ``in_channels`` (32 for I2V).
Position tables are computed from the input shape and cached per (shape, device); callers never pass them.
The forward pass never reads a device value on the host (no ``.item()``, no branch on values, no per-call host
tensors), so it compiles whole with ``fullgraph=True`` (with a step cache installed, :mod:`cogvideox.cache`, the
block loop is the cache's and runs outside compiled graphs: compile the blocks). Opt-in switches:
:meth:`Transformer.fuse_qkv_projections` and :meth:`Transformer.enable_fp8_weight_storage` (costs and measurements
in docs/performance.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..configs import TransformerConfig
from ..loading import load_component
from ..lora.layers import LoraLinear
from ..offload import require_not_streamed
from ..ops.fp8 import linears_to_fp8_
from ..ops.linear import is_plain_linear
from ..rope import fold_sign, rotary_tables, sincos_3d, timestep_sinusoids
from .block import TransformerBlock
from .patch import PatchEmbed

logger = logging.getLogger(__name__)


class TimestepMLP(nn.Module):
    """``Linear -> SiLU -> Linear`` on a sinusoidal embedding; keys ``linear_1``, ``linear_2``."""

    def __init__(self, in_dim: int, out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(out_dim, out_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class OutputNorm(nn.Module):
    """Adaptive LayerNorm before the output projection: ``linear`` gives (shift, scale), in that order."""

    def __init__(self, cond_dim: int, dim: int, *, elementwise_affine: bool, eps: float, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class Transformer(nn.Module):
    """CogVideoX 3D transformer. Keys and shapes are the published ``transformer/`` ones."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        dim = config.inner_dim
        factory = {"device": device, "dtype": dtype}
        self.patch_embed = PatchEmbed(config, **factory)
        self.time_embedding = TimestepMLP(dim, config.time_embed_dim, **factory)
        self.ofs_embedding = (
            TimestepMLP(config.ofs_embed_dim, config.ofs_embed_dim, **factory) if config.ofs_embed_dim else None
        )
        self.transformer_blocks = nn.ModuleList([TransformerBlock(config, **factory) for _ in range(config.num_layers)])
        self.norm_final = nn.LayerNorm(dim, config.norm_eps, config.norm_elementwise_affine, **factory)
        self.norm_out = OutputNorm(
            config.time_embed_dim,
            dim,
            elementwise_affine=config.norm_elementwise_affine,
            eps=config.norm_eps,
            **factory,
        )
        patch_volume = config.patch_size * config.patch_size * (config.patch_size_t or 1)
        self.proj_out = nn.Linear(dim, patch_volume * config.output_channels, **factory)
        self.gradient_checkpointing = False
        # Ulysses hooks (cogvideox.distributed.enable_sequence_parallel): shard the video tokens before the blocks,
        # gather the projected output after. A plain object, not a submodule.
        self.sequence_parallel = None
        # Step cache (cogvideox.cache, set by set_step_cache): decides per denoising step which blocks run.
        self.step_cache = None
        # RIFLEx (set_riflex): (k, latent frames) of the lowered temporal RoPE frequency, None for the plain tables.
        self.riflex: tuple[int, int] | None = None
        # Position tables keyed by (kind, frames, height, width, device): plain state, rebuilt on demand.
        self._position_cache: dict[tuple, object] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_pickle: bool = False,
        **hub_kwargs,
    ) -> Transformer:
        """Load from a ``transformer/`` folder, a pipeline folder that contains one, or a hub id.

        Weights go straight into ``dtype`` on ``device`` (default: the file's dtype, on the CPU).
        ``hub_kwargs``: ``revision``, ``cache_dir``, ``local_files_only``, ``token``.
        """
        return load_component(
            cls, TransformerConfig, path_or_hub_id, "transformer",
            dtype=dtype, device=device, allow_pickle=allow_pickle, **hub_kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------ speed and memory switches

    def fuse_qkv_projections(self) -> None:
        """Run each block's q, k and v projections as one matrix product (``attn1.to_qkv``).

        Call it after loading (loading goes shard by shard, and one block's q/k/v may sit in different shards).
        It works one block at a time, so it never holds a second copy of the model. Results are bitwise those
        of the unfused model in float32 on the CPU; ``state_dict()`` still gives the published ``to_q/k/v`` keys.

        Order: fuse before ``load_lora()``, ``enable_fp8_weight_storage()`` and sequential CPU offload. After the
        first two it raises TypeError, after the third RuntimeError; every block is checked before any is fused,
        so a refused call changes nothing.
        """
        pending = [block.attn1 for block in self.transformer_blocks if not block.attn1.is_fused]
        for attn in pending:
            attn.check_fuse_qkv()
        if pending:
            require_not_streamed(self, "fuse_qkv_projections()")
        for attn in pending:
            attn.fuse_qkv()

    def unfuse_qkv_projections(self) -> None:
        """Undo :meth:`fuse_qkv_projections`. Raises, changing nothing, while a LoRA wraps a fused ``to_qkv``
        (TypeError: ``unload_lora()`` first) or sequential CPU offload streams the blocks (RuntimeError)."""
        pending = [block.attn1 for block in self.transformer_blocks if block.attn1.is_fused]
        for attn in pending:
            attn.check_unfuse_qkv()
        if pending:
            require_not_streamed(self, "unfuse_qkv_projections()")
        for attn in pending:
            attn.unfuse_qkv()

    def enable_fp8_weight_storage(self, *, modulation: bool = True) -> list[str]:
        """Keep the blocks' linear weights in float8_e4m3fn with a per-row power-of-two scale, cast to the
        compute dtype when each layer runs (see :mod:`cogvideox.ops.fp8`). One way: reload to undo.

        Quantized: attention q/k/v (or fused qkv) and output, the feed-forward; with ``modulation=True`` also
        the blocks' adaptive-norm projections (``norm1/norm2.linear``, 14 % of the 5B's weights). Kept in the
        compute dtype: norms, patch, text, time and position embeddings, the final norm and ``proj_out``.
        Weight memory falls from 2 bytes to about 1 per quantized weight. ``state_dict()`` then holds fp8
        ``weight`` and int8 ``weight_exponent`` keys, not the published bf16 weights. Returns the layer names.

        Order: after ``fuse_qkv_projections()``; before or after loading LoRA adapters, but not while one is fused
        (``unfuse_lora()`` could not restore fp8 weights) and not while sequential CPU offload streams the blocks.
        Both raise RuntimeError and change nothing.
        """
        blocks = self.transformer_blocks
        fused = [name for name, m in blocks.named_modules() if isinstance(m, LoraLinear) and m.is_fused]
        if fused:
            raise RuntimeError(
                f"enable_fp8_weight_storage() while a LoRA is fused into the weights of {len(fused)} layers (e.g. "
                f"transformer_blocks.{fused[0]}): unfuse_lora() restores the saved full-precision weights, which it "
                "cannot write into fp8 layers. Call unfuse_lora() first (unfused adapters run on top of fp8 layers), "
                "or unload_lora() to bake the fused LoRA in for good, then enable fp8 weight storage"
            )
        if any(is_plain_linear(m) for m in blocks.modules()):
            require_not_streamed(self, "enable_fp8_weight_storage()")

        def include(name: str, layer: nn.Linear) -> bool:
            return modulation or not name.endswith(("norm1.linear", "norm2.linear"))

        return [
            f"transformer_blocks.{index}.{name}"
            for index, block in enumerate(self.transformer_blocks)
            for name in linears_to_fp8_(block, include)
        ]

    # ------------------------------------------------------------------ slots for offload and parallelism

    def offload_blocks(self) -> nn.ModuleList:
        """The repeated transformer blocks: what sequential offload streams one at a time (the rest of the model,
        about 1 % of the 5B's weights, moves as a whole)."""
        return self.transformer_blocks

    def set_sequence_parallel(self, hooks: object | None) -> None:
        """Install Ulysses hooks (:mod:`cogvideox.distributed`), or remove them with None: the model shards its
        video tokens before the blocks and gathers after, and every attention layer exchanges heads through them."""
        self.sequence_parallel = hooks
        for block in self.transformer_blocks:
            block.attn1.sequence_parallel = hooks

    def set_step_cache(self, cache: object | None) -> None:
        """Install a step cache (:mod:`cogvideox.cache`), or remove it with None. Each forward then hands the
        block loop to ``cache.run_blocks(run, video, text, temb)``, which may run all blocks, some, or none
        (reusing what it kept from earlier steps). A plain object, not a submodule."""
        self.step_cache = cache

    def set_riflex(self, setting: tuple[int, int] | None) -> None:
        """RIFLEx length extrapolation (:mod:`cogvideox.rope.rotary`): ``(k, latent_frames)`` gives temporal RoPE
        component ``k`` (1-based) the frequency ``0.9 * 2 pi / latent_frames``; None restores the trained tables.
        Only for models with 3D RoPE (not CogVideoX-2B's sin-cos tables)."""
        if setting is not None:
            if not self.config.use_rotary_positional_embeddings:
                raise ValueError(
                    "RIFLEx changes the temporal frequency of 3D rotary position embeddings; this model has none "
                    "(CogVideoX-2B uses sin-cos position tables), so it cannot extrapolate this way"
                )
            k, latent_frames = setting
            components = self.config.attention_head_dim // 8  # temporal part: head_dim / 4 channels, in pairs
            if not 1 <= k <= components or latent_frames < 1:
                raise ValueError(
                    f"RIFLEx (k={k}, latent frames={latent_frames}): k must be 1..{components} (the temporal RoPE "
                    "components of this model) and the frame count positive"
                )
        self.riflex = setting

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    # ------------------------------------------------------------------ positions

    def _training_grid(self) -> tuple[int, int, int]:
        """(frames, height, width) of the patch grid the model was trained on, from its config."""
        c = self.config
        latent_frames = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
        return latent_frames, c.sample_height // c.patch_size, c.sample_width // c.patch_size

    def _rotary(
        self, text_len: int, frames: int, height: int, width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) ``[text_len + S, 1, hd]`` float32 tables for :func:`rotate_pairs`: identity rows
        (cos 1, sin 0) for the text tokens, which the reference leaves unrotated, then the video's 3D RoPE.
        Padding the text rows lets attention rotate the joined sequence instead of slicing and re-joining it;
        the identity is exact (``x * 1 + y * 0 == x``)."""
        key = ("rope", text_len, frames, height, width, device, self.riflex)
        if key not in self._position_cache:
            _, base_h, base_w = self._training_grid()
            grid = "crop" if self.config.patch_size_t is None else "slice"
            if grid == "slice" and (height > base_h or width > base_w):
                logger.warning(
                    "patch grid %dx%d exceeds the training grid %dx%d of sample_height/sample_width: RoPE "
                    "positions extrapolate (the reference pipeline fails at this size)",
                    height, width, base_h, base_w,
                )  # fmt: skip
            cos, sin = rotary_tables(
                self.config.attention_head_dim, frames, height, width,
                grid=grid, base_height=base_h, base_width=base_w, device=device, riflex=self.riflex,
            )  # fmt: skip
            sin = fold_sign(sin)  # rotate_pairs takes the minus sign of the rotation from the table
            cos = torch.cat([cos.new_ones(text_len, cos.shape[1]), cos])
            sin = torch.cat([sin.new_zeros(text_len, sin.shape[1]), sin])
            self._position_cache[key] = (cos[:, None, :], sin[:, None, :])
        return self._position_cache[key]

    def _sincos(self, frames: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = ("sincos", frames, height, width, device)
        if key not in self._position_cache:
            c = self.config
            self._position_cache[key] = sincos_3d(
                c.inner_dim, frames, height, width,
                spatial_interpolation_scale=c.spatial_interpolation_scale,
                temporal_interpolation_scale=c.temporal_interpolation_scale,
                device=device,
            )  # fmt: skip
        return self._position_cache[key]

    def _add_absolute_positions(
        self, text: torch.Tensor, video: torch.Tensor, grid: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the 2B's sin-cos table or the 5B-I2V's learned table (text and video parts)."""
        c = self.config
        frames, height, width = grid
        learned = self.patch_embed.pos_embedding
        if learned is not None and grid == self._training_grid():
            table = learned.to(video.dtype)
            return text + table[:, : text.shape[1]], video + table[:, text.shape[1] :]
        if learned is not None:
            # The reference replaces the learned table by a sin-cos one when only the frame count differs;
            # kept for seed parity. Quality is known to drop away from 49 frames (CogVideo #680).
            logger.warning(
                "%d latent frames differ from the %d this model learned positions for: using sin-cos positions, "
                "as the reference does (expect lower quality)", frames, self._training_grid()[0],
            )  # fmt: skip
        if c.use_rotary_positional_embeddings and learned is None:
            return text, video
        # The sin-cos table is zero on text tokens, so only the video part is added.
        return text, video + self._sincos(frames, height, width, video.device).to(video.dtype)

    # ------------------------------------------------------------------ forward

    def _check_inputs(
        self, latents: torch.Tensor, text_embeds: torch.Tensor, timestep: torch.Tensor, ofs: torch.Tensor | None
    ) -> None:
        c = self.config
        p, pt = c.patch_size, c.patch_size_t or 1
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, F, C, H, W], got shape {tuple(latents.shape)}")
        batch, frames, channels, height, width = latents.shape
        if channels != c.in_channels:
            image_to_video = c.in_channels == 2 * c.output_channels
            hint = " (image-to-video models take noise and image latents concatenated on C)" if image_to_video else ""
            raise ValueError(
                f"latents have {channels} channels; this transformer takes in_channels={c.in_channels}{hint}"
            )
        if height % p or width % p:
            raise ValueError(
                f"latent height x width = {height}x{width} is not divisible by patch_size={p} "
                f"(video height and width must be multiples of {8 * p} pixels)"
            )
        if frames % pt:
            raise ValueError(
                f"{frames} latent frames: patch_size_t={pt} needs a multiple of {pt} "
                "(CogVideoX 1.5 pipelines pad odd latent counts by repeating the first latent frame)"
            )
        if text_embeds.ndim != 3 or text_embeds.shape[-1] != c.text_embed_dim:
            raise ValueError(
                f"text_embeds must be [B, L, {c.text_embed_dim}] (text_embed_dim), got {tuple(text_embeds.shape)}"
            )
        if text_embeds.shape[0] != batch:
            raise ValueError(f"text_embeds batch {text_embeds.shape[0]} != latents batch {batch}")
        if timestep.ndim > 1 or timestep.numel() not in (1, batch):
            raise ValueError(f"timestep must be a scalar or [B={batch}], got shape {tuple(timestep.shape)}")
        if self.ofs_embedding is not None and ofs is None:
            raise ValueError(
                "this checkpoint (CogVideoX 1.5 image-to-video) needs ofs=; the reference pipeline passes 2.0"
            )
        if self.ofs_embedding is None and ofs is not None:
            raise ValueError("ofs= is only used by checkpoints with ofs_embed_dim (CogVideoX 1.5 image-to-video)")
        if self.patch_embed.pos_embedding is not None:
            _, base_h, base_w = self._training_grid()
            if (height // p, width // p) != (base_h, base_w):
                raise ValueError(
                    f"latents of {height}x{width}: this model's learned positions cover only "
                    f"{base_h * p}x{base_w * p} latents ({base_h * p * 8}x{base_w * p * 8} pixels); "
                    "CogVideoX-5B-I2V cannot generate other resolutions"
                )
            if text_embeds.shape[1] != c.max_text_seq_length:
                raise ValueError(
                    f"{text_embeds.shape[1]} text tokens: learned positions cover exactly "
                    f"max_text_seq_length={c.max_text_seq_length}"
                )

    def _key_mask(self, frame_mask: torch.Tensor, text_len: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, F]`` latent-frame mask -> ``[B, L + S]`` token mask (text tokens always attended to)."""
        frames, height, width = grid
        pt = self.config.patch_size_t or 1
        batch = frame_mask.shape[0]
        if frame_mask.shape != (batch, frames * pt) or frame_mask.dtype != torch.bool:
            raise ValueError(
                f"frame_mask must be a bool tensor [B, {frames * pt}] (one entry per latent frame), got "
                f"{frame_mask.dtype} {tuple(frame_mask.shape)}"
            )
        # A temporal patch is real when its first frame is; the docstring asks both frames to agree.
        per_patch = frame_mask[:, ::pt]
        video = per_patch[:, :, None].expand(batch, frames, height * width).reshape(batch, -1)
        return torch.cat([video.new_ones(batch, text_len), video], dim=1)

    @staticmethod
    def _on_device(value: torch.Tensor | float | int, device: torch.device) -> torch.Tensor:
        """A timestep (or ofs) as a tensor on ``device`` without waiting for the device: a Python number is
        written by a fill kernel (no host-to-device copy); a host tensor is copied asynchronously."""
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        return torch.full((), float(value), device=device)

    @staticmethod
    def _as_batch(value: torch.Tensor, batch: int) -> torch.Tensor:
        return value.reshape(-1).expand(batch) if value.numel() == 1 else value

    def forward(
        self,
        latents: torch.Tensor,
        text_embeds: torch.Tensor,
        timestep: torch.Tensor | float | int,
        ofs: torch.Tensor | float | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model output (v for the published checkpoints).

        Args:
            latents: ``[B, F, C, H, W]`` noisy latents (I2V: noise and image latents joined on C).
            text_embeds: ``[B, L, text_embed_dim]`` T5 encoder output.
            timestep: ``[B]`` or a scalar, the training timestep (0..999, may be fractional).
            ofs: 1.5-I2V only, ``[B]`` or a scalar (the pipelines use 2.0).
            frame_mask: ``[B, F]`` bool, False for padding latent frames (Frame Pack batches clips of different
                lengths): no token attends to them. Their outputs are meaningless; mask them out of the loss.
                With ``patch_size_t`` 2 the two frames of a temporal patch must agree.
        Returns:
            ``[B, F, out_channels, H, W]`` in the model's dtype.
        """
        timestep = self._on_device(timestep, latents.device)
        ofs = None if ofs is None else self._on_device(ofs, latents.device)
        self._check_inputs(latents, text_embeds, timestep, ofs)
        c = self.config
        dtype = self.dtype
        batch, frames, _, height, width = latents.shape
        p, pt = c.patch_size, c.patch_size_t or 1
        grid = (frames // pt, height // p, width // p)

        t_freq = timestep_sinusoids(self._as_batch(timestep, batch), c.inner_dim,
                                    flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)  # fmt: skip
        temb = self.time_embedding(t_freq.to(dtype))
        if self.ofs_embedding is not None:
            ofs_freq = timestep_sinusoids(self._as_batch(ofs, batch), c.ofs_embed_dim,
                                          flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)  # fmt: skip
            temb = temb + self.ofs_embedding(ofs_freq.to(dtype))

        video = self.patch_embed.embed_video(latents.to(dtype))
        text = self.patch_embed.embed_text(text_embeds.to(dtype))
        text, video = self._add_absolute_positions(text, video, grid)
        rotary = self._rotary(text.shape[1], *grid, latents.device) if c.use_rotary_positional_embeddings else None
        key_mask = None if frame_mask is None else self._key_mask(frame_mask.to(latents.device), text.shape[1], grid)
        parallel = self.sequence_parallel
        if parallel is not None:  # this rank keeps its share of the video tokens
            video, rotary, key_mask = parallel.shard(video, rotary, key_mask, text.shape[1])

        def run_blocks(video: torch.Tensor, text: torch.Tensor, start: int = 0, stop: int | None = None):
            blocks = self.transformer_blocks
            for index in range(start, len(blocks) if stop is None else stop):
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    video, text = checkpoint(blocks[index], video, text, temb, rotary, key_mask, use_reentrant=False)
                else:
                    video, text = blocks[index](video, text, temb, rotary, key_mask)
            return video, text

        if self.step_cache is None:
            video, text = run_blocks(video, text)
        else:  # the cache decides which blocks run this step (cogvideox.cache)
            video, text = _cached_blocks(self.step_cache, run_blocks, video, text, temb)

        video = self.proj_out(self.norm_out(self.norm_final(video), temb))
        if parallel is not None:  # per-token layers done: gather the small projected output, not the hidden state
            video = parallel.gather(video, grid[0] * grid[1] * grid[2])
        return rearrange(
            video,
            "b (f h w) (c pt ph pw) -> b (f pt) c (h ph) (w pw)",
            f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=p, pw=p,
        )  # fmt: skip


@torch.compiler.disable
def _cached_blocks(cache, run_blocks, video, text, temb):
    """The cache's skip decisions read values on the host (a relative distance, a step counter), so this call
    stays outside a compiled graph; compile the blocks themselves (``block.compile()``) to speed them up."""
    if not cache.stepping:  # a direct call outside a denoising loop: nothing to reuse
        return run_blocks(video, text)
    return cache.run_blocks(run_blocks, video, text, temb)
