"""One training step and a small loop: noise, predict v, the official loss, AdamW with warmup, DDP.

    batch (clean latents x0 [B, F, C, h, w], text [B, L, D], optional image / image latents, frame_mask)
      -> t ~ U{0..T-1}, eps ~ N(0, 1), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps          (DiffusionObjective)
      -> I2V: [x_t ; image latents] on channels; 1.5-I2V: ofs = 2.0                    (conditioning.py)
      -> v_hat = transformer(x_t, text, t, ofs, frame_mask)
      -> loss = mean over clips of mean((x0_hat - x0)^2 / (1 - a_t))                   (the official x0 form)
      -> backward, clip the gradient norm to 1.0, AdamW, learning-rate schedule

Defaults are CogVideo ``finetune/schemas/args.py`` (https://github.com/THUDM/CogVideo): lr 2e-5, betas (0.9, 0.95),
eps 1e-8, weight decay 1e-4, max grad norm 1.0, ``constant_with_warmup`` with 100 warmup steps, gradient
checkpointing on.

When ``torch.distributed`` is initialised (``torchrun``), the model is wrapped in ``DistributedDataParallel``:
each process runs its own batch and gradients are averaged, so N processes with batch b each step like one
process with the N*b batch (``tests/training/test_ddp.py`` checks it with two processes). Only rank 0 writes
files, each written to a temporary name and renamed (``cogvideox.atomic.atomic_path``); a saved state holds
every process's generator so each resumes its own random stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_path
from ..lora.formats import LORA_WEIGHT_NAME
from ..samplers import randn
from ..transformer import Transformer
from ..vae import VAE
from . import conditioning
from .lora import save_lora
from .objective import DiffusionObjective

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingConfig:
    """Optimiser and step settings (defaults: CogVideo ``finetune/``).

    Attributes:
        learning_rate, betas, eps, weight_decay: AdamW.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        warmup_steps: linear warmup from 0 (``constant_with_warmup``: the factor is ``step / warmup_steps`` before
            the ``step``-th optimiser step, so the very first step has learning rate 0, as in diffusers).
        gradient_checkpointing: recompute each transformer block in the backward pass instead of storing its
            activations (about one extra forward per step; activation memory of one block instead of all).
        caption_dropout: probability of replacing a sample's text embedding by the null embedding (SAT 0.1;
            CogVideo ``finetune/`` 0).
        image_dropout: probability of zeroing a sample's I2V image latents (SAT 0.05; ``finetune/`` 0).
        image_noise: add the exp(N(-3, 0.5)) noise to I2V images before encoding (both references do).
    """

    learning_rate: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 100
    gradient_checkpointing: bool = True
    caption_dropout: float = 0.0
    image_dropout: float = 0.0
    image_noise: bool = True


@dataclasses.dataclass
class TrainingBatch:
    """What one step trains on.

    Attributes:
        latents: clean latents x0 ``[B, F, C, h, w]`` (``conditioning.encode_video``; 1.5: already padded with
            ``pad_to_temporal_patch``, or packed with ``framepack.pack_clips``).
        text_embeds: ``[B, L, text_embed_dim]`` T5 output.
        images: I2V only: first frames ``[B, 3, H, W]`` in [-1, 1]; the trainer noises and encodes them each step
            (needs ``Trainer(vae=...)``). Or pass ``image_latents`` ``[B, F, C, h, w]`` made beforehand.
        frame_mask: ``[B, F]`` bool from Frame Pack (None: every frame is real).
        timesteps, noise: fixed ``[B]`` timesteps and ``[B, F, C, h, w]`` noise instead of random ones (for tests
            and validation losses that compare like with like).
    """

    latents: torch.Tensor
    text_embeds: torch.Tensor
    images: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


@dataclasses.dataclass
class StepResult:
    """``loss``: the step's loss (mean over micro-batches, this process); ``grad_norm``: before clipping
    (None without clipping); ``learning_rate``: the rate the step used."""

    loss: float
    grad_norm: float | None
    learning_rate: float


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor ``min(1, step / warmup_steps)`` (diffusers ``get_constant_schedule_with_warmup``)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps}: must be >= 0")

    def factor(step: int) -> float:
        return step / max(1, warmup_steps) if step < warmup_steps else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def distributed_ready() -> bool:
    """True inside ``torchrun`` after ``torch.distributed.init_process_group``."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return not distributed_ready() or dist.get_rank() == 0


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel`` on the model's device (``device_ids`` for CUDA, none for the CPU / gloo)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    return DistributedDataParallel(model, **ddp_kwargs)


def _atomic_torch_save(obj: object, path: Path) -> None:
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without ``torch.distributed``."""
    return (dist.get_rank(), dist.get_world_size()) if distributed_ready() else (0, 1)


class Trainer:
    """Trains the parameters of ``transformer`` that require gradients (all of them, or a LoRA's after
    :func:`~cogvideox.training.inject_lora`).

    Args:
        transformer: the model, on its training device and dtype (LoRA: inject before building the trainer).
        objective: the schedule and loss (``DiffusionObjective(sampler.config)`` of the checkpoint).
        config: optimiser and step settings.
        vae: needed only for I2V batches that carry ``images`` (encoded each step, with noise).
        null_text_embeds: ``[1, L, D]`` the dropped captions become (default zeros, as SAT).
        generator: draws timesteps, noise and dropouts (default: a CPU generator seeded with 0 + rank, so every
            process draws different noise).
        parameters: what to optimise (default: every parameter with ``requires_grad``).
        ddp_kwargs: passed to ``DistributedDataParallel`` when ``torch.distributed`` is initialised.
    """

    def __init__(
        self,
        transformer: Transformer,
        objective: DiffusionObjective,
        config: TrainingConfig | None = None,
        *,
        vae: VAE | None = None,
        null_text_embeds: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        parameters: Iterable[nn.Parameter] | None = None,
        ddp_kwargs: dict | None = None,
    ) -> None:
        self.transformer, self.objective, self.vae = transformer, objective, vae
        self.config = config or TrainingConfig()
        self.null_text_embeds = null_text_embeds
        rank = dist.get_rank() if distributed_ready() else 0
        self.generator = generator if generator is not None else torch.Generator().manual_seed(rank)
        if parameters is None:
            parameters = (p for p in transformer.parameters() if p.requires_grad)
        params = list(parameters)
        if not params:
            raise ValueError(
                "nothing to train: no parameter requires grad; call inject_lora(transformer) for LoRA, or "
                "transformer.requires_grad_(True) for full fine-tuning"
            )
        self.parameters = params
        transformer.gradient_checkpointing = self.config.gradient_checkpointing
        transformer.train()
        self.model = wrap_ddp(transformer, **(ddp_kwargs or {})) if distributed_ready() else transformer
        c = self.config
        self.optimizer = torch.optim.AdamW(
            params, lr=c.learning_rate, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay
        )
        self.scheduler = constant_with_warmup(self.optimizer, c.warmup_steps)
        self.step_count = 0
        logger.info("training %d tensors (%d parameters)%s", len(params), sum(p.numel() for p in params),
                    " with DistributedDataParallel" if self.model is not transformer else "")  # fmt: skip

    # ------------------------------------------------------------------------------------------ one batch

    def _model_inputs(self, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy x_t, timesteps, noise) for ``batch``, drawn from the trainer's generator unless fixed."""
        latents = batch.latents
        device = latents.device
        timesteps = batch.timesteps
        if timesteps is None:
            timesteps = self.objective.sample_timesteps(batch.batch_size, generator=self.generator, device=device)
        noise = batch.noise
        if noise is None:
            noise = randn(latents.shape, generator=self.generator, device=device, dtype=torch.float32)
        noisy = self.objective.add_noise(latents.float(), noise.to(device), timesteps)
        return noisy, timesteps.to(device), noise

    def _image_condition(self, batch: TrainingBatch) -> torch.Tensor | None:
        config = self.transformer.config
        image_to_video = config.in_channels == 2 * config.output_channels
        if not image_to_video:
            if batch.images is not None or batch.image_latents is not None:
                raise ValueError("this transformer is text-to-video (in_channels == out_channels): drop images")
            return None
        if batch.image_latents is not None:
            # The same per-sample dropout as for encoded images (image_latents(dropout=)), drawn from our generator.
            return conditioning.drop_image_latents(
                batch.image_latents, self.config.image_dropout, generator=self.generator
            )
        if batch.images is None:
            raise ValueError(
                "this transformer is image-to-video: give the batch images ([B, 3, H, W] first frames, with "
                "Trainer(vae=...)) or image_latents ([B, F, C, h, w], see conditioning.image_latents)"
            )
        if self.vae is None:
            raise ValueError("batch.images needs Trainer(vae=...) to encode them (or pass image_latents instead)")
        return conditioning.image_latents(
            self.vae, batch.images, batch.latents.shape[1], generator=self.generator,
            noise=self.config.image_noise, dropout=self.config.image_dropout,
        )  # fmt: skip

    def compute_loss(self, batch: TrainingBatch, *, reduction: str = "mean") -> torch.Tensor:
        """The loss of one batch (with gradients when grad mode is on): float32 scalar, or ``[B]``."""
        self._check(batch)
        noisy, timesteps, _ = self._model_inputs(batch)
        model_input = noisy
        condition = self._image_condition(batch)
        if condition is not None:
            model_input = torch.cat([noisy, condition.to(noisy.device, noisy.dtype)], dim=2)
        text = conditioning.drop_captions(
            batch.text_embeds, self.config.caption_dropout, generator=self.generator, null_embeds=self.null_text_embeds
        )
        ofs = conditioning.ofs_for(self.transformer.config, batch.batch_size, noisy.device)
        prediction = self.model(model_input, text, timesteps, ofs=ofs, frame_mask=batch.frame_mask)
        return self.objective.loss(prediction, noisy, batch.latents, timesteps, batch.frame_mask, reduction=reduction)

    def _check(self, batch: TrainingBatch) -> None:
        if batch.latents.ndim != 5:
            raise ValueError(f"batch.latents must be [B, F, C, h, w], got shape {tuple(batch.latents.shape)}")
        if batch.text_embeds.shape[0] != batch.batch_size:
            raise ValueError(f"text_embeds batch {batch.text_embeds.shape[0]} != latents batch {batch.batch_size}")
        if batch.noise is not None and batch.noise.shape != batch.latents.shape:
            raise ValueError(f"noise shape {tuple(batch.noise.shape)} != latents shape {tuple(batch.latents.shape)}")

    # ------------------------------------------------------------------------------------------ one step

    def step(self, batches: TrainingBatch | Sequence[TrainingBatch]) -> StepResult:
        """One optimiser step on one batch, or on several micro-batches whose gradients are accumulated (each
        weighted equally; under DDP gradients are synchronised once, on the last one)."""
        micro = [batches] if isinstance(batches, TrainingBatch) else list(batches)
        if not micro:
            raise ValueError("step() needs at least one batch")
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for index, batch in enumerate(micro):
            last = index == len(micro) - 1
            distributed = self.model is not self.transformer
            with self.model.no_sync() if distributed and not last else contextlib.nullcontext():
                loss = self.compute_loss(batch)
                (loss / len(micro)).backward()
            total += float(loss.detach()) / len(micro)
        grad_norm = None
        if self.config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return StepResult(total, grad_norm, learning_rate)

    def fit(
        self,
        batches: Iterable[TrainingBatch],
        num_steps: int,
        *,
        log_every: int = 10,
        callback: Callable[[int, StepResult], None] | None = None,
    ) -> list[float]:
        """Run ``num_steps`` steps over ``batches`` (stops early, with a warning, if they run out).
        ``callback(step, result)`` runs after each step (e.g. to save every N steps). Returns the losses."""
        losses: list[float] = []
        iterator = iter(batches)
        for _ in range(num_steps):
            try:
                batch = next(iterator)
            except StopIteration:
                logger.warning("the batches ran out after %d of %d steps", len(losses), num_steps)
                break
            result = self.step(batch)
            losses.append(result.loss)
            if log_every and self.step_count % log_every == 0 and is_main_process():
                logger.info("step %d: loss %.5f, grad norm %s, lr %.3g", self.step_count, result.loss,
                            f"{result.grad_norm:.4f}" if result.grad_norm is not None else "-",
                            result.learning_rate)  # fmt: skip
            if callback is not None:
                callback(self.step_count, result)
        return losses

    # ------------------------------------------------------------------------------------------ files

    def save_lora(self, folder: str | Path, adapter_name: str = "default", **kwargs) -> Path:
        """Write the LoRA (``pytorch_lora_weights.safetensors``) on rank 0; every process waits for it.
        Returns the file's path (on every rank)."""
        path = Path(folder) / kwargs.get("weight_name", LORA_WEIGHT_NAME)
        if is_main_process():
            path = save_lora(self.transformer, folder, adapter_name, **kwargs)
        if distributed_ready():
            dist.barrier()
        return path

    def _trainable_names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.transformer.named_parameters()}

    def save_state(self, path: str | Path) -> None:
        """Save what resuming needs (trainable tensors, optimiser, schedule, step, every rank's generator).

        Call it on every process: the generator states are gathered to rank 0 (``all_gather_object``), which
        writes the file; the others wait at a barrier. Each process draws its own timesteps, noise and dropouts,
        so each needs its own generator back on resume, not rank 0's."""
        rank, world = _world()
        generators = [self.generator.get_state()]
        if world > 1:
            generators = [None] * world
            dist.all_gather_object(generators, self.generator.get_state())
        if rank == 0:
            names = self._trainable_names()
            state = {
                "step": self.step_count,
                "parameters": {names[id(p)]: p.detach().cpu() for p in self.parameters},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generators": generators,  # index = rank
            }
            _atomic_torch_save(state, Path(path))
        if world > 1:
            dist.barrier()

    def load_state(self, path: str | Path) -> None:
        """Resume from :meth:`save_state` (the same model, LoRA injected the same way, the same process count);
        each process gets back its own generator state."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        rank, world = _world()
        # Files from before the per-rank states held one "generator" (rank 0's); they resume one process only.
        generators = state["generators"] if "generators" in state else [state["generator"]]
        if len(generators) != world:
            raise ValueError(
                f"{path} was saved by {len(generators)} process(es) but this run has {world}: each process resumes "
                f"its own random stream, so resume with the same number of processes (torchrun "
                f"--nproc_per_node={len(generators)})"
            )
        names = self._trainable_names()
        saved = state["parameters"]
        missing = [names[id(p)] for p in self.parameters if names[id(p)] not in saved]
        if missing:
            raise ValueError(f"{path} lacks trainable tensors {missing[:3]}: was it saved from another setup?")
        with torch.no_grad():
            for p in self.parameters:
                p.copy_(saved[names[id(p)]])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(generators[rank])
        self.step_count = int(state["step"])


__all__ = [
    "StepResult",
    "Trainer",
    "TrainingBatch",
    "TrainingConfig",
    "constant_with_warmup",
    "distributed_ready",
    "is_main_process",
    "wrap_ddp",
]
