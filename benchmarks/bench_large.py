"""Large images: encode/decode time and peak memory at 1, 4, 16 and 24 megapixels, and seams.

Images are made by tiling and mirroring Kodak photographs up to the target size (natural content,
no upsampling blur).  Prints seconds per megapixel (which should stay flat: tiles are coded
independently) and the process's peak resident memory after each size.  `--seams` measures PSNR
in 16-pixel bands centred on the tile borders against the PSNR of the rest of the image.

    python benchmarks/bench_large.py [--sizes 1,4,16,24] [--weights W] [--device cpu] [--seams]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lalic_codec import pipeline
from lalic_codec._paths import shared_dir
from lalic_codec._runtime import tune_allocator


def mosaic(megapixels: float) -> np.ndarray:
    files = sorted((shared_dir() / "data" / "kodak").glob("*.png"))
    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    tiles = [t for t in tiles if t.shape[0] < t.shape[1]]  # landscape ones: 512 x 768
    W = int(round((megapixels * 1e6 * 1.5) ** 0.5 / 8)) * 8
    H = int(round(megapixels * 1e6 / W / 8)) * 8
    out = np.zeros((H, W, 3), np.uint8)
    k = 0
    for y in range(0, H, 512):
        for x in range(0, W, 768):
            t = tiles[k % len(tiles)]
            if (x // 768 + y // 512) % 2:
                t = t[:, ::-1]
            k += 1
            out[y : y + 512, x : x + 768] = t[: H - y, : W - x]
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def band_psnr(ref: np.ndarray, dec: np.ndarray, tiles) -> tuple[float, float]:
    H, W = ref.shape[:2]
    mask = np.zeros((H, W), bool)
    for x, y, w, h in tiles:
        for e in (x, x + w):
            if 0 < e < W:
                mask[:, max(0, e - 8) : e + 8] = True
        for e in (y, y + h):
            if 0 < e < H:
                mask[max(0, e - 8) : e + 8, :] = True
    return pipeline.psnr(ref[mask], dec[mask]), pipeline.psnr(ref[~mask], dec[~mask])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,4,16,24")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quality", type=float, default=4.0)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--seams", action="store_true")
    args = ap.parse_args()
    tune_allocator()
    lm = pipeline.load_model("default", args.weights, args.device)
    print(f"model {lm.model_id}, device {lm.device}, quality {args.quality:g}, tile {args.tile}")
    print(f"{'MP':>5} {'size':>11} {'tiles':>5} {'bpp':>7} {'enc s':>7} {'dec s':>7} {'enc s/MP':>8} {'dec s/MP':>8} {'peak GiB':>8}" + ("  border/interior PSNR" if args.seams else ""))
    for mp in (float(s) for s in args.sizes.split(",")):
        rgb = mosaic(mp)
        H, W = rgb.shape[:2]
        t = time.perf_counter()
        res = pipeline.encode_image(Image.fromarray(rgb), lm, args.quality, tile=args.tile)
        enc = time.perf_counter() - t
        t = time.perf_counter()
        dec = pipeline.decode_bytes(res.data, args.weights, args.device)
        dec_s = time.perf_counter() - t
        tiles = pipeline.plan_tiles(H, W, args.tile)
        line = f"{H * W / 1e6:5.1f} {W:>5}x{H:<5} {len(tiles):5d} {res.bpp:7.4f} {enc:7.1f} {dec_s:7.1f} {enc / (H * W / 1e6):8.2f} {dec_s / (H * W / 1e6):8.2f} {peak_rss_gib():8.2f}"
        if args.seams and len(tiles) > 1:
            b, i = band_psnr(rgb, np.asarray(dec.image), tiles)
            line += f"  {b:.2f} / {i:.2f} dB"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
