"""The Pillow plugin: Image.open/save of .lic files, modes, metadata, errors, and laziness."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

import lalic_codec
from conftest import natural_image
from lalic_codec import pil_plugin
from lalic_codec.errors import CorruptFileError, CrcMismatchError, MissingWeightsError
from lalic_codec.formats import container as fmt


@pytest.fixture
def W(tiny_vr_weights):
    """The tiny model as the plugin's weights for this test."""
    previous = pil_plugin.configure(weights=tiny_vr_weights, device="cpu")
    yield tiny_vr_weights
    pil_plugin.configure(**previous)


def test_registered_as_a_pillow_format():
    assert "LIC" in Image.OPEN and "LIC" in Image.SAVE
    assert Image.registered_extensions()[".lic"] == "LIC"
    assert Image.MIME["LIC"] == "image/x-lic"
    assert pil_plugin._MAGIC == fmt.MAGIC
    accept = Image.OPEN["LIC"][1]
    assert accept(fmt.MAGIC + bytes(8)) and not accept(b"\x89PNG\r\n\x1a\n" + bytes(8))
    before = (list(Image.ID), dict(Image.OPEN))
    pil_plugin.register()  # idempotent
    assert (list(Image.ID), dict(Image.OPEN)) == before


def test_save_open_round_trip(W, tmp_path):
    src = Image.fromarray(natural_image(45, 70))
    path = tmp_path / "a.lic"
    src.save(path, quality=3)
    data = path.read_bytes()
    assert data[:8] == fmt.MAGIC and lalic_codec.info(data)["quality"] == 3
    assert data == lalic_codec.encode(src, 3, weights=W, device="cpu")
    with Image.open(path) as im:
        assert im.format == "LIC" and im.get_format_mimetype() == "image/x-lic"
        assert im.size == (70, 45) and im.mode == "RGB"
        assert im.lic_header.quality == 3 and im.lic_header.model_id == "lalic-vr"
        assert im.tile  # not decoded yet
        im.load()
        assert not im.tile
        pixels = np.asarray(im)
    assert np.array_equal(pixels, np.asarray(lalic_codec.decode(data, weights=W, device="cpu")))
    # file objects, an explicit format, Image.open(formats=...), and implicit loading
    buf = io.BytesIO()
    src.save(buf, format="LIC", quality=3)
    assert buf.getvalue() == data
    im = Image.open(io.BytesIO(data), formats=["LIC"])
    assert np.array_equal(np.asarray(im.convert("RGB")), pixels)
    im.thumbnail((35, 35))
    assert max(im.size) == 35


def test_save_options(W, tmp_path, tiny_lalic_weights):
    src = Image.fromarray(natural_image(64, 64))
    sizes = {}
    for q in (1, 8):
        src.save(tmp_path / f"q{q}.lic", quality=q)
        sizes[q] = (tmp_path / f"q{q}.lic").stat().st_size
    assert sizes[1] < sizes[8]
    target = 8 * (sizes[1] + sizes[8]) / 2 / 64**2
    src.save(tmp_path / "t.lic", target_bpp=target)
    assert lalic_codec.info(tmp_path / "t.lic")["bpp"] <= target
    # per-call weights win over the configured ones (and a fixed-rate model warns about quality)
    with pytest.warns(lalic_codec.CodecWarning, match="fixed rate") as record:
        src.save(tmp_path / "f.lic", quality=5, weights=tiny_lalic_weights, model="lalic")
    assert record[0].filename == __file__
    assert lalic_codec.info(tmp_path / "f.lic")["model_id"] == "lalic"
    with pytest.raises(lalic_codec.errors.BadInputError):
        src.save(tmp_path / "bad.lic", quality=9)
    assert not (tmp_path / "bad.lic").exists()  # Pillow removes the file it created


@pytest.mark.filterwarnings("ignore::lalic_codec.api.CodecWarning")  # I;16 and CMYK notes
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "1", "CMYK"])
def test_modes(W, mode):
    rgb = natural_image(30, 41)
    alpha = (np.arange(30 * 41).reshape(30, 41) * 11 % 256).astype(np.uint8)
    if mode == "I;16":
        src = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode == "P":
        src = Image.fromarray(rgb).quantize(20)
    else:
        src = Image.fromarray(rgb).convert(mode)
    if mode in ("RGBA", "LA"):
        src.putalpha(Image.fromarray(alpha))
    buf = io.BytesIO()
    src.save(buf, format="LIC")
    expected = {"1": "L", "CMYK": "RGB"}.get(mode, mode)
    im = Image.open(io.BytesIO(buf.getvalue()))
    assert im.mode == expected and im.size == (41, 30)
    im.load()
    assert im.mode == expected
    ref = lalic_codec.decode(buf.getvalue(), weights=W, device="cpu")
    assert ref.mode == expected and np.array_equal(np.asarray(im), np.asarray(ref))
    if mode in ("RGBA", "LA"):
        assert np.array_equal(np.asarray(im.getchannel("A")), alpha)  # lossless
    if mode == "P":
        assert im.getpalette()[:60] == src.getpalette()[:60]
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.convert("RGB")))
    if mode == "I;16":
        assert not (np.asarray(im) % 257).any()


def test_metadata_is_there_before_decoding_and_can_be_replaced(W, tmp_path):
    from PIL import PngImagePlugin

    exif = Image.Exif()
    exif[0x010F] = "camera"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">hello</x:xmpmeta>'
    png = PngImagePlugin.PngInfo()
    png.add_itxt("XML:com.adobe.xmp", xmp.decode())
    Image.fromarray(natural_image(20, 24)).save(tmp_path / "src.png", icc_profile=b"icc" * 40, exif=exif.tobytes(), pnginfo=png)
    src = Image.open(tmp_path / "src.png")
    src.save(tmp_path / "a.lic")
    with Image.open(tmp_path / "a.lic") as im:
        assert im.tile  # nothing decoded
        assert im.info["icc_profile"] == b"icc" * 40 and im.info["xmp"] == xmp
        assert im.getexif()[0x010F] == "camera"
        im.load()
        assert im.info["icc_profile"] == b"icc" * 40
        # and Pillow carries them on (EXIF and XMP when asked, as for any format)
        im.save(tmp_path / "b.png", exif=im.info["exif"], pnginfo=png)
    back = Image.open(tmp_path / "b.png")
    assert back.info["icc_profile"] == b"icc" * 40 and back.getexif()[0x010F] == "camera" and back.info["xmp"] == xmp
    # save options replace (or drop, with b"") the image's own metadata, leaving the image alone
    src.save(tmp_path / "c.lic", icc_profile=b"other" * 10, exif=b"", xmp=b"")
    with Image.open(tmp_path / "c.lic") as im:
        assert im.info["icc_profile"] == b"other" * 10 and "exif" not in im.info and "xmp" not in im.info
    assert src.info["icc_profile"] == b"icc" * 40


def test_errors(W, tmp_path):
    Image.fromarray(natural_image(16, 16)).save(tmp_path / "a.lic")
    data = (tmp_path / "a.lic").read_bytes()
    damaged = bytearray(data)
    damaged[-4] ^= 1
    with pytest.raises(CrcMismatchError):
        Image.open(io.BytesIO(bytes(damaged)))
    with pytest.raises(CorruptFileError):
        Image.open(io.BytesIO(data[:-10]))
    # a .lic name does not make a file .lic: recognised by its magic bytes only
    (tmp_path / "licence.lic").write_text("SERVER host 0123 27000\nVENDOR x\n")
    with pytest.raises(UnidentifiedImageError):
        Image.open(tmp_path / "licence.lic")
    # other weights: the header is readable, decoding is refused
    pil_plugin.configure(weights=None)
    with Image.open(tmp_path / "a.lic") as im:
        assert im.size == (16, 16)
        with pytest.raises(MissingWeightsError):
            im.load()


def test_open_size_and_info_do_not_import_torch(W, tmp_path):
    Image.fromarray(natural_image(20, 30)).convert("RGBA").save(tmp_path / "a.lic")
    probe = (
        "import sys\n"
        "from PIL import Image\n"
        "import lalic_codec\n"
        "im = Image.open(sys.argv[1])\n"
        "assert (im.size, im.mode, im.format) == ((30, 20), 'RGBA', 'LIC'), (im.size, im.mode)\n"
        "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    p = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "a.lic")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
