"""Triton selective scan (forward, backward, fused cross scan / merge) against the PyTorch reference, on CPU.

The Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``).  That variable
must be set before triton is imported and must not leak into other test modules, so every
check runs in one subprocess (this file executed as a script); the tests below read its
results.  Shapes are small: the interpreter evaluates every program in Python.

Covered: L = 1, 2, a tile boundary (33 with tiles of 16), prime L (97), L not a multiple of the
tile, Dk not a multiple of the channel block, B > 1, several segments per sequence (two-level
scan, forward and backward), d_state 3, 4, 6, 8 and 16, grouped (b, K, N, L) and ungrouped (b, N, L)
B / C, no D / no bias / no softplus, strong decays; float64 (the algorithm must match the
reference to rounding: forward and the gradients of u, delta, A, B, C, D, delta_bias), float32 and
bf16 inputs; the stored cases of ``shared/refvec/selective_scan_cases.pt`` (including delta + 25
for the softplus threshold); the fused cross-scan / scan / cross-merge kernel against
``cross_scan`` + ``selective_scan_reference`` + ``cross_merge`` on non-square maps (4x5, 7x3, 3x8,
1x1, the stored 4x5 example) in both column modes; and SS2D's CUDA code path (``_scan_fused``)
against its CPU path.  A second subprocess compiles the kernels for sm_90 with triton's own
ptxas (no GPU needed), which catches what the interpreter accepts but the compiler does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lalic_codec._paths import shared_dir

REFVEC = shared_dir() / "refvec" / "selective_scan_cases.pt"

# (name, b, K, Dk, N, L, grouped, big_delta, plan keywords): float64, forward + all gradients
EXACT = [
    ("L1", 1, 2, 3, 4, 1, True, False, {}),
    ("L2_B2_N3", 2, 2, 3, 3, 2, True, False, {}),  # d_state not a power of two
    ("L33_N16", 1, 4, 3, 16, 33, True, False, dict(block_t=16)),  # real d_state, partial last tile
    ("L97_prime_D5_N6", 1, 2, 5, 6, 97, True, False,  # prime L; 2 channel blocks, the second partial
     dict(block_t=16, block_d=4, segments=3, bwd_segments=2, bwd_block_d=2)),
    ("L70_B2_seg3", 2, 2, 3, 4, 70, True, False, dict(block_t=16, segments=3, bwd_segments=5)),
    ("strong_decays", 1, 2, 4, 16, 60, True, True, dict(block_t=16, segments=2)),
    ("ungrouped", 1, 1, 5, 4, 50, False, False, dict(block_t=16, block_d=2, segments=2)),
]
# optional arguments on the ungrouped problem: (name, with D, with bias, softplus)
OPTIONS = [("no_D", False, True, True), ("no_bias", True, False, True), ("no_softplus", True, True, False),
           ("none", False, False, False)]
# fused: (name, b, Dm, H, W, R, N, plan keywords)
FUSED = [
    ("4x5", 1, 3, 4, 5, 2, 4, dict(block_t=4, block_d=2)),
    ("7x3_B2_seg", 2, 3, 7, 3, 3, 4, dict(block_t=8, segments=3)),
    ("3x8_N16", 1, 4, 3, 8, 2, 16, dict(block_t=8, segments=2)),
    ("1x1", 1, 3, 1, 1, 2, 4, {}),
]


# ------------------------------------------------------------------------------------------
# worker: runs in a subprocess with TRITON_INTERPRET=1
# ------------------------------------------------------------------------------------------


def _worker() -> dict:  # pragma: no cover - executed in the subprocess
    import time

    import torch

    from lalic_codec.kernels.selective_scan_ref import cross_merge, cross_scan, selective_scan_reference
    from lalic_codec.kernels.selective_scan_triton import (
        COL_MODES, cross_selective_scan_fused, selective_scan_triton)
    from lalic_codec.models.mambaic_layers import SS2D

    torch.set_num_threads(1)
    results: dict = {}
    names = ["y", "u", "delta", "A", "B", "C", "D", "delta_bias"]
    t_start = time.time()

    def problem(b, K, Dk, N, L, grouped=True, big_delta=False, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
        u, delta = r(b, K * Dk, L), r(b, K * Dk, L) - 1.0
        if big_delta:  # decays far beyond what a split (divided) form could represent
            delta = delta + 6.0 * (torch.rand(b, K * Dk, L, generator=g, dtype=dtype) < 0.3)
        A = -torch.exp(r(K * Dk, N) * 0.5 + 1.0)
        B, C = (r(b, K, N, L), r(b, K, N, L)) if grouped else (r(b, N, L), r(b, N, L))
        return [u, delta, A, B, C, r(K * Dk), r(K * Dk) * 0.5]

    def run(fn, args, softplus, gy=None):
        """Output and the gradients of every tensor argument (None stays None)."""
        xs = [a.clone().requires_grad_() if a is not None else None for a in args]
        y = fn(*xs, delta_softplus=softplus)
        if gy is None:
            gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (y.double() * gy).sum().backward()
        return [y.detach()] + [x.grad if x is not None else None for x in xs], gy

    def rel_errors(out, ref):
        errs = {}
        for name, a, b in zip(names, out, ref):
            if b is None:
                continue
            scale = b.abs().max().item()
            err = (a.double() - b.double()).abs().max().item()
            errs[name] = err / max(scale, 1e-6)  # relative; absolute where the true value is ~0 (dA at L = 1)
            errs[name + "_finite"] = bool(torch.isfinite(a).all())
            errs[name + "_dtype"] = str(a.dtype)
        return errs

    def log(msg):
        print(f"{time.time() - t_start:6.1f}s {msg}", file=sys.stderr, flush=True)

    # float64: forward and every gradient, against the reference's autograd
    for name, b, K, Dk, N, L, grouped, big, kw in EXACT:
        args = problem(b, K, Dk, N, L, grouped, big, seed=L)
        out, gy = run(lambda *a, **k: selective_scan_triton(*a, **k, **kw), args, True)
        ref, _ = run(selective_scan_reference, args, True, gy)
        results["exact/" + name] = rel_errors(out, ref)
        log(name)
    u, delta, A, B, C, D, bias = problem(1, 1, 5, 4, 50, grouped=False, seed=3)
    for name, with_d, with_b, sp in OPTIONS:
        args = [u, delta.abs() if not sp else delta, A, B, C, D if with_d else None, bias if with_b else None]
        out, gy = run(lambda *a, **k: selective_scan_triton(*a, **k, block_t=16, segments=2), args, sp)
        ref, _ = run(selective_scan_reference, args, sp, gy)
        results["options/" + name] = rel_errors(out, ref)
    log("options")

    # float32 and bf16 inputs
    args = problem(2, 2, 4, 8, 40, seed=5, dtype=torch.float32)
    out, gy = run(lambda *a, **k: selective_scan_triton(*a, **k, block_t=16, segments=2), args, True)
    ref, _ = run(selective_scan_reference, [a.double() for a in args], True, gy)
    results["float32"] = rel_errors(out, ref)
    ref32, _ = run(selective_scan_reference, args, True, gy)
    results["float32_reference"] = rel_errors(ref32, ref)
    half = [a.to(torch.bfloat16) if i in (0, 1, 3, 4) else a for i, a in enumerate(args)]
    out, gy = run(lambda *a, **k: selective_scan_triton(*a, **k, block_t=16, segments=2), half, True)
    ref, _ = run(selective_scan_reference, half, True, gy)  # same rounded inputs, fp32 inside, bf16 out
    results["bfloat16"] = rel_errors(out, ref)
    log("float32 / bf16")

    # the stored cases (float32 inputs, float64 results of a sequential float64 loop)
    cases = torch.load(REFVEC, weights_only=True)
    for i, c in enumerate(cases["cases"]):
        a = [c[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
        Dk = c["meta"]["D"]
        kw = dict(block_d=min(128, Dk), block_t=min(1024, c["meta"]["L"]))
        y32 = selective_scan_triton(*a, delta_softplus=c["delta_softplus"], **kw)
        entry = {"name": c["name"], "fp32_abs": (y32.double() - c["out"]).abs().max().item(), "fp32_dtype": str(y32.dtype),
                 "tol32": 2 * c["meta"]["max_abs_fp32_compute_vs_fp64"] + 5e-7 * max(1.0, c["meta"]["max_abs_out"]),
                 "scale": max(1.0, c["meta"]["max_abs_out"])}
        if i in (0, 3, 4, 5):  # float64 (the algorithm, to rounding)
            y64 = selective_scan_triton(*[t.double() if t is not None else None for t in a],
                                        delta_softplus=c["delta_softplus"], **kw)
            entry["fp64_abs"] = (y64 - c["out"]).abs().max().item()
        if i in (0, 4):  # float32 gradients (4: delta + 25, beyond the softplus threshold)
            out, gy = run(lambda *x, **k: selective_scan_triton(*x, **k, **kw), a, c["delta_softplus"])
            ref, _ = run(selective_scan_reference, [t.double() for t in a], c["delta_softplus"], gy)
            entry["grad"] = rel_errors(out, ref)
        results[f"refvec/{i}"] = entry
        log(f"refvec {i} {c['name']}")

    # fused cross scan + scan + cross merge
    def reference_ss2d(x, xpw, dtw, A, Ds, bias, softplus=True):
        Bt, Dm, H, W = x.shape
        L, R, N = H * W, dtw.shape[2], A.shape[1]
        xs = cross_scan(x)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, xpw)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, dtw)
        ys = selective_scan_reference(xs.reshape(Bt, 4 * Dm, L), dts.reshape(Bt, 4 * Dm, L), A, Bs.contiguous(),
                                      Cs.contiguous(), Ds, bias, delta_softplus=softplus)
        return cross_merge(ys.view(Bt, 4, Dm, L), H, W)

    def fused_problem(Bt, Dm, H, W, R, N, seed=0, x=None):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        x = r(Bt, Dm, H, W) if x is None else x.double()
        return [x, r(4, R + 2 * N, Dm) * 0.5, r(4, Dm, R) * 0.5, -torch.exp(r(4 * Dm, N) * 0.5),
                r(4 * Dm), r(4 * Dm) * 0.5]

    def fused(x, xpw, dtw, A, Ds, bias, softplus=True, **kw):
        Bt, Dm, H, W = x.shape
        x_dbl = torch.einsum("bdl,kcd->bkcl", x.reshape(Bt, Dm, H * W), xpw)
        return cross_selective_scan_fused(x, x_dbl, dtw, A, Ds, bias, softplus, **kw)

    cs_x = cases["cross_scan_merge"]["x"]
    fused_cases = [(n, fused_problem(*shape, seed=j), kw) for j, (n, *shape, kw) in enumerate(FUSED)]
    fused_cases.append(("refvec_4x5", fused_problem(2, 3, 4, 5, 2, 4, seed=9, x=cs_x), dict(block_t=32)))
    for name, p, kw in fused_cases:
        ref = reference_ss2d(*p)
        for mode in COL_MODES:
            y = fused(*p, col_mode=mode, **kw)
            results[f"fused/{name}/{mode}/fp64"] = {"rel": (y - ref).abs().max().item() / ref.abs().max().item(),
                                                   "dtype": str(y.dtype), "shape": list(y.shape)}
        if name in ("7x3_B2_seg", "refvec_4x5"):
            for dt, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                x = p[0].to(dt)
                pl = [x] + [t.float() if i in (3, 4, 5) else t.to(dt) for i, t in enumerate(p[1:], 1)]
                ref_same = reference_ss2d(x.double(), *[t.double() for t in pl[1:]])
                y = fused(*pl, col_mode="transpose", **kw)
                results[f"fused/{name}/transpose/{key}"] = {
                    "rel": (y.double() - ref_same).abs().max().item() / ref_same.abs().max().item(),
                    "dtype": str(y.dtype)}
        log(f"fused {name}")
    p = fused_problem(1, 3, 4, 5, 2, 4, seed=11)
    for name, d_, b_, sp in OPTIONS:
        args = [p[0], p[1], p[2], p[3], p[4] if d_ else None, p[5] if b_ else None, sp]
        ref = reference_ss2d(*args)
        y = fused(*args, block_t=4)
        results[f"fused_options/{name}"] = {"rel": (y - ref).abs().max().item() / ref.abs().max().item()}
    log("fused options")

    # SS2D: the CUDA code path (fused kernel) against the CPU code path, float32, 4 x 5 map
    torch.manual_seed(0)
    m = SS2D(8).eval()
    with torch.no_grad():
        m.A_logs.add_(torch.randn_like(m.A_logs) * 0.3)
        m.Ds.add_(torch.randn_like(m.Ds) * 0.3)
        xin = torch.randn(2, 16, 4, 5)
        y_cpu = m.scan(xin)
        cd = torch.float32
        As, Ds, bias = -torch.exp(m.A_logs.to(cd)), m.Ds.to(cd), m.dt_projs_bias.reshape(-1).to(cd)
        yf = m._scan_fused(xin, lambda *a, **k: cross_selective_scan_fused(*a, **k, block_t=8, segments=2),
                           As, Ds, bias)
        yf = m.out_norm(yf.transpose(1, 2).contiguous()).view(2, 4, 5, -1)
    results["ss2d"] = {"abs": (yf - y_cpu).abs().max().item(), "scale": y_cpu.abs().max().item()}
    log("ss2d")
    results["_seconds"] = time.time() - t_start
    return results


def _compile_worker() -> dict:  # pragma: no cover - executed in a subprocess without TRITON_INTERPRET
    """Compile the kernels for sm_90 (H100) with triton's bundled ptxas; no GPU needed."""
    import inspect
    import time

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lalic_codec.kernels import selective_scan_triton as m

    t0 = time.time()
    out = {}
    base = dict(N=16, NP=16, ACC=tl.float32, HAS_BIAS=True, SOFTPLUS=True)
    variants = [
        ("fwd", m._fwd_scan_kernel, dict(base, BLOCK_D=16, BLOCK_T=64, FUSED=False, GATHER=False, HAS_D=True,
                                         STORE_STATES=True)),
        ("fused_transpose", m._fwd_scan_kernel, dict(base, BLOCK_D=16, BLOCK_T=64, FUSED=True, GATHER=False,
                                                     HAS_D=True, STORE_STATES=False)),
        ("fused_gather", m._fwd_scan_kernel, dict(base, BLOCK_D=16, BLOCK_T=32, FUSED=True, GATHER=True,
                                                  HAS_D=True, STORE_STATES=False)),
        ("summary_fused", m._fwd_summary_kernel, dict(base, BLOCK_D=16, BLOCK_T=64, FUSED=True, GATHER=False)),
        ("bwd", m._bwd_scan_kernel, dict(base, BLOCK_D=16, BLOCK_T=64, HAS_D=True)),
        ("bwd_summary", m._bwd_summary_kernel, dict(base, BLOCK_D=16, BLOCK_T=64)),
        ("merge", m._merge4_kernel, dict(TRANSPOSED=True, BLOCK_H=32, BLOCK_W=32)),
    ]
    for name, fn, consts in variants:
        params = list(inspect.signature(fn.fn).parameters)
        sig = {p: ("constexpr" if p in consts else "*fp32" if p.endswith("_ptr") else "i32") for p in params}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
        out[name] = len(k.asm["cubin"])
    out["_seconds"] = time.time() - t0
    return out


# ------------------------------------------------------------------------------------------
# tests (main process)
# ------------------------------------------------------------------------------------------


def _run_worker(flag: str, interpret: bool) -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), flag], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        if "No module named 'triton'" in proc.stderr:
            pytest.skip("triton is not importable")
        raise AssertionError(f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="module")
def results() -> dict:
    return _run_worker("--worker", interpret=True)


def _check(errs: dict, tol: dict):
    for name, t in tol.items():
        assert errs[name + "_finite"], f"{name}: non-finite values"
        assert errs[name] < t, f"{name}: relative error {errs[name]:.3g} >= {t:g}"


EXACT_TOL = dict(y=1e-11, u=1e-10, delta=1e-10, A=1e-10, B=1e-10, C=1e-10, D=1e-10, delta_bias=1e-10)


@pytest.mark.parametrize("name", [c[0] for c in EXACT])
def test_float64_forward_and_gradients(results, name):
    errs = results["exact/" + name]
    assert errs["y_dtype"] == "torch.float64"
    _check(errs, EXACT_TOL)


@pytest.mark.parametrize("name", [c[0] for c in OPTIONS])
def test_optional_arguments(results, name):
    errs = results["options/" + name]
    _check(errs, {k: v for k, v in EXACT_TOL.items() if k in errs and not k.endswith(("_finite", "_dtype"))})
    assert ("D" in errs) == (name in ("no_bias", "no_softplus"))
    assert ("delta_bias" in errs) == (name in ("no_D", "no_softplus"))


def test_float32_matches_float64_reference(results):
    ours, ref32 = results["float32"], results["float32_reference"]
    assert ours["y_dtype"] == "torch.float32"
    for q in ("y", "u", "delta", "A", "B", "C", "D", "delta_bias"):
        assert ours[q + "_finite"], q
        # as accurate as the float32 PyTorch reference, give or take a small factor
        assert ours[q] < max(2e-5, 4 * ref32[q]), (q, ours[q], ref32[q])


def test_bfloat16_inputs(results):
    errs = results["bfloat16"]
    assert errs["y_dtype"] == "torch.bfloat16" and errs["u_dtype"] == "torch.bfloat16"
    assert errs["B_dtype"] == "torch.bfloat16" and errs["A_dtype"] == "torch.float32"
    ulp = 2.0**-7  # y, du, ddelta, dB, dC are rounded to bf16; the state stays fp32
    _check(errs, dict(y=2 * ulp, u=2 * ulp, delta=2 * ulp, B=2 * ulp, C=2 * ulp, A=1e-4, D=1e-4, delta_bias=1e-4))


def test_stored_cases(results):
    entries = [v for k, v in results.items() if k.startswith("refvec/")]
    assert len(entries) == 7
    for e in entries:
        assert e["fp32_dtype"] == "torch.float32"
        assert e["fp32_abs"] <= e["tol32"], e  # the tolerance of tests/test_selective_scan.py
        if "fp64_abs" in e:
            assert e["fp64_abs"] <= 1e-11 * e["scale"], e
        if "grad" in e:
            _check(e["grad"], dict(y=1e-5, u=1e-4, delta=1e-4, A=1e-4, B=1e-4, C=1e-4, D=1e-4, delta_bias=1e-4))
    assert any(e["name"] == "big_delta_softplus_threshold" and "grad" in e for e in entries)


@pytest.mark.parametrize("name", [c[0] for c in FUSED] + ["refvec_4x5"])
def test_fused_cross_scan_and_merge(results, name):
    for mode in ("transpose", "gather"):
        e = results[f"fused/{name}/{mode}/fp64"]
        assert e["dtype"] == "torch.float64"
        assert e["rel"] < 1e-11, (mode, e)
    if name in ("7x3_B2_seg", "refvec_4x5"):
        e = results[f"fused/{name}/transpose/fp32"]
        assert e["dtype"] == "torch.float32" and e["rel"] < 2e-6, e
        # bf16 inputs (x_dbl is rounded to bf16 by the bf16 projection), fp32 state and output
        e = results[f"fused/{name}/transpose/bf16"]
        assert e["dtype"] == "torch.float32" and e["rel"] < 2e-2, e


@pytest.mark.parametrize("name", [c[0] for c in OPTIONS])
def test_fused_optional_arguments(results, name):
    assert results[f"fused_options/{name}"]["rel"] < 1e-11


def test_ss2d_cuda_path_matches_cpu_path(results):
    e = results["ss2d"]
    assert e["abs"] < 1e-5 * max(1.0, e["scale"]), e


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    out = _run_worker("--compile", interpret=False)
    assert all(v > 0 for k, v in out.items() if not k.startswith("_")), out


def test_module_imports_without_gpu_and_refuses_cpu_tensors():
    pytest.importorskip("triton")
    code = ("import torch, lalic_codec.kernels.selective_scan_triton as m\n"
            "p = m.Plan(1, 4, 512, 384 * 256, torch.device('cuda'))\n"
            "print(p.S, p.seg % p.block_t == 0, p.S * p.seg >= p.L)\n"
            "try:\n"
            "    m.selective_scan_triton(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.zeros(4, 16),\n"
            "                            torch.zeros(1, 4, 16, 8), torch.zeros(1, 4, 16, 8))\n"
            "except ValueError as e:\n"
            "    print('refused')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["8", "True", "True", "refused"]


def test_ss2d_dispatcher_on_cpu():
    import torch

    from lalic_codec.models.mambaic_layers import fused_cross_scan_kernel

    assert fused_cross_scan_kernel(torch.zeros(1, 2, 3, 3), needs_grad=False) is None


if __name__ == "__main__" and "--worker" in sys.argv:  # pragma: no cover
    res = _worker()
    print("RESULTS " + json.dumps(res))
elif __name__ == "__main__" and "--compile" in sys.argv:  # pragma: no cover
    res = _compile_worker()
    print("RESULTS " + json.dumps(res))
