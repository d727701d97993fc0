"""Large images: tiles chosen from a memory budget (--max-memory), the decoder's memory check, and
seams that cost no quality (issue 14 item 9)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import natural_image
from lalic_codec import imaging, loading, memory, pipeline, tiling
from lalic_codec.cli import main
from lalic_codec.errors import LimitExceededError
from lalic_codec.formats import container as fmt

GiB, MiB = 2**30, 2**20


def padded(tiles, unit=64):
    return [(-(-tw // unit) * unit) * (-(-th // unit) * unit) for _, _, tw, th in tiles]


def check_layout(tiles, h, w, overlap=tiling.DEFAULT_OVERLAP):
    """Tiles inside the image, covering it, neighbours overlapping by at least ``overlap``, sizes
    multiples of 64 except where one tile spans an axis, in raster order."""
    cover = np.zeros((h, w), np.int8)
    for x, y, tw, th in tiles:
        assert 0 <= x and x + tw <= w and 0 <= y and y + th <= h
        assert tw % 64 == 0 or (x, tw) == (0, w)
        assert th % 64 == 0 or (y, th) == (0, h)
        cover[y : y + th, x : x + tw] = 1
    assert cover.all()
    xs = sorted({(x, tw) for x, _, tw, _ in tiles})
    ys = sorted({(y, th) for _, y, _, th in tiles})
    for (a, sa), (b, _) in list(zip(xs, xs[1:])) + list(zip(ys, ys[1:])):
        assert a + sa - b >= overlap
    assert tiles == sorted(tiles, key=lambda t: (t[1], t[0]))


# ------------------------------------------------------------------------------------------------
# the plan (pure functions: no model, no image)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 400), (200, 330), (1500, 2000), (1632, 2448), (2832, 4240), (4000, 6000), (3000, 40000)])
@pytest.mark.parametrize("max_pixels", [128 * 128, 300_000, 2**20, 2**22])
def test_plans_within_a_tile_budget_cover_the_image(h, w, max_pixels):
    tiles = tiling.plan_tiles(h, w, max_pixels=max_pixels)
    check_layout(tiles, h, w)
    assert max(padded(tiles)) <= max_pixels or max(t[2] for t in tiles) <= 192 >= max(t[3] for t in tiles)


def test_no_budget_makes_tiles_over_the_formats_limit():
    for max_pixels in (2**22, 2**22 + 1, 2**24, 2**40):
        tiles = tiling.plan_tiles(2832, 4240, max_pixels=max_pixels)
        assert len(tiles) == 4 and max(padded(tiles)) <= 2**22
    assert tiling.tile_plan(2832, 4240, fake_model(), max_memory=2**40) == tiling.plan_tiles(2832, 4240)


def test_plans_use_the_largest_tiles_that_fit():
    # whole images up to the format's 2048 x 2048 per tile: 3 and 4 megapixels are one tile each
    assert tiling.plan_tiles(1500, 2000) == [(0, 0, 2000, 1500)]
    assert tiling.plan_tiles(1632, 2448) == [(0, 0, 2448, 1632)]  # 2496 x 1664 padded: not square
    # 24 megapixels: 3 x 2 tiles of at most 2048 x 2048, 2 % more pixels coded (was 25 % with 1024)
    tiles = tiling.plan_tiles(4000, 6000)
    assert len(tiles) == 6 and max(padded(tiles)) <= 2**22
    assert sum(padded(tiles)) / (4000 * 6000) < 1.025
    old = tiling.plan_tiles(4000, 6000, 1024)
    assert sum(padded(old)) > sum(padded(tiles))
    # a smaller budget: more, smaller tiles, never more than it allows
    counts = [len(tiling.plan_tiles(4000, 6000, max_pixels=m)) for m in (2**22, 2**21, 2**20, 2**18)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_explicit_tile_size_bounds_each_side():
    for h, w in [(500, 700), (1024, 1024), (1025, 3000), (4000, 6000)]:
        tiles = tiling.plan_tiles(h, w, 1024)
        check_layout(tiles, h, w)
        assert max(max(tw, th) for _, _, tw, th in tiles) <= 1024
    assert len(tiling.plan_tiles(1500, 2000, 1024)) == 4  # 2 x 2 (the old plan made 3 x 2)
    with pytest.raises(Exception, match="multiple of 64 and at least 128"):
        tiling.plan_tiles(500, 500, 64)


def test_overlaps_take_what_the_sizes_leave_and_padding_nothing():
    """Tiles are multiples of 64 and end at the image's edges: the pixels coded beyond the image are
    overlap (blended, better seams), not padding (thrown away)."""
    for n in range(129, 5000, 37):
        for count in range(2, 6):
            if (n + (count - 1) * 32) // 64 // count * 64 < tiling.MIN_TILE:
                continue
            axis = tiling._axis_tiles(n, count, 32)
            assert axis[0][0] == 0 and axis[-1][0] + axis[-1][1] == n
            overlaps = [a + sa - b for (a, sa), (b, _) in zip(axis, axis[1:])]
            assert min(overlaps) >= 32 and max(overlaps) - min(overlaps) <= 1
            assert sum(s for _, s in axis) - n < (count - 1) * 32 + 64  # the fewest 64-pixel units


def fake_model(device="cpu"):
    return SimpleNamespace(model=SimpleNamespace(pad_multiple=64), device=torch.device(device))


@pytest.mark.parametrize("budget_gib", [1.5, 2, 3, 4, 8])
def test_tile_choice_follows_the_budget(budget_gib):
    budget = int(budget_gib * GiB)
    h, w = 4000, 6000
    tiles = tiling.tile_plan(h, w, fake_model(), max_memory=budget)
    check_layout(tiles, h, w)
    need = memory.memory_needed(max(padded(tiles)), h * w, "encode")
    assert need <= budget and max(padded(tiles)) <= fmt.Limits().max_tile_pixels
    if budget_gib >= 4:  # room for the format's largest tiles
        assert max(padded(tiles)) > 2**21
    # and the next larger grid would not fit: the tiles are as large as the budget allows
    bigger = tiling.plan_tiles(h, w, max_pixels=int(max(padded(tiles)) * 1.3))
    if len(bigger) < len(tiles) and max(padded(tiles)) < 2**22:
        assert memory.memory_needed(max(padded(bigger)), h * w, "encode") > budget


def test_the_image_counts_in_the_budget():
    """The image-sized buffers count: 0.5 GiB codes a 2-megapixel image in tiles, not 24 megapixels."""
    tiles = tiling.tile_plan(1000, 2000, fake_model(), max_memory=GiB // 2)
    assert len(tiles) > 1 and memory.memory_needed(max(padded(tiles)), 2_000_000) <= GiB // 2
    with pytest.raises(LimitExceededError, match="needs at least"):
        tiling.tile_plan(4000, 6000, fake_model(), max_memory=GiB // 2)


def test_explicit_tile_wins_over_the_budget():
    assert tiling.tile_plan(4000, 6000, fake_model(), 1024, 8 * GiB) == tiling.plan_tiles(4000, 6000, 1024)


def test_a_budget_too_small_for_the_image_is_refused_only_when_given(monkeypatch):
    with pytest.raises(LimitExceededError, match=r"--max-memory .* too little to encode a 16000x16000 image: it needs at least"):
        tiling.tile_plan(16000, 16000, fake_model(), max_memory=memory.MIN_BUDGET)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 100 * MiB)
    tiles = tiling.tile_plan(1000, 1500, fake_model())  # the default budget: the smallest tiles
    check_layout(tiles, 1000, 1500)
    assert max(padded(tiles)) <= 192 * 192


def test_default_budget_is_half_the_available_memory(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683568 kB\nMemFree:        1000 kB\nMemAvailable:    8388608 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(tmp_path / "none"), str(tmp_path / "none")),))
    assert memory.available_memory() == 8 * GiB
    assert memory.default_budget("encode") == 4 * GiB and memory.default_budget("decode") == 8 * GiB
    # a container's limit leaves less
    (tmp_path / "memory.max").write_text("6442450944\n")
    (tmp_path / "memory.current").write_text("2147483648\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(tmp_path / "memory.max"), str(tmp_path / "memory.current")),))
    assert memory.available_memory() == 4 * GiB
    (tmp_path / "memory.max").write_text("max\n")  # no limit
    assert memory.available_memory() == 8 * GiB
    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "missing"))
    assert memory.available_memory() is None or memory.available_memory() > 0  # sysconf, where it exists
    monkeypatch.setattr(memory, "available_memory", lambda device=None: None)
    assert memory.default_budget() == memory.FALLBACK_BUDGET
    assert memory.default_budget("decode") is None  # unknown: a decoder refuses nothing


@pytest.mark.parametrize("text,value", [
    ("2G", 2 * GiB), ("2g", 2 * GiB), ("1.5GiB", 3 * GiB // 2), ("800M", 800 * MiB), ("800MB", 800 * MiB),
    ("512m", 512 * MiB), ("0.5T", 512 * GiB), (".5G", GiB // 2), ("2 G", 2 * GiB), ("3000000000", 3_000_000_000),
    ("1048576K", GiB), ("100b", 100),
])
def test_memory_sizes_parse(text, value):
    assert memory.parse_memory(text) == value


@pytest.mark.parametrize("text", ["", "abc", "2X", "G", "-1G", "0", "0M", "nan", "inf", "1e9", "1.5.G", "2GG", "0.0000001"])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(ValueError, match="is not a memory size"):
        memory.parse_memory(text)


@pytest.mark.parametrize("command", ["encode", "decode"])
@pytest.mark.parametrize("value,message", [
    ("lots", "is not a memory size"), ("-2G", "is not a memory size"), ("0", "is not a memory size"),
    ("100M", "less than the 410 MiB that the model and the smallest tiles need"),
])
def test_bad_max_memory_is_a_usage_error(command, value, message, tmp_path):
    src = tmp_path / ("a.png" if command == "encode" else "a.lic")
    src.write_bytes(b"x")
    r = CliRunner().invoke(main, [command, str(src), str(tmp_path / "out"), "--max-memory", value])
    assert r.exit_code == 2, r.output
    assert "Invalid value for '--max-memory'" in r.output and message in r.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# coding with a budget


def test_a_tiny_budget_codes_several_tiles_that_decode(tiny_vr_weights, tmp_path):
    rgb = natural_image(200, 300, seed=4)
    src = tmp_path / "a.png"
    Image.fromarray(rgb).save(src)
    runner = CliRunner()
    r = runner.invoke(main, ["encode", str(src), str(tmp_path / "a.lic"), "--weights", str(tiny_vr_weights),
                             "--device", "cpu", "--max-memory", "420M"])
    assert r.exit_code == 0, r.output
    lic = fmt.read((tmp_path / "a.lic").read_bytes())
    assert len(lic.tiles) == 4  # 2 x 2 tiles of 192 x 128: (420 MiB - the model - the image) / 640 bytes a pixel
    assert max(padded([(t.x, t.y, t.w, t.h) for t in lic.tiles])) <= (420 * MiB - memory.MEMORY_BASE) // memory.MEMORY_PER_TILE_PIXEL
    r = runner.invoke(main, ["decode", str(tmp_path / "a.lic"), str(tmp_path / "b.png"), "--weights", str(tiny_vr_weights), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = np.asarray(Image.open(tmp_path / "b.png"))
    assert out.shape == rgb.shape and imaging.psnr(rgb, out) > 5
    # the default budget (half of this machine's memory) codes it in one piece
    r = runner.invoke(main, ["encode", str(src), str(tmp_path / "c.lic"), "--weights", str(tiny_vr_weights), "--device", "cpu"])
    assert r.exit_code == 0 and len(fmt.read((tmp_path / "c.lic").read_bytes()).tiles) == 1


def test_decoder_refuses_a_file_over_its_budget_before_loading_the_model(tiny_vr_weights, tmp_path, monkeypatch):
    lm = loading.load_model("x", tiny_vr_weights, "cpu")
    data = pipeline.encode_image(Image.fromarray(natural_image(200, 300, seed=5)), lm, 4.0, tile=192).data
    (tmp_path / "a.lic").write_bytes(data)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(LimitExceededError, match=r"needs about 4\d\d MiB \(its tiles are up to 192x128 pixels\), more than --max-memory: 410 MiB"):
        pipeline.decode_bytes(data, tiny_vr_weights, "cpu", max_memory=410 * MiB)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 300 * MiB)  # the default: what is available
    with pytest.raises(LimitExceededError, match=r"more than the memory available: 300 MiB \(--max-memory SIZE allows more\)"):
        pipeline.decode_bytes(data, tiny_vr_weights, "cpu")
    r = CliRunner().invoke(main, ["decode", str(tmp_path / "a.lic"), str(tmp_path / "b.png"), "--max-memory", "410M"])
    assert r.exit_code == 3 and "needs about" in r.output and not (tmp_path / "b.png").exists()
    monkeypatch.setattr(memory, "available_memory", lambda device=None: None)  # unknown: no check
    pipeline.check_memory(fmt.read(data))


# ------------------------------------------------------------------------------------------------
# seams, with the bundled model


def test_blended_seams_are_no_worse_than_the_same_pixels_coded_in_one_piece():
    """Pixels near a seam, where two tiles cross-fade, come back at least as well as in a one-tile
    encode of the image (measured: 0.2-0.5 dB better within 8 pixels of the seam).  What tiles
    cost is rate (pixels coded twice; here 22 % more pixels, 29 % more bits), which is why the
    encoder uses the largest tiles its memory budget allows."""
    from lalic_codec._paths import shared_dir

    path = shared_dir() / "data" / "kodak" / "kodim23.png"
    if not path.is_file():
        pytest.skip("Kodak images not available")
    lm = loading.load_model("default", None, "cpu")
    im = Image.open(path).convert("RGB")
    rgb = np.asarray(im)
    one = pipeline.encode_image(im, lm, 4.0)
    assert len(fmt.read(one.data).tiles) == 1
    tiles = tiling.plan_tiles(512, 768, 448)
    assert len(tiles) == 2 * 2
    two = pipeline.encode_image(im, lm, 4.0, plan=tiles)
    dec_one = np.asarray(pipeline.decode_bytes(one.data, None, "cpu").image).astype(float)
    dec_two = np.asarray(pipeline.decode_bytes(two.data, None, "cpu").image).astype(float)
    near = np.zeros((512, 768), bool)  # within 8 pixels of a tile edge inside the image
    for x, y, tw, th in tiles:
        for e in (x, x + tw):
            if 0 < e < 768:
                near[:, max(0, e - 8) : e + 8] = True
        for e in (y, y + th):
            if 0 < e < 512:
                near[max(0, e - 8) : e + 8, :] = True
    mse = lambda d, m: ((d - rgb) ** 2).mean(-1)[m].mean()  # noqa: E731
    assert mse(dec_two, near) <= mse(dec_one, near) * 1.02
    assert imaging.psnr(rgb, dec_two.astype(np.uint8)) >= imaging.psnr(rgb, dec_one.astype(np.uint8)) - 0.05
