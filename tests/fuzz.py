"""Fuzzing harness for the ``.lic`` reader (``codec info``) and the full decoder (``codec decode``).

The contract under test (README "Exit status", FORMAT.md section 10): whatever bytes arrive, the
container reader and the decoder either produce the right image (of the size the header declares)
or raise a :class:`lalic_codec.errors.CodecError` with a one-line message; never another
exception, never a hang, never a runaway allocation.

Cases are mutations of valid files made with tiny random-weight models (several sizes, with and
without metadata and alpha, palette, 16-bit, multi-tile, a fixed-rate model): bit flips, byte
changes, insertions and deletions, truncations, splices, random data, and *structured* mutations
that rewrite header, tile, stream, metadata and alpha fields with absurd values and then recompute
every CRC, so that the code behind the CRCs is exercised (huge sizes, huge counts and lengths,
tiles outside the image, zero sizes, wrong stream counts, pads that do not match the model...).

Standalone (the cases run in a worker process, so that a hang or a hard crash is caught and
counted; a failing case is saved under ``--artifacts``)::

    python tests/fuzz.py --seconds 60
    python tests/fuzz.py --cases 20000 --seed 7 --artifacts fuzz-artifacts

``tests/test_fuzz.py`` drives the same mutators with hypothesis for a bounded time in CI.  A
development tool, not part of the installed package: it lives beside the tests, takes the tiny
model from ``conftest.py`` and the byte layouts from ``formats/container.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from conftest import TINY  # the tiny LALIC configuration (same code paths as the bundled model, ms per decode)
from lalic_codec.errors import CodecError
from lalic_codec.formats import container as fmt

#: limits used when decoding fuzz cases: small enough that any allocation they allow is harmless
FUZZ_LIMITS = fmt.Limits(max_pixels=2**22, max_metadata_bytes=2**20, max_stream_bytes=2**24, max_tiles=4096)

# the container's byte layouts (formats/container.py), except that the header's quality is read and
# written as its raw u32 bits, so that mutations can set any bit pattern (NaNs included)
_HEADER_TAIL = struct.Struct(fmt._HEADER_TAIL.format.replace("f", "I", 1))
_VERSION_IDLEN = fmt._VERSION_IDLEN  # format version, model id length
_GEOMETRY = fmt._GEOMETRY
_LEN_CRC = fmt._LEN_CRC  # block / stream prefix: length, CRC32
_U32 = fmt._U32  # CRC32s
_TLV = fmt._TLV  # metadata records: tag, length
assert _HEADER_TAIL.size == fmt._HEADER_TAIL.size


# ------------------------------------------------------------------------------------------------
# a raw, unvalidated view of a .lic file: parse a valid file, change anything, write it back with
# correct CRCs (or deliberately wrong ones)


@dataclass
class RawStream:
    body: bytes
    length: int | None = None  # declared length; None: len(body)
    crc: int | None = None  # None: the right CRC


@dataclass
class RawTile:
    geometry: list  # x, y, w, h, pad left, right, top, bottom
    streams: list  # RawStream (version 2: their lengths go to the directory, their crc is unused)
    crc: int | None = None  # the geometry CRC32 (version 2: the directory's)
    body_crc: int | None = None  # version 2: the CRC32 of the tile's streams


@dataclass
class RawLic:
    magic: bytes
    version: int
    model_id: bytes
    fingerprint: bytes
    quality_bits: int
    width: int
    height: int
    mode: int
    bit_depth: int
    device_class: int
    flags: int
    n_tiles: int
    spt: int
    blocks: list  # RawStream: the metadata block then the alpha block, as present
    tiles: list
    trailing: bytes = b""
    header_crc: int | None = None

    @property
    def quality(self) -> float:
        return struct.unpack("<f", struct.pack("<I", self.quality_bits))[0]

    def set_quality(self, q: float) -> None:
        self.quality_bits = struct.unpack("<I", struct.pack("<f", q))[0]


def parse_raw(data: bytes) -> RawLic:
    """Split a *valid* file into its fields (no validation beyond what the layout needs)."""
    pos = len(fmt.MAGIC)
    version, id_len = _VERSION_IDLEN.unpack_from(data, pos)
    pos += _VERSION_IDLEN.size
    model_id = data[pos : pos + id_len]
    pos += id_len
    fp, qbits, w, h, mode, depth, dev, flags, n_tiles, spt = _HEADER_TAIL.unpack_from(data, pos)
    pos += _HEADER_TAIL.size + _U32.size

    def stream():
        nonlocal pos
        n, _ = _LEN_CRC.unpack_from(data, pos)
        pos += _LEN_CRC.size
        body = data[pos : pos + n]
        pos += n
        return RawStream(body)

    blocks = [stream() for bit in (fmt.FLAG_METADATA, fmt.FLAG_ALPHA, fmt.FLAG_POSTFILTER) if flags & bit]
    tiles = []
    for _ in range(n_tiles):
        if version == 2:  # the reader's own varint parser
            cur = fmt._Cursor(memoryview(data), pos)
            geometry = [cur.varint("geometry", 32 if i < 4 else 16) for i in range(8)]
            lengths = [cur.varint("stream length") for _ in range(spt)]
            pos = cur.pos + _U32.size
            streams = []
            for n in lengths:
                streams.append(RawStream(data[pos : pos + n]))
                pos += n
            pos += _U32.size
            tiles.append(RawTile(geometry, streams))
            continue
        geometry = list(_GEOMETRY.unpack_from(data, pos))
        pos += _GEOMETRY.size + _U32.size
        tiles.append(RawTile(geometry, [stream() for _ in range(spt)]))
    return RawLic(data[: len(fmt.MAGIC)], version, model_id, fp, qbits, w, h, mode, depth, dev, flags,
                  n_tiles, spt, blocks, tiles, data[pos:])


def _u(v: int, bits: int) -> int:
    return int(v) & ((1 << bits) - 1)


def pack_raw(r: RawLic) -> bytes:
    """Serialise a RawLic; every value is truncated to its field width, CRCs computed unless set."""
    head = bytearray(r.magic)
    head += _VERSION_IDLEN.pack(_u(r.version, 16), _u(len(r.model_id), 8)) + r.model_id[:255]
    head += _HEADER_TAIL.pack((r.fingerprint + bytes(16))[:16], _u(r.quality_bits, 32), _u(r.width, 32), _u(r.height, 32),
                              _u(r.mode, 8), _u(r.bit_depth, 8), _u(r.device_class, 8), _u(r.flags, 8),
                              _u(r.n_tiles, 16), _u(r.spt, 16))
    head += _U32.pack(zlib.crc32(head) if r.header_crc is None else _u(r.header_crc, 32))
    parts = [bytes(head)]

    def put(s: RawStream):
        n = len(s.body) if s.length is None else s.length
        parts.append(_LEN_CRC.pack(_u(n, 32), zlib.crc32(s.body) if s.crc is None else _u(s.crc, 32)))
        parts.append(s.body)

    for b in r.blocks:
        put(b)
    for t in r.tiles:
        if _u(r.version, 16) == 2:
            lengths = [len(s.body) if s.length is None else s.length for s in t.streams]
            d = b"".join(fmt._varint(_u(v, 32 if i < 4 else 16)) for i, v in enumerate(t.geometry[:8]))
            d += b"".join(fmt._varint(_u(n, 32)) for n in lengths)
            body = b"".join(s.body for s in t.streams)
            parts += [d, _U32.pack(zlib.crc32(d) if t.crc is None else _u(t.crc, 32)),
                      body, _U32.pack(zlib.crc32(body) if t.body_crc is None else _u(t.body_crc, 32))]
            continue
        g = _GEOMETRY.pack(*[_u(v, 32) for v in t.geometry[:4]], *[_u(v, 16) for v in t.geometry[4:8]])
        parts.append(g + _U32.pack(zlib.crc32(g) if t.crc is None else _u(t.crc, 32)))
        for s in t.streams:
            put(s)
    parts.append(r.trailing)
    return b"".join(parts)


def crc_layout(data: bytes) -> list[tuple[int, int, int]]:
    """(crc offset, covered start, covered end) of every CRC of a valid file."""
    r = parse_raw(data)
    out = []
    hdr_end = len(fmt.MAGIC) + _VERSION_IDLEN.size + len(r.model_id) + _HEADER_TAIL.size
    out.append((hdr_end, 0, hdr_end))
    pos = hdr_end + _U32.size

    def stream(s):
        nonlocal pos
        body = pos + _LEN_CRC.size  # length, then the CRC32 of the body
        out.append((pos + _U32.size, body, body + len(s.body)))
        pos = body + len(s.body)

    for b in r.blocks:
        stream(b)
    for t in r.tiles:
        if r.version == 2:
            d = len(b"".join(fmt._varint(v) for v in (*t.geometry, *(len(s.body) for s in t.streams))))
            out.append((pos + d, pos, pos + d))
            pos += d + _U32.size
            n = sum(len(s.body) for s in t.streams)
            out.append((pos + n, pos, pos + n))
            pos += n + _U32.size
            continue
        out.append((pos + _GEOMETRY.size, pos, pos + _GEOMETRY.size))
        pos += _GEOMETRY.size + _U32.size
        for s in t.streams:
            stream(s)
    return out


def fix_crcs(data: bytearray, layout) -> bytearray:
    """Recompute the CRCs at a valid file's CRC positions (for mutations that keep the length)."""
    for at, a, b in layout:
        if b <= len(data) and at + 4 <= len(data):
            data[at : at + _U32.size] = _U32.pack(zlib.crc32(bytes(data[a:b])))
    return data


# ------------------------------------------------------------------------------------------------
# seeds: valid files from tiny random-weight models


@dataclass
class Seed:
    name: str
    data: bytes
    model: str  # key into the weights map ("vr" or "lalic"); "" for an input image
    kind: str = "lic"  # "lic": a .lic file for info/decode; "image": an input image for encode


def make_weights(folder: str | Path) -> dict[str, Path]:
    """Tiny random-weight models: variable-rate (``vr``) and fixed-rate official-style (``lalic``)."""
    import torch

    from lalic_codec.models.checkpoints import save_weights
    from lalic_codec.models.lalic import LALIC, VariableRateLALIC

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vr = save_weights(VariableRateLALIC(**TINY), folder / "tiny-vr.safetensors")
    torch.manual_seed(1)
    fixed = save_weights(LALIC(**TINY), folder / "tiny-lalic.safetensors")
    return {"vr": vr, "lalic": fixed}


def _image(h: int, w: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 80 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)


def make_seeds(weights: dict[str, Path]) -> list[Seed]:
    """Valid files covering the container's and the decoder's paths."""
    import io

    import numpy as np
    from PIL import Image

    from lalic_codec import imaging, loading, pipeline

    vr = loading.load_model("x", weights["vr"], "cpu")
    fixed = loading.load_model("lalic", weights["lalic"], "cpu")
    seeds = []

    def add(name, im, lm=vr, model="vr", quality=4.0, tile=1024, merged=True):
        saved, pipeline.MERGED_STREAMS = pipeline.MERGED_STREAMS, merged
        try:
            seeds.append(Seed(name, pipeline.encode_image(im, lm, quality, tile=tile).data, model))
        finally:
            pipeline.MERGED_STREAMS = saved

    add("rgb-1x1-q1", Image.fromarray(_image(1, 1, 0)), quality=1.0)
    add("rgb-16x23-q8", Image.fromarray(_image(16, 23, 1)), quality=8.0)
    add("rgb-64x64-q2.5", Image.fromarray(_image(64, 64, 2)), quality=2.5)
    # metadata: ICC, EXIF, XMP through a PNG
    exif = Image.Exif()
    exif[0x010F] = "fuzz-camera"
    buf = io.BytesIO()
    Image.fromarray(_image(41, 70, 3)).save(buf, format="PNG", exif=exif.tobytes(), icc_profile=b"fake-icc" * 20)
    add("rgb-41x70-metadata", imaging.open_image(buf.getvalue()))
    rgba = Image.fromarray(_image(33, 47, 4))
    rgba.putalpha(Image.fromarray((np.arange(33 * 47).reshape(33, 47) * 7 % 256).astype(np.uint8)))
    add("rgba-33x47", rgba, quality=5.0)
    la = Image.fromarray(_image(20, 30, 5)).convert("L")
    la.putalpha(Image.fromarray(np.full((20, 30), 200, np.uint8)))
    add("la-20x30", la)
    add("p-24x40-palette", Image.fromarray(_image(24, 40, 6)).quantize(16))
    add("l16-40x40", Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)))
    tiled = Image.fromarray(_image(200, 260, 7))
    tiled.putalpha(Image.fromarray(np.full((200, 260), 255, np.uint8)))
    add("rgba-200x260-4-tiles", tiled, tile=192)
    # one stream per model stream, as files before merged streams (FORMAT.md 12.8) were written
    add("rgba-200x260-4-tiles-unmerged", tiled, tile=192, merged=False)
    add("rgb-64x64-q2.5-unmerged", Image.fromarray(_image(64, 64, 2)), quality=2.5, merged=False)
    add("rgb-1x400-3-tiles", Image.fromarray(_image(1, 400, 8)), tile=192)
    add("lalic-70x90-fixed-rate", Image.fromarray(_image(70, 90, 9)), lm=fixed, model="lalic", quality=None)
    return seeds + image_seeds()


def image_seeds() -> list[Seed]:
    """Small input images in every accepted format (``codec encode`` reads strangers' files too)."""
    import io

    import numpy as np
    from PIL import Image

    rgb = Image.fromarray(_image(24, 32, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "fuzz"
    out = []

    def add(name, im, fmt_name, **kw):
        buf = io.BytesIO()
        im.save(buf, format=fmt_name, **kw)
        out.append(Seed(name, buf.getvalue(), "", "image"))

    add("png-rgb-exif-icc", rgb, "PNG", exif=exif.tobytes(), icc_profile=b"icc" * 30)
    rgba = rgb.copy()
    rgba.putalpha(128)
    add("png-rgba", rgba, "PNG")
    add("png-p-transparency", rgb.quantize(8), "PNG", transparency=0)
    add("png-i16", Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 60).astype(np.uint16)), "PNG")
    add("jpeg-exif", rgb, "JPEG", exif=exif.tobytes(), quality=80)
    add("gif", rgb.quantize(16), "GIF")
    add("tiff", rgba, "TIFF")
    add("webp", rgb, "WEBP", lossless=True)
    add("bmp", rgb, "BMP")
    add("ppm", rgb.convert("L"), "PPM")
    return out


# ------------------------------------------------------------------------------------------------
# mutators: (rng, seed, all seeds) -> bytes

INTERESTING_U32 = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 65, 127, 128, 129, 191, 192, 255, 256, 1023, 1024,
                   2047, 2048, 4095, 4096, 16384, 60000, 65535, 65536, 2**20, 2**24, 2**28, 2**31 - 1, 2**31, 2**32 - 1]
INTERESTING_U16 = [0, 1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 4096, 32767, 32768, 65534, 65535]
INTERESTING_QUALITY = [math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e-45, 0.5, 0.999, 1.0, 1.0000001, 2.5, 4.0,
                       7.9999, 8.0, 8.0001, 9.0, 100.0, 1e30, 3.4e38]


def _near(rng: random.Random, v: int, interesting: list[int]) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.choice(interesting)
    if r < 0.8:
        return v + rng.choice([-2, -1, 1, 2, 64, -64, 128])
    return rng.choice([v * 2, v // 2, rng.getrandbits(32), rng.randrange(0, 300)])


def m_bitflips(rng, seed, seeds):
    b = bytearray(seed.data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def m_bytes(rng, seed, seeds):
    b = bytearray(seed.data)
    for _ in range(rng.choice([1, 2, 4, 16])):
        b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    return bytes(b)


def m_insert_delete(rng, seed, seeds):
    b = bytearray(seed.data)
    for _ in range(rng.choice([1, 1, 2, 4])):
        pos = rng.randrange(len(b) + 1)
        if rng.random() < 0.5:
            b[pos:pos] = rng.randbytes(rng.randrange(1, 17))
        else:
            del b[pos : pos + rng.randrange(1, 17)]
    return bytes(b)


def m_truncate(rng, seed, seeds):
    return seed.data[: rng.randrange(len(seed.data))]


def m_splice(rng, seed, seeds):
    other = rng.choice(seeds).data
    a, b = rng.randrange(len(seed.data) + 1), rng.randrange(len(other) + 1)
    return seed.data[:a] + other[b:]


def m_random(rng, seed, seeds):
    n = rng.choice([rng.randrange(0, 16), rng.randrange(0, 300), rng.randrange(0, 3000)])
    prefix = rng.choice([b"", fmt.MAGIC, fmt.MAGIC + b"\x01\x00", seed.data[: rng.randrange(len(seed.data))]])
    return prefix + rng.randbytes(n)


def m_bytes_behind_crcs(rng, seed, seeds):
    """Change bytes anywhere (lengths kept), then recompute every CRC of the original layout."""
    b = bytearray(seed.data)
    layout = crc_layout(seed.data)
    for _ in range(rng.choice([1, 1, 2, 3, 6])):
        at, a, e = rng.choice(layout)
        if e > a:
            pos = rng.randrange(a, e)
            if rng.random() < 0.5:
                b[pos] ^= 1 << rng.randrange(8)
            else:
                b[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    return bytes(fix_crcs(b, layout))


def _mutate_header(rng, r: RawLic, seeds):
    which = rng.choice(["width", "height", "size", "mode", "bit_depth", "device_class", "flags", "n_tiles", "spt",
                        "quality", "model_id", "fingerprint", "version"])
    if which == "width":
        r.width = _near(rng, r.width, INTERESTING_U32)
    elif which == "height":
        r.height = _near(rng, r.height, INTERESTING_U32)
    elif which == "size":
        r.width, r.height = rng.choice([(60000, 60000), (2**32 - 1, 2**32 - 1), (2**16, 2**12), (2**16, 2**12 + 1),
                                        (2048, 2048), (2049, 2048), (0, 0), (1, 2**28), (r.height, r.width)])
    elif which == "mode":
        r.mode = rng.choice([0, 1, 2, 3, 4, 5, 255])
    elif which == "bit_depth":
        r.bit_depth = rng.choice([0, 1, 8, 16, 32, 255])
    elif which == "device_class":
        r.device_class = rng.choice([0, 1, 2, 3, 7, 255])
    elif which == "flags":
        r.flags = rng.choice([0, 1, 2, 3, 4, 8, 0xFF, r.flags ^ 1, r.flags ^ 2, r.flags ^ fmt.FLAG_MERGED_STREAMS])
    elif which == "n_tiles":
        r.n_tiles = _near(rng, r.n_tiles, INTERESTING_U16)
    elif which == "spt":
        r.spt = _near(rng, r.spt, INTERESTING_U16)
    elif which == "quality":
        r.set_quality(rng.choice(INTERESTING_QUALITY + [rng.uniform(-10, 20)]))
    elif which == "model_id":
        r.model_id = rng.choice([b"lalic", b"lalic-vr", b"default-v1", b"mambaic", b"", b"x" * 64, b"x" * 65,
                                 b"LALIC", b"lalic\x00", rng.randbytes(rng.randrange(0, 70))])
    elif which == "fingerprint":
        r.fingerprint = rng.choice([bytes(16), rng.randbytes(16), rng.choice(seeds).data[20:36]])
    else:
        r.version = rng.choice([0, 1, 2, 3, 65535])  # 1 <-> 2: the same file in the other layout


def _mutate_tile(rng, r: RawLic, seeds):
    if not r.tiles:
        return
    t = rng.choice(r.tiles)
    which = rng.choice(["x", "y", "w", "h", "pad", "pads", "outside", "zero", "geometry_of_other", "crc", "body_crc"])
    g = t.geometry
    if which in ("x", "y", "w", "h"):
        i = "xywh".index(which)
        g[i] = _near(rng, g[i], INTERESTING_U32)
    elif which == "pad":
        i = rng.randrange(4, 8)
        g[i] = _near(rng, g[i], INTERESTING_U16)
    elif which == "pads":  # all four, often a "plausible" but wrong centring or multiple
        m = rng.choice([1, 32, 63, 64, 65, 128, 192, 4096])
        for i, n in ((4, g[2]), (6, g[3])):
            total = -(-n // m) * m - n + rng.choice([0, 0, m, 2 * m])
            a = rng.randrange(total + 1)
            g[i], g[i + 1] = a, total - a
    elif which == "outside":
        g[0], g[1] = r.width - rng.randrange(0, 3), r.height - rng.randrange(0, 3)
    elif which == "zero":
        g[rng.choice([2, 3])] = 0
    elif which == "geometry_of_other":
        src = rng.choice(r.tiles)
        t.geometry = list(src.geometry)
    elif which == "crc":
        t.crc = rng.getrandbits(32)
    else:
        t.body_crc = rng.getrandbits(32)


def _mutate_tiles_list(rng, r: RawLic, seeds):
    which = rng.choice(["drop", "dup", "swap", "keep_count", "reverse", "from_other", "many"])
    tiles = r.tiles
    if which == "drop" and len(tiles) > 1:
        del tiles[rng.randrange(len(tiles))]
        r.n_tiles = len(tiles)
    elif which == "dup":
        tiles.insert(rng.randrange(len(tiles) + 1), replace(rng.choice(tiles)))
        r.n_tiles = len(tiles)
    elif which == "swap" and len(tiles) > 1:
        i, j = rng.sample(range(len(tiles)), 2)
        tiles[i].streams, tiles[j].streams = tiles[j].streams, tiles[i].streams
    elif which == "keep_count":  # list changed, header count kept
        if rng.random() < 0.5 and len(tiles) > 1:
            tiles.pop()
        else:
            tiles.append(replace(tiles[-1]))
    elif which == "reverse":
        tiles.reverse()
    elif which == "from_other":
        other = parse_raw(rng.choice(seeds).data)
        r.tiles = other.tiles
        r.n_tiles = len(other.tiles) if rng.random() < 0.7 else r.n_tiles
        r.spt = other.spt if rng.random() < 0.7 else r.spt
    else:  # many small tiles covering the image
        k = rng.choice([2, 8, 64, 300])
        w = max(1, r.width // k)
        base = tiles[0]
        r.tiles = [RawTile([min(i * w, r.width - 1), 0, w, r.height, 0, 0, 0, 0], base.streams) for i in range(k)]
        r.n_tiles = len(r.tiles)


def _mutate_streams(rng, r: RawLic, seeds):
    if not r.tiles:
        return
    t = rng.choice(r.tiles)
    which = rng.choice(["drop", "dup", "empty", "short", "random", "other_seed", "length", "crc", "zeros", "spt_all",
                        "flip_body", "swap"])
    ss = t.streams
    if not ss:
        return
    i = rng.randrange(len(ss))
    s = ss[i]
    if which == "drop":
        del ss[i]
    elif which == "dup":
        ss.insert(i, replace(s))
    elif which == "empty":
        ss[i] = RawStream(b"")
    elif which == "short":
        ss[i] = RawStream(s.body[: rng.randrange(max(1, len(s.body)))])
    elif which == "random":
        ss[i] = RawStream(rng.randbytes(rng.choice([1, 3, 4, 5, 8, 64, len(s.body)])))
    elif which == "other_seed":
        other = parse_raw(rng.choice(seeds).data)
        ss[i] = replace(rng.choice(rng.choice(other.tiles).streams))
    elif which == "length":
        s.length = _near(rng, len(s.body), INTERESTING_U32)
    elif which == "crc":
        s.crc = rng.getrandbits(32)
    elif which == "zeros":
        ss[i] = RawStream(bytes(len(s.body)))
    elif which == "spt_all":  # consistent but wrong stream count for the model
        n = rng.choice([1, 2, 3, 8, 10, 11, 17])
        for tt in r.tiles:
            tt.streams = (tt.streams * 3)[:n]
        r.spt = n
    elif which == "flip_body" and s.body:
        b = bytearray(s.body)
        for _ in range(rng.choice([1, 2, 8])):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        ss[i] = RawStream(bytes(b))
    elif which == "swap" and len(ss) > 1:
        j = rng.randrange(len(ss))
        ss[i], ss[j] = ss[j], ss[i]


def _zstd(content: bytes, declared: int | None = None) -> bytes:
    """A zstd frame of ``content``; with ``declared``, its header claims that many bytes instead."""
    import zstandard

    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(content)
    if declared is None:
        return frame
    fhd = frame[4]
    single = (fhd >> 5) & 1
    fcs_size = [single, 2, 4, 8][fhd >> 6]
    start = 5 + (0 if single else 1) + [0, 1, 2, 4][fhd & 3]
    return frame[:4] + bytes([0xC0 | (fhd & 0x3F)]) + frame[5:start] + struct.pack("<Q", declared) + frame[start + fcs_size:]


def _tlv(tag: int, value: bytes, length: int | None = None) -> bytes:
    return _TLV.pack(tag, len(value) if length is None else length) + value


def block_index(r: RawLic, flag: int) -> int | None:
    """Where the block of ``flag`` is in ``r.blocks`` (they follow the flags' order), or None."""
    present = [f for f in (fmt.FLAG_METADATA, fmt.FLAG_ALPHA, fmt.FLAG_POSTFILTER) if r.flags & f]
    return present.index(flag) if flag in present and present.index(flag) < len(r.blocks) else None


def _mutate_blocks(rng, r: RawLic, seeds):
    which = rng.choice(["metadata", "alpha", "postfilter", "toggle", "remove", "add"])
    has_md, has_alpha = bool(r.flags & fmt.FLAG_METADATA), bool(r.flags & fmt.FLAG_ALPHA)
    if which == "metadata":
        content = rng.choice([
            b"",
            _tlv(1, b"icc" * 10) + _tlv(1, b"again"),  # duplicate
            _tlv(4, bytes(768)),  # palette (on a non-P image?)
            _tlv(4, bytes(767)),
            _tlv(2, b"exif", length=2**31),
            _tlv(9, b"unknown tag") + _tlv(3, b"<xmp/>"),
            b"\x01\x00",
            rng.randbytes(rng.randrange(0, 64)),
        ])
        frame = rng.choice([_zstd(content), _zstd(content, declared=rng.choice([0, 10, 2**20, 2**30, 2**63])),
                            rng.randbytes(rng.randrange(0, 40)), b"(\xb5/\xfd" + rng.randbytes(12)])
        block = RawStream(frame)
        if has_md and r.blocks:
            r.blocks[0] = block
        else:
            r.flags |= fmt.FLAG_METADATA
            r.blocks.insert(0, block)
    elif which == "alpha":
        n = _u(r.width, 32) * _u(r.height, 32) * (2 if r.bit_depth == 16 else 1)  # fields may be out of range
        n = n if n <= 2**20 else 0
        content = rng.choice([bytes(n), bytes(max(0, n - 1)), bytes(n + 1), bytes(2 * n), b""])
        frame = rng.choice([_zstd(content), _zstd(b"\x00" * 64, declared=n), _zstd(content, declared=2**40),
                            rng.randbytes(rng.randrange(0, 40))])
        at = block_index(r, fmt.FLAG_ALPHA)
        if has_alpha and at is not None:
            r.blocks[at] = RawStream(frame)
        else:
            r.flags |= fmt.FLAG_ALPHA
            r.blocks.insert(1 if has_md and r.blocks else 0, RawStream(frame))
    elif which == "postfilter":
        k = rng.choice([1, 3, 5, 7, 0, 2, 9, 255])
        content = rng.choice([bytes([k, rng.randrange(0, 17)]) + rng.randbytes(rng.randrange(0, 300)), b"",
                              bytes([k, 8]) + bytes(3 * (3 * ((k * k + 1) // 2) + 1))])
        if rng.random() < 0.5:  # a classified filter (section 7.4): A, D, thresholds, the class mask
            a, d = rng.choice([1, 2, 4, 0, 9]), rng.choice([1, 5, 0, 3])
            content = (bytes([k, rng.randrange(0, 17), a, d]) + rng.randbytes(rng.randrange(0, 8))
                       + rng.choice([b"\x01", b"\xff" * 5, b"\x00"])
                       + rng.choice([bytes(3 * (3 * ((k * k + 1) // 2) + 1)), rng.randbytes(rng.randrange(0, 400))]))
            r.flags |= fmt.FLAG_CLASSIFIED_POSTFILTER
        at = block_index(r, fmt.FLAG_POSTFILTER)
        if at is not None:
            r.blocks[at] = RawStream(content)
        else:
            r.flags |= fmt.FLAG_POSTFILTER
            r.blocks.append(RawStream(content))
    elif which == "toggle":
        r.flags ^= rng.choice([fmt.FLAG_METADATA, fmt.FLAG_ALPHA, fmt.FLAG_POSTFILTER, fmt.FLAG_CLASSIFIED_POSTFILTER])
    elif which == "remove" and r.blocks:
        r.blocks.pop(rng.randrange(len(r.blocks)))
    else:
        r.blocks.append(RawStream(rng.randbytes(rng.randrange(0, 30))))


def m_structured(rng, seed, seeds):
    """Rewrite fields with absurd or plausible-but-wrong values, then recompute every CRC."""
    r = parse_raw(seed.data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        rng.choice([_mutate_header, _mutate_header, _mutate_tile, _mutate_tile, _mutate_tiles_list,
                    _mutate_streams, _mutate_streams, _mutate_blocks])(rng, r, seeds)
    if rng.random() < 0.05:
        r.trailing = rng.randbytes(rng.randrange(1, 9))
    if rng.random() < 0.03:
        r.header_crc = rng.getrandbits(32)
    return pack_raw(r)


MUTATORS = {
    "bitflips": (m_bitflips, 2),
    "bytes": (m_bytes, 1),
    "insert_delete": (m_insert_delete, 1),
    "truncate": (m_truncate, 1),
    "splice": (m_splice, 1),
    "random": (m_random, 1),
    "bytes_behind_crcs": (m_bytes_behind_crcs, 4),
    "structured": (m_structured, 8),
}


#: mutators for input images (byte level: the .lic structure means nothing there)
IMAGE_MUTATORS = ("bitflips", "bytes", "insert_delete", "truncate", "splice")


def generate(rng: random.Random, seeds: list[Seed], mutator: str | None = None) -> tuple[bytes, Seed, str]:
    """One fuzz case: (bytes, the seed it came from, the mutator's name).  One case in ten is an
    input image (when there are image seeds)."""
    images = [s for s in seeds if s.kind == "image"]
    lics = [s for s in seeds if s.kind == "lic"]
    if images and (not lics or (mutator in (None, *IMAGE_MUTATORS) and rng.random() < 0.1)):
        seed = rng.choice(images)
        mutator = mutator or rng.choice(IMAGE_MUTATORS)
        return MUTATORS[mutator][0](rng, seed, images), seed, mutator
    if mutator is None:
        names = list(MUTATORS)
        mutator = rng.choices(names, weights=[MUTATORS[n][1] for n in names])[0]
    seed = rng.choice(lics)
    return MUTATORS[mutator][0](rng, seed, lics), seed, mutator


# ------------------------------------------------------------------------------------------------
# the oracle


class FuzzFailure(AssertionError):
    """The contract was broken: ``kind`` is crash, wrong-output, bad-message, inconsistent or hang."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class CaseTimeout(BaseException):
    """Raised by :func:`time_limit` (BaseException: code under test must not swallow it)."""


class time_limit:
    """Interrupt the block after ``seconds`` (SIGALRM; main thread, POSIX).  The caller should
    still compare the elapsed time: a long call into C returns before Python sees the alarm."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        self.enabled = hasattr(signal, "setitimer") and self.seconds > 0
        if self.enabled:
            try:
                self.old = signal.signal(signal.SIGALRM, self._fire)
            except ValueError:  # not the main thread
                self.enabled = False
                return self
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def _fire(self, signum, frame):
        raise CaseTimeout(f"over {self.seconds:g} s")

    def __exit__(self, *exc):
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
        return False


_MODES = {fmt.ColourMode.RGB: "RGB", fmt.ColourMode.L: "L", fmt.ColourMode.RGBA: "RGBA", fmt.ColourMode.LA: "LA",
          fmt.ColourMode.P: "P"}


def _check_error(e: BaseException, where: str) -> str:
    if isinstance(e, CaseTimeout):
        raise FuzzFailure("hang", f"{where}: {e}")
    if not isinstance(e, CodecError) or type(e) is CodecError:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:])
        raise FuzzFailure("crash", f"{where}: {type(e).__name__}: {e}\n{tb}")
    msg = str(e)
    if not msg or "\n" in msg or len(msg) > 600:
        raise FuzzFailure("bad-message", f"{where}: {type(e).__name__} message is not one short line: {msg!r}")
    if "out of memory" in msg:
        raise FuzzFailure("memory", f"{where}: {msg}")
    return type(e).__name__


def check_case(data: bytes, weights: str | Path | None, decode: bool = True, limits: fmt.Limits = FUZZ_LIMITS,
               seconds: float = 10.0) -> str:
    """Run ``codec info``'s and ``codec decode``'s code on ``data``; return the outcome's name
    ("decoded" or an error class name) or raise :class:`FuzzFailure`."""
    t0 = time.perf_counter()
    try:
        with time_limit(seconds):
            try:
                d = fmt.read_info(data)
                json.dumps(d)
                fmt.info_lines(d, "case.lic")
                info_ok = True
            except BaseException as e:  # noqa: BLE001 - classified below
                _check_error(e, "read_info")
                info_ok = False
            try:
                lic = fmt.read(data, limits)
            except BaseException as e:  # noqa: BLE001
                outcome = _check_error(e, "read")
                lic = None
            if lic is not None:
                if not info_ok or not d["crc_ok"]:
                    raise FuzzFailure("inconsistent", "read accepts a file that read_info rejects or finds corrupt")
                outcome = "read"
            if decode and lic is not None:
                from lalic_codec import pipeline

                try:
                    res = pipeline.decode_bytes(data, weights, "cpu", limits)
                except BaseException as e:  # noqa: BLE001
                    return _check_error(e, "decode")
                h = lic.header
                modes = {_MODES[h.colour_mode]} | ({"I;16"} if h.colour_mode is fmt.ColourMode.L and h.bit_depth == 16 else set())
                if res.image.size != (h.width, h.height) or res.image.mode not in modes:
                    raise FuzzFailure("wrong-output", f"decoded {res.image.mode} {res.image.size}, "
                                      f"header says {h.colour_mode.name} {h.width}x{h.height}")
                outcome = "decoded"
    except CaseTimeout as e:
        raise FuzzFailure("hang", str(e)) from None
    elapsed = time.perf_counter() - t0
    if elapsed > seconds:
        raise FuzzFailure("hang", f"the case took {elapsed:.1f} s (limit {seconds:g} s)")
    return outcome


def check_image_case(data: bytes, max_pixels: int = 2**20, seconds: float = 10.0) -> str:
    """``codec encode``'s input side: open (format allow-list, pixel limit) and prepare an image.
    Returns "prepared" or an error class name, or raises :class:`FuzzFailure`."""
    from lalic_codec import imaging

    t0 = time.perf_counter()
    try:
        with time_limit(seconds):
            try:
                prep = imaging.prepare_image(imaging.open_image(data, max_pixels=max_pixels))
            except BaseException as e:  # noqa: BLE001
                return _check_error(e, "open_image")
            h, w = prep.rgb.shape[:2]
            if h * w > max_pixels or prep.rgb.dtype.name != "uint8" or prep.rgb.shape[2] != 3:
                raise FuzzFailure("wrong-output", f"prepared {prep.rgb.shape} {prep.rgb.dtype}")
    except CaseTimeout as e:
        raise FuzzFailure("hang", str(e)) from None
    if time.perf_counter() - t0 > seconds:
        raise FuzzFailure("hang", f"the case took over {seconds:g} s")
    return "prepared"


def check_any(data: bytes, seed: Seed, weights: dict, decode: bool = True, seconds: float = 10.0) -> str:
    """The right oracle for a case made from ``seed``."""
    if seed.kind == "image":
        return check_image_case(data, seconds=seconds)
    return check_case(data, weights[seed.model], decode, seconds=seconds)


def max_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# ------------------------------------------------------------------------------------------------
# single-bit flips (benchmarks/bitflips.py; tests/test_fuzz.py)


def which_check(e: CodecError) -> str:
    """Which check of the reader or decoder caught a damaged file (for counting)."""
    from lalic_codec.errors import CrcMismatchError, DeviceMismatchError, LimitExceededError, NotALicFileError
    from lalic_codec.errors import TruncatedFileError, UnsupportedVersionError

    msg = str(e)
    if isinstance(e, fmt.DamagedMagicError):
        return "CRC: header (damaged magic bytes)"
    if isinstance(e, fmt.DamagedVersionError):
        return "CRC: header (damaged version field)"
    if isinstance(e, CrcMismatchError):
        head = msg.split(":")[0]
        if head == "header":
            return "CRC: header"
        if head.startswith(("metadata", "alpha")):
            return f"CRC: {head}"
        return "CRC: tile geometry" if "geometry" in msg else "CRC: stream"
    if isinstance(e, TruncatedFileError):
        return "structure: truncated (a length field)"
    if isinstance(e, NotALicFileError):
        return "magic bytes"
    if isinstance(e, UnsupportedVersionError):
        return "version field"
    if isinstance(e, LimitExceededError):
        return "limit (a length field)"
    if isinstance(e, DeviceMismatchError):
        return "symbol checksum"
    if "unexpected bytes after the last tile" in msg:
        return "structure: trailing bytes (a length field)"
    return f"other: {type(e).__name__}"


def flip_outcome(flipped: bytes, weights, reference: bytes, limits: fmt.Limits | None = None) -> str:
    """Decode a damaged file: "detected: <check>", "decoded identically" (the same PNG bytes,
    metadata included, as ``reference``) or "UNDETECTED: decoded differently"."""
    import io

    from lalic_codec import imaging, pipeline

    try:
        res = pipeline.decode_bytes(flipped, weights, "cpu", limits)
    except CodecError as e:
        return "detected: " + which_check(e)
    buf = io.BytesIO()
    imaging.save_image(res.image, buf, "PNG")
    return "decoded identically" if buf.getvalue() == reference else "UNDETECTED: decoded differently"


def reference_png(data: bytes, weights) -> bytes:
    import io

    from lalic_codec import imaging, pipeline

    buf = io.BytesIO()
    imaging.save_image(pipeline.decode_bytes(data, weights, "cpu").image, buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# standalone harness: a parent that watches a worker process


def _case_rng(base_seed: int, i: int) -> random.Random:
    return random.Random(f"lalic-fuzz:{base_seed}:{i}")


def _prepare(workdir: Path) -> tuple[dict, list[Seed]]:
    weights = make_weights(workdir / "weights")
    seeds = make_seeds(weights)
    sd = workdir / "seeds"
    sd.mkdir(exist_ok=True)
    for s in seeds:
        (sd / f"{s.name}.seed").write_bytes(s.data)
    (workdir / "manifest.json").write_text(json.dumps({
        "weights": {k: str(v) for k, v in weights.items()},
        "seeds": [{"name": s.name, "model": s.model, "kind": s.kind} for s in seeds],
    }))
    return weights, seeds


def _load(workdir: Path) -> tuple[dict, list[Seed]]:
    man = json.loads((workdir / "manifest.json").read_text())
    seeds = [Seed(s["name"], (workdir / "seeds" / f"{s['name']}.seed").read_bytes(), s["model"], s["kind"])
             for s in man["seeds"]]
    return {k: Path(v) for k, v in man["weights"].items()}, seeds


def _worker(workdir: Path, base_seed: int, start: int, case_seconds: float, decode: bool) -> None:
    weights, seeds = _load(workdir)
    from lalic_codec import loading, pipeline  # noqa: F401  (imported, and the models loaded, before the first case's clock starts)

    for key, path in weights.items():
        loading.load_model("x" if key == "vr" else key, path, "cpu")
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    i = start
    while True:
        out.write(json.dumps({"begin": i}) + "\n")
        out.flush()
        try:
            data, seed, mutator = generate(_case_rng(base_seed, i), seeds)
        except Exception as e:  # a bug in a mutator: count it, go on
            out.write(json.dumps({"end": i, "outcome": "harness", "kind": "failure", "mutator": "?", "seed": "?",
                                  "detail": f"generating the case failed: {e!r}", "t": 0.0, "rss": max_rss_mib(),
                                  "rss_jump": 0.0}) + "\n")
            out.flush()
            i += 1
            continue
        rss0 = max_rss_mib()
        t0 = time.perf_counter()
        try:
            outcome, kind, detail = check_any(data, seed, weights, decode, case_seconds), "ok", ""
        except FuzzFailure as f:
            outcome, kind, detail = f.kind, "failure", str(f)
        except BaseException as e:  # noqa: BLE001 - a bug in the harness itself
            outcome, kind, detail = "harness", "failure", repr(e)
        out.write(json.dumps({"end": i, "outcome": outcome, "kind": kind, "detail": detail[:4000],
                              "mutator": mutator, "seed": seed.name, "t": time.perf_counter() - t0,
                              "rss": max_rss_mib(), "rss_jump": max_rss_mib() - rss0}) + "\n")
        out.flush()
        i += 1


class _Lines:
    """Lines from a pipe with a timeout (select on the raw fd: no hidden buffering)."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""

    def next(self, timeout: float) -> str | None:
        """The next line; "" at end of file; None after ``timeout`` seconds without one."""
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    mutators: Counter = field(default_factory=Counter)
    worker_restarts: int = 0
    max_rss: float = 0.0
    slowest: float = 0.0
    saved: list = field(default_factory=list)


def run_harness(seconds: float | None, cases: int | None, base_seed: int, artifacts: Path | None, case_seconds: float,
                rss_jump_mib: float, decode: bool, workdir: Path, quiet: bool = False) -> Report:
    _, seeds = _prepare(workdir)
    rep = Report()
    deadline = None if seconds is None else time.monotonic() + seconds
    i = 0

    def save(i: int, kind: str, detail: str):
        rep.failures[kind] += 1
        if artifacts is None:
            return
        artifacts.mkdir(parents=True, exist_ok=True)
        try:
            data, seed, mutator = generate(_case_rng(base_seed, i), seeds)
        except Exception as e:  # noqa: BLE001
            (artifacts / f"{kind}-seed{base_seed}-case{i}.txt").write_text(f"{kind}\n\n{detail}\n\n{e!r}\n")
            return
        stem = artifacts / f"{kind}-seed{base_seed}-case{i}"
        stem = stem.with_suffix(".lic" if seed.kind == "lic" else ".img")
        stem.write_bytes(data)
        stem.with_suffix(".txt").write_text(f"{kind}\nseed file: {seed.name}\nmutator: {mutator}\n\n{detail}\n")
        rep.saved.append(str(stem))

    def done() -> bool:
        return (cases is not None and i >= cases) or (deadline is not None and time.monotonic() >= deadline)

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    last_report = time.monotonic()
    while not done():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(workdir), "--seed", str(base_seed),
               "--start", str(i), "--case-seconds", str(case_seconds)] + ([] if decode else ["--no-decode"])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        lines = _Lines(proc.stdout.fileno())
        current, started = None, False
        try:
            while not done():
                line = lines.next(120.0 if not started else case_seconds * 2 + 5)
                if line is None or line == "":  # timeout, or the worker died
                    if not started:
                        raise RuntimeError(f"the fuzz worker did not start (exit status {proc.poll()})")
                    if current is None:  # died between cases: blame the next one, never loop on it
                        current = i
                    if current is not None:
                        proc.kill()
                        rc = proc.wait()
                        kind = "hang" if line is None else f"crash-signal-{-rc}" if rc < 0 else f"crash-exit-{rc}"
                        rep.cases += 1
                        save(current, kind, f"worker {'stopped responding' if line is None else 'died'} on case {current}")
                        i = current + 1
                    break
                msg = json.loads(line)
                if "ready" in msg:
                    started = True
                elif "begin" in msg:
                    current = msg["begin"]
                elif "end" in msg:
                    current = None
                    i = msg["end"] + 1
                    rep.cases += 1
                    if msg["kind"] == "ok":
                        rep.outcomes[msg["outcome"]] += 1
                    rep.mutators[msg["mutator"]] += 1
                    rep.max_rss = max(rep.max_rss, msg["rss"])
                    rep.slowest = max(rep.slowest, msg["t"])
                    if msg["kind"] == "failure":
                        save(msg["end"], msg["outcome"], msg["detail"])
                    elif msg["rss_jump"] > rss_jump_mib and msg["end"] > 50:
                        save(msg["end"], "memory", f"max RSS grew by {msg['rss_jump']:.0f} MiB in one case")
                    if not quiet and time.monotonic() - last_report > 60:
                        last_report = time.monotonic()
                        print(f"  ... {rep.cases} cases, {sum(rep.failures.values())} failures", file=sys.stderr, flush=True)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        if not done():
            rep.worker_restarts += 1
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/fuzz.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=None, help="run for this long (default 60 unless --cases)")
    ap.add_argument("--cases", type=int, default=None, help="run this many cases")
    ap.add_argument("--seed", type=int, default=0, help="base seed: case i of seed s is always the same bytes")
    ap.add_argument("--artifacts", type=Path, default=None, help="save failing cases here (.lic + .txt)")
    ap.add_argument("--case-seconds", type=float, default=10.0, help="per-case time limit")
    ap.add_argument("--rss-jump-mib", type=float, default=256.0, help="flag a case that grows max RSS by more")
    ap.add_argument("--no-decode", action="store_true", help="container reader only (no model)")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker, args.seed, args.start, args.case_seconds, not args.no_decode)
        return 0
    if args.seconds is None and args.cases is None:
        args.seconds = 60.0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lalic-fuzz-") as tmp:
        rep = run_harness(args.seconds, args.cases, args.seed, args.artifacts, args.case_seconds, args.rss_jump_mib,
                          not args.no_decode, Path(tmp))
    elapsed = time.monotonic() - t0
    n_fail = sum(rep.failures.values())
    print(f"fuzz: {rep.cases} cases in {elapsed:.0f} s ({rep.cases / max(elapsed, 1e-9):.0f}/s), seed {args.seed}")
    print(f"  failures: {n_fail}" + "".join(f"\n    {k}: {v}" for k, v in rep.failures.most_common()))
    print(f"  crashes: {sum(v for k, v in rep.failures.items() if k.startswith('crash'))}, hangs: {rep.failures['hang']}, "
          f"memory: {rep.failures['memory']}")
    print(f"  outcomes ({len(rep.outcomes)} distinct):" + "".join(f"\n    {k}: {v}" for k, v in rep.outcomes.most_common()))
    print("  mutators: " + ", ".join(f"{k} {v}" for k, v in rep.mutators.most_common()))
    print(f"  slowest case {rep.slowest:.2f} s, worker max RSS {rep.max_rss:.0f} MiB, worker restarts {rep.worker_restarts}")
    for p in rep.saved[:20]:
        print(f"  saved {p}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
