"""Compare training checkpoints (or weights files) on the held-out training images, never Kodak.

For architecture candidates trained for equal CPU time: each model codes the centre crops of the
run's held-out images (the fixed split of ``codec train run``) at several qualities, through the
integer scale path exactly as the codec would, and the script prints the estimated bits per pixel
(from the likelihoods, which match the real streams to a fraction of a percent), the PSNR, and
the BD-rate of every model against the first.

    python benchmarks/compare_checkpoints.py runs/base/checkpoint.pt runs/deeper/checkpoint.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lalic_codec.bench import bd_rate
from lalic_codec.models.checkpoints import load_state_dict_file
from lalic_codec.models.lalic import VariableRateLALIC
from lalic_codec.reshape import model_kwargs
from lalic_codec.train import DEFAULT_TRAIN_DIRS, split_data, validate


def load(path: str) -> VariableRateLALIC:
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict_file(path).items()}
    model = VariableRateLALIC(**model_kwargs(sd), lambdas=tuple(sd["lambdas"].tolist()))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith(("h_a.", "h_s.")) for k in missing):
        raise SystemExit(f"{path}: does not load ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    model.update(force=True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="checkpoint.pt or .safetensors files; the first is the reference")
    ap.add_argument("--count", type=int, default=24, help="held-out images (at most the run's 24)")
    ap.add_argument("--crop", type=int, default=384)
    ap.add_argument("--qualities", default="1,3,5,6.5,8")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, held_out = split_data(DEFAULT_TRAIN_DIRS, 24)
    files = held_out[: args.count]
    qualities = [float(q) for q in args.qualities.split(",")]
    curves = []
    for path in args.models:
        t0 = time.time()
        model = load(path)
        res = validate(model, files, qualities, torch.device("cpu"), args.crop)
        bpp = [res[f"q{q:g}"]["bpp"] for q in qualities]
        psnr = [res[f"q{q:g}"]["psnr"] for q in qualities]
        curves.append((bpp, psnr))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{Path(path).parent.name}/{Path(path).name}: {params:.2f} M parameters, {time.time() - t0:.0f} s")
        print("  " + "  ".join(f"q{q:g} {b:.4f} bpp {p:.2f} dB" for q, b, p in zip(qualities, bpp, psnr)))
        if len(curves) > 1:
            r = bd_rate(curves[0][0], curves[0][1], bpp, psnr)
            print(f"  BD-rate vs {Path(args.models[0]).parent.name}: {r.value:+.2f} %" if r.value is not None else f"  BD-rate: {r.note}")


if __name__ == "__main__":
    main()
