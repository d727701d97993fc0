"""Encode and decode seconds on CPU for a Kodak-sized image (768x512), entropy coding included.

The full official MambaIC configuration (depths 2-2-9-2, N=128, M=320; 123.8 M parameters)
with random weights: timing does not depend on the weight values, except that the selective
scan takes a slower path for the (few) channels whose decay within a 32-token chunk is very
strong, which random weights at the official initialisation reproduce.  `--config small`
times the reference-vector configuration (depths 1-1-1-1, N=8, M=20).

    python benchmarks/bench_mambaic_cpu.py [--config official|small] [--threads N] [--repeat R] [--size HxW]
"""

from __future__ import annotations

import argparse
import time

import torch

from lalic_codec._runtime import tune_allocator
from lalic_codec.models.mambaic import MambaIC


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=["official", "small"], default="official")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--size", default="512x768", help="HxW (multiples of 128)")
    args = ap.parse_args()
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MambaIC() if args.config == "official" else MambaIC(depths=(1, 1, 1, 1), N=8, M=20)
    model.update(force=True)
    model.eval()
    H, W = (int(v) for v in args.size.split("x"))
    x = torch.rand(1, 3, H, W)
    params = sum(p.numel() for p in model.parameters())
    enc, dec = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        coded = model.compress(x)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = model.decompress(coded.streams, coded.z_shape)
        dec.append(time.perf_counter() - t)
        assert torch.equal(out["y_hat"], coded.y_hat)
    nbytes = sum(map(len, coded.streams))
    print(f"{args.config} MambaIC, {params / 1e6:.2f} M parameters, {H}x{W}, {torch.get_num_threads()} threads, {nbytes} bytes")
    print(f"encode: best {min(enc):.2f} s (runs: {', '.join(f'{t:.2f}' for t in enc)})")
    print(f"decode: best {min(dec):.2f} s (runs: {', '.join(f'{t:.2f}' for t in dec)})")


if __name__ == "__main__":
    main()
