"""codec bench: the numbers (bpp, PSNR, MS-SSIM dB, BD-rate), curve files, and a small end-to-end run.

The pure functions run everywhere; the parts that need the optional ``bench`` packages
(bjontegaard, matplotlib, pytorch-msssim) are skipped when they are not installed.
"""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lalic_codec._paths import shared_dir
from click.testing import CliRunner
from PIL import Image

from conftest import benchmark_script, natural_image
from lalic_codec import bench
from lalic_codec.cli import main


def _curve(bpp, psnr):
    return [float(b) for b in bpp], [float(p) for p in psnr]


RATES = [0.12, 0.2, 0.31, 0.48, 0.7, 1.05]
PSNRS = [27.1, 28.9, 30.6, 32.4, 34.0, 35.9]


# ------------------------------------------------------------------------------------------------
# pure functions


def test_bits_per_pixel():
    assert bench.bits_per_pixel(1000, 96, 64) == 8 * 1000 / (96 * 64)
    assert bench.bits_per_pixel(0, 10, 10) == 0.0


def test_psnr_matches_direct_computation():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    assert bench.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-12)
    assert bench.psnr(a, a) == math.inf


def test_ms_ssim_db_and_small_images():
    assert bench.ms_ssim_db(0.99) == pytest.approx(20.0)
    assert bench.ms_ssim_db(0.9) == pytest.approx(10.0)
    assert bench.ms_ssim_db(1.0) == math.inf and bench.ms_ssim_db(None) is None
    a = natural_image(64, 96)
    assert bench.ms_ssim(a, a) is None  # smaller than MS-SSIM's 161 px: null, not a crash
    assert bench.ms_ssim(natural_image(160, 400), natural_image(160, 400)) is None


def test_ms_ssim_value():
    pytest.importorskip("pytorch_msssim")
    a = natural_image(176, 192, seed=1)
    b = np.clip(a.astype(int) + np.random.default_rng(0).integers(-6, 7, a.shape), 0, 255).astype(np.uint8)
    assert bench.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    m = bench.ms_ssim(a, b)
    assert 0.5 < m < 1.0


def test_curve_json_aliases_and_published_lookup(tmp_path):
    root = tmp_path / "anchors"
    (root / "set-a").mkdir(parents=True)
    (root / "set-b").mkdir()
    # LALIC's repository spells the keys "psnr" and "ms-ssim"; CompressAI "psnr-rgb", "ms-ssim-rgb"
    (root / "set-a" / "vtm.json").write_text(json.dumps({"name": "VTM", "description": "d", "results": {"bpp": [0.1, 0.2], "psnr": [28.0, 30.0], "ms-ssim": [0.9, 0.99]}}))
    (root / "set-b" / "vtm.json").write_text(json.dumps({"name": "VTM", "results": {"bpp": [0.1], "psnr-rgb": [28.0]}}))
    (root / "set-b" / "jpeg.json").write_text(json.dumps({"name": "JPEG", "results": {"bpp": [0.1], "psnr-rgb": [25.0]}}))
    path, key = bench.find_published("set-a/vtm", root)
    c = bench.load_curve(path, key)
    assert c.values("psnr") == [28.0, 30.0] and c.values("ms-ssim-db") == pytest.approx([10.0, 20.0])
    assert c.label == "VTM (set-a/vtm)" and c.published
    assert bench.find_published("jpeg", root)[1] == "set-b/jpeg"  # unique stem
    with pytest.raises(bench.BadInputError, match="ambiguous"):
        bench.find_published("vtm", root)
    with pytest.raises(bench.BadInputError, match="no published curve"):
        bench.find_published("hevc", root)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "results": {"psnr": [1.0]}}))
    with pytest.raises(bench.BadInputError, match="CompressAI"):
        bench.load_curve(bad)


def test_bd_rate_against_itself_and_shifted():
    pytest.importorskip("bjontegaard")
    r = bench.bd_rate(RATES, PSNRS, RATES, PSNRS)
    assert abs(r.value) < 1e-9 and r.note is None
    assert r.common_range == (PSNRS[0], PSNRS[-1]) and r.overlap == 1.0
    lower = [0.9 * x for x in RATES]
    assert bench.bd_rate(RATES, PSNRS, lower, PSNRS).value == pytest.approx(-10.0, abs=1e-6)
    # order and point count do not matter; descending curves (as some published files are) work
    assert bench.bd_rate(RATES[::-1], PSNRS[::-1], [1.1 * x for x in RATES], PSNRS).value == pytest.approx(10.0, abs=1e-6)
    r = bench.bd_rate(RATES, PSNRS, [1.1 * x for x in RATES[1:]], PSNRS[1:])  # fewer points: another interpolant
    assert r.value == pytest.approx(10.0, abs=0.1) and r.common_range == (PSNRS[1], PSNRS[-1])


def test_bd_rate_within_a_range():
    """``within`` averages over part of the common range: a curve 10 % cheaper below the middle
    and 10 % dearer above it is about even over all, cheaper below and dearer above."""
    pytest.importorskip("bjontegaard")
    lower = [0.9 * x for x in RATES]
    r = bench.bd_rate(RATES, PSNRS, lower, PSNRS, within=(29.0, 33.0))
    assert r.value == pytest.approx(-10.0, abs=1e-6) and r.common_range == (29.0, 33.0)
    r = bench.bd_rate(RATES, PSNRS, lower, PSNRS, within=(20.0, 29.0))  # clipped to the curves
    assert r.value == pytest.approx(-10.0, abs=1e-6) and r.common_range == (PSNRS[0], 29.0)
    r = bench.bd_rate(RATES, PSNRS, lower, PSNRS, within=(40.0, 45.0))
    assert r.value is None and "no part in 40.00-45.00 dB" in r.note
    mixed = [x * (0.9 if p < 31.5 else 1.1) for x, p in zip(RATES, PSNRS)]
    below = bench.bd_rate(RATES, PSNRS, mixed, PSNRS, within=(PSNRS[0], 30.6)).value
    above = bench.bd_rate(RATES, PSNRS, mixed, PSNRS, within=(32.4, PSNRS[-1])).value
    assert below == pytest.approx(-10.0, abs=0.5) and above == pytest.approx(10.0, abs=0.5)  # pchip slopes mix a little
    assert below < bench.bd_rate(RATES, PSNRS, mixed, PSNRS).value < above


def _bench_run(folder: Path, curves: dict) -> Path:
    folder.mkdir(parents=True)
    for name, (rates, psnrs) in curves.items():
        (folder / f"{name}.json").write_text(json.dumps({"name": name, "results": {"bpp": rates, "psnr-rgb": psnrs}}))
    return folder


def test_compare_bench_runs_judges_at_the_old_range(tmp_path, monkeypatch, capsys):
    """benchmarks/compare_bench_runs.py: a new ladder reaching lower qualities is judged over the
    old run's range, where it is 10 % cheaper than the old model (and than VTM's 20 % dearer)."""
    pytest.importorskip("bjontegaard")
    anchors = _bench_run(tmp_path / "anchors" / "kodak-compressai", {"vtm": ([r / 1.2 for r in RATES], PSNRS)})
    monkeypatch.setenv("LALIC_ANCHORS", str(anchors.parent))
    old = _bench_run(tmp_path / "old", {"default": (RATES[1:5], PSNRS[1:5]), "avif": (RATES, PSNRS)})
    # new: 10 % cheaper inside the old range, far dearer at the lowest quality
    new_rates = [RATES[0] * 1.4] + [0.9 * r for r in RATES[1:]]  # still cheaper than the next point
    new = _bench_run(tmp_path / "new", {"default": (new_rates, PSNRS), "avif": (RATES, PSNRS)})
    compare = benchmark_script("compare_bench_runs")
    assert compare.main([str(new), str(old)]) == 0
    out = capsys.readouterr().out
    assert f"old range {PSNRS[1]:.2f}-{PSNRS[4]:.2f} dB" in out
    direct = out.split("new default against old default:")[1].split("%")[0]
    assert float(direct) == pytest.approx(-10.0, abs=1.0)  # the dearer lowest point bends the interpolant near 28.9 dB
    rule = out.split("over the old range): ")[1].split("\n")[0]  # e.g. "+19.93 -> +7.97 % (+11.96 points): met"
    old_bd, new_bd = (float(v.strip(" %")) for v in rule.split(" (")[0].split("->"))
    assert old_bd == pytest.approx(20.0, abs=0.2) and new_bd == pytest.approx(8.0, abs=1.5) and rule.endswith(": met")
    own = [ln for ln in out.splitlines() if "own range" in ln][0]  # the new curve over its own range
    assert float(own.split("own range")[1].split("%")[0]) > 8.0
    assert compare.main([str(old), str(new)]) == 0
    assert "not met" in capsys.readouterr().out


def test_bd_rate_without_overlap_or_points():
    pytest.importorskip("bjontegaard")
    r = bench.bd_rate(RATES, PSNRS, RATES, [p + 20 for p in PSNRS])
    assert r.value is None and "no common quality range" in r.note
    r = bench.bd_rate(RATES, PSNRS, [0.5], [30.0])
    assert r.value is None and "1 usable point" in r.note
    # a point no better than a cheaper one is left out, not fed to the interpolator
    r = bench.bd_rate(RATES, PSNRS, RATES + [2.0], PSNRS + [30.0])
    assert abs(r.value) < 1e-9


def test_reference_bd_rates_from_shared_anchors():
    """LALIC vs VTM-9.1 on Kodak: -15.26 % as the paper reports (shared/anchors/README.md)."""
    pytest.importorskip("bjontegaard")
    root = shared_dir() / "anchors"
    if not (root / "lalic" / "kodak-lalic.json").is_file():
        pytest.skip("shared anchors not present")
    vtm = bench.load_curve(root / "kodak-compressai" / "vtm.json")
    lalic = bench.load_curve(root / "lalic" / "kodak-lalic.json")
    r = bench.bd_rate(vtm.values("bpp"), vtm.values("psnr"), lalic.values("bpp"), lalic.values("psnr"))
    assert r.value == pytest.approx(-15.26, abs=0.01)


# ------------------------------------------------------------------------------------------------
# the command


@pytest.fixture
def tiny_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(natural_image(64, 96, seed=i)).save(folder / f"im{i}.png")
    return folder


def test_missing_extras_is_one_line_exit_3(tmp_path, tiny_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "bjontegaard", None)  # as if not installed
    r = CliRunner().invoke(main, ["bench", str(tiny_images), "--out", str(tmp_path / "o")])
    assert r.exit_code == 3
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "bjontegaard" in lines[0] and "pip install" in lines[0] and lines[0].startswith("codec: error:")
    assert not (tmp_path / "o").exists()


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "lalic_codec.bench", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--anchor" in r.stdout and "python -m lalic_codec.bench" in r.stdout


def test_bench_end_to_end(tmp_path, tiny_images, tiny_vr_weights, tiny_lalic_weights):
    for mod in ("bjontegaard", "matplotlib", "pytorch_msssim"):
        pytest.importorskip(mod)
    from lalic_codec import imaging, loading, pipeline

    # a published curve in LALIC's spelling: JPEG's own curve at 10 % lower rate, measured below
    out = tmp_path / "out"
    args = ["bench", str(tiny_images), "--model", "default", "--model", "lalic",
            "--weights", f"default={tiny_vr_weights}", "--weights", f"lalic={tiny_lalic_weights}",
            "--quality", "1,8", "--device", "cpu", "--codecs", "jpeg", "--codec-quality", "jpeg=20,50,80",
            "--out", str(out)]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "BD-rate against JPEG" in r.output

    records = json.loads((out / "per-image.json").read_text())
    assert len(records) == 3 * (2 + 1 + 3)
    lm = loading.load_model("default", tiny_vr_weights, "cpu")
    for rec in records:
        assert rec["bpp"] == pytest.approx(8 * rec["bytes"] / (rec["width"] * rec["height"]), rel=1e-12)
        assert (rec["width"], rec["height"]) == (96, 64)
        assert rec["ms_ssim"] is None and rec["ms_ssim_db"] is None  # 64 px: below MS-SSIM's minimum
        ref = np.asarray(Image.open(tiny_images / rec["image"]).convert("RGB"))
        if rec["curve"] == "default":  # the real .lic file, header included, and PSNR on its decoded output
            data = pipeline.encode_image(imaging.open_image(tiny_images / rec["image"]), lm, rec["quality"]).data
            dec = np.asarray(pipeline.decode_bytes(data, tiny_vr_weights, "cpu").image.convert("RGB"))
        elif rec["curve"] == "JPEG":
            buf = io.BytesIO()
            Image.fromarray(ref).save(buf, format="JPEG", quality=int(rec["quality"]))
            data = buf.getvalue()
            dec = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        else:
            assert rec["curve"] == "lalic" and rec["weights"] == Path(tiny_lalic_weights).name
            continue
        assert rec["bytes"] == len(data)
        mse = ((ref.astype(np.float64) - dec) ** 2).mean()
        assert rec["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)

    for stem, n in (("default", 2), ("lalic", 1), ("jpeg", 3)):
        d = json.loads((out / f"{stem}.json").read_text())
        assert set(d) >= {"name", "description", "results"}
        res = d["results"]
        for key in ("bpp", "psnr-rgb", "ms-ssim-rgb", "ms-ssim-db-rgb", "encoding_time", "decoding_time", "peak_rss_mib"):
            assert len(res[key]) == n, key
        mine = [x for x in records if x["curve"] == d["name"]]
        assert res["bpp"][0] == pytest.approx(np.mean([x["bpp"] for x in mine[:3]]))
        assert res["ms-ssim-rgb"] == [None] * n
        assert all(t > 0 for t in res["encoding_time"] + res["decoding_time"])
    assert json.loads((out / "default.json").read_text())["results"]["quality"] == [1.0, 8.0]

    bd = json.loads((out / "bd-rate.json").read_text())
    assert bd["anchor"] == "JPEG"
    row = next(x for x in bd["curves"] if x["curve"] == "JPEG")
    assert row["anchor"] and abs(row["bd_rate_psnr"]) < 1e-9
    assert row["bd_rate_ms_ssim_db"] is None and "no MS-SSIM" in row["note_ms_ssim_db"]

    summary = (out / "summary.md").read_text()
    assert "| JPEG | 50 |" in summary and "| default | 8 |" in summary and "MS-SSIM not reported" in summary
    assert (out / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a published curve (LALIC's key spelling) at 10 % lower rate than our JPEG, as the anchor's rival
    jpeg = json.loads((out / "jpeg.json").read_text())["results"]
    pub = tmp_path / "pub.json"
    pub.write_text(json.dumps({"name": "JPEG-10", "results": {"bpp": [0.9 * b for b in jpeg["bpp"]], "psnr": jpeg["psnr-rgb"]}}))
    out2 = tmp_path / "out2"
    r = CliRunner().invoke(main, ["bench", str(tiny_images), "--model", "none", "--codecs", "jpeg", "--codec-quality",
                                  "jpeg=20,50,80", "--published", str(pub), "--quiet", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    row = next(x for x in json.loads((out2 / "bd-rate.json").read_text())["curves"] if x["curve"].startswith("JPEG-10"))
    assert row["bd_rate_psnr"] == pytest.approx(-10.0, abs=1e-6)


def test_bad_options(tmp_path, tiny_images, tiny_vr_weights):
    for mod in ("bjontegaard", "matplotlib", "pytorch_msssim"):
        pytest.importorskip(mod)
    base = ["bench", str(tiny_images), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, base + ["--codecs", "jpeg,bmp"])
    assert r.exit_code == 2 and "unknown codec" in r.output
    r = CliRunner().invoke(main, base + ["--weights", str(tiny_vr_weights), "--quality", "9", "--codecs", "none"])
    assert r.exit_code == 3 and "quality must be between 1 and 8" in r.output
    r = CliRunner().invoke(main, base + ["--model", "none", "--codecs", "jpeg", "--anchor", "no-such-curve", "--anchors-dir", str(tmp_path)])
    assert r.exit_code == 3 and "no published curve" in r.output
    assert not (tmp_path / "o").exists()
