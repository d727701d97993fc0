"""Triton selective scan (forward, backward, fused cross scan / merge) against the PyTorch reference, on CPU.

The Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``).  That variable
must be set before triton is imported and must not leak into other test modules, so the checks
run in worker subprocesses (this file executed as a script), case by case: the tests read the result
of their case, a case that fails fails only its test, and ``-k`` runs only the selected cases
(see ``case_worker.run_case_worker``).  Shapes are small: the interpreter evaluates every program
in Python.

Covered: L = 1, 2, a tile boundary (33 with tiles of 16), prime L (97), L not a multiple of the
tile, Dk not a multiple of the channel block, B > 1, several segments per sequence (two-level
scan, forward and backward), d_state 3, 4, 6, 8 and 16, grouped (b, K, N, L) and ungrouped (b, N, L)
B / C, no D / no bias / no softplus, strong decays; float64 (the algorithm must match the
reference to rounding: forward and the gradients of u, delta, A, B, C, D, delta_bias), float32 and
bf16 inputs; the stored cases of ``shared/refvec/selective_scan_cases.pt`` (including delta + 25
for the softplus threshold); the fused cross-scan / scan / cross-merge kernel against
``cross_scan`` + ``selective_scan_reference`` + ``cross_merge`` on non-square maps (4x5, 7x3, 3x8,
1x1, the stored 4x5 example) in both column modes; and SS2D's CUDA code path (``_scan_fused``)
against its CPU path.  A second worker compiles the kernels for sm_90 with triton's own
ptxas (no GPU needed), which catches what the interpreter accepts but the compiler does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (assert_errors_below, case_result, rel_errors, run_case_worker, run_with_grads,
                      selected_cases, serve_cases)
from lalic_codec._paths import shared_dir

REFVEC = shared_dir() / "refvec" / "selective_scan_cases.pt"
STORED = [c["name"] for c in torch.load(REFVEC, weights_only=True)["cases"]] if REFVEC.exists() else []
STORED_FP64 = (0, 3, 4, 5)  # float64 too (the algorithm, to rounding)
STORED_GRADS = (0, 4)  # float32 gradients too (4: delta + 25, beyond the softplus threshold)

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
FUSED_LOW_PRECISION = ("7x3_B2_seg", "refvec_4x5")  # also float32 and bf16 inputs
COMPILE_VARIANTS = ["fwd", "fused_transpose", "fused_gather", "summary_fused", "bwd", "bwd_summary", "merge"]
NAMES = ["y", "u", "delta", "A", "B", "C", "D", "delta_bias"]


# ------------------------------------------------------------------------------------------
# worker: runs in a subprocess with TRITON_INTERPRET=1, one case at a time
# ------------------------------------------------------------------------------------------


def _errors(out, ref):
    return rel_errors(out, ref, NAMES, floor=1e-6)  # relative; absolute where the true value is ~0 (dA at L = 1)


def _problem(b, K, Dk, N, L, grouped=True, big_delta=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u, delta = r(b, K * Dk, L), r(b, K * Dk, L) - 1.0
    if big_delta:  # decays far beyond what a split (divided) form could represent
        delta = delta + 6.0 * (torch.rand(b, K * Dk, L, generator=g, dtype=dtype) < 0.3)
    A = -torch.exp(r(K * Dk, N) * 0.5 + 1.0)
    B, C = (r(b, K, N, L), r(b, K, N, L)) if grouped else (r(b, N, L), r(b, N, L))
    return [u, delta, A, B, C, r(K * Dk), r(K * Dk) * 0.5]


def _triton(**kw):
    from lalic_codec.kernels.selective_scan_triton import selective_scan_triton

    return lambda *a, **k: selective_scan_triton(*a, **k, **kw)


def _reference():
    from lalic_codec.kernels.selective_scan_ref import selective_scan_reference

    return selective_scan_reference


def _case_exact(b, K, Dk, N, L, grouped, big, kw):  # pragma: no cover - executed in the subprocess
    args = _problem(b, K, Dk, N, L, grouped, big, seed=L)
    out, gy = run_with_grads(_triton(**kw), args, delta_softplus=True)
    ref, _ = run_with_grads(_reference(), args, gy, delta_softplus=True)
    return _errors(out, ref)


def _case_options(with_d, with_b, sp):  # pragma: no cover - executed in the subprocess
    u, delta, A, B, C, D, bias = _problem(1, 1, 5, 4, 50, grouped=False, seed=3)
    args = [u, delta.abs() if not sp else delta, A, B, C, D if with_d else None, bias if with_b else None]
    out, gy = run_with_grads(_triton(block_t=16, segments=2), args, delta_softplus=sp)
    ref, _ = run_with_grads(_reference(), args, gy, delta_softplus=sp)
    return _errors(out, ref)


def _case_float32():  # pragma: no cover - executed in the subprocess
    args = _problem(2, 2, 4, 8, 40, seed=5, dtype=torch.float32)
    out, gy = run_with_grads(_triton(block_t=16, segments=2), args, delta_softplus=True)
    ref, _ = run_with_grads(_reference(), [a.double() for a in args], gy, delta_softplus=True)
    ref32, _ = run_with_grads(_reference(), args, gy, delta_softplus=True)
    return {"triton": _errors(out, ref), "reference_fp32": _errors(ref32, ref)}


def _case_bfloat16():  # pragma: no cover - executed in the subprocess
    args = _problem(2, 2, 4, 8, 40, seed=5, dtype=torch.float32)
    half = [a.to(torch.bfloat16) if i in (0, 1, 3, 4) else a for i, a in enumerate(args)]
    out, gy = run_with_grads(_triton(block_t=16, segments=2), half, delta_softplus=True)
    ref, _ = run_with_grads(_reference(), half, gy, delta_softplus=True)  # same rounded inputs, fp32 inside, bf16 out
    return _errors(out, ref)


def _case_stored(i):  # pragma: no cover - executed in the subprocess
    """A stored case (float32 inputs, float64 results of a sequential float64 loop)."""
    from lalic_codec.kernels.selective_scan_triton import selective_scan_triton

    c = torch.load(REFVEC, weights_only=True)["cases"][i]
    a = [c[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    Dk = c["meta"]["D"]
    kw = dict(block_d=min(128, Dk), block_t=min(1024, c["meta"]["L"]))
    y32 = selective_scan_triton(*a, delta_softplus=c["delta_softplus"], **kw)
    entry = {"name": c["name"], "fp32_abs": (y32.double() - c["out"]).abs().max().item(), "fp32_dtype": str(y32.dtype),
             "tol32": 2 * c["meta"]["max_abs_fp32_compute_vs_fp64"] + 5e-7 * max(1.0, c["meta"]["max_abs_out"]),
             "scale": max(1.0, c["meta"]["max_abs_out"])}
    if i in STORED_FP64:
        y64 = selective_scan_triton(*[t.double() if t is not None else None for t in a],
                                    delta_softplus=c["delta_softplus"], **kw)
        entry["fp64_abs"] = (y64 - c["out"]).abs().max().item()
    if i in STORED_GRADS:
        out, gy = run_with_grads(_triton(**kw), a, delta_softplus=c["delta_softplus"])
        ref, _ = run_with_grads(_reference(), [t.double() for t in a], gy, delta_softplus=c["delta_softplus"])
        entry["grad"] = _errors(out, ref)
    return entry


def _reference_ss2d(x, xpw, dtw, A, Ds, bias, softplus=True):
    from lalic_codec.kernels.selective_scan_ref import cross_merge, cross_scan, selective_scan_reference

    Bt, Dm, H, W = x.shape
    L, R, N = H * W, dtw.shape[2], A.shape[1]
    xs = cross_scan(x)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, xpw)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dtw)
    ys = selective_scan_reference(xs.reshape(Bt, 4 * Dm, L), dts.reshape(Bt, 4 * Dm, L), A, Bs.contiguous(),
                                  Cs.contiguous(), Ds, bias, delta_softplus=softplus)
    return cross_merge(ys.view(Bt, 4, Dm, L), H, W)


def _fused_problem(Bt, Dm, H, W, R, N, seed=0, x=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(Bt, Dm, H, W) if x is None else x.double()
    return [x, r(4, R + 2 * N, Dm) * 0.5, r(4, Dm, R) * 0.5, -torch.exp(r(4 * Dm, N) * 0.5), r(4 * Dm), r(4 * Dm) * 0.5]


def _fused(x, xpw, dtw, A, Ds, bias, softplus=True, **kw):
    from lalic_codec.kernels.selective_scan_triton import cross_selective_scan_fused

    Bt, Dm, H, W = x.shape
    x_dbl = torch.einsum("bdl,kcd->bkcl", x.reshape(Bt, Dm, H * W), xpw)
    return cross_selective_scan_fused(x, x_dbl, dtw, A, Ds, bias, softplus, **kw)


def _case_fused(name):  # pragma: no cover - executed in the subprocess
    from lalic_codec.kernels.selective_scan_triton import COL_MODES

    if name == "refvec_4x5":
        cs_x = torch.load(REFVEC, weights_only=True)["cross_scan_merge"]["x"]
        p, kw = _fused_problem(2, 3, 4, 5, 2, 4, seed=9, x=cs_x), dict(block_t=32)
    else:
        j = [f[0] for f in FUSED].index(name)
        _, *shape, kw = FUSED[j]
        p = _fused_problem(*shape, seed=j)
    ref = _reference_ss2d(*p)
    out = {}
    for mode in COL_MODES:
        y = _fused(*p, col_mode=mode, **kw)
        out[f"{mode}/fp64"] = {"rel": (y - ref).abs().max().item() / ref.abs().max().item(), "dtype": str(y.dtype),
                               "shape": list(y.shape)}
    if name in FUSED_LOW_PRECISION:
        for dt, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            x = p[0].to(dt)
            pl = [x] + [t.float() if i in (3, 4, 5) else t.to(dt) for i, t in enumerate(p[1:], 1)]
            ref_same = _reference_ss2d(x.double(), *[t.double() for t in pl[1:]])
            y = _fused(*pl, col_mode="transpose", **kw)
            out[f"transpose/{key}"] = {"rel": (y.double() - ref_same).abs().max().item() / ref_same.abs().max().item(),
                                       "dtype": str(y.dtype)}
    return out


def _case_fused_options(with_d, with_b, sp):  # pragma: no cover - executed in the subprocess
    p = _fused_problem(1, 3, 4, 5, 2, 4, seed=11)
    args = [p[0], p[1], p[2], p[3], p[4] if with_d else None, p[5] if with_b else None, sp]
    ref = _reference_ss2d(*args)
    y = _fused(*args, block_t=4)
    return {"rel": (y - ref).abs().max().item() / ref.abs().max().item()}


def _case_ss2d():  # pragma: no cover - executed in the subprocess
    """SS2D: the CUDA code path (fused kernel) against the CPU code path, float32, 4 x 5 map."""
    from lalic_codec.kernels.selective_scan_triton import cross_selective_scan_fused
    from lalic_codec.models.mambaic_layers import SS2D

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
    return {"abs": (yf - y_cpu).abs().max().item(), "scale": y_cpu.abs().max().item()}


def worker_cases() -> dict:
    """Every interpreter case of this file: name -> function returning its (JSON-able) result."""
    from functools import partial

    cases = {f"exact/{e[0]}": partial(_case_exact, *e[1:]) for e in EXACT}
    cases.update({f"options/{o[0]}": partial(_case_options, *o[1:]) for o in OPTIONS})
    cases["float32"] = _case_float32
    cases["bfloat16"] = _case_bfloat16
    cases.update({f"stored/{n}": partial(_case_stored, i) for i, n in enumerate(STORED)})
    cases.update({f"fused/{n}": partial(_case_fused, n) for n in [f[0] for f in FUSED] + ["refvec_4x5"]})
    cases.update({f"fused_options/{o[0]}": partial(_case_fused_options, *o[1:]) for o in OPTIONS})
    cases["ss2d"] = _case_ss2d
    return cases


def _compile_variant(name):  # pragma: no cover - executed in a subprocess without TRITON_INTERPRET
    """Compile one kernel variant for sm_90 (H100) with triton's bundled ptxas; no GPU needed."""
    import inspect

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lalic_codec.kernels import selective_scan_triton as m

    base = dict(N=16, NP=16, ACC=tl.float32, HAS_BIAS=True, SOFTPLUS=True)
    variants = {
        "fwd": (m._fwd_scan_kernel, dict(base, BLOCK_D=16, BLOCK_T=64, FUSED=False, GATHER=False, HAS_D=True,
                                         STORE_STATES=True)),
        "fused_transpose": (m._fwd_scan_kernel, dict(base, BLOCK_D=16, BLOCK_T=64, FUSED=True, GATHER=False,
                                                     HAS_D=True, STORE_STATES=False)),
        "fused_gather": (m._fwd_scan_kernel, dict(base, BLOCK_D=16, BLOCK_T=32, FUSED=True, GATHER=True,
                                                  HAS_D=True, STORE_STATES=False)),
        "summary_fused": (m._fwd_summary_kernel, dict(base, BLOCK_D=16, BLOCK_T=64, FUSED=True, GATHER=False)),
        "bwd": (m._bwd_scan_kernel, dict(base, BLOCK_D=16, BLOCK_T=64, HAS_D=True)),
        "bwd_summary": (m._bwd_summary_kernel, dict(base, BLOCK_D=16, BLOCK_T=64)),
        "merge": (m._merge4_kernel, dict(TRANSPOSED=True, BLOCK_H=32, BLOCK_W=32)),
    }
    fn, consts = variants[name]
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: ("constexpr" if p in consts else "*fp32" if p.endswith("_ptr") else "i32") for p in params}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    return len(k.asm["cubin"])


def compile_cases() -> dict:
    from functools import partial

    return {f"compile/{n}": partial(_compile_variant, n) for n in COMPILE_VARIANTS}


# ------------------------------------------------------------------------------------------
# tests (main process)
# ------------------------------------------------------------------------------------------

ENV = {"TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}


def _cases(prefix, names):
    return [pytest.param(f"{prefix}/{n}", id=n) for n in names]


@pytest.fixture(scope="module")
def results(request) -> dict:
    pytest.importorskip("triton")
    return run_case_worker(Path(__file__).resolve(), selected_cases(request), env_extra=ENV, timeout=900)


@pytest.fixture
def result(results, case):
    return case_result(results, case)


EXACT_TOL = dict(y=1e-11, u=1e-10, delta=1e-10, A=1e-10, B=1e-10, C=1e-10, D=1e-10, delta_bias=1e-10)


@pytest.mark.parametrize("case", _cases("exact", [c[0] for c in EXACT]))
def test_float64_forward_and_gradients(result):
    assert result["y_dtype"] == "torch.float64"
    assert_errors_below(result, EXACT_TOL)


@pytest.mark.parametrize("case", _cases("options", [c[0] for c in OPTIONS]))
def test_optional_arguments(result, case):
    name = case.split("/")[1]
    errs = result
    assert_errors_below(errs, {k: v for k, v in EXACT_TOL.items() if k in errs})
    assert ("D" in errs) == (name in ("no_bias", "no_softplus"))
    assert ("delta_bias" in errs) == (name in ("no_D", "no_softplus"))


@pytest.mark.parametrize("case", ["float32"])
def test_float32_matches_float64_reference(result):
    ours, ref32 = result["triton"], result["reference_fp32"]
    assert ours["y_dtype"] == "torch.float32"
    for q in NAMES:
        assert ours[q + "_finite"], q
        # as accurate as the float32 PyTorch reference, give or take a small factor
        assert ours[q] < max(2e-5, 4 * ref32[q]), (q, ours[q], ref32[q])


@pytest.mark.parametrize("case", ["bfloat16"])
def test_bfloat16_inputs(result):
    errs = result
    assert errs["y_dtype"] == "torch.bfloat16" and errs["u_dtype"] == "torch.bfloat16"
    assert errs["B_dtype"] == "torch.bfloat16" and errs["A_dtype"] == "torch.float32"
    ulp = 2.0**-7  # y, du, ddelta, dB, dC are rounded to bf16; the state stays fp32
    assert_errors_below(errs, dict(y=2 * ulp, u=2 * ulp, delta=2 * ulp, B=2 * ulp, C=2 * ulp, A=1e-4, D=1e-4,
                                   delta_bias=1e-4))


def test_stored_cases_are_all_there():
    if not REFVEC.exists():
        pytest.skip(f"reference vectors not available: {REFVEC}")
    assert len(STORED) == 7
    assert "big_delta_softplus_threshold" in [STORED[i] for i in STORED_GRADS]


@pytest.mark.parametrize("case", _cases("stored", STORED))
def test_stored_cases(result, case):
    e = result
    i = STORED.index(case.split("/", 1)[1])
    assert e["fp32_dtype"] == "torch.float32"
    assert e["fp32_abs"] <= e["tol32"], e  # the tolerance of tests/test_selective_scan.py
    assert ("fp64_abs" in e) == (i in STORED_FP64) and ("grad" in e) == (i in STORED_GRADS)
    if "fp64_abs" in e:
        assert e["fp64_abs"] <= 1e-11 * e["scale"], e
    if "grad" in e:
        assert_errors_below(e["grad"], dict(y=1e-5, u=1e-4, delta=1e-4, A=1e-4, B=1e-4, C=1e-4, D=1e-4,
                                            delta_bias=1e-4))


@pytest.mark.parametrize("case", _cases("fused", [c[0] for c in FUSED] + ["refvec_4x5"]))
def test_fused_cross_scan_and_merge(result, case):
    name = case.split("/", 1)[1]
    for mode in ("transpose", "gather"):
        e = result[f"{mode}/fp64"]
        assert e["dtype"] == "torch.float64"
        assert e["rel"] < 1e-11, (mode, e)
    if name in FUSED_LOW_PRECISION:
        e = result["transpose/fp32"]
        assert e["dtype"] == "torch.float32" and e["rel"] < 2e-6, e
        # bf16 inputs (x_dbl is rounded to bf16 by the bf16 projection), fp32 state and output
        e = result["transpose/bf16"]
        assert e["dtype"] == "torch.float32" and e["rel"] < 2e-2, e


@pytest.mark.parametrize("case", _cases("fused_options", [c[0] for c in OPTIONS]))
def test_fused_optional_arguments(result):
    assert result["rel"] < 1e-11


@pytest.mark.parametrize("case", ["ss2d"])
def test_ss2d_cuda_path_matches_cpu_path(result):
    assert result["abs"] < 1e-5 * max(1.0, result["scale"]), result


@pytest.fixture(scope="module")
def compiled(request) -> dict:
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    return run_case_worker(Path(__file__).resolve(), selected_cases(request, "variant"), flag="--compile",
                           interpret=False, env_extra=ENV, timeout=900)


@pytest.mark.parametrize("variant", _cases("compile", COMPILE_VARIANTS))
def test_kernels_compile_for_sm90(compiled, variant):
    assert case_result(compiled, variant) > 0  # bytes of cubin


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
    from lalic_codec.kernels.selective_scan import fused_cross_scan_kernel
    from lalic_codec.models import mambaic_layers

    assert fused_cross_scan_kernel(torch.zeros(1, 2, 3, 3), needs_grad=False) is None
    assert mambaic_layers.fused_cross_scan_kernel is fused_cross_scan_kernel  # the name SS2D calls (and benchmarks patch)


def test_ss2d_takes_the_unfused_path_on_cuda_unless_asked(monkeypatch):
    """The fused kernel is opt-in (LALIC_SS2D_FUSED=1): the unfused path was faster on an H200."""
    from types import SimpleNamespace

    from lalic_codec.kernels import selective_scan as ss

    monkeypatch.setattr(ss, "_use_triton", lambda x: True)
    cuda_map = SimpleNamespace(is_cuda=True)  # stands for a CUDA tensor: only is_cuda is read first
    monkeypatch.delenv("LALIC_SS2D_FUSED", raising=False)
    assert ss.fused_cross_scan_kernel(cuda_map, needs_grad=False) is None
    monkeypatch.setenv("LALIC_SS2D_FUSED", "0")
    assert ss.fused_cross_scan_kernel(cuda_map, needs_grad=False) is None
    monkeypatch.setenv("LALIC_SS2D_FUSED", "1")
    assert ss.fused_cross_scan_kernel(cuda_map, needs_grad=True) is None  # training: always unfused


if __name__ == "__main__" and "--worker" in sys.argv:  # pragma: no cover
    torch.set_num_threads(1)
    serve_cases(worker_cases(), [a for a in sys.argv[1:] if not a.startswith("--")])
elif __name__ == "__main__" and "--compile" in sys.argv:  # pragma: no cover
    serve_cases(compile_cases(), [a for a in sys.argv[1:] if not a.startswith("--")])
