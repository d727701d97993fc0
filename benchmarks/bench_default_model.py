"""The default model's size and cost: parameters, multiply-accumulates and CPU seconds for a Kodak image.

FLOPs are counted with torch.utils.flop_counter on the encoder (compress) and decoder
(decompress) paths at 768x512 (convolutions and matrix products; the BiWKV operator and other
element-wise work come on top and are estimated separately from the tensor sizes).

    python benchmarks/bench_default_model.py [--weights W] [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lalic_codec import loading
from lalic_codec._runtime import tune_allocator
from lalic_codec.models.lalic import DEFAULT_CONFIG, VariableRateLALIC


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None, help="weights file (default: the bundled model, else random weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    try:
        model = loading.load_model("default", args.weights, "cpu").model
        source = args.weights or "bundled weights"
    except Exception as e:  # no trained weights yet: the architecture alone
        torch.manual_seed(0)
        model = VariableRateLALIC(**DEFAULT_CONFIG)
        model.update(force=True)
        model.eval()
        source = f"random weights ({e})"
    params = sum(p.numel() for p in model.parameters())
    sp = sum(p.numel() for p in model.scale_path.parameters()) if model.scale_path is not None else 0
    x = torch.rand(1, 3, 512, 768)
    q = torch.tensor([4.0])
    with FlopCounterMode(display=False) as fc:
        coded = model.compress(x, quality=q)
    enc_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model.decompress(coded.streams, coded.z_shape, quality=q)
    dec_flops = fc.get_total_flops()
    enc, dec = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        coded = model.compress(x, quality=q)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.decompress(coded.streams, coded.z_shape, quality=q)
        dec.append(time.perf_counter() - t)
    print(f"default model ({source})")
    print(f"parameters:        {params / 1e6:.2f} M (integer scale path {sp / 1e3:.0f} k)")
    print(f"encoder FLOPs:     {enc_flops / 1e9:.1f} GFLOP for 768x512 ({enc_flops / 2 / (768 * 512) / 1e3:.1f} kMAC/pixel)")
    print(f"decoder FLOPs:     {dec_flops / 1e9:.1f} GFLOP for 768x512 ({dec_flops / 2 / (768 * 512) / 1e3:.1f} kMAC/pixel)")
    print(f"CPU, {torch.get_num_threads()} threads: encode {min(enc):.2f} s, decode {min(dec):.2f} s (best of {args.repeat})")


if __name__ == "__main__":
    main()
