"""Reader and writer for the .lic container (format versions 1 and 2).

The byte layout is specified in ``formats/FORMAT.md``; this module is its
reference implementation.  It deliberately depends on nothing but the standard
library and ``zstandard`` (no torch, no numpy) so that ``codec info`` starts
quickly.

Robustness contract of :func:`read` (and :func:`read_info`): on *any* input
bytes it either returns a fully validated :class:`LicFile` or raises a subclass
of :class:`lalic_codec.errors.CodecError` with a one-line message naming the
part of the file that is wrong.  Every size declared in the file is checked
against the bytes actually remaining and against :class:`Limits` before
anything is allocated or decompressed.

Over 400 lines: it is the format's one implementation, reader, writer and validation together,
so that each field's layout and its checks are defined in one place (FORMAT.md section by section).
"""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO, Union

from lalic_codec.errors import (  # the Damaged* errors are part of this module's interface (__all__)
    CorruptFileError,
    CrcMismatchError,
    DamagedMagicError,
    DamagedVersionError,
    LimitExceededError,
    NotALicFileError,
    TruncatedFileError,
    UnsupportedVersionError,
)

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "ColourMode",
    "DeviceClass",
    "MetadataTag",
    "Header",
    "Metadata",
    "Tile",
    "LicFile",
    "Limits",
    "DamagedMagicError",
    "DamagedVersionError",
    "write",
    "read",
    "read_info",
    "info_lines",
    "read_header_from_file",
    "alpha_plane_size",
    "MAX_MODEL_ID_LENGTH",
    "FINGERPRINT_LENGTH",
    "PALETTE_LENGTH",
]

# --------------------------------------------------------------------------- constants

MAGIC = b"\x89LIC\r\n\x1a\n"
#: the version :func:`write` writes unless told otherwise
FORMAT_VERSION = 2
#: the versions :func:`read` accepts: 2 differs from 1 only in the tile records (FORMAT.md 7, 8)
SUPPORTED_VERSIONS = (1, 2)

FINGERPRINT_LENGTH = 16
MAX_MODEL_ID_LENGTH = 64
PALETTE_LENGTH = 768

FLAG_METADATA = 0x01
FLAG_ALPHA = 0x02
FLAG_POSTFILTER = 0x04
FLAG_MERGED_STREAMS = 0x08
FLAG_CLASSIFIED_POSTFILTER = 0x10
_KNOWN_FLAGS = FLAG_METADATA | FLAG_ALPHA | FLAG_POSTFILTER | FLAG_MERGED_STREAMS | FLAG_CLASSIFIED_POSTFILTER
#: largest post-filter block (section 7.3): the content of a 7 x 7 filter stays under 1 KiB
MAX_POSTFILTER_BYTES = 1024
#: largest classified post-filter block (section 7.4): 40 classes of 7 x 7 stay under 32 KiB
MAX_CLASSIFIED_POSTFILTER_BYTES = 32768

_MODEL_ID_RE = re.compile(rb"[a-z0-9._-]{1,64}")

# zstd levels used by the writer (any valid zstd frame is accepted by the reader)
_METADATA_ZSTD_LEVEL = 19
_ALPHA_ZSTD_LEVEL = 9

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_VERSION_IDLEN = struct.Struct("<HB")  # format version, model id length
_HEADER_TAIL = struct.Struct("<16sfIIBBBBHH")  # after the model id, before the CRC
_U32 = struct.Struct("<I")
_LEN_CRC = struct.Struct("<II")  # block / stream prefix: length, CRC32
_GEOMETRY = struct.Struct("<IIIIHHHH")
_TLV = struct.Struct("<BI")

_PREFIX_SIZE = len(MAGIC) + _VERSION_IDLEN.size  # magic, version, model id length
_GEOMETRY_RECORD_SIZE = _GEOMETRY.size + _U32.size  # geometry + its CRC32
_VARINT_MAX_BYTES = 5  # unsigned LEB128 of a value below 2**32

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF


class ColourMode(IntEnum):
    """Colour mode of the original image (Pillow mode names)."""

    RGB = 0
    L = 1
    RGBA = 2
    LA = 3
    P = 4

    @property
    def has_alpha(self) -> bool:
        return self in (ColourMode.RGBA, ColourMode.LA)


class DeviceClass(IntEnum):
    """Which device family produced the entropy parameters (informative for readers)."""

    DEVICE_INDEPENDENT = 0
    CPU = 1
    CUDA = 2


class MetadataTag(IntEnum):
    """Record tags of the metadata block."""

    ICC = 1
    EXIF = 2
    XMP = 3
    PALETTE = 4



# --------------------------------------------------------------------------- dataclasses


@dataclass
class Header:
    model_id: str
    weights_fingerprint: bytes
    quality: float
    width: int
    height: int
    colour_mode: ColourMode
    bit_depth: int
    device_class: int
    streams_per_tile: int


@dataclass
class Metadata:
    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    palette: bytes | None = None

    def is_empty(self) -> bool:
        """True when no record would be written (``None`` and ``b""`` both mean absent)."""
        return not (self.icc or self.exif or self.xmp or self.palette)


@dataclass
class Tile:
    x: int
    y: int
    w: int
    h: int
    pad: tuple[int, int, int, int]  # left, right, top, bottom
    streams: list[bytes]


@dataclass
class LicFile:
    header: Header
    metadata: Metadata = field(default_factory=Metadata)
    alpha: bytes | None = None
    tiles: list[Tile] = field(default_factory=list)
    #: the post-filter block's content (section 7.3, or 7.4 if ``postfilter_classified``), opaque to
    #: the container; None: no block
    postfilter: bytes | None = None
    #: the post-filter block holds a classified filter (flags bit 4, section 7.4)
    postfilter_classified: bool = False
    #: each tile's one stream holds the model's streams as segments (flags bit 3, section 12.8)
    merged: bool = False


@dataclass
class Limits:
    """Resource limits enforced by the reader (and by the writer, so it never
    produces a file that a default reader refuses)."""

    max_pixels: int = 2**28
    max_metadata_bytes: int = 16 * 2**20
    max_stream_bytes: int = 2**30
    max_tiles: int = 65535
    #: pixels of one padded tile (2048 x 2048): the decoder's memory is proportional to it
    max_tile_pixels: int = 2**22

    def tile_pixel_limit(self) -> int:
        return min(self.max_pixels, self.max_tile_pixels)


def alpha_plane_size(header: Header) -> int:
    """Size in bytes of the raw alpha plane: width*height samples of 1 byte
    (bit depth 8) or 2 bytes little-endian (bit depth 16)."""
    return header.width * header.height * (2 if header.bit_depth == 16 else 1)


# --------------------------------------------------------------------------- writer


def _check_u(value: object, bits: int, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {type(value).__name__}")
    top = (1 << bits) - 1
    if not minimum <= value <= top:
        raise ValueError(f"{what} must be in [{minimum}, {top}], got {value}")
    return int(value)


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"{what} must be bytes, got {type(value).__name__}")


def _validate_header(h: Header) -> tuple[bytes, bytes, float, ColourMode]:
    """Check a Header for writing; returns (model id, fingerprint, quality, colour mode)."""
    if not isinstance(h.model_id, str):
        raise ValueError("model_id must be a str")
    raw_id = h.model_id.encode("ascii", errors="replace")
    if not _MODEL_ID_RE.fullmatch(raw_id):
        raise ValueError(
            f"model_id {h.model_id!r} must be 1..{MAX_MODEL_ID_LENGTH} characters from [a-z0-9._-]"
        )
    fp = _as_bytes(h.weights_fingerprint, "weights_fingerprint")
    if len(fp) != FINGERPRINT_LENGTH:
        raise ValueError(f"weights_fingerprint must be {FINGERPRINT_LENGTH} bytes, got {len(fp)}")
    try:
        quality = float(h.quality)
    except (TypeError, ValueError):
        raise ValueError(f"quality must be a float, got {h.quality!r}") from None
    if not math.isfinite(quality):
        raise ValueError(f"quality must be finite, got {quality}")
    _check_u(h.width, 32, "width", 1)
    _check_u(h.height, 32, "height", 1)
    try:
        mode = ColourMode(h.colour_mode)
    except ValueError:
        raise ValueError(f"unknown colour_mode {h.colour_mode!r}") from None
    if h.bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {h.bit_depth!r}")
    if mode is ColourMode.P and h.bit_depth != 8:
        raise ValueError("palette (P) images must have bit_depth 8")
    _check_u(h.device_class, 8, "device_class")
    _check_u(h.streams_per_tile, 16, "streams_per_tile", 1)
    try:
        struct.pack("<f", quality)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"quality {quality} is not representable as a 32-bit float") from exc
    return raw_id, fp, quality, mode


def _encode_metadata(md: Metadata, limits: Limits) -> bytes:
    records = []
    for tag, value, name in (
        (MetadataTag.ICC, md.icc, "metadata.icc"),
        (MetadataTag.EXIF, md.exif, "metadata.exif"),
        (MetadataTag.XMP, md.xmp, "metadata.xmp"),
        (MetadataTag.PALETTE, md.palette, "metadata.palette"),
    ):
        if value is None:
            continue
        value = _as_bytes(value, name)
        if not value:
            continue
        if tag is MetadataTag.PALETTE and len(value) != PALETTE_LENGTH:
            raise ValueError(f"metadata.palette must be {PALETTE_LENGTH} bytes, got {len(value)}")
        if len(value) > _U32_MAX:
            raise ValueError(f"{name} is too large")
        records.append(_TLV.pack(int(tag), len(value)))
        records.append(value)
    content = b"".join(records)
    if len(content) > limits.max_metadata_bytes:
        raise LimitExceededError(
            f"metadata is {len(content)} bytes, more than the limit of {limits.max_metadata_bytes}"
        )
    import zstandard

    frame = zstandard.ZstdCompressor(
        level=_METADATA_ZSTD_LEVEL, write_content_size=True, write_checksum=False
    ).compress(content)
    if len(frame) > limits.max_metadata_bytes:
        raise LimitExceededError(
            f"compressed metadata is {len(frame)} bytes, more than the limit of {limits.max_metadata_bytes}"
        )
    return frame


def _varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant first, the high bit set on every byte
    but the last; the shortest such encoding."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def write(f: LicFile, limits: Limits | None = None, version: int = FORMAT_VERSION) -> bytes:
    """Serialise a LicFile in format ``version`` (1 or 2; they differ only in the tile records).

    Raises ValueError for inconsistent or out-of-range fields (programmer
    errors) and LimitExceededError when the file would exceed ``limits``
    (default :class:`Limits`), i.e. when a default reader would refuse it.
    """
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"format version must be one of {SUPPORTED_VERSIONS}, not {version!r}")
    limits = limits or Limits()
    h = f.header
    raw_id, fp, quality, mode = _validate_header(h)
    if h.width * h.height > limits.max_pixels:
        raise LimitExceededError(
            f"image is {h.width}x{h.height} = {h.width * h.height} pixels, "
            f"more than the limit of {limits.max_pixels}"
        )

    md = f.metadata if f.metadata is not None else Metadata()
    if mode is ColourMode.P and not md.palette:
        raise ValueError("colour mode P requires metadata.palette")
    if mode is not ColourMode.P and md.palette:
        raise ValueError(f"metadata.palette is only allowed with colour mode P, not {mode.name}")

    if mode.has_alpha:
        if f.alpha is None:
            raise ValueError(f"colour mode {mode.name} requires an alpha plane")
        alpha = _as_bytes(f.alpha, "alpha")
        if len(alpha) != alpha_plane_size(h):
            raise ValueError(
                f"alpha must be {alpha_plane_size(h)} bytes for a {h.width}x{h.height} "
                f"{h.bit_depth}-bit image, got {len(alpha)}"
            )
    elif f.alpha is not None:
        raise ValueError(f"an alpha plane is only allowed with colour modes RGBA and LA, not {mode.name}")
    else:
        alpha = None

    n_tiles = len(f.tiles)
    if not 1 <= n_tiles <= min(_U16_MAX, limits.max_tiles):
        if n_tiles > limits.max_tiles and n_tiles <= _U16_MAX:
            raise LimitExceededError(f"{n_tiles} tiles, more than the limit of {limits.max_tiles}")
        raise ValueError(f"a file needs 1..{_U16_MAX} tiles, got {n_tiles}")

    flags = 0
    parts: list[bytes] = []
    if not md.is_empty():
        flags |= FLAG_METADATA
        frame = _encode_metadata(md, limits)
        parts += [_LEN_CRC.pack(len(frame), zlib.crc32(frame)), frame]
    if alpha is not None:
        import zstandard

        flags |= FLAG_ALPHA
        frame = zstandard.ZstdCompressor(
            level=_ALPHA_ZSTD_LEVEL, write_content_size=True, write_checksum=False
        ).compress(alpha)
        if len(frame) > limits.max_stream_bytes:
            raise LimitExceededError(
                f"compressed alpha plane is {len(frame)} bytes, more than the limit of {limits.max_stream_bytes}"
            )
        parts += [_LEN_CRC.pack(len(frame), zlib.crc32(frame)), frame]
    if f.postfilter_classified and f.postfilter is None:
        raise ValueError("a classified post-filter without a post-filter block")
    if f.postfilter is not None:
        block = _as_bytes(f.postfilter, "postfilter")
        most = MAX_CLASSIFIED_POSTFILTER_BYTES if f.postfilter_classified else MAX_POSTFILTER_BYTES
        if not 1 <= len(block) <= most:
            raise ValueError(f"a post-filter block holds 1..{most} bytes, got {len(block)}")
        flags |= FLAG_POSTFILTER | (FLAG_CLASSIFIED_POSTFILTER if f.postfilter_classified else 0)
        parts += [_LEN_CRC.pack(len(block), zlib.crc32(block)), block]
    if f.merged:
        if h.streams_per_tile != 1:
            raise ValueError(f"a file of merged streams has 1 stream per tile, not {h.streams_per_tile}")
        flags |= FLAG_MERGED_STREAMS

    for i, t in enumerate(f.tiles):
        what = f"tile {i}"
        x = _check_u(t.x, 32, f"{what}.x")
        y = _check_u(t.y, 32, f"{what}.y")
        w = _check_u(t.w, 32, f"{what}.w", 1)
        th = _check_u(t.h, 32, f"{what}.h", 1)
        if x + w > h.width or y + th > h.height:
            raise ValueError(
                f"{what}: region x={x} y={y} w={w} h={th} lies outside the {h.width}x{h.height} image"
            )
        pad = tuple(t.pad)
        if len(pad) != 4:
            raise ValueError(f"{what}.pad must have 4 values (left, right, top, bottom)")
        pl, pr, pt, pb = (_check_u(p, 16, f"{what}.pad") for p in pad)
        if (w + pl + pr) * (th + pt + pb) > limits.tile_pixel_limit():
            raise LimitExceededError(
                f"{what}: padded size {w + pl + pr}x{th + pt + pb} is more than the limit of "
                f"{limits.tile_pixel_limit()} pixels"
            )
        if len(t.streams) != h.streams_per_tile:
            raise ValueError(
                f"{what} has {len(t.streams)} streams but header.streams_per_tile is {h.streams_per_tile}"
            )
        streams = []
        for s, stream in enumerate(t.streams):
            stream = _as_bytes(stream, f"stream {s} of {what}")
            if len(stream) > min(_U32_MAX, limits.max_stream_bytes):
                raise LimitExceededError(
                    f"stream {s} of {what} is {len(stream)} bytes, more than the limit of "
                    f"{min(_U32_MAX, limits.max_stream_bytes)}"
                )
            streams.append(stream)
        if version == 1:
            geometry = _GEOMETRY.pack(x, y, w, th, pl, pr, pt, pb)
            parts += [geometry, _U32.pack(zlib.crc32(geometry))]
            for stream in streams:
                parts += [_LEN_CRC.pack(len(stream), zlib.crc32(stream)), stream]
        else:  # a directory of varints with its CRC32, then the streams with one CRC32
            directory = b"".join(_varint(v) for v in (x, y, w, th, pl, pr, pt, pb, *map(len, streams)))
            body = b"".join(streams)
            parts += [directory, _U32.pack(zlib.crc32(directory)), body, _U32.pack(zlib.crc32(body))]

    head = bytearray(MAGIC)
    head += _VERSION_IDLEN.pack(version, len(raw_id))
    head += raw_id
    head += _HEADER_TAIL.pack(fp, quality, h.width, h.height, int(mode), h.bit_depth,
                              h.device_class, flags, n_tiles, h.streams_per_tile)
    head += _U32.pack(zlib.crc32(head))
    return b"".join([bytes(head), *parts])


# --------------------------------------------------------------------------- reader


class _Cursor:
    """Bounds-checked reader over a memoryview."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview, pos: int = 0):
        self.buf = buf
        self.pos = pos
        self.end = len(buf)

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.end - self.pos:
            raise TruncatedFileError(
                f"truncated file: {what} needs {n} bytes at offset {self.pos} "
                f"but the file ends at byte {self.end}"
            )
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def varint(self, what: str, bits: int = 32) -> int:
        """An unsigned LEB128 value below ``2**bits`` in its shortest encoding."""
        value = shift = 0
        for i in range(_VARINT_MAX_BYTES):
            if self.pos >= self.end:
                raise TruncatedFileError(f"truncated file: {what} at offset {self.pos} runs past the end of the file (byte {self.end})")
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise CorruptFileError(f"{what}: over-long varint (file is corrupt)")
                if value >> bits:
                    raise CorruptFileError(f"{what}: {value} does not fit in {bits} bits (file is corrupt)")
                return value
        raise CorruptFileError(f"{what}: varint longer than {_VARINT_MAX_BYTES} bytes (file is corrupt)")


def _as_view(data: Union[bytes, bytearray, memoryview]) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
        try:
            view = view.cast("B")
        except TypeError:  # not C-contiguous
            view = memoryview(view.tobytes())
    elif view.format != "B":
        view = view.cast("B")
    return view


def _check_magic(buf: memoryview) -> None:
    n = len(buf)
    if n == 0:
        raise NotALicFileError("not a .lic file: the file is empty")
    head = bytes(buf[: len(MAGIC)])
    if head == MAGIC[: len(head)]:
        if n < len(MAGIC):
            raise TruncatedFileError(f"truncated file: the file ends at byte {n}, inside the magic bytes")
        return
    hint = ""
    if head[1:4] == b"LIC":
        if head[0] != 0x89:
            hint = " (the high bit of byte 0 was cleared: was it sent over a 7-bit channel?)"
        else:
            hint = " (line endings were altered: was the file transferred in text mode?)"
    if _bits_apart(head, MAGIC) <= 2 and _intact_header(buf):
        raise DamagedMagicError(
            f"header: damaged magic bytes {head.hex(' ')}{hint}, but the header CRC32 matches a "
            f".lic header (file is corrupt)"
        )
    raise NotALicFileError(f"not a .lic file: bad magic bytes {head.hex(' ')}{hint}")


def _bits_apart(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b)) + 8 * abs(len(a) - len(b))


def _intact_header(buf: memoryview, versions=SUPPORTED_VERSIONS) -> int | None:
    """The version of ``versions`` whose header matches the CRC32 at the start of ``buf`` once the
    magic and that version are restored, or None: then a magic or version a bit or two away from
    the right one is damage (a bit flip), not another format or a newer version (a chance match
    has probability 2**-32)."""
    if len(buf) < _PREFIX_SIZE:
        return None
    end = _PREFIX_SIZE + buf[_PREFIX_SIZE - 1] + _HEADER_TAIL.size
    if len(buf) < end + _U32.size:
        return None
    head = bytearray(buf[:end])
    for version in versions:
        head[: _PREFIX_SIZE - 1] = MAGIC + _U16.pack(version)
        if zlib.crc32(head) == _U32.unpack(buf[end : end + _U32.size])[0]:
            return version
    return None


@dataclass
class _RawHeader:
    header: Header
    flags: int
    n_tiles: int
    size: int  # bytes from the magic to the end of the header CRC
    version: int = 1


def _parse_header(cur: _Cursor, limits: Limits) -> _RawHeader:
    """Parse and validate the header; ``cur`` is at offset 0."""
    _check_magic(cur.buf)
    cur.pos = len(MAGIC)
    (version,) = cur.unpack(_U16, "the format version")
    if version not in SUPPORTED_VERSIONS:
        near = [v for v in SUPPORTED_VERSIONS if _bits_apart(_U16.pack(version), _U16.pack(v)) <= 2]
        intact = _intact_header(cur.buf, near)
        if intact is not None:
            raise DamagedVersionError(
                f"header: format version {version}, but the header CRC32 matches version "
                f"{intact}: the version field is damaged (file is corrupt)"
            )
        raise UnsupportedVersionError(
            f"unsupported .lic format version {version} (this reader supports versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}; the file may need a newer lalic-codec)"
        )
    (id_len,) = cur.unpack(_U8, "the header (model identifier length)")
    raw_id = bytes(cur.take(id_len, "the header (model identifier)"))
    tail = cur.unpack(_HEADER_TAIL, "the header")
    crc_end = cur.pos
    (stored_crc,) = cur.unpack(_U32, "the header CRC32")
    if zlib.crc32(cur.buf[:crc_end]) != stored_crc:
        raise CrcMismatchError("header: CRC32 mismatch (file is corrupt)")

    fp, quality, width, height, mode, bit_depth, device_class, flags, n_tiles, spt = tail
    if not _MODEL_ID_RE.fullmatch(raw_id):
        raise CorruptFileError(
            f"header: invalid model identifier {raw_id[:MAX_MODEL_ID_LENGTH]!r} "
            f"(must be 1..{MAX_MODEL_ID_LENGTH} characters from [a-z0-9._-])"
        )
    if math.isnan(quality) or math.isinf(quality):
        raise CorruptFileError(f"header: quality is {quality}, not a finite number")
    if width < 1 or height < 1:
        raise CorruptFileError(f"header: image size {width}x{height} is empty")
    if width * height > limits.max_pixels:
        raise LimitExceededError(
            f"header: image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {limits.max_pixels}"
        )
    if mode not in ColourMode._value2member_map_:
        raise UnsupportedVersionError(f"header: unknown colour mode {mode} (file written by a newer lalic-codec?)")
    mode = ColourMode(mode)
    if bit_depth not in (8, 16):
        raise UnsupportedVersionError(f"header: unsupported bit depth {bit_depth} (expected 8 or 16)")
    if mode is ColourMode.P and bit_depth != 8:
        raise CorruptFileError(f"header: palette (P) image with bit depth {bit_depth} (must be 8)")
    if flags & ~_KNOWN_FLAGS:
        raise UnsupportedVersionError(
            f"header: unknown flags 0x{flags & ~_KNOWN_FLAGS:02x} (file written by a newer lalic-codec?)"
        )
    if bool(flags & FLAG_ALPHA) != mode.has_alpha:
        if mode.has_alpha:
            raise CorruptFileError(f"header: colour mode {mode.name} but no alpha block")
        raise CorruptFileError(f"header: alpha block present but colour mode {mode.name} has no alpha")
    if mode is ColourMode.P and not flags & FLAG_METADATA:
        raise CorruptFileError("header: colour mode P but no metadata block (the palette is missing)")
    if n_tiles < 1:
        raise CorruptFileError("header: declares 0 tiles")
    if n_tiles > limits.max_tiles:
        raise LimitExceededError(f"header: {n_tiles} tiles, more than the limit of {limits.max_tiles}")
    if spt < 1:
        raise CorruptFileError("header: declares 0 streams per tile")
    if flags & FLAG_MERGED_STREAMS and spt != 1:
        raise CorruptFileError(f"header: merged streams (flags bit 3) but {spt} streams per tile (must be 1)")
    if flags & FLAG_CLASSIFIED_POSTFILTER and not flags & FLAG_POSTFILTER:
        raise CorruptFileError("header: a classified post-filter (flags bit 4) but no post-filter block (bit 2)")

    header = Header(
        model_id=raw_id.decode("ascii"),
        weights_fingerprint=fp,
        quality=quality,
        width=width,
        height=height,
        colour_mode=mode,
        bit_depth=bit_depth,
        device_class=device_class,
        streams_per_tile=spt,
    )
    return _RawHeader(header, flags, n_tiles, cur.pos, version)


def _read_block(cur: _Cursor, name: str, limit: int, collect: list[str] | None) -> memoryview:
    """A length + CRC32 + bytes block; CRC errors raise unless ``collect`` is a list."""
    length, crc = cur.unpack(_LEN_CRC, f"the length and CRC32 of {name}")
    if length > limit:
        raise LimitExceededError(f"{name}: declares {length} bytes, more than the limit of {limit}")
    body = cur.take(length, name)
    if zlib.crc32(body) != crc:
        msg = f"{name}: CRC32 mismatch (file is corrupt)"
        if collect is None:
            raise CrcMismatchError(msg)
        collect.append(msg)
    return body


def _frame_content_size(frame: memoryview) -> int | None:
    """Declared content size of a zstd frame; None if the frame has none or is invalid."""
    import zstandard

    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        return None
    return None if size < 0 else size


def _decompress(frame: memoryview, name: str, limit: int, exact: int | None = None) -> bytes:
    import zstandard

    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise CorruptFileError(f"{name}: not a valid zstd frame") from None
    if size < 0:
        raise CorruptFileError(f"{name}: the zstd frame does not declare its content size")
    if exact is not None and size != exact:
        raise CorruptFileError(f"{name}: the zstd frame declares {size} bytes but {exact} are required")
    if size > limit:
        raise LimitExceededError(f"{name}: declares {size} uncompressed bytes, more than the limit of {limit}")
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        detail = " ".join(str(exc).split())
        raise CorruptFileError(f"{name}: zstd decompression failed ({detail})") from None
    except MemoryError:
        raise LimitExceededError(f"{name}: out of memory decompressing {size} bytes") from None
    if len(out) != size:
        raise CorruptFileError(f"{name}: zstd frame produced {len(out)} bytes but declares {size}")
    return out


def _parse_metadata(content: bytes) -> Metadata:
    values: dict[int, bytes | None] = {}
    pos, end = 0, len(content)
    while pos < end:
        if end - pos < _TLV.size:
            raise CorruptFileError(f"metadata: truncated record header at offset {pos} of the decompressed metadata")
        tag, length = _TLV.unpack_from(content, pos)
        pos += _TLV.size
        if length > end - pos:
            raise CorruptFileError(
                f"metadata: record with tag {tag} declares {length} bytes but only {end - pos} remain"
            )
        value = content[pos : pos + length]
        pos += length
        if tag not in MetadataTag._value2member_map_:
            continue  # unknown tags are skipped (forward compatibility)
        if tag in values:
            raise CorruptFileError(f"metadata: duplicate {MetadataTag(tag).name} record")
        if tag == MetadataTag.PALETTE and length not in (0, PALETTE_LENGTH):
            raise CorruptFileError(f"metadata: palette record is {length} bytes (must be {PALETTE_LENGTH})")
        values[tag] = value or None
    return Metadata(
        icc=values.get(MetadataTag.ICC),
        exif=values.get(MetadataTag.EXIF),
        xmp=values.get(MetadataTag.XMP),
        palette=values.get(MetadataTag.PALETTE),
    )


def _parse(data, limits: Limits | None, info: bool):
    """Shared parser.  ``info=False``: full read, returns LicFile.  ``info=True``:
    no decompression, CRC mismatches after the header are collected, returns a dict."""
    limits = limits or Limits()
    buf = _as_view(data)
    cur = _Cursor(buf)
    raw = _parse_header(cur, limits)
    hdr = raw.header
    crc_errors: list[str] | None = [] if info else None
    result: dict = {}

    metadata = Metadata()
    if raw.flags & FLAG_METADATA:
        frame = _read_block(cur, "metadata block", limits.max_metadata_bytes, crc_errors)
        if info:
            result["metadata"] = {
                "compressed_bytes": len(frame),
                "content_bytes": _frame_content_size(frame) if not crc_errors else None,
            }
        else:
            metadata = _parse_metadata(_decompress(frame, "metadata block", limits.max_metadata_bytes))
    elif info:
        result["metadata"] = None
    if not info:
        if hdr.colour_mode is ColourMode.P and metadata.palette is None:
            raise CorruptFileError("metadata block: colour mode P but no palette record")
        if hdr.colour_mode is not ColourMode.P and metadata.palette is not None:
            raise CorruptFileError(
                f"metadata block: palette record but colour mode is {hdr.colour_mode.name}"
            )

    alpha = None
    if raw.flags & FLAG_ALPHA:
        n_errors = len(crc_errors) if info else 0
        frame = _read_block(cur, "alpha block", limits.max_stream_bytes, crc_errors)
        expected = alpha_plane_size(hdr)
        if info:
            result["alpha"] = {
                "compressed_bytes": len(frame),
                "content_bytes": _frame_content_size(frame) if len(crc_errors) == n_errors else None,
            }
        else:
            alpha = _decompress(frame, "alpha block", expected, exact=expected)
    elif info:
        result["alpha"] = None

    postfilter = None
    if raw.flags & FLAG_POSTFILTER:
        try:
            most = MAX_CLASSIFIED_POSTFILTER_BYTES if raw.flags & FLAG_CLASSIFIED_POSTFILTER else MAX_POSTFILTER_BYTES
            block = _read_block(cur, "post-filter block", most, crc_errors)
        except LimitExceededError as e:  # a limit of the format, not of the reader: a damaged length
            raise CorruptFileError(f"{e} (file is corrupt)") from None
        if not block:
            raise CorruptFileError("post-filter block: empty")
        postfilter = bytes(block)

    # Cheap early check so that a header declaring many tiles/streams fails at once.
    if raw.version == 1:
        minimum = raw.n_tiles * (_GEOMETRY_RECORD_SIZE + hdr.streams_per_tile * _LEN_CRC.size)
    else:  # a one-byte varint per geometry field and per stream length, two CRC32s
        minimum = raw.n_tiles * (8 + hdr.streams_per_tile + 2 * _U32.size)
    if minimum > cur.remaining():
        raise TruncatedFileError(
            f"truncated file: header declares {raw.n_tiles} tiles of {hdr.streams_per_tile} streams "
            f"(at least {minimum} bytes from offset {cur.pos}) but the file ends at byte {cur.end}"
        )

    tiles: list = []
    tile_infos: list = []
    for t in range(raw.n_tiles):
        name = f"tile {t}"
        if raw.version == 1:
            geometry = cur.take(_GEOMETRY.size, f"the geometry of {name}")
            (geometry_crc,) = cur.unpack(_U32, f"the geometry CRC32 of {name}")
            x, y, w, h, pl, pr, pt, pb = _GEOMETRY.unpack(geometry)
            what = "geometry"
        else:
            start = cur.pos
            x, y, w, h = (cur.varint(f"{name}: {f}") for f in ("x", "y", "w", "h"))
            pl, pr, pt, pb = (cur.varint(f"{name}: {f}", 16) for f in ("pad_left", "pad_right", "pad_top", "pad_bottom"))
            lengths = [cur.varint(f"{name}: the length of stream {s}") for s in range(hdr.streams_per_tile)]
            geometry = cur.buf[start : cur.pos]
            (geometry_crc,) = cur.unpack(_U32, f"the directory CRC32 of {name}")
            what = "directory"
        geometry_ok = zlib.crc32(geometry) == geometry_crc
        if not geometry_ok:
            msg = f"{name}: {what} CRC32 mismatch (file is corrupt)"
            if not info:
                raise CrcMismatchError(msg)
            crc_errors.append(msg)
        else:
            if w < 1 or h < 1 or x + w > hdr.width or y + h > hdr.height:
                raise CorruptFileError(
                    f"{name}: region x={x} y={y} w={w} h={h} lies outside the {hdr.width}x{hdr.height} image"
                )
            if (w + pl + pr) * (h + pt + pb) > limits.tile_pixel_limit():
                raise LimitExceededError(
                    f"{name}: padded size {w + pl + pr}x{h + pt + pb} is more than the limit of "
                    f"{limits.tile_pixel_limit()} pixels"
                )
        streams = []
        if raw.version == 1:
            for s in range(hdr.streams_per_tile):
                body = _read_block(cur, f"stream {s} of {name}", limits.max_stream_bytes, crc_errors)
                streams.append(len(body) if info else bytes(body))
        else:
            for s, n in enumerate(lengths):
                if n > limits.max_stream_bytes:
                    raise LimitExceededError(f"stream {s} of {name}: declares {n} bytes, more than the limit of {limits.max_stream_bytes}")
            if sum(lengths) > cur.remaining():
                raise TruncatedFileError(
                    f"truncated file: the streams of {name} need {sum(lengths)} bytes at offset {cur.pos} "
                    f"but the file ends at byte {cur.end}"
                )
            body = cur.take(sum(lengths), f"the streams of {name}")
            (body_crc,) = cur.unpack(_U32, f"the stream CRC32 of {name}")
            if zlib.crc32(body) != body_crc:
                msg = f"{name}: stream CRC32 mismatch (file is corrupt)"
                if not info:
                    raise CrcMismatchError(msg)
                crc_errors.append(msg)
            at = 0
            for n in lengths:
                streams.append(n if info else bytes(body[at : at + n]))
                at += n
        if info:
            tile_infos.append({"x": x, "y": y, "w": w, "h": h, "pad": [pl, pr, pt, pb], "stream_bytes": streams})
        else:
            tiles.append(Tile(x=x, y=y, w=w, h=h, pad=(pl, pr, pt, pb), streams=streams))

    if cur.pos != cur.end:
        raise CorruptFileError(
            f"{cur.end - cur.pos} unexpected bytes after the last tile (the file should end at byte {cur.pos})"
        )

    if not info:
        return LicFile(header=hdr, metadata=metadata, alpha=alpha, tiles=tiles, postfilter=postfilter,
                       postfilter_classified=bool(raw.flags & FLAG_CLASSIFIED_POSTFILTER),
                       merged=bool(raw.flags & FLAG_MERGED_STREAMS))

    device_name = (
        DeviceClass(hdr.device_class).name.lower().replace("_", "-")
        if hdr.device_class in DeviceClass._value2member_map_
        else "unknown"
    )
    return {
        "format_version": raw.version,
        "file_bytes": cur.end,
        "header_bytes": raw.size,
        "model_id": hdr.model_id,
        "weights_fingerprint": hdr.weights_fingerprint.hex(),
        "quality": hdr.quality,
        "width": hdr.width,
        "height": hdr.height,
        "colour_mode": hdr.colour_mode.name,
        "bit_depth": hdr.bit_depth,
        "device_class": hdr.device_class,
        "device_class_name": device_name,
        "streams_per_tile": hdr.streams_per_tile,
        "merged_streams": bool(raw.flags & FLAG_MERGED_STREAMS),
        "tile_count": raw.n_tiles,
        "metadata": result["metadata"],
        "alpha": result["alpha"],
        "postfilter": None if postfilter is None else {
            "bytes": len(postfilter), "kernel": postfilter[0],
            "classes": postfilter[2] * postfilter[3] if raw.flags & FLAG_CLASSIFIED_POSTFILTER and len(postfilter) >= 4 else 1},
        "tiles": tile_infos,
        "stream_bytes_total": sum(sum(t["stream_bytes"]) for t in tile_infos),
        "crc_ok": not crc_errors,
        "crc_errors": crc_errors,
    }


def read(data: Union[bytes, bytearray, memoryview], limits: Limits | None = None) -> LicFile:
    """Parse and fully validate a .lic file (all CRCs, metadata and alpha decompressed).

    Raises only CodecError subclasses for bad data.
    """
    try:
        return _parse(data, limits, info=False)
    except MemoryError:
        raise LimitExceededError("out of memory while reading the .lic file") from None


def read_info(data: Union[bytes, bytearray, memoryview], limits: Limits | None = None) -> dict:
    """Everything ``codec info`` shows, as a JSON-serialisable dict, without decompressing.

    Structural errors raise like :func:`read`, and so does a header CRC mismatch
    (nothing after the header can be trusted).  CRC mismatches in the metadata,
    alpha, tile geometry and streams are reported in ``crc_errors`` with
    ``crc_ok`` False instead.
    """
    try:
        return _parse(data, limits, info=True)
    except MemoryError:
        raise LimitExceededError("out of memory while reading the .lic file") from None


def stream_names(streams_per_tile: int) -> list[str] | None:
    """The names of a tile's streams in the layout of FORMAT.md 11.3, which every model of section
    11 uses: ``z``, then ``y/g<k>/anchor`` and ``y/g<k>/non_anchor`` for each channel group k (the
    paths of the streams in the model's tree of latent codecs); None for a count that is not 1 + 2K."""
    if streams_per_tile < 1 or streams_per_tile % 2 == 0:
        return None
    return ["z"] + [f"y/g{k}/{p}" for k in range((streams_per_tile - 1) // 2) for p in ("anchor", "non_anchor")]


def info_lines(d: dict, file: str) -> str:
    """The text ``codec info`` prints for a :func:`read_info` dict ``d`` of the file named ``file``
    (adds its ``bpp`` to ``d``)."""
    d["bpp"] = 8.0 * d["file_bytes"] / (d["width"] * d["height"])
    lines = [
        f"file:        {file} ({d['file_bytes']} bytes, {d['bpp']:.4f} bpp)",
        f"format:      .lic version {d['format_version']}",
        f"image:       {d['width']}x{d['height']} {d['colour_mode']}, {d['bit_depth']}-bit",
        f"model:       {d['model_id']} (weights {d['weights_fingerprint']})",
        f"quality:     {d['quality']:g}" if d["quality"] else "quality:     fixed-rate model",
        "entropy:     device-independent (integer table indexes: decodes on any device)"
        if d["device_class"] == DeviceClass.DEVICE_INDEPENDENT
        else f"entropy:     parameters computed on {d['device_class_name']} (decodes on a {d['device_class_name']} device)",
        f"tiles:       {d['tile_count']}, " + ("1 stream each (the model's streams merged)" if d.get("merged_streams")
                                                else f"{len(d['tiles'][0]['stream_bytes'])} streams each"),
        f"streams:     {d['stream_bytes_total']} bytes" + (f" ({d['tile_count']} tiles added up)" if d["tile_count"] > 1 else ""),
    ]
    # by name (FORMAT.md 11.3), in coding order
    names = d.get("stream_names") or [f"stream {i}" for i in range(len(d["tiles"][0]["stream_bytes"]))]
    width = max(map(len, names))
    for i, name in enumerate(names):
        lines.append(f"{'':13}{name:<{width}} {sum(t['stream_bytes'][i] for t in d['tiles']):>8}")
    if d.get("metadata"):
        lines.append(f"metadata:    {d['metadata']['content_bytes']} bytes ({d['metadata']['compressed_bytes']} compressed)")
    if d.get("alpha"):
        lines.append(f"alpha:       {d['alpha']['content_bytes']} bytes ({d['alpha']['compressed_bytes']} compressed)")
    if d.get("postfilter"):
        k, n = d["postfilter"]["kernel"], d["postfilter"].get("classes", 1)
        lines.append(f"post-filter: {k}x{k}{f', {n} classes' if n > 1 else ''}, {d['postfilter']['bytes']} bytes")
    lines.append("integrity:   all CRCs OK" if d["crc_ok"] else "integrity:   CORRUPT: " + "; ".join(d["crc_errors"]))
    return "\n".join(lines)


def _read_exactly(fh: BinaryIO, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = fh.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_header_from_file(
    source: Union[str, os.PathLike, BinaryIO], limits: Limits | None = None
) -> Header:
    """Read and validate only the header (a few dozen bytes) of a .lic file.

    ``source`` is a path or a binary file object positioned at the start of
    the file.  The header CRC is verified; nothing after the header is read.
    """
    if isinstance(source, (str, bytes, os.PathLike)):
        with open(source, "rb") as fh:
            return read_header_from_file(fh, limits)
    prefix = _read_exactly(source, _PREFIX_SIZE)
    rest = b""
    if len(prefix) == _PREFIX_SIZE and prefix[: len(MAGIC)] == MAGIC:
        rest = _read_exactly(source, prefix[-1] + _HEADER_TAIL.size + _U32.size)
    cur = _Cursor(memoryview(prefix + rest))
    return _parse_header(cur, limits or Limits()).header
