"""codec batch: whole folders, globs and manifests coded by a Ray Data actor pool.

One local Ray instance (2 CPUs) serves the whole module; the jobs code a few dozen small images
(64x136 to 144x80: each more than 128 pixels on one side, so coded once, without the small-image
search's dozen tries) with the bundled default model.  Checked: outputs byte-identical to
single-process coding, a bad input is a failed row while the rest succeed, a rerun with
--skip-existing codes only what is missing (a killed worker's temporary file never counts), an
actor that dies mid-batch still leaves every output complete, --weights are shipped to the
workers, and without Ray the command says what to install.  The input planning (folders, globs,
manifests, fsspec URLs) is tested without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import natural_image, torch_threads
from lalic_codec.batch import inputs
from lalic_codec.cli import main

SIZES = [(64, 136), (64, 144), (136, 64), (96, 144), (144, 80), (136, 96)]  # (height, width)
N_IMAGES = 12
BAD = {"bad.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "notes.png": b"not an image at all\n"}


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def rows(path: Path) -> dict:
    return {Path(r["source"]).name: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray instance for the module (the command uses an instance already initialised);
    its workers cache shipped weights in a temporary folder, not in ~/.cache."""
    ray = pytest.importorskip("ray")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "XDG_CACHE_HOME")}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    # log_to_driver=False, as a --quiet command starts its own instance: with it on, a line that Ray's
    # own processes log late (e.g. gcs_server failing to kill an actor of a previous test) lands in
    # whatever command's output is being captured at that moment
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def one_thread():
    """As a batch worker computes by default (--threads-per-worker 1): one pixel of img10 decodes
    1 level apart with 1 and 2 threads (the parse is exact either way)."""
    return torch_threads(1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """N_IMAGES small PNGs in a tree (some in sub/), two bad inputs, and each image's .lic coded
    in this process exactly as codec encode codes it with one thread: {relative .lic path: bytes}."""
    from lalic_codec import imaging, loading, pipeline

    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    lm = loading.load_model("default", None, "cpu")
    expected = {}
    for i in range(N_IMAGES):
        h, w = SIZES[i % len(SIZES)]
        rel = Path("sub" if i % 3 == 0 else ".") / f"img{i:02d}.png"
        Image.fromarray(natural_image(h, w, seed=i)).save(root / rel)
        data = (root / rel).read_bytes()
        with one_thread():
            expected[str(rel.with_suffix(".lic"))] = pipeline.encode_image(imaging.open_image(data), lm, None).data
    for name, data in BAD.items():
        (root / name).write_bytes(data)
    return root, expected


@pytest.fixture(scope="module")
def encoded(ray_local, photos, tmp_path_factory):
    """One job over the whole tree: (result, output folder)."""
    src, _ = photos
    out = tmp_path_factory.mktemp("encoded") / "out"
    r = run("batch", "encode", src, out, "-r", "--workers", 2, "--batch-size", 4)
    return r, out


def outputs(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.lic")}


def test_encode_is_byte_identical_and_bad_inputs_are_failed_rows(photos, encoded):
    _, expected = photos
    r, out = encoded
    assert r.exit_code == 3, r.output  # the CLI's status for a bad input
    assert outputs(out) == expected  # the same bytes as single-process coding, tree mirrored
    got = rows(out / "batch-manifest.jsonl")
    assert len(got) == N_IMAGES + len(BAD)
    for name in BAD:
        assert got[name]["status"] == "failed" and got[name]["exit_code"] == 3
        assert got[name]["error"] == "BadInputError" and name in got[name]["message"]
    ok = [row for name, row in got.items() if name not in BAD]
    assert all(row["status"] == "ok" for row in ok)
    row, (h, w) = got["img01.png"], SIZES[1]
    assert (row["width"], row["height"]) == (w, h) and row["bytes"] == len(expected["img01.lic"])
    assert row["bpp"] == pytest.approx(8 * row["bytes"] / (w * h)) and row["seconds"] > 0
    assert f"encoded {N_IMAGES} files" in r.output and "2 failed" in r.output and "images/s" in r.output


def test_rerun_with_skip_existing_codes_only_what_is_missing(photos, encoded, tmp_path):
    _, expected = photos
    src = photos[0]
    out = tmp_path / "out"
    shutil.copytree(encoded[1], out)
    missing = ["img01.lic", "sub/img03.lic", "img05.lic"]
    for rel in missing:
        (out / rel).unlink()
    # what a worker killed while writing img05.lic leaves: its temporary file, never taken for the output
    stale = out / ".img05.lic.ab12cd34.tmp"
    stale.write_bytes(b"half a file")
    os.utime(stale, (1, 1))
    r = run("batch", "encode", src, out, "-r", "--workers", 2, "--skip-existing")
    got = rows(out / "batch-manifest.jsonl")
    assert outputs(out) == expected and not stale.exists()
    coded = sorted(name for name, row in got.items() if row["status"] == "ok")
    assert coded == ["img01.png", "img03.png", "img05.png"]
    assert sum(row["status"] == "skipped" for row in got.values()) == N_IMAGES - len(missing)
    assert r.exit_code == 3 and f"skipped {N_IMAGES - len(missing)} existing" in r.output  # the two bad inputs fail again
    # without --skip-existing or --force, existing outputs are refused (exit 6), as codec encode does
    r = run("batch", "encode", src / "sub", out / "sub", "--workers", 1)
    assert r.exit_code == 6 and "exists (use --force" in r.output


def test_a_worker_killed_mid_job_loses_nothing(ray_local, photos, tmp_path, monkeypatch):
    src, expected = photos
    marker = tmp_path / "died"
    monkeypatch.setenv("LALIC_BATCH_TEST_FAULT", str(marker))  # the first worker dies after its first output
    out = tmp_path / "out"
    r = run("batch", "encode", src, out, "-r", "--workers", 2, "--batch-size", 4)
    assert marker.exists(), "the fault hook did not fire"
    assert outputs(out) == expected
    assert not [p for p in out.rglob("*.tmp")]
    got = rows(out / "batch-manifest.jsonl")
    assert sum(row["status"] == "ok" for row in got.values()) == N_IMAGES
    assert r.exit_code == 3, r.output  # only the bad inputs failed


def test_an_input_that_kills_every_worker_is_a_failed_row(ray_local, photos, tmp_path, monkeypatch):
    """The worst bad input (one that kills its worker, as the OOM killer would): its batch is lost,
    rerun one input per task, and only it is recorded as failed."""
    src, expected = photos
    monkeypatch.setenv("LALIC_BATCH_TEST_FAULT", "poison:img06.png")
    out = tmp_path / "out"
    r = run("batch", "encode", src / "sub", out, "--workers", 2, "--batch-size", 4, "--max-retries", 0)
    got = rows(out / "batch-manifest.jsonl")
    assert got["img06.png"]["status"] == "failed" and got["img06.png"]["error"] == "WorkerLostError"
    assert sorted(n for n, row in got.items() if row["status"] == "ok") == [f"img{i:02d}.png" for i in range(0, N_IMAGES, 3) if i != 6]
    assert outputs(out) == {Path(k).name: v for k, v in expected.items() if k.startswith("sub/") and "img06" not in k}
    assert r.exit_code == 1 and "img06.png: the worker coding it died" in r.output


def test_decode_matches_single_process_decoding(photos, encoded, tmp_path):
    from lalic_codec import pipeline

    _, expected = photos
    back = tmp_path / "back"
    r = run("batch", "decode", encoded[1], back, "-r", "--workers", 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert r.output == ""  # --quiet: nothing but errors
    for rel, lic in expected.items():
        with one_thread():
            ref = pipeline.decode_bytes(lic, None, "cpu").image
        with Image.open(back / Path(rel).with_suffix(".png")) as im:
            assert im.size == ref.size and im.tobytes() == ref.tobytes()
    assert all(row["status"] == "ok" for row in rows(back / "batch-manifest.jsonl").values())


def test_manifest_input_and_shipped_weights(ray_local, photos, tiny_vr_weights, tmp_path):
    """A manifest of relative paths, --weights read by the driver and shipped to the workers,
    --quality and --psnr."""
    from lalic_codec import imaging, loading, pipeline

    src, _ = photos
    listing = tmp_path / "list.txt"
    listing.write_text("# inputs\n" + "".join(f"{os.path.relpath(src / n, tmp_path)}\n" for n in ("img01.png", "sub/img03.png")))
    out = tmp_path / "out"
    r = run("batch", "encode", listing, out, "--weights", tiny_vr_weights, "-q", 2, "--psnr", "--workers", 1,
            "--manifest", tmp_path / "m.jsonl")
    assert r.exit_code == 0, r.output
    lm = loading.load_model("default", str(tiny_vr_weights), "cpu")
    got = rows(tmp_path / "m.jsonl")
    assert len(list(Path(os.environ["XDG_CACHE_HOME"], "lalic-codec", "batch-weights").iterdir())) == 1  # shipped, cached
    for rel in ("img01", "sub/img03"):
        im = imaging.open_image((src / f"{rel}.png").read_bytes())
        with one_thread():
            want = pipeline.encode_image(im, lm, 2).data
            psnr = imaging.image_psnr(im, pipeline.decode_bytes(want, str(tiny_vr_weights), "cpu").image)
        assert (out / f"{rel}.lic").read_bytes() == want
        row = got[Path(rel).name + ".png"]
        assert row["quality"] == 2 and row["psnr"] == pytest.approx(psnr)  # random weights: a low PSNR


# ------------------------------------------------------------------------------------------------
# without Ray


def test_without_ray_it_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    (tmp_path / "in").mkdir()
    Image.fromarray(natural_image(64, 64)).save(tmp_path / "in" / "a.png")
    r = run("batch", "encode", tmp_path / "in", tmp_path / "out")
    assert r.exit_code == 3
    assert r.output.strip().count("\n") == 0 and "pip install -e '.[distributed]'" in r.output


def test_help_does_not_import_ray_or_torch():
    probe = ("import sys\nfrom lalic_codec.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "assert not {'ray', 'torch', 'fsspec'} & set(sys.modules), 'heavy import'\nsys.exit(code)\n")
    for args in (["--help"], ["batch", "--help"], ["batch", "encode", "--help"], ["batch", "decode", "-h"]):
        p = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert p.returncode == 0, (args, p.stderr)
        if args == ["--help"]:
            assert "batch" in p.stdout
    p = subprocess.run([sys.executable, "-m", "lalic_codec.cli", "batch", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "encode" in p.stdout, p.stderr  # as a module too (the import cycle is broken)


def test_plan_of_folders_globs_and_manifests(tmp_path):
    src = tmp_path / "in"
    (src / "a" / "b").mkdir(parents=True)
    for rel in ("x.png", "a/y.png", "a/b/z.jpg", "a/notes.txt"):
        (src / rel).write_bytes(b"")
    Image.fromarray(natural_image(8, 8)).save(src / "noext", format="PNG")  # an image by content
    out = tmp_path / "out"
    pairs, ignored = inputs.plan(str(src), str(out), False, True, ".lic")
    assert {os.path.relpath(d, out) for _, d in pairs} == {"x.lic", "a/y.lic", "a/b/z.lic", "noext.lic"}
    assert [why for p, why in ignored if p.endswith("notes.txt")]
    pairs, _ = inputs.plan(str(src / "a" / "*.png"), str(out), False, False, ".lic")
    assert [os.path.relpath(d, out) for _, d in pairs] == ["y.lic"]
    pairs, _ = inputs.plan(str(src / "**" / "*.jpg"), str(out), False, True, ".lic")
    assert [os.path.relpath(d, out) for _, d in pairs] == ["a/b/z.lic"]
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"in/a/y.png\n\n# a comment\n{src / 'a/b/z.jpg'}\n")
    pairs, _ = inputs.plan(str(listing), str(out), False, False, ".lic")
    assert [(os.path.relpath(s, src), os.path.relpath(d, out)) for s, d in pairs] == [("a/y.png", "y.lic"), ("a/b/z.jpg", "b/z.lic")]
    (src / "x.jpg").write_bytes(b"")
    with pytest.raises(inputs.BadInputError, match="would both be written to"):
        inputs.plan(str(src / "x.*"), str(out), False, False, ".lic")
    Image.fromarray(natural_image(8, 8)).save(src / "a" / "w.lic", format="PNG")  # an image named .lic, coded in place
    with pytest.raises(inputs.BadInputError, match="both the input and the output"):
        inputs.plan(str(src / "a" / "*.lic"), str(src / "a"), False, False, ".lic")
    with pytest.raises(inputs.BadInputError, match="both the input and the output"):
        inputs.plan(str(src / "a"), str(src / "a"), False, False, ".lic")


def test_urls_are_planned_listed_and_written_whole():
    """fsspec URLs (here memory://, in this process): listing by extension, the tree mirrored,
    existing outputs found by one listing, writes through a temporary name."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for rel in ("p/in/a.png", "p/in/s/b.jpg", "p/in/readme.md", "p/out/a.lic"):
        fs.pipe_file(f"/{rel}", b"x")
    pairs, ignored = inputs.plan("memory://p/in", "memory://p/out", False, True, ".lic")
    assert pairs == [("memory:///p/in/a.png", "memory:///p/out/a.lic"), ("memory:///p/in/s/b.jpg", "memory:///p/out/s/b.lic")]
    assert [why for p, why in ignored if p.endswith("readme.md")]
    assert inputs.existing(pairs, "memory://p/out") == {"memory:///p/out/a.lic"}
    inputs.write_bytes("memory:///p/out/s/b.lic", lambda f: f.write(b"lic"))
    assert fs.cat_file("/p/out/s/b.lic") == b"lic" and fs.ls("/p/out/s", detail=False) == ["/p/out/s/b.lic"]
    assert inputs.read_bytes("memory:///p/in/a.png") == b"x"
    with pytest.raises(inputs.BadInputError, match="no such file"):
        inputs.read_bytes("memory:///p/in/nothing.png")


def test_worker_picks_tiles_from_its_memory_budget_like_codec_encode(tmp_path):
    """--max-memory reaches the workers: a worker codes exactly what `codec encode --max-memory`
    codes (here a budget small enough for several tiles); without it, a worker takes its share of
    the default budget of the cores it may run on. (The worker class alone, no Ray.)"""
    from lalic_codec import loading, memory, pipeline, tiling
    from lalic_codec._runtime import available_cores
    from lalic_codec.batch.worker import Coder

    src = tmp_path / "big.png"
    Image.fromarray(natural_image(256, 320, seed=5)).save(src)
    lm = loading.load_model("default", None, "cpu")
    budget = 420 * 2**20
    assert len(tiling.tile_plan(256, 320, lm, None, budget)) > 1
    job = dict(mode="encode", model="default", quality=4.0, target_bpp=None, tile=None, max_memory=budget,
               device="cpu", threads=1)
    out = tmp_path / "big.lic"
    row = json.loads(Coder(job)({"src": [str(src)], "dst": [str(out)]})["row"][0])
    assert row["status"] == "ok", row
    with Image.open(src) as im:
        assert out.read_bytes() == pipeline.encode_image(im, lm, 4.0, max_memory=budget).data
    shared = Coder({**job, "max_memory": None, "threads": 1})
    assert shared.max_memory == memory.default_budget("encode", lm.device) // available_cores()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:  # the cores it may run on, not the machine's
        mask = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(mask)})
        try:
            alone = Coder({**job, "max_memory": None, "threads": 1})
        finally:
            os.sched_setaffinity(0, mask)
        assert alone.max_memory == memory.default_budget("encode", lm.device)
    bad = run("batch", "encode", src, tmp_path / "o", "--max-memory", "1K")
    assert bad.exit_code == 2 and "max-memory" in bad.output
