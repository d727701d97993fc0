"""The codec command's paths and options: name clashes in folders, --format on stdout, OUT as a
folder, bad option values as usage errors."""

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import natural_image
from lalic_codec.cli import main

PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture
def lic(tmp_path, rgb_png, tiny_vr_weights):
    path = tmp_path / "img.lic"
    assert run("encode", rgb_png, path, "--weights", tiny_vr_weights).exit_code == 0
    return path


# ------------------------------------------------------------------------------------------------
# 1. folders: two inputs that would be written to one output


def _photos(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, name in enumerate(("x.png", "x.jpg", "y.png")):
        Image.fromarray(natural_image(40, 48, seed=i)).save(src / name)
    return src


def test_encode_folder_refuses_name_collisions_before_writing(tmp_path, tiny_vr_weights):
    src, dst = _photos(tmp_path), tmp_path / "out"
    r = run("encode", "--force", src, dst, "--weights", tiny_vr_weights)
    assert r.exit_code == 3, r.output
    assert r.output.strip() == f"codec: error: {src / 'x.jpg'} and {src / 'x.png'} would both be written to {dst / 'x.lic'}"
    assert not dst.exists()  # nothing written, not even the folder
    dst.mkdir()
    r = run("encode", src, dst, "--weights", tiny_vr_weights)
    assert r.exit_code == 3 and "would both be written to" in r.output and "exists" not in r.output
    assert list(dst.iterdir()) == []


def test_decode_folder_refuses_name_collisions_before_writing(tmp_path, lic, tiny_vr_weights):
    src, back = tmp_path / "lics", tmp_path / "back"
    src.mkdir()
    for name in ("a.lic", "a.LIC", "b.lic"):
        shutil.copy(lic, src / name)
    r = run("decode", src, back, "--weights", tiny_vr_weights, "--force")
    assert r.exit_code == 3, r.output
    assert r.output.strip() == f"codec: error: {src / 'a.LIC'} and {src / 'a.lic'} would both be written to {back / 'a.png'}"
    assert not back.exists()


# ------------------------------------------------------------------------------------------------
# 1b. an output that is an input is refused, even with --force (it used to replace the photo)


def test_encode_refuses_to_write_over_its_input(tmp_path, rgb_png, tiny_vr_weights):
    photo = rgb_png.read_bytes()
    r = run("encode", rgb_png, rgb_png, "--force", "--weights", tiny_vr_weights)
    assert r.exit_code == 3, r.output
    assert r.output.strip() == f"codec: error: {rgb_png} is both the input and the output: refusing to write over an input (give another output name)"
    assert rgb_png.read_bytes() == photo
    # the same file under another name: another spelling, a hard link, a symbolic link
    (tmp_path / "hard.lic").hardlink_to(rgb_png)
    (tmp_path / "soft.lic").symlink_to(rgb_png)
    for other in (f"{tmp_path}/./{rgb_png.name}", tmp_path / "hard.lic", tmp_path / "soft.lic"):
        r = run("encode", rgb_png, other, "--force", "--weights", tiny_vr_weights)
        assert r.exit_code == 3 and f"is the same file as the input {rgb_png}" in r.output, (other, r.output)
        assert rgb_png.read_bytes() == photo and Path(other).read_bytes() == photo
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.lic", "img.png", "soft.lic"]  # no temporary file either


def test_decode_refuses_to_write_over_its_input(tmp_path, lic, tiny_vr_weights):
    named = tmp_path / "picture"  # a .lic without an extension: decode would write a PNG under its name
    named.write_bytes(lic.read_bytes())
    r = run("decode", named, named, "--force", "--weights", tiny_vr_weights)
    assert r.exit_code == 3 and "both the input and the output" in r.output, r.output
    assert named.read_bytes() == lic.read_bytes()


def test_a_folder_coded_into_itself_never_writes_over_an_input(tmp_path, tiny_vr_weights):
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(natural_image(40, 48, seed=1)).save(src / "y.png")
    Image.fromarray(natural_image(40, 48, seed=2)).save(src / "x.lic", format="PNG")  # an image by content, misnamed
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    r = run("encode", src, src, "--force", "--weights", tiny_vr_weights)
    assert r.exit_code == 3, r.output
    assert r.output.strip() == f"codec: error: {src / 'x.lic'} is both the input and the output: refusing to write over an input (give another output name)"
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # nothing written: y.lic neither
    # into another folder it is an ordinary input
    r = run("encode", src, tmp_path / "out", "--weights", tiny_vr_weights, "--quiet")
    assert r.exit_code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.lic", "y.lic"], r.output


# ------------------------------------------------------------------------------------------------
# 2. --format: honoured on stdout, unknown formats refused once, up front


def test_decode_to_stdout_honours_format(lic, tiny_vr_weights):
    for args, magic in (((), PNG_MAGIC), (("--format", "jpg"), JPEG_MAGIC), (("--format", "JPEG"), JPEG_MAGIC), (("--format", ".png"), PNG_MAGIC)):
        r = CliRunner().invoke(main, ["decode", str(lic), "-", "--weights", str(tiny_vr_weights), *args])
        assert r.exit_code == 0, (args, r.output)
        assert r.stdout_bytes.startswith(magic), (args, r.stdout_bytes[:8])
    r = CliRunner().invoke(main, ["decode", str(lic), "-", "--weights", str(tiny_vr_weights), "--format", "webp"])
    assert r.stdout_bytes[:4] == b"RIFF" and r.stdout_bytes[8:12] == b"WEBP"


def test_decode_format_and_a_named_output(tmp_path, lic, tiny_vr_weights):
    # an extension that asks for another format: refused before anything is written
    r = run("decode", lic, tmp_path / "out.png", "--weights", tiny_vr_weights, "--format", "jpg")
    assert r.exit_code == 2 and "conflicts with" in r.output and "PNG" in r.output, r.output
    assert not (tmp_path / "out.png").exists()
    # the same format under another spelling, and a name without an extension: --format decides
    assert run("decode", lic, tmp_path / "a.jpeg", "--weights", tiny_vr_weights, "--format", "jpg").exit_code == 0
    r = run("decode", lic, tmp_path / "plain", "--weights", tiny_vr_weights, "--format", "jpg")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plain").read_bytes().startswith(JPEG_MAGIC)


def test_decode_refuses_unknown_format_once_up_front(tmp_path, lic, tiny_vr_weights):
    r = run("decode", lic, "-", "--weights", tiny_vr_weights, "--format", "gif")
    assert r.exit_code == 2 and "--format" in r.output and "'gif'" in r.output
    assert "png, jpg" in r.output and "tif" in r.output  # the accepted formats are listed
    src, back = tmp_path / "lics", tmp_path / "back"
    src.mkdir()
    for name in ("a.lic", "b.lic"):
        shutil.copy(lic, src / name)
    r = run("decode", src, back, "--weights", tiny_vr_weights, "--format", "gif")
    assert r.exit_code == 2 and r.output.count("gif") == 1, r.output
    assert not back.exists()


# ------------------------------------------------------------------------------------------------
# 3. OUT that ends in / or is an existing folder, for a single input


def test_output_ending_in_slash_is_a_folder(tmp_path, rgb_png, tiny_vr_weights):
    r = run("encode", rgb_png, f"{tmp_path / 'newdir'}/", "--weights", tiny_vr_weights)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "newdir").is_dir() and [p.name for p in (tmp_path / "newdir").iterdir()] == ["img.lic"]
    r = run("decode", tmp_path / "newdir" / "img.lic", f"{tmp_path / 'a' / 'b'}/", "--weights", tiny_vr_weights)
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "a" / "b" / "img.png").format == "PNG"
    r = run("decode", tmp_path / "newdir" / "img.lic", f"{tmp_path / 'jpgs'}/", "--format", "jpg", "--weights", tiny_vr_weights)
    assert r.exit_code == 0 and Image.open(tmp_path / "jpgs" / "img.jpg").format == "JPEG"
    (tmp_path / "plain").write_bytes(b"a file")
    r = run("encode", rgb_png, f"{tmp_path / 'plain'}/", "--weights", tiny_vr_weights)
    assert r.exit_code == 3 and "not a folder" in r.output
    assert (tmp_path / "plain").read_bytes() == b"a file"


@pytest.mark.parametrize("slash", ["", "/"])
def test_output_that_is_an_existing_folder_is_written_into(tmp_path, rgb_png, tiny_vr_weights, slash):
    folder = tmp_path / "existing"
    folder.mkdir()
    r = run("encode", rgb_png, f"{folder}{slash}", "--weights", tiny_vr_weights)
    assert r.exit_code == 0, r.output
    assert (folder / "img.lic").read_bytes()[:4] == b"\x89LIC"
    r = run("decode", folder / "img.lic", f"{folder}{slash}", "--weights", tiny_vr_weights)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in folder.iterdir()) == ["img.lic", "img.png"]
    r = run("encode", rgb_png, f"{folder}{slash}", "--weights", tiny_vr_weights)
    assert r.exit_code == 6 and str(folder / "img.lic") in r.output  # the file in it exists, not the folder


def test_stdin_into_a_folder_is_a_usage_error(tmp_path, rgb_png, tiny_vr_weights):
    r = run("encode", "-", f"{tmp_path}/", "--weights", tiny_vr_weights, input=rgb_png.read_bytes())
    assert r.exit_code == 2 and "stdin" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


# ------------------------------------------------------------------------------------------------
# 4. bad option values are usage errors (exit 2) naming the option


@pytest.mark.parametrize(
    "args,option",
    [
        (["-q", "9"], "--quality"),
        (["-q", "8.5"], "--quality"),
        (["-q", "0"], "--quality"),
        (["-q", "nan"], "--quality"),
        (["-q", "inf"], "--quality"),
        (["--target-bpp", "0"], "--target-bpp"),
        (["--target-bpp", "-1"], "--target-bpp"),
        (["--target-bpp", "nan"], "--target-bpp"),
        (["--tile", "64"], "--tile"),
        (["--tile", "0"], "--tile"),
        (["--tile", "1000"], "--tile"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path, rgb_png, tiny_vr_weights, args, option):
    r = run("encode", rgb_png, tmp_path / "a.lic", "--weights", tiny_vr_weights, *args)
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{option}'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "a.lic").exists()


def test_good_option_values_at_the_bounds(tmp_path, rgb_png, tiny_vr_weights):
    for i, args in enumerate((["-q", "1"], ["-q", "8"], ["--tile", "192"])):
        r = run("encode", rgb_png, tmp_path / f"a{i}.lic", "--weights", tiny_vr_weights, *args)
        assert r.exit_code == 0, (args, r.output)


def test_a_folder_is_not_written_to_stdout(tmp_path, lic, tiny_vr_weights, monkeypatch):
    photos = _photos(tmp_path)
    monkeypatch.chdir(tmp_path)  # where a folder named - used to appear
    r = run("encode", photos, "-", "--weights", tiny_vr_weights)
    assert r.exit_code == 2 and "folder" in r.output, r.output
    assert not (tmp_path / "-").exists() and not (photos / "-").exists()
    src = tmp_path / "lics"
    src.mkdir()
    shutil.copy(lic, src / "a.lic")
    r = run("decode", src, "-", "--weights", tiny_vr_weights)
    assert r.exit_code == 2 and "folder" in r.output, r.output
