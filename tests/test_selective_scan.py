"""Selective scan (MambaIC's SS2D core) against the reference vectors and the naive float64 loop
(``kernels/selective_scan_naive.py``)."""


import pytest
import torch
import torch.nn.functional as F

from lalic_codec._paths import shared_dir
from lalic_codec.kernels import selective_scan as dispatch
from lalic_codec.kernels import selective_scan_ref as ssr
from lalic_codec.kernels.selective_scan_naive import selective_scan_naive
from lalic_codec.kernels.selective_scan_ref import affine_scan, cross_merge, cross_scan, selective_scan_reference

CASES = shared_dir() / "refvec" / "selective_scan_cases.pt"
ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
_LOADED = torch.load(CASES, weights_only=True) if CASES.exists() else None
#: the stored cases by name (parametrize ids)
CASE_IDS = [c["name"] for c in _LOADED["cases"]] if _LOADED is not None else []


@pytest.fixture(scope="module")
def cases():
    if _LOADED is None:
        pytest.skip(f"reference vectors not available: {CASES}")
    return _LOADED


def case_args(c, dtype=None):
    args = [c[k] for k in ARGS]
    if dtype is not None:
        args = [a.to(dtype) if a is not None else None for a in args]
    return args


def test_sequential_loop_reproduces_the_stored_results(cases):
    for c in cases["cases"]:
        if c["u"].shape[-1] > 256:
            continue  # the loop is slow; the long case is covered by the fast reference below
        out = selective_scan_naive(*case_args(c), c["delta_softplus"])
        assert (out - c["out"]).abs().max().item() < 1e-10, c["name"]


@pytest.mark.parametrize("i", range(len(CASE_IDS)), ids=CASE_IDS)
def test_reference_matches_cases_float32(cases, i):
    c = cases["cases"][i]
    y = selective_scan_reference(*case_args(c), c["delta_softplus"])
    assert y.dtype == torch.float32 and y.shape == c["out"].shape
    err = (y.double() - c["out"]).abs().max().item()
    # an fp32 sequential recurrence deviates by meta's figure; allow twice that plus 5e-7 relative
    tol = 2 * c["meta"]["max_abs_fp32_compute_vs_fp64"] + 5e-7 * max(1.0, c["meta"]["max_abs_out"])
    assert err <= tol, (c["name"], err, tol)


@pytest.mark.parametrize("i", range(len(CASE_IDS)), ids=CASE_IDS)
def test_chunked_form_matches_cases(cases, i):
    """The differentiable chunked form (what autograd and non-CPU devices use), without autograd."""
    c = cases["cases"][i]
    y = selective_scan_reference(*case_args(c), c["delta_softplus"], method="chunked")
    tol = 2 * c["meta"]["max_abs_fp32_compute_vs_fp64"] + 5e-7 * max(1.0, c["meta"]["max_abs_out"])
    assert (y.double() - c["out"]).abs().max().item() <= tol, c["name"]
    y = selective_scan_reference(*case_args(c, torch.float64), c["delta_softplus"], method="chunked")
    assert (y - c["out"]).abs().max().item() <= 1e-11 * max(1.0, c["meta"]["max_abs_out"]), c["name"]


@pytest.mark.parametrize("i", range(len(CASE_IDS)), ids=CASE_IDS)
def test_reference_matches_cases_float64(cases, i):
    c = cases["cases"][i]
    y = selective_scan_reference(*case_args(c, torch.float64), c["delta_softplus"])
    assert y.dtype == torch.float64
    assert (y - c["out"]).abs().max().item() <= 1e-11 * max(1.0, c["meta"]["max_abs_out"]), c["name"]


def random_problem(b=1, K=2, D=3, N=4, L=70, big_delta=False, seed=0, dtype=torch.float64, grouped=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u, delta = r(b, K * D, L), r(b, K * D, L) - 1.0
    if big_delta:  # decays far too strong for the split form: exercises the fallback
        delta = delta + 6.0 * (torch.rand(b, K * D, L, generator=g, dtype=dtype) < 0.3)
    A = -torch.exp(r(K * D, N) * 0.5 + 1.0)
    B, C = (r(b, K, N, L), r(b, K, N, L)) if grouped else (r(b, N, L), r(b, N, L))
    return [u, delta, A, B, C, r(K * D), r(K * D) * 0.5]


@pytest.mark.parametrize("L", [1, 2, 31, 32, 33, 70, 1100], ids=lambda L: f"L{L}")
def test_lengths_and_chunk_boundaries(L):
    args = random_problem(L=L, seed=L)
    ref = selective_scan_naive(*args, delta_softplus=True)
    for chunk in (8, 32):
        y = selective_scan_reference(*args, delta_softplus=True, chunk=chunk, method="chunked")
        assert (y - ref).abs().max().item() < 1e-11
    for method in ("chunked", "sequential"):
        y32 = selective_scan_reference(*(a.float() for a in args), delta_softplus=True, method=method)
        assert (y32.double() - ref).abs().max().item() < 2e-5, method


def test_ungrouped_B_C_and_optional_arguments():
    u, delta, A, B, C, D, bias = random_problem(K=1, D=5, grouped=False, L=50)
    for d_, b_, sp in ((None, None, False), (D, None, True), (None, bias, True)):
        y = selective_scan_reference(u, delta.abs(), A, B, C, d_, b_, sp)
        ref = selective_scan_naive(u, delta.abs(), A, B, C, d_, b_, sp)
        assert (y - ref).abs().max().item() < 1e-11


@pytest.mark.parametrize("method", ["chunked", "sequential"])
def test_strong_decays_stay_finite_and_exact(method):
    args = random_problem(D=4, N=16, L=200, big_delta=True, seed=3)
    ref = selective_scan_naive(*args, delta_softplus=True)
    y = selective_scan_reference(*args, delta_softplus=True, method=method)
    assert (y - ref).abs().max().item() < 1e-10
    y32 = selective_scan_reference(*(a.float() for a in args), delta_softplus=True, method=method)
    assert torch.isfinite(y32).all()
    assert (y32.double() - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("big_delta", [False, True], ids=["moderate_decays", "strong_decays"])
def test_gradients_match_the_sequential_loop(big_delta):
    args = random_problem(L=45, big_delta=big_delta, seed=7)
    grads = []
    for fn in (lambda *a: selective_scan_reference(*a, delta_softplus=True, chunk=8), lambda *a: selective_scan_naive(*a, delta_softplus=True)):
        leaves = [a.clone().requires_grad_(True) for a in args]
        out = fn(*leaves)
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (out * w).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, g_fast, g_seq in zip(ARGS, *grads):
        assert torch.isfinite(g_fast).all(), name
        assert (g_fast - g_seq).abs().max().item() <= 1e-9 * max(1.0, g_seq.abs().max().item()), name


def test_float32_gradients_are_finite_with_strong_decays():
    args = [a.float().requires_grad_(True) for a in random_problem(L=70, big_delta=True, seed=11)]
    selective_scan_reference(*args, delta_softplus=True).sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in args)


def test_affine_scan():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 37, generator=g, dtype=torch.float64), torch.randn(3, 37, generator=g, dtype=torch.float64)
    h, ref = affine_scan(a, b), []
    state = torch.zeros(3, dtype=torch.float64)
    for t in range(37):
        state = a[:, t] * state + b[:, t]
        ref.append(state)
    assert (h - torch.stack(ref, 1)).abs().max().item() < 1e-12


def test_cross_scan_and_merge(cases):
    cs = cases["cross_scan_merge"]
    assert torch.equal(cross_scan(cs["x"]), cs["cross_scan_out"])
    assert torch.equal(cross_merge(cs["ys"]), cs["cross_merge_out"])
    B, K, C, H, W = cs["ys"].shape
    assert torch.equal(cross_merge(cs["ys"].reshape(B, K, C, H * W), H, W), cs["cross_merge_out"])
    x = cs["x"]
    assert torch.allclose(cross_merge(cross_scan(x), x.shape[2], x.shape[3]), 4 * x.flatten(2))


def test_dispatcher_uses_the_reference_on_cpu(cases, monkeypatch):
    c = cases["cases"][0]
    expected = selective_scan_reference(*case_args(c), c["delta_softplus"])
    assert not dispatch._use_triton(c["u"])
    assert torch.equal(dispatch.selective_scan(*case_args(c), c["delta_softplus"]), expected)
    monkeypatch.setenv("LALIC_FORCE_REFERENCE", "1")
    assert not dispatch._use_triton(c["u"])
    assert torch.equal(dispatch.selective_scan(*case_args(c), c["delta_softplus"]), expected)


# --- the sequential scan (no-grad CPU path) --------------------------------------------------------


@pytest.mark.parametrize("groups", ["default", "G=1", "G=3"])
@pytest.mark.parametrize(
    "L, b, grouped, big_delta",
    [pytest.param(L, b, g, d, id=f"L{L}_b{b}" + ("" if g else "_ungrouped") + ("_strong_decays" if d else ""))
     for L, b, g, d in [(1, 1, True, False), (2, 2, True, False), (7, 1, False, False), (97, 1, True, True),
                        (130, 2, True, False), (1009, 1, True, True)]],
)
def test_sequential_scan_matches_the_loop(monkeypatch, groups, L, b, grouped, big_delta):
    """Awkward lengths (1, primes, not a multiple of the group), batches, one group for all channels,
    strong decays, and group sizes that split the sequence into many (partial) groups."""
    if groups != "default":
        g = int(groups[2:])
        monkeypatch.setattr(ssr, "GROUP_TOKENS", (g, g))
    args = random_problem(b=b, L=L, big_delta=big_delta, grouped=grouped, seed=L + b)
    ref = selective_scan_naive(*args, delta_softplus=True)
    y = selective_scan_reference(*args, delta_softplus=True, method="sequential")
    assert y.dtype == torch.float64 and y.shape == ref.shape
    assert (y - ref).abs().max().item() < 1e-11 * max(1.0, ref.abs().max().item())
    y32 = selective_scan_reference(*(a.float() for a in args), delta_softplus=True, method="sequential")
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()
    assert (y32.double() - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


def test_sequential_scan_softplus_threshold_and_options():
    """delta + 25 (softplus passes values above 20 through; decays underflow to 0), and every
    combination of the optional arguments."""
    u, delta, A, B, C, D, bias = random_problem(D=4, N=16, L=90, seed=5)
    big = delta + 25.0
    ref = selective_scan_naive(u, big, A, B, C, D, bias, True)
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 1e-5)):
        a = [t.to(dtype) for t in (u, big, A, B, C, D, bias)]
        y = selective_scan_reference(*a, delta_softplus=True, method="sequential")
        assert torch.isfinite(y).all()
        assert (y.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())
    for d_, b_, sp in ((None, None, False), (D, None, True), (None, bias, True), (None, None, True)):
        y = selective_scan_reference(u, delta.abs(), A, B, C, d_, b_, sp, method="sequential")
        assert (y - selective_scan_naive(u, delta.abs(), A, B, C, d_, b_, sp)).abs().max().item() < 1e-11


def test_sequential_scan_layouts_and_dtypes():
    """Token-major inputs ((b, L, C) memory passed as transposed views) give the same numbers and a
    token-major output; half precision is computed in float32 and returned in its own dtype."""
    args = random_problem(b=2, K=2, D=3, N=16, L=77, seed=9, dtype=torch.float32)
    u, delta = args[0], args[1]
    y = selective_scan_reference(*args, delta_softplus=True, method="sequential")
    assert y.is_contiguous()
    ut, dt = u.transpose(1, 2).contiguous().transpose(1, 2), delta.transpose(1, 2).contiguous().transpose(1, 2)
    yt = selective_scan_reference(ut, dt, *args[2:], delta_softplus=True, method="sequential")
    assert torch.equal(yt, y) and yt.transpose(1, 2).is_contiguous()
    half = [a.to(torch.bfloat16) for a in args]
    yh = selective_scan_reference(*half, delta_softplus=True, method="sequential")
    y32 = selective_scan_reference(*(a.float() for a in half), delta_softplus=True, method="sequential")
    assert yh.dtype == torch.bfloat16 and torch.equal(yh, y32.to(torch.bfloat16))


def test_method_dispatch():
    args = random_problem(L=40, seed=2, dtype=torch.float32)
    seq = selective_scan_reference(*args, delta_softplus=True, method="sequential")
    assert torch.equal(selective_scan_reference(*args, delta_softplus=True), seq)  # auto: CPU, no grad
    with torch.no_grad():
        assert torch.equal(dispatch.selective_scan(*args, delta_softplus=True), seq)
    leaves = [a.clone().requires_grad_(True) for a in args]
    y = selective_scan_reference(*leaves, delta_softplus=True)  # auto with autograd: the chunked form
    assert y.requires_grad
    assert (y.detach() - selective_scan_reference(*args, delta_softplus=True, method="chunked")).abs().max().item() < 1e-5
    with pytest.raises(ValueError):
        selective_scan_reference(*leaves, delta_softplus=True, method="sequential")
    with pytest.raises(ValueError):
        selective_scan_reference(*args, method="loop")


# --- SS2D's CPU path (token-major, 1, 2 or 4 directions per scan call) ---------------------------------


def official_ss2d_scan(m, x):
    """SS2D.scan as the official code writes it (cross scan, einsums, scan, cross merge), float64 loop."""
    B, D, H, W = x.shape
    N, R = m.d_state, m.dt_rank
    x = x.double()
    xs = cross_scan(x)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, m.x_proj_weight.double())
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, m.dt_projs_weight.double())
    ys = selective_scan_naive(xs.reshape(B, 4 * D, H * W), dts.reshape(B, 4 * D, H * W), -torch.exp(m.A_logs.double()),
                         Bs, Cs, m.Ds.double(), m.dt_projs_bias.double().reshape(-1), True)
    y = cross_merge(ys.view(B, 4, D, H * W), H, W)
    return F.layer_norm(y.transpose(1, 2), (D,), m.out_norm.weight.double(), m.out_norm.bias.double(), 1e-5).view(B, H, W, D)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_ss2d_cpu_path_matches_the_official_form(channels_last):
    from lalic_codec.models.mambaic_layers import SS2D

    torch.manual_seed(0)
    m = SS2D(8).eval()
    with torch.no_grad():
        m.A_logs.add_(torch.randn_like(m.A_logs) * 0.3)
        m.dt_projs_bias.add_(1.0)
    x = torch.randn(2, 16, 5, 7)
    if channels_last:  # what the CPU conv hands over
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = official_ss2d_scan(m, x)
        outs = [m._scan_by_direction(x, -torch.exp(m.A_logs), m.Ds, m.dt_projs_bias.reshape(-1), torch.float32, n)
                for n in (1, 2, 4)]
        y = m.scan(x)
    assert (y.double() - ref).abs().max().item() < 2e-5
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-6
    # autograd through the CPU path (the chunked form), float64, against the official form
    xg = x.double().requires_grad_(True)
    m64 = m.double()
    w = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).view_as(ref)
    (m64.scan(xg) * w).sum().backward()
    g_fast = [xg.grad] + [p.grad for p in (m64.x_proj_weight, m64.dt_projs_weight, m64.A_logs, m64.Ds)]
    xg.grad = None
    m64.zero_grad()
    (official_ss2d_scan(m64, xg) * w).sum().backward()
    g_ref = [xg.grad] + [p.grad for p in (m64.x_proj_weight, m64.dt_projs_weight, m64.A_logs, m64.Ds)]
    for a, b in zip(g_fast, g_ref):
        assert (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())
