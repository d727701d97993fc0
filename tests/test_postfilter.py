"""The post-filter (FORMAT.md 7.3): its block in the container, its bytes, the filter against a
per-pixel oracle, the encoder's fit and choice, and whole files through the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import natural_image
from lalic_codec import loading, pipeline, postfilter
from lalic_codec.errors import CorruptFileError, CrcMismatchError
from lalic_codec.formats import container as fmt
from lalic_codec.imaging import psnr


def random_filter(k: int, p: int = 8, seed: int = 0) -> postfilter.PostFilter:
    rng = np.random.default_rng(seed)
    t = len(postfilter.offsets(k))
    return postfilter.PostFilter(k, p, rng.integers(-300, 300, size=(3, 3, t)), rng.integers(-5000, 5000, size=3))


def oracle(recon: np.ndarray, pf: postfilter.PostFilter) -> np.ndarray:
    """FORMAT.md 7.3 pixel by pixel, in float64: edges repeated, each tap pair summed."""
    h, w, _ = recon.shape
    out = np.empty((h, w, 3), dtype=np.uint8)
    at = lambda i, y, x: float(recon[min(max(y, 0), h - 1), min(max(x, 0), w - 1), i])  # noqa: E731
    for y in range(h):
        for x in range(w):
            for o in range(3):
                acc = float(pf.bias[o])
                for i in range(3):
                    for t, (dy, dx) in enumerate(postfilter.offsets(pf.k)):
                        v = at(i, y, x) if t == 0 else at(i, y + dy, x + dx) + at(i, y - dy, x - dx)
                        acc += float(pf.coefs[o, i, t]) * v
                out[y, x, o] = min(max(np.floor(recon[y, x, o] + acc / 2.0**pf.fraction_bits + 0.5), 0), 255)
    return out


def test_taps_are_the_centre_then_one_of_each_symmetric_pair():
    assert postfilter.offsets(1) == [(0, 0)]
    assert postfilter.offsets(3) == [(0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]
    for k in postfilter.KERNEL_SIZES:
        taps = postfilter.offsets(k)
        assert len(taps) == (k * k + 1) // 2
        both = {o for dy, dx in taps for o in ((dy, dx), (-dy, -dx))}
        assert len(both) == k * k  # every position of the K x K window, once


@pytest.mark.parametrize("k", postfilter.KERNEL_SIZES)
def test_bytes_round_trip(k):
    pf = random_filter(k, p=10, seed=k)
    data = pf.to_bytes()
    back = postfilter.PostFilter.from_bytes(data)
    assert (back.k, back.fraction_bits) == (k, 10)
    assert np.array_equal(back.coefs, pf.coefs) and np.array_equal(back.bias, pf.bias)
    assert len(data) <= fmt.MAX_POSTFILTER_BYTES


def test_zigzag_varints_as_specified():
    pf = postfilter.PostFilter(1, 8, np.array([0, -1, 1, -2, 2, 63, -64, 64, 300]).reshape(3, 3, 1), np.array([0, -1, 2**22]))
    assert pf.to_bytes() == bytes([1, 8, 0, 1, 2, 0, 3, 4, 126, 1, 127, 128, 1, 216, 4, 0x80, 0x80, 0x80, 0x04])


@pytest.mark.parametrize("data,msg", [
    (b"", "shorter than"),
    (b"\x02\x08", "kernel size 2"),
    (b"\x01\x00" + bytes(12), "0 fraction bits"),
    (b"\x01\x10" + bytes(12), "16 fraction bits"),
    (b"\x01\x08" + bytes(11), "ends inside"),
    (b"\x01\x08" + bytes(13), "1 bytes after"),
    (b"\x01\x08\x80\x00" + bytes(11), "shortest"),
    (b"\x01\x08\x80\x80\x80\x80\x01" + bytes(11), "longer than 4 bytes"),
    (b"\x01\x08\x80\x80\x04" + bytes(11), "out of range"),  # 2^15 (zigzag 2^16)
])
def test_malformed_contents_are_refused(data, msg):
    with pytest.raises(ValueError, match=msg):
        postfilter.PostFilter.from_bytes(data)


@pytest.mark.parametrize("k", postfilter.KERNEL_SIZES)
def test_apply_matches_the_specification(k, monkeypatch):
    monkeypatch.setattr(postfilter, "BAND_ROWS", 5)  # bands, and their halos, inside the image
    rng = np.random.default_rng(k)
    recon = rng.uniform(-3, 258, size=(13, 9, 3)).astype(np.float32)
    pf = random_filter(k, seed=k)
    assert np.array_equal(postfilter.apply(recon, pf), oracle(recon, pf))


def test_a_zero_filter_is_the_plain_rounding():
    recon = np.random.default_rng(1).uniform(0, 255, size=(40, 30, 3)).astype(np.float32)
    zero = postfilter.PostFilter(5, 8, np.zeros((3, 3, 13), dtype=np.int64), np.zeros(3, dtype=np.int64))
    assert np.array_equal(postfilter.apply(recon, zero), np.clip(np.floor(recon + 0.5), 0, 255))


def blurred(seed: int = 0):
    x = natural_image(96, 128, seed=seed)
    recon = np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(0.7))).astype(np.float32)
    return x, recon + np.random.default_rng(seed).normal(0, 0.2, size=recon.shape).astype(np.float32)


def test_fit_undoes_a_blur_and_pays_for_its_bytes():
    x, recon = blurred()
    pf, report = postfilter.fit(x, recon, lam=0.01, classified=False, exact=50)
    assert pf is not None and pf.k > 1
    sse, nbytes = report[(pf.k, pf.fraction_bits)]
    assert nbytes == len(pf.to_bytes()) + 8
    assert 0.01 * (report["none"] - sse) / 3 > 8 * nbytes  # the choice's rule
    assert sse == pytest.approx(np.sum((x - postfilter.apply(recon, pf).astype(np.float64)) ** 2))
    assert psnr(x, postfilter.apply(recon, pf)) > psnr(x, np.clip(np.floor(recon + 0.5), 0, 255).astype(np.uint8)) + 1.0
    # the best candidate by the rule, among every kernel size and precision tried
    gains = {c: 0.01 * (report["none"] - v[0]) / 3 - 8 * v[1] for c, v in report.items() if c != "none"}
    assert max(gains, key=gains.get) == (pf.k, pf.fraction_bits)


def test_fit_keeps_no_filter_that_is_not_worth_its_bytes():
    x, recon = blurred(1)
    assert postfilter.fit(x, recon, lam=1e-7)[0] is None  # nearly free distortion: no bytes pay
    exact = x.astype(np.float32)
    assert postfilter.fit(x, exact, lam=0.01)[0] is None  # nothing to remove


# ----------------------------------------------------------------------------- the container block


def sample(postfilter_block: bytes | None = b"\x01\x08" + bytes(12)) -> fmt.LicFile:
    h = fmt.Header("default-v9", bytes(16), 4.0, 3, 2, fmt.ColourMode.RGB, 8, 0, 1)
    return fmt.LicFile(h, tiles=[fmt.Tile(0, 0, 3, 2, (0, 0, 0, 0), [b"\x01\x02"])], postfilter=postfilter_block)


@pytest.mark.parametrize("version", fmt.SUPPORTED_VERSIONS)
def test_container_round_trip_and_layout(version):
    f = sample()
    data = fmt.write(f, version=version)
    assert fmt.read(data) == f
    plain = fmt.write(sample(None), version=version)
    assert fmt.read(plain).postfilter is None
    head = 51 + len("default-v9")
    assert data[head - 9] == fmt.FLAG_POSTFILTER and plain[head - 9] == 0  # flags
    block = data[head : head + 8 + 14]
    assert block[:4] == (14).to_bytes(4, "little") and block[8:] == f.postfilter
    assert len(data) == len(plain) + 8 + 14
    info = fmt.read_info(data)
    assert info["postfilter"] == {"bytes": 14, "kernel": 1, "classes": 1} and info["crc_ok"]
    assert "post-filter: 1x1, 14 bytes" in fmt.info_lines(info, "x.lic")


def test_container_block_damage_is_reported():
    data = bytearray(fmt.write(sample()))
    head = 51 + len("default-v9")
    bad = bytes(data[: head + 9]) + bytes([data[head + 9] ^ 1]) + bytes(data[head + 10 :])
    with pytest.raises(CrcMismatchError, match="post-filter block: CRC32 mismatch"):
        fmt.read(bad)
    assert fmt.read_info(bad)["crc_errors"] == ["post-filter block: CRC32 mismatch (file is corrupt)"]
    long = bytes(data[:head]) + (2000).to_bytes(4, "little") + bytes(data[head + 4 :])
    with pytest.raises(CorruptFileError, match="post-filter block: declares 2000 bytes, more than the limit of 1024 .file is corrupt"):
        fmt.read(long)
    with pytest.raises(ValueError, match="1..1024 bytes"):
        fmt.write(sample(b""))
    with pytest.raises(ValueError, match="1..1024 bytes"):
        fmt.write(sample(bytes(1025)))


# ----------------------------------------------------------------------------- whole files


@pytest.fixture(scope="module")
def vr(tiny_vr_weights):
    return loading.load_model("x", tiny_vr_weights, "cpu")


def test_the_encoder_keeps_a_filter_that_improves_the_decoded_image(vr, tiny_vr_weights, monkeypatch):
    """The tiny random network reconstructs badly, so a filter always pays: the file carries it,
    the decoder applies it to the float reconstruction, and the image is closer to the original
    than the same file decoded without the block."""
    rgb = natural_image(96, 160, seed=5)
    data = pipeline.encode_image(Image.fromarray(rgb), vr, quality=8).data
    lic = fmt.read(data)
    assert lic.postfilter is not None
    out = np.asarray(pipeline.decode_bytes(data, tiny_vr_weights, "cpu").image)
    q = torch.tensor([8.0])
    pf = postfilter.parse(lic.postfilter, lic.postfilter_classified)
    assert np.array_equal(out, postfilter.apply(pipeline.reconstruct(lic, vr, q, rounded=False), pf))
    lic.postfilter, lic.postfilter_classified = None, False
    plain = np.asarray(pipeline.decode_bytes(fmt.write(lic), tiny_vr_weights, "cpu").image)
    assert np.array_equal(plain, pipeline.reconstruct(lic, vr, q))
    assert psnr(rgb, out) > psnr(rgb, plain)
    monkeypatch.setattr(pipeline, "POSTFILTER", False)
    off = pipeline.encode_image(Image.fromarray(rgb), vr, quality=8).data
    assert fmt.read(off).postfilter is None and fmt.read(off).tiles == fmt.read(data).tiles


def test_the_filter_spans_tiles_and_a_damaged_block_is_refused(vr, tiny_vr_weights):
    rgb = natural_image(200, 150, seed=6)
    data = pipeline.encode_image(Image.fromarray(rgb), vr, quality=6, tile=128).data
    lic = fmt.read(data)
    assert len(lic.tiles) > 1 and lic.postfilter is not None
    out = np.asarray(pipeline.decode_bytes(data, tiny_vr_weights, "cpu").image)
    lic.postfilter, lic.postfilter_classified = None, False
    plain = np.asarray(pipeline.decode_bytes(fmt.write(lic), tiny_vr_weights, "cpu").image)
    assert psnr(rgb, out) > psnr(rgb, plain)
    lic.postfilter = b"\x09\x08"  # a kernel size no file may use, under a valid CRC
    with pytest.raises(CorruptFileError, match="post-filter block: kernel size 9"):
        pipeline.decode_bytes(fmt.write(lic), tiny_vr_weights, "cpu")


@pytest.mark.parametrize("shape,tile", [((96, 160), None), ((200, 150), 128)])
def test_the_encoder_fits_to_exactly_what_the_decoder_reconstructs(vr, shape, tile, monkeypatch):
    """The encoder takes the reconstruction from its own latent (no entropy decoding); it must be the
    decoder's, bit for bit, one tile or several cross-faded."""
    seen = {}
    real = postfilter.fit

    def spy(original, recon, lam, **kw):
        seen["recon"], seen["lam"] = recon.copy(), lam
        return real(original, recon, lam, **kw)

    monkeypatch.setattr(postfilter, "fit", spy)
    data = pipeline.encode_image(Image.fromarray(natural_image(*shape, seed=7)), vr, quality=3, tile=tile).data
    lic = fmt.read(data)
    assert (len(lic.tiles) > 1) == (tile is not None)
    assert np.array_equal(seen["recon"], pipeline.reconstruct(lic, vr, torch.tensor([3.0]), rounded=False))
    assert seen["lam"] == pytest.approx(float(vr.model.lambda_for(torch.tensor([3.0]))))


def test_no_filter_where_the_memory_budget_has_no_room_for_it(vr):
    """The filter's image-sized buffers count in --max-memory: a budget that holds the tiles and not
    them codes without the filter, and says so."""
    from lalic_codec import memory, tiling

    im = Image.fromarray(natural_image(150, 200, seed=8))
    plan = tiling.tile_plan(150, 200, vr, 128)
    padded = max((tw + l + r) * (th + t + b) for _, _, tw, th in plan
                 for l, r, t, b in [tiling.centred_padding(th, tw, vr.model.pad_multiple, tiling.MIN_CANVAS)])
    tight = memory.memory_needed(padded, 150 * 200, "encode") + 100
    res = pipeline.encode_image(im, vr, quality=6, tile=128, max_memory=tight)
    assert fmt.read(res.data).postfilter is None and any("no post-filter" in n for n in res.notes)
    roomy = pipeline.encode_image(im, vr, quality=6, tile=128, max_memory=tight + memory.POSTFILTER_PER_IMAGE_PIXEL * 150 * 200)
    assert fmt.read(roomy.data).postfilter is not None and not roomy.notes


def test_features_of_every_other_row_are_those_rows_of_all():
    band = np.random.default_rng(3).uniform(0, 255, size=(9, 7, 3))
    for k in (1, 5):
        every = postfilter._features(band, k, k // 2, k // 2)
        assert np.array_equal(postfilter._features(band, k, k // 2, k // 2, step=2), every.reshape(9, 7, -1)[::2].reshape(-1, every.shape[1]))


def test_normal_equations_do_not_depend_on_the_band_height(monkeypatch):
    """Bands of a wide image hold fewer rows (FIT_FEATURE_VALUES); the sums are the same, and they
    are those of the features of the used rows against the error."""
    rng = np.random.default_rng(4)
    recon = rng.uniform(0, 255, size=(23, 11, 3)).astype(np.float32)
    original = np.clip(recon + rng.normal(0, 3, size=recon.shape), 0, 255).astype(np.uint8)
    for step in (1, 3):
        gram, rhs, used, _ = postfilter._normal_equations(original, recon, 5, step)
        feats = postfilter._features(recon.astype(np.float64), 5, 2, 2, step)
        target = (original[::step].astype(np.float64) - recon[::step]).reshape(-1, 3)
        assert used == len(feats) == len(range(0, 23, step)) * 11
        # summed in float32 on centred features: float32's precision of the sums' magnitudes
        close = lambda a, b, scale: np.allclose(a, b, rtol=1e-5, atol=1e-6 * scale.max())  # noqa: E731
        assert close(gram, feats.T @ feats, np.abs(feats).T @ np.abs(feats))
        assert close(rhs, feats.T @ target, np.abs(feats).T @ np.abs(target))
        monkeypatch.setattr(postfilter, "FIT_FEATURE_VALUES", 1)  # one used row a band
        narrow = postfilter._normal_equations(original, recon, 5, step)
        monkeypatch.undo()
        assert np.allclose(narrow[0], gram) and np.allclose(narrow[1], rhs) and narrow[2] == used


def test_compensated_rounding_beats_plain_rounding_where_the_inputs_correlate():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(500, 1)) + 0.05 * rng.normal(size=(500, 8))  # inputs that nearly agree, as colour channels do
    g = a.T @ a
    u = np.linalg.cholesky(np.linalg.inv(g)).T
    w = rng.normal(0, 20, size=(6, 8))
    q = postfilter._round_compensated(w, u)
    assert np.array_equal(q, np.round(q))
    err = lambda v: np.einsum("ri,ij,rj->r", v - w, g, v - w)  # noqa: E731
    assert np.mean(err(q)) < 0.3 * np.mean(err(np.round(w)))
    # without correlations there is nothing to compensate: plain rounding
    d = np.diag(rng.uniform(1, 5, size=8))
    assert np.array_equal(postfilter._round_compensated(w, np.linalg.cholesky(np.linalg.inv(d)).T), np.round(w))


def test_the_fit_rounds_better_than_plain_rounding_at_the_same_precision():
    """At one kernel size and precision, the coefficients the fit writes leave less error on the image
    than the least-squares solution rounded plainly."""
    x, recon = blurred(2)
    pf, report = postfilter.fit(x, recon, lam=1.0, kernel_sizes=(5,), fraction_bits=(6,), classified=False, exact=1)
    assert pf is not None and (pf.k, pf.fraction_bits) == (5, 6)
    gram, rhs, _, _ = postfilter._normal_equations(x, recon, 5, 1)
    g = gram + 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
    q = np.round(np.linalg.solve(g, rhs).T * 64).astype(np.int64)
    plain = postfilter.PostFilter(5, 6, q[:, :-1].reshape(3, 3, -1), q[:, -1])
    sse = lambda f: float(np.sum((x - postfilter.apply(recon, f).astype(np.float64)) ** 2))  # noqa: E731
    assert report[(5, 6)][0] == sse(pf) < sse(plain)


def test_the_fit_rounds_plainly_where_the_inverse_gram_matrix_has_no_cholesky_factor(monkeypatch):
    x, recon = blurred(3)

    def fail(a):
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(postfilter.np.linalg, "cholesky", fail)
    pf, _ = postfilter.fit(x, recon, lam=1.0, kernel_sizes=(3,), fraction_bits=(8,), classified=False)
    gram, rhs, _, _ = postfilter._normal_equations(x, recon, 3, 1)
    g = gram + 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
    q = np.round(np.linalg.solve(g, rhs).T * 256).astype(np.int64)
    assert np.array_equal(pf.coefs, q[:, :-1].reshape(3, 3, -1)) and np.array_equal(pf.bias, q[:, -1])


# ----------------------------------------------------------------------------- the classified filter (FORMAT.md 7.4)


def random_classified(k: int, a: int, d: int, p: int = 8, seed: int = 0) -> postfilter.ClassifiedFilter:
    rng = np.random.default_rng(seed)
    n, t = a * d, len(postfilter.offsets(k))
    enabled = rng.random(n) < 0.7
    enabled[rng.integers(n)] = True
    thresholds = np.cumsum(rng.integers(1, 3000, size=a - 1)) + rng.integers(0, 50)
    coefs = rng.integers(-300, 300, size=(n, 3, 3, t)) * enabled[:, None, None, None]
    bias = rng.integers(-5000, 5000, size=(n, 3)) * enabled[:, None]
    return postfilter.ClassifiedFilter(k, p, thresholds.astype(np.int64), d, coefs, bias, enabled)


def class_oracle(recon: np.ndarray, thresholds, d: int) -> np.ndarray:
    """FORMAT.md 7.4's classes pixel by pixel, in Python integers."""
    h, w, _ = recon.shape
    q = np.clip(np.floor(recon.astype(np.float64) + 0.5), 0, 255).astype(int)
    lum = lambda y, x: int(q[min(max(y, 0), h - 1), min(max(x, 0), w - 1)] @ [1, 2, 1])  # noqa: E731
    steps = {"h": ((0, -1), (0, 1)), "v": ((-1, 0), (1, 0)), "1": ((-1, -1), (1, 1)), "2": ((-1, 1), (1, -1))}
    grad = {n: np.array([[abs(2 * lum(y, x) - lum(y + a[0], x + a[1]) - lum(y + b[0], x + b[1])) for x in range(w)]
                         for y in range(h)]) for n, (a, b) in steps.items()}
    out = np.empty((h, w), dtype=int)
    for y in range(h):
        for x in range(w):
            s = {n: sum(int(g[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)])
                        for dy in range(-2, 3) for dx in range(-2, 3)) for n, g in grad.items()}
            a = sum(1 for t in thresholds if t < s["h"] + s["v"])
            c = 0
            if d == 5:
                if max(s["h"], s["v"]) * min(s["1"], s["2"]) < max(s["1"], s["2"]) * min(s["h"], s["v"]):
                    c = 3 if s["1"] > 2 * s["2"] else 4 if s["2"] > 2 * s["1"] else 0
                else:
                    c = 1 if s["h"] > 2 * s["v"] else 2 if s["v"] > 2 * s["h"] else 0
            out[y, x] = a * d + c
    return out


def classified_oracle(recon: np.ndarray, cf: postfilter.ClassifiedFilter) -> np.ndarray:
    label = class_oracle(recon, cf.thresholds, cf.directions)
    out = np.clip(np.floor(recon + np.float32(0.5)), 0, 255).astype(np.uint8)
    for c in np.flatnonzero(cf.enabled):
        each = oracle(recon, postfilter.PostFilter(cf.k, cf.fraction_bits, cf.coefs[c], cf.bias[c]))
        out[label == c] = each[label == c]
    return out


@pytest.mark.parametrize("k,a,d", [(1, 1, 5), (3, 2, 1), (5, 4, 5), (7, 8, 5)])
def test_classified_bytes_round_trip(k, a, d):
    cf = random_classified(k, a, d, p=11, seed=k + a)
    data = cf.to_bytes()
    back = postfilter.parse(data, classified=True)
    assert (back.k, back.fraction_bits, back.directions, back.classes) == (k, 11, d, a * d)
    assert np.array_equal(back.thresholds, cf.thresholds) and np.array_equal(back.enabled, cf.enabled)
    assert np.array_equal(back.coefs, cf.coefs) and np.array_equal(back.bias, cf.bias)
    assert data[:4] == bytes([k, 11, a, d]) and len(data) <= fmt.MAX_CLASSIFIED_POSTFILTER_BYTES


def test_classified_layout_as_specified():
    coefs = np.zeros((2, 3, 3, 1), dtype=np.int64)
    coefs[1, 0, 0, 0] = -2
    cf = postfilter.ClassifiedFilter(1, 8, np.array([200]), 1, coefs, np.array([[0, 0, 0], [1, 0, 64]]), np.array([False, True]))
    # the head, the threshold (a varint), the mask (class 1 only), then class 1's numbers as in 7.3
    assert cf.to_bytes() == bytes([1, 8, 2, 1, 0xC8, 0x01, 0b10, 3, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0x80, 0x01])


@pytest.mark.parametrize("data,msg", [
    (b"\x05\x08\x01", "shorter than"),
    (b"\x05\x08\x00\x01\x01", "0 activity classes"),
    (b"\x05\x08\x09\x01", "9 activity classes"),
    (b"\x05\x08\x01\x03\x01", "3 direction classes"),
    (b"\x04\x08\x01\x01\x01", "kernel size 4"),
    (b"\x01\x00\x01\x01\x01", "0 fraction bits"),
    (b"\x01\x08\x02\x01", "ends inside a threshold"),
    (b"\x01\x08\x02\x01\x05", "ends inside the class mask"),
    (b"\x01\x08\x01\x01\x00", "no class has a filter"),
    (b"\x01\x08\x01\x01\x02", "beyond the last class"),
    (b"\x01\x08\x01\x01\x01" + bytes(11), "ends inside"),
    (b"\x01\x08\x01\x01\x01" + bytes(13), "1 bytes after"),
    (b"\x01\x08\x01\x01\x01\x80\x80\x04" + bytes(11), "out of range"),
])
def test_malformed_classified_contents_are_refused(data, msg):
    with pytest.raises(ValueError, match=msg):
        postfilter.parse(data, classified=True)


def textured(h: int, w: int, seed: int) -> np.ndarray:
    """Reconstruction-like values: smooth regions, edges in every direction, and fine texture."""
    x = natural_image(h, w, seed=seed).astype(np.float32)
    rng = np.random.default_rng(seed)
    x[h // 3 :, : w // 2] += rng.normal(0, 25, size=(h - h // 3, w // 2, 3)).astype(np.float32)
    x[: h // 2, w // 2 :: 3] += 60
    return np.clip(x, -3, 258)


@pytest.mark.parametrize("d", (1, 5))
def test_classes_match_the_specification(d):
    recon = textured(17, 13, seed=d)
    sums = postfilter.gradient_sums(recon, 0, 17)
    act = sums[0] + sums[1]
    thresholds = np.quantile(act, [0.3, 0.6]).astype(np.int64)
    expected = class_oracle(recon, thresholds, d)
    assert len(np.unique(expected)) >= (5 if d == 5 else 3)  # the test image has every kind of pixel
    assert np.array_equal(postfilter.classes(sums, thresholds, d), expected)
    for y0, y1 in ((0, 3), (3, 4), (4, 15), (15, 17)):  # bands, their windows inside or beyond the image
        band = postfilter.classes(postfilter.gradient_sums(recon, y0, y1), thresholds, d)
        assert np.array_equal(band, expected[y0:y1])


@pytest.mark.parametrize("k,d", [(1, 5), (3, 1), (5, 5), (7, 5)])
def test_classified_apply_matches_the_specification(k, d, monkeypatch):
    monkeypatch.setattr(postfilter, "APPLY_FEATURE_VALUES", 1)  # a row a band: halos inside the image
    recon = textured(13, 9, seed=k)
    sums = postfilter.gradient_sums(recon, 0, 13)
    cf = random_classified(k, 3, d, seed=k)
    cf.thresholds = np.quantile(sums[0] + sums[1], [0.3, 0.6]).astype(np.int64)
    assert np.array_equal(postfilter.apply(recon, cf), classified_oracle(recon, cf))


def texture_dependent_error():
    """(image, reconstruction) whose error differs between smooth and busy neighbourhoods: a colour
    shift in one, a blur in the other."""
    x = textured(96, 128, seed=9).clip(0, 255).astype(np.uint8)
    sums = postfilter.gradient_sums(x.astype(np.float32), 0, 96)
    busy = (sums[0] + sums[1]) > np.median(sums[0] + sums[1])
    soft = np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(0.8))).astype(np.float32)
    recon = np.where(busy[..., None], soft, x.astype(np.float32) + np.float32([4, -3, 2]))
    return x, recon


def test_the_fit_classifies_where_the_error_depends_on_the_texture():
    """An error that differs between smooth and busy neighbourhoods (a colour shift in one, a blur
    in the other): one filter cannot undo both, one per class can."""
    x, recon = texture_dependent_error()
    plain, plain_report = postfilter.fit(x, recon, lam=0.01, classified=False, exact=1)
    cf, report = postfilter.fit(x, recon, lam=0.01, exact=1)
    assert isinstance(cf, postfilter.ClassifiedFilter) and cf.classes > 1
    key = ("classified", len(cf.thresholds) + 1, cf.directions, cf.fraction_bits)
    sse, nbytes = report[key]
    assert nbytes == len(cf.to_bytes()) + 8
    assert sse == pytest.approx(np.sum((x - postfilter.apply(recon, cf).astype(np.float64)) ** 2))
    gain = lambda r, k: 0.01 * (r["none"] - r[k][0]) / 3 - 8 * r[k][1]  # noqa: E731
    assert gain(report, key) > gain(plain_report, (plain.k, plain.fraction_bits)) > 0
    assert psnr(x, postfilter.apply(recon, cf)) > psnr(x, postfilter.apply(recon, plain)) + 0.5
    # the best plain filter was judged too, and lost
    assert (plain.k, plain.fraction_bits) in report
    # the encoder's default trusts the estimate from the normal equations (exact but for the
    # output's rounding and clamping), and chooses the same filter without applying any
    chosen, estimated = postfilter.fit(x, recon, lam=0.01)
    assert chosen.to_bytes() == cf.to_bytes() and list(estimated) == [key]
    assert estimated[key] == (None, nbytes)


@pytest.mark.parametrize("k", [3, 5])
def test_the_fit_tries_each_class_kernel_size(monkeypatch, k):
    x, recon = texture_dependent_error()
    monkeypatch.setattr(postfilter, "ENCODER_CLASS_KERNELS", (k,))
    cf, report = postfilter.fit(x, recon, lam=0.01, kernel_sizes=(1,), exact=1)
    assert isinstance(cf, postfilter.ClassifiedFilter) and cf.k == k
    sse, nbytes = report[("classified", len(cf.thresholds) + 1, cf.directions, cf.fraction_bits)]
    assert sse == pytest.approx(np.sum((x - postfilter.apply(recon, cf).astype(np.float64)) ** 2))
    assert 0.01 * (report["none"] - sse) / 3 > 8 * nbytes


def test_classified_container_flag():
    cf = random_classified(5, 2, 5, seed=3)
    f = sample(cf.to_bytes())
    f.postfilter_classified = True
    data = fmt.write(f)
    head = 51 + len("default-v9")
    assert data[head - 9] == fmt.FLAG_POSTFILTER | fmt.FLAG_CLASSIFIED_POSTFILTER
    assert fmt.read(data) == f
    info = fmt.read_info(data)
    assert info["postfilter"]["classes"] == 10
    assert "post-filter: 5x5, 10 classes" in fmt.info_lines(info, "x.lic")
    # a block over 1024 bytes is allowed only when classified (the flag alone: test_container.py)
    big = fmt.LicFile(f.header, tiles=f.tiles, postfilter=bytes(5000), postfilter_classified=True)
    assert fmt.read(fmt.write(big)).postfilter == bytes(5000)
    big.postfilter_classified = False
    with pytest.raises(ValueError, match="1..1024 bytes"):
        fmt.write(big)
    with pytest.raises(ValueError, match="without a post-filter block"):
        fmt.write(fmt.LicFile(f.header, tiles=f.tiles, postfilter_classified=True))


def test_a_file_with_a_classified_filter_decodes_through_it(vr, tiny_vr_weights, monkeypatch):
    """The encoder's classified choice travels in the file (flag bit 4) and the decoder applies it."""
    monkeypatch.setattr(postfilter, "ENCODER_KERNEL_SIZES", ())  # no plain filter to choose
    rgb = natural_image(96, 160, seed=5)
    data = pipeline.encode_image(Image.fromarray(rgb), vr, quality=8).data
    lic = fmt.read(data)
    assert lic.postfilter is not None and lic.postfilter_classified
    cf = postfilter.parse(lic.postfilter, classified=True)
    out = np.asarray(pipeline.decode_bytes(data, tiny_vr_weights, "cpu").image)
    recon = pipeline.reconstruct(lic, vr, torch.tensor([8.0]), rounded=False)
    assert np.array_equal(out, postfilter.apply(recon, cf))
    assert psnr(rgb, out) > psnr(rgb, pipeline.reconstruct(lic, vr, torch.tensor([8.0])))
    lic.postfilter = cf.to_bytes()[:-1]  # damaged under a valid CRC
    with pytest.raises(CorruptFileError, match="post-filter block: ends inside"):
        pipeline.decode_bytes(fmt.write(lic), tiny_vr_weights, "cpu")
