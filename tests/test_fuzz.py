"""Fuzzing the reader and the decoder, limits before allocation, and single-bit flips.

Whatever bytes arrive, ``codec info`` (``read_info``) and ``codec decode`` (``read`` then
``decode_bytes``) produce the image the header declares or raise a CodecError with a one-line
message: never another exception, never a hang, never a runaway allocation
(``tests/fuzz.py``, ``check_case``).  Bounded here (about two minutes on one core); longer runs:
``python tests/fuzz.py --seconds 1800``.
"""

import io
import random
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import fuzz
from conftest import natural_image
from lalic_codec import imaging, loading, pipeline
from lalic_codec.cli import main
from lalic_codec.errors import (
    BadInputError,
    CodecError,
    CorruptFileError,
    DeviceMismatchError,
    LimitExceededError,
)
from lalic_codec.formats import container as fmt

FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def corpus(tiny_vr_weights, tiny_lalic_weights):
    weights = {"vr": tiny_vr_weights, "lalic": tiny_lalic_weights}
    seeds = fuzz.make_seeds(weights)
    return weights, seeds


def lics(corpus):
    return [s for s in corpus[1] if s.kind == "lic"]


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if the network is asked to decode anything."""

    def refuse(*a, **k):
        raise AssertionError("the model was asked to decode")

    from lalic_codec.models.lalic import LALIC

    monkeypatch.setattr(LALIC, "decompress", refuse)


# ------------------------------------------------------------------------------------------------
# the seeds themselves, and truncations


def test_the_raw_view_reads_and_writes_both_versions(corpus):
    """parse_raw/pack_raw and crc_layout, the structured mutators' ground, on files of both layouts:
    the same bytes back, every CRC where crc_layout says, and a version change converts a file."""
    for seed in lics(corpus)[:6]:
        f = fmt.read(seed.data)
        for version in (1, 2):
            data = fmt.write(f, version=version)
            r = fuzz.parse_raw(data)
            assert r.version == version and fuzz.pack_raw(r) == data
            layout = fuzz.crc_layout(data)
            assert len(layout) == 1 + len(r.blocks) + len(r.tiles) * (2 if version == 2 else 1 + r.spt)
            for at, a, b in layout:
                assert struct.unpack_from("<I", data, at)[0] == zlib.crc32(data[a:b])
            r.version = 3 - version
            assert fuzz.pack_raw(r) == fmt.write(f, version=3 - version)


def test_every_seed_decodes_to_its_declared_size(corpus):
    weights, seeds = corpus
    for s in seeds:
        if s.kind == "lic":
            assert fuzz.check_case(s.data, weights[s.model]) == "decoded", s.name
        else:
            assert fuzz.check_image_case(s.data) == "prepared", s.name


def test_truncation_at_every_offset(corpus):
    weights, _ = corpus
    for s in lics(corpus):
        for n in range(len(s.data)):
            out = fuzz.check_case(s.data[:n], weights[s.model])
            assert out == ("NotALicFileError" if n == 0 else "TruncatedFileError"), (s.name, n, out)


# ------------------------------------------------------------------------------------------------
# hypothesis: mutations of valid files (the mutators of tests/fuzz.py, driven by hypothesis)


@settings(FUZZ, max_examples=14000)
@given(rnd=st.randoms(use_true_random=False), mutator=st.sampled_from(sorted(fuzz.MUTATORS)))
def test_fuzz_mutated_files(corpus, rnd, mutator):
    weights, seeds = corpus
    data, seed, _ = fuzz.generate(rnd, seeds, mutator)
    fuzz.check_any(data, seed, weights, seconds=10)


@settings(FUZZ, max_examples=1000)
@given(data=st.binary(max_size=3000), prefix=st.sampled_from([b"", fmt.MAGIC, fmt.MAGIC + b"\x01\x00"]))
def test_fuzz_random_data(corpus, data, prefix):
    fuzz.check_case(prefix + data, corpus[0]["vr"])


U32 = st.one_of(st.sampled_from(fuzz.INTERESTING_U32), st.integers(0, 2**32 - 1))
U16 = st.one_of(st.sampled_from(fuzz.INTERESTING_U16), st.integers(0, 2**16 - 1))


@settings(FUZZ, max_examples=3000)
@given(
    i=st.integers(0, 100),
    width=st.one_of(st.none(), U32),
    height=st.one_of(st.none(), U32),
    n_tiles=st.one_of(st.none(), U16),
    spt=st.one_of(st.none(), U16),
    mode=st.one_of(st.none(), st.integers(0, 255)),
    bit_depth=st.one_of(st.none(), st.sampled_from([0, 1, 8, 16, 255])),
    flags=st.one_of(st.none(), st.integers(0, 255)),
    device_class=st.one_of(st.none(), st.integers(0, 255)),
    quality=st.one_of(st.none(), st.floats(width=32), st.sampled_from(fuzz.INTERESTING_QUALITY)),
)
def test_fuzz_absurd_header_values_behind_a_valid_crc(corpus, i, **fields):
    weights = corpus[0]
    seeds = lics(corpus)
    seed = seeds[i % len(seeds)]
    r = fuzz.parse_raw(seed.data)
    quality = fields.pop("quality")
    if quality is not None:
        r.set_quality(quality)
    for k, v in fields.items():
        if v is not None:
            setattr(r, k, v)
    fuzz.check_case(fuzz.pack_raw(r), weights[seed.model])


@settings(FUZZ, max_examples=2500)
@given(i=st.integers(0, 100), t=st.integers(0, 10), xywh=st.tuples(U32, U32, U32, U32), pads=st.tuples(U16, U16, U16, U16),
       which=st.sets(st.integers(0, 7), min_size=1))
def test_fuzz_tile_geometry_behind_a_valid_crc(corpus, i, t, xywh, pads, which):
    weights = corpus[0]
    seeds = lics(corpus)
    seed = seeds[i % len(seeds)]
    r = fuzz.parse_raw(seed.data)
    tile = r.tiles[t % len(r.tiles)]
    values = list(xywh) + list(pads)
    for k in which:
        tile.geometry[k] = values[k]
    fuzz.check_case(fuzz.pack_raw(r), weights[seed.model])


def test_fuzzing_keeps_memory_bounded(corpus):
    """Many structured cases (huge declared sizes among them): max RSS barely moves."""
    weights, seeds = corpus
    rng = random.Random(11)
    for _ in range(30):  # warm up allocator pools
        data, seed, _ = fuzz.generate(rng, seeds, "structured")
        fuzz.check_any(data, seed, weights)
    before = fuzz.max_rss_mib()
    for _ in range(400):
        data, seed, _ = fuzz.generate(rng, seeds, "structured")
        fuzz.check_any(data, seed, weights)
    assert fuzz.max_rss_mib() - before < 200


def test_the_harness_runs_and_counts(tmp_path):
    rep = fuzz.run_harness(None, 40, 3, tmp_path / "art", 20.0, 256.0, True, tmp_path / "work", quiet=True)
    assert rep.cases == 40 and not rep.failures
    assert sum(rep.outcomes.values()) == 40 and len(rep.outcomes) >= 3


# ------------------------------------------------------------------------------------------------
# regressions: failures the fuzzer found


def test_tiles_spanning_the_whole_width_or_height_decode(corpus):
    """tile_weights returned a scalar for an axis with no inner edge: every multi-tile image
    whose tiles span the whole width or height crashed the decoder (IndexError)."""
    lm = loading.load_model("x", corpus[0]["vr"], "cpu")
    for h, w in ((1, 400), (300, 40), (70, 260)):
        rgb = natural_image(h, w, seed=h + w)
        res = pipeline.encode_image(Image.fromarray(rgb), lm, 4.0, tile=192)
        assert len(fmt.read(res.data).tiles) > 1
        dec = pipeline.decode_bytes(res.data, corpus[0]["vr"], "cpu")
        assert dec.image.size == (w, h)
        assert imaging.psnr(rgb, np.asarray(dec.image)) > 5  # a picture, not garbage or zeros


def test_quality_outside_the_models_range_is_corruption(corpus, no_model_work):
    """A valid header with quality 9 (or -1, 1e30) raised ValueError inside the model."""
    weights, seeds = corpus
    r = fuzz.parse_raw(seeds[1].data)
    for q in (9.0, 0.5, -1.0, 1e30, 8.0001):
        r.set_quality(q)
        with pytest.raises(CorruptFileError, match="quality .* outside the model's range 1..8"):
            pipeline.decode_bytes(fuzz.pack_raw(r), weights["vr"], "cpu")


def test_unknown_device_class_with_a_damaged_stream(corpus):
    """The desynchronisation message looked the device class up in an enum: ValueError for 7."""
    weights, seeds = corpus
    r = fuzz.parse_raw(seeds[1].data)
    r.device_class = 7
    r.tiles[0].streams[0] = fuzz.RawStream(bytes(len(r.tiles[0].streams[0].body)))
    with pytest.raises(DeviceMismatchError, match="unknown device class 7"):
        pipeline.decode_bytes(fuzz.pack_raw(r), weights["vr"], "cpu")


def test_malformed_tiff_tags_do_not_stop_the_encoder(corpus):
    """Found by the long fuzz run: a TIFF whose StripOffsets tag has type BYTE loads, but Pillow's
    EXIF export of its tags raised struct.error in prepare_image ("internal error", exit 1)."""
    data = bytearray(next(s for s in corpus[1] if s.name == "tiff").data)
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets: LONG -> BYTE
            data[at + 2 : at + 4] = struct.pack("<H", 1)
    im = imaging.open_image(bytes(data))
    with pytest.raises(struct.error):
        im.getexif().tobytes()
    prep = imaging.prepare_image(im)
    assert prep.rgb.shape == (24, 32, 3) and "EXIF could not be read and was left out" in prep.notes


# ------------------------------------------------------------------------------------------------
# limits before allocation


def raw_of(corpus, name):
    return next(fuzz.parse_raw(s.data) for s in corpus[1] if s.name == name)


def test_huge_declared_size_is_refused_before_any_model_work(corpus, monkeypatch, tmp_path):
    r = raw_of(corpus, "rgb-16x23-q8")
    r.width = r.height = 60000
    data = fuzz.pack_raw(r)
    assert fmt.read_header_from_file(io.BytesIO(data[:200]), fmt.Limits(max_pixels=2**32)).width == 60000  # CRC valid

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_model", no_model)
    with pytest.raises(LimitExceededError, match=r"60000x60000 = 3600000000 pixels, more than the limit of 268435456"):
        pipeline.decode_bytes(data, corpus[0]["vr"], "cpu")
    (tmp_path / "huge.lic").write_bytes(data)
    for args in (["decode", tmp_path / "huge.lic", tmp_path / "o.png", "--weights", corpus[0]["vr"]], ["info", tmp_path / "huge.lic"]):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == 3 and "more than the limit" in res.output, res.output
    assert not (tmp_path / "o.png").exists()


def test_max_pixels_option_is_passed_through(corpus, tmp_path):
    s = next(s for s in corpus[1] if s.name == "rgb-41x70-metadata")  # 2870 pixels
    (tmp_path / "a.lic").write_bytes(s.data)
    w = str(corpus[0]["vr"])
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    r = run("decode", tmp_path / "a.lic", tmp_path / "a.png", "--weights", w, "--max-pixels", 2869)
    assert r.exit_code == 3 and "41 = 2870 pixels, more than the limit of 2869" in r.output
    assert run("info", tmp_path / "a.lic", "--max-pixels", 2869).exit_code == 3
    assert run("decode", tmp_path / "a.lic", tmp_path / "a.png", "--weights", w, "--max-pixels", 2870 * 64).exit_code == 0
    Image.fromarray(natural_image(50, 60)).save(tmp_path / "in.png")
    r = run("encode", tmp_path / "in.png", tmp_path / "b.lic", "--weights", w, "--max-pixels", 2999)
    assert r.exit_code == 3 and "more than the limit of 2999 pixels" in r.output
    assert not (tmp_path / "b.lic").exists()
    assert run("encode", tmp_path / "in.png", tmp_path / "b.lic", "--weights", w, "--max-pixels", 3000).exit_code == 0
    assert run("encode", tmp_path / "in.png", tmp_path / "c.lic", "--max-pixels", 0).exit_code == 2


def test_every_declared_length_is_checked_before_allocation(corpus):
    """Stream, metadata and alpha lengths larger than the file or the limits: refused, cheaply."""
    weights = corpus[0]
    before = fuzz.max_rss_mib()
    for length in (2**31, 2**32 - 1, 2**30 + 1, 10**6):
        r = raw_of(corpus, "rgba-33x47")
        r.tiles[0].streams[-1].length = length
        with pytest.raises((LimitExceededError, CorruptFileError)):
            pipeline.decode_bytes(fuzz.pack_raw(r), weights["vr"], "cpu")
        r = raw_of(corpus, "rgba-33x47")
        r.blocks[fuzz.block_index(r, fmt.FLAG_ALPHA)].length = length
        with pytest.raises((LimitExceededError, CorruptFileError)):
            pipeline.decode_bytes(fuzz.pack_raw(r), weights["vr"], "cpu")
    r = raw_of(corpus, "rgb-41x70-metadata")
    r.blocks[0] = fuzz.RawStream(fuzz._zstd(b"\0" * 100, declared=2**40))  # metadata bomb
    with pytest.raises(LimitExceededError, match="metadata block: declares 1099511627776 uncompressed bytes"):
        pipeline.decode_bytes(fuzz.pack_raw(r), weights["vr"], "cpu")
    r = raw_of(corpus, "rgba-33x47")
    r.blocks[fuzz.block_index(r, fmt.FLAG_ALPHA)] = fuzz.RawStream(fuzz._zstd(b"\0" * 100, declared=33 * 47))  # lies about its content
    with pytest.raises(CorruptFileError, match="alpha block"):
        pipeline.decode_bytes(fuzz.pack_raw(r), weights["vr"], "cpu")
    assert fuzz.max_rss_mib() - before < 50


def tiled(corpus):
    return raw_of(corpus, "rgba-200x260-4-tiles-unmerged")


@pytest.mark.parametrize("change, match", [
    (lambda r: setattr(r, "spt", 3) or [setattr(t, "streams", t.streams[:3]) for t in r.tiles], "3 streams per tile; model"),
    # one stream a tile without the merged flag, and the flag with more than one stream a tile
    (lambda r: setattr(r, "spt", 1) or [setattr(t, "streams", t.streams[:1]) for t in r.tiles], "1 streams per tile; model"),
    (lambda r: setattr(r, "flags", r.flags | fmt.FLAG_MERGED_STREAMS), r"merged streams \(flags bit 3\) but 9 streams per tile"),
    (lambda r: r.tiles[1].geometry.__setitem__(4, 1), "tile 1 at .*: padded size 129x128 is not a multiple of 64"),
    (lambda r: r.tiles[3].geometry.__setitem__(2, 64), r"do not cover the whole image \(pixel \(196, 128\) is in none\)"),
    (lambda r: r.tiles.pop() and setattr(r, "n_tiles", 3), "do not cover the whole image"),
    (lambda r: r.tiles.extend([r.tiles[0]] * 60) or setattr(r, "n_tiles", 64), "more than 8 times the 260x200 image"),
    (lambda r: setattr(r, "tiles", [fuzz.RawTile([x, y, 1, 1, 31, 32, 31, 32], r.tiles[0].streams) for y in range(200) for x in range(0, 260, 13)][:400]) or setattr(r, "n_tiles", 400),
     "more than 8 times"),
])
def test_tile_layout_is_checked_before_any_model_work(corpus, no_model_work, change, match):
    r = tiled(corpus)
    change(r)
    with pytest.raises(CorruptFileError, match=match):
        pipeline.decode_bytes(fuzz.pack_raw(r), corpus[0]["vr"], "cpu", fuzz.FUZZ_LIMITS)


def test_irregular_tile_layouts_are_refused(corpus, no_model_work, monkeypatch):
    r = tiled(corpus)
    monkeypatch.setattr(pipeline, "MAX_TILE_GRID_CELLS", 15)  # this 2 x 2 grid has 4 x 4 edges
    with pytest.raises(CorruptFileError, match="regular layout"):
        pipeline.decode_bytes(fuzz.pack_raw(r), corpus[0]["vr"], "cpu")


def test_padded_tile_limit(corpus):
    r = raw_of(corpus, "rgb-16x23-q8")
    r.tiles[0].geometry[4:8] = [1024, 1025, 1024, 1024]  # 2072 x 2064 padded: more than 2048 x 2048
    with pytest.raises(LimitExceededError, match="padded size 2072x2064 is more than the limit of 4194304 pixels"):
        fmt.read(fuzz.pack_raw(r))
    assert fmt.read(fuzz.pack_raw(r), fmt.Limits(max_tile_pixels=2**23)).tiles[0].pad == (1024, 1025, 1024, 1024)


def test_encoder_refuses_tiles_over_the_limit_before_coding(corpus, no_model_work, monkeypatch):
    lm = loading.load_model("x", corpus[0]["vr"], "cpu")
    monkeypatch.setattr(type(lm.model), "compress", lambda *a, **k: (_ for _ in ()).throw(AssertionError("coded")))
    im = Image.new("RGB", (4096, 1100))
    with pytest.raises(LimitExceededError, match="use a smaller --tile"):
        pipeline.encode_image(im, lm, 4.0, tile=4096)


# ------------------------------------------------------------------------------------------------
# input images: decompression bombs and formats


def _png_with_size(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def _jpeg_with_size(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    b = bytearray(buf.getvalue())
    sof = b.index(b"\xff\xc0")
    b[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(b)


def _gif_with_size(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, format="GIF")
    b = bytearray(buf.getvalue())
    b[6:10] = struct.pack("<HH", w, h)  # logical screen
    pos = 13 + (3 << ((b[10] & 7) + 1) if b[10] & 0x80 else 0)  # after the global colour table
    while b[pos] == 0x21:  # extension blocks: label, then sub-blocks up to a zero length
        pos += 2
        while b[pos]:
            pos += b[pos] + 1
        pos += 1
    assert b[pos] == 0x2C  # image descriptor: left, top, width, height
    b[pos + 5 : pos + 9] = struct.pack("<HH", w, h)
    return bytes(b)


@pytest.mark.parametrize("make", [_png_with_size, _jpeg_with_size, _gif_with_size], ids=["png", "jpeg", "gif"])
def test_decompression_bombs_are_refused_before_decoding(make, tmp_path, tiny_vr_weights):
    before = fuzz.max_rss_mib()
    for w, h in ((65000, 65000), (20000, 20000), (16385, 16384)):  # 2**28 + 16384 pixels: just over
        with pytest.raises(LimitExceededError, match="more than the limit|too large"):
            imaging.open_image(make(w, h))
    with pytest.raises(LimitExceededError):
        imaging.open_image(make(100, 100), max_pixels=9999)
    assert fuzz.max_rss_mib() - before < 50
    p = tmp_path / "bomb.img"
    p.write_bytes(make(60000, 60000))
    r = CliRunner().invoke(main, ["encode", str(p), str(tmp_path / "o.lic"), "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 3 and len(r.output.strip().splitlines()) == 1 and "limit" in r.output
    assert not (tmp_path / "o.lic").exists()


def test_only_plain_image_formats_are_opened():
    """Pillow identifies files by content: an EPS named photo.png would start Ghostscript."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(BadInputError, match="not a readable image"):
        imaging.open_image(eps)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PCX")
    with pytest.raises(BadInputError):
        imaging.open_image(buf.getvalue())


@settings(FUZZ, max_examples=1000)
@given(rnd=st.randoms(use_true_random=False), mutator=st.sampled_from(fuzz.IMAGE_MUTATORS))
def test_fuzz_input_images(corpus, rnd, mutator):
    images = [s for s in corpus[1] if s.kind == "image"]
    seed = rnd.choice(images)
    data = fuzz.MUTATORS[mutator][0](rnd, seed, images)
    fuzz.check_image_case(data)


# ------------------------------------------------------------------------------------------------
# corruption: single-bit flips are detected, never decoded to another image


def test_single_bit_flips_are_detected(corpus):
    weights = corpus[0]
    seeds = lics(corpus)
    refs = {s.name: fuzz.reference_png(s.data, weights[s.model]) for s in seeds}
    rng = random.Random(5)
    outcomes = {}
    for _ in range(300):
        s = rng.choice(seeds)
        bit = rng.randrange(8 * len(s.data))
        b = bytearray(s.data)
        b[bit // 8] ^= 1 << (bit % 8)
        out = fuzz.flip_outcome(bytes(b), weights[s.model], refs[s.name])
        assert out.startswith("detected") or out == "decoded identically", (s.name, bit, out)
        outcomes[out] = outcomes.get(out, 0) + 1
    assert sum(v for k, v in outcomes.items() if k.startswith("detected: CRC")) > 200


def test_flips_in_the_magic_and_version_are_reported_as_corruption(corpus, tmp_path):
    """The magic and version are checked before the header CRC (another version may lay out its
    header differently), but a bit flip there leaves a header whose CRC matches a supported version."""
    data = lics(corpus)[3].data
    for bit in range(8 * 10):
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        expected = fmt.DamagedMagicError if bit < 64 else fmt.DamagedVersionError
        with pytest.raises(expected, match="file is corrupt") as err:
            fmt.read(bytes(b))
        assert err.value.exit_code == 4 and isinstance(err.value, CorruptFileError)
    (tmp_path / "a.lic").write_bytes(bytes([data[0] & 0x7F]) + data[1:])
    r = CliRunner().invoke(main, ["info", str(tmp_path / "a.lic")])
    assert r.exit_code == 4 and "high bit of byte 0 was cleared" in r.output
    other = bytearray(data)
    other[8:10] = struct.pack("<H", 4)
    other[fuzz.crc_layout(data)[0][0]] ^= 1  # a "version 4" header whose CRC matches neither 1 nor 2
    with pytest.raises(fmt.UnsupportedVersionError, match="version 4") as err:
        fmt.read(bytes(other))
    assert type(err.value) is fmt.UnsupportedVersionError


def test_fuzz_errors_are_codec_errors_with_one_line():
    """The oracle itself: a non-CodecError, or a multi-line message, is a failure."""
    with pytest.raises(fuzz.FuzzFailure, match="crash"):
        fuzz._check_error(ValueError("x"), "t")
    with pytest.raises(fuzz.FuzzFailure, match="crash"):
        fuzz._check_error(CodecError("bare"), "t")
    with pytest.raises(fuzz.FuzzFailure, match="bad-message"):
        fuzz._check_error(CorruptFileError("two\nlines"), "t")
    assert fuzz._check_error(CorruptFileError("fine"), "t") == "CorruptFileError"
