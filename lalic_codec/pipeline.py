"""Images to .lic bytes and back: the layer between the CLI (or the Python API) and the networks.

encode: image -> :func:`.imaging.prepare_image` (orientation, colour mode, metadata -> 8-bit RGB)
-> :func:`.tiling.tile_plan` -> each tile: :func:`.tiling.centred_padding` (edges replicated)
-> model.compress -> streams -> the post-filter fitted to the decoded tiles (:mod:`.postfilter`)
-> :mod:`.formats.container`.  decode: container -> the memory
budget (:func:`check_memory`) -> :func:`model_for_file` (:func:`.loading.load_model`, checked
against the header's weights fingerprint) -> :func:`check_tiles` -> each tile: model.decompress
-> crop, overlaps cross-faded (:func:`.tiling.tile_weights`) -> the post-filter, if the file has
one -> :func:`.imaging.restore_image`
(mode, alpha, metadata).

Where each concern lives:

* :mod:`.loading`: bundled models and weights files, the device, the per-process model cache;
* :mod:`.imaging`: opening images safely, colour modes and metadata, writing images, the file
  suffix tables, PSNR;
* :mod:`.tiling`: tile layouts, the padding of a tile, the cross-fade weights;
* here: encoding (with the search for small images) and decoding whole images, and what the
  decoder checks before it works (tiles against the model, memory).

Names that lived here before that split are imported from those modules; this module does not
re-export them.  About 400 lines: encoding and decoding share the container's tile layout and the
model interface, and the decoder's checks stay beside the decoder they guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import imaging, loading, memory, postfilter, tiling
from .errors import BadInputError, CodecError, CorruptFileError, LimitExceededError, MissingWeightsError, WeightsMismatchError
from .entropy.coder import SymbolMismatchError
from .formats import container as fmt

DEFAULT_QUALITY = 4.0
#: the tiles of a file may add up to at most this many times the padded image area (FORMAT.md 7.2):
#: the reference encoder's plans stay under half of it, and decoding work stays proportional to
#: the image's declared size, which the pixel limit bounds
MAX_TILE_AREA_FACTOR = 8
#: distinct tile edges (columns x rows) the coverage check works with; regular grids use few
MAX_TILE_GRID_CELLS = 2**22


def limits(max_pixels: int | None = None) -> fmt.Limits:
    """The reader's default limits, with another pixel limit if given (``--max-pixels``)."""
    return fmt.Limits() if max_pixels is None else fmt.Limits(max_pixels=max_pixels)


# ------------------------------------------------------------------------------------------------
# encode / decode


@dataclass
class EncodeResult:
    data: bytes
    width: int
    height: int
    quality: float
    notes: list

    @property
    def bpp(self) -> float:
        return 8.0 * len(self.data) / (self.width * self.height)


def _device_class(lm: loading.LoadedModel) -> int:
    """0 when the model's table choices are exact on any device (integer scale path), else the
    device family that computed them."""
    if lm.model.device_independent:
        return int(fmt.DeviceClass.DEVICE_INDEPENDENT)
    return int(fmt.DeviceClass.CUDA if lm.device.type == "cuda" else fmt.DeviceClass.CPU)


def decode_tile(lm: loading.LoadedModel, streams, pad, h: int, w: int, quality: torch.Tensor | None,
                merged: bool = False) -> torch.Tensor:
    """One tile's streams -> the tile as decoded, (3, h, w) floats in [0, 1]: the network's output on
    the padded canvas, cropped to the tile (FORMAT.md 7.1, :func:`crop_tile`).  :func:`decode_bytes`
    decodes every tile with it; the encoder's search for small images (:func:`_small_tile_search`)
    computes the same canvas from the latent it coded (no entropy decoding) and crops it at every
    placement it tries."""
    l, r, t, b = pad
    out = lm.model.decompress(streams, lm.model.hyper_shape(h + t + b, w + l + r), quality=quality, merged=merged)
    return crop_tile(out["x_hat"], pad, h, w)


def crop_tile(canvas: torch.Tensor, pad, h: int, w: int) -> torch.Tensor:
    """The h x w tile (3, h, w) inside a decoded canvas (1, 3, H, W) padded by ``pad`` (left, right, top, bottom)."""
    l, _, t, _ = pad
    return canvas[0, :, t : t + h, l : l + w]


#: whether :func:`encode_image` searches for a better coding of a small image (the tests turn it off
#: to compare against the plain coding)
SMALL_TILE_SEARCH = True
#: the encoder's rate-distortion-optimised rounding of y (``rdo_lagrangian`` of the model; the
#: official models round plainly); False rounds plainly with every model (tests, bench_rdo.py)
RDO = True
#: whether :func:`encode_image` writes each tile's streams as the segments of one stream (flags bit 3,
#: FORMAT.md 12.8: about 80 bytes less a tile than one stream each); False: one stream each
MERGED_STREAMS = True
#: whether :func:`encode_image` fits a post-filter to the image and keeps it where it pays
#: (FORMAT.md 7.3; models with a rate-distortion trade-off, the variable-rate ones); False: never
POSTFILTER = True
#: where :func:`_small_tile_search` tries the image on its canvas: these fractions of the free room
#: on each axis (0.5 is the centred padding), so 9 placements
PLACEMENTS = (0.25, 0.5, 0.75)
#: rounds of error feedback after the placement, and how much larger than the centred coding the
#: chosen one may be
SEARCH_ROUNDS = 4
SEARCH_SIZE_SLACK = 0.10


def _compress(lm: loading.LoadedModel, x: torch.Tensor, qt, rdo: bool | None = None):
    """One padded tile coded (``.streams``, ``.y_hat``); ``rdo``: the model's rate-distortion-optimised
    rounding (default :data:`RDO`) or plain rounding."""
    if rdo is None:
        rdo = RDO
    return lm.model.compress(x, quality=qt, rdo=None if rdo else 0.0, merged=MERGED_STREAMS)  # None: the model's Lagrangian


def _placements(pad) -> list[tuple[int, int, int, int]]:
    """Paddings (left, right, top, bottom) of an image on the canvas that ``pad`` (its centred
    padding) makes: ``pad`` first, then :data:`PLACEMENTS` of the free room on each axis."""
    free_w, free_h = pad[0] + pad[1], pad[2] + pad[3]
    pads = [tuple(pad)]
    for ft in PLACEMENTS:
        for fl in PLACEMENTS:
            l, t = int(free_w * fl), int(free_h * ft)
            if (l, free_w - l, t, free_h - t) not in pads:
                pads.append((l, free_w - l, t, free_h - t))
    return pads


def _small_tile_search(lm: loading.LoadedModel, rgb: np.ndarray, pad, qt) -> tuple[tuple[int, int, int, int], list[bytes], torch.Tensor]:
    """(padding, streams, the tile as decoded) of a small image (its one tile padded to at most
    MIN_CANVAS^2): the coding that decodes closest to ``rgb`` of those tried, at no more than 10 %
    more bytes than the plain, centred coding (``pad``).  Each try's reconstruction is the synthesis
    of the latent it coded, which is what a decoder computes from its streams (the same values,
    without the entropy decoding: a decoding costs about as much as the coding itself).

    Two searches, both the encoder's own choice (FORMAT.md 7.1: the stored padding is authoritative
    and what fills it is not recorded), so the decoder is unchanged:

    1. **Placement.**  On a canvas that is mostly padding the network's error depends strongly on
       where the image sits: a 32x32 window of the decoded 128x128 flat (200, 30, 90) canvas ranges
       from 37.9 to 43.3 dB (40.5 at the centre).  The image is coded at 9 places (:data:`PLACEMENTS`
       of the free room on each axis; identical canvases, as with a flat image, are coded once).
       Measured with default-v5 at quality 4 on crops of kodim23 (centred -> best of 9): 7x13
       35.82 -> 36.80 and 30.93 -> 32.61 dB, 5x9 39.32 -> 41.16, 16x16 27.42 -> 27.94, 64x64
       38.18 -> 38.38 dB, at -8 to +32 bytes.
    2. **Error feedback** from the best placement: each round codes ``x - e`` instead of ``x``, where
       ``e`` is the previous decode's error on the image (replicated into the padding), and decodes it
       as the decoder will.  It removes the systematic error of a canvas that is mostly padding (a
       16x16 white image: 44.7 -> 57.1 dB with default-v3).  Two rounds in a row that decode worse
       than the round before end it; at most four (SEARCH_ROUNDS).

    Both code y with plain rounding, not the rate-distortion-optimised rounding of larger images.

    Cost, measured with default-v6 at quality 4 on one thread (plain centred coding -> search): a
    32x32 flat (200, 30, 90) image 0.05 -> 0.31 s (one canvas: 41.04 -> 43.62 dB, 373 B both);
    7x13, 16x16 and 64x64 crops of kodim23 0.05 -> 1.1 s (35.85 -> 36.50, 27.20 -> 28.26, 36.62 ->
    37.21 dB; +4 to +20 bytes).  Larger canvases are not searched (a 768x8 strip: 768x128).  Taking
    each try's reconstruction from its latent instead of decoding its streams made the same files
    in 0.55x the time (default-v10 and a tiny model, 7x13, 48x64 and 128x96 images at qualities 2
    and 6, one thread: 62 -> 34 s for the twelve, on a busy machine)."""
    h, w = rgb.shape[:2]
    target = torch.from_numpy(np.array(rgb, dtype=np.float32)).to(lm.device)

    def code(inp):
        # plain rounding: the search wants the least error within its byte budget, and a tiny
        # image's bytes are mostly headers, so trading error for rate does not pay here
        coded = _compress(lm, inp, qt, rdo=False)
        return coded.streams, lm.model.reconstruct(coded.y_hat, qt)

    def error(canvas, p):
        crop = crop_tile(canvas, p, h, w)
        return crop, float((torch.from_numpy(imaging.to_uint8(crop)).to(target.device).float() - target).square().mean())

    # 1. placement
    coded: dict[bytes, tuple] = {}
    candidates = []
    for p in _placements(pad):
        x = tiling._to_tensor(rgb, p, lm.device)
        key = x.cpu().numpy().tobytes()
        if key not in coded:
            coded[key] = code(x)
        streams, canvas = coded[key]
        crop, err = error(canvas, p)
        candidates.append((err, p, x, streams, crop))
    limit = sum(map(len, candidates[0][3])) * (1 + SEARCH_SIZE_SLACK)
    best_err, pad, x, best, crop = min((c for c in candidates if sum(map(len, c[3])) <= limit), key=lambda c: c[0])
    l, r, t, b = pad
    # 2. error feedback
    best_crop = crop
    inp, prev_err, worse = x, best_err, 0
    for _ in range(SEARCH_ROUNDS):
        if best_err == 0:
            break
        e = (crop - crop_tile(x, pad, h, w))[None]
        inp = inp - torch.nn.functional.pad(e, (l, r, t, b), mode="replicate")
        streams, canvas = code(inp)
        crop, err = error(canvas, pad)
        worse = worse + 1 if err >= prev_err else 0
        if worse == 2:
            break
        prev_err = err
        if err < best_err and sum(map(len, streams)) <= limit:
            best, best_err, best_crop = streams, err, crop
    return pad, best, best_crop


def _postfilter_fits(biggest: int, h: int, w: int, lm: loading.LoadedModel, max_memory: int | None) -> bool:
    """Whether the encoder's budget (``max_memory``, default :func:`.memory.default_budget`) holds the
    post-filter's image-sized buffers besides tiles of at most ``biggest`` padded pixels."""
    budget = memory.default_budget("encode", lm.device) if max_memory is None else max_memory
    return memory.memory_needed(biggest, h * w, "encode") + memory.POSTFILTER_PER_IMAGE_PIXEL * h * w <= budget


def encode_image(
    im: Image.Image, lm: loading.LoadedModel, quality: float | None = None, tile: int | None = None, max_memory: int | None = None,
    plan: list[tuple[int, int, int, int]] | None = None,
) -> EncodeResult:
    """Code an image into .lic bytes.  Tiles (FORMAT.md 7.2): ``plan`` (x, y, w, h) if given, else
    :func:`.tiling.tile_plan` (at most ``tile`` x ``tile`` pixels, or the largest that fit ``max_memory``
    bytes, by default half the memory available)."""
    prep = imaging.prepare_image(im)
    H, W = prep.rgb.shape[:2]
    if lm.variable_rate:
        q = DEFAULT_QUALITY if quality is None else float(quality)
        L = lm.model.num_levels
        if not (1.0 <= q <= L):
            raise BadInputError(f"quality must be between 1 and {L}, got {q:g}")
    else:
        if quality is not None:
            prep.notes.append(f"model {lm.model_id} has a fixed rate; --quality ignored")
        q = 0.0
    qt = torch.tensor([q], device=lm.device) if lm.variable_rate else None
    if plan is None:
        plan = tiling.tile_plan(H, W, lm, tile, max_memory)
    lim = fmt.Limits()
    biggest = 0  # padded pixels of the largest tile
    for tx, ty, tw, th in plan:  # refuse before coding what the writer (and a reader) would refuse
        l, r, t, b = tiling.centred_padding(th, tw, lm.model.pad_multiple, tiling.MIN_CANVAS)
        biggest = max(biggest, (tw + l + r) * (th + t + b))
        if (tw + l + r) * (th + t + b) > lim.tile_pixel_limit():
            raise LimitExceededError(
                f"tiles of {tw + l + r}x{th + t + b} pixels are more than the limit of {lim.tile_pixel_limit()} "
                "pixels per tile (use a smaller --tile)"
            )
    # the post-filter is fitted to what any decoder will reconstruct (FORMAT.md 7.3)
    canvas = None
    if POSTFILTER and lm.variable_rate:
        if _postfilter_fits(biggest, H, W, lm, max_memory):
            canvas = Canvas(W, H, len(plan), rounded=False)
        else:
            prep.notes.append("no post-filter: the memory budget (--max-memory) has no room for it")
    tiles = []
    for tx, ty, tw, th in plan:
        pad = tiling.centred_padding(th, tw, lm.model.pad_multiple, tiling.MIN_CANVAS)
        rgb = prep.rgb[ty : ty + th, tx : tx + tw]
        with torch.inference_mode():
            if SMALL_TILE_SEARCH and len(plan) == 1 and (tw + pad[0] + pad[1]) * (th + pad[2] + pad[3]) <= tiling.MIN_CANVAS**2:
                pad, streams, x_hat = _small_tile_search(lm, rgb, pad, qt)
            else:
                coded = _compress(lm, tiling._to_tensor(rgb, pad, lm.device), qt)
                streams = coded.streams
                # the decoder's output from the coded latent (decode_tile, without the entropy decoding)
                x_hat = None if canvas is None else crop_tile(lm.model.reconstruct(coded.y_hat, qt), pad, th, tw)
                del coded
            tile = fmt.Tile(tx, ty, tw, th, pad, streams)
            if canvas is not None:
                canvas.add(tile, x_hat)
        tiles.append(tile)
        del streams, x_hat
    header = fmt.Header(
        model_id=lm.model_id,
        weights_fingerprint=lm.fingerprint,
        quality=q,
        width=W,
        height=H,
        colour_mode=prep.mode,
        bit_depth=prep.bit_depth if prep.mode in (fmt.ColourMode.L, fmt.ColourMode.LA) else 8,
        device_class=_device_class(lm),
        streams_per_tile=len(tiles[0].streams),
    )
    alpha = prep.alpha.tobytes() if prep.alpha is not None else None
    if alpha is not None and header.bit_depth == 16:
        alpha = (prep.alpha.astype("<u2") * 257).tobytes()
    lic = fmt.LicFile(header=header, metadata=prep.metadata, alpha=alpha, tiles=tiles, merged=MERGED_STREAMS)
    if canvas is not None:
        pf, _ = postfilter.fit(prep.rgb, canvas.result(), float(lm.model.lambda_for(qt)))
        if pf is not None:
            lic.postfilter = pf.to_bytes()
            lic.postfilter_classified = isinstance(pf, postfilter.ClassifiedFilter)
    data = fmt.write(lic)
    return EncodeResult(data, W, H, q, prep.notes)


def encode_to_target(
    im: Image.Image, lm: loading.LoadedModel, target_bpp: float, iterations: int = 7, tile: int | None = None, on_trial=None,
    max_memory: int | None = None,
) -> EncodeResult:
    """The highest quality whose file is at most ``target_bpp`` (bisection over continuous quality).

    If even the lowest quality is larger, that smallest file is returned with a note.  ``on_trial``,
    if given, is called with the :class:`EncodeResult` of each quality tried (progress)."""
    if not lm.variable_rate:
        raise BadInputError(f"model {lm.model_id} has a fixed rate; --target-bpp needs a variable-rate model")

    H, W = imaging.prepare_image(im).rgb.shape[:2]
    plan = tiling.tile_plan(H, W, lm, tile, max_memory)  # once: every trial codes the same tiles

    def trial(q: float) -> EncodeResult:
        res = encode_image(im, lm, q, plan=plan)
        if on_trial is not None:
            on_trial(res)
        return res

    lo, hi = 1.0, float(lm.model.num_levels)
    best = trial(lo)
    if best.bpp > target_bpp:
        best.notes.append(f"target {target_bpp:g} bpp is below the smallest file this model makes")
        return best
    top = trial(hi)
    if top.bpp <= target_bpp:
        return top
    for _ in range(iterations):
        mid = round((lo + hi) / 2, 4)
        res = trial(mid)
        if res.bpp <= target_bpp:
            lo, best = mid, res
        else:
            hi = mid
    return best


def model_for_file(header: fmt.Header, weights: str | Path | None, device: str | None) -> loading.LoadedModel:
    if weights is None:
        if header.model_id not in loading.BUNDLED:
            raise MissingWeightsError(
                f"this file was encoded with model {header.model_id!r} (weights {header.weights_fingerprint.hex()}); "
                "pass the same weights with --weights PATH"
            )
        lm = loading.load_model(header.model_id, None, device)
    else:
        lm = loading.load_model(header.model_id, weights, device)
    if lm.fingerprint != header.weights_fingerprint:
        raise WeightsMismatchError(
            f"the file was encoded with weights {header.weights_fingerprint.hex()}, "
            f"but the weights given have fingerprint {lm.fingerprint.hex()}"
        )
    return lm


def check_tiles(lic: fmt.LicFile, lm: loading.LoadedModel) -> None:
    """What the model layer checks about the tiles before decoding anything (FORMAT.md 7, 11):
    the stream count, padded sizes the network can take, coverage of the whole image, and a bound
    on the total work.  Raises CorruptFileError."""
    h = lic.header
    m = lm.model.size_multiple
    expected = 1 if lic.merged else lm.model.num_streams()  # merged: the model's streams as segments of one
    if h.streams_per_tile != expected:
        raise fmt_corrupt(f"the file has {h.streams_per_tile} streams per tile; model {h.model_id} uses {lm.model.num_streams()}")
    work = 0
    for i, tile in enumerate(lic.tiles):
        l, r, t, b = tile.pad
        Hp, Wp = tile.h + t + b, tile.w + l + r
        if Hp % m or Wp % m:
            raise fmt_corrupt(f"tile {i} at ({tile.x}, {tile.y}): padded size {Wp}x{Hp} is not a multiple of {m}")
        work += Hp * Wp
    if work > MAX_TILE_AREA_FACTOR * (h.width + 128) * (h.height + 128):
        raise fmt_corrupt(
            f"the tiles add up to {work} padded pixels, more than {MAX_TILE_AREA_FACTOR} times the "
            f"{h.width}x{h.height} image (overlapping or oversized tiles)"
        )
    _check_coverage(lic)


def _check_coverage(lic: fmt.LicFile) -> None:
    """Every pixel lies in some tile: a 2-D difference array over the grid of distinct tile edges."""
    h = lic.header
    x0 = np.array([t.x for t in lic.tiles], dtype=np.int64)
    y0 = np.array([t.y for t in lic.tiles], dtype=np.int64)
    x1 = x0 + np.array([t.w for t in lic.tiles], dtype=np.int64)
    y1 = y0 + np.array([t.h for t in lic.tiles], dtype=np.int64)
    xs = np.unique(np.concatenate([x0, x1, [0, h.width]]))
    ys = np.unique(np.concatenate([y0, y1, [0, h.height]]))
    if xs.size * ys.size > MAX_TILE_GRID_CELLS:
        raise fmt_corrupt(f"the {len(lic.tiles)} tiles do not form a regular layout (too many distinct edges)")
    diff = np.zeros((ys.size, xs.size), dtype=np.int32)  # at most 2**22 cells: 16 MiB
    i0, i1 = np.searchsorted(xs, x0), np.searchsorted(xs, x1)
    j0, j1 = np.searchsorted(ys, y0), np.searchsorted(ys, y1)
    np.add.at(diff, (j0, i0), 1)
    np.add.at(diff, (j0, i1), -1)
    np.add.at(diff, (j1, i0), -1)
    np.add.at(diff, (j1, i1), 1)
    cover = diff.cumsum(0).cumsum(1)[: ys.size - 1, : xs.size - 1]
    if not (cover > 0).all():
        j, i = np.argwhere(cover == 0)[0]
        raise fmt_corrupt(f"the tiles do not cover the whole image (pixel ({xs[i]}, {ys[j]}) is in none)")


def check_memory(lic: fmt.LicFile, max_memory: int | None = None, device: str | None = "auto") -> None:
    """Refuse, with what it would take, a file whose decoding would need more than ``max_memory``
    bytes (default: all the memory available, no limit where that cannot be read) by the estimate of
    :mod:`.memory` (its largest padded tile and its image size).  Raises LimitExceededError."""
    h = lic.header
    sizes = [(t.w + t.pad[0] + t.pad[1], t.h + t.pad[2] + t.pad[3]) for t in lic.tiles]
    tw, th = max(sizes, key=lambda s: s[0] * s[1])
    need = memory.memory_needed(tw * th, h.width * h.height, "decode")
    if max_memory is None:
        budget, source = memory.default_budget("decode", loading.resolve_device(device)), "the memory available"
    else:
        budget, source = max_memory, "--max-memory"
    if budget is not None and need > budget:
        raise LimitExceededError(
            f"decoding this {h.width}x{h.height} image needs about {memory.format_memory(need)} (its tiles are up to "
            f"{tw}x{th} pixels), more than {source}: {memory.format_memory(budget)}"
            + (" (--max-memory SIZE allows more)" if max_memory is None else "")
        )


@dataclass
class DecodeResult:
    image: Image.Image
    header: fmt.Header
    notes: list


def decode_bytes(
    data: bytes,
    weights: str | Path | None = None,
    device: str | None = "auto",
    limits: fmt.Limits | None = None,
    high_bit_depth: bool = True,
    max_memory: int | None = None,
) -> DecodeResult:
    """Decode a .lic file to a Pillow image in its original mode, with its metadata in ``info``.

    ``high_bit_depth``: a file whose header records 16-bit grayscale comes back as mode ``I;16``
    (samples v * 257, so 8-bit precision) instead of ``L``; see :func:`.imaging.restore_image`.
    ``max_memory``: refuse (LimitExceededError, before loading the model) a file whose tiles would
    need more bytes than this (:func:`check_memory`; default: the memory available)."""
    try:
        lic = fmt.read(data, limits)  # every declared size checked against the file and the limits
    except LimitExceededError as e:
        max_pixels = (limits or fmt.Limits()).max_pixels
        if "image is " in str(e) and str(e).endswith(f"limit of {max_pixels}"):
            raise LimitExceededError(f"{e} pixels ({imaging._limit_source(max_pixels)})") from None
        raise
    h = lic.header
    check_memory(lic, max_memory, device)
    lm = model_for_file(h, weights, device)
    check_tiles(lic, lm)  # and against the model, before any tensor is allocated
    if lm.variable_rate and not (1.0 <= h.quality <= lm.model.num_levels):
        raise fmt_corrupt(f"header: quality {h.quality:g} is outside the model's range 1..{lm.model.num_levels}")
    q = torch.tensor([h.quality], device=lm.device) if lm.variable_rate else None
    if lic.postfilter is None:
        canvas = reconstruct(lic, lm, q)
    else:
        try:
            pf = postfilter.parse(lic.postfilter, lic.postfilter_classified)
        except ValueError as e:
            raise CorruptFileError(f"post-filter block: {e}") from None
        canvas = postfilter.apply(reconstruct(lic, lm, q, rounded=False), pf)
    return DecodeResult(imaging.restore_image(canvas, lic, high_bit_depth), h, [])


class Canvas:
    """The image that tiles of the width x height image reconstruct (FORMAT.md 7.2), tile by tile:
    :meth:`add` each tile's decoded values, :meth:`result` the image, (H, W, 3) uint8, or with
    ``rounded=False`` the float32 code values before the rounding, which the post-filter (FORMAT.md
    7.3) works on.  A single tile is rounded directly; several are cross-faded in float32."""

    def __init__(self, width: int, height: int, tiles: int, rounded: bool = True):
        self.width, self.height, self.rounded = width, height, rounded
        self.single = tiles == 1 and rounded
        if self.single:
            self.canvas = np.zeros((height, width, 3), dtype=np.uint8)
        else:  # weighted sums of overlapping tiles
            self.acc = np.zeros((height, width, 3), dtype=np.float32)
            self.wsum = np.zeros((height, width, 1), dtype=np.float32)

    def add(self, tile: fmt.Tile, x_hat: torch.Tensor) -> None:
        """``x_hat``: the tile as decoded, (3, h, w) in [0, 1] (:func:`decode_tile`)."""
        rows, cols = slice(tile.y, tile.y + tile.h), slice(tile.x, tile.x + tile.w)
        if self.single:
            self.canvas[rows, cols] = imaging.to_uint8(x_hat)
            return
        wgt = tiling.tile_weights(tile, self.width, self.height)[..., None]
        self.acc[rows, cols] += wgt * x_hat.float().mul(255.0).permute(1, 2, 0).cpu().numpy()
        self.wsum[rows, cols] += wgt

    def result(self) -> np.ndarray:
        if self.single:
            return self.canvas
        # every pixel lies in a tile (check_tiles; the encoder's plans), so has a positive weight
        acc = self.acc
        np.divide(acc, self.wsum, out=acc)  # in place: no image-sized temporaries (the same float32 values)
        del self.acc, self.wsum
        if not self.rounded:
            return acc
        acc += 0.5
        np.floor(acc, out=acc)
        return np.clip(acc, 0, 255, out=acc).astype(np.uint8)


def reconstruct(lic: fmt.LicFile, lm: loading.LoadedModel, q: torch.Tensor | None, rounded: bool = True) -> np.ndarray:
    """The image the tiles of ``lic`` decode to (:class:`Canvas`)."""
    h = lic.header
    canvas = Canvas(h.width, h.height, len(lic.tiles), rounded)
    for tile in lic.tiles:
        try:
            with torch.inference_mode():
                x_hat = decode_tile(lm, tile.streams, tile.pad, tile.h, tile.w, q, lic.merged)
        except SymbolMismatchError:
            raise device_mismatch(h, lm, tile) from None
        canvas.add(tile, x_hat)
        del x_hat
    return canvas.result()


def device_mismatch(h: fmt.Header, lm: loading.LoadedModel, tile: fmt.Tile) -> CodecError:
    from .errors import DeviceMismatchError

    where = f"tile at ({tile.x}, {tile.y})"
    if h.device_class == fmt.DeviceClass.DEVICE_INDEPENDENT:
        return DeviceMismatchError(f"{where}: decoded symbols do not match the encoder's checksum (corrupt file or decoder bug)")
    if h.device_class not in fmt.DeviceClass._value2member_map_:
        return DeviceMismatchError(
            f"{where}: decoded symbols do not match the encoder's checksum (corrupt file, or entropy "
            f"parameters from an unknown device class {h.device_class})"
        )
    enc = fmt.DeviceClass(h.device_class).name.lower()
    here = "cuda" if lm.device.type == "cuda" else "cpu"
    return DeviceMismatchError(
        f"{where}: decoding desynchronised (symbols do not match the encoder's checksum); this file's entropy "
        f"parameters were computed on {enc} and this decoder ran on {here}: decode it on a {enc} device"
    )


def fmt_corrupt(msg: str):
    from .errors import CorruptFileError

    return CorruptFileError(msg)

