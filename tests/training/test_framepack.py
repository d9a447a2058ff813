"""Frame Pack: clips of different lengths in one batch; padding changes neither a clip's output nor its loss."""

from __future__ import annotations

import pytest
import torch

from cogvideox.training import Trainer, TrainingBatch, TrainingConfig, pack_clips, pad_like, pad_to_temporal_patch
from tests.helpers import rel_err
from tests.training.conftest import objective, tiny_transformer


def test_pack_shapes_masks_and_images():
    gen = torch.Generator().manual_seed(0)
    video, image = torch.randn(3, 4, 6, 10, generator=gen), torch.randn(4, 6, 10, generator=gen)
    packed = pack_clips([video, image])
    assert packed.latents.shape == (2, 3, 4, 6, 10)
    assert packed.frame_mask.tolist() == [[True, True, True], [True, False, False]]
    assert packed.lengths == [3, 1]
    assert torch.equal(packed.latents[1, 0], image) and not packed.latents[1, 1:].any()
    # CogVideoX 1.5 (patch_size_t 2): each clip gets its first frame repeated in front to an even count.
    packed = pack_clips([video, image], patch_size_t=2, num_frames=6)
    assert packed.lengths == [4, 2] and packed.latents.shape[1] == 6
    assert torch.equal(packed.latents[0, 0], video[0]) and torch.equal(packed.latents[0, 1:4], video)
    assert torch.equal(packed.latents[1, 0], packed.latents[1, 1])
    assert packed.frame_mask.sum(dim=1).tolist() == [4, 2]
    noise = pad_like(packed, [torch.ones(4, 4, 6, 10), torch.ones(2, 4, 6, 10)])
    assert noise.shape == packed.latents.shape and noise.sum().item() == 6 * 4 * 60


def test_pack_errors():
    with pytest.raises(ValueError, match="needs at least one clip"):
        pack_clips([])
    with pytest.raises(ValueError, match=r"clip 1 has latent \[C, h, w\] = \(4, 6, 8\)"):
        pack_clips([torch.zeros(2, 4, 6, 10), torch.zeros(2, 4, 6, 8)])
    with pytest.raises(ValueError, match="num_frames=2, but a clip has 3 latent frames"):
        pack_clips([torch.zeros(3, 4, 6, 10)], num_frames=2)
    with pytest.raises(ValueError, match="patch_size_t=2 needs a multiple of 2"):
        pack_clips([torch.zeros(2, 4, 6, 10)], patch_size_t=2, num_frames=5)
    with pytest.raises(ValueError, match=r"clip 0 has shape \(4, 6, 10, 1, 1\)"):
        pack_clips([torch.zeros(4, 6, 10, 1, 1)])


def test_pad_to_temporal_patch():
    clip = torch.arange(3.0).reshape(1, 3, 1, 1, 1).expand(2, 3, 1, 1, 1)
    assert pad_to_temporal_patch(clip, 2)[0, :, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert pad_to_temporal_patch(clip, None) is clip
    assert pad_to_temporal_patch(clip[:, :2], 2).shape[1] == 2  # already even: unchanged


@pytest.mark.parametrize("variant", ["2b", "5b", "1.5", "1.5-i2v"])
def test_padding_changes_no_clip_loss(variant):
    """The per-clip loss of a short clip packed next to a long one equals its loss alone (the model output of its
    real frames too): padding frames are hidden from attention and left out of the loss."""
    pt = 2 if variant.startswith("1.5") else 1
    channels = 8 if variant.endswith("i2v") else 4
    model = tiny_transformer(variant, seed=1).eval()
    trainer = Trainer(model, objective(variant), TrainingConfig(gradient_checkpointing=False))
    gen = torch.Generator().manual_seed(3)
    lengths = (2 * pt, 4 * pt) if pt == 2 else (1, 3)  # an image (one frame) next to a 3-frame clip, for 1.0
    clips = [torch.randn(n, 4, 6, 10, generator=gen) for n in lengths]
    noises = [torch.randn(n, 4, 6, 10, generator=gen) for n in lengths]
    conds = [torch.randn(n, 4, 6, 10, generator=gen) for n in lengths] if channels == 8 else None
    text = torch.randn(2, 7, 12, generator=gen)
    timesteps = torch.tensor([250, 750])
    packed = pack_clips(clips, patch_size_t=pt)
    batch = TrainingBatch(
        packed.latents, text, frame_mask=packed.frame_mask, timesteps=timesteps, noise=pad_like(packed, noises),
        image_latents=pad_like(packed, conds) if conds else None,
    )  # fmt: skip
    with torch.no_grad():
        together = trainer.compute_loss(batch, reduction="none")
        alone = [
            trainer.compute_loss(
                TrainingBatch(
                    clips[i][None],
                    text[i : i + 1],
                    timesteps=timesteps[i : i + 1],
                    noise=noises[i][None],
                    image_latents=conds[i][None] if conds else None,
                ),
                reduction="none",
            )  # fmt: skip
            for i in range(2)
        ]
    for i in range(2):
        assert rel_err(together[i], alone[i][0]) < 1e-5, (i, together, alone)
    # Sanity: without the mask the short clip's loss does change (the test can fail).
    with torch.no_grad():
        unmasked = trainer.compute_loss(
            TrainingBatch(
                packed.latents, text, timesteps=timesteps, noise=batch.noise, image_latents=batch.image_latents
            ),
            reduction="none",
        )
    assert rel_err(unmasked[0], alone[0][0]) > 1e-3
