"""The model card's Kodak table: our model per quality beside other codecs at the same bit rates.

Reads the curves a ``codec bench`` run wrote (``<out>/<curve>.json``) and the published VTM-9.1
curve, and prints one markdown row per quality of the model: its bpp, PSNR and MS-SSIM, then
the PSNR every other curve reaches at that bpp (interpolated along its own curve, linearly in
log bpp; blank outside the curve's range).

    python benchmarks/model_card_table.py bench-results/kodak [--model default] [--against jpeg,webp,avif,jxl] [--vtm PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lalic_codec._paths import shared_dir
from lalic_codec.bench import Curve, load_curve


def psnr_at(curve: Curve, bpp: float) -> float | None:
    rates, psnrs = np.asarray(curve.values("bpp")), np.asarray(curve.values("psnr"))
    order = np.argsort(rates)
    r, p = np.log(rates[order]), psnrs[order]
    x = np.log(bpp)
    if not r[0] <= x <= r[-1]:
        return None
    return float(np.interp(x, r, p))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path, help="the --out folder of a codec bench run")
    ap.add_argument("--model", default="default")
    ap.add_argument("--against", default="jpeg,webp,avif,jxl")
    ap.add_argument("--vtm", type=Path, default=shared_dir() / "anchors" / "kodak-compressai" / "vtm.json")
    args = ap.parse_args()
    ours = load_curve(args.results / f"{args.model}.json")
    others = {}
    for name in args.against.split(","):
        p = args.results / f"{name}.json"
        if p.exists():
            others[name.upper() if len(name) <= 4 else name] = load_curve(p)
    if args.vtm.exists():
        others["VTM-9.1 (published)"] = load_curve(args.vtm)
    head = ["quality", "bpp", "PSNR (dB)", "MS-SSIM (dB)"] + [f"{k} PSNR at this bpp" for k in others]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
    rates, psnrs = ours.values("bpp"), ours.values("psnr")
    ms_db = ours.values("ms-ssim-db") or [None] * len(rates)
    qualities = ours.results.get("quality", [None] * len(rates))
    for q, bpp, psnr, ms in zip(qualities, rates, psnrs, ms_db):
        row = [f"{q:g}" if q is not None else "?", f"{bpp:.4f}", f"{psnr:.2f}", f"{ms:.2f}" if ms is not None else "n/a"]
        for c in others.values():
            v = psnr_at(c, bpp)
            row.append(f"{v:.2f}" if v is not None else "")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
