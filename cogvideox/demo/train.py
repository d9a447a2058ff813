"""Train the bundled demo model on the CPU: ``python -m cogvideox.demo.train [--out FOLDER]``.

Four stages, all seeded, all with this package's own modules:

1. tokenizer: a Unigram sentencepiece model of the captions' words (:mod:`cogvideox.demo.tokenizer`);
2. VAE: the causal 3D VAE trained to reconstruct synthetic clips (foreground-weighted MSE, a light KL term); its
   ``scaling_factor`` is then set to 1 / std of the latents it produces, so the transformer sees unit-variance
   latents and the pipeline's decode undoes exactly that scale;
3. text encoder and transformer, trained jointly with the v-prediction loss of
   :class:`cogvideox.training.DiffusionObjective` on cached VAE posteriors (a fresh posterior sample every step),
   with 10 % of captions dropped to "" so that classifier-free guidance has an unconditional model;
4. the pipeline folder (published layout) is written next to the target and renamed into place, then every
   caption is generated once and checked by :mod:`cogvideox.demo.evaluate`.

On two cores of an AMD EPYC VM the defaults take about 20-25 minutes (docs/training.md has the figures). Results
are reproducible for a given torch build and thread count; other builds give a different, equally good model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from ..atomic import write_component
from ..configs import config_to_dict
from ..text import T5Encoder, T5Tokenizer
from ..training.objective import DiffusionObjective
from ..transformer import Transformer
from ..vae import VAE
from . import DEMO_MODEL, data, model_configs
from .evaluate import describe
from .tokenizer import train_tokenizer

logger = logging.getLogger("cogvideox.demo.train")

DEFAULT_OUT = DEMO_MODEL
CAPTION_DROPOUT = 0.1  # share of "" captions: the unconditional branch of classifier-free guidance


def _warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------------ VAE


def train_vae(steps: int, batch: int, seed: int) -> VAE:
    """A VAE trained on clips of the training motions; returns it in eval mode (scaling_factor still 1)."""
    torch.manual_seed(seed)
    vae = VAE(model_configs.VAE)
    gen = torch.Generator().manual_seed(seed)
    motions = data.training_motions()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, steps, 50))
    start = time.perf_counter()
    for step in range(steps):
        video, _ = data.sample_batch(motions, batch, gen)
        posterior = vae.encode(video)
        recon = vae.decode(posterior.sample(gen))
        # The black background is most of every frame: weight the shape's pixels up so that it is not ignored.
        weight = 1.0 + 9.0 * (video > -0.9).any(dim=1, keepdim=True).float()
        mse = (weight * (recon - video).square()).mean()
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).mean()
        loss = mse + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d: mse %.4f kl %.3f (%.0f s)", step, steps, mse.item(), kl.item(),
                        time.perf_counter() - start)  # fmt: skip
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_clips(vae: VAE, per_motion: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posteriors of ``per_motion`` random clips of every training motion: (mean, std) ``[N, C, F', h, w]``
    and the N captions."""
    gen = torch.Generator().manual_seed(seed)
    clips = [(data.render(m, gen), m.caption) for m in data.training_motions() for _ in range(per_motion)]
    means, stds = [], []
    for i in range(0, len(clips), 64):
        posterior = vae.encode(torch.stack([c for c, _ in clips[i : i + 64]]))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), [caption for _, caption in clips]


@torch.no_grad()
def reconstruction_report(vae: VAE, seed: int) -> str:
    """PSNR and how often colour and direction survive a round trip, over one clip of every motion."""
    gen = torch.Generator().manual_seed(seed)
    motions = data.all_motions()
    video = torch.stack([data.render(m, gen) for m in motions])
    recon = vae.decode(vae.encode(video).mode()).clamp(-1, 1)
    mse = ((recon - video) / 2).square().mean().item()
    frames = ((recon + 1) / 2).permute(0, 2, 3, 4, 1).numpy()
    right = sum(describe(f) == (m.colour, m.direction) for f, m in zip(frames, motions, strict=True))
    return f"PSNR {10 * math.log10(1 / mse):.1f} dB, colour and direction kept in {right}/{len(motions)}"


# ------------------------------------------------------------------------------------------------ denoiser


def train_denoiser(
    tokenizer: T5Tokenizer,
    vocab_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    texts: list[str],
    steps: int,
    batch: int,
    seed: int,
) -> tuple[T5Encoder, Transformer]:
    """The text encoder and transformer, trained jointly on scaled latents ``[N, C, F', h, w]``."""
    torch.manual_seed(seed)
    encoder = T5Encoder(model_configs.text_encoder(vocab_size))
    transformer = Transformer(model_configs.TRANSFORMER)
    objective = DiffusionObjective(model_configs.SCHEDULER)
    gen = torch.Generator().manual_seed(seed)
    ids = tokenizer(texts, max_length=model_configs.TEXT_LENGTH).input_ids
    empty = tokenizer([""], max_length=model_configs.TEXT_LENGTH).input_ids
    params = [*encoder.parameters(), *transformer.parameters()]
    optimizer = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, steps, 100))
    start, running = time.perf_counter(), None
    for step in range(steps):
        pick = torch.randint(len(texts), (batch,), generator=gen)
        z = mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=gen)
        latents = z.permute(0, 2, 1, 3, 4)  # VAE [B, C, F, h, w] -> transformer [B, F, C, h, w]
        drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
        batch_ids = torch.where(drop[:, None], empty, ids[pick])
        timesteps = objective.sample_timesteps(batch, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = objective.add_noise(latents, noise, timesteps)
        prediction = transformer(noisy, encoder(batch_ids), timesteps)
        loss = objective.loss(prediction, noisy, latents, timesteps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            logger.info("denoiser step %d/%d: loss %.4f (%.0f s)", step, steps, running, time.perf_counter() - start)
    return encoder.eval().requires_grad_(False), transformer.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------- writing


def write_pipeline(out: Path, tokenizer_folder: Path, vae: VAE, encoder: T5Encoder, transformer: Transformer) -> None:
    """Write the published folder layout to a sibling temporary folder, then rename it to ``out``."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(tokenizer_folder, tmp / "tokenizer")
    weights = "diffusion_pytorch_model.safetensors"
    write_component(tmp / "vae", config_to_dict(vae.config, "AutoencoderKLCogVideoX"), vae.state_dict(), weights)
    t5_config = {"architectures": ["T5EncoderModel"], "model_type": "t5", **config_to_dict(encoder.config)}
    write_component(tmp / "text_encoder", t5_config, encoder.state_dict(), "model.safetensors")
    transformer_config = config_to_dict(transformer.config, "CogVideoXTransformer3DModel")
    write_component(tmp / "transformer", transformer_config, transformer.state_dict(), weights)
    (tmp / "scheduler").mkdir()
    scheduler = config_to_dict(model_configs.SCHEDULER, "CogVideoXDDIMScheduler")
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {
        "_class_name": "CogVideoXPipeline",
        "_note": "cogvideox demo model: trained on synthetic 32x32 clips by python -m cogvideox.demo.train",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def generation_report(folder: Path, seed: int) -> str:
    """Generate every caption once from the written folder and count colour and direction hits."""
    from ..pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    motions = data.all_motions()
    out = pipe([m.caption for m in motions], output_type="np", generator=torch.Generator().manual_seed(seed))
    seen = held = seen_right = held_right = 0
    for frames, motion in zip(out.frames, motions, strict=True):
        right = describe(frames) == (motion.colour, motion.direction)
        if motion.held_out:
            held, held_right = held + 1, held_right + right
        else:
            seen, seen_right = seen + 1, seen_right + right
    return f"colour and direction right: seen pairs {seen_right}/{seen}, held-out pairs {held_right}/{held}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cogvideox.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"pipeline folder to write ({DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=900)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000, help="text encoder + transformer steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--clips-per-motion", type=int, default=64, help="cached VAE posteriors per motion")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                        help="generate every caption once at the end and count the hits (default on)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    began = time.perf_counter()

    scratch = args.out.with_name(args.out.name + ".tokenizer")
    shutil.rmtree(scratch, ignore_errors=True)
    train_tokenizer(scratch, data.captions(), max_length=model_configs.TEXT_LENGTH)
    tokenizer = T5Tokenizer.from_pretrained(scratch)
    import sentencepiece

    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(scratch / "spiece.model")).get_piece_size()
    logger.info("tokenizer: %d pieces", vocab_size)

    vae = train_vae(args.vae_steps, args.vae_batch, args.seed)
    logger.info("vae: %s", reconstruction_report(vae, args.seed + 1))
    mean, std, texts = encode_clips(vae, args.clips_per_motion, args.seed + 2)
    # 1 / std of the latents the transformer will see (the posterior's spread included), as the published
    # models' scaling_factor does for theirs.
    scale = 1.0 / (mean.var() + std.square().mean()).sqrt().item()
    vae.config = dataclasses.replace(vae.config, scaling_factor=scale)
    logger.info("vae: %d cached posteriors, scaling_factor %.4f", len(texts), scale)

    encoder, transformer = train_denoiser(
        tokenizer, vocab_size, mean * scale, std * scale, texts, args.steps, args.batch, args.seed + 3
    )
    write_pipeline(args.out, scratch, vae, encoder, transformer)
    shutil.rmtree(scratch, ignore_errors=True)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    logger.info("wrote %s (%.1f MB) after %.1f min", args.out, size / 1e6, (time.perf_counter() - began) / 60)
    if args.report:
        logger.info("generation: %s", generation_report(args.out, args.seed))


if __name__ == "__main__":
    main()
