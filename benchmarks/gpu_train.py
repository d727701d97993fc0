"""Train the default model on a borrowed GPU for a few minutes, and bring the weights back.

Some sessions are lent a GPU machine for a short time (minutes), reached by a tool that copies
the working tree there (64 MiB at most, with no network on the far side) and copies back what a
command leaves in ``$OUT`` (files of at most 16 MiB).  This script is the three steps of such a
round, so that the minutes go into training rather than into setting it up:

1. here, ``prepare``: writes ``.gpu/`` (git-ignored): a random part of the training images (the
   24 held-out validation images excluded) re-encoded to fit a size budget, the starting
   weights, and the wheels of the codec's dependencies that the GPU machine may lack
   (constriction, for the entropy models);
2. there, ``device OUT --minutes M``: installs those wheels if needed, trains from the starting
   weights (``codec train run`` itself: CUDA, bf16, the Triton kernels; the PyTorch reference
   kernels if the Triton ones fail their first steps), after probing larger batches (``--try-batch``:
   on an H200 the step is bound by launches and syncs, not arithmetic), and exports the result to
   ``OUT/weights.safetensors`` with ``OUT/log.jsonl``;
3. here, continue on the CPU from the returned weights (``codec train run --init-from``) or
   evaluate them (``codec bench --weights default=...``).

    python benchmarks/gpu_train.py prepare --init models/default-v10.safetensors [--data-mib 28]
    # on the device, from the repository root, carrying .gpu:
    python3 benchmarks/gpu_train.py device $OUT --minutes 7 [--batch 16] [--lr 1e-4]

``--init`` may be a weights file or a ``codec train run`` checkpoint (exported to fp16 weights
first: a checkpoint with its optimiser state is too large to carry).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / ".gpu"


def prepare(args) -> None:
    from PIL import Image

    from lalic_codec import train as tr

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    files, held = tr.split_data(tuple(args.data or tr.DEFAULT_TRAIN_DIRS), args.holdout)
    random.Random(args.seed).shuffle(files)
    budget, used, kept = args.data_mib * 2**20, 0, 0
    for i, path in enumerate(files):
        with Image.open(path) as im:  # at most --max-side pixels a side, as JPEG quality 92
            im = im.convert("RGB")
            im.thumbnail((args.max_side, args.max_side))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=92)
        if used + buf.tell() > budget:
            if budget - used < 100_000:
                break
            continue
        (out / "data" / f"{i:04d}-{path.stem}.jpg").write_bytes(buf.getvalue())
        used, kept = used + buf.tell(), kept + 1
    init = Path(args.init)
    if init.suffix == ".safetensors":
        shutil.copyfile(init, out / "init.safetensors")
    else:
        tr.export(init, out / "init.safetensors")
    (out / "wheels").mkdir()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", "--python-version", args.python,
                    "--platform", "manylinux2014_x86_64", "-d", str(out / "wheels"), *args.wheel], check=True)
    sizes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {kept} of {len(files)} training images ({used / 2**20:.1f} MiB; {len(held)} held out, never copied), "
          f"init {(out / 'init.safetensors').stat().st_size / 1e6:.1f} MB, wheels; {sizes / 2**20:.1f} MiB in all")


def _install_wheels(wheels: Path) -> None:
    try:
        import constriction  # noqa: F401
        return
    except ImportError:
        pass
    site = Path("/tmp/gpu-train-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, sorted(wheels.glob("*.whl")))], check=True)
    sys.path.insert(0, str(site))


def device(args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    gpu_dir = Path(args.gpu_dir)
    _install_wheels(gpu_dir / "wheels")
    from _gpu_common import ensure_package

    ensure_package()
    import torch

    from lalic_codec import train as tr

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, GPU: {gpu}", flush=True)

    def config(steps: int, batch: int, lr: float, run_dir: Path) -> tr.TrainConfig:
        return tr.TrainConfig(data=(str(gpu_dir / "data"),), holdout=0, val_count=0, val_every=10**9, out=str(run_dir),
                              steps=steps, batch=batch, crop=args.crop, lr=lr, warmup=args.warmup,
                              decay_start=args.decay_start, workers=args.workers, init_from=str(gpu_dir / "init.safetensors"),
                              ckpt_every=10**9, log_every=10, compile=args.compile)

    def probe(batch: int) -> float:
        """Seconds per step at this batch: a short run of its own (run folder per batch)."""
        run_dir = Path(f"/tmp/gpu-train-run-b{batch}")
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.time()
        tr.train(config(args.probe_steps, batch, args.lr, run_dir))
        timed = _train_records(run_dir / "log.jsonl")
        if len(timed) >= 2:  # the steady speed: between the last two log lines (start-up excluded)
            a, b = timed[-2], timed[-1]
            return (b["train_seconds"] - a["train_seconds"]) / max(1, b["step"] - a["step"])
        return (time.time() - t0) / args.probe_steps

    # a short probe: the step's speed, and whether the Triton kernels train (else the reference)
    for attempt in ("triton", "reference"):
        if attempt == "reference":
            os.environ["LALIC_FORCE_REFERENCE"] = "1"
        try:
            sec = probe(args.batch)
            break
        except Exception as e:  # noqa: BLE001 - report, then try the reference kernels
            print(f"probe with {attempt} kernels failed: {type(e).__name__}: {e}", flush=True)
    else:
        raise SystemExit("training failed with both kernel sets")
    kernels = f"the {attempt} kernels" if gpu != "none" else "the CPU paths (no GPU)"
    print(f"probe: batch {args.batch}: {sec:.3f} s/step ({args.batch / sec:.0f} crops/s) with {kernels}", flush=True)
    # Larger batches while they pay: on an H200 the step of batch 32 x 256 took 0.35 s, far more
    # than its arithmetic needs (kernel launches and host syncs bound it), so a larger batch may
    # cost little more time per step.  Kept when it codes at least 15 % more crops per second.
    batch = args.batch
    for b in args.try_batch:
        if b <= batch or time.time() > deadline - 150:
            continue
        try:
            s_b = probe(b)
        except Exception as e:  # noqa: BLE001 - out of memory, say: keep the smaller batch
            print(f"probe: batch {b} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        print(f"probe: batch {b}: {s_b:.3f} s/step ({b / s_b:.0f} crops/s)", flush=True)
        if b / s_b < 1.15 * batch / sec:
            break
        batch, sec = b, s_b
    lr = args.lr * min(1.5, (batch / args.batch) ** 0.5)  # Adam: about the square root of the batch ratio, capped
    run_dir = Path(f"/tmp/gpu-train-run-b{batch}")
    steps = max(args.probe_steps + 1, int(args.probe_steps + (deadline - time.time() - 60) / sec))
    print(f"training: batch {batch}, lr {lr:.3g}, {kernels}, to step {steps}", flush=True)
    from lalic_codec.errors import Interrupted

    try:
        tr.train(config(steps, batch, lr, run_dir), resume=str(run_dir / "checkpoint.pt"), max_seconds=max(60.0, deadline - time.time() - 45))
    except Interrupted as e:  # SIGTERM from a time limit, say: the state is saved, export what was trained
        print(f"interrupted: {e}", flush=True)
    tr.export(run_dir / "checkpoint.pt", out / "weights.safetensors", notes={"gpu": gpu, "kernels": attempt if gpu != "none" else "cpu"})
    shutil.copyfile(run_dir / "log.jsonl", out / "log.jsonl")
    state = tr.read_training_state(run_dir / "checkpoint.pt")
    print(f"done: step {state['step']} ({state['samples']} crops), weights in {out / 'weights.safetensors'}", flush=True)


def _train_records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [r for r in map(json.loads, open(log)) if r.get("type") == "train" and r.get("sec_per_step")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write .gpu/ here: data, starting weights, wheels")
    p.add_argument("--init", required=True, help="weights file or codec train run checkpoint to start from")
    p.add_argument("--data", action="append", help="training folders (default: ../shared/data/train and train-more)")
    p.add_argument("--holdout", type=int, default=24, help="held-out images left out, as codec train run --holdout")
    p.add_argument("--data-mib", type=float, default=28.0, help="size budget of the copied images")
    p.add_argument("--max-side", type=int, default=768, help="images larger than this are shrunk (pixels a side)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version, for the wheels")
    p.add_argument("--wheel", action="append", default=None, help="requirement to download as a wheel (default: constriction)")
    p.add_argument("--out", default=str(GPU_DIR))
    d = sub.add_parser("device", help="on the GPU machine: train, export to OUT")
    d.add_argument("out")
    d.add_argument("--minutes", type=float, required=True, help="wall time for the whole command (probe, training, export)")
    d.add_argument("--batch", type=int, default=16)
    d.add_argument("--crop", type=int, default=256)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--warmup", type=int, default=100)
    d.add_argument("--decay-start", type=float, default=0.6)
    d.add_argument("--try-batch", type=int, nargs="*", default=[64, 128],
                   help="larger batches to probe after --batch; the first that does not code 15%% more crops/s ends the search")
    d.add_argument("--workers", type=int, default=12)
    d.add_argument("--probe-steps", type=int, default=30)
    d.add_argument("--gpu-dir", default=str(GPU_DIR), help="what prepare wrote")
    d.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="as codec train run --compile (CPU only)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        args.wheel = args.wheel or ["constriction==0.5.0"]
        prepare(args)
    else:
        device(args)


if __name__ == "__main__":
    main()
