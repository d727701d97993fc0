"""Throughput of `codec batch encode` (a local Ray instance, 1 and 2 workers) against the plain
folder mode (`codec encode IN/ OUT/`), in the same run, on the same generated images.

Prints, for each mode: wall seconds of the whole command (interpreter, Ray start, model loads
included), images/s and MB/s of input (PNG) and output (.lic) over that wall time; for the batch
modes also the mean seconds per image inside a worker (read, code, write: from the result
manifest) and the steady-state rate that implies (workers / mean seconds), which is what a long
job approaches once start-up is paid.  It checks that every mode wrote the same bytes.

    python benchmarks/bench_batch.py                       # 48 images of 96x128
    python benchmarks/bench_batch.py --count 24 --size 512x768 --workers 1,2

Needs the distributed extra (pip install -e '.[distributed]').  Figures taken while other work
runs on the machine are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int, h: int, w: int) -> int:
    """Smooth images with texture (PNG), as the tests use; returns their total size in bytes."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        rng = np.random.default_rng(i)
        base = np.stack([128 + 80 * np.sin(xx / (11 + i % 7) + c) * np.cos(yy / 23 - c + i) for c in range(3)], axis=-1)
        Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    return sum(p.stat().st_size for p in folder.iterdir())


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall


def outputs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.glob("*.lic")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=48, help="images (default 48)")
    ap.add_argument("--size", default="96x128", help="HxW of each image (default 96x128)")
    ap.add_argument("--workers", default="1,2", help="pool sizes to run (default 1,2)")
    args = ap.parse_args()
    h, w = map(int, args.size.lower().split("x"))
    codec = [sys.executable, "-m", "lalic_codec.cli"]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        in_bytes = make_images(d / "in", args.count, h, w)
        mp = args.count * h * w / 1e6
        print(f"{args.count} PNG images of {w}x{h} ({mp:.2f} MP, {in_bytes / 1e6:.2f} MB); {os.cpu_count()} CPUs; "
              f"default model, quality 4")
        print(f"{'mode':44s} {'wall s':>7s} {'images/s':>9s} {'MB/s in':>8s} {'MB/s out':>9s} "
              f"{'s/image in worker':>18s} {'steady images/s':>16s} {'same bytes':>10s}")
        wall = timed(codec + ["encode", str(d / "in"), str(d / "plain"), "--quiet"], env)
        ref = outputs(d / "plain")
        out_bytes = sum(map(len, ref.values()))
        print(f"{'codec encode IN/ OUT/ (1 process)':44s} {wall:7.1f} {args.count / wall:9.2f} {in_bytes / wall / 1e6:8.3f} "
              f"{out_bytes / wall / 1e6:9.4f} {'':>18s} {'':>16s} {'reference':>10s}")
        for n in [int(x) for x in args.workers.split(",")]:
            out = d / f"batch{n}"
            manifest = d / f"batch{n}.jsonl"
            wall = timed(codec + ["batch", "encode", str(d / "in"), str(out), "--workers", str(n),
                                  "--threads-per-worker", "1", "--quiet", "--manifest", str(manifest)], env)
            rows = [json.loads(line) for line in manifest.read_text().splitlines()]
            ok = [r for r in rows if r["status"] == "ok"]
            per = sum(r["seconds"] for r in ok) / max(1, len(ok))
            got = outputs(out)
            print(f"{f'codec batch encode, {n} worker(s) x 1 thread':44s} {wall:7.1f} {len(ok) / wall:9.2f} "
                  f"{in_bytes / wall / 1e6:8.3f} {sum(map(len, got.values())) / wall / 1e6:9.4f} {per:18.3f} "
                  f"{n / per:16.2f} {'yes' if got == ref else 'NO':>10s}")
        print(f"per megapixel in a worker: see s/image / {h * w / 1e6:.4f} MP (small images: per-image overheads dominate)")


if __name__ == "__main__":
    main()
