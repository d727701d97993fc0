"""Throughput of the entropy coder on a Kodak-sized LALIC latent.

320 channels x 32 x 48 = 491,520 symbols; per-element scales log-uniform in [0.11, 20],
table index chosen like CompressAI's ``build_indexes`` (the first scale-table entry
>= the scale), symbols drawn from the discretised Gaussian of that scale.
Reports the best of 5 runs.  Usage: ``python benchmarks/bench_coder.py``.
"""

from __future__ import annotations

import time

import numpy as np

from lalic_codec.entropy.coder import decode_with_indexes, encode_with_indexes
from lalic_codec.entropy.tables import gaussian_cdf_tables, gaussian_scale_table

SHAPE = (320, 32, 48)
REPEATS = 5


def make_latent(seed: int = 0):
    rng = np.random.default_rng(seed)
    table = gaussian_scale_table()
    n = int(np.prod(SHAPE))
    scales = np.exp(rng.uniform(np.log(0.11), np.log(20.0), n))
    indexes = np.searchsorted(table.astype(np.float64), scales, side="left").clip(0, table.size - 1)
    symbols = np.round(rng.normal(0.0, scales)).astype(np.int32)
    return symbols.reshape(SHAPE), indexes.astype(np.int32).reshape(SHAPE)


def best_of(fn, repeats=REPEATS):
    best = float("inf")
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    t0 = time.perf_counter()
    tables = gaussian_cdf_tables(gaussian_scale_table())
    t_tables = time.perf_counter() - t0
    symbols, indexes = make_latent()
    n = symbols.size
    encode_with_indexes(symbols[:1], indexes[:1], tables)  # build the cached models

    t_enc, data = best_of(lambda: encode_with_indexes(symbols, indexes, tables))
    t_dec, out = best_of(lambda: decode_with_indexes(data, indexes, tables))
    assert np.array_equal(out, symbols), "round trip failed"

    mb = len(data) / 1e6
    rel = symbols.astype(np.int64) - tables.offset[indexes]
    escapes = int(np.sum((rel < 0) | (rel >= tables.cdf_length[indexes] - 2)))
    print(f"latent {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} = {n} symbols, stream {len(data)} bytes "
          f"({8 * len(data) / n:.3f} bits/symbol), {escapes} escaped values")
    print(f"table build (64 Gaussian CDFs): {t_tables * 1e3:.1f} ms")
    print(f"encode: {t_enc * 1e3:8.1f} ms  {n / t_enc / 1e6:7.2f} Msymbols/s  {mb / t_enc:7.2f} MB/s of output")
    print(f"decode: {t_dec * 1e3:8.1f} ms  {n / t_dec / 1e6:7.2f} Msymbols/s  {mb / t_dec:7.2f} MB/s of output")


if __name__ == "__main__":
    main()
