"""Causal 3D convolution with an explicit frame cache, and time-chunked convolution for very large inputs.

A causal convolution only looks at the current and earlier frames: a kernel of ``k`` frames is fed ``k - 1`` frames
of history before the first frame. At the start of a video that history is the first frame repeated; when a video is
processed in chunks of frames, it is the last ``k - 1`` input frames of the previous chunk (the *cache*). The cache
travels explicitly: ``forward`` takes the previous chunk's tail and returns the new one, and no module keeps state
between calls. Processing a video in chunks this way gives the same result as one call over all its frames.

Spatially the convolution pads with zeros on both sides (``(k - 1) // 2`` pixels), as the reference does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# A nested mapping from child-module names to their caches; the leaves are tensors [B, C, k - 1, H, W].
# A forward *consumes* the cache it is given: it pops each entry as it uses it, so the previous chunk's history is
# released step by step instead of living beside the new cache for the whole chunk (it is as large as about two
# activations per resolution level).
ConvCache = dict[str, Any]

# The reference (diffusers CogVideoXSafeConv3d) splits a convolution along time when its input would take more than
# 2 GiB *counted at 2 bytes per element*, whatever the dtype, i.e. above 2**30 elements. Large single convolutions
# fail or fall back to slow paths in cuDNN; the split keeps every piece under that size.
MAX_CONV_INPUT_ELEMENTS = 2**30


def conv3d_in_time_chunks(
    conv: nn.Conv3d, x: torch.Tensor, max_elements: int = MAX_CONV_INPUT_ELEMENTS
) -> torch.Tensor:
    """Apply ``conv`` (no time padding, time stride 1) to ``x`` [B, C, T, H, W], in pieces along time if large.

    An input of more than ``max_elements`` elements is cut into ``numel // max_elements + 1`` pieces of output
    frames, as the reference does; each piece reads the ``k - 1`` input frames before it, so the result equals one
    convolution over the whole input.
    """
    if x.numel() <= max_elements:
        return conv(x)
    if conv.padding[0] != 0 or conv.stride[0] != 1:
        raise ValueError("time-chunked convolution needs a convolution without time padding and with time stride 1")
    overlap = conv.kernel_size[0] - 1
    num_out = x.shape[2] - overlap
    pieces = min(x.numel() // max_elements + 1, max(num_out, 1))
    bounds = [round(i * num_out / pieces) for i in range(pieces + 1)]
    outputs = [
        conv(x[:, :, start : end + overlap]) for start, end in zip(bounds[:-1], bounds[1:], strict=True) if end > start
    ]
    return torch.cat(outputs, dim=2)


class CausalConv3d(nn.Module):
    """3D convolution that is causal in time ('same' zero padding in space, history padding in time).

    Shapes: input [B, C_in, T, H, W] -> output [B, C_out, T, H, W] (spatial stride 1).
    The weights live in ``self.conv`` (an ``nn.Conv3d``), so state-dict keys are ``<name>.conv.weight`` as published.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.time_kernel = kernel_size
        spatial_pad = (kernel_size - 1) // 2
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            padding=(0, spatial_pad, spatial_pad),
            device=device,
            dtype=dtype,
        )

    @property
    def history(self) -> int:
        """How many earlier frames each output frame reads (k - 1)."""
        return self.time_kernel - 1

    def pad(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepend the history to ``x`` [B, C, T, H, W]: returns the padded input [B, C, k-1+T, H, W] and the
        cache for the next chunk (its last k-1 frames; None for a 1-frame kernel, which needs no history).

        ``past`` [B, C, k-1, H, W] is the previous chunk's cache; None at the start of the video.
        """
        if self.history == 0:
            return x, None
        if past is None:
            # Start of the video: the history is the first frame repeated (reference: "first" pad mode).
            past = x[:, :, :1].expand(-1, -1, self.history, -1, -1)
        padded = torch.cat([past, x], dim=2)
        # clone: a view would keep the whole padded chunk alive until the next chunk.
        return padded, padded[:, :, -self.history :].clone()

    def convolve(self, padded: torch.Tensor) -> torch.Tensor:
        """The convolution proper, on an input from :meth:`pad`: [B, C, k-1+T, H, W] -> [B, C_out, T, H, W]."""
        return conv3d_in_time_chunks(self.conv, padded)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Convolve ``x`` [B, C, T, H, W] after the history ``past``; returns the output and the next cache.

        Callers that can drop ``x`` before the convolution call :meth:`pad` and :meth:`convolve` themselves, so
        that ``x`` and its padded copy are not both alive while the output is allocated.
        """
        padded, new_past = self.pad(x, past)
        return self.convolve(padded), new_past
