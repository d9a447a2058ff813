"""The encoder's output distribution: a Gaussian with diagonal covariance over the latents."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The reference clamps the log-variance to this range before taking exp (diffusers DiagonalGaussianDistribution).
LOGVAR_RANGE = (-30.0, 20.0)


def _draw_normal(
    shape: torch.Size, generator: torch.Generator | Sequence[torch.Generator] | None, like: torch.Tensor
) -> torch.Tensor:
    """Standard normal noise of ``shape`` in ``like``'s dtype, on ``like``'s device.

    Draws exactly as diffusers' ``randn_tensor``, so that the same generator gives the same sample: a CPU generator
    draws on the CPU and the result is moved; a list of generators draws one batch element from each.
    """
    device = like.device
    generators = list(generator) if isinstance(generator, Sequence) else None
    if generators is not None and len(generators) == 1:
        generator, generators = generators[0], None
    first = generators[0] if generators else generator
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(
                f"a generator on {first.device} cannot draw noise for latents on {device}: "
                "use a CPU generator or one on the latents' device"
            )
        draw_device = torch.device("cpu")
    if generators is None:
        return torch.randn(shape, generator=generator, device=draw_device, dtype=like.dtype).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}: pass one, or one per element")
    one = (1, *shape[1:])
    draws = [torch.randn(one, generator=g, device=draw_device, dtype=like.dtype) for g in generators]
    return torch.cat(draws).to(device)


class DiagonalGaussian:
    """N(mean, std^2) per latent element, built from the encoder's moments [B, 2C, T, H, W] (mean first).

    Attributes: ``mean``, ``logvar`` (clamped to [-30, 20]), ``std``, ``var``, each [B, C, T, H, W].
    """

    def __init__(self, moments: torch.Tensor) -> None:
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments of shape {tuple(moments.shape)}: dim 1 must stack mean and log-variance")
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, 1) drawn as the reference draws it (one generator, or one per batch element)."""
        return self.mean + self.std * _draw_normal(self.mean.shape, generator, self.moments)

    def mode(self) -> torch.Tensor:
        """The most likely latents: the mean [B, C, T, H, W]."""
        return self.mean

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype}, device={self.mean.device})"
