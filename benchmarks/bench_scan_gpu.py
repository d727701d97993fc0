"""Selective-scan kernels (MambaIC's SS2D) on a CUDA GPU: correctness (--check), speed (default), tuning (--sweep).

Shapes are the real ones of the official MambaIC (N=128: transforms at d_model 256, d_inner 512,
dt_rank 16; context blocks at d_model 768 / 896, d_inner 1536 / 1792, dt_rank 48 / 56; d_state 16,
four directions) for a Kodak image (768x512: maps 256x384, 128x192, 64x96, latent 32x48, hyper
16x24) and a 2048x1440 image (MambaIC codes multiples of 128: padded to 2048x1536, maps 768x1024
... 48x64).  Inputs come from a real ``SS2D`` at the official initialisation (realistic decays).

    python benchmarks/bench_scan_gpu.py --check             # run this first on a new GPU
    python benchmarks/bench_scan_gpu.py                     # timing table (fp32 and bf16)
    python benchmarks/bench_scan_gpu.py --sweep --only "kodak s1" --dtypes fp32   # tile / warp / programs sweep
    python benchmarks/bench_scan_gpu.py --out scan.json     # also write the rows as JSON

Rows per shape and dtype:
* ``scan``: the unfused entry point (``selective_scan_triton``, what ``kernels/selective_scan.py``
  dispatches to) on (1, 4*d_inner, L) inputs, against ``selective_scan_reference`` on the same GPU;
  ``scan+bwd``: forward and backward (with ``--bwd``);
* ``fused/<mode>``: ``cross_selective_scan_fused`` (cross scan + dt projection + scan + cross merge
  in the kernel) for both column modes;
* ``ss2d/...``: everything between the depthwise conv and the LayerNorm, as SS2D runs it: the fused
  path (x projection + fused kernel), the unfused Triton path (cross_scan, two einsums, scan,
  cross_merge) and the same with the PyTorch reference scan.
"GB/s" counts the bytes the operation has to move at least (scan: read u, delta, B, C, write y;
fused / ss2d: read the map x and x_dbl, write the merged fp32 y; the unfused paths move several
times that), "%copy" relates it to the measured device-to-device copy bandwidth (read + write).
The last block sums, per encode and per decode, time x number of SS2D calls.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _gpu_common import copy_bandwidth, ensure_package, max_errors  # noqa: E402


def _import():
    ensure_package()
    from lalic_codec.kernels import selective_scan_ref as ref
    from lalic_codec.kernels import selective_scan_triton as tri
    from lalic_codec.models.mambaic_layers import SS2D

    return tri, ref, SS2D


# (name, H, W, d_model, SS2D calls per encode, per decode)
KODAK = [
    ("kodak s1 256x384", 256, 384, 256, 2, 2),
    ("kodak s2 128x192", 128, 192, 256, 2, 2),
    ("kodak s3 64x96", 64, 96, 256, 9, 9),
    ("kodak hyper 16x24", 16, 24, 256, 6, 4),
    ("kodak ctx0 32x48", 32, 48, 768, 4, 4),
    ("kodak ctx 32x48", 32, 48, 896, 16, 16),
]
BIG = [
    ("2k s1 768x1024", 768, 1024, 256, 2, 2),
    ("2k s2 384x512", 384, 512, 256, 2, 2),
    ("2k s3 192x256", 192, 256, 256, 9, 9),
    ("2k hyper 48x64", 48, 64, 256, 6, 4),
    ("2k ctx0 96x128", 96, 128, 768, 4, 4),
    ("2k ctx 96x128", 96, 128, 896, 16, 16),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Problem:
    """Inputs of one SS2D scan: the map, its projections, and the unfused scan's arguments."""

    def __init__(self, tri, ref, SS2D, H, W, d_model, dtype, seed=0):
        torch.manual_seed(seed)
        m = SS2D(d_model).cuda().eval()
        self.m = m
        self.D, self.H, self.W, self.L = m.d_inner, H, W, H * W
        self.R, self.N = m.dt_rank, m.d_state
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            x = F.silu(torch.randn(1, self.D, H, W, device="cuda", generator=g))
            self.x = x.to(dtype)
            self.xpw = m.x_proj_weight.detach().to(dtype)
            self.dtw = m.dt_projs_weight.detach().to(dtype)
            self.A = -torch.exp(m.A_logs.detach().float())
            self.Ds = m.Ds.detach().float()
            self.bias = m.dt_projs_bias.detach().reshape(-1).float()
            self.x_dbl_rm = torch.einsum("bdl,kcd->bkcl", self.x.reshape(1, self.D, self.L), self.xpw)
            xs = ref.cross_scan(self.x)
            x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.xpw)
            dts, Bs, Cs = torch.split(x_dbl, [self.R, self.N, self.N], dim=2)
            dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dtw)
            self.u = xs.reshape(1, 4 * self.D, self.L).contiguous()
            self.delta = dts.reshape(1, 4 * self.D, self.L).contiguous()
            self.B, self.C = Bs.contiguous(), Cs.contiguous()
        self.tri, self.ref = tri, ref

    # the operations timed / checked ---------------------------------------------------------
    def scan_args(self):
        return (self.u, self.delta, self.A, self.B, self.C, self.Ds, self.bias)

    def scan_triton(self, **kw):
        return self.tri.selective_scan_triton(*self.scan_args(), delta_softplus=True, **kw)

    def scan_reference(self):
        return self.ref.selective_scan_reference(*self.scan_args(), delta_softplus=True)

    def fused(self, col_mode, **kw):
        return self.tri.cross_selective_scan_fused(self.x, self.x_dbl_rm, self.dtw, self.A, self.Ds, self.bias,
                                                   True, col_mode=col_mode, **kw)

    def ss2d_fused(self, col_mode):
        x_dbl = torch.einsum("bdl,kcd->bkcl", self.x.reshape(1, self.D, self.L), self.xpw)
        return self.tri.cross_selective_scan_fused(self.x, x_dbl, self.dtw, self.A, self.Ds, self.bias, True,
                                                   col_mode=col_mode)

    def ss2d_unfused(self, scan):
        x, R, N, D, L = self.x, self.R, self.N, self.D, self.L
        xs = self.ref.cross_scan(x)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.xpw)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dtw)
        ys = scan(xs.reshape(1, 4 * D, L).float(), dts.reshape(1, 4 * D, L).float(), self.A,
                  Bs.contiguous().float(), Cs.contiguous().float(), self.Ds, self.bias, delta_softplus=True)
        return self.ref.cross_merge(ys.view(1, 4, D, L), self.H, self.W)

    # bytes the operations have to move at least ----------------------------------------------
    def scan_bytes(self):
        es = self.u.element_size()
        return (3 * 4 * self.D * self.L + 2 * 4 * self.N * self.L) * es

    def fused_bytes(self):
        es = self.x.element_size()
        return (self.D * self.L + 4 * (self.R + 2 * self.N) * self.L) * es + 4 * self.D * self.L


def bench(fn, **kw):
    """Median milliseconds (triton.testing.do_bench), NaN when out of memory."""
    import triton.testing

    try:
        with torch.no_grad():
            return triton.testing.do_bench(fn, return_mode="median", **kw)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")


# ------------------------------------------------------------------------------------------


def run_check(tri, ref, SS2D, shapes, args) -> list:
    rows = []
    print("Triton vs the float64 PyTorch reference on this GPU: max abs / max rel (relative to max |ref|)")
    print(f"{'shape':20s} {'dtype':5s} {'what':22s} {'abs':>9s} {'rel':>9s}  note")
    for name, H, W, dm, _, _ in shapes:
        for dname in args.dtypes:
            p = Problem(tri, ref, SS2D, H, W, dm, DTYPES[dname])
            out = []
            try:
                with torch.no_grad():
                    y = p.scan_triton()
                    args64 = [t.double() for t in p.scan_args()]
                    y64 = ref.selective_scan_reference(*args64, delta_softplus=True)
                    out.append(("scan", *max_errors(y, y64), "finite" if torch.isfinite(y).all() else "NON-FINITE"))
                    del y64, args64
                    # the whole SS2D scan in float64 through the reference path
                    x64 = p.x.double()
                    xs = ref.cross_scan(x64)
                    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, p.xpw.double())
                    dts, Bs, Cs = torch.split(x_dbl, [p.R, p.N, p.N], dim=2)
                    dts = torch.einsum("bkrl,kdr->bkdl", dts, p.dtw.double())
                    ys = ref.selective_scan_reference(xs.reshape(1, 4 * p.D, p.L), dts.reshape(1, 4 * p.D, p.L),
                                                      p.A.double(), Bs.contiguous(), Cs.contiguous(), p.Ds.double(),
                                                      p.bias.double(), delta_softplus=True)
                    y_ref = ref.cross_merge(ys.view(1, 4, p.D, p.L), p.H, p.W)
                    del xs, x_dbl, dts, Bs, Cs, ys
                    for mode in tri.COL_MODES:
                        yf = p.fused(mode)
                        again = p.fused(mode)
                        det = "deterministic" if torch.equal(yf, again) else "NOT DETERMINISTIC"
                        out.append((f"fused/{mode}", *max_errors(yf, y_ref), det))
                    yu = p.ss2d_unfused(tri.selective_scan_triton)
                    out.append(("ss2d unfused triton", *max_errors(yu, y_ref), ""))
                    out.append(("fused vs unfused", *max_errors(p.fused("transpose"), yu), "(both Triton)"))
                    del y_ref
                if args.grad and p.L * p.D <= 6144 * 512:
                    xs = [t.detach().clone().requires_grad_() for t in p.scan_args()]
                    y = tri.selective_scan_triton(*xs, delta_softplus=True)
                    gy = torch.randn_like(y, dtype=torch.float32)
                    (y.float() * gy).sum().backward()
                    x64 = [t.detach().double().requires_grad_() for t in p.scan_args()]
                    (ref.selective_scan_reference(*x64, delta_softplus=True) * gy.double()).sum().backward()
                    for nm, a, b in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dbias"), xs, x64):
                        out.append((f"grad {nm}", *max_errors(a.grad, b.grad), ""))
                    del xs, x64
            except torch.cuda.OutOfMemoryError:
                out.append(("(float64 reference)", float("nan"), float("nan"), "out of memory"))
            for what, a, r, note in out:
                print(f"{name:20s} {dname:5s} {what:22s} {a:9.2e} {r:9.2e}  {note}", flush=True)
                rows.append(dict(shape=name, dtype=dname, what=what, abs=a, rel=r, note=note))
            del p
            torch.cuda.empty_cache()
    return rows


def run_bench(tri, ref, SS2D, shapes, args) -> list:
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.multi_processor_count} SMs; device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    hdr = (f"{'shape':20s} {'dtype':5s} {'op':24s} {'triton us':>10s} {'GB/s':>7s} {'%copy':>6s} "
           f"{'ref us':>10s} {'speedup':>8s}  plan")
    print(hdr)
    print("-" * len(hdr))
    rows, totals = [], {}
    for name, H, W, dm, n_enc, n_dec in shapes:
        for dname in args.dtypes:
            p = Problem(tri, ref, SS2D, H, W, dm, DTYPES[dname])
            plan = tri.Plan(1, 4, p.D, p.L, torch.device("cuda"))

            def row(op, t, nbytes, t_ref=float("nan"), note=""):
                rate = nbytes / (t * 1e-3) if nbytes else float("nan")
                print(f"{name:20s} {dname:5s} {op:24s} {t * 1e3:10.1f} {rate / 1e9:7.0f} {100 * rate / bw:5.0f}% "
                      f"{t_ref * 1e3:10.1f} {t_ref / t:7.1f}x  {note}", flush=True)
                rows.append(dict(shape=name, dtype=dname, op=op, ms=t, gbps=rate / 1e9, frac_copy=rate / bw,
                                 ref_ms=t_ref, speedup=t_ref / t, note=note))

            t = bench(lambda: p.scan_triton())
            t_ref = bench(lambda: p.scan_reference()) if args.ref else float("nan")
            row("scan", t, p.scan_bytes(), t_ref, f"S={plan.S} seg={plan.seg} progs={4 * plan.ncb * plan.S}")
            if args.bwd:
                xs = [a.detach().clone().requires_grad_() for a in p.scan_args()]
                gy = torch.randn_like(p.u)

                def fb(fn):
                    return lambda: fn(*xs, delta_softplus=True).backward(gy)

                import triton.testing
                try:
                    tb = triton.testing.do_bench(fb(tri.selective_scan_triton), grad_to_none=xs, return_mode="median")
                except torch.cuda.OutOfMemoryError:
                    tb = float("nan")
                try:
                    tb_ref = (triton.testing.do_bench(fb(ref.selective_scan_reference), grad_to_none=xs,
                                                      return_mode="median") if args.ref else float("nan"))
                except torch.cuda.OutOfMemoryError:
                    tb_ref = float("nan")
                row("scan+bwd", tb, 3 * p.scan_bytes(), tb_ref)
                del xs, gy
                torch.cuda.empty_cache()
            for mode in tri.COL_MODES:
                tf = bench(lambda: p.fused(mode))
                row(f"fused/{mode}", tf, p.fused_bytes(), t_ref, "ref = the unfused reference scan alone")
            # SS2D level: everything between the depthwise conv and the LayerNorm
            ts = {}
            for mode in tri.COL_MODES:
                ts[mode] = bench(lambda: p.ss2d_fused(mode))
            tu = bench(lambda: p.ss2d_unfused(tri.selective_scan_triton))
            tr = bench(lambda: p.ss2d_unfused(ref.selective_scan_reference)) if args.ref else float("nan")
            for mode in tri.COL_MODES:
                row(f"ss2d/fused {mode}", ts[mode], p.fused_bytes(), tr, "ref = unfused path, reference scan")
            row("ss2d/unfused triton", tu, p.fused_bytes(), tr)
            if not math.isnan(tr):
                row("ss2d/unfused reference", tr, p.fused_bytes(), tr)
            best = min(ts.values())
            for key, t_ in (("fused", best), ("unfused_triton", tu), ("reference", tr)):
                tot = totals.setdefault((dname, key), [0.0, 0.0])
                tot[0] += n_enc * t_
                tot[1] += n_dec * t_
            del p
            torch.cuda.empty_cache()
    print("\nSS2D scans per image (time x calls; official MambaIC): encode / decode ms")
    for (dname, key), (e, d) in sorted(totals.items()):
        print(f"  {dname:5s} {key:16s} {e:9.2f} / {d:9.2f}")
        rows.append(dict(op="total_per_image", dtype=dname, path=key, encode_ms=e, decode_ms=d,
                         shapes=[s[0] for s in shapes]))
    return rows


def run_sweep(tri, ref, SS2D, shapes, args) -> list:
    import itertools

    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s")
    rows = []
    for name, H, W, dm, _, _ in shapes:
        for dname in args.dtypes:
            p = Problem(tri, ref, SS2D, H, W, dm, DTYPES[dname])
            base_scan = p.scan_triton().float()
            base_fused = p.fused("transpose")
            for op in ("scan", "fused/transpose", "fused/gather"):
                results = []
                for bd, bt, nw, tp in itertools.product((8, 16, 32), (32, 64, 128), (2, 4, 8), (512, 1024, 2048)):
                    if not 2 <= bd * bt // (32 * nw) <= 64:
                        continue
                    kw = dict(block_d=bd, block_t=bt, num_warps=nw, target_programs=tp)
                    try:
                        with torch.no_grad():
                            if op == "scan":
                                err = (p.scan_triton(**kw).float() - base_scan).abs().max().item()
                                t = bench(lambda: p.scan_triton(**kw), warmup=5, rep=30)
                                nbytes = p.scan_bytes()
                            else:
                                mode = op.split("/")[1]
                                err = (p.fused(mode, **kw) - base_fused).abs().max().item()
                                t = bench(lambda: p.fused(mode, **kw), warmup=5, rep=30)
                                nbytes = p.fused_bytes()
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"  {op} {kw}: failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    results.append((t, kw, nbytes / (t * 1e-3), err))
                results.sort(key=lambda r: r[0])
                print(f"\n{name} {dname} {op}: best first")
                for t, kw, rate, err in results[: args.top]:
                    print(f"  {t * 1e3:9.1f} us  {rate / 1e9:6.0f} GB/s {100 * rate / bw:4.0f}%  max|diff|={err:.1e}  {kw}")
                    rows.append(dict(shape=name, dtype=dname, op=op, ms=t, kw=kw, gbps=rate / 1e9, diff=err))
            del p
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the float64 reference and exit")
    ap.add_argument("--sweep", action="store_true", help="try tile sizes / warps / programs")
    ap.add_argument("--shapes", choices=["kodak", "2k", "all"], default="all")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--bwd", action="store_true", help="also time forward + backward of the unfused scan")
    ap.add_argument("--no-ref", dest="ref", action="store_false", help="do not time the PyTorch reference")
    ap.add_argument("--grad", action="store_true", help="--check: also gradients (shapes up to 64x96)")
    ap.add_argument("--only", nargs="+", metavar="TEXT", help="only the shapes whose name contains one of these")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--out", help="write the rows as JSON to this path")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_scan_gpu: no CUDA device available; this benchmark needs an NVIDIA GPU "
              "(the CPU tests run the Triton kernels under TRITON_INTERPRET=1 instead).")
        return 0
    try:
        tri, ref, SS2D = _import()
    except ImportError as e:
        print(f"bench_scan_gpu: cannot import the Triton kernels ({e}); is triton installed?")
        return 1
    shapes = {"kodak": KODAK, "2k": BIG, "all": KODAK + BIG}[args.shapes]
    if args.only:
        shapes = [s for s in shapes if any(o in s[0] for o in args.only)]
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    if args.check:
        rows = run_check(tri, ref, SS2D, shapes, args)
    elif args.sweep:
        # default: the largest transform map and a context block (of each image size asked for)
        picked = shapes if args.only else [s for s in shapes if s in (KODAK[0], KODAK[-1], BIG[0], BIG[-1])]
        rows = run_sweep(tri, ref, SS2D, picked, args)
    else:
        rows = run_bench(tri, ref, SS2D, shapes, args)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                                                  triton=triton.__version__, rows=rows), indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
