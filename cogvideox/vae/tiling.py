"""Spatial tiling: run the encoder or decoder on overlapping tiles and blend the seams (the reference's scheme).

A tile is ``tile`` input pixels (or latents) tall/wide; tiles start every ``stride`` = int(tile * (1 - overlap)).
Each processed tile is blended into its upper and left neighbours over ``blend`` output rows/columns with linear
weights (the neighbour's weight falls from 1 to 0), then cropped to ``limit`` = out_tile - blend rows/columns and
placed in the output. Tiles are visited row by row, and a tile blends with its neighbours *after* they were blended
themselves (as the reference does, in place).

Memory: the reference keeps every processed tile, then the concatenated rows, then the output. Here the output is
allocated once and each tile's crop is written straight into it; only the bottom ``blend`` rows of the previous row
of tiles and the right ``blend`` columns of the previous tile are kept for blending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileGrid:
    """The geometry along one axis (height or width), in input and output units."""

    tile: int  # input extent of a tile
    stride: int  # input distance between tile starts
    blend: int  # output rows/columns blended with the previous tile
    limit: int  # output rows/columns kept of each tile

    def starts(self, size: int) -> range:
        return range(0, size, self.stride)

    def output_size(self, size: int, out_of: Callable[[int], int]) -> int:
        """Output extent for an input extent ``size``, given ``out_of`` (tile input extent -> output extent)."""
        return sum(min(out_of(min(self.tile, size - start)), self.limit) for start in self.starts(size))


def make_grid(tile_in: int, tile_out: int, overlap: float, *, name: str) -> TileGrid:
    """Tile geometry as the reference computes it (``int`` truncations included).

    Args:
        tile_in: tile extent in input units (pixels to encode, latents to decode).
        tile_out: the same tile's extent in output units.
        overlap: fraction of a tile shared with the next one, in [0, 1).
        name: the setting's name, for error messages.
    """
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    if stride < 1:
        raise ValueError(
            f"{name}: a tile of {tile_in} with overlap {overlap} leaves no step between tiles; "
            "use larger tiles or a smaller overlap factor"
        )
    return TileGrid(tile=tile_in, stride=stride, blend=blend, limit=tile_out - blend)


def _blend_weights(extent: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (previous, current) for rows 0..extent-1: (1 - y/extent, y/extent), computed in float64 like the
    reference's Python floats, then rounded to float32."""
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    return (1 - ramp).to(like.device, torch.float32), ramp.to(like.device, torch.float32)


def _blend_(previous: torch.Tensor, current: torch.Tensor, extent: int, dim: int) -> None:
    """Blend the first ``extent`` slices of ``current`` along ``dim`` with the last ones of ``previous``, in place."""
    extent = min(previous.shape[dim], current.shape[dim], extent)
    if extent <= 0:
        return
    w_prev, w_cur = _blend_weights(extent, current)
    shape = [1] * current.ndim
    shape[dim] = extent
    w_prev, w_cur = w_prev.view(shape), w_cur.view(shape)
    head = current.narrow(dim, 0, extent)
    tail = previous.narrow(dim, previous.shape[dim] - extent, extent)
    head.copy_(tail.float() * w_prev + head.float() * w_cur)


def run_tiled(
    x: torch.Tensor,
    process: Callable[[torch.Tensor], torch.Tensor],
    rows: TileGrid,
    cols: TileGrid,
    out_of: Callable[[int], int],
) -> torch.Tensor:
    """Apply ``process`` ([B, C, T, h, w] -> [B, C', T', h', w']) to overlapping tiles of ``x`` and blend them.

    Args:
        x: input [B, C, T, H, W].
        process: the encoder or decoder run over all frames of one tile.
        rows, cols: tile geometry along height and width.
        out_of: a tile's output extent from its input extent (decode: n * 8; encode: n // 8, per level halving).

    Raises:
        ValueError: the tile geometry would not cover the output exactly (the crops of the tiles do not add up to
            the untiled output size); the reference would silently return a wrongly sized result.
    """
    height, width = x.shape[-2:]
    out_h, out_w = rows.output_size(height, out_of), cols.output_size(width, out_of)
    if (out_h, out_w) != (out_of(height), out_of(width)):
        raise ValueError(
            f"tiling settings do not tile a {height}x{width} input: the tile crops add up to {out_h}x{out_w}, not "
            f"{out_of(height)}x{out_of(width)}. The step between tiles times the compression must equal the kept "
            f"part of a tile (rows: step {rows.stride}, kept {rows.limit}; columns: step {cols.stride}, kept "
            f"{cols.limit}); the defaults (half of sample_height/sample_width, overlaps 1/6 and 1/5) satisfy this"
        )
    out: torch.Tensor | None = None
    above: dict[int, torch.Tensor] = {}  # column start -> bottom rows of the blended tile above
    top = 0
    for i in rows.starts(height):
        left: torch.Tensor | None = None
        row_above: dict[int, torch.Tensor] = {}
        col = 0
        crop_h = 0
        for j in cols.starts(width):
            tile = process(x[:, :, :, i : i + rows.tile, j : j + cols.tile])
            if j in above:
                _blend_(above[j], tile, rows.blend, dim=3)
            if left is not None:
                _blend_(left, tile, cols.blend, dim=4)
            if rows.blend > 0:
                row_above[j] = tile[:, :, :, -rows.blend :].clone()
            left = tile[..., -cols.blend :].clone() if cols.blend > 0 else None
            crop = tile[:, :, :, : rows.limit, : cols.limit]
            if out is None:
                out = crop.new_empty((*crop.shape[:3], out_h, out_w))
            crop_h = crop.shape[3]
            out[:, :, :, top : top + crop_h, col : col + crop.shape[4]] = crop
            col += crop.shape[4]
        above = row_above
        top += crop_h
    assert out is not None  # at least one tile: height and width are positive
    return out
