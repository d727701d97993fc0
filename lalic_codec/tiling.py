"""Tiling: how an image is cut into the tiles that are coded independently (FORMAT.md 7).

:func:`plan_tiles` lays out overlapping tiles (a size given, or the largest that fit a pixel
budget), :func:`tile_plan` is the encoder's choice for a model and a memory budget
(:mod:`.memory`), :func:`centred_padding` and :func:`_to_tensor` pad a tile to a canvas the
network takes, and :func:`tile_weights` are the decoder's cross-fade weights where tiles overlap.
Used by :mod:`.pipeline`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from . import memory
from .errors import BadInputError, LimitExceededError
from .formats import container as fmt
from .memory import MIN_TILE

if TYPE_CHECKING:
    from .loading import LoadedModel


#: the reference encoder codes no tile on a canvas smaller than this (FORMAT.md 7.1): with a
#: single hyper-latent position (a 64x64 canvas) the bundled model reconstructs tiny images worse
#: than the same pixels inside a larger image (default-v3, quality 4: a 2x2 white image 41.7 dB on
#: a 64 canvas, 49.4 dB on 128; a 7x13 crop of kodim23 35.3 / 36.3 dB, against 36.6 dB inside the
#: full image), for about 90 more bytes. A 256 canvas was tried: it helps white and hurts other
#: flat colours, and doubles the bytes of tiny images.
MIN_CANVAS = 128


def centred_padding(h: int, w: int, multiple: int, minimum: int = 0) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding up to a multiple (and at least ``minimum``), centred as
    the official evaluation does."""
    H = max(-(-h // multiple) * multiple, minimum)
    W = max(-(-w // multiple) * multiple, minimum)
    left, top = (W - w) // 2, (H - h) // 2
    return left, W - w - left, top, H - h - top


#: tiles of the reference encoder overlap by at least this many pixels (FORMAT.md 7.2).  The
#: cross-fade hides the step between independently coded tiles: with no overlap the low-passed error
#: jumps 1.4-1.8 times its usual step at a seam, with 16-64 pixels not at all, and the 8 pixels on
#: each side of a seam come out 0.2-0.5 dB better than the same pixels coded in one piece (two
#: reconstructions averaged).  What it costs is rate: overlapped pixels are coded twice.
DEFAULT_OVERLAP = 32


def _axis_tiles(n: int, count: int, overlap: int, unit: int = 64) -> list[tuple[int, int]]:
    """(start, size) of ``count`` tiles covering [0, n): one tile of n, or sizes that are multiples
    of ``unit``, as equal as they can be, adding up to the fewest units that leave neighbours
    ``overlap`` pixels in common; what the sizes add beyond that widens the overlaps (spread
    evenly), so that no tile is padded: padding costs rate as overlap does, without its benefit."""
    if count <= 1:
        return [(0, n)]
    units = -(-(n + (count - 1) * overlap) // unit)
    sizes = [(units // count + (i < units % count)) * unit for i in range(count)]
    spare = sum(sizes) - n  # at least (count - 1) * overlap
    starts = [0]
    for i in range(count - 1):
        starts.append(starts[-1] + sizes[i] - (spare // (count - 1) + (i < spare % (count - 1))))
    return list(zip(starts, sizes))


def _axis_options(n: int, overlap: int, unit: int) -> list[tuple[int, int, int]]:
    """(count, largest padded size, sum of padded sizes) for each tile count along an axis of n
    pixels, from one tile to as many as keep every tile at least MIN_TILE pixels long."""
    out = [(1, -(-n // unit) * unit, -(-n // unit) * unit)]
    for c in range(2, n // MIN_TILE * 2 + 2):
        units = -(-(n + (c - 1) * overlap) // unit)  # as in _axis_tiles
        if units // c * unit < MIN_TILE:
            break
        out.append((c, -(-units // c) * unit, units * unit))
    return out


def plan_tiles(
    h: int, w: int, tile: int | None = None, overlap: int = DEFAULT_OVERLAP, max_pixels: int | None = None, unit: int = 64
) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of the tiles of an image, in raster order (FORMAT.md 7.2).

    With ``tile``: tiles of at most ``tile`` x ``tile`` pixels, the fewest along each axis.
    Otherwise tiles of at most ``max_pixels`` padded pixels and the format's per-tile limit, of any
    shape: of the grids whose tiles fit, the one that codes the fewest padded pixels, then
    the one with the fewest tiles; the smallest tiles (about MIN_TILE) if none fits.  Neighbours
    overlap by at least ``overlap`` pixels; sizes are multiples of ``unit`` (the model's padding
    multiple) except where one tile spans an axis."""
    if tile is not None:
        if tile % 64 or tile < 2 * overlap + 64:
            raise BadInputError(f"tile size {tile} must be a multiple of 64 and at least {2 * overlap + 64}")
        side = max(unit, tile // unit * unit)
        count = lambda n: 1 if n <= tile else -(-(n - overlap) // (side - overlap))  # noqa: E731
        return _grid(_axis_tiles(w, count(w), overlap, unit), _axis_tiles(h, count(h), overlap, unit))
    limit = fmt.Limits().tile_pixel_limit()
    limit = limit if max_pixels is None else min(limit, max_pixels)
    xs, ys = _axis_options(w, overlap, unit), _axis_options(h, overlap, unit)
    best = (None, xs[-1][0], ys[-1][0])
    for cx, mx, sx in xs:
        # the fewest rows whose tiles fit (largest sizes only shrink with the count; more rows than
        # that would only code more pixels in more tiles)
        lo, hi = 0, len(ys)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if mx * ys[mid][1] <= limit else (mid + 1, hi)
        if lo < len(ys):
            cy, my, sy = ys[lo]
            key = (sx * sy, cx * cy, abs(mx - my))
            if best[0] is None or key < best[0]:
                best = (key, cx, cy)
    return _grid(_axis_tiles(w, best[1], overlap, unit), _axis_tiles(h, best[2], overlap, unit))


def _grid(xs, ys) -> list[tuple[int, int, int, int]]:
    return [(x, y, tw, th) for y, th in ys for x, tw in xs]


def tile_plan(h: int, w: int, lm: LoadedModel, tile: int | None = None, max_memory: int | None = None) -> list[tuple[int, int, int, int]]:
    """The encoder's tiles for an h x w image: of at most ``tile`` x ``tile`` pixels if given, else
    the largest whose estimated peak memory (:mod:`.memory`) fits ``max_memory`` bytes (default:
    half the memory available).  An explicit budget too small for even the smallest tiles is a
    LimitExceededError; the default one is not (the smallest tiles are used)."""
    unit = lm.model.pad_multiple
    if tile is not None:
        return plan_tiles(h, w, tile, unit=unit)
    budget = memory.default_budget("encode", lm.device) if max_memory is None else max_memory
    room = (budget - memory.memory_needed(0, h * w, "encode")) // memory.MEMORY_PER_TILE_PIXEL
    plan = plan_tiles(h, w, None, max_pixels=max(0, room), unit=unit)
    biggest = max((-(-tw // unit) * unit) * (-(-th // unit) * unit) for _, _, tw, th in plan)
    if biggest > room and max_memory is not None:  # even the smallest tiles do not fit
        raise LimitExceededError(
            f"--max-memory {memory.format_memory(budget)} is too little to encode a {w}x{h} image: it needs at least "
            f"{memory.format_memory(memory.memory_needed(biggest, h * w, 'encode'))}"
        )
    return plan


def tile_weights(tile: fmt.Tile, width: int, height: int) -> np.ndarray:
    """Blending weight of every pixel of a tile (FORMAT.md 7.2): the distance from the pixel centre
    to the nearest tile edge that is not an image edge; 1 where the tile has no such edge."""
    xs = np.arange(tile.w, dtype=np.float32) + 0.5
    ys = np.arange(tile.h, dtype=np.float32) + 0.5
    dx = np.full(tile.w, np.inf, dtype=np.float32)  # arrays even where no edge applies (a tile
    dy = np.full(tile.h, np.inf, dtype=np.float32)  # spanning the whole width or height)
    if tile.x > 0:
        dx = np.minimum(dx, xs)
    if tile.x + tile.w < width:
        dx = np.minimum(dx, tile.w - xs)
    if tile.y > 0:
        dy = np.minimum(dy, ys)
    if tile.y + tile.h < height:
        dy = np.minimum(dy, tile.h - ys)
    wgt = np.minimum(dy[:, None], dx[None, :])
    return np.where(np.isinf(wgt), np.float32(1.0), wgt).astype(np.float32)


def _to_tensor(rgb: np.ndarray, pad, device) -> torch.Tensor:
    """(1, 3, H, W) samples in [0, 1], padded by repeating the edge pixels outwards.

    The decoder crops the padding away, so what fills it is the encoder's choice (FORMAT.md 7.1).
    Zeros (the official evaluation's choice) cost rate and damage the pixels next to them, the
    more so the smaller the image: a 1x1 tile is one pixel in 64x64 of black, and a flat colour
    came back at 7 dB.  Replicated edges add no new edge or colour: the same PSNR as mirroring on
    Kodak crops, at a lower rate."""
    x = torch.from_numpy(np.array(rgb.transpose(2, 0, 1))).float().div_(255.0).unsqueeze(0)
    l, r, t, b = pad
    if l or r or t or b:
        x = torch.nn.functional.pad(x, (l, r, t, b), mode="replicate")
    return x.to(device)
