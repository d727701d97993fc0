"""Integer CDF tables in CompressAI's format, and the functions that build them.

A *CDF table* holds ``n`` quantized cumulative distribution functions, one per row:

* ``quantized_cdf`` -- int32, shape ``(n, L)``.  Row ``i`` holds ``cdf_length[i]``
  valid entries ``F_0 .. F_{m}`` (``m = cdf_length[i] - 1``) with ``F_0 = 0`` and
  ``F_m = 65536`` (16-bit precision); entries after the valid ones are padding
  (CompressAI writes zeros there) and are ignored.
* ``cdf_length`` -- int32, shape ``(n,)``: number of valid CDF entries, i.e. the
  number of table symbols plus one.  Table symbol ``k`` (``0 <= k < m``) has the
  integer frequency ``F_{k+1} - F_k >= 1``; the LAST table symbol ``m - 1`` is the
  escape symbol.
* ``offset`` -- int32, shape ``(n,)``: the value coded as table symbol 0, i.e.
  table symbol = value - offset.

Everything here is numpy only (no torch).  The float pipelines reproduce
CompressAI's float32 torch computations; see :func:`gaussian_scale_table` and
:func:`gaussian_cdf_tables` for how exactness was established.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

PRECISION = 16
TOTAL = 1 << PRECISION

__all__ = [
    "PRECISION",
    "TOTAL",
    "CdfTables",
    "validate_tables",
    "pmf_to_quantized_cdf",
    "pmf_to_cdf_tables",
    "gaussian_scale_table",
    "gaussian_cdf_tables",
    "symbol_counts",
    "fit_cdf_tables",
]


class CdfTables(NamedTuple):
    """A set of quantized CDFs (CompressAI buffer layout); see the module docstring."""

    quantized_cdf: np.ndarray  # int32 (n, L)
    cdf_length: np.ndarray  # int32 (n,)
    offset: np.ndarray  # int32 (n,)

    @classmethod
    def from_arrays(cls, quantized_cdf, cdf_length, offset, validate: bool = True) -> "CdfTables":
        """Build from any array-likes (e.g. ``tensor.numpy()``), converting to C-contiguous int32.

        Values that do not fit in int32 are rejected (ValueError) rather than wrapped.
        """
        arrays = []
        for name, a, ndim in (("quantized_cdf", quantized_cdf, 2), ("cdf_length", cdf_length, 1), ("offset", offset, 1)):
            a = np.asarray(a)
            if a.ndim != ndim:
                raise ValueError(f"CDF table {name}: expected {ndim} dimensions, got shape {a.shape}")
            if a.dtype.kind not in "iu":
                raise ValueError(f"CDF table {name}: expected an integer array, got dtype {a.dtype}")
            if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
                raise ValueError(f"CDF table {name}: values do not fit in int32")
            arrays.append(np.ascontiguousarray(a, dtype=np.int32))
        t = cls(*arrays)
        if validate:
            t.validate()
        return t

    @property
    def num_tables(self) -> int:
        return int(self.cdf_length.shape[0])

    def num_symbols(self) -> np.ndarray:
        """Number of table symbols per row (escape symbol included): ``cdf_length - 1``."""
        return self.cdf_length.astype(np.int64) - 1

    def frequencies(self, i: int) -> np.ndarray:
        """Integer frequencies (int64, length ``cdf_length[i] - 1``, summing to 65536) of row ``i``."""
        m = int(self.cdf_length[i])
        return np.diff(self.quantized_cdf[i, :m].astype(np.int64))

    def validate(self) -> None:
        """Raise ValueError unless every row is a valid 16-bit CDF; see :func:`validate_tables`."""
        validate_tables(self)

    def code_lengths(self) -> np.ndarray:
        """Bits of every table symbol, ``-log2(frequency / 65536)``: float64 ``(n, W)`` with ``W``
        the most symbols of a row; row ``i``'s escape symbol is column ``cdf_length[i] - 2``, and
        the columns after it are padding (infinite)."""
        m = self.num_symbols()
        cdf = self.quantized_cdf.astype(np.int64)
        width = int(m.max())
        freq = np.diff(cdf[:, : width + 1], axis=1).astype(np.float64)
        valid = np.arange(width)[None, :] < m[:, None]
        out = np.full(freq.shape, np.inf)
        out[valid] = -np.log2(freq[valid] / TOTAL)
        return out


def validate_tables(tables: CdfTables) -> None:
    """Check an (untrusted) table set.

    Requirements: int32 arrays of shapes (n, L), (n,), (n,) with n >= 1; for every row
    ``2 <= cdf_length[i] <= L``, ``cdf[0] == 0``, ``cdf[len-1] == 65536`` and every symbol
    frequency ``cdf[k+1] - cdf[k] >= 1`` (hence strictly increasing on the valid part).
    Raises ValueError with a message naming the first offending row.
    """
    cdf, length, offset = tables.quantized_cdf, tables.cdf_length, tables.offset
    for name, a in (("quantized_cdf", cdf), ("cdf_length", length), ("offset", offset)):
        if not isinstance(a, np.ndarray) or a.dtype != np.int32:
            raise ValueError(f"CDF table {name} must be an int32 numpy array (use CdfTables.from_arrays)")
    if cdf.ndim != 2 or length.ndim != 1 or offset.ndim != 1:
        raise ValueError(
            f"CDF table shapes must be (n, L), (n,), (n,); got {cdf.shape}, {length.shape}, {offset.shape}"
        )
    n, width = cdf.shape
    if n < 1:
        raise ValueError("CDF table set is empty")
    if length.shape[0] != n or offset.shape[0] != n:
        raise ValueError(
            f"CDF table shapes disagree: quantized_cdf has {n} rows, cdf_length {length.shape[0]}, "
            f"offset {offset.shape[0]}"
        )
    bad = np.nonzero((length < 2) | (length > width))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"CDF table row {i}: cdf_length {int(length[i])} outside [2, {width}]")
    if np.any(cdf[:, 0] != 0):
        i = int(np.nonzero(cdf[:, 0] != 0)[0][0])
        raise ValueError(f"CDF table row {i}: cdf[0] is {int(cdf[i, 0])}, expected 0")
    rows = np.arange(n)
    last = cdf[rows, length - 1]
    if np.any(last != TOTAL):
        i = int(np.nonzero(last != TOTAL)[0][0])
        raise ValueError(f"CDF table row {i}: cdf[{int(length[i]) - 1}] is {int(last[i])}, expected {TOTAL}")
    # Frequencies of the valid part: cdf[k+1] - cdf[k] for k < length - 1.
    diffs = np.diff(cdf.astype(np.int64), axis=1)
    valid = np.arange(width - 1)[None, :] < (length[:, None].astype(np.int64) - 1)
    badmask = valid & (diffs < 1)
    if np.any(badmask):
        i, k = (int(v) for v in np.argwhere(badmask)[0])
        raise ValueError(
            f"CDF table row {i}: symbol {k} has frequency {int(diffs[i, k])} (cdf must increase strictly, "
            "every symbol needs frequency >= 1)"
        )


# ---------------------------------------------------------------------------------------
# pmf -> quantized CDF (CompressAI semantics)
# ---------------------------------------------------------------------------------------


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``std::round`` for non-negative finite values (ties away from zero), exact."""
    # x is float32 (or float64 holding float32 values); x + 0.5 is exact in float64.
    return np.floor(x.astype(np.float64) + 0.5)


def pmf_to_quantized_cdf(pmf: np.ndarray, tail_mass: float, precision: int = PRECISION) -> np.ndarray:
    """Quantize ``concat(pmf, [tail_mass])`` into an integer CDF (CompressAI semantics).

    Reproduces CompressAI's C++ ``pmf_to_quantized_cdf`` as called by
    ``EntropyModel._pmf_to_cdf`` on ``cat(pmf, tail_mass)``:

    1. the probabilities are converted to float32 (the C++ takes ``std::vector<float>``);
       negative or non-finite values raise ValueError;
    2. ``freq_k = round(p_k * 2**precision)`` (float32 product, ties away from zero);
    3. ``total = sum(freq)``; each ``freq_k = floor(2**precision * freq_k / total)``
       (exact integer arithmetic); ``total == 0`` raises ValueError;
    4. ``cdf = [0, cumsum(freq)]`` and then ``cdf[-1] = 2**precision``;
    5. for every interval ``i`` (ascending) with ``cdf[i] == cdf[i+1]``, one count is
       stolen from the symbol ``j`` with the smallest frequency that is > 1 (the first
       such ``j`` on ties) and given to ``i``.

    Step 5 is implemented in closed form: the set of zero intervals is fixed before the
    first steal, each steal only decrements the donor, and a donor stays the minimum
    until it reaches frequency 1; so the donors are drained in ascending
    ``(frequency, index)`` order.  This is exactly equivalent to CompressAI's loop
    (tested against a literal transcription).

    Returns an int32 array of length ``len(pmf) + 2``.
    """
    if not 1 <= precision <= 24:
        raise ValueError(f"precision must be in [1, 24], got {precision}")
    probs = np.concatenate(
        [np.asarray(pmf, dtype=np.float64).reshape(-1), np.asarray([tail_mass], dtype=np.float64)]
    ).astype(np.float32)
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("pmf_to_quantized_cdf: probabilities must be finite and non-negative")
    one = 1 << precision
    freq = _round_half_away(probs * np.float32(one))
    if np.any(freq >= 2.0**40):
        raise ValueError("pmf_to_quantized_cdf: probability too large")
    freq = freq.astype(np.int64)
    total = int(freq.sum())
    if total == 0:
        raise ValueError("pmf_to_quantized_cdf: all probabilities quantize to zero")
    if total >= 1 << 32:  # CompressAI accumulates in 32 bits
        raise ValueError("pmf_to_quantized_cdf: probabilities sum too large")
    freq = (np.int64(one) * freq) // np.int64(total)
    # Force the last cdf entry to 2**precision: the deficit goes to the last symbol.
    freq[-1] += one - int(freq.sum())
    zeros = int(np.count_nonzero(freq == 0))
    if zeros:
        donors = np.nonzero(freq > 1)[0]
        order = donors[np.lexsort((donors, freq[donors]))]  # by frequency, then index
        capacity = freq[order] - 1
        cum = np.cumsum(capacity)
        if cum.size == 0 or cum[-1] < zeros:
            raise ValueError("pmf_to_quantized_cdf: too many symbols for the precision")
        full = int(np.searchsorted(cum, zeros, side="left"))  # donors 0..full-1 drained fully
        freq[order[:full]] = 1
        taken_before = int(cum[full - 1]) if full else 0
        freq[order[full]] -= zeros - taken_before
        freq[freq == 0] = 1
    cdf = np.zeros(freq.size + 1, dtype=np.int64)
    np.cumsum(freq, out=cdf[1:])
    assert cdf[-1] == one
    return cdf.astype(np.int32)


def pmf_to_cdf_tables(pmf_rows: np.ndarray, tail_mass_rows: np.ndarray, lengths: np.ndarray,
                      precision: int = PRECISION) -> np.ndarray:
    """Build the padded ``(n, max_len + 2)`` int32 table like CompressAI's ``EntropyModel._pmf_to_cdf``.

    ``pmf_rows``: (n, max_len) floats; ``tail_mass_rows``: (n,) or (n, 1); ``lengths``: (n,)
    ints with ``1 <= lengths[i] <= max_len``.  Row ``i`` holds
    ``pmf_to_quantized_cdf(pmf_rows[i, :lengths[i]], tail_mass_rows[i])`` (``lengths[i] + 2``
    entries) followed by zeros.
    """
    pmf_rows = np.asarray(pmf_rows)
    if pmf_rows.ndim != 2:
        raise ValueError(f"pmf_rows must be 2-D, got shape {pmf_rows.shape}")
    n, max_len = pmf_rows.shape
    tails = np.asarray(tail_mass_rows).reshape(-1)
    lengths = np.asarray(lengths).reshape(-1)
    if tails.shape[0] != n or lengths.shape[0] != n:
        raise ValueError("pmf_to_cdf_tables: pmf_rows, tail_mass_rows and lengths disagree in length")
    if np.any(lengths < 1) or np.any(lengths > max_len):
        raise ValueError(f"pmf_to_cdf_tables: lengths must be in [1, {max_len}]")
    out = np.zeros((n, max_len + 2), dtype=np.int32)
    for i in range(n):
        m = int(lengths[i])
        out[i, : m + 2] = pmf_to_quantized_cdf(pmf_rows[i, :m], float(tails[i]), precision)
    return out


# ---------------------------------------------------------------------------------------
# Gaussian tables (CompressAI GaussianConditional)
# ---------------------------------------------------------------------------------------


def gaussian_scale_table(min: float = 0.11, max: float = 256.0, levels: int = 64) -> np.ndarray:  # noqa: A002
    """CompressAI's ``get_scale_table``: ``torch.exp(torch.linspace(log(min), log(max), levels))``.

    Reproduced bit for bit in numpy (float32 result).  torch's CPU ``linspace`` kernel
    computes, in float32 with ``start = f32(log(min))``, ``end = f32(log(max))`` and
    ``step = f32((end - start) / (levels - 1))``: ``start + step * i`` for
    ``i < levels // 2`` and ``end - step * (levels - 1 - i)`` otherwise, the multiply-add
    being contracted into one fused operation (a single rounding) in the compiled
    kernel.  We evaluate that expression exactly in float64 (the product of a float32 and
    an integer < 2**24 and the sum are exact there) and round once to float32.  ``exp``
    is then evaluated in float64 and rounded to float32, which agrees with torch's
    float32 ``exp`` on this table (verified against stored CompressAI buffers in
    tests/test_entropy.py).
    """
    if levels < 2:
        raise ValueError("levels must be >= 2")
    start = np.float32(math.log(min))
    end = np.float32(math.log(max))
    step = np.float32((end - start) / np.float32(levels - 1))
    idx = np.arange(levels, dtype=np.int64)
    half = levels // 2
    lo = np.float64(start) + np.float64(step) * idx.astype(np.float64)
    hi = np.float64(end) - np.float64(step) * (levels - 1 - idx).astype(np.float64)
    lin = np.where(idx < half, lo, hi).astype(np.float32)
    return np.exp(lin.astype(np.float64)).astype(np.float32)


_erfc64 = np.vectorize(math.erfc, otypes=[np.float64])


def _phi(x: np.ndarray, float32: bool) -> np.ndarray:
    """CompressAI's ``_standardized_cumulative``: ``0.5 * erfc(-(2**-0.5) * x)``."""
    if float32:
        const = np.float32(-(2**-0.5))
        arg = (const * x.astype(np.float32)).astype(np.float32)
        # erfc evaluated in double and rounded once to float32 (torch: float32 erfc).
        e = _erfc64(arg.astype(np.float64)).astype(np.float32)
        return (np.float32(0.5) * e).astype(np.float32)
    const = -(2**-0.5)
    return 0.5 * _erfc64(const * x.astype(np.float64))


_gaussian_cache: dict = {}


def gaussian_cdf_tables(scale_table: np.ndarray, tail_mass: float = 1e-9, precision: int = PRECISION,
                        float32: bool = True) -> CdfTables:
    """CompressAI ``GaussianConditional.update()`` in numpy.

    ``multiplier = -Phi^-1(tail_mass / 2)``; ``pmf_center = ceil(scale * multiplier)``;
    ``pmf_length = 2 * pmf_center + 1``; ``samples = |arange(max_length) - pmf_center|``;
    ``pmf = Phi((0.5 - samples) / scale) - Phi((-0.5 - samples) / scale)``;
    ``tail = 2 * Phi((-0.5 - samples[:, 0]) / scale)``; CDF rows via
    :func:`pmf_to_cdf_tables`; ``offset = -pmf_center``; ``cdf_length = pmf_length + 2``.

    ``float32=True`` (default) mirrors CompressAI's float32 torch arithmetic: every
    elementwise operation is rounded to float32, and ``erfc`` is computed in double
    and rounded to float32.  This reproduces the stored CompressAI buffers of LALIC and
    MambaIC bit for bit (tests/test_entropy.py).  ``float32=False`` evaluates in float64
    (it differs from CompressAI in one of the 64 rows of the default table).

    Results are cached per argument set and returned with read-only arrays (the same
    object each time, so the coder's per-table model cache is hit as well).
    """
    scale = np.asarray(scale_table, dtype=np.float32 if float32 else np.float64).reshape(-1)
    key = (scale.dtype.str, scale.tobytes(), float(tail_mass), int(precision), bool(float32))
    hit = _gaussian_cache.get(key)
    if hit is not None:
        return hit
    tables = _gaussian_cdf_tables(scale, tail_mass, precision, float32)
    for a in tables:
        a.flags.writeable = False
    if len(_gaussian_cache) >= 16:
        _gaussian_cache.clear()
    _gaussian_cache[key] = tables
    return tables


def _gaussian_cdf_tables(scale: np.ndarray, tail_mass: float, precision: int, float32: bool) -> CdfTables:
    if scale.size == 0 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError("scale_table must be a non-empty array of finite positive values")
    multiplier = -NormalDist().inv_cdf(tail_mass / 2)
    if float32:
        center = np.ceil((scale * np.float32(multiplier)).astype(np.float32)).astype(np.int64)
    else:
        center = np.ceil(scale * multiplier).astype(np.int64)
    length = 2 * center + 1
    max_length = int(length.max())
    if max_length + 2 > 1 << 20:
        raise ValueError("scale_table values too large")
    samples = np.abs(np.arange(max_length, dtype=np.int64)[None, :] - center[:, None])
    ft = np.float32 if float32 else np.float64
    samples = samples.astype(ft)
    s = scale[:, None].astype(ft)
    upper = _phi(((ft(0.5) - samples) / s).astype(ft), float32)
    lower = _phi(((ft(-0.5) - samples) / s).astype(ft), float32)
    pmf = (upper - lower).astype(ft)
    tail = (ft(2) * lower[:, 0]).astype(ft)
    cdf = pmf_to_cdf_tables(pmf, tail, length, precision)
    return CdfTables(
        quantized_cdf=cdf,
        cdf_length=(length + 2).astype(np.int32),
        offset=(-center).astype(np.int32),
    )


# ---------------------------------------------------------------------------------------
# tables fitted to coded symbols
# ---------------------------------------------------------------------------------------


def symbol_counts(tables: CdfTables, indexes: np.ndarray, symbols: np.ndarray) -> np.ndarray:
    """How often each row coded each of its table symbols: int64 ``(n, W)`` as
    :meth:`CdfTables.code_lengths` lays them out, a value outside row ``i``'s range counted as
    its escape symbol.  ``indexes`` (rows, in ``[0, n)``) and ``symbols`` (values) are arrays of
    one shape."""
    idx = np.asarray(indexes, dtype=np.int64).reshape(-1)
    val = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if idx.shape != val.shape:
        raise ValueError(f"symbol_counts: {idx.size} indexes for {val.size} symbols")
    n = tables.num_tables
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"symbol_counts: table index outside [0, {n})")
    m = tables.num_symbols()
    width = int(m.max())
    t = val - tables.offset.astype(np.int64)[idx]
    esc = m[idx] - 1
    t = np.where((t < 0) | (t >= esc), esc, t)
    return np.bincount(idx * width + t, minlength=n * width).reshape(n, width)


def fit_cdf_tables(base: CdfTables, counts: np.ndarray, prior_weight: float = 100.0) -> CdfTables:
    """``base`` with every row's frequencies fitted to ``counts`` (of :func:`symbol_counts`): row
    ``i``'s probabilities become ``(counts_i + a p_i) / (N_i + a)``, ``p_i`` the base row's, ``N_i``
    its count and ``a = prior_weight`` (a row seldom seen keeps about its base distribution),
    quantised as CompressAI quantises a pmf (:func:`pmf_to_quantized_cdf`: every symbol at least
    frequency 1).  Each row keeps its symbols (``offset`` and ``cdf_length``) and its escape."""
    counts = np.asarray(counts, dtype=np.float64)
    m = base.num_symbols()
    if counts.shape != (base.num_tables, int(m.max())) or np.any(counts < 0):
        raise ValueError(f"fit_cdf_tables: counts must be non-negative of shape {(base.num_tables, int(m.max()))}")
    if not prior_weight > 0:
        raise ValueError("fit_cdf_tables: prior_weight must be positive")
    cdf = np.zeros_like(base.quantized_cdf)
    for i in range(base.num_tables):
        k = int(m[i])
        prior = base.frequencies(i) / TOTAL
        p = (counts[i, :k] + prior_weight * prior) / (counts[i, :k].sum() + prior_weight)
        cdf[i, : k + 1] = pmf_to_quantized_cdf(p[:-1], float(p[-1]))
    return CdfTables.from_arrays(cdf, base.cdf_length, base.offset)
