"""Compare integer scale path layouts at equal CPU time, on the frozen features of a trained model.

The integer scale path only picks table indexes; the latent, the means and the residual symbols
it sees come from the rest of the network and do not depend on it.  So layouts can be compared
cheaply: run the trained network once over a fixed set of training crops (and the held-out
validation images), keep y, the means, the residual symbols, z's symbols and the network's own
float scales, then train each candidate path alone on that cache for the same CPU time and
measure its y rate on the held-out images against the float scales' rate.

    python benchmarks/compare_int_paths.py --checkpoint runs/X/checkpoint.pt [--minutes 5]
                                           [--batches 150] [--threads 2]

Prints, per candidate: steps reached, held-out y bits per pixel (integer path, exact tables),
the float scales' y bits per pixel on the same images, and the overhead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lalic_codec import train as tr
from lalic_codec._runtime import tune_allocator
from lalic_codec.models.int_scale import IntegerScalePath
from lalic_codec.models.lalic import INT_SCALE_V2, checkerboard_mask

CANDIDATES = {
    "v1 (magnitudes, 0.31 M)": {},
    "v2 (signed, deeper, 0.80 M)": INT_SCALE_V2,
}


@torch.no_grad()
def features(model, x: torch.Tensor, q: torch.Tensor) -> dict:
    """y, means, float scales per group, and z's symbols, as the float path computes them."""
    saved, model.scale_path = model.scale_path, None
    captured = []
    hooks = [gc.register_forward_pre_hook(lambda m, args: captured.append((args[0], args[1], args[2]))) for gc in model.gaussian_conditionals()]
    try:
        was = model.training
        model.eval()
        out = model(x, quality=q)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
        model.scale_path = saved
    eb = model.entropy_bottleneck
    z_sym = torch.round(out["z"] - eb.medians().view(1, -1, 1, 1))
    ys, scales, means = zip(*captured)
    return {"z_sym": z_sym, "q": q, "y": list(ys), "scales": list(scales), "means": list(means)}


def rate_bits(path: IntegerScalePath, f: dict, gcs, scale_table: torch.Tensor, exact: bool, noise: bool) -> torch.Tensor:
    """Total y bits of one cached batch with table indexes from ``path``."""
    hyper = path.hyper_features(f["z_sym"], f["q"])
    prev, bits = [], 0.0
    for k, (y, mu) in enumerate(zip(f["y"], f["means"])):
        r = torch.round(y - mu)
        H, W = y.shape[-2:]
        anchor = checkerboard_mask(H, W, True, y.device)
        idx = path.indexes(k, hyper, prev, None, f["q"]) * anchor + path.indexes(k, hyper, prev, r * anchor, f["q"]) * (1 - anchor)
        if exact:
            s = scale_table[idx.long()]
        else:
            s = IntegerScalePath.table_scales(idx, scale_table)
        yq = y + torch.empty_like(y).uniform_(-0.5, 0.5) if noise else r + mu
        lik = gcs[k].likelihood_lower_bound(gcs[k].likelihood(yq, s, mu))
        bits = bits - torch.log2(lik).sum()
        prev.append(r)
    return bits


def float_bits(f: dict, gcs) -> float:
    bits = 0.0
    for k, (y, s, mu) in enumerate(zip(f["y"], f["scales"], f["means"])):
        idx = gcs[k].build_indexes(s)
        lik = gcs[k].likelihood_lower_bound(gcs[k].likelihood(torch.round(y - mu) + mu, gcs[k].scale_table[idx.long()], mu))
        bits -= torch.log2(lik).sum().item()
    return bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--minutes", type=float, default=5.0, help="CPU minutes (process time) per candidate")
    ap.add_argument("--batches", type=int, default=150, help="cached training batches of 8 crops of 128")
    ap.add_argument("--val-crop", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    state = tr.load_checkpoint(Path(args.checkpoint))
    cfg = tr.TrainConfig(**{**tr.asdict(tr.TrainConfig()), **state["config"]})
    model = tr.build_model(cfg.arch)
    model.load_state_dict(state["model"])
    gcs = model.gaussian_conditionals()
    table = gcs[0].scale_table
    train_files, held_out = tr.split_data(cfg.data, cfg.holdout)

    t0 = time.time()
    ds = tr.CropDataset(train_files, 128)
    sampler = iter(tr.StepSampler(len(train_files), seed=12345))
    cache = []
    for b in range(args.batches):
        x = torch.stack([ds[next(sampler)] for _ in range(8)])
        cache.append(features(model, x, tr.quality_levels(12345, b, 8, model.num_levels)))
    val, val_px = [], 0
    for f in held_out:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        H, W = a.shape[:2]
        h, w = min(args.val_crop, H // 64 * 64), min(args.val_crop, W // 64 * 64)
        x = torch.from_numpy(a[(H - h) // 2 : (H - h) // 2 + h, (W - w) // 2 : (W - w) // 2 + w].transpose(2, 0, 1).copy()).unsqueeze(0)
        for q in (1.0, 4.0, 8.0):
            val.append(features(model, x, torch.tensor([q])))
            val_px += h * w
    vf = sum(float_bits(f, gcs) for f in val) / val_px
    print(f"cache: {args.batches} batches, {len(val)} held-out crops, {time.time() - t0:.0f} s; float scales: {vf:.4f} y bpp held out")

    for name, kw in [("v1 as trained (continued)", None), *CANDIDATES.items()]:
        torch.manual_seed(0)
        if kw is None:
            path = model.scale_path
            sd0 = {k: v.clone() for k, v in path.state_dict().items()}
            path.eval()
            with torch.no_grad():
                v0 = sum(rate_bits(path, f, gcs, table, exact=True, noise=False).item() for f in val) / val_px
            print(f"{'v1 as trained (no change)':<30} {0:6d} steps  integer {v0:.4f}  float {vf:.4f}  overhead {v0 / vf - 1:+.1%}", flush=True)
        else:
            path = IntegerScalePath(model.config.dims[5], model.groups, **kw)
        params_w = [p for n, p in path.named_parameters() if not n.endswith("bias")]
        params_b = [p for n, p in path.named_parameters() if n.endswith("bias")]
        opt = torch.optim.Adam([{"params": params_w, "lr": args.lr}, {"params": params_b, "lr": args.lr * 20}])
        path.train()
        c0, step = time.process_time(), 0
        while time.process_time() - c0 < 60 * args.minutes:
            f = cache[step % len(cache)]
            px = f["y"][0].shape[0] * 128 * 128
            loss = rate_bits(path, f, gcs, table, exact=False, noise=True) / px
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        path.eval()
        with torch.no_grad():
            vi = sum(rate_bits(path, f, gcs, table, exact=True, noise=False).item() for f in val) / val_px
        print(f"{name:<30} {step:6d} steps  integer {vi:.4f}  float {vf:.4f}  overhead {vi / vf - 1:+.1%}", flush=True)
        if kw is None:
            path.load_state_dict(sd0)


if __name__ == "__main__":
    main()
