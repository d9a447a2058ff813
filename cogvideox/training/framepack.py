"""Frame Pack: one batch from clips of different frame counts.

CogVideoX paper (arXiv 2408.06072), §3.1 "Multi-Resolution Frame Pack".

The paper trains on videos of different durations (and on images, which count as one frame) in the same batch
instead of cutting everything to one length. We pad each clip's latents at the end to the longest clip and
return a ``frame_mask`` ``[B, F]`` (True on real frames), which

- :meth:`Transformer.forward(..., frame_mask=) <cogvideox.Transformer.forward>` turns into a key mask, so no
  token attends to padding frames (the real tokens' outputs are those of the clip alone: positions of real
  frames do not depend on the clip length, padding is at the end);
- :meth:`DiffusionObjective.loss(..., frame_mask=) <cogvideox.training.DiffusionObjective.loss>` uses to average
  each clip's loss over its real frames only.

So a clip's loss is the same packed or alone (``tests/training/test_framepack.py`` measures it). The cost is
the padded tokens: the attention is computed for the longest clip's length. Sorting clips by length into batches
(bucketing) keeps the padding small.

With ``patch_size_t`` 2 (CogVideoX 1.5) two latent frames make one token, so every clip is first brought to an
even count by repeating its first latent frame (as the reference does for one clip) and the packed length is even:
a single image becomes two identical latent frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..latents import pad_to_temporal_patch


@dataclasses.dataclass
class PackedClips:
    """A padded batch.

    Attributes:
        latents: ``[B, F, C, h, w]``, zeros after each clip's end.
        frame_mask: ``[B, F]`` bool, True on real frames.
        lengths: each clip's real latent frame count (after any temporal-patch padding).
    """

    latents: torch.Tensor
    frame_mask: torch.Tensor
    lengths: list[int]


def _as_clip(clip: torch.Tensor, index: int) -> torch.Tensor:
    if clip.ndim == 3:  # an image latent [C, h, w] is a one-frame clip
        return clip[None]
    if clip.ndim != 4:
        raise ValueError(
            f"clip {index} has shape {tuple(clip.shape)}: give latents [F, C, h, w] per clip (an image as "
            "[1, C, h, w] or [C, h, w])"
        )
    return clip


def pack_clips(
    clips: Sequence[torch.Tensor],
    *,
    patch_size_t: int | None = None,
    num_frames: int | None = None,
) -> PackedClips:
    """Pad clips of different latent frame counts to one batch.

    Args:
        clips: latents ``[F_i, C, h, w]`` per clip (``[C, h, w]`` for an image); same ``C, h, w`` and dtype.
        patch_size_t: the transformer's ``config.patch_size_t`` (2 for CogVideoX 1.5, None otherwise).
        num_frames: pad to this many latent frames (default: the longest clip); fixing it gives every batch the
            same shape (one compiled graph, steady memory).
    Returns:
        :class:`PackedClips`.
    Raises:
        ValueError: no clips, clips of different channel count or size, or a clip longer than ``num_frames``.
    """
    if not clips:
        raise ValueError("pack_clips needs at least one clip")
    pt = patch_size_t or 1
    prepared = [pad_to_temporal_patch(_as_clip(clip, i), pt) for i, clip in enumerate(clips)]
    shape = prepared[0].shape[1:]
    for i, clip in enumerate(prepared):
        if clip.shape[1:] != shape:
            raise ValueError(
                f"clip {i} has latent [C, h, w] = {tuple(clip.shape[1:])} but clip 0 has {tuple(shape)}: Frame Pack "
                "joins clips of one size and channel count; batch different sizes separately (bucketing)"
            )
    lengths = [clip.shape[0] for clip in prepared]
    longest = max(lengths)
    target = longest if num_frames is None else num_frames
    if target < longest:
        raise ValueError(f"num_frames={num_frames}, but a clip has {longest} latent frames: raise num_frames")
    if target % pt:
        raise ValueError(f"num_frames={num_frames}: patch_size_t={pt} needs a multiple of {pt} latent frames")
    first = prepared[0]
    latents = first.new_zeros(len(prepared), target, *shape)
    frame_mask = torch.zeros(len(prepared), target, dtype=torch.bool, device=first.device)
    for i, clip in enumerate(prepared):
        latents[i, : clip.shape[0]] = clip
        frame_mask[i, : clip.shape[0]] = True
    return PackedClips(latents, frame_mask, lengths)


def pad_like(packed: PackedClips, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pad per-clip companions of the latents (I2V image latents, fixed noise) the same way: ``[F_i, ...]``
    each, already as long as its clip (after temporal-patch padding) -> ``[B, F, ...]`` with zeros after the end.
    """
    if len(tensors) != len(packed.lengths):
        raise ValueError(f"{len(tensors)} tensors for {len(packed.lengths)} packed clips: give one per clip")
    frames = packed.latents.shape[1]
    out = tensors[0].new_zeros(len(tensors), frames, *tensors[0].shape[1:])
    for i, (tensor, length) in enumerate(zip(tensors, packed.lengths, strict=True)):
        if tensor.shape[0] != length:
            raise ValueError(f"tensor {i} has {tensor.shape[0]} frames but clip {i} has {length}")
        out[i, :length] = tensor
    return out


__all__ = ["PackedClips", "pack_clips", "pad_like"]
