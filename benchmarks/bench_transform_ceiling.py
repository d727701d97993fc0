"""How much quality the transforms themselves allow: PSNR of g_s(g_a(x)) without quantisation.

A variable-rate model whose top quality saturates may be limited by its entropy model, its latent
gains or its transforms.  This script separates them: for each image and quality it prints the
PSNR of the synthesis of the unquantised latent (the transforms' ceiling), of the rounded latent
(what quantisation costs, before any entropy coding), and the gap.  If the rounded latent at the
top quality is within a fraction of a dB of the ceiling, more rate cannot buy more quality: the
transforms need more capacity.

For scale, ``--klt`` adds the linear reference: a 16x16 block KLT (principal components of the
blocks of ``--klt-data``) that keeps as many coefficients per block as the latent has channels
(M per 16x16 block, the latent's resolution), or the widths given. On Kodak, 128 coefficients
give 33.65 dB and 192 give 37.69 dB: the default model's latent width, not its nonlinear
transforms, is what caps its top quality.

    python benchmarks/bench_transform_ceiling.py [--weights W] [--images DIR] [--count 6]
                                                 [--quality 4 8] [--threads 2]
                                                 [--klt [--klt-widths 128 192] [--klt-data DIR]]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lalic_codec import loading
from lalic_codec.imaging import IMAGE_SUFFIXES

HERE = Path(__file__).resolve().parent
KODAK = HERE.parent.parent / "shared" / "data" / "kodak"
TRAIN = HERE.parent.parent / "shared" / "data" / "train"
BLOCK = 16


def blocks(rgb: np.ndarray) -> np.ndarray:
    """The whole 16x16 blocks of an (H, W, 3) image as rows of 768 values."""
    h, w = (n - n % BLOCK for n in rgb.shape[:2])
    a = rgb[:h, :w].astype(np.float64).reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK, 3)
    return a.transpose(0, 2, 1, 3, 4).reshape(-1, BLOCK * BLOCK * 3)


def block_klt(folder: Path, images: int = 200, per_image: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, principal directions by decreasing variance) of random 16x16 blocks of ``folder``."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:images]:
        b = blocks(np.asarray(Image.open(f).convert("RGB")))
        rows.append(b[rng.choice(len(b), min(per_image, len(b)), replace=False)])
    x = np.concatenate(rows)
    mean = x.mean(0)
    _, vectors = np.linalg.eigh(np.cov((x - mean).T))
    return mean, vectors[:, ::-1]


def klt_psnr(rgb: np.ndarray, mean: np.ndarray, vectors: np.ndarray, keep: int) -> float:
    """PSNR (dB, 8-bit) of the image's whole blocks kept to ``keep`` KLT coefficients each."""
    b = blocks(rgb)
    p = vectors[:, :keep]
    rec = np.clip((b - mean) @ p @ p.T + mean, 0, 255)
    mse = float(np.square(rec - b).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


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
    ap.add_argument("--klt", action="store_true", help="also print the linear reference: a 16x16 block KLT")
    ap.add_argument("--klt-widths", type=int, nargs="+", default=None, help="coefficients kept per block (default: the model's M)")
    ap.add_argument("--klt-data", default=str(TRAIN), help="images the KLT is fitted on (its first 200)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = loading.load_model(device="cpu", weights=args.weights)
    m = lm.model
    if not lm.variable_rate:
        raise SystemExit("the model has no quality levels")
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.count]
    if not files:
        raise SystemExit(f"no images in {args.images}")
    print(f"{len(files)} images from {args.images}; model {lm.model_id}; PSNR of g_s(g_a(x)) in dB")
    print(f"{'image':>12} {'quality':>7} {'unquantised':>11} {'rounded':>8} {'gap':>6}")
    sums: dict[float, list[float]] = {q: [0.0, 0.0] for q in args.quality}
    # read once (the KLT reuses them); cut to whole multiples of 64 pixels, which the transforms need
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    images = [rgb[: rgb.shape[0] // 64 * 64, : rgb.shape[1] // 64 * 64] for rgb in images]
    for f, rgb in zip(files, images):
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
    if args.klt:
        mean, vectors = block_klt(Path(args.klt_data))
        for keep in args.klt_widths or [m.config.dims[3]]:
            values = [klt_psnr(rgb, mean, vectors, keep) for rgb in images]
            print(f"16x16 block KLT keeping {keep} of {BLOCK * BLOCK * 3} coefficients: {sum(values) / len(values):.2f} dB")


if __name__ == "__main__":
    main()
