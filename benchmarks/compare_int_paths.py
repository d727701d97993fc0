"""Compare integer scale path layouts at equal CPU time, on the frozen features of a trained model.

The integer scale path only picks table indexes; the latent, the means and the residual symbols
it sees come from the rest of the network (``lalic_codec/int_path_fit.py``).  So layouts can be
compared cheaply: run the trained network once over a fixed set of training crops and the
held-out validation images, then train each candidate path alone on that cache for the same
process CPU time, and measure its y rate on the held-out images (exact tables) against the float
scales' rate of the same model.

    python benchmarks/compare_int_paths.py --checkpoint runs/X/checkpoint.pt [--minutes 4]
                                           [--batches 150] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from lalic_codec import int_path_fit as ipf
from lalic_codec import train as tr
from lalic_codec._runtime import tune_allocator
from lalic_codec.models.int_scale import IntegerScalePath
from lalic_codec.models.lalic import INT_SCALE_V2

CANDIDATES = {
    "v1 as trained, continued": None,
    "v1 from scratch (0.31 M)": {},
    "v2 from scratch (0.80 M)": INT_SCALE_V2,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--minutes", type=float, default=4.0, help="process CPU minutes per candidate")
    ap.add_argument("--batches", type=int, default=150, help="cached training batches of 8 crops of 128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    _, cfg, model = tr.model_from_checkpoint(args.checkpoint)
    gcs = model.gaussian_conditionals()
    train_files, held_out = tr.split_data(cfg.data, cfg.holdout)
    t0 = time.time()
    cache = tr.int_path_training_cache(model, train_files, args.batches)
    val = tr.int_path_validation_cache(model, held_out)
    vf = sum(ipf.float_bits(f, gcs) for f in val) / sum(f["pixels"] for f in val)
    v0 = ipf.held_out_bpp(model.scale_path, val, gcs)
    print(f"cache: {args.batches} batches, {len(val)} held-out crops ({time.time() - t0:.0f} s)")
    print(f"held-out y bpp: float scales {vf:.4f}; integer path as trained {v0:.4f} ({v0 / vf - 1:+.1%})")
    print(f"{'candidate':<28} {'steps':>6} {'integer':>8} {'vs float':>9}")
    trained = {k: v.clone() for k, v in model.scale_path.state_dict().items()}
    for name, kw in CANDIDATES.items():
        torch.manual_seed(0)
        if kw is None:
            path = model.scale_path
            path.load_state_dict(trained)
        else:
            path = IntegerScalePath(model.config.dims[5], model.groups, **kw)
        res = ipf.fit(path, cache, gcs, 60 * args.minutes, lr=args.lr)
        vi = ipf.held_out_bpp(path, val, gcs)
        print(f"{name:<28} {res['steps']:6d} {vi:8.4f} {vi / vf - 1:+9.1%}", flush=True)


if __name__ == "__main__":
    main()
