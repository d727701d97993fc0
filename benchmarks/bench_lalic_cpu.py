"""Encode and decode seconds on CPU for a Kodak-sized image (768x512), entropy coding included.

Default: the full official LALIC configuration with random weights (timing does not depend on
the weight values).  `--config default` times the bundled default model's architecture.

    python benchmarks/bench_lalic_cpu.py [--config official|default] [--threads N] [--repeat R]
"""

from __future__ import annotations

import argparse
import time

import torch

from lalic_codec._runtime import tune_allocator
from lalic_codec.models.lalic import DEFAULT_CONFIG, LALIC, VariableRateLALIC


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=["official", "default"], default="official")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--size", default="512x768", help="HxW")
    args = ap.parse_args()
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.config == "official":
        model, q = LALIC(), None
    else:
        model, q = VariableRateLALIC(**DEFAULT_CONFIG), torch.tensor([4.0])
    model.update(force=True)
    model.eval()
    H, W = (int(v) for v in args.size.split("x"))
    x = torch.rand(1, 3, H, W)
    params = sum(p.numel() for p in model.parameters())
    enc, dec = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        coded = model.compress(x, quality=q)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.decompress(coded.streams, coded.z_shape, quality=q)
        dec.append(time.perf_counter() - t)
    print(f"{args.config} LALIC, {params / 1e6:.2f} M parameters, {H}x{W}, {torch.get_num_threads()} threads")
    print(f"encode: best {min(enc):.2f} s (runs: {', '.join(f'{t:.2f}' for t in enc)})")
    print(f"decode: best {min(dec):.2f} s (runs: {', '.join(f'{t:.2f}' for t in dec)})")


if __name__ == "__main__":
    main()
