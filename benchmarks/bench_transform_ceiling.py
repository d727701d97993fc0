"""How much quality the transforms themselves allow: PSNR of g_s(g_a(x)) without quantisation.

A variable-rate model whose top quality saturates may be limited by its entropy model, its latent
gains or its transforms.  This script separates them: for each image and quality it prints the
PSNR of the synthesis of the unquantised latent (the transforms' ceiling), of the rounded latent
(what quantisation costs, before any entropy coding), and the gap.  If the rounded latent at the
top quality is within a fraction of a dB of the ceiling, more rate cannot buy more quality: the
transforms need more capacity.

    python benchmarks/bench_transform_ceiling.py [--weights W] [--images DIR] [--count 6]
                                                 [--quality 4 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lalic_codec import loading

HERE = Path(__file__).resolve().parent
KODAK = HERE.parent.parent / "shared" / "data" / "kodak"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="weights of the default model (default: the bundled file)")
    ap.add_argument("--images", default=str(KODAK))
    ap.add_argument("--count", type=int, default=6, help="first N images of the folder (sorted)")
    ap.add_argument("--quality", type=float, nargs="+", default=[4.0, 8.0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = loading.load_model(device="cpu", weights=args.weights)
    m = lm.model
    if not lm.variable_rate:
        raise SystemExit("the model has no quality levels")
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() == ".png")[: args.count]
    print(f"{len(files)} images from {args.images}; model {lm.model_id}; PSNR of g_s(g_a(x)) in dB")
    print(f"{'image':>12} {'quality':>7} {'unquantised':>11} {'rounded':>8} {'gap':>6}")
    sums: dict[float, list[float]] = {q: [0.0, 0.0] for q in args.quality}
    for f in files:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
        with torch.inference_mode():
            for q in args.quality:
                qt = torch.tensor([q])
                y = m.analysis(x, qt)
                ceiling = psnr(m.synthesis(y, qt).clamp(0, 1), x)
                rounded = psnr(m.synthesis(torch.round(y), qt).clamp(0, 1), x)
                sums[q][0] += ceiling
                sums[q][1] += rounded
                print(f"{f.stem:>12} {q:>7g} {ceiling:>11.2f} {rounded:>8.2f} {ceiling - rounded:>6.2f}", flush=True)
    for q, (c, r) in sums.items():
        print(f"{'mean':>12} {q:>7g} {c / len(files):>11.2f} {r / len(files):>8.2f} {(c - r) / len(files):>6.2f}")


if __name__ == "__main__":
    main()
