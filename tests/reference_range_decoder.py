"""Independent pure-Python implementation of formats/FORMAT.md section 12.

Written from the specification only: it does not import constriction nor
lalic_codec.entropy.coder.  It uses plain Python integers (no numpy arithmetic) so
that overflow and rounding are explicit.  Slow (one Python iteration per symbol):
meant for tests with a few thousand symbols.

Contents:
* ``categorical_cumulatives(freqs)`` -- the 24-bit model derived from a 16-bit table row;
* ``uniform_cumulatives(size)`` -- the 24-bit uniform model;
* ``RefRangeDecoder`` / ``RefRangeEncoder`` -- the range coder (32-bit words, 64-bit state);
* ``reference_decode(data, indexes, cdf, cdf_length, offset)`` -- a whole stream;
* ``reference_encode(symbols, indexes, cdf, cdf_length, offset)`` -- a whole stream.
"""

from __future__ import annotations

import struct
import zlib
from bisect import bisect_right

PRECISION = 24
ONE = 1 << PRECISION
MASK64 = (1 << 64) - 1
WORD = 32
ESCAPE_CLASSES = 33
CHUNK = 16
MAX_ABS = 1 << 30


class RefError(Exception):
    """The stream is invalid."""


def categorical_cumulatives(freqs: list[int]) -> list[int]:
    """C_k = floor(F_k * (2^24 - m) / 2^16) + k for k < m, and C_m = 2^24."""
    m = len(freqs)
    out = []
    f = 0
    for k in range(m):
        out.append((f * (ONE - m)) // (1 << 16) + k)
        f += freqs[k]
    assert f == 1 << 16
    out.append(ONE)
    return out


def uniform_cumulatives(size: int) -> list[int]:
    """C_k = k * floor(2^24 / size) for k < size, C_size = 2^24."""
    p = ONE // size
    return [k * p for k in range(size)] + [ONE]


class RefRangeDecoder:
    def __init__(self, words: list[int]):
        self.words = words
        self.pos = 0  # number of words read, including reads past the end
        self.lower = 0
        self.range = MASK64  # 2^64 - 1
        point = 0
        n = 0
        while n < 2 and self.pos < len(words):
            point = (point << WORD) | words[self.pos]
            self.pos += 1
            n += 1
        if n == 1:
            point <<= WORD
        self.point = point

    def decode(self, cum: list[int]) -> int:
        scale = self.range >> PRECISION
        q = ((self.point - self.lower) & MASK64) // scale
        if q >= ONE:
            raise RefError("quantile out of range")
        k = bisect_right(cum, q) - 1  # C_k <= q < C_{k+1}
        self.lower = (self.lower + scale * cum[k]) & MASK64
        self.range = scale * (cum[k + 1] - cum[k])
        if self.range < (1 << WORD):
            self.lower = (self.lower << WORD) & MASK64
            self.range <<= WORD
            word = self.words[self.pos] if self.pos < len(self.words) else 0
            self.pos += 1
            self.point = ((self.point << WORD) & MASK64) | word
        return k

    def exhausted(self) -> bool:
        return self.pos >= len(self.words) and ((self.point - self.lower) & MASK64) < (1 << 33) - 1


class RefRangeEncoder:
    """Range encoder with explicit carry propagation into already written words."""

    def __init__(self):
        self.words: list[int] = []
        self.lower = 0  # low 64 bits of the (conceptually unbounded) lower bound
        self.range = MASK64
        self.used = False
        self.carries = 0  # statistics for tests: carries propagated into written words
        self.straddles = 0  # renormalisations after which lower + range > 2^64 (carry still possible)

    def _carry(self):
        self.carries += 1
        i = len(self.words) - 1
        while True:
            if i < 0:
                raise AssertionError("carry out of the stream")
            self.words[i] = (self.words[i] + 1) & 0xFFFFFFFF
            if self.words[i] != 0:
                break
            i -= 1

    def encode(self, k: int, cum: list[int]):
        self.used = True
        scale = self.range >> PRECISION
        new = self.lower + scale * cum[k]
        if new > MASK64:
            self._carry()
        self.lower = new & MASK64
        self.range = scale * (cum[k + 1] - cum[k])
        if self.range < (1 << WORD):
            self.words.append(self.lower >> (64 - WORD))
            self.lower = (self.lower << WORD) & MASK64
            self.range <<= WORD
            self.straddles += self.lower + self.range > MASK64

    def finish(self) -> list[int]:
        if not self.used:
            return []
        point = self.lower + (1 << WORD) - 1
        if point > MASK64:
            self._carry()
        point &= MASK64
        point_word = point >> WORD
        self.words.append(point_word)
        upper_word = ((self.lower + self.range) & MASK64) >> WORD
        if upper_word == point_word:
            self.words.append(0)
        return self.words


def _bit_length(x: int) -> int:
    return x.bit_length()


def _rows(cdf, cdf_length, offset):
    rows = []
    for i in range(len(cdf_length)):
        ln = int(cdf_length[i])
        F = [int(v) for v in cdf[i][:ln]]
        freqs = [F[k + 1] - F[k] for k in range(ln - 1)]
        m = len(freqs)
        rows.append((m, int(offset[i]), categorical_cumulatives(freqs) if m >= 2 else None))
    return rows


def _phase1_order(indexes: list[int], n: int) -> list[int]:
    buckets: list[list[int]] = [[] for _ in range(n)]
    for pos, i in enumerate(indexes):
        buckets[i].append(pos)
    return [pos for b in buckets for pos in b]


def reference_decode(data: bytes, indexes: list[int], cdf, cdf_length, offset) -> list[int]:
    """Decode a stream: ``indexes`` flat list of table indexes, tables as nested sequences."""
    dec = RefRangeDecoder(_words(data))
    out = _decode_segment(dec, indexes, cdf, cdf_length, offset)
    if not dec.exhausted():
        raise RefError("trailing data")
    return out


def reference_decode_segments(data: bytes, segments) -> list[list[int]]:
    """Decode a stream of merged segments (FORMAT.md 12.8): ``segments`` is a list of
    ``(indexes, cdf, cdf_length, offset)``; checks the end of the stream once, then the CRC32 of
    all the symbols in front."""
    if len(data) < 4:
        raise RefError("no symbol checksum")
    dec = RefRangeDecoder(_words(data[4:]))
    out = [_decode_segment(dec, *seg) for seg in segments]
    if not dec.exhausted():
        raise RefError("trailing data")
    if zlib.crc32(b"".join(struct.pack("<%di" % len(o), *o) for o in out)) != struct.unpack("<I", data[:4])[0]:
        raise RefError("symbol checksum")
    return out


def _words(data: bytes) -> list[int]:
    if len(data) % 4:
        raise RefError("length not a multiple of 4")
    return list(struct.unpack("<%dI" % (len(data) // 4), data))


def _decode_segment(dec: RefRangeDecoder, indexes: list[int], cdf, cdf_length, offset) -> list[int]:
    rows = _rows(cdf, cdf_length, offset)
    order = _phase1_order(indexes, len(rows))
    out = [0] * len(indexes)
    escapes = []  # (position, table row)
    for pos in order:
        m, off, cum = rows[indexes[pos]]
        k = dec.decode(cum) if cum is not None else 0
        if k == m - 1:
            escapes.append(pos)
        else:
            out[pos] = k + off
    classes = [dec.decode(uniform_cumulatives(ESCAPE_CLASSES)) for _ in escapes]
    for pos, c in zip(escapes, classes):
        payload = 0
        shift = 0
        while shift < c:
            width = min(CHUNK, c - shift)
            payload |= dec.decode(uniform_cumulatives(1 << width)) << shift
            shift += width
        w = (1 << c) + payload
        e = w - 1
        m, off, _ = rows[indexes[pos]]
        t = -((e + 1) // 2) if e % 2 else (m - 1) + e // 2
        out[pos] = t + off
    for v in out:
        if abs(v) >= MAX_ABS:
            raise RefError("value out of range")
    return out




def reference_encode(symbols: list[int], indexes: list[int], cdf, cdf_length, offset, stats=None) -> bytes:
    """Encode a stream; ``stats`` (a dict) accumulates ``carries`` and ``straddles``."""
    enc = RefRangeEncoder()
    _encode_segment(enc, symbols, indexes, cdf, cdf_length, offset)
    words = enc.finish()
    if stats is not None:
        stats["carries"] = stats.get("carries", 0) + enc.carries
        stats["straddles"] = stats.get("straddles", 0) + enc.straddles
    return struct.pack("<%dI" % len(words), *words)


def reference_encode_segments(segments) -> bytes:
    """Merged segments (FORMAT.md 12.8): ``segments`` is a list of ``(symbols, indexes, cdf,
    cdf_length, offset)``, coded one after another by one encoder, sealed once, after the CRC32
    of all the symbols."""
    enc = RefRangeEncoder()
    for seg in segments:
        _encode_segment(enc, *seg)
    words = enc.finish()
    crc = zlib.crc32(b"".join(struct.pack("<%di" % len(seg[0]), *seg[0]) for seg in segments))
    return struct.pack("<I", crc) + struct.pack("<%dI" % len(words), *words)


def _encode_segment(enc: RefRangeEncoder, symbols: list[int], indexes: list[int], cdf, cdf_length, offset) -> None:
    rows = _rows(cdf, cdf_length, offset)
    order = _phase1_order(indexes, len(rows))
    escapes = []
    for pos in order:
        m, off, cum = rows[indexes[pos]]
        t = symbols[pos] - off
        if 0 <= t < m - 1:
            k = t
        else:
            k = m - 1
            e = -2 * t - 1 if t < 0 else 2 * (t - (m - 1))
            escapes.append(e + 1)
        if cum is not None:
            enc.encode(k, cum)
    classes = [_bit_length(w) - 1 for w in escapes]
    for c in classes:
        enc.encode(c, uniform_cumulatives(ESCAPE_CLASSES))
    for w, c in zip(escapes, classes):
        payload = w - (1 << c)
        shift = 0
        while shift < c:
            width = min(CHUNK, c - shift)
            enc.encode((payload >> shift) & ((1 << width) - 1), uniform_cumulatives(1 << width))
            shift += width
