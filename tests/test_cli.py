"""The codec command: round trips, pipes, folders, exit codes, atomic writes, torch-free start-up."""

import json
import os
import re
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
    assert info["quality"] == 3 and info["streams_per_tile"] == 1 and info["merged_streams"]  # 9 merged (FORMAT.md 12.8)
    r = run("info", lic)
    assert "all CRCs OK" in r.output
    entropy = {0: "device-independent (integer table indexes: decodes on any device)",
               1: "parameters computed on cpu (decodes on a cpu device)"}[info["device_class"]]
    assert f"entropy:     {entropy}\n" in r.output
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's


def test_psnr_of_a_16_bit_image_is_measured_at_8_bits(tmp_path, tiny_vr_weights):
    """--psnr compares what was coded: 16-bit samples scaled to 8 bits on both sides (the decoded
    16-bit image was clipped by Pillow's RGB conversion: 11.5 dB reported for a 37 dB decode)."""
    from lalic_codec import imaging, pipeline

    g16 = natural_image(48, 64)[..., 0].astype(np.uint16) * 257
    src, lic = tmp_path / "g16.png", tmp_path / "g16.lic"
    Image.fromarray(g16).save(src)
    r = run("encode", src, lic, "--weights", tiny_vr_weights, "--psnr")
    assert r.exit_code == 0, r.output
    reported = float(re.search(r"PSNR ([0-9.]+) dB", r.output).group(1))
    eight = pipeline.decode_bytes(lic.read_bytes(), str(tiny_vr_weights), "cpu", high_bit_depth=False).image
    assert eight.mode == "L"
    want = imaging.psnr((g16 // 257).astype(np.uint8), np.asarray(eight))
    assert abs(reported - want) < 0.006, (reported, want)
    assert "(16-bit image coded at 8 bits per sample)" in r.output
    # a floating-point image (samples in [0, 1]) is said to be one, and measured the same way
    Image.fromarray(g16.astype(np.float32) / 65535).save(tmp_path / "f32.tif")
    r = run("encode", tmp_path / "f32.tif", tmp_path / "f32.lic", "--weights", tiny_vr_weights, "--psnr")
    assert r.exit_code == 0 and "(floating-point image coded at 8 bits per sample)" in r.output, r.output
    assert float(re.search(r"PSNR ([0-9.]+) dB", r.output).group(1)) == reported  # the same 8-bit samples


def test_decoding_to_a_format_without_alpha_says_the_alpha_is_dropped(tmp_path, tiny_vr_weights):
    a = np.dstack([natural_image(40, 56), np.tile(np.linspace(0, 255, 56).astype(np.uint8), (40, 1))])
    Image.fromarray(a).save(tmp_path / "a.png")
    lic = tmp_path / "a.lic"
    assert run("encode", tmp_path / "a.png", lic, "--weights", tiny_vr_weights).exit_code == 0
    for ext, mode, lost in ((".jpg", "RGB", "JPEG"), (".bmp", "RGB", "BMP"), (".ppm", "RGB", "PPM"), (".png", "RGBA", None),
                            (".webp", "RGBA", None), (".tif", "RGBA", None)):
        out = tmp_path / f"b{ext}"
        r = run("decode", lic, out, "--weights", tiny_vr_weights)
        assert r.exit_code == 0, r.output
        said = f"(alpha dropped: {lost} has no alpha channel; PNG, WebP and TIFF keep it)"
        assert (said in r.output) if lost else "alpha" not in r.output, (ext, r.output)
        assert Image.open(out).mode == mode, ext
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png"))[..., 3], a[..., 3])  # alpha is lossless


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
        "flipped.lic": (data[:-10] + bytes([data[-10] ^ 1]) + data[-9:], 4, "CRC32 mismatch"),  # in the streams
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


# ------------------------------------------------------------------------------------------------
# reliability: interrupted runs, stale temporary files, bad files in folders, crafted checkpoints


def _batch_src(tmp_path, n=60):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        # more than 128 pixels wide: coded once, without the small-image search's dozen tries
        Image.fromarray(natural_image(48, 136, seed=i)).save(src / f"img{i:03d}.png")
    return src


def _start_batch(src, dst, weights, *extra):
    import signal

    cmd = [PY, "-m", "lalic_codec.cli", "encode", str(src), str(dst), "--weights", str(weights), *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, even if we run in the background
    )


def _wait_for_outputs(proc, dst, n, timeout=120):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if dst.is_dir() and sum(1 for p in dst.iterdir() if p.suffix == ".lic") >= n:
            return
        time.sleep(0.002)
    raise AssertionError(f"no {n} outputs (exit status {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}")


def _assert_complete_outputs(dst):
    from lalic_codec.formats import container

    outputs = [p for p in dst.iterdir() if not p.name.startswith(".")]
    for p in outputs:
        assert p.suffix == ".lic", p
        container.read(p.read_bytes())  # complete and valid: every CRC, nothing truncated
    hidden = [p.name for p in dst.iterdir() if p.name.startswith(".")]
    assert all(re.fullmatch(r"\.img\d{3}\.lic\.[a-z0-9_]{8}\.tmp", n) for n in hidden), hidden
    return outputs, hidden


def test_sigkill_mid_batch_leaves_only_complete_outputs_and_a_rerun_finishes(tmp_path, tiny_vr_weights):
    import fcntl
    import signal

    src, dst = _batch_src(tmp_path), tmp_path / "out"
    proc = _start_batch(src, dst, tiny_vr_weights)
    _wait_for_outputs(proc, dst, 3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    outputs, hidden = _assert_complete_outputs(dst)
    assert 3 <= len(outputs) < 60
    # what a killed run can leave: a temporary file (here made old), and the one of a live writer
    stale, live = dst / ".img059.lic.abcdefgh.tmp", dst / ".img058.lic.zzzzzzzz.tmp"
    stale.write_bytes(b"\x89LIC half a file")
    live.write_bytes(b"\x89LIC being written")
    for p in (stale, live):
        os.utime(p, (1e9, 1e9))
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a concurrent writer holds its lock
        proc = _start_batch(src, dst, tiny_vr_weights, "--skip-existing")
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert f"skipped {len(outputs)} existing" in err and f"encoded {60 - len(outputs)} files" in err
    assert f"removed {len(hidden) + 1} temporary file" in err
    assert not stale.exists() and live.exists()
    live.unlink()
    outputs, hidden = _assert_complete_outputs(dst)
    assert len(outputs) == 60 and not hidden


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_exit_130_without_partial_outputs(tmp_path, tiny_vr_weights, signame):
    import signal

    src, dst = _batch_src(tmp_path), tmp_path / "out"
    proc = _start_batch(src, dst, tiny_vr_weights)
    _wait_for_outputs(proc, dst, 2)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "codec: interrupted" in err and "run again with --skip-existing" in err and "Traceback" not in err
    outputs, hidden = _assert_complete_outputs(dst)
    assert not hidden and 2 <= len(outputs) < 60


def test_sigterm_while_writing_removes_the_temporary_file(tmp_path, rgb_png, tiny_vr_weights, monkeypatch):
    import signal

    from lalic_codec import imaging

    lic = tmp_path / "a.lic"
    assert run("encode", rgb_png, lic, "--weights", tiny_vr_weights).exit_code == 0
    real_save = imaging.save_image

    def interrupted_save(im, fp, fmt_name):
        fp.write(b"\x89PNG half an image")
        fp.flush()
        assert leftovers(tmp_path)  # the temporary file exists now
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises KeyboardInterrupt right here
        real_save(im, fp, fmt_name)

    monkeypatch.setattr(imaging, "save_image", interrupted_save)
    before = signal.getsignal(signal.SIGTERM)
    r = CliRunner().invoke(main, ["decode", str(lic), str(tmp_path / "a.png"), "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 130 and "interrupted" in r.output
    assert not (tmp_path / "a.png").exists() and not leftovers(tmp_path)
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored


def test_stale_temporary_files_are_removed_only_when_dead_and_ours(tmp_path):
    import fcntl
    import time

    from lalic_codec.cli import clean_stale_temps

    names = {"a.lic", "b.lic"}
    files = {n: tmp_path / n for n in (".a.lic.abcd1234.tmp", ".b.lic.xyz_9876.tmp", ".c.lic.abcd1234.tmp", ".a.lic.tmp", "a.lic")}
    for p in files.values():
        p.write_bytes(b"x")
        os.utime(p, (1e9, 1e9))
    fresh = tmp_path / ".a.lic.fresh123.tmp"
    fresh.write_bytes(b"x")  # newer than the run: may belong to a run that just started
    with open(files[".b.lic.xyz_9876.tmp"], "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert clean_stale_temps(tmp_path, names, time.time() - 60) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lic.fresh123.tmp", ".a.lic.tmp", ".b.lic.xyz_9876.tmp", ".c.lic.abcd1234.tmp", "a.lic"]


def test_outputs_with_names_near_the_file_system_limit_are_written(tmp_path, rgb_png, tiny_vr_weights):
    """An output name of up to 255 bytes is valid, but its temporary name (``.NAME.XXXXXXXX.tmp``)
    is 14 bytes longer: it is cut to fit, and the leftovers of such a name are still recognised."""
    import time

    from lalic_codec.cli import clean_stale_temps

    (tmp_path / "out").mkdir()
    (tmp_path / "back").mkdir()
    for stem in ("a" * 251, "x" + "\u00e9" * 125):  # 255 bytes with ".lic"; the second cut inside a character
        src = tmp_path / f"{stem}.png"
        src.write_bytes(Path(rgb_png).read_bytes())
        r = run("encode", src, tmp_path / "out", "--weights", tiny_vr_weights, "--quiet")
        assert r.exit_code == 0, r.output
        r = run("decode", tmp_path / "out" / f"{stem}.lic", tmp_path / "back" / f"{stem}.png", "--weights", tiny_vr_weights, "--quiet")
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{s}.lic" for s in ("a" * 251, "x" + "\u00e9" * 125))
    assert sorted(len(p.name.encode()) for p in (tmp_path / "back").iterdir()) == [255, 255]
    name = "b" * 251 + ".lic"
    stale = tmp_path / ("." + "b" * 241 + ".abcd1234.tmp")  # what a killed writer of `name` leaves
    stale.write_bytes(b"x")
    os.utime(stale, (1e9, 1e9))
    assert clean_stale_temps(tmp_path, {name}, time.time() - 60) == 1 and not stale.exists()


def test_folder_summary_lists_every_bad_file_with_its_reason(tmp_path, tiny_vr_weights):
    src, dst, back = tmp_path / "in", tmp_path / "out", tmp_path / "back"
    src.mkdir()
    Image.fromarray(natural_image(40, 50)).save(src / "good.png")
    Image.fromarray(natural_image(120, 100)).save(src / "big.png")
    (src / "text.jpg").write_text("not a picture")
    png = (src / "good.png").read_bytes()
    (src / "cut.png").write_bytes(png[: len(png) // 2])
    r = run("encode", src, dst, "--weights", tiny_vr_weights, "--max-pixels", 10000, "--quiet")
    assert r.exit_code == 3
    lines = r.output.strip().splitlines()
    assert "encoded 1 file, 3 failed" in lines[0]
    reasons = {ln.split(":")[0].strip(): ln for ln in lines[1:]}
    assert "more than the limit of 10000 pixels" in reasons[str(src / "big.png")]
    assert "not a readable image" in reasons[str(src / "text.jpg")]
    assert "not a readable image" in reasons[str(src / "cut.png")]
    data = (dst / "good.lic").read_bytes()
    (dst / "flipped.lic").write_bytes(data[:-10] + bytes([data[-10] ^ 4]) + data[-9:])  # in the streams
    (dst / "short.lic").write_bytes(data[:-9])
    (dst / "other.lic").write_bytes(b"GIF89a")
    r = run("decode", dst, back, "--weights", tiny_vr_weights, "--quiet")
    lines = r.output.strip().splitlines()
    assert r.exit_code in (3, 4) and "decoded 1 file, 3 failed" in lines[0]
    reasons = {Path(ln.split(":")[0].strip()).name: ln for ln in lines[1:]}
    assert "CRC32 mismatch" in reasons["flipped.lic"] and "truncated" in reasons["short.lic"]
    assert "not a .lic file" in reasons["other.lic"]
    assert sorted(p.name for p in back.iterdir()) == ["good.png"]


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_crafted_pickle_checkpoints_are_refused_and_never_run(tmp_path, rgb_png, tiny_vr_weights):
    import pickle
    import shlex

    import torch

    marker = tmp_path / "pwned"
    payload = _Payload(f"touch {shlex.quote(str(marker))}")
    tensors = {"g_a.0.weight": torch.zeros(2, 3, 5, 5)}
    zip_ckpt, legacy_ckpt, raw_pickle = tmp_path / "evil.pth.tar", tmp_path / "legacy.pth", tmp_path / "raw.pt"
    torch.save({"state_dict": tensors, "extra": payload}, zip_ckpt)
    torch.save({"state_dict": tensors, "extra": payload}, legacy_ckpt, _use_new_zipfile_serialization=False)
    raw_pickle.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    lic = tmp_path / "a.lic"
    assert run("encode", rgb_png, lic, "--weights", tiny_vr_weights).exit_code == 0
    for ckpt in (zip_ckpt, legacy_ckpt, raw_pickle):
        for args in (["encode", rgb_png, tmp_path / "b.lic", "--model", "lalic"], ["decode", lic, tmp_path / "b.png"]):
            r = run(*args, "--weights", ckpt)
            assert r.exit_code == 5, (ckpt.name, r.output)
            assert "weights-only checkpoint" in r.output and len(r.output.strip().splitlines()) == 1
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "b.lic").exists() and not (tmp_path / "b.png").exists()
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    r = run("decode", lic, tmp_path / "b.png", "--weights", tmp_path / "bad.safetensors")
    assert r.exit_code == 5 and "cannot read bad.safetensors" in r.output
    pickle.loads(raw_pickle.read_bytes())  # the file really is armed: plain unpickling runs it
    assert marker.exists()


def test_readme_exit_status_table_is_complete_and_true():
    import inspect

    from lalic_codec import errors

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Exit status")[1].split("\n\n")[1]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    codes = {c.exit_code for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.CodecError)}
    assert documented == codes | {0, 2}
