"""CPU selective scan inside MambaIC's VSS blocks, at the shapes a Kodak-sized image (768x512) gives.

For each block shape, one ``VSSBlock`` at the official initialisation on a random map (no grad): the
block's time and the part of it spent in selective-scan calls, for the sequential scan (the CPU
inference path) and, with ``--methods chunked,sequential``, the chunked form (the differentiable
one, the CPU path before the sequential scan existed; about 15 ns per element, so ~50 s per block
at 384x256).  Work is counted in (channel, token, state) elements: 4 * d_inner * H*W * 16 per block.

    python benchmarks/bench_scan_cpu.py [--size HxW] [--stages g1,g2,g3,ctx] [--methods sequential]
        [--threads 1] [--repeat 2]

Stages (image HxW = 512x768 by default): g1 = d_model 256 at H/2 x W/2 (2 blocks in g_a, 2 in g_s),
g2 = 256 at /4 (2 + 2), g3 = 256 at /8 (9 + 9), ctx = 768 at /16 (the context VSS blocks of the
first slice; later slices are 896 wide).  Run niced with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from lalic_codec._runtime import tune_allocator
from lalic_codec.kernels import selective_scan as dispatch
from lalic_codec.kernels.selective_scan_ref import selective_scan_reference
from lalic_codec.models.mambaic_layers import VSSBlock

STAGES = {"g1": (2, 256), "g2": (4, 256), "g3": (8, 256), "ctx": (16, 768)}  # (downsampling, d_model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="512x768", help="image HxW")
    ap.add_argument("--stages", default="g1,g2,g3,ctx")
    ap.add_argument("--methods", default="sequential", help="comma-separated: sequential, chunked")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    H0, W0 = (int(v) for v in args.size.split("x"))
    methods = args.methods.split(",")
    scan_seconds = [0.0]

    def timed(method):
        def scan(*a, **k):
            t = time.process_time()
            y = selective_scan_reference(*a, method=method, **k)
            scan_seconds[0] += time.process_time() - t
            return y

        return scan

    original = dispatch.selective_scan_reference
    try:
        for stage in args.stages.split(","):
            down, dim = STAGES[stage]
            H, W = H0 // down, W0 // down
            torch.manual_seed(0)
            block = VSSBlock(dim).eval()
            x = torch.randn(1, dim, H, W)
            elements = 4 * 2 * dim * H * W * 16
            outs = {}
            for method in methods:
                dispatch.selective_scan_reference = timed(method)
                best = None
                for _ in range(args.repeat):
                    scan_seconds[0] = 0.0
                    t = time.process_time()
                    with torch.no_grad():
                        outs[method] = block(x)
                    run = (time.process_time() - t, scan_seconds[0])
                    best = run if best is None or run < best else best
                print(f"{stage}: VSSBlock({dim}) at {H}x{W}, {method:>10}: block {best[0]:7.3f} s, scan {best[1]:7.3f} s "
                      f"({best[1] / elements * 1e9:.2f} ns per channel-token-state)", flush=True)
            if len(outs) > 1:
                ref = outs[methods[0]]
                for m in methods[1:]:
                    print(f"    max |{m} - {methods[0]}| = {(outs[m] - ref).abs().max().item():.2e} (max |y| {ref.abs().max().item():.2f})")
    finally:
        dispatch.selective_scan_reference = original
    print(f"CPU seconds (process time), {torch.get_num_threads()} thread(s); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
