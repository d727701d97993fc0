"""Tests for the .lic container (formats/container.py, spec in formats/FORMAT.md).

Invalid files are crafted with ``raw_file`` below, a deliberately independent
re-statement of the byte layout that lets every field be set to any value.
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard

from lalic_codec.errors import (
    CodecError,
    CorruptFileError,
    CrcMismatchError,
    LimitExceededError,
    NotALicFileError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from lalic_codec.formats import container as C
from lalic_codec.formats.container import (
    FORMAT_VERSION,
    MAGIC,
    ColourMode,
    Header,
    LicFile,
    Limits,
    Metadata,
    Tile,
    read,
    read_header_from_file,
    read_info,
    write,
)

FP = bytes(range(16))
FORMAT_MD = Path(C.__file__).with_name("FORMAT.md")


# --------------------------------------------------------------------------- helpers


def make_header(**kw) -> Header:
    args = dict(
        model_id="lalic",
        weights_fingerprint=FP,
        quality=0.25,
        width=6,
        height=4,
        colour_mode=ColourMode.RGB,
        bit_depth=8,
        device_class=0,
        streams_per_tile=3,
    )
    args.update(kw)
    return Header(**args)


def sample_file() -> LicFile:
    """A small valid file using every feature: metadata, alpha, 2 tiles, 3 streams each (one empty)."""
    h = make_header(colour_mode=ColourMode.RGBA, device_class=2)
    return LicFile(
        header=h,
        metadata=Metadata(icc=b"fake icc profile", exif=b"Exif\0\0MM", xmp=b"<x:xmpmeta/>"),
        alpha=bytes(range(24)),
        tiles=[
            Tile(0, 0, 4, 4, (2, 2, 2, 2), [b"hyper", b"", b"non-anchor bytes"]),
            Tile(4, 0, 2, 4, (3, 3, 2, 2), [b"z2", b"a2", b"n2!"]),
        ],
    )


SAMPLE = write(sample_file(), version=1)  # the layout() below is version 1's; test_container_v2 has version 2's


def layout(data: bytes) -> dict:
    """Offsets of every part of a *valid* file, computed from the spec (not from the reader)."""
    out = {}
    id_len = data[10]
    p = 11 + id_len
    out["fingerprint"] = p
    p += 36
    out["header_crc"] = p
    flags = data[p - 5]
    n_tiles, spt = struct.unpack_from("<HH", data, p - 4)
    p += 4
    for bit, name in ((1, "metadata"), (2, "alpha")):
        if flags & bit:
            (length,) = struct.unpack_from("<I", data, p)
            out[name] = (p, p + 8, length)  # length field, body offset, body length
            p += 8 + length
    out["tiles"] = []
    for _ in range(n_tiles):
        tile = {"geometry": p, "geometry_crc": p + 24, "streams": []}
        p += 28
        for _ in range(spt):
            (length,) = struct.unpack_from("<I", data, p)
            tile["streams"].append((p, p + 8, length))
            p += 8 + length
        out["tiles"].append(tile)
    out["end"] = p
    assert p == len(data)
    return out


def zframe(content: bytes, level: int = 3, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=content_size).compress(content)


def tlv(tag: int, value: bytes) -> bytes:
    return struct.pack("<BI", tag, len(value)) + value


def block(body: bytes, crc: int | None = None) -> bytes:
    return struct.pack("<II", len(body), zlib.crc32(body) if crc is None else crc) + body


def raw_file(
    *,
    version=1,
    model_id=b"lalic",
    id_len=None,
    fingerprint=FP,
    quality=0.0,
    width=6,
    height=4,
    mode=0,
    depth=8,
    device=0,
    flags=None,
    n_tiles=None,
    spt=None,
    header_crc=None,
    metadata: bytes | None = None,  # zstd frame
    alpha: bytes | None = None,  # zstd frame
    tiles=None,  # list of ((x, y, w, h, pl, pr, pt, pb), [streams])
    trailing=b"",
) -> bytes:
    """Assemble a file field by field; anything may be invalid."""
    if tiles is None:
        tiles = [((0, 0, width, height, 0, 0, 0, 0), [b"s0", b"s1"])]
    if flags is None:
        flags = (1 if metadata is not None else 0) | (2 if alpha is not None else 0)
    n_tiles = len(tiles) if n_tiles is None else n_tiles
    if spt is None:
        spt = len(tiles[0][1]) if tiles else 1
    head = MAGIC + struct.pack("<HB", version, len(model_id) if id_len is None else id_len) + model_id
    head += fingerprint + struct.pack("<fIIBBBBHH", quality, width, height, mode, depth, device, flags, n_tiles, spt)
    head += struct.pack("<I", zlib.crc32(head) if header_crc is None else header_crc)
    parts = [head]
    if metadata is not None:
        parts.append(block(metadata))
    if alpha is not None:
        parts.append(block(alpha))
    for geometry, streams in tiles:
        g = struct.pack("<IIIIHHHH", *geometry)
        parts.append(g + struct.pack("<I", zlib.crc32(g)))
        parts += [block(s) for s in streams]
    parts.append(trailing)
    return b"".join(parts)


def fix_header_crc(data: bytearray) -> bytearray:
    p = layout_header_crc_offset(data)
    data[p : p + 4] = struct.pack("<I", zlib.crc32(bytes(data[:p])))
    return data


def layout_header_crc_offset(data) -> int:
    return 11 + data[10] + 36


def only_codec_errors(data, *, info=False) -> None:
    """Parse arbitrary bytes: success or a CodecError with a one-line message, nothing else."""
    try:
        (read_info if info else read)(data)
    except CodecError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, repr(msg)


# --------------------------------------------------------------------------- basics


def test_constants():
    assert MAGIC == bytes([0x89, 0x4C, 0x49, 0x43, 0x0D, 0x0A, 0x1A, 0x0A])
    assert FORMAT_VERSION == 2 and C.SUPPORTED_VERSIONS == (1, 2)
    assert [m.name for m in ColourMode] == ["RGB", "L", "RGBA", "LA", "P"]
    assert [int(m) for m in ColourMode] == [0, 1, 2, 3, 4]


def test_no_heavy_imports():
    code = (
        "import sys, lalic_codec.formats.container as c; "
        "c.read(c.write(c.LicFile(c.Header('x', bytes(16), 0, 1, 1, c.ColourMode.L, 8, 0, 1), "
        "tiles=[c.Tile(0, 0, 1, 1, (0, 0, 0, 0), [b''])]))); "
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sample_layout_is_as_specified():
    lay = layout(SAMPLE)
    assert SAMPLE[:8] == MAGIC
    assert struct.unpack_from("<H", SAMPLE, 8)[0] == 1
    assert SAMPLE[10] == 5 and SAMPLE[11:16] == b"lalic"
    assert SAMPLE[16:32] == FP
    assert lay["header_crc"] == 52
    assert struct.unpack_from("<I", SAMPLE, 52)[0] == zlib.crc32(SAMPLE[:52])
    assert len(lay["tiles"]) == 2 and all(len(t["streams"]) == 3 for t in lay["tiles"])


# --------------------------------------------------------------------------- round trips


def roundtrip(f: LicFile) -> LicFile:
    for version in C.SUPPORTED_VERSIONS:
        data = write(f, version=version)
        g = read(data)
        assert g == f
        assert read(bytearray(data)) == f
        assert read(memoryview(data)) == f
        assert write(g, version=version) == data  # deterministic
        info = read_info(data)
        json.dumps(info)
        assert info["crc_ok"] and info["file_bytes"] == len(data) and info["format_version"] == version
        assert read_header_from_file(io.BytesIO(data)) == f.header
    return g


def test_roundtrip_sample():
    g = roundtrip(sample_file())
    assert g.tiles[0].streams[1] == b""
    assert isinstance(g.header.colour_mode, ColourMode)
    assert isinstance(g.tiles[0].pad, tuple)


def test_roundtrip_minimal():
    f = LicFile(make_header(width=1, height=1, streams_per_tile=1), tiles=[Tile(0, 0, 1, 1, (0, 0, 0, 0), [b""])])
    roundtrip(f)
    assert len(write(f, version=1)) == 8 + 2 + 1 + 5 + 36 + 4 + 28 + 8
    assert len(write(f)) == 8 + 2 + 1 + 5 + 36 + 4 + 8 + 1 + 4 + 4  # 8 one-byte varints, one length, two CRCs


@pytest.mark.parametrize("model_id", ["lalic", "mambaic", "default-v1", "a", "x" * 64, "m.b_c-1.0", "0"])
def test_roundtrip_model_ids(model_id):
    f = sample_file()
    f.header.model_id = model_id
    assert roundtrip(f).header.model_id == model_id


@pytest.mark.parametrize("quality", [0.0, 1.0, -2.5, 0.0130000002682209, 1e30, 1e-40])
def test_roundtrip_quality(quality):
    f = sample_file()
    f.header.quality = struct.unpack("<f", struct.pack("<f", quality))[0]
    roundtrip(f)


def test_quality_is_stored_as_float32():
    f = sample_file()
    f.header.quality = 0.1
    assert read(write(f)).header.quality == struct.unpack("<f", struct.pack("<f", 0.1))[0]


@pytest.mark.parametrize("device_class", [0, 1, 2, 255])
def test_roundtrip_device_class(device_class):
    f = sample_file()
    f.header.device_class = device_class
    assert roundtrip(f).header.device_class == device_class


def test_roundtrip_no_metadata_no_alpha():
    f = LicFile(
        make_header(colour_mode=ColourMode.L, bit_depth=16, streams_per_tile=2),
        tiles=[Tile(0, 0, 6, 4, (1, 1, 2, 2), [b"a" * 300, b""])],
    )
    data = write(f)
    assert data[layout_header_crc_offset(data) - 5] == 0  # flags
    roundtrip(f)


def test_roundtrip_all_metadata_and_palette():
    md = Metadata(icc=b"\x00icc" * 100, exif=b"exif" * 7, xmp=b"<xmp/>", palette=bytes(range(256)) * 3)
    f = LicFile(make_header(colour_mode=ColourMode.P), metadata=md, tiles=[Tile(0, 0, 6, 4, (0, 0, 0, 0), [b"1", b"2", b"3"])])
    g = roundtrip(f)
    assert g.metadata == md and not g.metadata.is_empty()


def test_metadata_empty_values_mean_absent():
    assert Metadata().is_empty()
    assert Metadata(icc=b"", exif=None).is_empty()
    f = LicFile(make_header(), metadata=Metadata(icc=b"", xmp=b"x"), tiles=[Tile(0, 0, 6, 4, (0, 0, 0, 0), [b"", b"", b""])])
    assert read(write(f)).metadata == Metadata(xmp=b"x")
    f.metadata = Metadata(icc=b"")
    data = write(f)
    assert data[layout_header_crc_offset(data) - 5] == 0  # no metadata block written
    assert read(data).metadata.is_empty()


def test_roundtrip_la_16bit_alpha_is_two_bytes_per_sample():
    h = make_header(colour_mode=ColourMode.LA, bit_depth=16, width=5, height=3, streams_per_tile=1)
    assert C.alpha_plane_size(h) == 30
    f = LicFile(h, alpha=bytes(range(30)), tiles=[Tile(0, 0, 5, 3, (0, 0, 0, 0), [b"x"])])
    roundtrip(f)


def test_roundtrip_many_tiles_and_streams():
    rng = random.Random(1)
    w, h, spt = 50, 30, 9
    tiles = []
    for ty in range(0, h, 7):
        for tx in range(0, w, 11):
            tw, th = min(11, w - tx), min(7, h - ty)
            streams = [rng.randbytes(rng.choice([0, 1, 5, 100])) for _ in range(spt)]
            tiles.append(Tile(tx, ty, tw, th, (rng.randrange(9), 0, 65535, 3), streams))
    f = LicFile(make_header(width=w, height=h, streams_per_tile=spt), tiles=tiles)
    g = roundtrip(f)
    assert len(g.tiles) == 25
    info = read_info(write(f))
    assert info["tile_count"] == 25
    assert info["stream_bytes_total"] == sum(len(s) for t in tiles for s in t.streams)


def test_write_accepts_bytes_like():
    f = sample_file()
    f.header.weights_fingerprint = bytearray(FP)
    f.alpha = memoryview(bytes(range(24)))
    f.tiles[0].streams = [bytearray(b"hyper"), memoryview(b""), b"non-anchor bytes"]
    f.tiles[1].pad = [3, 3, 2, 2]
    assert write(f, version=1) == SAMPLE


def test_large_stream_roundtrip():
    f = sample_file()
    f.tiles[1].streams[2] = random.Random(3).randbytes(3 * 2**20)
    roundtrip(f)


# --------------------------------------------------------------------------- writer validation


def _bad(**changes):
    def mutate(f):
        for key, value in changes.items():
            obj, attr = key.split("__")
            setattr(getattr(f, obj) if obj != "file" else f, attr, value)

    return mutate


def _tile_change(i, **kw):
    def mutate(f):
        for k, v in kw.items():
            setattr(f.tiles[i], k, v)

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        _bad(header__weights_fingerprint=b"\0" * 15),
        _bad(header__weights_fingerprint=b"\0" * 17),
        _bad(header__weights_fingerprint="0" * 16),
        _bad(header__model_id=""),
        _bad(header__model_id="x" * 65),
        _bad(header__model_id="LALIC"),
        _bad(header__model_id="lalic v1"),
        _bad(header__model_id="lälic"),
        _bad(header__model_id="lalic\n"),
        _bad(header__model_id=b"lalic"),
        _bad(header__quality=float("nan")),
        _bad(header__quality=float("inf")),
        _bad(header__quality=1e300),
        _bad(header__quality="high"),
        _bad(header__width=0),
        _bad(header__height=-1),
        _bad(header__width=2**32),
        _bad(header__width=6.0),
        _bad(header__colour_mode=7),
        _bad(header__bit_depth=12),
        _bad(header__device_class=256),
        _bad(header__streams_per_tile=0),
        _bad(header__streams_per_tile=2),  # tiles have 3
        _bad(file__alpha=None),  # RGBA needs alpha
        _bad(file__alpha=b"\0" * 23),
        _bad(file__tiles=[]),
        _bad(metadata__palette=bytes(768)),  # palette with RGBA
        _tile_change(0, streams=[b"a", b"b"]),
        _tile_change(1, x=5),  # 5 + 2 > 6
        _tile_change(1, w=0),
        _tile_change(0, pad=(0, 0, 0)),
        _tile_change(0, pad=(0, 0, 0, 65536)),
        _tile_change(0, pad=(0, 0, 0, -1)),
        _tile_change(0, streams=["text", b"", b""]),
    ],
)
def test_write_rejects_programmer_errors(mutate):
    f = sample_file()
    mutate(f)
    with pytest.raises(ValueError):
        write(f)


def test_write_rejects_alpha_for_rgb_and_palette_rules():
    f = LicFile(make_header(streams_per_tile=1), alpha=bytes(24), tiles=[Tile(0, 0, 6, 4, (0, 0, 0, 0), [b""])])
    with pytest.raises(ValueError, match="alpha"):
        write(f)
    f.alpha = None
    f.header.colour_mode = ColourMode.P
    with pytest.raises(ValueError, match="palette"):
        write(f)
    f.metadata.palette = bytes(767)
    with pytest.raises(ValueError, match="palette"):
        write(f)
    f.metadata.palette = bytes(768)
    f.header.bit_depth = 16
    with pytest.raises(ValueError):
        write(f)
    f.header.bit_depth = 8
    read(write(f))


def test_write_enforces_limits():
    f = LicFile(make_header(width=2**15, height=2**14, streams_per_tile=1), tiles=[Tile(0, 0, 1, 1, (0, 0, 0, 0), [b""])])
    with pytest.raises(LimitExceededError):
        write(f)  # 2**29 pixels > default 2**28
    write(f, Limits(max_pixels=2**29))
    f.tiles[0].streams = [b"x" * 100]
    with pytest.raises(LimitExceededError):
        write(f, Limits(max_pixels=2**29, max_stream_bytes=99))
    with pytest.raises(LimitExceededError):
        write(sample_file(), Limits(max_metadata_bytes=10))
    with pytest.raises(LimitExceededError):
        write(sample_file(), Limits(max_tiles=1))


# --------------------------------------------------------------------------- magic and version


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + SAMPLE[8:],
        b"hello world, this is not a lic file",
        SAMPLE[1:],
        b"\x00" * 100,
        b"x",
    ],
)
def test_bad_magic(data):
    with pytest.raises(NotALicFileError, match="not a .lic file"):
        read(data)
    with pytest.raises(NotALicFileError):
        read_info(data)
    with pytest.raises(NotALicFileError):
        read_header_from_file(io.BytesIO(data))


def test_empty_file():
    with pytest.raises(NotALicFileError, match="empty"):
        read(b"")


def test_text_mode_mangling_is_detected():
    mangled = SAMPLE.replace(b"\r\n", b"\n", 1)
    with pytest.raises(NotALicFileError, match="text mode"):
        read(mangled)
    with pytest.raises(NotALicFileError, match="high bit"):
        read(b"\x09" + SAMPLE[1:])


@pytest.mark.parametrize("version", [0, 3, 256, 65535])
def test_unknown_version(version):
    data = bytearray(SAMPLE)
    data[8:10] = struct.pack("<H", version)
    # checked before the header CRC: a future version may lay out its header differently
    with pytest.raises(UnsupportedVersionError, match=f"version {version}"):
        read(bytes(data))
    with pytest.raises(UnsupportedVersionError):
        read_header_from_file(io.BytesIO(bytes(data)))
    # a newer file that is even shorter than our header is still "unsupported", not "truncated"
    with pytest.raises(UnsupportedVersionError):
        read(bytes(data[:10]))


@pytest.mark.parametrize("flags", [0x20, 0x80, 0xFF, 0x3F])
def test_unknown_flags(flags):
    data = raw_file(flags=flags)
    with pytest.raises(UnsupportedVersionError, match="unknown flags"):
        read(data)


def test_a_classified_post_filter_flag_without_the_block_is_corrupt():
    with pytest.raises(CorruptFileError, match="flags bit 4.*no post-filter block"):
        read(raw_file(flags=0x10))


@pytest.mark.parametrize(
    "fields, exc, pattern",
    [
        (dict(mode=5), UnsupportedVersionError, "colour mode"),
        (dict(mode=255), UnsupportedVersionError, "colour mode"),
        (dict(depth=12), UnsupportedVersionError, "bit depth"),
        (dict(depth=0), UnsupportedVersionError, "bit depth"),
        (dict(width=0), CorruptFileError, "image size"),
        (dict(height=0), CorruptFileError, "image size"),
        (dict(n_tiles=0, tiles=[]), CorruptFileError, "0 tiles"),
        (dict(spt=0, tiles=[((0, 0, 6, 4, 0, 0, 0, 0), [])]), CorruptFileError, "0 streams"),
        (dict(model_id=b""), CorruptFileError, "model identifier"),
        (dict(model_id=b"LALIC"), CorruptFileError, "model identifier"),
        (dict(model_id=b"l\xc3\xa4lic"), CorruptFileError, "model identifier"),
        (dict(model_id=b"\xff" * 200), CorruptFileError, "model identifier"),
        (dict(model_id=b"a" * 65), CorruptFileError, "model identifier"),
        (dict(quality=float("nan")), CorruptFileError, "quality"),
        (dict(quality=float("-inf")), CorruptFileError, "quality"),
        (dict(mode=2), CorruptFileError, "no alpha block"),  # RGBA without alpha block
        (dict(alpha=zframe(bytes(24))), CorruptFileError, "alpha"),  # RGB with alpha block
        (dict(mode=4), CorruptFileError, "palette"),  # P without metadata
        (dict(mode=4, depth=16, metadata=zframe(tlv(4, bytes(768)))), CorruptFileError, "bit depth"),
        (dict(mode=4, metadata=zframe(tlv(1, b"icc"))), CorruptFileError, "palette"),
        (dict(metadata=zframe(tlv(4, bytes(768)))), CorruptFileError, "palette"),  # palette with RGB
    ],
)
def test_invalid_header_fields(fields, exc, pattern):
    data = raw_file(**fields)
    with pytest.raises(exc, match=pattern) as info:
        read(data)
    if exc is CorruptFileError:
        assert type(info.value) is CorruptFileError


def test_p_mode_with_palette_is_valid():
    f = read(raw_file(mode=4, metadata=zframe(tlv(4, bytes(range(256)) * 3))))
    assert f.header.colour_mode is ColourMode.P and len(f.metadata.palette) == 768


# --------------------------------------------------------------------------- truncation


def test_truncation_at_every_offset():
    assert read(SAMPLE) == sample_file()
    with pytest.raises(NotALicFileError):
        read(SAMPLE[:0])
    for n in range(1, len(SAMPLE)):
        prefix = SAMPLE[:n]
        for parse in (read, read_info):
            with pytest.raises(TruncatedFileError) as info:
                parse(prefix)
            msg = str(info.value)
            assert msg.startswith("truncated file") and "\n" not in msg
            assert f"byte {n}" in msg, msg


def test_truncation_at_every_offset_of_a_minimal_file():
    data = raw_file(tiles=[((0, 0, 6, 4, 0, 0, 0, 0), [b""])])
    read(data)
    for n in range(1, len(data)):
        with pytest.raises(TruncatedFileError):
            read(data[:n])


def test_truncation_message_names_the_part():
    lay = layout(SAMPLE)
    _, body, length = lay["tiles"][1]["streams"][2]
    with pytest.raises(TruncatedFileError, match="stream 2 of tile 1"):
        read(SAMPLE[: body + length - 1])
    with pytest.raises(TruncatedFileError, match="header"):
        read(SAMPLE[:30])
    with pytest.raises(TruncatedFileError, match="alpha block"):
        read(SAMPLE[: lay["alpha"][1] + 3])
    with pytest.raises(TruncatedFileError, match="metadata block"):
        read(SAMPLE[: lay["metadata"][0] + 2])


def test_header_declaring_too_many_tiles_fails_early():
    data = raw_file(n_tiles=3)  # declares 3 tiles, contains 1
    with pytest.raises(TruncatedFileError, match="declares 3 tiles of 2 streams"):
        read(data)
    data = raw_file(spt=40000)
    with pytest.raises(TruncatedFileError, match="40000 streams"):
        read(data)


def test_header_truncation_from_file_object():
    header_size = layout(SAMPLE)["header_crc"] + 4
    for n in range(1, header_size):
        with pytest.raises(TruncatedFileError):
            read_header_from_file(io.BytesIO(SAMPLE[:n]))
    assert read_header_from_file(io.BytesIO(SAMPLE[:header_size])) == sample_file().header


# --------------------------------------------------------------------------- CRC


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


def test_header_crc_mismatch():
    lay = layout(SAMPLE)
    for offset in [10 + 1, lay["fingerprint"], lay["fingerprint"] + 16, lay["header_crc"] - 1, lay["header_crc"] + 3]:
        bad = flip(SAMPLE, offset)
        with pytest.raises(CrcMismatchError, match="^header: CRC32 mismatch"):
            read(bad)
        with pytest.raises(CrcMismatchError, match="header"):
            read_info(bad)  # nothing after a bad header can be trusted
        with pytest.raises(CrcMismatchError, match="header"):
            read_header_from_file(io.BytesIO(bad))


@pytest.mark.parametrize("part", ["metadata", "alpha"])
def test_block_crc_mismatch(part):
    length_at, body, length = layout(SAMPLE)[part]
    for offset in (body, body + length - 1, length_at + 4):  # first / last body byte, the CRC itself
        bad = flip(SAMPLE, offset, 0x40)
        with pytest.raises(CrcMismatchError, match=f"^{part} block: CRC32 mismatch") as info:
            read(bad)
        assert "corrupt" in str(info.value)
        report = read_info(bad)
        assert report["crc_ok"] is False
        assert report["crc_errors"] == [f"{part} block: CRC32 mismatch (file is corrupt)"]


@pytest.mark.parametrize("tile", [0, 1])
def test_tile_geometry_crc_mismatch(tile):
    t = layout(SAMPLE)["tiles"][tile]
    for offset in (t["geometry"], t["geometry"] + 23, t["geometry_crc"]):
        bad = flip(SAMPLE, offset, 0x80)
        with pytest.raises(CrcMismatchError, match=f"^tile {tile}: geometry CRC32 mismatch"):
            read(bad)
        report = read_info(bad)
        assert not report["crc_ok"] and report["crc_errors"] == [f"tile {tile}: geometry CRC32 mismatch (file is corrupt)"]


def test_every_stream_crc_mismatch():
    lay = layout(SAMPLE)
    for t, tile in enumerate(lay["tiles"]):
        for s, (length_at, body, length) in enumerate(tile["streams"]):
            targets = [length_at + 4] + ([body, body + length - 1] if length else [])
            for offset in targets:
                bad = flip(SAMPLE, offset, 0x10)
                with pytest.raises(CrcMismatchError) as info:
                    read(bad)
                assert str(info.value) == f"stream {s} of tile {t}: CRC32 mismatch (file is corrupt)"
                report = read_info(bad)
                assert report["crc_errors"] == [str(info.value)]
                assert report["tiles"][t]["stream_bytes"][s] == length


def test_read_info_collects_several_crc_errors():
    lay = layout(SAMPLE)
    bad = flip(flip(SAMPLE, lay["alpha"][1]), lay["tiles"][1]["streams"][0][1])
    report = read_info(bad)
    assert report["crc_errors"] == [
        "alpha block: CRC32 mismatch (file is corrupt)",
        "stream 0 of tile 1: CRC32 mismatch (file is corrupt)",
    ]
    assert report["alpha"]["content_bytes"] is None


def test_stream_length_field_corruption():
    lay = layout(SAMPLE)
    length_at = lay["tiles"][0]["streams"][0][0]
    for delta in (-1, 1, 7):
        b = bytearray(SAMPLE)
        b[length_at] += delta
        with pytest.raises((CrcMismatchError, TruncatedFileError, CorruptFileError)):
            read(bytes(b))


# --------------------------------------------------------------------------- limits


def test_huge_image_is_rejected_before_anything_else():
    data = raw_file(width=2**32 - 1, height=2**32 - 1)
    with pytest.raises(LimitExceededError, match="pixels"):
        read(data)
    data = raw_file(width=2**16, height=2**12 + 1)  # just over 2**28
    with pytest.raises(LimitExceededError):
        read(data)
    data = raw_file(width=2**16, height=2**12, tiles=[((0, 0, 1, 1, 0, 0, 0, 0), [b""])])
    assert read(data).header.width == 2**16  # exactly 2**28 is fine
    with pytest.raises(LimitExceededError, match="header: image is 6x4 = 24 pixels"):
        read(SAMPLE, Limits(max_pixels=23))
    with pytest.raises(LimitExceededError, match="tile 0: padded size 8x8"):
        read(SAMPLE, Limits(max_pixels=63))  # the padded tiles are 8x8
    read(SAMPLE, Limits(max_pixels=64))


def test_padded_tile_size_limit():
    data = raw_file(width=4, height=4, tiles=[((0, 0, 4, 4, 65535, 65535, 65535, 65535), [b""])])
    with pytest.raises(LimitExceededError, match="tile 0: padded size"):
        read(data)


def test_tile_outside_image():
    for geometry in [(0, 0, 7, 4, 0, 0, 0, 0), (6, 0, 1, 4, 0, 0, 0, 0), (0, 3, 6, 2, 0, 0, 0, 0),
                     (0, 0, 0, 4, 0, 0, 0, 0), (0, 0, 6, 0, 0, 0, 0, 0), (2**32 - 1, 0, 2**32 - 1, 1, 0, 0, 0, 0)]:
        data = raw_file(tiles=[((0, 0, 6, 4, 0, 0, 0, 0), [b""]), (geometry, [b""])])
        with pytest.raises(CorruptFileError, match="tile 1: region .* outside the 6x4 image"):
            read(data)


def test_too_many_tiles_limit():
    with pytest.raises(LimitExceededError, match="tiles"):
        read(SAMPLE, Limits(max_tiles=1))


def test_stream_length_beyond_file_end():
    lay = layout(SAMPLE)
    length_at = lay["tiles"][1]["streams"][1][0]
    b = bytearray(SAMPLE)
    b[length_at : length_at + 4] = struct.pack("<I", 10_000)
    with pytest.raises(TruncatedFileError, match="stream 1 of tile 1 needs 10000 bytes"):
        read(bytes(b))


def test_stream_length_beyond_limit():
    lay = layout(SAMPLE)
    length_at = lay["tiles"][0]["streams"][2][0]
    b = bytearray(SAMPLE)
    b[length_at : length_at + 4] = struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(LimitExceededError, match="stream 2 of tile 0"):
        read(bytes(b))
    data = raw_file(tiles=[((0, 0, 6, 4, 0, 0, 0, 0), [b"", b"0123456789abcdef"])])
    read(data, Limits(max_stream_bytes=16))
    with pytest.raises(LimitExceededError, match="stream 1 of tile 0: declares 16 bytes"):
        read(data, Limits(max_stream_bytes=15))


def test_block_length_beyond_file_end_and_limit():
    lay = layout(SAMPLE)
    for part, limit_name in (("metadata", "max_metadata_bytes"), ("alpha", "max_stream_bytes")):
        length_at = lay[part][0]
        b = bytearray(SAMPLE)
        b[length_at : length_at + 4] = struct.pack("<I", 1000)
        with pytest.raises(TruncatedFileError, match=f"{part} block"):
            read(bytes(b))
        b[length_at : length_at + 4] = struct.pack("<I", 0xFFFFFFF0)
        with pytest.raises(LimitExceededError, match=f"{part} block"):
            read(bytes(b))
        with pytest.raises(LimitExceededError, match=f"{part} block"):
            read(SAMPLE, Limits(**{limit_name: lay[part][2] - 1}))


def test_metadata_content_size_over_limit_is_rejected_before_decompressing():
    content = tlv(1, bytes(16 * 2**20))  # 16 MiB + 5 bytes of zeros
    frame = zframe(content, level=1)
    assert len(frame) < 4096
    data = raw_file(metadata=frame)
    with pytest.raises(LimitExceededError, match="metadata block: declares 16777221 uncompressed bytes"):
        read(data)
    assert read(data, Limits(max_metadata_bytes=2**25)).metadata.icc == bytes(16 * 2**20)
    with pytest.raises(LimitExceededError, match="metadata block"):
        read(SAMPLE, Limits(max_metadata_bytes=30))


def _lie_about_content_size(frame: bytes, new_size: int) -> bytes:
    """Rewrite the 4-byte Frame_Content_Size field of a zstd frame (FCS flag 2, no single-segment)."""
    descriptor = frame[4]
    assert descriptor >> 6 == 2 and not descriptor & 0x20 and not descriptor & 0x03
    return frame[:6] + struct.pack("<I", new_size) + frame[10:]


def test_zstd_bomb_metadata():
    frame = zframe(tlv(2, bytes(8 * 2**20)), level=1)
    bomb = _lie_about_content_size(frame, 300)
    assert zstandard.frame_content_size(bomb) == 300
    with pytest.raises(CorruptFileError, match="metadata block: zstd"):
        read(raw_file(metadata=bomb))


def test_zstd_bomb_alpha():
    w, h = 4096, 2048
    frame = zframe(bytes(w * h * 2), level=1)  # real output is twice the alpha plane
    bomb = _lie_about_content_size(frame, w * h)
    data = raw_file(width=w, height=h, mode=2, alpha=bomb, tiles=[((0, 0, 1, 1, 0, 0, 0, 0), [b""])])
    with pytest.raises(CorruptFileError, match="alpha block: zstd"):
        read(data)


@pytest.mark.parametrize(
    "frame, pattern",
    [
        (zframe(bytes(24), content_size=False), "does not declare its content size"),
        (b"definitely not zstd", "not a valid zstd frame"),
        (b"", "not a valid zstd frame"),
        (zframe(bytes(23)), "declares 23 bytes but 24 are required"),
        (zframe(bytes(25)), "declares 25 bytes but 24 are required"),
        (zframe(bytes(24)) + b"\0", "zstd decompression failed"),  # trailing data after the frame
        (zframe(bytes(24)) + zframe(b""), "zstd decompression failed"),  # two frames
        (zframe(bytes(24))[:-2], "zstd decompression failed"),
    ],
    ids=["no-content-size", "not-zstd", "empty", "too-small", "too-large", "trailing-byte", "two-frames", "cut-frame"],
)
def test_bad_alpha_frames(frame, pattern):
    with pytest.raises(CorruptFileError, match="^alpha block: .*" + pattern):
        read(raw_file(mode=2, alpha=frame))


def test_bad_metadata_content():
    def md(content, **kw):
        return raw_file(metadata=zframe(content), **kw)

    assert read(md(b"")).metadata.is_empty()  # an empty record list is allowed
    assert read(md(tlv(9, b"future") + tlv(3, b"<xmp/>") + tlv(200, b""))).metadata == Metadata(xmp=b"<xmp/>")
    assert read(md(tlv(1, b""))).metadata.icc is None
    with pytest.raises(CorruptFileError, match="duplicate ICC"):
        read(md(tlv(1, b"a") + tlv(1, b"b")))
    with pytest.raises(CorruptFileError, match="truncated record"):
        read(md(tlv(1, b"a") + b"\x02\x00"))
    with pytest.raises(CorruptFileError, match="declares 100 bytes but only 3 remain"):
        read(md(struct.pack("<BI", 2, 100) + b"abc"))
    with pytest.raises(CorruptFileError, match="palette record is 767 bytes"):
        read(md(tlv(4, bytes(767)), mode=4))
    with pytest.raises(CorruptFileError, match="metadata block: not a valid zstd frame"):
        read(raw_file(metadata=b"\x00" * 10))


def test_trailing_garbage():
    with pytest.raises(CorruptFileError, match=r"^1 unexpected bytes after the last tile"):
        read(SAMPLE + b"\0")
    with pytest.raises(CorruptFileError, match=rf"^5 unexpected bytes after the last tile \(the file should end at byte {len(SAMPLE)}\)"):
        read_info(SAMPLE + b"abcde")
    with pytest.raises(CorruptFileError):
        read(SAMPLE + SAMPLE)


# --------------------------------------------------------------------------- fuzzing


def test_random_buffers():
    rng = random.Random(12345)
    for i in range(3000):
        n = rng.choice([rng.randrange(0, 16), rng.randrange(0, 200), rng.randrange(0, 2000)])
        body = rng.randbytes(n)
        if i % 3 == 0:
            data = body
        elif i % 3 == 1:
            data = MAGIC + b"\x01\x00" + body
        else:  # valid magic, version and model id, random rest
            data = MAGIC + b"\x01\x00\x05lalic" + body
        only_codec_errors(data)
        only_codec_errors(data, info=True)


def test_random_mutations_of_a_valid_file():
    rng = random.Random(2024)
    for _ in range(2500):
        b = bytearray(SAMPLE)
        for _ in range(rng.choice([1, 1, 2, 3, 8])):
            op = rng.randrange(5)
            pos = rng.randrange(len(b) + 1)
            if op == 0 and pos < len(b):
                b[pos] ^= 1 << rng.randrange(8)
            elif op == 1 and pos < len(b):
                b[pos] = rng.randrange(256)
            elif op == 2:
                b[pos:pos] = rng.randbytes(rng.randrange(1, 9))
            elif op == 3:
                del b[pos : pos + rng.randrange(1, 9)]
            else:
                b = b[:pos]
        data = bytes(b)
        only_codec_errors(data)
        only_codec_errors(data, info=True)


def test_random_header_fields_with_valid_crc():
    """Mutations behind a recomputed header CRC reach the field validation code."""
    rng = random.Random(7)
    crc_at = layout(SAMPLE)["header_crc"]
    accepted = 0
    for _ in range(2000):
        b = bytearray(SAMPLE)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(11, crc_at)] = rng.choice([0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        fix_header_crc(b)
        try:
            read(bytes(b))
            accepted += 1
        except CodecError as exc:
            assert "\n" not in str(exc)
        only_codec_errors(bytes(b), info=True)
    assert accepted > 0  # e.g. fingerprint / quality / device class changes are valid


def test_random_geometry_with_valid_crc():
    rng = random.Random(8)
    lay = layout(SAMPLE)
    for _ in range(1000):
        b = bytearray(SAMPLE)
        tile = lay["tiles"][rng.randrange(2)]
        g = tile["geometry"]
        b[g + rng.randrange(24)] = rng.randrange(256)
        b[g + 24 : g + 28] = struct.pack("<I", zlib.crc32(bytes(b[g : g + 24])))
        only_codec_errors(bytes(b))
        only_codec_errors(bytes(b), info=True)


def test_random_metadata_and_alpha_frames_with_valid_crc():
    """Mutated zstd frames behind a correct block CRC reach the decompression and TLV code."""
    rng = random.Random(9)
    md_frame = zframe(tlv(1, b"icc" * 20) + tlv(7, b"?") + tlv(2, b"exif"))
    alpha_frame = zframe(bytes(range(24)))
    for i in range(1500):
        frame = bytearray(md_frame if i % 2 else alpha_frame)
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(frame))
            if rng.random() < 0.7:
                frame[pos] = rng.randrange(256)
            else:
                del frame[pos : pos + rng.randrange(1, 4)]
        if i % 2:
            data = raw_file(metadata=bytes(frame))
        else:
            data = raw_file(mode=2, alpha=bytes(frame))
        only_codec_errors(data)
    for _ in range(300):  # random TLV content in a valid frame
        content = rng.randbytes(rng.randrange(0, 40))
        only_codec_errors(raw_file(metadata=zframe(content)))


# --------------------------------------------------------------------------- read_info / read_header_from_file


def test_read_info_contents():
    info = read_info(SAMPLE)
    assert json.loads(json.dumps(info)) == info
    assert info["format_version"] == 1
    assert info["file_bytes"] == len(SAMPLE)
    assert info["header_bytes"] == 56
    assert info["model_id"] == "lalic"
    assert info["weights_fingerprint"] == FP.hex()
    assert info["quality"] == 0.25
    assert (info["width"], info["height"]) == (6, 4)
    assert info["colour_mode"] == "RGBA" and info["bit_depth"] == 8
    assert info["device_class"] == 2 and info["device_class_name"] == "cuda"
    assert info["streams_per_tile"] == 3 and info["tile_count"] == 2
    lay = layout(SAMPLE)
    assert info["metadata"] == {"compressed_bytes": lay["metadata"][2], "content_bytes": 51}
    assert info["alpha"] == {"compressed_bytes": lay["alpha"][2], "content_bytes": 24}
    assert info["tiles"][0] == {"x": 0, "y": 0, "w": 4, "h": 4, "pad": [2, 2, 2, 2], "stream_bytes": [5, 0, 16]}
    assert info["tiles"][1]["stream_bytes"] == [2, 2, 3]
    assert info["stream_bytes_total"] == 28
    assert info["crc_ok"] is True and info["crc_errors"] == []


def test_read_info_does_not_decompress(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("read_info must not decompress")

    monkeypatch.setattr(zstandard, "ZstdDecompressor", boom)
    info = read_info(SAMPLE)
    assert info["crc_ok"]
    no_md = read_info(raw_file())
    assert no_md["metadata"] is None and no_md["alpha"] is None


def test_read_header_from_path_and_file_object(tmp_path):
    path = tmp_path / "x.lic"
    path.write_bytes(SAMPLE)
    expected = sample_file().header
    assert read_header_from_file(path) == expected
    assert read_header_from_file(str(path)) == expected

    class CountingReader(io.RawIOBase):
        """Unbuffered reader returning at most 7 bytes per call."""

        def __init__(self, data):
            self.data, self.pos = data, 0

        def readable(self):
            return True

        def readinto(self, buf):
            n = min(len(buf), 7, len(self.data) - self.pos)
            buf[:n] = self.data[self.pos : self.pos + n]
            self.pos += n
            return n

    fh = CountingReader(SAMPLE)
    assert read_header_from_file(fh) == expected
    assert fh.pos == 56  # read only the header
    with pytest.raises(NotALicFileError):
        read_header_from_file(io.BytesIO(b"GIF89a......."))


# --------------------------------------------------------------------------- FORMAT.md


def test_format_md_worked_example_decodes():
    text = FORMAT_MD.read_text(encoding="utf-8")
    for heading in ("Stream semantics for LALIC-family models", "Entropy-coded streams"):
        assert heading in text
    match = re.search(r"<!-- example-hex-begin -->\s*```[a-z]*\n(.*?)```\s*<!-- example-hex-end -->", text, re.S)
    assert match, "FORMAT.md must contain the worked example hex dump"
    data = bytes.fromhex("".join(line.split("|")[0].split(":", 1)[1] for line in match.group(1).splitlines() if ":" in line))
    f = read(data)
    info = read_info(data)
    assert info["file_bytes"] == len(data) and info["crc_ok"]
    assert f.header.model_id == "lalic" and f.header.colour_mode is ColourMode.LA
    # the same file in version 2: the version field, the header CRC and the tile records
    match = re.search(r"<!-- example-v2-hex-begin -->\s*```[a-z]*\n(.*?)```\s*<!-- example-v2-hex-end -->", text, re.S)
    assert match, "FORMAT.md must show the worked example in version 2"
    v2 = bytearray(data)
    rows = [line.split("|")[0].split(":", 1) for line in match.group(1).splitlines() if ":" in line]
    tiles_at = int(rows[2][0], 16)
    del v2[tiles_at:]
    for offset, hexbytes in rows:
        at, chunk = int(offset, 16), bytes.fromhex(hexbytes)
        if at >= tiles_at:
            assert at == len(v2), offset  # the tile records follow each other without gaps
            v2 += chunk
        else:
            v2[at : at + len(chunk)] = chunk
    assert read(bytes(v2)) == f and write(f) == bytes(v2) and read_info(bytes(v2))["format_version"] == 2


def test_merged_streams_flag_round_trips_and_needs_one_stream_a_tile():
    """Flags bit 3 (FORMAT.md 4.4, 12.8): each tile's one stream holds the model's streams."""
    h = make_header(streams_per_tile=1)
    f = LicFile(h, tiles=[Tile(0, 0, 6, 4, (0, 0, 0, 0), [b"crc and words"])], merged=True)
    g = roundtrip(f)
    assert g.merged
    data = write(f)
    assert data[8 + 2 + 1 + 5 + 16 + 4 + 4 + 4 + 3] == C.FLAG_MERGED_STREAMS  # the flags byte
    assert read_info(data)["merged_streams"] and not read_info(write(replace(f, merged=False)))["merged_streams"]
    assert not read(write(replace(f, merged=False))).merged
    with pytest.raises(ValueError, match="1 stream per tile, not 3"):
        write(replace(sample_file(), merged=True))
    bad = raw_file(flags=C.FLAG_MERGED_STREAMS)  # two streams a tile
    with pytest.raises(CorruptFileError, match=r"merged streams \(flags bit 3\) but 2 streams per tile"):
        read(bad)
    assert read(raw_file(flags=C.FLAG_MERGED_STREAMS, tiles=[((0, 0, 6, 4, 0, 0, 0, 0), [b"s"])])).merged
