"""BiWKV kernels on a CUDA GPU: correctness (--check), speed (default) and a tuning sweep (--sweep).

Shapes are the real LALIC ones (k, v of shape (1, T, C)): for a Kodak image (768x512)
T = 384*256 (C=96), 192*128 (C=144), 96*64 (C=256), 48*32 (C=320, channel-context blocks) and
12*8 (C=256, hyper); for a 2048x1440 image the same stages at 1024*720 ... 32*23.

    python benchmarks/bench_kernels_gpu.py --check            # run this first on a new GPU
    python benchmarks/bench_kernels_gpu.py                    # timing table, fp32 and bf16
    python benchmarks/bench_kernels_gpu.py --sweep --shapes kodak --dtypes fp32   # tuning sweep

Timing: triton.testing.do_bench, median.  "GB/s" counts the bytes the operator has to move
(forward: read k, v, write y; forward+backward: that plus read grad_y, k, v and write dk, dv),
plus the kernels' chunk summaries; "%copy" is that rate over the measured device-to-device
copy bandwidth of the same GPU (bytes read + written).  The Triton forward reads k and v twice
(summary pass and output pass; the output pass walks the data backwards so that part of it is
still in L2), so its DRAM traffic is up to 5/3 of the counted bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _gpu_common import copy_bandwidth, ensure_package, max_errors  # noqa: E402


def _import_kernels():
    ensure_package()
    from lalic_codec.kernels import biwkv_triton as tri
    from lalic_codec.kernels.biwkv_ref import biwkv_reference

    return tri, biwkv_reference


KODAK = [("kodak g_a/s 1", 384 * 256, 96), ("kodak g_a/s 2", 192 * 128, 144), ("kodak g_a/s 3", 96 * 64, 256),
         ("kodak cc", 48 * 32, 320), ("kodak hyper", 12 * 8, 256)]
BIG = [("2048x1440 1", 1024 * 720, 96), ("2048x1440 2", 512 * 360, 144), ("2048x1440 3", 256 * 180, 256),
       ("2048x1440 cc", 128 * 90, 320), ("2048x1440 hyper", 32 * 23, 256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inputs(B, T, C, dtype, seed=0, kscale=3.0, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(C, device="cuda", generator=g) * 5.0 / T)  # decay / T, as LALIC calls it
    u = (torch.randn(C, device="cuda", generator=g) * 3.0 / T)
    k = (torch.randn(B, T, C, device="cuda", generator=g) * kscale).to(dtype)
    v = torch.randn(B, T, C, device="cuda", generator=g).to(dtype)
    if requires_grad:
        for x in (w, u, k, v):
            x.requires_grad_()
    return w, u, k, v


def summary_bytes(plan, bwd=False) -> int:
    per = (6 + 6 + 10 + 10 + 3) if not bwd else (10 + 10 + 15 + 15 + 10 + 2)
    return per * plan.B * plan.nseg * plan.C * 4


def fmt_err(a, b):
    abs_err, rel_err = max_errors(a, b)
    return f"{abs_err:9.2e} {rel_err:9.2e}"


# ------------------------------------------------------------------------------------------


def run_check(tri, ref, shapes, args):
    print("Triton vs float64 reference on the GPU: max abs / max rel (relative to max |ref|)")
    print(f"{'shape':18s} {'T':>7s} {'C':>4s} {'dtype':5s} {'case':8s} "
          f"{'y abs':>9s} {'y rel':>9s}   gradients (rel): w u k v")
    for name, T, C in shapes:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            for case, kscale in (("k~3", 3.0), ("k~30", 30.0)):
                w, u, k, v = inputs(1, T, C, dt, seed=T, kscale=kscale)
                y = tri.biwkv_triton(w, u, k, v)
                torch.cuda.synchronize()
                grad_txt = ""
                try:
                    args64 = [x.detach().double().requires_grad_() for x in (w, u, k, v)]
                    y64 = ref(*args64)
                    line = f"{name:18s} {T:7d} {C:4d} {dname:5s} {case:8s} {fmt_err(y, y64)}"
                    if args.grad and not (case == "k~30" and T * C > 20_000_000):
                        g = torch.randn_like(y64)
                        (y64 * g).sum().backward()
                        xs = [x.detach().requires_grad_() for x in (w, u, k, v)]
                        (tri.biwkv_triton(*xs).float() * g.float()).sum().backward()
                        grad_txt = "  ".join(fmt_err(x.grad, r.grad).split()[1] for x, r in zip(xs, args64))
                    del y64, args64
                except torch.cuda.OutOfMemoryError:
                    line = f"{name:18s} {T:7d} {C:4d} {dname:5s} {case:8s} (float64 reference: out of memory)"
                finite = bool(torch.isfinite(y).all())
                print(line + "   " + grad_txt + ("" if finite else "   NON-FINITE OUTPUT"), flush=True)
                torch.cuda.empty_cache()
    # float64 inside the kernels: the algorithm itself, to rounding
    for T, C in ((1, 3), (33, 20), (1025, 16), (24576, 144)):
        w, u, k, v = (x.double().requires_grad_() for x in inputs(2, T, C, torch.float32, seed=7))
        y = tri.biwkv_triton(w, u, k, v)
        xr = [x.detach().requires_grad_() for x in (w, u, k, v)]
        yr = ref(*xr)
        g = torch.randn_like(yr)
        (y * g).sum().backward()
        (yr * g).sum().backward()
        grads = "  ".join(fmt_err(a.grad, b.grad).split()[1] for a, b in zip((w, u, k, v), xr))
        print(f"{'float64 kernels':18s} {T:7d} {C:4d} fp64  B=2      {fmt_err(y, yr)}   {grads}", flush=True)


def run_bench(tri, ref, shapes, args):
    import triton.testing

    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.multi_processor_count} SMs; device-to-device copy: {bw / 1e9:.0f} GB/s "
          f"(read + write)")
    hdr = (f"{'shape':18s} {'T':>7s} {'C':>4s} {'dtype':5s} {'pass':8s} {'triton us':>10s} {'GB/s':>7s} "
           f"{'%copy':>6s} {'ref us':>10s} {'speedup':>8s}  plan")
    print(hdr)
    print("-" * len(hdr))
    for name, T, C in shapes:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            es = torch.finfo(dt).bits // 8
            plan = tri.Plan(1, T, C, torch.device("cuda"))
            w, u, k, v = inputs(1, T, C, dt)
            with torch.no_grad():
                t_tri = triton.testing.do_bench(lambda: tri.biwkv_triton(w, u, k, v), return_mode="median")
                t_ref = (triton.testing.do_bench(lambda: ref(w, u, k, v), return_mode="median")
                         if args.ref else float("nan"))
            nbytes = 3 * T * C * es + summary_bytes(plan)
            rate = nbytes / (t_tri * 1e-3)
            print(f"{name:18s} {T:7d} {C:4d} {dname:5s} {'fwd':8s} {t_tri * 1e3:10.1f} {rate / 1e9:7.0f} "
                  f"{100 * rate / bw:5.0f}% {t_ref * 1e3:10.1f} {t_ref / t_tri:7.1f}x  S={plan.S} L={plan.L} "
                  f"progs={plan.nprog}", flush=True)
            if args.bwd:
                w, u, k, v = inputs(1, T, C, dt, requires_grad=True)
                gy = torch.randn(1, T, C, device="cuda").to(dt)

                def fb(fn):
                    return lambda: fn(w, u, k, v).backward(gy)

                t_tri = triton.testing.do_bench(fb(tri.biwkv_triton), grad_to_none=[w, u, k, v],
                                                return_mode="median")
                try:
                    t_ref = (triton.testing.do_bench(fb(ref), grad_to_none=[w, u, k, v], return_mode="median")
                             if args.ref else float("nan"))
                except torch.cuda.OutOfMemoryError:
                    t_ref = float("nan")
                nbytes = 8 * T * C * es + summary_bytes(plan) + summary_bytes(plan, bwd=True)
                rate = nbytes / (t_tri * 1e-3)
                print(f"{name:18s} {T:7d} {C:4d} {dname:5s} {'fwd+bwd':8s} {t_tri * 1e3:10.1f} {rate / 1e9:7.0f} "
                      f"{100 * rate / bw:5.0f}% {t_ref * 1e3:10.1f} {t_ref / t_tri:7.1f}x", flush=True)
                del w, u, k, v, gy
            torch.cuda.empty_cache()


def run_sweep(tri, shapes, args):
    import itertools

    import triton.testing

    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s")
    for name, T, C in shapes:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            es = torch.finfo(dt).bits // 8
            w, u, k, v = inputs(1, T, C, dt)
            base = tri.biwkv_triton(w, u, k, v).float()

            def timed(kw):
                try:
                    with torch.no_grad():
                        y = tri.biwkv_triton(w, u, k, v, **kw)
                        err = (y.float() - base).abs().max().item()
                        t = triton.testing.do_bench(lambda: tri.biwkv_triton(w, u, k, v, **kw), return_mode="median")
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"  {kw}: failed: {type(e).__name__}: {str(e)[:120]}")
                    return None
                return (t, kw, 3 * T * C * es / (t * 1e-3), err)

            # stage 1: tiles and warps; stage 2: segments per chunk and combine width for the best tiles
            rows = []
            for bt, bc, nw in itertools.product((16, 32, 64, 128), (16, 32, 64), (1, 2, 4, 8)):
                if not 4 <= bt * bc // (32 * nw) <= 32:
                    continue
                r = timed(dict(block_t=bt, block_c=bc, num_warps=nw))
                if r:
                    rows.append(r)
            rows.sort(key=lambda r: r[0])
            for _, kw0, _, _ in rows[:3]:
                for tp, cc in itertools.product((264, 1056, 2112), (1, 4)):  # 2, 8, 16 per SM of an H100
                    r = timed(dict(kw0, target_programs=tp, combine_c=cc))
                    if r:
                        rows.append(r)
            rows.sort(key=lambda r: r[0])
            print(f"\n{name} T={T} C={C} {dname}: forward, best first")
            for t, kw, rate, err in rows[: args.top]:
                print(f"  {t * 1e3:8.1f} us  {rate / 1e9:6.0f} GB/s {100 * rate / bw:4.0f}%  max|diff|={err:.1e}  {kw}")
            if args.bwd:
                w, u, k, v = inputs(1, T, C, dt, requires_grad=True)
                gy = torch.randn(1, T, C, device="cuda").to(dt)
                rows = []
                for bt, nw in itertools.product((8, 16, 32, 64), (1, 2, 4, 8)):
                    kw = dict(bwd_block_t=bt, bwd_num_warps=nw)
                    try:
                        t = triton.testing.do_bench(lambda: tri.biwkv_triton(w, u, k, v, **kw).backward(gy),
                                                    grad_to_none=[w, u, k, v], return_mode="median")
                    except Exception as e:  # noqa: BLE001
                        print(f"  {kw}: failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    rows.append((t, kw))
                rows.sort(key=lambda r: r[0])
                print(f"{name} T={T} C={C} {dname}: forward+backward, best first")
                for t, kw in rows[: args.top]:
                    print(f"  {t * 1e3:8.1f} us  {kw}")
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the float64 reference and exit")
    ap.add_argument("--sweep", action="store_true", help="try tile sizes / warps / segments")
    ap.add_argument("--shapes", choices=["kodak", "2k", "all"], default="all")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--no-bwd", dest="bwd", action="store_false", help="forward only")
    ap.add_argument("--no-ref", dest="ref", action="store_false", help="do not time the PyTorch reference")
    ap.add_argument("--no-grad", dest="grad", action="store_false", help="--check: forward only")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_kernels_gpu: no CUDA device available; this benchmark needs an NVIDIA GPU "
              "(the CPU tests run the Triton kernels under TRITON_INTERPRET=1 instead).")
        return 0
    try:
        tri, ref = _import_kernels()
    except ImportError as e:
        print(f"bench_kernels_gpu: cannot import the Triton kernels ({e}); is triton installed?")
        return 1
    shapes = {"kodak": KODAK, "2k": BIG, "all": KODAK + BIG}[args.shapes]
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    if args.check:
        run_check(tri, ref, shapes, args)
    elif args.sweep:
        run_sweep(tri, {"kodak": KODAK[:1], "2k": BIG[:1], "all": [KODAK[0], BIG[0]]}[args.shapes], args)
    else:
        run_bench(tri, ref, shapes, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
