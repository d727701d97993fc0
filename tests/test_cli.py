"""The codec command: round trips, pipes, folders, exit codes, atomic writes, torch-free start-up."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import natural_image
from lalic_codec.cli import main

PY = sys.executable


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_encode_decode_info(tmp_path, rgb_png, tiny_vr_weights):
    lic, out = tmp_path / "a.lic", tmp_path / "a.png"
    r = run("encode", rgb_png, lic, "--weights", tiny_vr_weights, "--quality", 3, "--psnr")
    assert r.exit_code == 0, r.output
    assert "bpp" in r.output and "PSNR" in r.output and "quality 3" in r.output
    r = run("decode", lic, out, "--weights", tiny_vr_weights)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (203, 97)
    r = run("info", lic, "--json")
    info = json.loads(r.output)
    assert r.exit_code == 0 and info["width"] == 203 and info["height"] == 97 and info["crc_ok"]
    assert info["quality"] == 3 and info["streams_per_tile"] == 9
    r = run("info", lic)
    assert "all CRCs OK" in r.output
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's


def test_output_format_follows_extension(tmp_path, rgb_png, tiny_vr_weights):
    lic = tmp_path / "a.lic"
    run("encode", rgb_png, lic, "--weights", tiny_vr_weights)
    for ext, fmt_name in ((".jpg", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP")):
        out = tmp_path / f"a{ext}"
        assert run("decode", lic, out, "--weights", tiny_vr_weights).exit_code == 0
        assert Image.open(out).format == fmt_name
    r = run("decode", lic, tmp_path / "a.xyz", "--weights", tiny_vr_weights)
    assert r.exit_code == 3 and "unknown output format" in r.output


def test_never_overwrites_without_force(tmp_path, rgb_png, tiny_vr_weights):
    lic = tmp_path / "a.lic"
    lic.write_bytes(b"precious")
    r = run("encode", rgb_png, lic, "--weights", tiny_vr_weights)
    assert r.exit_code == 6 and "--force" in r.output
    assert lic.read_bytes() == b"precious"
    assert run("encode", rgb_png, lic, "--weights", tiny_vr_weights, "--force").exit_code == 0
    assert lic.read_bytes()[:4] == b"\x89LIC"
    assert not leftovers(tmp_path)


@pytest.mark.parametrize(
    "make,code,words",
    [
        (lambda p: None, 3, "no such file"),
        (lambda p: p.write_text("not an image"), 3, "not a readable image"),
        (lambda p: p.write_bytes(b""), 3, "not a readable image"),
    ],
)
def test_bad_encode_inputs(tmp_path, tiny_vr_weights, make, code, words):
    src = tmp_path / "in.png"
    make(src)
    r = run("encode", src, tmp_path / "o.lic", "--weights", tiny_vr_weights)
    assert r.exit_code == code
    assert words in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.lic").exists() and not leftovers(tmp_path)


def test_bad_decode_inputs(tmp_path, rgb_png, tiny_vr_weights, tiny_lalic_weights):
    lic = tmp_path / "a.lic"
    run("encode", rgb_png, lic, "--weights", tiny_vr_weights)
    data = lic.read_bytes()
    cases = {
        "notlic.lic": (b"hello world, not a lic file", 3, "not a .lic file"),
        "flipped.lic": (data[:100] + bytes([data[100] ^ 1]) + data[101:], 4, "CRC32 mismatch"),
        "short.lic": (data[: len(data) // 2], 4, "truncated"),
    }
    for name, (content, code, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        r = run("decode", tmp_path / name, tmp_path / (name + ".png"), "--weights", tiny_vr_weights)
        assert r.exit_code == code, (name, r.output)
        assert words in r.output and len(r.output.strip().splitlines()) == 1
        assert not (tmp_path / (name + ".png")).exists()
    r = run("decode", lic, tmp_path / "x.png", "--weights", tiny_lalic_weights)
    assert r.exit_code == 5 and "fingerprint" in r.output
    r = run("decode", lic, tmp_path / "x.png")
    assert r.exit_code == 5 and "--weights" in r.output
    r = run("decode", lic, tmp_path / "nowhere" / "x.png", "--weights", tiny_vr_weights)
    assert r.exit_code == 3 and "no such folder" in r.output
    r = run("info", tmp_path / "flipped.lic")
    assert r.exit_code == 4 and "CORRUPT" in r.output
    assert not leftovers(tmp_path)


def test_folders_report_bad_files_and_skip_existing(tmp_path, tiny_vr_weights):
    src, dst, back = tmp_path / "in", tmp_path / "out", tmp_path / "back"
    src.mkdir()
    for i in range(3):
        Image.fromarray(natural_image(40 + i, 50, seed=i)).save(src / f"img{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG garbage")
    (src / "notes.txt").write_text("ignored: not an image suffix")
    r = run("encode", src, dst, "--weights", tiny_vr_weights)
    assert r.exit_code == 3
    assert "encoded 3 files" in r.output and "1 failed" in r.output and "broken.png" in r.output
    assert sorted(p.name for p in dst.iterdir()) == ["img0.lic", "img1.lic", "img2.lic"]
    (dst / "img1.lic").unlink()
    r = run("encode", src, dst, "--weights", tiny_vr_weights, "--skip-existing")
    assert "encoded 1 file" in r.output and "skipped 2 existing" in r.output
    r = run("decode", dst, back, "--weights", tiny_vr_weights)
    assert r.exit_code == 0 and "decoded 3 files" in r.output
    assert sorted(p.name for p in back.iterdir()) == ["img0.png", "img1.png", "img2.png"]


def test_shell_pipeline(tmp_path, rgb_png, tiny_vr_weights):
    cmd = f"cat {rgb_png} | {PY} -m lalic_codec.cli encode - - --weights {tiny_vr_weights} | {PY} -m lalic_codec.cli decode - {tmp_path / 'b.png'} --weights {tiny_vr_weights}"
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    ref = tmp_path / "a.lic"
    run("encode", rgb_png, ref, "--weights", tiny_vr_weights)
    run("decode", ref, tmp_path / "a.png", "--weights", tiny_vr_weights)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_help_version_and_info_do_not_import_torch(tmp_path, rgb_png, tiny_vr_weights):
    lic = tmp_path / "a.lic"
    run("encode", rgb_png, lic, "--weights", tiny_vr_weights)
    probe = (
        "import sys\n"
        "from lalic_codec.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n"
        "sys.exit(code)\n"
    )
    for args in (["--help"], ["--version"], ["info", str(lic)], ["info", "--json", str(lic)]):
        p = subprocess.run([PY, "-c", probe, *args], capture_output=True, text=True)
        assert p.returncode == 0, (args, p.stderr)


def test_quality_and_target_are_exclusive(tmp_path, rgb_png, tiny_vr_weights):
    r = CliRunner().invoke(main, ["encode", str(rgb_png), str(tmp_path / "a.lic"), "--weights", str(tiny_vr_weights), "-q", "2", "--target-bpp", "1"])
    assert r.exit_code == 2
