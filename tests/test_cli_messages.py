"""What the codec command says: error messages a person can act on (the file's name and what it
is, our own limits, unknown models, files that are not checkpoints)."""

import io
import os
import pickle

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import natural_image
from lalic_codec.cli import main


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def error_line(r) -> str:
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("codec: error: "), r.output
    assert "Traceback" not in r.output and "<_io." not in r.output and " at 0x" not in r.output, r.output
    return lines[0][len("codec: error: "):]


# ------------------------------------------------------------------------------------------------
# A. inputs that are not images: the name, and what the file is


def _pdf() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PDF")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,content,words",
    [
        ("empty.png", b"", "empty file"),
        ("notes.txt", b"shopping list:\n- milk\n- bread\n", "a text file?"),
        ("photo.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "a damaged or truncated PNG"),
        ("doc.pdf", _pdf(), "a PDF document"),
        ("pic.heic", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "HEIF"),
        ("old.lic", b"\x89LIC\r\n\x1a\n" + b"\0" * 40, "a .lic file"),
        ("blob", bytes(range(256)) * 4, "not a format the codec reads"),
    ],
)
def test_encode_names_the_input_and_says_what_it_is(tmp_path, tiny_vr_weights, name, content, words):
    src = tmp_path / name
    src.write_bytes(content)
    r = run("encode", src, tmp_path / "o.lic", "--weights", tiny_vr_weights)
    assert r.exit_code == 3, r.output
    msg = error_line(r)
    assert msg.startswith(f"{src}: ") and words in msg, msg
    assert not (tmp_path / "o.lic").exists()


def test_encode_from_stdin_names_stdin(tmp_path, tiny_vr_weights):
    r = run("encode", "-", tmp_path / "o.lic", "--weights", tiny_vr_weights, input=b"")
    assert r.exit_code == 3 and error_line(r) == "stdin: not a readable image: empty file"


def test_truncated_image_in_a_folder_is_listed_once_by_name(tmp_path, tiny_vr_weights):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(natural_image(40, 48)).save(src / "good.png")
    (src / "empty.png").write_bytes(b"")
    r = run("encode", src, tmp_path / "out", "--weights", tiny_vr_weights)
    assert r.exit_code == 3
    assert f"  {src / 'empty.png'}: not a readable image: empty file" in r.output.splitlines(), r.output


def test_decode_names_the_input_and_says_what_it_is(tmp_path, rgb_png, tiny_vr_weights):
    for name, content, words in (("a.lic", b"", "empty"), ("img.png", rgb_png.read_bytes(), "a PNG image")):
        (tmp_path / name).write_bytes(content)
        r = run("decode", tmp_path / name, tmp_path / "o.png", "--weights", tiny_vr_weights)
        assert r.exit_code == 3, r.output
        msg = error_line(r)
        assert msg.startswith(f"{tmp_path / name}: not a .lic file") and words in msg, msg


# ------------------------------------------------------------------------------------------------
# A. size limits: ours and --max-pixels, never Pillow's internal double


def test_size_limit_states_our_limit_and_max_pixels(tmp_path, tiny_vr_weights):
    src = tmp_path / "big.png"
    Image.fromarray(natural_image(40, 50)).save(src)  # 2000 pixels
    for limit in (1999, 999, 100):  # under Pillow's check (2 x the limit) and over it
        r = run("encode", src, tmp_path / "o.lic", "--weights", tiny_vr_weights, "--max-pixels", limit)
        assert r.exit_code == 3
        msg = error_line(r)
        assert msg == f"{src}: image is 50x40 = 2000 pixels, more than the limit of {limit} pixels (--max-pixels {limit})", msg
        assert "decompression bomb" not in msg and f"limit of {2 * limit}" not in msg


def test_size_limit_by_default_says_how_to_raise_it(monkeypatch, tmp_path, tiny_vr_weights):
    from lalic_codec import imaging

    src = tmp_path / "big.png"
    Image.fromarray(natural_image(40, 50)).save(src)
    monkeypatch.setattr(imaging, "MAX_PIXELS", 900)
    r = run("encode", src, tmp_path / "o.lic", "--weights", tiny_vr_weights)
    assert r.exit_code == 3
    assert error_line(r) == f"{src}: image is 50x40 = 2000 pixels, more than the limit of 900 pixels (the default; --max-pixels N changes it)"


# ------------------------------------------------------------------------------------------------
# A. --model and --weights


def test_unknown_model_is_named_with_the_choices(tmp_path, rgb_png):
    r = run("encode", "--model", "foo", rgb_png, tmp_path / "o.lic")
    assert r.exit_code == 2, r.output
    assert "unknown model foo (choose from default, lalic, mambaic)" in r.output
    assert "bundled weights" not in r.output and not (tmp_path / "o.lic").exists()


@pytest.mark.parametrize(
    "name,content,words",
    [
        ("notes.txt", b"these are my notes\n", "not a checkpoint (a text file?)"),
        ("empty.pth", b"", "not a checkpoint (an empty file)"),
        ("photo.pth", None, "not a checkpoint (a PNG image)"),
        ("zeros.bin", b"\0" * 100, "not a checkpoint"),
    ],
)
def test_weights_that_are_not_a_checkpoint_say_so(tmp_path, rgb_png, name, content, words):
    w = tmp_path / name
    w.write_bytes(rgb_png.read_bytes() if content is None else content)
    r = run("encode", rgb_png, tmp_path / "o.lic", "--weights", w)
    assert r.exit_code == 5, r.output
    msg = error_line(r)
    assert msg.startswith(f"{name} is ") and words in msg, msg
    assert "weights-only" not in msg and ": 101" not in msg


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_pickles_that_would_run_code_get_our_own_sentence(tmp_path, rgb_png):
    import torch

    tensors = {"g_a.0.weight": torch.zeros(2, 3, 5, 5)}
    zip_ckpt, legacy, raw = tmp_path / "evil.pth.tar", tmp_path / "legacy.pth", tmp_path / "raw.pt"
    torch.save({"state_dict": tensors, "extra": _Payload()}, zip_ckpt)
    torch.save({"state_dict": tensors, "extra": _Payload()}, legacy, _use_new_zipfile_serialization=False)
    raw.write_bytes(pickle.dumps(_Payload()))
    for ckpt in (zip_ckpt, legacy, raw):
        r = run("encode", rgb_png, tmp_path / "o.lic", "--model", "lalic", "--weights", ckpt)
        assert r.exit_code == 5, r.output
        msg = error_line(r)
        assert msg.startswith(f"{ckpt.name} is not a weights-only checkpoint: "), msg
        assert "could run code" in msg and "refused" in msg, msg
        assert "weights_only" not in msg and "PyTorch 2.6" not in msg, msg
        if ckpt is not raw:
            assert "system" in msg  # what it would call


# ------------------------------------------------------------------------------------------------
# B. terminals and feedback


def test_binary_output_to_a_terminal_is_refused(tmp_path, rgb_png, tiny_vr_weights):
    import pty
    import select
    import subprocess
    import sys

    master, slave = pty.openpty()
    try:
        cmd = [sys.executable, "-m", "lalic_codec.cli", "encode", str(rgb_png), "-", "--weights", str(tiny_vr_weights)]
        p = subprocess.run(cmd, stdout=slave, stderr=subprocess.PIPE, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert "refusing to write binary .lic data to a terminal (OUT is -)" in p.stderr
        assert "codec encode IN - > OUT.lic" in p.stderr and "Traceback" not in p.stderr
        assert select.select([master], [], [], 0.2)[0] == []  # not a byte reached the terminal
    finally:
        os.close(master)
        os.close(slave)


def test_decoded_image_to_a_terminal_is_refused(monkeypatch, tmp_path, rgb_png, tiny_vr_weights):
    from lalic_codec import cli

    lic = tmp_path / "a.lic"
    assert run("encode", rgb_png, lic, "--weights", tiny_vr_weights).exit_code == 0
    monkeypatch.setattr(cli, "_stdout_is_terminal", lambda: True)
    r = CliRunner().invoke(main, ["decode", str(lic), "-", "--weights", str(tiny_vr_weights), "--format", "jpg"])
    assert r.exit_code == 2 and r.stdout_bytes == b""
    assert "refusing to write image data to a terminal (OUT is -)" in r.stderr and "> OUT.jpg" in r.stderr
    r = CliRunner().invoke(main, ["encode", str(rgb_png), "-", "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 2 and r.stdout_bytes == b"" and "terminal" in r.stderr
    r = CliRunner().invoke(main, ["decode", str(lic), str(tmp_path / "a.png"), "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 0  # files are fine whatever stdout is


def test_stdin_to_stdout_prints_its_summary_on_stderr(rgb_png, tiny_vr_weights):
    r = CliRunner().invoke(main, ["encode", "-", "-", "--weights", str(tiny_vr_weights)], input=rgb_png.read_bytes())
    assert r.exit_code == 0 and r.stdout_bytes[:4] == b"\x89LIC"
    assert r.stderr.startswith("stdin -> stdout: 203x97, ") and "bpp, quality 4" in r.stderr, r.stderr
    lic = r.stdout_bytes
    r = CliRunner().invoke(main, ["decode", "-", "-", "--weights", str(tiny_vr_weights)], input=lic)
    assert r.exit_code == 0 and r.stdout_bytes[:4] == b"\x89PNG" and r.stderr == "stdin -> stdout: 203x97 RGB\n"
    r = CliRunner().invoke(main, ["encode", "-", "-", "--weights", str(tiny_vr_weights), "--quiet"], input=rgb_png.read_bytes())
    assert r.exit_code == 0 and r.stderr == ""


def test_animated_images_say_only_the_first_frame_is_coded(tmp_path, tiny_vr_weights):
    frames = [Image.fromarray(natural_image(30, 40, seed=i)) for i in range(3)]
    for name in ("anim.gif", "anim.webp", "anim.png"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100)
        r = CliRunner().invoke(main, ["encode", str(tmp_path / name), str(tmp_path / f"{name}.lic"), "--weights", str(tiny_vr_weights)])
        assert r.exit_code == 0, r.output
        assert "(only the first of its 3 frames is coded)" in r.stderr, (name, r.stderr)
    frames[0].save(tmp_path / "still.gif")
    r = CliRunner().invoke(main, ["encode", str(tmp_path / "still.gif"), str(tmp_path / "still.lic"), "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 0 and "frame" not in r.stderr


def test_encode_warns_when_the_output_name_is_not_lic(tmp_path, rgb_png, tiny_vr_weights):
    r = CliRunner().invoke(main, ["encode", str(rgb_png), str(tmp_path / "out.png"), "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 0 and (tmp_path / "out.png").read_bytes()[:4] == b"\x89LIC"
    assert r.stderr.startswith(f"codec: warning: {tmp_path / 'out.png'} does not end in .lic"), r.stderr
    for name in ("out.lic", "OUT.LIC"):
        r = CliRunner().invoke(main, ["encode", str(rgb_png), str(tmp_path / name), "--weights", str(tiny_vr_weights)])
        assert r.exit_code == 0 and "warning" not in r.stderr
    r = CliRunner().invoke(main, ["encode", str(rgb_png), str(tmp_path / "q.bin"), "--weights", str(tiny_vr_weights), "--quiet"])
    assert r.exit_code == 0 and r.stderr == ""


def test_per_file_lines_do_not_overwrite_the_progress_bar(monkeypatch, tmp_path, tiny_vr_weights):
    import re

    from lalic_codec import cli

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(natural_image(40, 48, seed=i)).save(src / f"img{i}.png")
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    r = CliRunner().invoke(main, ["encode", str(src), str(tmp_path / "out"), "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 0, r.stderr
    assert "file/s]" in r.stderr or "s/file]" in r.stderr  # the bar was drawn
    segments = re.split(r"[\r\n]", r.stderr)
    lines = [s for s in segments if " -> " in s]
    assert len(lines) == 3 and all(s.startswith(str(src / "img")) for s in lines), lines  # each at the start of a line
    assert "encoded 3 files" in segments


def test_target_bpp_shows_each_trial(tmp_path, rgb_png, tiny_vr_weights):
    r = CliRunner().invoke(main, ["encode", str(rgb_png), str(tmp_path / "a.lic"), "--weights", str(tiny_vr_weights), "--target-bpp", "3"])
    assert r.exit_code == 0, r.output
    trials = [ln for ln in r.stderr.splitlines() if ln.startswith("  trying quality ")]
    assert len(trials) >= 2 and all(ln.endswith("bpp (target 3)") for ln in trials), r.stderr
    assert trials[0].startswith("  trying quality 1: ")
    r = CliRunner().invoke(main, ["encode", str(rgb_png), str(tmp_path / "b.lic"), "--weights", str(tiny_vr_weights), "--target-bpp", "3", "--quiet"])
    assert r.exit_code == 0 and r.stderr == ""


# ------------------------------------------------------------------------------------------------
# C. folders take what single files take; -r keeps the tree; every file left out is listed


def test_folders_take_images_by_content_and_list_what_they_leave_out(tmp_path, tiny_vr_weights):
    from PIL import features

    src, dst = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(natural_image(40, 48, seed=0)).save(src / "a.png")
    Image.fromarray(natural_image(40, 48, seed=1)).save(src / "scan", format="PNG")  # no extension
    Image.fromarray(natural_image(40, 48, seed=2)).save(src / "b.JPG_original", format="JPEG")
    Image.fromarray(natural_image(40, 48, seed=3)).save(src / "sub" / "d.png")
    (src / "notes.txt").write_text("not an image\n")
    expected = ["a.lic", "b.lic", "scan.lic"]
    if features.check("avif"):
        Image.fromarray(natural_image(40, 48, seed=4)).save(src / "c.avif", quality=90)
        expected = ["a.lic", "b.lic", "c.lic", "scan.lic"]
    r = CliRunner().invoke(main, ["encode", str(src), str(dst), "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in dst.iterdir()) == expected
    lines = r.stderr.splitlines()
    assert f"encoded {len(expected)} files, 2 ignored" in lines
    assert f"  {src / 'notes.txt'}: ignored (a text file)" in lines, r.stderr
    assert f"  {src / 'sub'}/: ignored (a folder; -r includes subfolders)" in lines, r.stderr
    # decode: .lic files by content too, and the others listed
    (dst / "renamed").write_bytes((dst / "a.lic").read_bytes())
    (dst / "readme.md").write_text("# hello\n")
    back = tmp_path / "back"
    r = CliRunner().invoke(main, ["decode", str(dst), str(back), "--weights", str(tiny_vr_weights)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in back.iterdir()) == sorted([n[:-4] + ".png" for n in expected] + ["renamed.png"])
    assert f"  {dst / 'readme.md'}: ignored (a text file, not a .lic file)" in r.stderr.splitlines(), r.stderr


def test_a_folder_with_nothing_to_code_says_what_it_ignored(tmp_path, tiny_vr_weights):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "notes.txt").write_text("hello\n")
    r = run("encode", src, tmp_path / "out", "--weights", tiny_vr_weights)
    assert r.exit_code == 3
    assert error_line(r) == f"{src}: no input files found (ignored: notes.txt (a text file), sub/ (a folder; -r includes subfolders))"


def test_recursive_keeps_the_tree(tmp_path, tiny_vr_weights):
    src, dst, back = tmp_path / "in", tmp_path / "out", tmp_path / "back"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    for i, rel in enumerate(("a.png", "sub/b.png", "sub/deeper/c.png", "sub/deeper/a.png")):
        Image.fromarray(natural_image(40, 48, seed=i)).save(src / rel)
    r = run("encode", "-r", src, dst, "--weights", tiny_vr_weights)
    assert r.exit_code == 0, r.output
    assert "encoded 4 files" in r.output and "ignored" not in r.output
    tree = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert tree == ["a.lic", "sub/b.lic", "sub/deeper/a.lic", "sub/deeper/c.lic"]
    assert not (dst / "empty").exists()
    r = run("decode", "--recursive", dst, back, "--weights", tiny_vr_weights)
    assert r.exit_code == 0, r.output
    assert sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file()) == [t[:-4] + ".png" for t in tree]
    r = run("encode", "-r", src, dst, "--weights", tiny_vr_weights, "--skip-existing")
    assert r.exit_code == 0 and "skipped 4 existing" in r.output


def test_lic_over_the_pixel_limit_says_where_the_limit_comes_from(tmp_path, tiny_vr_weights):
    src = tmp_path / "a.png"
    Image.fromarray(natural_image(40, 50)).save(src)
    lic = tmp_path / "a.lic"
    assert run("encode", src, lic, "--weights", tiny_vr_weights).exit_code == 0
    r = run("decode", lic, tmp_path / "b.png", "--weights", tiny_vr_weights, "--max-pixels", "1000")
    assert r.exit_code == 3
    assert error_line(r).endswith("image is 50x40 = 2000 pixels, more than the limit of 1000 pixels (--max-pixels 1000)"), error_line(r)
