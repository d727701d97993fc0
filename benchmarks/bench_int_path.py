"""Rate cost of the device-independent integer scale path, against the float scales of the same model.

The default model codes every symbol with a table index from its integer scale path (exact on
every device, FORMAT.md 11.6); its parameter network also predicts floating-point scales, which
training learns beside the integer path (``--float-rate-weight``).  Both paths share the means,
so the dequantised latent and the decoded image are identical: the distortion is equal by
construction and the comparison is of y bytes alone.  This script codes every image twice, with
real range-coded streams, and prints the y rate of each path and the integer path's overhead.
Give it weights whose tables are the Gaussians (``codec train export``'s), not tables fitted by
``codec train fit-tables``: those follow the integer path's choices and would favour it.

    python benchmarks/bench_int_path.py [--weights W | --checkpoint runs/X/checkpoint.pt]
                                        [--images ../shared/data/kodak] [--count 24]
                                        [--quality 1 4 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from lalic_codec import loading
from lalic_codec import train as tr
from lalic_codec._paths import shared_dir
from lalic_codec._runtime import tune_allocator


def load(weights: str | None, checkpoint: str | None):
    if checkpoint:
        _, _, model = tr.model_from_checkpoint(checkpoint)
        # checkpoints hold no fitted quantiles/tables for coding: derive them as export does
        model.entropy_bottleneck.fit_quantiles()
        model.update(force=True)
        return model.eval()
    return loading.load_model("default", weights, "cpu").model  # the bundled model without --weights


@contextlib.contextmanager
def float_scales(model):
    """Code with the parameter network's own scales (FORMAT.md 11.5) instead of the integer path."""
    saved = model.scale_path
    model.scale_path = None
    try:
        yield
    finally:
        model.scale_path = saved


def y_bytes(coded) -> int:
    return sum(len(s) for s in coded.streams[1:])  # streams[0] is z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--weights", default=None, help="exported weights (default: the bundled model)")
    src.add_argument("--checkpoint", default=None, help="a training checkpoint.pt")
    ap.add_argument("--images", default=str(shared_dir() / "data" / "kodak"))
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--quality", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    model = load(args.weights, args.checkpoint)
    if model.scale_path is None:
        raise SystemExit("this model has no integer scale path")
    files = tr.list_images(args.images)[: args.count]
    print(f"{len(files)} images from {args.images}; y bits per pixel from real streams")
    print(f"{'quality':>7} {'integer path':>13} {'float scales':>13} {'overhead':>9}")
    t0 = time.time()
    totals = []
    for q in args.quality:
        bits_int = bits_float = pixels = 0
        for f in files:
            x = tr.centre_crop(f, 1 << 30)  # the whole image, cut to the network's size multiple (no padding)
            h, w = x.shape[-2:]
            qt = torch.tensor([q])
            with torch.no_grad():
                # plain rounding (rdo=0): both paths code the same symbols (the encoder's
                # rate-distortion-optimised rounding would choose by each path's own scales)
                c_int = model.compress(x, quality=qt, rdo=0.0)
                with float_scales(model):
                    c_float = model.compress(x, quality=qt, rdo=0.0)
            assert torch.equal(c_int.y_hat, c_float.y_hat), "the two paths must share the dequantised latent"
            bits_int += 8 * y_bytes(c_int)
            bits_float += 8 * y_bytes(c_float)
            pixels += h * w
        bi, bf = bits_int / pixels, bits_float / pixels
        totals.append((bits_int, bits_float))
        print(f"{q:7g} {bi:13.4f} {bf:13.4f} {bi / bf - 1:+9.1%}")
    si, sf = (sum(t[i] for t in totals) for i in (0, 1))
    print(f"{'all':>7} {'':13} {'':13} {si / sf - 1:+9.1%}   ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
