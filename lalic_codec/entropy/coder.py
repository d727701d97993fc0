"""Range coding of integer symbols with per-element CDF tables (constriction backend).

The normative description of the stream is ``formats/FORMAT.md`` section 12; this module
implements it.  Summary:

* Model: table row ``i`` with integer CDF ``F_0 = 0 < F_1 < ... < F_m = 65536``
  (``m = cdf_length[i] - 1`` table symbols, the last one being the escape symbol) is
  used by the range coder at 24-bit precision with left cumulatives
  ``C_k = floor(F_k * (2**24 - m) / 2**16) + k`` for ``k = 0 .. m-1`` and ``C_m = 2**24``.
  That is exactly what constriction's ``Categorical(freq / 65536, perfect=False)``
  computes (``from_floating_point_probabilities_fast``: every float operation is exact
  here because the probabilities are dyadic; checked by the independent reference
  decoder in ``tests/reference_range_decoder.py``).
* Phase 1: for table index ``i = 0 .. n-1`` ascending, the elements whose index is ``i``,
  in C order, each as table symbol ``t = s - offset_i`` if ``0 <= t < m_i - 1`` and as the
  escape symbol ``m_i - 1`` otherwise.  Rows with ``m_i == 1`` (only the escape symbol)
  code nothing.
* Phase 2: for the escaped elements in phase-1 order, the escape class ``c`` (``Uniform(33)``).
* Phase 3: for the escaped elements in phase-1 order, the ``c`` payload bits of
  ``w - 2**c`` in chunks of up to 16 bits, least significant chunk first, each with
  ``Uniform(2**width)``; where ``w = e + 1`` and ``e = -2t - 1`` (``t < 0``) or
  ``e = 2 (t - (m_i - 1))`` (``t >= m_i - 1``), ``c = floor(log2 w)``.
* One range-coder stream (constriction's ``RangeEncoder``: 32-bit words, 64-bit state),
  words serialised little-endian.
"""

from __future__ import annotations

import threading
import weakref

import zlib

import numpy as np

import constriction

from lalic_codec.errors import CorruptFileError, SymbolMismatchError  # noqa: F401  (re-exported: pipeline, tests)

from .tables import TOTAL, CdfTables, validate_tables

__all__ = [
    "MAX_ABS_SYMBOL",
    "ESCAPE_CLASSES",
    "PAYLOAD_CHUNK_BITS",
    "encode_with_indexes",
    "decode_with_indexes",
    "SegmentEncoder",
    "SegmentDecoder",
    "model_left_cumulatives",
]

#: symbols must satisfy |s| < MAX_ABS_SYMBOL
MAX_ABS_SYMBOL = 1 << 30
#: escape classes c = 0 .. ESCAPE_CLASSES-1 (c <= 32 always suffices, see module docstring)
ESCAPE_CLASSES = 33
#: escape payload bits are coded in chunks of at most this many bits
PAYLOAD_CHUNK_BITS = 16
#: range-coder probability precision (bits)
CODER_PRECISION = 24

_POW2 = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))


def model_left_cumulatives(freq: np.ndarray) -> np.ndarray:
    """The 24-bit left cumulatives ``C_0 .. C_m`` (``C_m = 2**24``) for 16-bit frequencies ``freq``.

    ``C_k = floor(F_k * (2**24 - m) / 2**16) + k`` with ``F_k = sum(freq[:k])``.  Used by
    the documentation/tests; the coder itself lets constriction derive the same values.
    """
    freq = np.asarray(freq, dtype=np.int64)
    m = freq.size
    cdf = np.concatenate([[0], np.cumsum(freq)])
    c = (cdf[:-1] * ((1 << CODER_PRECISION) - m)) // TOTAL + np.arange(m)
    return np.concatenate([c, [1 << CODER_PRECISION]]).astype(np.int64)


# --------------------------------------------------------------------------------------
# model cache
# --------------------------------------------------------------------------------------

_cache_lock = threading.Lock()
# id(quantized_cdf array) -> (weakref to that array, (cdf_length, offset) arrays, models)
_model_cache: dict[int, tuple] = {}


def _build_models(tables: CdfTables) -> list:
    models = []
    for i in range(tables.num_tables):
        m = int(tables.cdf_length[i]) - 1
        if m < 2:
            models.append(None)  # single (escape) symbol: probability 1, nothing is coded
            continue
        freq = np.diff(tables.quantized_cdf[i, : m + 1].astype(np.int64))
        probs = freq.astype(np.float64) / float(TOTAL)  # exact (dyadic)
        models.append(constriction.stream.model.Categorical(probs, perfect=False))
    return models


def _models_for(tables: CdfTables) -> list:
    """constriction models for every row, cached per tables object (validated once)."""
    key = id(tables.quantized_cdf)
    with _cache_lock:
        hit = _model_cache.get(key)
        if hit is not None:
            ref, ident, models = hit
            if (ref() is tables.quantized_cdf and ident[0] is tables.cdf_length
                    and ident[1] is tables.offset):
                return models
    # Note: the cache is keyed on array identity; arrays must not be mutated in place
    # after first use (CdfTables is treated as immutable).
    validate_tables(tables)
    models = _build_models(tables)
    arr = tables.quantized_cdf

    def _drop(_ref, key=key):
        with _cache_lock:
            cur = _model_cache.get(key)
            if cur is not None and cur[0] is _ref:
                del _model_cache[key]

    try:
        ref = weakref.ref(arr, _drop)
    except TypeError:  # pragma: no cover - ndarray supports weakrefs
        return models
    with _cache_lock:
        _model_cache[key] = (ref, (tables.cdf_length, tables.offset), models)
    return models


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _check_tables(tables) -> CdfTables:
    if not isinstance(tables, CdfTables):
        raise ValueError("tables must be a CdfTables instance")
    return tables


def _check_indexes(indexes, n_tables: int) -> np.ndarray:
    idx = np.asarray(indexes)
    if idx.dtype.kind not in "iu":
        raise ValueError(f"indexes must be an integer array, got dtype {idx.dtype}")
    flat = idx.reshape(-1)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= n_tables):
        raise ValueError(f"table index out of range [0, {n_tables})")
    return flat.astype(np.int64)


def _group(flat_idx: np.ndarray, n_tables: int):
    """Stable permutation by table index and the group boundaries."""
    # A stable sort on 16-bit keys is a radix sort in numpy (several times faster).
    keys = flat_idx.astype(np.uint16) if n_tables <= 1 << 16 else flat_idx
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(flat_idx, minlength=n_tables)
    starts = np.zeros(n_tables + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return order, starts


def _chunk_layout(classes: np.ndarray):
    """Per escape with class c: ceil(c/16) chunks; returns (owner, shift, width) per chunk."""
    nchunks = (classes + (PAYLOAD_CHUNK_BITS - 1)) // PAYLOAD_CHUNK_BITS
    total = int(nchunks.sum())
    owner = np.repeat(np.arange(classes.size, dtype=np.int64), nchunks)
    first = np.zeros(classes.size, dtype=np.int64)
    if classes.size:
        np.cumsum(nchunks[:-1], out=first[1:])
    j = np.arange(total, dtype=np.int64) - first[owner]
    shift = j * PAYLOAD_CHUNK_BITS
    width = np.minimum(PAYLOAD_CHUNK_BITS, classes[owner] - shift)
    return owner, shift, width


def _words_to_bytes(words: np.ndarray) -> bytes:
    return np.asarray(words, dtype=np.uint32).astype("<u4").tobytes()


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def encode_with_indexes(symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> bytes:
    """Range-code integer ``symbols`` where element ``k`` uses CDF row ``indexes[k]``.

    ``symbols`` and ``indexes`` are integer arrays of the same (any) shape, flattened in C
    order.  Every value must satisfy ``|s| < 2**30``; values outside a row's range are
    coded losslessly through the escape path.  Returns the stream bytes (a multiple of 4;
    empty for an empty input).  Raises ValueError on bad input (shape mismatch, index out
    of range, value too large, invalid tables).
    """
    encoder = constriction.stream.queue.RangeEncoder()
    _encode_into(encoder, symbols, indexes, tables)
    return _words_to_bytes(encoder.get_compressed())


def _encode_into(encoder, symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> None:
    """Phases 1 to 3 of the elements (FORMAT.md 12.3, 12.4) into ``encoder``."""
    tables = _check_tables(tables)
    sym = np.asarray(symbols)
    idx_arr = np.asarray(indexes)
    if sym.shape != idx_arr.shape:
        raise ValueError(f"symbols shape {sym.shape} != indexes shape {idx_arr.shape}")
    if sym.dtype.kind not in "iu":
        raise ValueError(f"symbols must be an integer array, got dtype {sym.dtype}")
    models = _models_for(tables)
    n = tables.num_tables
    flat_idx = _check_indexes(idx_arr, n)
    flat_sym = sym.reshape(-1)
    if flat_sym.size == 0:
        return
    if int(flat_sym.min()) <= -MAX_ABS_SYMBOL or int(flat_sym.max()) >= MAX_ABS_SYMBOL:
        raise ValueError("symbol magnitude must be < 2**30")
    order, starts = _group(flat_idx, n)
    s_sorted = flat_sym[order]  # phase-1 order
    offsets = tables.offset.astype(np.int64)
    esc_sym = tables.cdf_length.astype(np.int64) - 2  # escape symbol m_i - 1 of each row

    esc_e = []  # per group: the escape numbers e of its escaped elements (phase-1 order)
    for i in np.nonzero(np.diff(starts))[0]:
        seg = s_sorted[starts[i]:starts[i + 1]]
        t = seg.astype(np.int64) - offsets[i]
        e_i = int(esc_sym[i])
        escaped = (t < 0) | (t >= e_i)
        any_escape = bool(escaped.any())
        if models[i] is not None:
            coded = np.where(escaped, e_i, t) if any_escape else t
            encoder.encode(coded.astype(np.int32), models[i])
        if any_escape:
            te = t[escaped]
            esc_e.append(np.where(te < 0, -2 * te - 1, 2 * (te - e_i)))

    if esc_e:
        w = np.concatenate(esc_e) + 1
        classes = np.searchsorted(_POW2, w, side="right") - 1
        if int(classes.max()) >= ESCAPE_CLASSES:  # cannot happen for |s| < 2**30, int32 offsets
            raise ValueError("escape value too large")
        encoder.encode(classes.astype(np.int32), constriction.stream.model.Uniform(ESCAPE_CLASSES))
        payload = w - _POW2[classes]
        owner, shift, width = _chunk_layout(classes)
        if owner.size:
            vals = (payload[owner] >> shift) & ((np.int64(1) << width) - 1)
            encoder.encode(vals.astype(np.int32), constriction.stream.model.Uniform(),
                           (np.int64(1) << width).astype(np.int32))


def _is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError))


def decode_with_indexes(data: bytes, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Inverse of :func:`encode_with_indexes`: returns int32 symbols shaped like ``indexes``.

    Raises ValueError for bad ``indexes``/``tables`` and
    :class:`~lalic_codec.errors.CorruptFileError` for a stream that cannot be decoded
    (length not a multiple of 4, data rejected by the range decoder, escape values out of
    range, unread trailing words).  Arbitrary garbage never crashes; it may decode to wrong
    symbols (the container's CRC detects those).
    """
    tables = _check_tables(tables)
    idx_arr = np.asarray(indexes)
    models = _models_for(tables)
    n = tables.num_tables
    flat_idx = _check_indexes(idx_arr, n)
    data = bytes(data) if not isinstance(data, (bytes, bytearray, memoryview)) else data
    nbytes = memoryview(data).nbytes
    if nbytes % 4:
        raise CorruptFileError(f"entropy-coded stream length {nbytes} is not a multiple of 4")
    out = np.zeros(flat_idx.size, dtype=np.int32)
    if flat_idx.size == 0:
        if nbytes:
            raise CorruptFileError("entropy-coded stream has data but no symbols")
        return out.reshape(idx_arr.shape)
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        return _decode(words, flat_idx, tables, models, out).reshape(idx_arr.shape)
    except CorruptFileError:
        raise
    except BaseException as exc:  # constriction errors, including Rust panics
        if _is_fatal(exc):
            raise
        raise CorruptFileError(f"entropy-coded stream is corrupt ({type(exc).__name__}: {exc})") from None


def _decode(words, flat_idx, tables, models, out):
    decoder = constriction.stream.queue.RangeDecoder(words)
    _decode_from(decoder, flat_idx, tables, models, out)
    if not decoder.maybe_exhausted():
        raise CorruptFileError("entropy-coded stream has unread trailing data")
    return out


def _decode_from(decoder, flat_idx, tables, models, out):
    """Phases 1 to 3 of ``flat_idx.size`` elements from ``decoder`` into ``out`` (C order)."""
    n = tables.num_tables
    order, starts = _group(flat_idx, n)
    values = np.empty(flat_idx.size, dtype=np.int64)  # phase-1 order
    esc_pos, esc_row = [], []  # escaped elements: position in phase-1 order, table row
    for i in np.nonzero(np.diff(starts))[0]:
        a, b = int(starts[i]), int(starts[i + 1])
        e_i = int(tables.cdf_length[i]) - 2
        if models[i] is None:
            coded = np.zeros(b - a, dtype=np.int64)  # the only symbol is the escape symbol
        else:
            coded = np.asarray(decoder.decode(models[i], b - a)).astype(np.int64)
        if coded.size and (int(coded.min()) < 0 or int(coded.max()) > e_i):  # defensive
            raise CorruptFileError("range decoder returned a symbol outside its table")
        values[a:b] = coded + int(tables.offset[i])
        pos = np.nonzero(coded == e_i)[0]
        if pos.size:
            esc_pos.append(pos + a)
            esc_row.append(np.full(pos.size, i, dtype=np.int64))
    if esc_pos:
        pos = np.concatenate(esc_pos)
        rows = np.concatenate(esc_row)
        n_esc = pos.size
        classes = np.asarray(
            decoder.decode(constriction.stream.model.Uniform(ESCAPE_CLASSES), n_esc)
        ).astype(np.int64)
        if np.any((classes < 0) | (classes >= ESCAPE_CLASSES)):
            raise CorruptFileError("escape class out of range")
        owner, shift, width = _chunk_layout(classes)
        payload = np.zeros(n_esc, dtype=np.int64)
        if owner.size:
            sizes = np.int64(1) << width
            vals = np.asarray(
                decoder.decode(constriction.stream.model.Uniform(), sizes.astype(np.int32))
            ).astype(np.int64)
            if np.any((vals < 0) | (vals >= sizes)):
                raise CorruptFileError("escape payload out of range")
            np.add.at(payload, owner, vals << shift)
        e = _POW2[classes] + payload - 1
        ee = tables.cdf_length.astype(np.int64)[rows] - 2
        t = np.where(e & 1, -((e + 1) >> 1), ee + (e >> 1))
        values[pos] = t + tables.offset.astype(np.int64)[rows]
    if values.size and (int(values.min()) <= -MAX_ABS_SYMBOL or int(values.max()) >= MAX_ABS_SYMBOL):
        raise CorruptFileError("decoded symbol magnitude out of range (|s| >= 2**30)")
    out[order] = values
    return out


# ------------------------------------------------------------------------------------------------
# checked streams: a CRC32 of the decoded symbols in front of the range-coded words


def encode_stream(symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> bytes:
    """``u32 CRC32(symbols as int32 little-endian, C order)`` followed by :func:`encode_with_indexes`:
    a stream of one segment (:class:`SegmentEncoder`)."""
    enc = SegmentEncoder()
    enc.add(symbols, indexes, tables)
    return enc.finish()


def decode_stream(data: bytes, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Inverse of :func:`encode_stream`: a stream of one segment (:class:`SegmentDecoder`); raises
    :class:`SymbolMismatchError` if it does not decode with ``tables`` or its symbols miss the checksum."""
    dec = SegmentDecoder(data)
    sym = dec.take(indexes, tables)
    dec.finish()
    return sym


# ------------------------------------------------------------------------------------------------
# one stream of several segments (FORMAT.md 12.8): a tile's element arrays in coding order


class SegmentEncoder:
    """The element arrays of a tile ("segments", each what :func:`encode_with_indexes` codes) in
    one range-coded stream, in the order they are added, after one CRC32 of all their symbols:
    one stream per tile instead of one per array (:func:`encode_stream`), which saves each
    array's symbol checksum, its sealing words and its length in the tile directory."""

    def __init__(self) -> None:
        self._encoder = constriction.stream.queue.RangeEncoder()
        self._crc = 0

    def add(self, symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> None:
        sym = np.ascontiguousarray(symbols, dtype="<i4")
        _encode_into(self._encoder, sym, indexes, tables)
        self._crc = zlib.crc32(sym.tobytes(), self._crc)

    def finish(self) -> bytes:
        """``u32 CRC32`` of every segment's symbols (int32 little-endian, C order, one segment after
        another), then the range coder's words."""
        return self._crc.to_bytes(4, "little") + _words_to_bytes(self._encoder.get_compressed())


class SegmentDecoder:
    """Inverse of :class:`SegmentEncoder`: :meth:`take` each segment in the encoder's order, then
    :meth:`finish`.  As with :func:`decode_stream`, the container's CRC vouches for the bytes, so a
    stream that does not parse, or symbols that miss the checksum, mean other tables than the
    encoder's (:class:`SymbolMismatchError`)."""

    def __init__(self, data: bytes) -> None:
        n = len(data)
        if n < 4:
            raise CorruptFileError(f"stream of {n} bytes is too short for its symbol checksum")
        if (n - 4) % 4:
            raise CorruptFileError(f"entropy-coded stream length {n - 4} is not a multiple of 4")
        self._expected = int.from_bytes(bytes(data[:4]), "little")
        self._decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4", offset=4).astype(np.uint32))
        self._crc = 0

    def take(self, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
        """The next segment's symbols, int32, shaped like ``indexes``."""
        tables = _check_tables(tables)
        idx_arr = np.asarray(indexes)
        models = _models_for(tables)
        flat_idx = _check_indexes(idx_arr, tables.num_tables)
        out = np.zeros(flat_idx.size, dtype=np.int32)
        if flat_idx.size:
            try:
                _decode_from(self._decoder, flat_idx, tables, models, out)
            except BaseException as exc:  # CorruptFileError, constriction errors, Rust panics
                if _is_fatal(exc):
                    raise
                raise SymbolMismatchError(f"stream does not decode with these tables ({exc})") from None
        self._crc = zlib.crc32(out.astype("<i4").tobytes(), self._crc)
        return out.reshape(idx_arr.shape)

    def finish(self) -> None:
        """Check that every word was read and that the symbols match the encoder's checksum."""
        if not self._decoder.maybe_exhausted():
            raise SymbolMismatchError("stream does not decode with these tables (unread trailing data)")
        if self._crc != self._expected:
            raise SymbolMismatchError("decoded symbols do not match the encoder's checksum")
