"""Images to .lic bytes and back: the layer between the CLI (or the Python API) and the networks.

encode: image -> orientation, colour mode, metadata -> RGB tensor -> centred padding (edges
replicated) -> model.compress -> streams -> container.  decode: container -> model (checked
against the header's weights fingerprint) -> model.decompress -> crop -> restore mode, alpha and
metadata.
"""

from __future__ import annotations

import io
import math
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from . import loading, memory, tiling
from .errors import BadInputError, CodecError, LimitExceededError, MissingWeightsError, WeightsMismatchError
from .entropy.coder import SymbolMismatchError
from .formats import container as fmt

DEFAULT_QUALITY = 4.0
#: largest image accepted by default (pixels); the container enforces the same bound
MAX_PIXELS = fmt.Limits().max_pixels
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
# images in


@dataclass
class PreparedImage:
    rgb: np.ndarray  # (H, W, 3) uint8
    mode: fmt.ColourMode
    bit_depth: int
    alpha: np.ndarray | None  # (H, W) uint8 or uint16
    metadata: fmt.Metadata
    notes: list


#: image formats ``open_image`` accepts (Pillow names).  Pillow identifies files by content, not by
#: name, so without this list a stranger's "photo.png" could reach any plugin, including ones that
#: start external programs (EPS runs Ghostscript) or parse rarely used formats.
INPUT_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "PPM", "GIF", "TGA", "AVIF", "JXL")


def open_image(data: bytes | str | Path, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open and fully decode an image, refusing decompression bombs before they are decoded.

    Only :data:`INPUT_FORMATS` are opened.  Any failure is a :class:`BadInputError` (or
    :class:`LimitExceededError` for an image over ``max_pixels``), whatever Pillow raised, that
    starts with ``name`` (a path's own name by default) and says what the file is."""
    import warnings

    if name is None and isinstance(data, (str, Path)):
        name = str(data)
    prefix = f"{name}: " if name else ""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    Image.init()
    formats = [f for f in INPUT_FORMATS if f in Image.OPEN]
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # Image.open's check is the one just below (Pillow's message states twice the limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the limit is enforced below; metadata noise
            im = Image.open(src, formats=formats)
            if im.width * im.height > max_pixels:
                raise LimitExceededError(f"{prefix}{_over_limit(im.width * im.height, max_pixels, f'{im.width}x{im.height} = ')}")
            Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's later checks (other frames, tiles)
            getattr(im, "n_frames", 1)  # counted (and cached) under the limit: GIF reads every frame
            im.load()
        return im
    except Image.DecompressionBombError as e:  # say our limit, not Pillow's double of it
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise LimitExceededError(f"{prefix}{_over_limit(int(m[1]) if m else None, max_pixels)}") from None
    except MemoryError:
        raise LimitExceededError(f"{prefix}image too large: out of memory while decoding it") from None
    except CodecError:
        raise
    except Exception as e:  # Pillow's decoders raise many kinds (OSError, SyntaxError, EOFError, struct.error...)
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise BadInputError(f"{prefix}cannot read the image: {e.strerror}") from None
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError) or "cannot identify image file" in detail:
            detail = ""  # Pillow's message names a file object (<_io.BytesIO object at 0x...>)
        raise BadInputError(f"{prefix}{_unreadable(_head(data), detail)}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _limit_source(max_pixels: int) -> str:
    """Where the pixel limit in force comes from, as messages say it."""
    return "the default; --max-pixels N changes it" if max_pixels == MAX_PIXELS else f"--max-pixels {max_pixels}"


def _over_limit(pixels: int | None, max_pixels: int, size: str = "") -> str:
    """The message for an image over the pixel limit: the limit in force and where it comes from."""
    size = f"{size}{pixels} pixels, " if pixels is not None else ""
    return f"image is {size}more than the limit of {max_pixels} pixels ({_limit_source(max_pixels)})"


def _head(data: bytes | str | Path, n: int = 4096) -> bytes:
    """The first ``n`` bytes of an image given as bytes or a path (b"" if it cannot be read)."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data[:n])
    try:
        with open(data, "rb") as f:
            return f.read(n)
    except (OSError, TypeError):
        return b""


#: what files are, by their first bytes: (magic, Pillow's plugin for the formats we read or None, what it is)
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG", "a PNG image"),
    (b"\xff\xd8\xff", "JPEG", "a JPEG image"),
    (b"GIF87a", "GIF", "a GIF image"),
    (b"GIF89a", "GIF", "a GIF image"),
    (b"II*\x00", "TIFF", "a TIFF image"),
    (b"MM\x00*", "TIFF", "a TIFF image"),
    (b"BM", "BMP", "a BMP image"),
    (b"\xff\x0a", "JXL", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JXL", "a JPEG XL image"),
    (b"\x89LIC", None, "a .lic file"),
    (b"%PDF-", None, "a PDF document"),
    (b"%!PS", None, "a PostScript (EPS) file"),
    (b"\xc5\xd0\xd3\xc6", None, "an EPS file"),
    (b"8BPS", None, "a Photoshop (PSD) file"),
    (b"\x00\x00\x01\x00", None, "a Windows icon (ICO)"),
    (b"qoif", None, "a QOI image"),
    (b"\xff\x4f\xff\x51", None, "a JPEG 2000 image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", None, "a JPEG 2000 image"),
    (b"PK\x03\x04", None, "a ZIP archive"),
    (b"\x1f\x8b", None, "a gzip file"),
    (b"(\xb5/\xfd", None, "a zstd file"),
    (b"7z\xbc\xaf\x27\x1c", None, "a 7-Zip archive"),
    (b"\x7fELF", None, "a program"),
)
#: images in formats that we do not read
_OTHER_IMAGES = {
    "a PostScript (EPS) file", "an EPS file", "a Photoshop (PSD) file", "a Windows icon (ICO)", "a QOI image",
    "a JPEG 2000 image", "a HEIF/HEIC image", "an SVG (vector) image",
}
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
#: the formats we read, as messages name them
_ACCEPTED_NAMES = "PNG, JPEG, WebP, BMP, TIFF, PPM, GIF, TGA, AVIF, JPEG XL"


def file_kind(head: bytes) -> tuple[str | None, str | None]:
    """What a file is, judged from its first bytes: (Pillow's plugin if it is a format we read,
    "a PNG image" / "a PDF document" / "a text file" / "an empty file"...), (None, None) if unknown."""
    if not head:
        return None, "an empty file"
    for magic, plugin, what in _MAGIC:
        if head.startswith(magic):
            return plugin, what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", "a WebP image"
    if re.match(rb"P[1-7]\s", head):
        return "PPM", "a PPM image"
    if head[4:8] == b"ftyp":  # ISO media: AVIF, HEIF
        brands = head[8 : max(16, min(len(head), int.from_bytes(head[:4], "big")))]
        words = {brands[i : i + 4] for i in range(0, len(brands) - 3, 4)}
        if words & {b"avif", b"avis"}:
            return "AVIF", "an AVIF image"
        if brands[:4] in _HEIF_BRANDS:
            return None, "a HEIF/HEIC image"
    if b"\0" not in head:
        import codecs

        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is fine
        except UnicodeDecodeError:
            return None, None
        start = text.lstrip("\ufeff \t\r\n")[:1000].lower()
        if start.startswith("<svg") or start.startswith("<?xml") and "<svg" in start:
            return None, "an SVG (vector) image"
        return None, "a text file"
    return None, None


def _unreadable(head: bytes, detail: str = "") -> str:
    """Why a file Pillow could not open is not a readable image, in a person's words."""
    plugin, what = file_kind(head)
    if what == "an empty file":
        return "not a readable image: empty file"
    if what == "a text file":
        return "not a readable image (a text file?)"
    if plugin is not None:
        Image.init()
        if plugin not in Image.OPEN:
            return f"not a readable image: {what}, which this installation cannot read (Pillow lacks the format)"
        return f"not a readable image: a damaged or truncated {what[what.index(' ') + 1:]}" + (f" ({detail})" if detail else "")
    if what == "a .lic file":
        return "not a readable image: a .lic file (codec decode turns it into an image)"
    if what in _OTHER_IMAGES:
        return f"not a readable image: {what}, a format the codec does not read (convert it to PNG or JPEG first)"
    if what is not None:
        return f"not a readable image: {what}"
    return f"not a readable image: not a format the codec reads ({_ACCEPTED_NAMES})"


def _palette_bytes(im: Image.Image) -> bytes:
    pal = im.getpalette() or []
    pal = bytes(pal[:768])
    return pal + bytes(768 - len(pal))


EXIF_ORIENTATION = 0x0112


def _frame_count(im: Image.Image) -> int:
    """How many frames (animation, pages) an image has; 1 when Pillow cannot tell."""
    try:
        return max(1, int(getattr(im, "n_frames", 1)))
    except Exception:  # a damaged later frame, or one over Pillow's size limit
        return 1


def prepare_image(im: Image.Image) -> PreparedImage:
    """Apply EXIF orientation and bring any Pillow mode to 8-bit RGB, remembering how to restore it.

    Metadata is read after the orientation is applied: the stored EXIF says orientation 1 and the
    XMP copy of the orientation is dropped (as Pillow's ``exif_transpose`` does), so that no viewer
    rotates the decoded image a second time."""
    notes: list[str] = []
    frames = _frame_count(im)
    if frames > 1:
        notes.append(f"only the first of its {frames} frames is coded")
    im.load()  # some formats settle their mode and palette only when loaded
    transposed = False
    try:
        if im.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
            im = ImageOps.exif_transpose(im)
            transposed = True
    except Exception:  # a malformed EXIF block must not stop the encode
        notes.append("EXIF orientation could not be read and was ignored")
    icc = im.info.get("icc_profile") or None
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp") or None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    exif = im.info.get("exif") or None
    if exif is None:
        try:  # TIFF tags become EXIF here; malformed ones make Pillow raise (struct.error...)
            e = im.getexif()
            exif = e.tobytes() if len(e) else None
        except Exception:
            notes.append("EXIF could not be read and was left out")
    if transposed and exif is not None:  # Pillow deletes the tag; we store an explicit 1 (normal)
        try:
            e = Image.Exif()
            e.load(exif)
            e[EXIF_ORIENTATION] = 1
            exif = e.tobytes()
        except Exception:
            notes.append("EXIF could not be rewritten after applying its orientation")
    bit_depth = 8
    alpha = None
    palette = None
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I") else 1.0
        if mode == "I" and a.max(initial=0) <= 255:
            hi = 255.0
        else:
            bit_depth = 16
        g = np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(g, "L")
        if bit_depth == 16:
            notes.append("16-bit image coded at 8 bits per sample")
        mode = "L"
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode == "P" and ("transparency" in im.info or im.palette is not None and im.palette.mode == "RGBA"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "P":
        palette = _palette_bytes(im)
        cm = fmt.ColourMode.P
        rgb = im.convert("RGB")
    elif mode == "L":
        cm, rgb = fmt.ColourMode.L, im.convert("RGB")
    elif mode == "LA":
        cm = fmt.ColourMode.LA
        alpha = np.asarray(im.getchannel("A"), dtype=np.uint8)
        rgb = im.convert("L").convert("RGB")
    elif mode in ("RGBA", "RGBa"):
        cm = fmt.ColourMode.RGBA
        im = im.convert("RGBA")
        alpha = np.asarray(im.getchannel("A"), dtype=np.uint8)
        rgb = im.convert("RGB")
    else:
        if mode not in ("RGB",):
            notes.append(f"{mode} image converted to RGB")
        cm, rgb = fmt.ColourMode.RGB, im.convert("RGB")
        if mode == "CMYK":
            icc = None  # a CMYK profile does not describe the RGB data we code
    meta = fmt.Metadata(icc=icc, exif=exif, xmp=xmp, palette=palette)
    return PreparedImage(np.asarray(rgb, dtype=np.uint8), cm, bit_depth, alpha, meta, notes)


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


#: rounds of :func:`_small_tile_search`, and how much larger than the first file a later one may be
SEARCH_ROUNDS = 4
SEARCH_SIZE_SLACK = 0.10


def _small_tile_search(lm: loading.LoadedModel, x: torch.Tensor, pad, rgb: np.ndarray, qt) -> list[bytes]:
    """Streams of a small image (its one tile padded to at most MIN_CANVAS^2): the first coding, or
    a pre-compensated one that decodes closer to ``rgb`` at no more than 10 % more bytes.

    On a canvas that is mostly padding the network's error is systematic (a 16x16 white image came
    back at 44.7 dB: the 128x128 white image's centre).  Each round codes ``x - e`` instead of
    ``x``, where ``e`` is the previous decode's error on the image (replicated into the padding), and
    decodes it as the decoder will.  Two rounds in a row that decode worse than the round before
    end the search; so an image the feedback does not help costs two extra codings, about 0.2 s at
    128x128, and at most four (SEARCH_ROUNDS) are tried.
    The decoder is unchanged: what the encoder codes is its own choice (FORMAT.md 7.1).  Measured
    with default-v3 at quality 4 (file bytes; encode time on one thread): white 16x16 44.7 -> 57.1 dB
    (381 -> 373 B, 0.18 -> 0.64 s), 32x32 46.3 -> 55.8, 128x128 46.2 -> 51.4 dB (381 -> 401 B);
    4x4 (217, 163, 130) 43.0 -> 45.5 dB; a 7x13 crop of kodim23 36.3 -> 36.9 dB (413 -> 433 B);
    16x16 (200, 30, 90), 64x64 and 128x128 crops of kodim23 gain nothing and keep the first coding
    (0.1 -> 0.4 s).  Larger canvases are not searched (a 768x8 strip: 768x128)."""
    l, r, t, b = pad
    h, w = rgb.shape[:2]
    Hp, Wp = x.shape[-2:]
    target = torch.from_numpy(np.array(rgb, dtype=np.float32)).to(x.device)

    def code(inp):
        streams = lm.model.compress(inp, quality=qt).streams
        x_hat = lm.model.decompress(streams, lm.model.hyper_shape(Hp, Wp), quality=qt)["x_hat"]
        crop = x_hat[:, :, t : t + h, l : l + w]
        err = float((torch.from_numpy(to_uint8(crop[0])).to(x.device).float() - target).square().mean())
        return streams, crop, err

    best, crop, best_err = code(x)
    limit = sum(map(len, best)) * (1 + SEARCH_SIZE_SLACK)
    inp, prev_err, worse = x, best_err, 0
    for _ in range(SEARCH_ROUNDS):
        if best_err == 0:
            break
        e = crop - x[:, :, t : t + h, l : l + w]
        inp = inp - torch.nn.functional.pad(e, (l, r, t, b), mode="replicate")
        streams, crop, err = code(inp)
        worse = worse + 1 if err >= prev_err else 0
        if worse == 2:
            break
        prev_err = err
        if err < best_err and sum(map(len, streams)) <= limit:
            best, best_err = streams, err
    return best


def encode_image(
    im: Image.Image, lm: loading.LoadedModel, quality: float | None = None, tile: int | None = None, max_memory: int | None = None,
    plan: list[tuple[int, int, int, int]] | None = None,
) -> EncodeResult:
    """Code an image into .lic bytes.  Tiles (FORMAT.md 7.2): ``plan`` (x, y, w, h) if given, else
    :func:`tile_plan` (at most ``tile`` x ``tile`` pixels, or the largest that fit ``max_memory``
    bytes, by default half the memory available)."""
    prep = prepare_image(im)
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
    for tx, ty, tw, th in plan:  # refuse before coding what the writer (and a reader) would refuse
        l, r, t, b = tiling.centred_padding(th, tw, lm.model.pad_multiple, tiling.MIN_CANVAS)
        if (tw + l + r) * (th + t + b) > lim.tile_pixel_limit():
            raise LimitExceededError(
                f"tiles of {tw + l + r}x{th + t + b} pixels are more than the limit of {lim.tile_pixel_limit()} "
                "pixels per tile (use a smaller --tile)"
            )
    tiles = []
    for tx, ty, tw, th in plan:
        pad = tiling.centred_padding(th, tw, lm.model.pad_multiple, tiling.MIN_CANVAS)
        x = tiling._to_tensor(prep.rgb[ty : ty + th, tx : tx + tw], pad, lm.device)
        with torch.inference_mode():
            if len(plan) == 1 and x.shape[-2] * x.shape[-1] <= tiling.MIN_CANVAS**2:
                streams = _small_tile_search(lm, x, pad, prep.rgb[ty : ty + th, tx : tx + tw], qt)
            else:
                streams = lm.model.compress(x, quality=qt).streams
        tiles.append(fmt.Tile(tx, ty, tw, th, pad, streams))
        del x, streams
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
    data = fmt.write(fmt.LicFile(header=header, metadata=prep.metadata, alpha=alpha, tiles=tiles))
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

    H, W = prepare_image(im).rgb.shape[:2]
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
    if h.streams_per_tile != lm.model.num_streams():
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
    (samples v * 257, so 8-bit precision) instead of ``L``; see :func:`restore_image`.
    ``max_memory``: refuse (LimitExceededError, before loading the model) a file whose tiles would
    need more bytes than this (:func:`check_memory`; default: the memory available)."""
    try:
        lic = fmt.read(data, limits)  # every declared size checked against the file and the limits
    except LimitExceededError as e:
        max_pixels = (limits or fmt.Limits()).max_pixels
        if "image is " in str(e) and str(e).endswith(f"limit of {max_pixels}"):
            raise LimitExceededError(f"{e} pixels ({_limit_source(max_pixels)})") from None
        raise
    h = lic.header
    check_memory(lic, max_memory, device)
    lm = model_for_file(h, weights, device)
    check_tiles(lic, lm)  # and against the model, before any tensor is allocated
    if lm.variable_rate and not (1.0 <= h.quality <= lm.model.num_levels):
        raise fmt_corrupt(f"header: quality {h.quality:g} is outside the model's range 1..{lm.model.num_levels}")
    q = torch.tensor([h.quality], device=lm.device) if lm.variable_rate else None
    single = len(lic.tiles) == 1
    if single:
        canvas = np.zeros((h.height, h.width, 3), dtype=np.uint8)
    else:  # weighted sums of overlapping tiles (FORMAT.md 7.2)
        acc = np.zeros((h.height, h.width, 3), dtype=np.float32)
        wsum = np.zeros((h.height, h.width, 1), dtype=np.float32)
    for tile in lic.tiles:
        l, r, t, b = tile.pad
        Hp, Wp = tile.h + t + b, tile.w + l + r
        try:
            with torch.inference_mode():
                out = lm.model.decompress(tile.streams, lm.model.hyper_shape(Hp, Wp), quality=q)
        except SymbolMismatchError:
            raise device_mismatch(h, lm, tile) from None
        x_hat = out["x_hat"][0, :, t : t + tile.h, l : l + tile.w]
        if single:
            canvas[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w] = to_uint8(x_hat)
        else:
            wgt = tiling.tile_weights(tile, h.width, h.height)[..., None]
            vals = x_hat.float().mul(255.0).permute(1, 2, 0).cpu().numpy()
            acc[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w] += wgt * vals
            wsum[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w] += wgt
        del out, x_hat
    if not single:  # check_tiles proved that every pixel lies in a tile, so has a positive weight
        np.divide(acc, wsum, out=acc)  # in place: no image-sized temporaries (the same float32 values)
        del wsum
        acc += 0.5
        np.floor(acc, out=acc)
        canvas = np.clip(acc, 0, 255, out=acc).astype(np.uint8)
        del acc
    return DecodeResult(restore_image(canvas, lic, high_bit_depth), h, [])


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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounding to nearest."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def restore_image(rgb: np.ndarray, lic: fmt.LicFile, high_bit_depth: bool = False) -> Image.Image:
    """The decoded RGB pixels back in the file's colour mode, with alpha, palette and metadata.

    16-bit grayscale is coded at 8 bits; with ``high_bit_depth`` it is returned as ``I;16`` with
    every sample v * 257 (0 -> 0, 255 -> 65535), so that a 16-bit PNG goes back to a 16-bit PNG;
    without it, as ``L``.  There is no 16-bit gray+alpha mode in Pillow: LA stays 8-bit."""
    h = lic.header
    im = Image.fromarray(rgb, "RGB")
    cm = h.colour_mode
    if cm in (fmt.ColourMode.L, fmt.ColourMode.LA):
        im = im.convert("L")
        if cm == fmt.ColourMode.L and h.bit_depth == 16 and high_bit_depth:
            im = Image.fromarray(np.asarray(im, dtype=np.uint16) * np.uint16(257))
    elif cm == fmt.ColourMode.P:
        pal = Image.new("P", (1, 1))
        pal.putpalette(lic.metadata.palette)
        im = im.quantize(palette=pal, dither=Image.Dither.NONE)
    if cm in (fmt.ColourMode.RGBA, fmt.ColourMode.LA) and lic.alpha is not None:
        if h.bit_depth == 16:
            a = np.frombuffer(lic.alpha, dtype="<u2").reshape(h.height, h.width)
            a = np.round(a / 257.0).astype(np.uint8)
        else:
            a = np.frombuffer(lic.alpha, dtype=np.uint8).reshape(h.height, h.width)
        im.putalpha(Image.fromarray(a, "L"))
    md = lic.metadata
    if md.icc:
        im.info["icc_profile"] = md.icc
    if md.exif:
        im.info["exif"] = md.exif
    if md.xmp:
        im.info["xmp"] = md.xmp
    return im


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (``I;16``...) as ``L``, rounding v / 257 (Pillow's own
    ``convert("L")`` clips instead of scaling); other images are returned unchanged."""
    if not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im, dtype=np.uint32)
    out = Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")
    out.info = dict(im.info)
    return out


#: formats that store 16-bit grayscale as it is
SIXTEEN_BIT_FORMATS = ("PNG", "TIFF", "PPM")


def save_image(im: Image.Image, fp, fmt_name: str) -> None:
    """Write a decoded image with its metadata in the requested format (PNG, JPEG, WebP, TIFF, BMP...).

    ICC and EXIF go to PNG, JPEG, WebP and TIFF, XMP to PNG, JPEG and WebP; a 16-bit grayscale
    image is written as 16-bit to PNG, TIFF and PPM and as 8-bit elsewhere."""
    fmt_name = fmt_name.upper()
    kw = {}
    if im.mode.startswith("I;16") and fmt_name not in SIXTEEN_BIT_FORMATS:
        im = to_8bit(im)
    if im.info.get("icc_profile") and fmt_name in ("PNG", "JPEG", "WEBP", "TIFF"):
        kw["icc_profile"] = im.info["icc_profile"]
    if im.info.get("exif") and fmt_name in ("PNG", "JPEG", "WEBP", "TIFF"):
        kw["exif"] = im.info["exif"]
    xmp = im.info.get("xmp")
    if xmp and fmt_name in ("JPEG", "WEBP"):
        kw["xmp"] = xmp
    elif xmp and fmt_name == "PNG":
        from PIL import PngImagePlugin

        text = xmp.decode("utf-8", errors="replace") if isinstance(xmp, bytes) else str(xmp)
        kw["pnginfo"] = PngImagePlugin.PngInfo()
        kw["pnginfo"].add_itxt("XML:com.adobe.xmp", text)
    if fmt_name == "JPEG":
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGB" if im.mode != "LA" else "L")
        kw["quality"] = 95
    if fmt_name == "WEBP":
        kw["lossless"] = True
    try:
        im.save(fp, format=fmt_name, **kw)
    except (KeyError, ValueError) as e:
        raise BadInputError(f"cannot write {fmt_name} images: {e}") from None


def image_psnr(reference: Image.Image, decoded: Image.Image) -> float:
    """PSNR (dB) of the decoded RGB image against the oriented RGB reference."""
    ref = prepare_image(reference).rgb
    return psnr(ref, np.asarray(decoded.convert("RGB"), dtype=np.uint8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------
# names that moved out of this module

#: each name that lived here before the split, by the module that holds it now.  ``pipeline.X``
#: reads it there, and assigning ``pipeline.X`` (a test's monkeypatch) assigns it there, so that the
#: code that moved with it sees the new value as it did when it lived here.  None of them is a
#: global of this module (the code here writes ``loading.X``...): one value, in one place.
_MOVED = {
    **dict.fromkeys(
        ("MODELS_DIR", "BUNDLED", "DEFAULT_MODEL", "RETIRED", "LoadedModel", "resolve_device", "_float_state",
         "build_from_state_dict", "load_model", "_cache", "_cache_lock", "clear_model_cache"),
        loading,
    ),
    **dict.fromkeys(
        ("MIN_CANVAS", "centred_padding", "DEFAULT_OVERLAP", "_axis_tiles", "_axis_options", "plan_tiles", "_grid", "tile_plan",
         "tile_weights", "_to_tensor", "MIN_TILE"),
        tiling,
    ),
}


def _alias(name: str, owner: types.ModuleType) -> property:
    return property(lambda _: getattr(owner, name), lambda _, value: setattr(owner, name, value), doc=f"{owner.__name__}.{name}")


class _Pipeline(types.ModuleType):
    """This module, whose moved names are aliases of their new homes (a ModuleType subclass as a
    module's class is Python's documented way to customise its attributes).  Aliases are properties,
    data descriptors, so pytest's monkeypatch restores them by assigning the old value back."""

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_MOVED))


assert not set(_MOVED) & set(globals()), "a moved name is also a global here"
for _name, _owner in _MOVED.items():
    setattr(_Pipeline, _name, _alias(_name, _owner))
del _name, _owner
sys.modules[__name__].__class__ = _Pipeline
