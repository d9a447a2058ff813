"""Parallel VAE decode: the ranks decode different spatial tiles, one rank blends them.

The tiled decode (:mod:`cogvideox.vae.tiling`) runs the decoder on overlapping latent tiles, each over all frames
(the causal-convolution cache runs along time, so frames cannot be split without changing the result), then
blends every tile into its upper and left neighbours and crops it. The decoder calls are independent of one
another; only the blending is ordered. So:

1. every rank decodes tiles ``rank, rank + N, rank + 2N, ...`` of the row-major tile list;
2. in rounds of ``N`` tiles (tile ``k`` of every rank, padded to the full tile size), ``dist.gather`` brings
   them to the destination rank, which hands them to the very same ``run_tiled`` blending in the same order.

The result is the single-process tiled decode with the same settings (the decoder ran on the same tile tensors),
and the destination holds at most one round of tiles besides the output. A video smaller than a tile, or with
tiling off, is not split: the destination decodes it alone and the other ranks skip the decode.

Cost: each rank decodes ``ceil(T / N)`` of the ``T`` tiles (the 1.5 at 768x1360 with the default 240x360 tiles:
T = 4 x 5 = 20); the destination receives the decoded tiles, ``3 x F x H x W`` values and the overlaps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..vae.tiling import run_tiled
from .groups import collective_device, global_rank


def decode_parallel(
    vae: torch.nn.Module, z: torch.Tensor, group: dist.ProcessGroup | None = None, dst: int = 0
) -> torch.Tensor | None:
    """Decode unscaled latents ``z`` ``[B, C, F', h, w]`` over the ranks of ``group`` (every rank calls it with the
    same ``z``). Returns the video ``[B, 3, F, 8h, 8w]`` on rank ``dst`` of the group, None on the others.

    Follows the VAE's settings: tiling (``vae.enable_tiling``) decides the tiles, slicing decodes the batch one
    video at a time, exactly as :meth:`VAE.decode` would on one process.
    """
    z = vae.prepare_latents(z)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if not vae.decodes_in_tiles(*z.shape[-2:]) or world == 1:
        return vae.decode(z) if rank == dst else None
    videos = z.split(1) if vae.use_slicing and z.shape[0] > 1 else [z]
    decoded = [_decode_tiled(vae, item, group, rank, world, dst) for item in videos]
    return torch.cat(decoded) if rank == dst else None


def _decode_tiled(
    vae: torch.nn.Module, z: torch.Tensor, group: dist.ProcessGroup | None, rank: int, world: int, dst: int
) -> torch.Tensor | None:
    rows, cols = vae.decode_tile_grids()
    ratio = vae.spatial_compression
    height, width = z.shape[-2:]
    origins = [(i, j) for i in rows.starts(height) for j in cols.starts(width)]  # run_tiled's visiting order
    mine = {
        index: vae.decode_tile(z[:, :, :, i : i + rows.tile, j : j + cols.tile])
        for index, (i, j) in enumerate(origins)
        if index % world == rank
    }
    # Every rank needs the decoded channel and frame counts to size the padded buffers; a rank with no tile knows
    # neither, so they travel with the decode (nothing read from the VAE's config).
    sizes = [max((t.shape[dim] for t in mine.values()), default=0) for dim in (1, 2)]
    sizes = torch.tensor(sizes, device=collective_device(group))
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    channels, frames = (int(n) for n in sizes.tolist())
    full = (z.shape[0], channels, frames, rows.tile * ratio, cols.tile * ratio)

    def rounds() -> Iterator[list[torch.Tensor] | None]:
        """One gather per round of ``world`` tiles; yields the received tiles (on ``dst``) in order."""
        for first in range(0, len(origins), world):
            tile = mine.get(first + rank)
            padded = z.new_zeros(full)
            if tile is not None:
                padded[..., : tile.shape[3], : tile.shape[4]] = tile
            received = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
            dist.gather(padded, received, dst=global_rank(group, dst), group=group)
            yield received

    if rank != dst:
        for _ in rounds():
            pass
        return None

    def tiles_in_order() -> Iterator[torch.Tensor]:
        index = 0
        for received in rounds():
            for tile in received:
                if index == len(origins):
                    break
                i, j = origins[index]
                tile_h, tile_w = min(rows.tile, height - i) * ratio, min(cols.tile, width - j) * ratio
                yield tile[..., :tile_h, :tile_w]
                index += 1

    stream = tiles_in_order()

    def next_tile(latent_tile: torch.Tensor) -> torch.Tensor:
        tile = next(stream)
        if tile.shape[-2:] != (latent_tile.shape[-2] * ratio, latent_tile.shape[-1] * ratio):
            raise RuntimeError("parallel decode: tiles arrived out of run_tiled's order (a bug; please report)")
        return tile

    return run_tiled(z, next_tile, rows, cols, out_of=lambda n: n * ratio)
