"""The Python API (lalic_codec.encode/decode/info/Codec): inputs, fidelity, errors, caching,
laziness.  The README's Python examples are run by test_readme.py."""

import io
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lalic_codec
from conftest import natural_image
from lalic_codec import imaging, loading, pipeline
from lalic_codec.errors import (
    BadInputError,
    CorruptFileError,
    MissingWeightsError,
    NotALicFileError,
    WeightsMismatchError,
)
from lalic_codec.formats import container as fmt

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def W(tiny_vr_weights):
    return tiny_vr_weights


def enc(image, W, **kw):
    return lalic_codec.encode(image, weights=W, device="cpu", **kw)


def dec(data, W):
    return lalic_codec.decode(data, weights=W, device="cpu")


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG (Pillow cannot write 16-bit colour): a is (H, W, C) uint16, C in 1..4."""
    h, w, c = a.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------
# inputs and outputs


def test_every_input_kind_gives_the_same_file(W, tmp_path):
    im = Image.fromarray(natural_image(37, 53))
    path = tmp_path / "a.png"
    im.save(path)
    ref = enc(im, W, quality=3)
    assert ref[:8] == fmt.MAGIC
    for source in (str(path), path, path.read_bytes(), bytearray(path.read_bytes()), io.BytesIO(path.read_bytes()), np.asarray(im)):
        assert enc(source, W, quality=3) == ref, type(source)
    lic = tmp_path / "a.lic"
    lic.write_bytes(ref)
    out = dec(ref, W)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (53, 37)
    for data in (bytearray(ref), memoryview(ref), str(lic), lic, io.BytesIO(ref)):
        assert np.array_equal(np.asarray(dec(data, W)), np.asarray(out)), type(data)
    # what the pipeline (and so the command line) decodes
    assert np.array_equal(np.asarray(out), np.asarray(pipeline.decode_bytes(ref, W, "cpu").image))


@pytest.mark.parametrize(
    "shape,mode",
    [((20, 30), "L"), ((20, 30, 1), "L"), ((20, 30, 2), "LA"), ((20, 30, 3), "RGB"), ((20, 30, 4), "RGBA")],
)
def test_numpy_uint8_arrays_keep_their_mode_and_alpha(W, shape, mode):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = dec(enc(a, W), W)
    assert out.mode == mode and out.size == (30, 20)
    if mode in ("LA", "RGBA"):  # alpha is kept losslessly
        assert np.array_equal(np.asarray(out)[..., -1], a[..., -1])


@pytest.mark.filterwarnings("ignore::lalic_codec.api.CodecWarning")
def test_numpy_views_and_byte_orders(W):
    a = natural_image(24, 40)
    ref = enc(np.ascontiguousarray(a[:, ::-1]), W)
    assert enc(a[:, ::-1], W) == ref  # a non-contiguous view
    g16 = (natural_image(24, 40)[..., 0].astype(np.uint16) * 257)
    assert enc(g16.astype(">u2"), W) == enc(g16, W)


@pytest.mark.filterwarnings("ignore::lalic_codec.api.CodecWarning")
def test_sixteen_bit_grayscale_round_trips_as_16_bit_at_8_bit_precision(W, tmp_path):
    g8 = natural_image(31, 45)[..., 1]
    g16 = g8.astype(np.uint16) * 257 + 100  # not multiples of 257: precision is 8 bits
    with pytest.warns(lalic_codec.CodecWarning, match="16-bit"):
        data = enc(g16, W)
    h = fmt.read(data).header
    assert (h.colour_mode, h.bit_depth) == (fmt.ColourMode.L, 16)
    out = dec(data, W)
    assert out.mode == "I;16"
    a = np.asarray(out)
    assert a.dtype == np.uint16 and not (a % 257).any()
    # the same samples as an 8-bit decode, scaled (codec decode writes the 16-bit image)
    assert pipeline.decode_bytes(data, W, "cpu").image.mode == "I;16"
    eight = pipeline.decode_bytes(data, W, "cpu", high_bit_depth=False).image
    assert eight.mode == "L" and np.array_equal(a // 257, np.asarray(eight))
    # the same as coding the 8-bit image: 16 bits are rounded to 8 before coding
    assert np.array_equal(a // 257, np.asarray(dec(enc(np.round(g16 / 257).astype(np.uint8), W), W)))
    # a 16-bit PNG goes back to a 16-bit PNG; 8-bit formats get it scaled, not clipped
    src = tmp_path / "g16.png"
    Image.fromarray(g16).save(src)
    out = dec(enc(src, W), W)
    buf = io.BytesIO()
    imaging.save_image(out, buf, "PNG")
    back = Image.open(io.BytesIO(buf.getvalue()))
    assert back.mode == "I;16" and np.array_equal(np.asarray(back), np.asarray(out))
    buf = io.BytesIO()
    imaging.save_image(out, buf, "BMP")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), np.asarray(out) // 257)


@pytest.mark.filterwarnings("ignore:floating-point image coded:lalic_codec.api.CodecWarning")
def test_floating_point_images_keep_their_scale(W, tmp_path):
    """Mode "F" (float TIFFs) comes normalised to [0, 1] or on an 8- or 16-bit scale; each is
    coded as the same 8-bit picture, not clipped to white.  Out-of-range samples are stretched."""
    g8 = natural_image(20, 28)[..., 0]
    ref = enc(g8, W)
    for scale in (1 / 255, 1.0, 257.0):
        im = Image.fromarray((g8 * scale).astype(np.float32))
        assert im.mode == "F"
        with pytest.warns(lalic_codec.CodecWarning, match="floating-point image"):
            data = enc(im, W)
        assert fmt.read(data).tiles == fmt.read(ref).tiles, scale
    # through a float TIFF file, as codec encode reads it
    src = tmp_path / "f.tif"
    Image.fromarray(g8.astype(np.float32)).save(src)
    with pytest.warns(lalic_codec.CodecWarning, match="floating-point image"):
        assert fmt.read(enc(src, W)).tiles == fmt.read(ref).tiles
    # negative samples: stretched to the full range, with a note
    signed = g8.astype(np.float32) * 2 - 300
    lo, hi = float(signed.min()), float(signed.max())
    stretched = np.round((signed - lo) / (hi - lo) * 255).astype(np.uint8)
    with pytest.warns(lalic_codec.CodecWarning, match="stretched"):
        data = enc(Image.fromarray(signed), W)
    assert fmt.read(data).tiles == fmt.read(enc(stretched, W)).tiles
    # NaN becomes 0, with a note
    holed = (g8 / 255).astype(np.float32)
    holed[3, 4] = np.nan
    with pytest.warns(lalic_codec.CodecWarning, match="NaN"):
        data = enc(Image.fromarray(holed), W)
    zeroed = g8.copy()
    zeroed[3, 4] = 0
    assert fmt.read(data).tiles == fmt.read(enc(zeroed, W)).tiles


def test_sixteen_bit_colour_is_coded_and_decoded_at_8_bits(W):
    rng = np.random.default_rng(2)
    rgb16 = rng.integers(0, 65536, size=(16, 24, 3), dtype=np.uint16)
    # arrays: rounded to 8 bits, with a warning; the file records 8 bits
    with pytest.warns(lalic_codec.CodecWarning, match="16-bit colour"):
        data = enc(rgb16, W)
    assert fmt.read(data).header.bit_depth == 8
    assert data == enc(((rgb16.astype(np.uint32) + 128) // 257).astype(np.uint8), W)
    assert dec(data, W).mode == "RGB"
    # 48-bit PNGs: Pillow reads them as 8-bit RGB (the high byte of each sample)
    png = png16(rgb16)
    assert Image.open(io.BytesIO(png)).mode == "RGB"
    data = enc(png, W)
    assert fmt.read(data).header.bit_depth == 8
    assert data == enc((rgb16 >> 8).astype(np.uint8), W)
    # 64-bit RGBA PNGs likewise, alpha kept (at 8 bits)
    rgba16 = np.concatenate([rgb16, rng.integers(0, 65536, size=(16, 24, 1), dtype=np.uint16)], axis=-1)
    out = dec(enc(png16(rgba16), W), W)
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out)[..., 3], rgba16[..., 3] >> 8)


def test_grayscale_and_palette_come_back_as_such(W):
    g = Image.fromarray(natural_image(20, 28)[..., 0])
    assert dec(enc(g, W), W).mode == "L"
    p = Image.fromarray(natural_image(20, 28)).quantize(12)
    out = dec(enc(p, W), W)
    assert out.mode == "P" and out.getpalette()[:36] == p.getpalette()[:36]


# ------------------------------------------------------------------------------------------------
# metadata


XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/" '
    b'tiff:Orientation="6" dc:format="image/png"/></rdf:RDF></x:xmpmeta>'
)


def test_icc_exif_xmp_and_orientation(W, tmp_path):
    rgb = natural_image(30, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    exif[0x010F] = "lalic-test-camera"
    icc = b"fake-icc-profile" * 20
    src = tmp_path / "src.png"
    Image.fromarray(rgb).save(src, exif=exif.tobytes(), icc_profile=icc, pnginfo=_xmp_pnginfo(XMP))
    assert Image.open(src).info["xmp"] == XMP

    data = enc(src, W)
    out = dec(data, W)
    assert out.size == (30, 50)  # the orientation was applied before coding
    # the pixels are those of the upright image
    upright = np.ascontiguousarray(np.rot90(rgb, k=-1))
    assert np.array_equal(np.asarray(out), np.asarray(dec(enc(upright, W), W)))
    assert out.info["icc_profile"] == icc
    e = Image.Exif()
    e.load(out.info["exif"])
    assert e[0x0112] == 1 and e[0x010F] == "lalic-test-camera"  # orientation reset to 1, the rest kept
    assert b'dc:format="image/png"' in out.info["xmp"] and b"Orientation" not in out.info["xmp"]

    # the command line's writer carries all three into PNG, JPEG and WebP
    for name in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        imaging.save_image(out, buf, name)
        back = Image.open(io.BytesIO(buf.getvalue()))
        assert back.info.get("icc_profile") == icc, name
        assert back.getexif()[0x010F] == "lalic-test-camera", name
        assert b'dc:format="image/png"' in back.info["xmp"], name


def test_metadata_of_an_unrotated_jpeg_is_kept_byte_for_byte(W):
    exif = Image.Exif()
    exif[0x010F] = "maker"
    exif[0x0112] = 1
    buf = io.BytesIO()
    Image.fromarray(natural_image(24, 32)).save(buf, format="JPEG", exif=exif.tobytes(), xmp=XMP, icc_profile=b"icc" * 50)
    src = Image.open(io.BytesIO(buf.getvalue()))
    out = dec(enc(buf.getvalue(), W), W)
    for key in ("icc_profile", "exif", "xmp"):
        assert out.info[key] == src.info[key], key


def _xmp_pnginfo(xmp: bytes):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode())
    return info


# ------------------------------------------------------------------------------------------------
# options and errors


def test_quality_target_and_info(W, tmp_path):
    im = natural_image(64, 96)
    sizes = {q: len(enc(im, W, quality=q)) for q in (1, 8)}
    assert sizes[1] < sizes[8]
    target = 8 * (sizes[1] + sizes[8]) / 2 / (64 * 96)
    data = enc(im, W, target_bpp=target)
    d = lalic_codec.info(data)
    assert d["bpp"] <= target and 1 < d["quality"] < 8
    assert (d["width"], d["height"], d["colour_mode"], d["bit_depth"]) == (96, 64, "RGB", 8)
    assert d["model_id"] == "lalic-vr" and d["crc_ok"]
    p = tmp_path / "a.lic"
    p.write_bytes(data)
    assert lalic_codec.info(p) == lalic_codec.info(str(p)) == d


def test_errors_are_the_codec_errors(W, tiny_lalic_weights, tmp_path):
    im = natural_image(16, 16)
    with pytest.raises(BadInputError, match="no such file"):
        enc(tmp_path / "missing.png", W)
    with pytest.raises(BadInputError, match="not a readable image"):
        enc(b"not an image", W)
    with pytest.raises(BadInputError, match="not both"):
        enc(im, W, quality=3, target_bpp=1.0)
    with pytest.raises(BadInputError, match="quality"):
        enc(im, W, quality=9)
    with pytest.raises(BadInputError, match="positive"):
        enc(im, W, target_bpp=0)
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4), bool), np.zeros((4, 4, 5), np.uint8), np.zeros((1, 4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(BadInputError, match="array"):
            enc(bad, W)
    with pytest.raises(TypeError):
        enc(42, W)
    with pytest.raises(TypeError):
        enc(im, W, quality="high")
    with pytest.raises(MissingWeightsError):
        lalic_codec.encode(im, model="lalic", device="cpu")  # no bundled weights for it
    with pytest.raises(BadInputError, match="device"):
        lalic_codec.encode(im, weights=W, device="tpu")

    data = enc(im, W)
    with pytest.raises(NotALicFileError):
        dec(b"GIF89a" + bytes(100), W)
    with pytest.raises(CorruptFileError):
        dec(data[:-3], W)
    with pytest.raises(BadInputError, match="no such file"):
        lalic_codec.info(tmp_path / "missing.lic")
    with pytest.raises(MissingWeightsError, match="weights"):
        lalic_codec.decode(data, device="cpu")  # made with other weights than the bundled ones
    with pytest.raises(WeightsMismatchError):
        lalic_codec.decode(data, weights=tiny_lalic_weights, device="cpu")
    with pytest.raises(TypeError):
        lalic_codec.decode(3.5)


def test_fixed_rate_models_warn_that_quality_is_ignored(tiny_lalic_weights):
    with pytest.warns(lalic_codec.CodecWarning, match="fixed rate") as record:
        data = lalic_codec.encode(natural_image(20, 20), quality=3, weights=tiny_lalic_weights, device="cpu")
    assert record[0].filename == __file__  # warned at the caller's line
    assert lalic_codec.decode(data, weights=tiny_lalic_weights, device="cpu").size == (20, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lalic_codec.encode(natural_image(20, 20), weights=tiny_lalic_weights, device="cpu")


# ------------------------------------------------------------------------------------------------
# Codec and model caching


def test_codec_holds_one_cached_model(W, tiny_lalic_weights):
    codec = lalic_codec.Codec(weights=W, device="cpu")
    assert codec.device == "cpu" and codec.model_id == "lalic-vr" and codec.variable_rate
    assert re.fullmatch(r"[0-9a-f]{32}", codec.fingerprint)
    assert codec._lm is lalic_codec.Codec(weights=str(W), device="cpu")._lm  # loaded once
    assert codec._lm is loading.load_model("x", W, "cpu")
    data = codec.encode(natural_image(20, 30), 2.5)
    d = lalic_codec.info(data)
    assert d["weights_fingerprint"] == codec.fingerprint and d["quality"] == 2.5
    assert data == enc(natural_image(20, 30), W, quality=2.5)
    assert np.array_equal(np.asarray(codec.decode(data)), np.asarray(dec(data, W)))
    other = lalic_codec.Codec("lalic", tiny_lalic_weights, "cpu")
    assert other.model_id == "lalic" and not other.variable_rate and other.fingerprint != codec.fingerprint
    with pytest.raises(WeightsMismatchError):
        other.decode(data)
    assert "lalic-vr" in repr(codec)


def test_bundled_name_and_explicit_weights_do_not_share_an_id(W, tmp_path, monkeypatch):
    """The same weights file loaded as the bundled model and as --weights: each keeps its id,
    whatever was loaded first."""
    bundled = tmp_path / "bundled.safetensors"
    shutil.copy(W, bundled)
    monkeypatch.setitem(loading.BUNDLED, loading.DEFAULT_MODEL, str(bundled))
    assert lalic_codec.Codec(weights=bundled, device="cpu").model_id == "lalic-vr"
    default = lalic_codec.Codec(device="cpu")
    assert default.model_id == loading.DEFAULT_MODEL
    data = default.encode(natural_image(16, 16))
    assert lalic_codec.info(data)["model_id"] == loading.DEFAULT_MODEL
    # a Codec with other weights still decodes files of the bundled model
    assert lalic_codec.Codec(weights=W, device="cpu").decode(data).size == (16, 16)
    assert lalic_codec.decode(data, device="cpu").size == (16, 16)


# ------------------------------------------------------------------------------------------------
# laziness


def test_import_and_info_do_not_import_torch(W, tmp_path):
    lic = tmp_path / "a.lic"
    lic.write_bytes(enc(natural_image(16, 16), W))
    probe = (
        "import sys, lalic_codec\n"
        "assert lalic_codec.info(sys.argv[1])['width'] == 16\n"
        "assert callable(lalic_codec.encode) and lalic_codec.Codec and 'Codec' in dir(lalic_codec)\n"
        "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    p = subprocess.run([sys.executable, "-c", probe, str(lic)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with pytest.raises(AttributeError):
        lalic_codec.no_such_name


def test_files_of_a_retired_bundled_model_say_how_to_decode_them(W, monkeypatch):
    """A file made with an earlier bundled model (default-v1): refused with the way to get its weights."""
    old = "default-v1"
    assert old in loading.RETIRED
    monkeypatch.setattr(loading, "DEFAULT_MODEL", old)
    monkeypatch.setitem(loading.BUNDLED, old, str(W))
    loading.clear_model_cache()
    data = lalic_codec.Codec(device="cpu").encode(natural_image(16, 16))
    assert lalic_codec.info(data)["model_id"] == old
    monkeypatch.delitem(loading.BUNDLED, old)
    loading.clear_model_cache()
    with pytest.raises(MissingWeightsError, match=r"earlier bundled model 'default-v1'.*--weights default-v1.safetensors.*git show"):
        lalic_codec.Codec(device="cpu").decode(data)
    # with its weights it decodes
    assert lalic_codec.Codec(weights=W, device="cpu").decode(data).size == (16, 16)
