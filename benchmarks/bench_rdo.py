"""What the encoder's rate-distortion-optimised rounding of y gains, against plain rounding (or,
with ``--tool postfilter``, what the post-filter of FORMAT.md 7.3 and 7.4 gains, against none;
with ``--tool classes``, what its classified filters of FORMAT.md 7.4 gain, against the plain
filters of 7.3 alone).

The default model's encoder chooses each symbol of y as ``round(y - mu)`` or the next integer
towards 0, whichever costs less in squared error plus a Lagrangian times its code length
(``GaussianConditional.rd_symbols``; the Lagrangian is the model's ``rdo_lagrangian``).  The
decoder is unchanged: it only dequantises.  This script codes every image at each quality with
and without it (whole .lic files through the pipeline, as ``codec encode`` writes them), decodes
them, and prints the mean bpp and PSNR of both, the gain at each quality, and the BD-rate
(pchip) of the rounding against plain rounding over the range both curves share.

    python benchmarks/bench_rdo.py [--weights W] [--images ../shared/data/kodak|held-out] [--count 24]
                                   [--quality 1 2 3 4 5 6 7 8] [--threads 2] [--tool rdo|postfilter|classes]

``--images held-out``: the 24 training images that ``codec train run`` holds out (never trained
on), for tuning an encoder tool without looking at Kodak.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lalic_codec import imaging, loading, pipeline, postfilter
from lalic_codec._paths import shared_dir
from lalic_codec.bench.curves import bd_rate


#: each tool's switch: (module, flag)
TOOLS = {"rdo": (pipeline, "RDO"), "postfilter": (pipeline, "POSTFILTER"), "classes": (postfilter, "CLASSIFIED")}


def code(lm, weights, images, q: float, on: bool, tool: str = "rdo") -> tuple[float, float, float]:
    """(mean bpp, mean PSNR, seconds) of ``images`` at quality ``q``, the encoder tool on or off."""
    module, flag = TOOLS[tool]
    saved = getattr(module, flag)
    setattr(module, flag, on)
    bpps, psnrs, t0 = [], [], time.perf_counter()
    try:
        for im in images:
            r = pipeline.encode_image(im, lm, quality=q)
            dec = pipeline.decode_bytes(r.data, weights).image
            bpps.append(8 * len(r.data) / (im.width * im.height))
            psnrs.append(imaging.psnr(np.asarray(im), np.asarray(dec.convert("RGB"))))
    finally:
        setattr(module, flag, saved)
    return float(np.mean(bpps)), float(np.mean(psnrs)), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="weights file of the default model (default: the bundled one)")
    ap.add_argument("--images", default=str(shared_dir() / "data" / "kodak"))
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--quality", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tool", choices=list(TOOLS), default="rdo", help="the encoder tool compared on and off")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = loading.load_model("default", args.weights, "cpu")
    if args.images == "held-out":
        from lalic_codec import train

        files = train.split_data(train.TrainConfig().data, 24)[1][: args.count]
    else:
        files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() == ".png")[: args.count]
    images = [Image.open(f).convert("RGB") for f in files]
    print(f"{lm.model_id}: {len(images)} images from {args.images}; {args.threads} threads")
    on_name = {"rdo": "rdo", "postfilter": "filter", "classes": "classes"}[args.tool]
    print(f"{'quality':>7} {'Lagrangian':>10} {'off bpp':>10} {'dB':>7} {on_name + ' bpp':>10} {'dB':>7} {'rate':>8} {'dB':>7} {'enc+dec s':>10}")
    off, on = [], []
    for q in args.quality:
        a, b = code(lm, args.weights, images, q, False, args.tool), code(lm, args.weights, images, q, True, args.tool)
        off.append(a)
        on.append(b)
        mu = lm.model.rdo_lagrangian(torch.tensor([q]))
        print(f"{q:7g} {mu:10.4f} {a[0]:10.4f} {a[1]:7.2f} {b[0]:10.4f} {b[1]:7.2f} {b[0] / a[0] - 1:+8.1%} {b[1] - a[1]:+7.2f} "
              f"{a[2] / len(images):4.2f}/{b[2] / len(images):4.2f}")
    if len(args.quality) >= 4:
        bd = bd_rate([p[0] for p in off], [p[1] for p in off], [p[0] for p in on], [p[1] for p in on])
        lo, hi = bd.common_range
        what = {"rdo": "the rounding against plain rounding", "postfilter": "the post-filter against none",
                "classes": "the classified post-filters against the plain ones alone"}[args.tool]
        print(f"BD-rate of {what}: {bd.value:+.2f} % over {lo:.2f}-{hi:.2f} dB")


if __name__ == "__main__":
    main()
