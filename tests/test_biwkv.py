"""BiWKV reference and fast CPU path against the official kernel's vectors and the naive O(T^2) oracle."""

import math
from pathlib import Path

import pytest
import torch

from conftest import SHARED
from lalic_codec.kernels.biwkv import biwkv
from lalic_codec.kernels.biwkv_cpu import biwkv_cpu, fast_path_ok
from lalic_codec.kernels.biwkv_naive import biwkv_naive
from lalic_codec.kernels.biwkv_ref import _prefix_max, biwkv_reference

REFVEC = SHARED / "refvec"
CASES = torch.load(REFVEC / "biwkv_cases.pt", weights_only=True)["cases"]


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "T%d_C%d_%d" % (CASES[i]["k"].shape[1], CASES[i]["k"].shape[2], i))
def test_official_cases(i):
    c = CASES[i]
    w, u, k, v, y = c["w"], c["u"], c["k"], c["v"], c["y"]
    y64 = biwkv_reference(w.double(), u.double(), k.double(), v.double())
    assert (y64 - y).abs().max().item() < 1e-12
    y32 = biwkv_reference(w.float(), u.float(), k.float(), v.float())
    assert y32.dtype == torch.float32
    # the official fp32 kernel itself deviates from the float64 truth by up to 1.5e-6
    assert (y32.double() - y).abs().max().item() < 4e-6


def _btc(shapes) -> list:
    """(B, T, C) parameters with ids like B2_T33_C4."""
    return [pytest.param(*s, id="B%d_T%d_C%d" % s) for s in shapes]


def _random_case(B, T, C, kscale=3.0, wscale=5.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, generator=g, dtype=dtype) * wscale / T
    u = torch.randn(C, generator=g, dtype=dtype) * 3 / T
    k = torch.randn(B, T, C, generator=g, dtype=dtype) * kscale
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    return w, u, k, v


@pytest.mark.parametrize("B,T,C", _btc([(1, 1, 3), (2, 7, 5), (1, 31, 4), (1, 32, 4), (2, 33, 4), (1, 97, 3), (1, 257, 2), (2, 1031, 3)]))
def test_matches_dense_definition(B, T, C):
    w, u, k, v = _random_case(B, T, C, seed=T)
    assert torch.allclose(biwkv_reference(w, u, k, v), biwkv_naive(w, u, k, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift", [30.0, -30.0, 0.0], ids=["plus30", "minus30", "signs30"])
def test_large_keys_are_stable(shift):
    # |k| around 30 in both directions, plus random signs: no overflow, no NaN
    w, u, k, v = _random_case(1, 300, 4, kscale=1.0, seed=1)
    signs = torch.where(torch.rand(k.shape, generator=torch.Generator().manual_seed(2)) > 0.5, 1.0, -1.0).double()
    k = k + shift if shift else k * 30 * signs
    ref = biwkv_naive(w, u, k, v)
    out32 = biwkv_reference(w.float(), u.float(), k.float(), v.float())
    assert torch.isfinite(out32).all()
    assert (out32.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("B,T,C", _btc([(1, 1, 3), (2, 33, 4), (1, 70, 3), (2, 200, 5)]))
def test_gradients_match_dense(B, T, C):
    w, u, k, v = _random_case(B, T, C, seed=100 + T)
    g = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ours = [x.clone().requires_grad_() for x in (w, u, k, v)]
    (biwkv_reference(*ours) * g).sum().backward()
    dense = [x.clone().requires_grad_() for x in (w, u, k, v)]
    # the stabiliser M_t is a constant for autograd (it only enters through the 1e-6 epsilon)
    (biwkv_naive(*dense, detach_max=True) * g).sum().backward()
    for name, a, b in zip("wukv", ours, dense):
        assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-12), name


def test_half_precision_inputs_compute_in_float32():
    w, u, k, v = _random_case(1, 65, 16, dtype=torch.float32, seed=3)
    out = biwkv_reference(w, u, k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = biwkv_reference(w, u, k.bfloat16().float(), v.bfloat16().float())
    assert (out.float() - ref).abs().max().item() < 1e-2


@pytest.mark.parametrize("P", [1, 2, 5, 64, 65, 200], ids=lambda P: f"P{P}")
def test_prefix_max(P):
    x = torch.randn(2, 3, P, 4)
    assert torch.equal(_prefix_max(x, exclusive=False), torch.cummax(x, dim=2).values)
    ex = _prefix_max(x, exclusive=True)
    assert torch.equal(ex[:, :, 1:], torch.cummax(x, dim=2).values[:, :, :-1])
    assert (ex[:, :, 0] < -1e29).all()


@pytest.mark.parametrize("B,T,C", _btc([(1, 1, 3), (2, 7, 5), (1, 32, 4), (2, 33, 4), (3, 64, 6), (1, 97, 3), (1, 257, 2), (2, 1031, 3)]))
def test_fast_cpu_path_matches_dense_definition(B, T, C):
    w, u, k, v = _random_case(B, T, C, seed=T)
    ref = biwkv_naive(w, u, k, v)
    assert fast_path_ok(w, u, k)
    # float64: only the epsilon's stabiliser differs (1e-6 relative, a few times that where the
    # kernel's negative residual terms cancel most of the denominator, as at T = 1 with w = 3.3)
    assert torch.allclose(biwkv_cpu(w, u, k, v), ref, rtol=1e-5, atol=1e-9)
    y32 = biwkv_cpu(w.float(), u.float(), k.float(), v.float())
    assert y32.dtype == torch.float32
    assert (y32.double() - ref).abs().max().item() < 1e-5


# (T = 1 is left out: there y = v up to the epsilon, whose 1e-6-sized gradients differ in kind)
@pytest.mark.parametrize("B,T,C", _btc([(1, 3, 3), (2, 33, 4), (1, 70, 3), (2, 200, 5)]))
def test_fast_cpu_path_gradients_match_dense(B, T, C):
    w, u, k, v = _random_case(B, T, C, seed=100 + T)
    g = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ours = [x.clone().requires_grad_() for x in (w, u, k, v)]
    (biwkv_cpu(*ours) * g).sum().backward()
    dense = [x.clone().requires_grad_() for x in (w, u, k, v)]
    (biwkv_naive(*dense, detach_max=True) * g).sum().backward()
    for name, a, b in zip("wukv", ours, dense):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_dispatcher_on_cpu_fast_path_and_fallback(monkeypatch):
    w, u, k, v = _random_case(2, 40, 8, dtype=torch.float32, seed=5)
    assert torch.equal(biwkv(w, u, k, v), biwkv_cpu(w, u, k, v))
    # keys spanning more than float32's exponent range: the reference's per-token stabiliser
    k_wide = k.clone()
    k_wide[:, 0] += 80.0
    assert not fast_path_ok(w, u, k_wide)
    y = biwkv(w, u, k_wide, v)
    assert torch.equal(y, biwkv_reference(w, u, k_wide, v))
    assert torch.isfinite(y).all()
    # half precision (CPU autocast) is evaluated on the fast path in float32, returned in its own dtype
    kh, vh = k.bfloat16(), v.bfloat16()
    yh = biwkv(w, u, kh, vh)
    assert yh.dtype == torch.bfloat16
    assert torch.equal(yh, biwkv_cpu(w, u, kh.float(), vh.float()).bfloat16())
    # the debugging switch goes to the reference
    monkeypatch.setenv("LALIC_FORCE_REFERENCE", "1")
    assert torch.equal(biwkv(w, u, k, v), biwkv_reference(w, u, k, v))


@pytest.mark.parametrize("fn", [biwkv, biwkv_reference], ids=["dispatcher", "reference"])
def test_rejects_bad_shapes(fn):
    w, u, k, v = _random_case(1, 10, 4, dtype=torch.float32)
    with pytest.raises(ValueError):
        fn(w, u, k, v[:, :5])
    with pytest.raises(ValueError):
        fn(w[:3], u, k, v)
