"""Images to .lic and back: exact reconstruction, any size, colour modes, alpha, metadata."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, natural_image
from lalic_codec import imaging, loading, pipeline, tiling
from lalic_codec.errors import BadInputError, CorruptFileError, CrcMismatchError, LimitExceededError, MissingWeightsError, WeightsMismatchError
from lalic_codec.formats import container as fmt


@pytest.fixture(scope="module")
def vr(tiny_vr_weights):
    return loading.load_model("x", tiny_vr_weights, "cpu")


def encoder_reconstruction(lm, rgb: np.ndarray, quality: float) -> np.ndarray:
    """What the encoder itself reconstructs from its quantised latent (no bitstream involved)."""
    H, W = rgb.shape[:2]
    pad = tiling.centred_padding(H, W, lm.model.pad_multiple, tiling.MIN_CANVAS)
    x = tiling._to_tensor(rgb, pad, lm.device)
    q = torch.tensor([quality])
    with torch.inference_mode():
        coded = lm.model.compress(x, quality=q)
        x_hat = lm.model.g_s(lm.model.latent_inverse_gain(coded.y_hat, q)).clamp(0, 1)
    l, r, t, b = pad
    return imaging.to_uint8(x_hat[0, :, t : t + H, l : l + W])


@pytest.mark.parametrize("h,w", [(97, 203), (1, 1), (64, 64), (65, 130), (3, 200)])
def test_decode_equals_encoder_reconstruction(vr, h, w, monkeypatch):
    monkeypatch.setattr(pipeline, "SMALL_TILE_SEARCH", False)  # small images: code the pixels themselves
    monkeypatch.setattr(pipeline, "POSTFILTER", False)  # the network's own output (test_postfilter.py: with one)
    rgb = natural_image(h, w, seed=h * w)
    res = pipeline.encode_image(Image.fromarray(rgb), vr, quality=5)
    dec = pipeline.decode_bytes(res.data, vr_path(vr), "cpu")
    out = np.asarray(dec.image)
    assert out.shape == (h, w, 3) and dec.image.mode == "RGB"
    assert np.array_equal(out, encoder_reconstruction(vr, rgb, 5.0))
    assert res.bpp == 8 * len(res.data) / (h * w)


def vr_path(lm):
    # the cache key is the path; find it back for decode_bytes
    for key, value in loading._cache.items():
        if value is lm:
            return key[0]
    raise AssertionError("model not cached")


def test_quality_changes_rate_and_is_recorded(vr, monkeypatch):
    # plain rounding: the rate-distortion-optimised rounding zeroes almost all of this random
    # network's small latent at the low qualities, which then code to the same size
    monkeypatch.setattr(pipeline, "RDO", False)
    im = Image.fromarray(natural_image(128, 128, seed=3))
    sizes = []
    for q in (1, 2.5, 8):
        res = pipeline.encode_image(im, vr, quality=q)
        assert fmt.read(res.data).header.quality == pytest.approx(q)
        sizes.append(len(res.data))
    assert len(set(sizes)) == 3
    with pytest.raises(BadInputError):
        pipeline.encode_image(im, vr, quality=9)


def test_target_bpp_lands_at_or_under_target(vr):
    im = Image.fromarray(natural_image(128, 192, seed=4))
    lo = pipeline.encode_image(im, vr, 1.0).bpp
    hi = pipeline.encode_image(im, vr, 8.0).bpp
    target = (lo + hi) / 2
    res = pipeline.encode_to_target(im, vr, target)
    assert res.bpp <= target
    assert 1.0 < res.quality < 8.0
    # the next quality step up would overshoot (the search is not lazy)
    assert pipeline.encode_image(im, vr, min(8.0, res.quality + 0.1)).bpp > res.bpp
    # an unreachable target gives the smallest file, with a note
    tiny = pipeline.encode_to_target(im, vr, lo / 10)
    assert tiny.quality == 1.0 and tiny.notes


def test_grayscale_restored_as_grayscale(vr):
    g = natural_image(50, 70)[..., 0]
    res = pipeline.encode_image(Image.fromarray(g, "L"), vr)
    assert fmt.read(res.data).header.colour_mode == fmt.ColourMode.L
    dec = pipeline.decode_bytes(res.data, vr_path(vr), "cpu").image
    assert dec.mode == "L" and dec.size == (70, 50)


def test_palette_restored_with_its_palette(vr):
    p = Image.fromarray(natural_image(40, 60)).quantize(16)
    res = pipeline.encode_image(p, vr)
    dec = pipeline.decode_bytes(res.data, vr_path(vr), "cpu").image
    assert dec.mode == "P"
    assert dec.getpalette()[:48] == p.getpalette()[:48]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_lossless(vr, mode):
    rgb = natural_image(33, 47)
    alpha = (np.arange(33 * 47).reshape(33, 47) * 7 % 256).astype(np.uint8)
    base = Image.fromarray(rgb).convert("L" if mode == "LA" else "RGB")
    base.putalpha(Image.fromarray(alpha))
    res = pipeline.encode_image(base, vr)
    dec = pipeline.decode_bytes(res.data, vr_path(vr), "cpu").image
    assert dec.mode == mode
    assert np.array_equal(np.asarray(dec.getchannel("A")), alpha)


def test_sixteen_bit_grayscale_is_coded_at_8_bits_with_a_note(vr):
    a = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    res = pipeline.encode_image(im, vr)
    h = fmt.read(res.data).header
    assert h.bit_depth == 16 and h.colour_mode == fmt.ColourMode.L
    assert any("16-bit" in n for n in res.notes)
    dec = pipeline.decode_bytes(res.data, vr_path(vr), "cpu").image
    assert dec.mode == "I;16"  # a 16-bit source comes back 16-bit (at 8-bit precision: v * 257)
    assert np.all(np.asarray(dec, dtype=np.int64) % 257 == 0)
    assert pipeline.decode_bytes(res.data, vr_path(vr), "cpu", high_bit_depth=False).image.mode == "L"


def test_exif_orientation_applied_and_metadata_kept(vr):
    im = Image.fromarray(natural_image(30, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    exif[0x010F] = "lalic-test-camera"
    icc = b"fake-icc-profile-bytes" * 10
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif.tobytes(), icc_profile=icc)
    res = pipeline.encode_image(imaging.open_image(buf.getvalue()), vr)
    dec = pipeline.decode_bytes(res.data, vr_path(vr), "cpu").image
    assert dec.size == (30, 50)  # width and height swapped by the orientation
    assert dec.info["icc_profile"] == icc
    out_exif = Image.Exif()
    out_exif.load(dec.info["exif"])
    assert out_exif.get(0x0112, 1) == 1 and out_exif[0x010F] == "lalic-test-camera"
    saved = io.BytesIO()
    imaging.save_image(dec, saved, "PNG")
    again = Image.open(io.BytesIO(saved.getvalue()))
    assert again.info["icc_profile"] == icc


def test_fixed_rate_official_style_checkpoint(tiny_lalic_weights):
    lm = loading.load_model("lalic", tiny_lalic_weights, "cpu")
    assert lm.model_id == "lalic" and not lm.variable_rate
    rgb = natural_image(70, 90)
    res = pipeline.encode_image(Image.fromarray(rgb), lm, quality=3)
    assert any("fixed rate" in n for n in res.notes)
    h = fmt.read(res.data)
    l, r, t, b = h.tiles[0].pad  # one canvas of 128 x 128 (where the image sits on it is the encoder's search)
    assert h.header.quality == 0 and (90 + l + r, 70 + t + b) == (128, 128)
    dec = pipeline.decode_bytes(res.data, tiny_lalic_weights, "cpu")
    assert dec.image.size == (90, 70)


def test_wrong_or_missing_weights_are_refused(vr, tiny_lalic_weights):
    res = pipeline.encode_image(Image.fromarray(natural_image(64, 64)), vr)
    with pytest.raises(WeightsMismatchError, match="fingerprint"):
        pipeline.decode_bytes(res.data, tiny_lalic_weights, "cpu")
    with pytest.raises(MissingWeightsError, match="--weights"):
        pipeline.decode_bytes(res.data, None, "cpu")
    with pytest.raises(MissingWeightsError):
        loading.load_model("lalic", None, "cpu")


def test_corruption_is_reported_never_decoded(vr):
    data = bytearray(pipeline.encode_image(Image.fromarray(natural_image(64, 64)), vr).data)
    data[-5] ^= 0x10
    with pytest.raises(CrcMismatchError):
        pipeline.decode_bytes(bytes(data), vr_path(vr), "cpu")
    with pytest.raises(CorruptFileError):
        pipeline.decode_bytes(bytes(data[:-7]), vr_path(vr), "cpu")


def test_bad_images_are_refused_clearly(tmp_path):
    with pytest.raises(BadInputError, match="not a readable image"):
        imaging.open_image(b"this is not an image")
    with pytest.raises(BadInputError):
        imaging.open_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, format="PNG")
    with pytest.raises(LimitExceededError):
        imaging.open_image(big.getvalue(), max_pixels=1_000_000)


def test_centred_padding():
    assert tiling.centred_padding(100, 120, 128) == (4, 4, 14, 14)  # as the official evaluation
    assert tiling.centred_padding(64, 64, 64) == (0, 0, 0, 0)
    assert tiling.centred_padding(1, 1, 64) == (31, 32, 31, 32)
    assert tiling.centred_padding(1, 1, 64, 128) == (63, 64, 63, 64)  # the encoder's smallest canvas
    assert tiling.centred_padding(100, 300, 64, 128) == (10, 10, 14, 14)


def test_save_weights_writes_aliases_once(tmp_path):
    from safetensors import safe_open

    from conftest import TINY
    from lalic_codec.models.checkpoints import save_weights
    from lalic_codec.models.lalic import LALIC

    m = LALIC(**TINY)
    path = save_weights(m, tmp_path / "w.safetensors", fp16=False)
    with safe_open(str(path), "pt") as f:
        saved = set(f.keys())
        tables = set(json.loads(f.metadata().get("aliases", "{}")))  # equal CDF tables, written once
        masks = set(json.loads(f.metadata().get("checkerboard_masks", "{}")))  # rebuilt from their shapes
    assert masks and all(k.endswith("context_prediction.mask") for k in masks)
    dropped = set(m.state_dict()) - saved - tables - masks
    assert dropped == {k for k in m.state_dict() if k.startswith(("h_a.", "h_s."))}  # only the aliases
    lm = loading.load_model("lalic", path, "cpu")
    from lalic_codec.models.checkpoints import fingerprint

    assert lm.fingerprint == fingerprint(m.eval())  # the same network after a float32 round trip


def test_channel_context_width_is_read_from_the_weights(tmp_path):
    from lalic_codec.models.checkpoints import save_weights
    from lalic_codec.models.lalic import VariableRateLALIC

    torch.manual_seed(0)
    path = save_weights(VariableRateLALIC(**TINY, int_scale=True, ctx_hidden_rate=2), tmp_path / "w.safetensors")
    model = loading.load_model("default", str(path), "cpu").model
    assert model.config.ctx_hidden_rate == 2
    assert model.channel_groups.channel_context["y1"][1].ffn.key.weight.shape[0] == 2 * TINY["dims"][3]


def test_rd_rounding_is_on_by_default_and_can_be_turned_off(vr, monkeypatch):
    """The pipeline codes with the model's rate-distortion-optimised rounding; ``pipeline.RDO =
    False`` rounds plainly.  Either file decodes to what its encoder reconstructed."""
    monkeypatch.setattr(pipeline, "SMALL_TILE_SEARCH", False)
    rgb = natural_image(128, 128, seed=11)
    pad = tiling.centred_padding(128, 128, vr.model.pad_multiple, tiling.MIN_CANVAS)
    x, q = tiling._to_tensor(rgb, pad, vr.device), torch.tensor([1.0])
    files = {}
    for rdo in (True, False):
        monkeypatch.setattr(pipeline, "RDO", rdo)
        res = pipeline.encode_image(Image.fromarray(rgb), vr, quality=1)
        expected = vr.model.compress(x, quality=q, rdo=None if rdo else 0.0, merged=True).streams
        assert fmt.read(res.data).tiles[0].streams == expected
        files[rdo] = res.data
    assert files[True] != files[False]


@pytest.mark.parametrize("tile", [None, 128])
def test_merged_and_separate_streams_decode_to_the_same_image(vr, tiny_vr_weights, monkeypatch, tile):
    """The encoder writes each tile's streams as segments of one stream (flags bit 3, FORMAT.md
    12.8); files with one stream per model stream, as written before, decode to the same pixels."""
    im = Image.fromarray(natural_image(200, 230, seed=21))
    files = {}
    for merged in (True, False):
        monkeypatch.setattr(pipeline, "MERGED_STREAMS", merged)
        files[merged] = pipeline.encode_image(im, vr, quality=2, tile=tile).data
    lics = {m: fmt.read(d) for m, d in files.items()}
    assert lics[True].merged and lics[True].header.streams_per_tile == 1
    assert not lics[False].merged and lics[False].header.streams_per_tile == vr.model.num_streams()
    assert len(lics[True].tiles) == len(lics[False].tiles) == (1 if tile is None else 6)
    # per tile: a symbol checksum, sealing words and directory lengths saved
    assert len(files[True]) <= len(files[False]) - len(lics[True].tiles) * 4 * (vr.model.num_streams() - 1)
    out = {m: np.asarray(pipeline.decode_bytes(d, tiny_vr_weights, "cpu").image) for m, d in files.items()}
    assert np.array_equal(out[True], out[False])
    # the flag cleared: one stream where the model has several
    lic = lics[True]
    lic.merged = False
    with pytest.raises(CorruptFileError, match=f"1 streams per tile; model {lic.header.model_id} uses {vr.model.num_streams()}"):
        pipeline.decode_bytes(fmt.write(lic), tiny_vr_weights, "cpu")
