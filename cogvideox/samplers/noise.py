"""Gaussian noise drawn the way the reference draws it, so that one seed gives one video in both.

The reference (``diffusers.utils.torch_utils.randn_tensor``) draws on the generator's device and then moves the
tensor: a CPU generator therefore gives the same numbers whatever device the latents live on. A list of
generators seeds each batch element separately, one ``[1, ...]`` draw per element, in batch order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device`` in ``dtype``.

    Args:
        shape: the full shape; its first entry is the batch size when ``generator`` is a list.
        generator: ``None`` (torch's global generator), one generator, or one generator per batch element.
        device: where the result goes (default: CPU).
        dtype: the dtype the numbers are drawn in (it matters: a draw in bfloat16 is not a rounded float32 draw).

    Raises:
        ValueError: a CUDA generator for a tensor on another device, or a list whose length is not the batch size.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    draw_device = device
    if generator is not None:
        gen_device = (generator[0] if isinstance(generator, Sequence) else generator).device
        if gen_device.type == "cpu":
            draw_device = torch.device("cpu")
        elif gen_device.type != device.type:
            raise ValueError(
                f"a {gen_device.type} generator cannot draw noise for a tensor on {device}: "
                f"create the generator on the CPU (reproducible everywhere) or on {device}"
            )
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {shape[0]}: give one generator, or one per element"
            )
        parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
