"""Images in and out: opening files safely, colour modes, alpha, palette and metadata, writing.

In: :func:`open_image` (only :data:`INPUT_FORMATS`, decompression bombs refused, every failure a
one-line :class:`BadInputError` that says what the file is: :func:`file_kind`), then
:func:`prepare_image` (EXIF orientation, any Pillow mode to 8-bit RGB, what it takes to restore
it).  Out: :func:`restore_image` (the decoded RGB back in the file's mode, with alpha, palette and
metadata) and :func:`save_image`.  Also the tables of file suffixes the commands take as images
and as output formats, and PSNR.  Used by :mod:`.pipeline` and the commands.

Only Pillow and the container are imported here; numpy and torch are imported by the functions
that use them, so that the command-line modules (:mod:`.files`, :mod:`.options`) can take the
suffix tables from here without making ``codec --help`` import them.  Over 400 lines: one
concern, images in and out; a third of it is telling what an unreadable file is (for messages).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from .errors import BadInputError, CodecError, LimitExceededError
from .formats import container as fmt

if TYPE_CHECKING:
    import numpy as np
    import torch

#: largest image accepted by default (pixels); the container enforces the same bound
MAX_PIXELS = fmt.Limits().max_pixels
#: file suffixes taken as images where a folder is walked (codec encode, batch, bench, train)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".gif", ".tga"}
#: output file suffixes and the format each asks for (codec decode, --ext)
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM", ".tga": "TGA"}


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


def _float_samples(a: np.ndarray, notes: list) -> tuple[np.ndarray, float]:
    """A floating-point image's samples and the value that stands for white.  Float TIFFs come
    both normalised to [0, 1] and on an 8- or 16-bit scale; the scale is the smallest of 1, 255
    and 65535 that holds every sample, and samples outside [0, 65535] are stretched to the full
    range (with a note) rather than clipped to a blank image.  NaN becomes 0."""
    import numpy as np

    if not np.isfinite(a).all():
        notes.append("NaN or infinite samples of a floating-point image coded as 0")
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, top = float(a.min(initial=0.0)), float(a.max(initial=0.0))
    if lo >= 0.0:
        for hi in (1.0, 255.0, 65535.0):
            if top <= hi:
                return a, hi
    notes.append(f"floating-point samples in [{lo:.6g}, {top:.6g}] stretched to the full range")
    return a - lo, (top - lo) or 1.0


def prepare_image(im: Image.Image) -> PreparedImage:
    """Apply EXIF orientation and bring any Pillow mode to 8-bit RGB, remembering how to restore it.

    Metadata is read after the orientation is applied: the stored EXIF says orientation 1 and the
    XMP copy of the orientation is dropped (as Pillow's ``exif_transpose`` does), so that no viewer
    rotates the decoded image a second time."""
    import numpy as np

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
        if mode == "F":
            a, hi = _float_samples(a, notes)
            bit_depth = 16
        elif mode == "I" and a.max(initial=0) <= 255:
            hi = 255.0
        else:
            bit_depth = 16
        g = np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(g, "L")
        if bit_depth == 16:  # decoded as 16-bit grayscale
            notes.append(f"{'floating-point' if mode == 'F' else '16-bit'} image coded at 8 bits per sample")
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
# images out


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounding to nearest."""
    import torch

    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def restore_image(rgb: np.ndarray, lic: fmt.LicFile, high_bit_depth: bool = False) -> Image.Image:
    """The decoded RGB pixels back in the file's colour mode, with alpha, palette and metadata.

    16-bit grayscale is coded at 8 bits; with ``high_bit_depth`` it is returned as ``I;16`` with
    every sample v * 257 (0 -> 0, 255 -> 65535), so that a 16-bit PNG goes back to a 16-bit PNG;
    without it, as ``L``.  There is no 16-bit gray+alpha mode in Pillow: LA stays 8-bit."""
    import numpy as np

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
    im.info.update(metadata_info(lic.metadata))
    return im


def metadata_info(md: fmt.Metadata) -> dict:
    """The file's ICC profile, Exif and XMP under the ``Image.info`` keys Pillow's writers read."""
    return {key: value for key, value in (("icc_profile", md.icc), ("exif", md.exif), ("xmp", md.xmp)) if value}


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (``I;16``...) as ``L``, rounding v / 257 (Pillow's own
    ``convert("L")`` clips instead of scaling); other images are returned unchanged."""
    import numpy as np

    if not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im, dtype=np.uint32)
    out = Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")
    out.info = dict(im.info)
    return out


#: formats that store 16-bit grayscale as it is
SIXTEEN_BIT_FORMATS = ("PNG", "TIFF", "PPM")


#: output formats without an alpha channel (Pillow writes a 32-bit BMP, but reads it, as most
#: programs do, without alpha): :func:`save_image` drops the alpha, :func:`lost_in_format` says so
NO_ALPHA_FORMATS = ("JPEG", "PPM", "BMP")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def lost_in_format(im: Image.Image, fmt_name: str) -> list[str]:
    """What writing ``im`` as ``fmt_name`` with :func:`save_image` loses, as notes for the user."""
    fmt_name = fmt_name.upper()
    if _has_alpha(im) and fmt_name in NO_ALPHA_FORMATS:
        return [f"alpha dropped: {fmt_name} has no alpha channel; PNG, WebP and TIFF keep it"]
    return []


def save_image(im: Image.Image, fp, fmt_name: str) -> None:
    """Write a decoded image with its metadata in the requested format (PNG, JPEG, WebP, TIFF, BMP...).

    ICC and EXIF go to PNG, JPEG, WebP and TIFF, XMP to PNG, JPEG and WebP; a 16-bit grayscale
    image is written as 16-bit to PNG, TIFF and PPM and as 8-bit elsewhere; the alpha channel is
    dropped where the format has none (:data:`NO_ALPHA_FORMATS`, :func:`lost_in_format`)."""
    fmt_name = fmt_name.upper()
    kw = {}
    if im.mode.startswith("I;16") and fmt_name not in SIXTEEN_BIT_FORMATS:
        im = to_8bit(im)
    if _has_alpha(im) and fmt_name in NO_ALPHA_FORMATS:
        im = im.convert("L" if im.mode == "LA" else "RGB")
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
        if im.mode == "P":
            im = im.convert("RGB")
        kw["quality"] = 95
    if fmt_name == "WEBP":
        kw["lossless"] = True
    try:
        im.save(fp, format=fmt_name, **kw)
    except (KeyError, ValueError) as e:
        raise BadInputError(f"cannot write {fmt_name} images: {e}") from None


def image_psnr(reference: Image.Image, decoded: Image.Image) -> float:
    """PSNR (dB) of the decoded image against the reference, both brought to 8-bit RGB as the
    encoder brings its input (oriented; 16-bit samples scaled, not clipped as Pillow's
    ``convert("RGB")`` clips them)."""
    return psnr(prepare_image(reference).rgb, prepare_image(decoded).rgb)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
