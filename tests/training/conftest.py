"""Shared set-up of the training tests: one CPU thread, tiny models and batches.

The tiny models run a step in a few milliseconds on one thread; with several threads on a busy 2-core machine
each small kernel waits on the others (measured 100x slower), so these tests pin torch to one thread and restore
the previous count afterwards.
"""

from __future__ import annotations

import pytest
import torch

from cogvideox.configs import SchedulerConfig, TransformerConfig, config_from_dict
from cogvideox.presets import SCHEDULER_2B, SCHEDULER_5B
from cogvideox.training import DiffusionObjective
from cogvideox.transformer import Transformer
from tests.helpers import TINY_TRANSFORMER, randomize_

# The variants' distinguishing keys on top of TINY_TRANSFORMER (6x10 latents, 3 latent frames, 7 text tokens).
VARIANTS = {
    "2b": {},
    "5b": {"use_rotary_positional_embeddings": True},
    "1.5": {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False},
    "1.5-i2v": {
        "use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False,
        "in_channels": 8, "ofs_embed_dim": 24,  # = time_embed_dim, as 512 in the real model
    },
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_transformer(variant: str = "5b", seed: int = 0) -> Transformer:
    config = TransformerConfig(**{**TINY_TRANSFORMER, **VARIANTS[variant]})
    return randomize_(Transformer(config), seed=seed)


def objective(variant: str = "5b") -> DiffusionObjective:
    data = SCHEDULER_2B if variant == "2b" else SCHEDULER_5B
    return DiffusionObjective(config_from_dict(SchedulerConfig, data))


def fixed_batch(frames: int = 3, batch: int = 2, channels: int = 4, seed: int = 0) -> dict:
    """Latents [B, F, C, 6, 10], text [B, 7, 12], timesteps and noise, all seeded."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, channels, 6, 10, generator=gen)
    return {
        "latents": latents,
        "text_embeds": torch.randn(batch, 7, 12, generator=gen),
        "timesteps": torch.randint(0, 1000, (batch,), generator=gen),
        "noise": torch.randn(latents.shape, generator=gen),
    }
