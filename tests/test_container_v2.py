"""Format version 2 (FORMAT.md 7 and 8): the header, metadata and alpha blocks of version 1; each
tile record is a directory of unsigned LEB128 varints (geometry, then the stream lengths) with its
CRC32, then the streams back to back with one CRC32.  About 90 of the 193 bytes a one-tile file of
the default model spends outside its streams."""

import io
import struct
import zlib

import pytest
from test_container import SAMPLE, layout_header_crc_offset, make_header, only_codec_errors, raw_file, sample_file

from lalic_codec.errors import (
    CodecError,
    CorruptFileError,
    CrcMismatchError,
    DamagedVersionError,
    LimitExceededError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from lalic_codec.formats import container as C
from lalic_codec.formats.container import LicFile, Limits, Tile, read, read_header_from_file, read_info, write

V2 = write(sample_file(), version=2)


def leb128(value: int) -> bytes:
    """Unsigned LEB128, written out independently of the container module."""
    groups = [value & 0x7F]
    value >>= 7
    while value:
        groups.append(value & 0x7F)
        value >>= 7
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def v2_tile(geometry, streams, directory: bytes | None = None, directory_crc=None, stream_crc=None) -> bytes:
    d = directory if directory is not None else b"".join(leb128(v) for v in (*geometry, *map(len, streams)))
    body = b"".join(streams)
    return (d + struct.pack("<I", zlib.crc32(d) if directory_crc is None else directory_crc)
            + body + struct.pack("<I", zlib.crc32(body) if stream_crc is None else stream_crc))


def tile_records(f: LicFile) -> list[bytes]:
    return [v2_tile((t.x, t.y, t.w, t.h, *t.pad), t.streams) for t in f.tiles]


def v2_file(*tiles: bytes, spt: int = 2, n_tiles: int | None = None) -> bytes:
    head = raw_file(version=2, tiles=[], n_tiles=len(tiles) if n_tiles is None else n_tiles, spt=spt)
    return head + b"".join(tiles)


def test_leb128_vectors():
    for value, encoded in ((0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (300, "ac02"), (16384, "808001"),
                           (2**32 - 1, "ffffffff0f")):
        assert C._varint(value).hex() == encoded == leb128(value).hex()


def test_round_trip_and_info():
    assert V2[8:10] == struct.pack("<H", 2) and V2[:8] == SAMPLE[:8]
    assert read(V2) == sample_file() == read(SAMPLE)
    a, b = read_info(V2), read_info(SAMPLE)
    assert (a["format_version"], b["format_version"]) == (2, 1)
    assert a.pop("file_bytes") < b.pop("file_bytes")
    a.pop("format_version"), b.pop("format_version")
    assert a == b and a["crc_ok"]
    assert read_header_from_file(io.BytesIO(V2)) == sample_file().header
    # after the header and the blocks of version 1 (only the version and the header CRC differ),
    # the tile records as the spec lays them out
    records = b"".join(tile_records(sample_file()))
    head, blocks = layout_header_crc_offset(V2), len(V2) - len(records)
    assert V2.endswith(records)
    assert V2[:8] + V2[10:head] + V2[head + 4 : blocks] == SAMPLE[:8] + SAMPLE[10:head] + SAMPLE[head + 4 : blocks]


def test_a_default_model_tile_costs_90_bytes_less():
    """One 768x512 tile of 13 streams (the stream sizes of kodim03 at quality 4)."""
    sizes = [308, 1948, 1264, 576, 524, 748, 648, 916, 852, 840, 824, 112, 100]
    f = LicFile(make_header(width=768, height=512, streams_per_tile=13),
                tiles=[Tile(0, 0, 768, 512, (0, 0, 0, 0), [bytes(n) for n in sizes])])
    one, two = write(f, version=1), write(f, version=2)
    directory = 1 + 1 + 2 + 2 + 4 + sum(1 if n < 128 else 2 for n in sizes)  # x y w h, pads, lengths
    assert len(one) - len(two) == (24 + 4 + 8 * 13) - (directory + 8) == 90
    assert read(two) == read(one) == f


def test_a_damaged_stream_or_directory_is_named():
    info = read_info(V2)
    rec0, rec1 = tile_records(sample_file())
    tile0 = len(V2) - len(rec0) - len(rec1)
    streams0 = sum(info["tiles"][0]["stream_bytes"])
    first_stream_byte = tile0 + len(rec0) - 4 - streams0
    data = bytearray(V2)
    data[first_stream_byte] ^= 0x10
    with pytest.raises(CrcMismatchError, match="^tile 0: stream CRC32 mismatch"):
        read(bytes(data))
    got = read_info(bytes(data))
    assert not got["crc_ok"] and got["crc_errors"] == ["tile 0: stream CRC32 mismatch (file is corrupt)"]
    assert got["tiles"] == info["tiles"]
    data = bytearray(V2)
    tile1 = tile0 + len(rec0)
    assert data[tile1] == 4  # tile 1's x
    data[tile1] ^= 0x02  # 4 -> 6, still a one-byte varint
    with pytest.raises(CrcMismatchError, match="^tile 1: directory CRC32 mismatch"):
        read(bytes(data))
    assert read_info(bytes(data))["crc_errors"] == ["tile 1: directory CRC32 mismatch (file is corrupt)"]


def test_every_truncation_and_bit_flip_is_a_one_line_error():
    for n in range(len(V2)):
        with pytest.raises(CodecError):
            read(V2[:n])
        only_codec_errors(V2[:n], info=True)
    for i in range(len(V2)):
        for bit in range(8):
            data = bytearray(V2)
            data[i] ^= 1 << bit
            with pytest.raises(CodecError):
                read(bytes(data))  # every byte is covered by a CRC, a varint rule or the length checks
            only_codec_errors(bytes(data), info=True)


@pytest.mark.parametrize(
    "directory, error, message",
    [
        (b"\x80\x00" + bytes(7) + b"\x02\x02", CorruptFileError, "tile 0: x: over-long varint"),
        (bytes(2) + b"\x86\x80\x80\x80\x80\x00" + bytes(5) + b"\x02\x02", CorruptFileError, "tile 0: w: varint longer than 5 bytes"),
        (bytes(2) + b"\x80\x80\x80\x80\x10" + bytes(5) + b"\x02\x02", CorruptFileError, "tile 0: w: 4294967296 does not fit in 32 bits"),
        (b"\x00\x00\x06\x04\x80\x80\x04\x00\x00\x00\x02\x02", CorruptFileError, "tile 0: pad_left: 65536 does not fit in 16 bits"),
    ],
)
def test_malformed_varints_are_refused(directory, error, message):
    data = v2_file(v2_tile(None, [b"s0", b"s1"], directory=directory))
    with pytest.raises(error, match=message):
        read(data)


def test_declared_sizes_are_checked_before_reading():
    geometry = (0, 0, 6, 4, 0, 0, 0, 0)
    big = v2_file(v2_tile(geometry, [b"s0", b"s1"], directory=b"".join(leb128(v) for v in (*geometry, 2, 1000))))
    with pytest.raises(TruncatedFileError, match="the streams of tile 0 need 1002 bytes"):
        read(big)
    with pytest.raises(LimitExceededError, match="stream 1 of tile 0: declares 1000 bytes, more than the limit of 100"):
        read(big, Limits(max_stream_bytes=100))
    with pytest.raises(TruncatedFileError, match="header declares 5000 tiles"):
        read(v2_file(v2_tile(geometry, [b"s0", b"s1"]), n_tiles=5000))
    with pytest.raises(CorruptFileError, match="tile 0: region x=0 y=0 w=7 h=4 lies outside the 6x4 image"):
        read(v2_file(v2_tile((0, 0, 7, 4, 0, 0, 0, 0), [b"s0", b"s1"])))
    with pytest.raises(CorruptFileError, match="unexpected bytes after the last tile"):
        read(v2_file(v2_tile(geometry, [b"s0", b"s1"])) + b"\0")
    assert read(v2_file(v2_tile(geometry, [b"", b""]))).tiles[0].streams == [b"", b""]
    # a file that ends inside a varint (long enough for the early size check)
    inside = v2_file(b"".join(leb128(v) for v in (2**32 - 1,) * 4) + bytes(4) + b"\x02\x80")
    with pytest.raises(TruncatedFileError, match="tile 0: the length of stream 1 at offset .* runs past the end of the file"):
        read(inside)


def test_versions_and_damaged_version_fields():
    with pytest.raises(ValueError, match="format version must be one of"):
        write(sample_file(), version=3)
    for version, damaged in ((3, True), (6, True), (0, True), (3842, False), (65535, False)):
        data = bytearray(V2)
        data[8:10] = struct.pack("<H", version)
        if damaged:  # one or two bits from 2, and the header CRC matches version 2
            with pytest.raises(DamagedVersionError, match=f"format version {version}, but the header CRC32 matches version 2"):
                read(bytes(data))
        else:
            with pytest.raises(UnsupportedVersionError, match=f"unsupported .lic format version {version} .*versions 1, 2"):
                read(bytes(data))
