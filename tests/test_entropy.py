"""Tests for lalic_codec.entropy (tables + range coder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lalic_codec._paths import shared_dir

from lalic_codec.entropy.coder import (
    ESCAPE_CLASSES,
    MAX_ABS_SYMBOL,
    decode_with_indexes,
    encode_with_indexes,
    model_left_cumulatives,
)
from lalic_codec.entropy.tables import (
    CdfTables,
    fit_cdf_tables,
    gaussian_cdf_tables,
    gaussian_scale_table,
    pmf_to_cdf_tables,
    pmf_to_quantized_cdf,
    symbol_counts,
)
from lalic_codec.errors import CorruptFileError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_range_decoder as ref  # noqa: E402

REFVEC = Path(os.environ.get("LALIC_REFVEC", str(shared_dir() / "refvec")))
LALIC_SD = REFVEC / "lalic" / "small_state_dict.pt"
MAMBAIC_SD = REFVEC / "mambaic" / "small_state_dict.pt"


# --------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gauss() -> CdfTables:
    return gaussian_cdf_tables(gaussian_scale_table())


def table_from_freqs(rows: list[list[int]], offsets: list[int]) -> CdfTables:
    width = max(len(r) for r in rows) + 1
    cdf = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        assert sum(r) == 65536
        cdf[i, 1: len(r) + 1] = np.cumsum(r)
    return CdfTables.from_arrays(cdf, [len(r) + 1 for r in rows], offsets)


@pytest.fixture(scope="module")
def hand() -> CdfTables:
    return table_from_freqs(
        [
            [65536],  # a single (escape) symbol: everything escapes, nothing coded in phase 1
            [65535, 1],  # two symbols: value == offset, or escape
            [1, 65534, 1],
            [16384, 16384, 16384, 16383, 1],
            [1] * 1000 + [65536 - 1000],
        ],
        [0, -3, 5, -1000, 100],
    )


def roundtrip(symbols, indexes, tables) -> bytes:
    data = encode_with_indexes(symbols, indexes, tables)
    assert isinstance(data, bytes) and len(data) % 4 == 0
    out = decode_with_indexes(data, indexes, tables)
    assert out.dtype == np.int32 and out.shape == np.shape(indexes)
    np.testing.assert_array_equal(out, symbols)
    return data


def sample_latent(rng, n, tables_scale, spread=1.0):
    idx = rng.integers(0, tables_scale.size, n).astype(np.int32)
    s = np.round(rng.normal(0.0, tables_scale[idx] * spread)).astype(np.int32)
    return s, idx


def literal_pmf_to_quantized_cdf(pmf, tail_mass, precision=16):
    """Line-by-line transcription of CompressAI's C++ loop (slow; test oracle only)."""
    probs = np.concatenate([np.asarray(pmf, np.float64), [tail_mass]]).astype(np.float32)
    one = 1 << precision
    cdf = [0] + [int(np.floor(np.float64(np.float32(p) * np.float32(one)) + 0.5)) for p in probs]
    total = sum(cdf)
    cdf = [(one * p) // total for p in cdf]
    for i in range(1, len(cdf)):
        cdf[i] += cdf[i - 1]
    cdf[-1] = one
    for i in range(len(cdf) - 1):
        if cdf[i] == cdf[i + 1]:
            best_freq, best_steal = None, -1
            for j in range(len(cdf) - 1):
                freq = cdf[j + 1] - cdf[j]
                if freq > 1 and (best_freq is None or freq < best_freq):
                    best_freq, best_steal = freq, j
            assert best_steal != -1
            if best_steal < i:
                for j in range(best_steal + 1, i + 1):
                    cdf[j] -= 1
            else:
                for j in range(i + 1, best_steal + 1):
                    cdf[j] += 1
    return np.array(cdf, dtype=np.int32)


# --------------------------------------------------------------------------------------
# tables: CompressAI reproduction
# --------------------------------------------------------------------------------------


def _load_sd(path):
    if not path.exists():
        pytest.skip(f"reference vectors not available: {path}")
    torch = pytest.importorskip("torch")
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True)["state_dict"].items()}


def _gaussian_prefixes(sd):
    return sorted(k[: -len("_quantized_cdf")] for k in sd if k.endswith("gaussian_conditional._quantized_cdf"))


def test_scale_table_bit_exact():
    sd = _load_sd(LALIC_SD)
    stored = sd["latent_codec.y.latent_codec.y0.y.gaussian_conditional.scale_table"]
    mine = gaussian_scale_table()
    assert mine.dtype == np.float32
    np.testing.assert_array_equal(mine.view(np.uint32), stored.view(np.uint32))


@pytest.mark.parametrize("path,expected_count", [(LALIC_SD, 4), (MAMBAIC_SD, 1)])
def test_gaussian_tables_bit_exact(path, expected_count):
    sd = _load_sd(path)
    prefixes = _gaussian_prefixes(sd)
    assert len(prefixes) == expected_count
    cache = {}
    for p in prefixes:
        scale = sd[p + "scale_table"]
        np.testing.assert_array_equal(scale.view(np.uint32), gaussian_scale_table().view(np.uint32))
        key = scale.tobytes()
        if key not in cache:
            cache[key] = gaussian_cdf_tables(scale)  # float32 pipeline (the default)
        t = cache[key]
        np.testing.assert_array_equal(t.cdf_length, sd[p + "_cdf_length"])
        np.testing.assert_array_equal(t.offset, sd[p + "_offset"])
        assert t.quantized_cdf.shape == sd[p + "_quantized_cdf"].shape
        np.testing.assert_array_equal(t.quantized_cdf, sd[p + "_quantized_cdf"])
        CdfTables.from_arrays(sd[p + "_quantized_cdf"], sd[p + "_cdf_length"], sd[p + "_offset"])


def test_float64_evaluation_does_not_reproduce_compressai():
    """Documents the finding: only the float32 pipeline matches CompressAI's buffers."""
    sd = _load_sd(LALIC_SD)
    p = _gaussian_prefixes(sd)[0]
    t64 = gaussian_cdf_tables(sd[p + "scale_table"], float32=False)
    np.testing.assert_array_equal(t64.cdf_length, sd[p + "_cdf_length"])
    np.testing.assert_array_equal(t64.offset, sd[p + "_offset"])
    differing_rows = np.nonzero((t64.quantized_cdf != sd[p + "_quantized_cdf"]).any(axis=1))[0]
    assert differing_rows.size >= 1


def test_entropy_bottleneck_tables_validate_and_code():
    sd = _load_sd(MAMBAIC_SD)
    t = CdfTables.from_arrays(
        sd["entropy_bottleneck._quantized_cdf"], sd["entropy_bottleneck._cdf_length"], sd["entropy_bottleneck._offset"]
    )
    rng = np.random.default_rng(7)
    idx = np.repeat(np.arange(t.num_tables, dtype=np.int32), 20).reshape(t.num_tables, 4, 5)
    s = rng.integers(-14, 14, idx.shape).astype(np.int32)
    roundtrip(s, idx, t)


# --------------------------------------------------------------------------------------
# tables: pmf_to_quantized_cdf
# --------------------------------------------------------------------------------------


def _pmf_cases():
    rng = np.random.default_rng(123)
    cases = [
        (np.array([0.5, 0.5]), 0.0),
        (np.array([1.0]), 0.0),
        (np.array([0.0, 1.0, 0.0]), 0.0),
        (np.array([1e-12] * 50 + [1.0]), 1e-9),
        (np.zeros(10), 1.0),
        (np.array([0.3, 0.0, 0.0, 0.2, 1e-7, 0.5]), 1e-9),
        (np.full(3000, 1.0 / 3000), 0.0),  # every freq ~21.8
        (np.concatenate([np.full(5, 0.2), np.zeros(300)]), 1e-9),  # many stolen counts
        (np.array([7.62939453125e-06] * 4 + [0.9]), 0.0),  # exact .5 ties after scaling
    ]
    for _ in range(40):
        n = int(rng.integers(1, 400))
        p = rng.random(n) ** rng.uniform(1, 30)
        p[rng.random(n) < 0.3] = 0.0
        if p.sum() == 0:
            p[0] = 1.0
        p = p / p.sum() * rng.uniform(0.5, 1.0)
        cases.append((p, float(rng.uniform(0, 1e-3))))
    return cases


@pytest.mark.parametrize("case", range(len(_pmf_cases())))
def test_pmf_to_quantized_cdf_matches_literal_and_properties(case):
    pmf, tail = _pmf_cases()[case]
    cdf = pmf_to_quantized_cdf(pmf, tail)
    assert cdf.dtype == np.int32 and cdf.shape == (pmf.size + 2,)
    assert cdf[0] == 0 and cdf[-1] == 65536
    freqs = np.diff(cdf.astype(np.int64))
    assert freqs.min() >= 1 and freqs.sum() == 65536
    np.testing.assert_array_equal(cdf, literal_pmf_to_quantized_cdf(pmf, tail))


def test_pmf_to_quantized_cdf_rejects_bad_input():
    with pytest.raises(ValueError):
        pmf_to_quantized_cdf(np.array([0.5, -0.1]), 0.0)
    with pytest.raises(ValueError):
        pmf_to_quantized_cdf(np.array([0.5, np.nan]), 0.0)
    with pytest.raises(ValueError):
        pmf_to_quantized_cdf(np.array([0.0, 0.0]), 0.0)  # total 0
    with pytest.raises(ValueError):
        pmf_to_quantized_cdf(np.full(70000, 1.0 / 70000), 0.0)  # more symbols than 2**16


def test_pmf_to_cdf_tables_layout():
    pmf = np.array([[0.25, 0.5, 0.25, 0.0], [0.5, 0.5, 0.0, 0.0]], dtype=np.float32)
    out = pmf_to_cdf_tables(pmf, np.array([0.0, 1e-3]), np.array([3, 2]))
    assert out.shape == (2, 6) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0, :5], pmf_to_quantized_cdf(pmf[0, :3], 0.0))
    np.testing.assert_array_equal(out[1, :4], pmf_to_quantized_cdf(pmf[1, :2], 1e-3))
    assert out[0, 5] == 0 and (out[1, 4:] == 0).all()
    CdfTables.from_arrays(out, [5, 4], [0, 0])


# --------------------------------------------------------------------------------------
# tables: validation
# --------------------------------------------------------------------------------------


def _bad(cdf, length, offset):
    with pytest.raises(ValueError):
        CdfTables.from_arrays(np.array(cdf), np.array(length), np.array(offset))


def test_validate_rejects_invalid_tables():
    good = [[0, 100, 65536, 0]]
    CdfTables.from_arrays(np.array(good), [3], [0])
    _bad([[1, 100, 65536, 0]], [3], [0])  # cdf[0] != 0
    _bad([[0, 100, 65535, 0]], [3], [0])  # last != 65536
    _bad([[0, 100, 100, 65536]], [4], [0])  # zero frequency
    _bad([[0, 200, 100, 65536]], [4], [0])  # decreasing
    _bad([[0, 100, 65536, 0]], [1], [0])  # length < 2
    _bad([[0, 100, 65536, 0]], [5], [0])  # length > L
    _bad([[0, 100, 65536, 0]], [3, 3], [0])  # shape mismatch
    _bad([[0, 100, 65536, 0]], [3], [0, 0])
    _bad(np.zeros((0, 4), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))  # empty
    _bad([[0.0, 100.0, 65536.0]], [3], [0])  # float dtype
    _bad([[0, 100, 2**33]], [3], [0])  # does not fit int32
    with pytest.raises(ValueError):  # a raw (unvalidated) tuple with bad rows is rejected at use
        t = CdfTables(np.array([[0, 5, 5, 65536]], np.int32), np.array([4], np.int32), np.array([0], np.int32))
        encode_with_indexes(np.zeros(1, np.int32), np.zeros(1, np.int32), t)


# --------------------------------------------------------------------------------------
# coder: model derivation
# --------------------------------------------------------------------------------------


def test_model_formula_matches_reference():
    rng = np.random.default_rng(3)
    for m in (2, 3, 17, 1000):
        f = rng.integers(1, 50, m)
        f[-1] += 65536 - f.sum()
        assert f[-1] >= 1
        np.testing.assert_array_equal(model_left_cumulatives(f), ref.categorical_cumulatives(f.tolist()))


def test_each_tables_object_codes_with_its_own_tables():
    """Tables objects made and dropped one after the other (new objects may reuse a dropped one's
    memory and id) each code with their own rows: the byte-exact reference encoder, which keeps no
    state between calls, writes the same stream, and encoding again with the first object still does."""
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 64, 400).astype(np.int32)
    s = rng.integers(-6, 7, idx.size).astype(np.int32)
    first = gaussian_cdf_tables(gaussian_scale_table())
    first_stream = encode_with_indexes(s, idx, first)
    streams = set()
    for factor in (0.5, 2.0, 0.25, 4.0):
        t = gaussian_cdf_tables(gaussian_scale_table() * np.float32(factor))
        data = encode_with_indexes(s, idx, t)
        assert data == ref.reference_encode(s.tolist(), idx.tolist(), *_ref_args(t)), factor
        np.testing.assert_array_equal(decode_with_indexes(data, idx, t), s)
        streams.add(data)
        del t
    assert len(streams) == 4 and first_stream not in streams  # the tables really differ
    assert encode_with_indexes(s, idx, first) == first_stream


# --------------------------------------------------------------------------------------
# tables fitted to coded symbols
# --------------------------------------------------------------------------------------


def test_code_lengths_and_symbol_counts_follow_the_rows(gauss):
    bits = gauss.code_lengths()
    for i in (0, 17, 63):
        m = int(gauss.cdf_length[i]) - 1
        np.testing.assert_array_equal(bits[i, :m], -np.log2(gauss.frequencies(i) / 65536))
        assert np.isinf(bits[i, m:]).all()
    off = int(gauss.offset[0])  # row 0 holds -1, 0, 1 and the escape
    c = symbol_counts(gauss, np.array([0, 0, 0, 0, 0, 5]), np.array([0, 0, 1, -1, 7, -50]))
    assert c.shape == bits.shape and c.sum() == 6
    assert c[0, -off] == 2 and c[0, 1 - off] == 1 and c[0, -1 - off] == 1
    assert c[0, int(gauss.cdf_length[0]) - 2] == 1  # 7 is outside row 0: its escape
    assert c[5, int(gauss.cdf_length[5]) - 2] == 1
    with pytest.raises(ValueError, match="outside"):
        symbol_counts(gauss, np.array([64]), np.array([0]))


def test_fitted_tables_keep_their_rows_and_follow_the_counts(gauss):
    counts = np.zeros(gauss.code_lengths().shape)
    assert all(np.array_equal(a, b) for a, b in zip(fit_cdf_tables(gauss, counts), gauss))  # no counts: the base
    rng = np.random.default_rng(1)
    sym, idx = sample_latent(rng, 200_000, gaussian_scale_table(), spread=0.5)  # narrower than each row's Gaussian
    fitted = fit_cdf_tables(gauss, symbol_counts(gauss, idx, sym), prior_weight=10)
    fitted.validate()
    assert np.array_equal(fitted.cdf_length, gauss.cdf_length) and np.array_equal(fitted.offset, gauss.offset)
    held, held_idx = sample_latent(rng, 100_000, gaussian_scale_table(), spread=0.5)
    bytes_gauss, bytes_fitted = (len(encode_with_indexes(held, held_idx, t)) for t in (gauss, fitted))
    assert bytes_fitted < 0.95 * bytes_gauss  # new symbols of the same source code smaller
    np.testing.assert_array_equal(decode_with_indexes(encode_with_indexes(held, held_idx, fitted), held_idx, fitted), held)
    with pytest.raises(ValueError, match="shape"):
        fit_cdf_tables(gauss, counts[:, :-1])


# --------------------------------------------------------------------------------------
# coder: round trips
# --------------------------------------------------------------------------------------


def test_roundtrip_gaussian(gauss):
    rng = np.random.default_rng(0)
    scale = gaussian_scale_table()
    s, idx = sample_latent(rng, 20000, scale)
    data = roundtrip(s.reshape(10, 20, 100), idx.reshape(10, 20, 100), gauss)
    assert data == encode_with_indexes(s, idx, gauss)  # deterministic, shape independent
    # symbols decoded under a different view of the same flat order are identical
    np.testing.assert_array_equal(decode_with_indexes(data, idx, gauss), s)


def test_roundtrip_every_index_and_dtypes(gauss):
    idx = np.arange(64, dtype=np.int64).repeat(3)
    s = (np.arange(idx.size) % 7 - 3).astype(np.int16)
    data = encode_with_indexes(s, idx, gauss)
    np.testing.assert_array_equal(decode_with_indexes(data, idx.astype(np.uint8), gauss), s)


def test_roundtrip_escapes_extremes(gauss):
    big = MAX_ABS_SYMBOL - 1
    vals = [big, -big, big - 1, -big + 1, 1 << 29, -(1 << 29), 65535, 65536, -65536, 12, -13, 0]
    s = np.array(vals * 64, dtype=np.int32)
    idx = np.repeat(np.arange(64, dtype=np.int32), len(vals))
    roundtrip(s, idx, gauss)


def test_roundtrip_escapes_near_table_edges(gauss, hand):
    for t in (gauss, hand):
        n = t.num_tables
        off = t.offset.astype(np.int64)
        esc = t.cdf_length.astype(np.int64) - 2
        cands = []
        for d in range(-3, 4):
            cands.append(off + d)  # around the lower edge
            cands.append(off + esc + d)  # around the escape boundary
        s = np.stack(cands, axis=1).astype(np.int32)
        idx = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], s.shape).copy()
        roundtrip(s, idx, t)


def test_roundtrip_hand_tables(hand):
    rng = np.random.default_rng(11)
    idx = rng.integers(0, hand.num_tables, 5000).astype(np.int32)
    s = (hand.offset[idx] + rng.integers(-5, 8, idx.size)).astype(np.int32)
    s[::97] = rng.integers(-(MAX_ABS_SYMBOL - 1), MAX_ABS_SYMBOL, s[::97].size)
    roundtrip(s, idx, hand)


def test_single_symbol_table_only_costs_escapes(hand):
    # table 0 has one symbol; a value equal to its offset escapes with class 0 and no payload
    idx = np.zeros(100, np.int32)
    s = np.zeros(100, np.int32)
    data = roundtrip(s, idx, hand)
    assert len(data) <= 4 * (2 + 100 * np.log2(ESCAPE_CLASSES) / 32 + 1)


def test_two_symbol_table(hand):
    idx = np.full(1000, 1, np.int32)
    s = np.full(1000, -3, np.int32)  # == offset: the non-escape symbol, probability 65535/65536
    data = roundtrip(s, idx, hand)
    assert len(data) <= 8
    s[500] = 4
    roundtrip(s, idx, hand)


def test_empty_and_single(gauss):
    for shape in [(0,), (3, 0, 2)]:
        e = np.zeros(shape, np.int32)
        data = encode_with_indexes(e, e, gauss)
        assert data == b""
        out = decode_with_indexes(data, e, gauss)
        assert out.shape == shape and out.dtype == np.int32
    for v in (0, 1, -1, 5000, -(MAX_ABS_SYMBOL - 1)):
        roundtrip(np.array([v], np.int32), np.array([17], np.int32), gauss)
    roundtrip(np.array(3, np.int32), np.array(0, np.int32), gauss)  # 0-d


def test_large_array_roundtrip(gauss):
    """Half a million symbols (a Kodak-sized latent); the coder's speed is measured by benchmarks/bench_coder.py."""
    rng = np.random.default_rng(2)
    scale = gaussian_scale_table()
    s, idx = sample_latent(rng, 500_000, scale)
    roundtrip(s, idx, gauss)


# --------------------------------------------------------------------------------------
# coder: input validation and corrupt streams
# --------------------------------------------------------------------------------------


def test_input_validation(gauss):
    z = np.zeros(4, np.int32)
    with pytest.raises(ValueError):
        encode_with_indexes(z, np.zeros(5, np.int32), gauss)
    with pytest.raises(ValueError):
        encode_with_indexes(z, np.array([0, 1, 64, 2], np.int32), gauss)
    with pytest.raises(ValueError):
        encode_with_indexes(z, np.array([0, 1, -1, 2], np.int32), gauss)
    with pytest.raises(ValueError):
        encode_with_indexes(np.array([0, MAX_ABS_SYMBOL, 0, 0]), z, gauss)
    with pytest.raises(ValueError):
        encode_with_indexes(np.array([0, -MAX_ABS_SYMBOL, 0, 0]), z, gauss)
    with pytest.raises(ValueError):
        encode_with_indexes(z.astype(np.float32), z, gauss)
    with pytest.raises(ValueError):
        decode_with_indexes(b"", np.array([64], np.int32), gauss)
    with pytest.raises(ValueError):
        encode_with_indexes(z, z, (gauss.quantized_cdf, gauss.cdf_length, gauss.offset))


def test_corrupt_length(gauss):
    with pytest.raises(CorruptFileError):
        decode_with_indexes(b"\x00" * 7, np.zeros(3, np.int32), gauss)
    with pytest.raises(CorruptFileError):
        decode_with_indexes(b"\x00" * 4, np.zeros(0, np.int32), gauss)


def test_trailing_words_rejected(gauss):
    rng = np.random.default_rng(4)
    s, idx = sample_latent(rng, 3000, gaussian_scale_table())
    data = encode_with_indexes(s, idx, gauss)
    with pytest.raises(CorruptFileError):
        decode_with_indexes(data + b"\x12\x34\x56\x78" * 2, idx, gauss)


def test_garbage_only_raises_corrupt(gauss, hand):
    rng = np.random.default_rng(99)
    outcomes = set()
    for trial in range(600):
        t = gauss if trial % 2 else hand
        n = int(rng.integers(1, 200))
        idx = rng.integers(0, t.num_tables, n).astype(np.int32)
        nw = int(rng.integers(0, 30))
        kind = trial % 4
        if kind == 0:
            words = rng.integers(0, 2**32, nw, dtype=np.uint64)
        elif kind == 1:
            words = np.full(nw, 0xFFFFFFFF, np.uint64)
        elif kind == 2:
            words = np.where(rng.random(nw) < 0.7, 0xFFFFFFFF, rng.integers(0, 2**32, nw, dtype=np.uint64))
        else:  # a valid stream, bit-flipped or truncated
            s = (t.offset[idx] + rng.integers(-2, 40, n)).astype(np.int32)
            words = np.frombuffer(encode_with_indexes(s, idx, t), "<u4").astype(np.uint64)
            if words.size and trial % 8 == 3:
                words[rng.integers(0, words.size)] ^= np.uint64(1) << np.uint64(rng.integers(0, 32))
            else:
                words = words[: rng.integers(0, words.size + 1)]
        data = words.astype("<u4").tobytes()
        try:
            out = decode_with_indexes(data, idx, t)
            assert out.shape == idx.shape
            outcomes.add("ok")
        except CorruptFileError:
            outcomes.add("corrupt")
    assert outcomes == {"ok", "corrupt"}


def test_does_not_import_torch():
    code = (
        "import sys; import lalic_codec.entropy.coder, lalic_codec.entropy.tables; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------
# independent reference implementation (proves the written specification is complete)
# --------------------------------------------------------------------------------------


def _ref_args(t: CdfTables):
    return t.quantized_cdf.tolist(), t.cdf_length.tolist(), t.offset.tolist()


def _ref_streams(gauss, hand):
    rng = np.random.default_rng(2024)
    scale = gaussian_scale_table()
    s, idx = sample_latent(rng, 4000, scale, spread=1.3)
    s[:8] = [MAX_ABS_SYMBOL - 1, -(MAX_ABS_SYMBOL - 1), 70000, -70000, 5000, -5000, 1 << 16, -(1 << 16)]
    yield s, idx, gauss
    idx = rng.integers(0, hand.num_tables, 3000).astype(np.int32)
    s = (hand.offset[idx] + rng.integers(-3, 6, idx.size)).astype(np.int32)
    s[::50] = rng.integers(-(MAX_ABS_SYMBOL - 1), MAX_ABS_SYMBOL, s[::50].size)
    yield s, idx, hand
    yield np.array([1], np.int32), np.array([0], np.int32), hand  # escape only, class 1 with 1 payload bit


def test_reference_decoder_decodes_our_streams(gauss, hand):
    for s, idx, t in _ref_streams(gauss, hand):
        data = encode_with_indexes(s, idx, t)
        assert ref.reference_decode(data, idx.tolist(), *_ref_args(t)) == s.tolist()


def test_reference_encoder_is_byte_identical(gauss, hand):
    stats = {"carries": 0, "straddles": 0}
    for s, idx, t in _ref_streams(gauss, hand):
        data = encode_with_indexes(s, idx, t)
        assert ref.reference_encode(s.tolist(), idx.tolist(), *_ref_args(t), stats=stats) == data
    # the streams above exercise carry propagation into already written words
    assert stats["carries"] > 0 and stats["straddles"] > 0


def test_reference_rejects_like_us(gauss):
    rng = np.random.default_rng(8)
    s, idx = sample_latent(rng, 500, gaussian_scale_table())
    data = encode_with_indexes(s, idx, gauss)
    with pytest.raises(ref.RefError):
        ref.reference_decode(data + b"\0" * 8, idx.tolist(), *_ref_args(gauss))
    with pytest.raises(ref.RefError):
        ref.reference_decode(b"\xff" * 8, [0], *_ref_args(gauss))
    with pytest.raises(CorruptFileError):
        decode_with_indexes(b"\xff" * 8, np.array([0], np.int32), gauss)


def test_spec_example_vector():
    """The worked example of formats/FORMAT.md section 12.7."""
    t = CdfTables.from_arrays(
        np.array([[0, 16384, 32768, 49152, 65535, 65536], [0, 65535, 65536, 0, 0, 0]]), [6, 3], [-1, 0]
    )
    s = np.array([-1, 0, 2, 7, -3, 0, 1], np.int32)
    x = np.array([0, 0, 0, 0, 0, 1, 1], np.int32)
    expected = bytes.fromhex("2fefff1f4a4821fe09e4be23")
    assert encode_with_indexes(s, x, t) == expected
    assert ref.reference_encode(s.tolist(), x.tolist(), *_ref_args(t)) == expected
    assert ref.reference_decode(expected, x.tolist(), *_ref_args(t)) == s.tolist()
    np.testing.assert_array_equal(decode_with_indexes(expected, x, t), s)
    assert ref.categorical_cumulatives([16384, 16384, 16384, 16383, 1]) == [
        0, 4194303, 8388607, 12582911, 16776959, 16777216]
    assert ref.categorical_cumulatives([65535, 1]) == [0, 16776959, 16777216]
    spec = Path(__file__).resolve().parents[1] / "formats" / "FORMAT.md"
    assert expected.hex() in spec.read_text()


def test_entropy_bottleneck_fit_quantiles_solves_the_aux_objective():
    import torch

    from lalic_codec.models.entropy_models import EntropyBottleneck

    torch.manual_seed(0)
    eb = EntropyBottleneck(6)
    with torch.no_grad():  # make the densities differ from the initial ones
        for m in eb.matrices:
            m.add_(torch.randn_like(m) * 0.3)
        for b in eb.biases:
            b.add_(torch.randn_like(b) * 2)
    before = float(eb.loss().detach())
    after = eb.fit_quantiles()
    assert before > 10 and after < 1e-2 * eb.quantiles.numel()
    logits = eb._logits_cumulative(eb.quantiles.detach(), stop_gradient=True)
    assert torch.allclose(torch.sigmoid(logits[:, 0, 1]), torch.full((6,), 0.5), atol=1e-4)  # medians
    q = eb.quantiles.detach()[:, 0]
    assert bool((q[:, 0] < q[:, 1]).all() and (q[:, 1] < q[:, 2]).all())
    # the tables built from them hold the densities' mass: the tails left out are about tail_mass
    eb.update(force=True)
    assert eb.has_tables()


# ------------------------------------------------------------------------------------------------
# merged streams: several segments in one range-coded stream (FORMAT.md 12.8)


def _segments(gauss, hand):
    """Segments of both tables, with escapes and an empty one, as the model's streams would be."""
    streams = list(_ref_streams(gauss, hand))
    return [streams[0], (np.zeros(0, np.int32), np.zeros(0, np.int32), hand), streams[1], streams[2]]


def test_merged_segments_round_trip_and_cost_less_than_streams(gauss, hand):
    from lalic_codec.entropy.coder import SegmentDecoder, SegmentEncoder, encode_stream

    segs = _segments(gauss, hand)
    enc = SegmentEncoder()
    for s, idx, t in segs:
        enc.add(s, idx, t)
    data = enc.finish()
    dec = SegmentDecoder(data)
    for s, idx, t in segs:
        np.testing.assert_array_equal(dec.take(idx, t), s)
    dec.finish()
    separate = sum(len(encode_stream(s, idx, t)) for s, idx, t in segs)
    assert len(data) < separate - 4 * (len(segs) - 1)  # a checksum (and sealing words) per stream saved
    # one segment is exactly a checked stream of its own
    one = SegmentEncoder()
    one.add(*segs[0])
    assert one.finish() == encode_stream(*segs[0])


def test_merged_segments_match_the_specification(gauss, hand):
    """The reference coder of FORMAT.md (written from the text, no constriction) writes the same
    bytes and reads them back."""
    from lalic_codec.entropy.coder import SegmentEncoder

    segs = _segments(gauss, hand)
    enc = SegmentEncoder()
    for s, idx, t in segs:
        enc.add(s, idx, t)
    data = enc.finish()
    assert ref.reference_encode_segments([(s.tolist(), idx.tolist(), *_ref_args(t)) for s, idx, t in segs]) == data
    out = ref.reference_decode_segments(data, [(idx.tolist(), *_ref_args(t)) for _, idx, t in segs])
    assert out == [s.tolist() for s, _, _ in segs]


def test_merged_segments_refuse_other_tables_trailing_words_and_bad_lengths(gauss, hand):
    from lalic_codec.entropy.coder import SegmentDecoder, SegmentEncoder
    from lalic_codec.errors import SymbolMismatchError

    segs = _segments(gauss, hand)[:1] + [_segments(gauss, hand)[2]]
    enc = SegmentEncoder()
    for s, idx, t in segs:
        enc.add(s, idx, t)
    data = enc.finish()
    # the second segment read with other indexes: its symbols miss the checksum (or do not parse)
    dec = SegmentDecoder(data)
    dec.take(segs[0][1], segs[0][2])
    with pytest.raises(SymbolMismatchError):
        dec.take(np.zeros_like(segs[1][1]), hand)
        dec.finish()
    # a segment left unread: trailing data
    dec = SegmentDecoder(data)
    dec.take(segs[0][1], segs[0][2])
    with pytest.raises(SymbolMismatchError, match="unread trailing data"):
        dec.finish()
    # a damaged checksum
    dec = SegmentDecoder(bytes([data[0] ^ 1]) + data[1:])
    for _, idx, t in segs:
        dec.take(idx, t)
    with pytest.raises(SymbolMismatchError, match="checksum"):
        dec.finish()
    for bad in (b"", b"\0\0\0", data + b"\0"):
        with pytest.raises(CorruptFileError):
            SegmentDecoder(bad)
