"""Depthwise convolution with the faster CPU backward, and the training-time compiled fast paths
(``kernels._compile``): same outputs as ``F.conv2d``, gradients as autograd's, eager and compiled."""

import pytest
import torch
import torch.nn.functional as F

from lalic_codec.kernels import _compile
from lalic_codec.kernels.biwkv import biwkv
from lalic_codec.kernels.biwkv_cpu import biwkv_cpu
from lalic_codec.kernels.depthwise import depthwise_conv2d, depthwise_conv2d_fast_backward, depthwise_weight_grad


@pytest.fixture
def compiled_paths():
    if not _compile.compiler_available():
        pytest.skip("no C++ compiler for torch.compile")
    _compile.set_compile(True)
    yield
    _compile.set_compile(False)
    assert not _compile._STATE["failed"], "torch.compile failed and fell back to the eager paths"


def _case(B, C, H, W, k, dtype=torch.float64, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, generator=g, dtype=dtype)
    go = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    return x, w, go


def _grads(fn, x, w, go, need=(True, True)):
    x = x.detach().clone().requires_grad_(need[0])
    w = w.detach().clone().requires_grad_(need[1])
    y = fn(x, w)
    y.backward(go.to(y.dtype))
    return y, x.grad, w.grad


def _reference(x, w):
    return F.conv2d(x, w, padding=w.shape[-1] // 2, groups=x.shape[1])


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradients_match_autograd(k, channels_last):
    # the custom backward with its eager weight gradient (the compiled one: below)
    x, w, go = _case(2, 6, 9, 11, k, channels_last=channels_last, seed=k)
    y, gx, gw = _grads(depthwise_conv2d_fast_backward, x, w, go)
    y0, gx0, gw0 = _grads(_reference, x, w, go)
    assert torch.equal(y, y0)
    assert torch.allclose(gx, gx0, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gw, gw0, rtol=1e-12, atol=1e-12)
    # one input at a time needs only its own gradient
    _, gx1, gw1 = _grads(depthwise_conv2d_fast_backward, x, w, go, need=(True, False))
    assert gw1 is None and torch.allclose(gx1, gx0, rtol=1e-12, atol=1e-12)
    _, gx2, gw2 = _grads(depthwise_conv2d_fast_backward, x, w, go, need=(False, True))
    assert gx2 is None and torch.allclose(gw2, gw0, rtol=1e-12, atol=1e-12)


def test_without_compilation_or_autograd_it_is_conv2d_itself():
    x, w, go = _case(1, 8, 16, 16, 5, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(depthwise_conv2d(x, w), _reference(x, w))
    assert torch.equal(depthwise_conv2d(x, w), _reference(x, w))  # no input needs a gradient
    y, gx, gw = _grads(depthwise_conv2d, x, w, go)  # training without compilation: PyTorch's backward
    y0, gx0, gw0 = _grads(_reference, x, w, go)
    assert torch.equal(y, y0) and torch.equal(gx, gx0) and torch.equal(gw, gw0)


def test_bf16_autocast_computes_as_conv2d_and_keeps_weight_gradient_in_float32():
    x, w, go = _case(2, 8, 12, 12, 5, dtype=torch.float32, channels_last=True, seed=3)

    def under_autocast(fn):
        def run(x, w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x, w)
        return run

    y, gx, gw = _grads(under_autocast(depthwise_conv2d_fast_backward), x, w, go)
    y0, gx0, gw0 = _grads(under_autocast(_reference), x, w, go)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y0)
    assert gx.dtype == gw.dtype == torch.float32
    assert torch.equal(gx, gx0)
    # the weight gradient is accumulated in float32: closer to the exact one than autocast's own
    xb = x.bfloat16().double()
    _, _, exact = _grads(_reference, xb, w.double(), go.bfloat16().double())
    assert (gw.double() - exact).abs().max() <= (gw0.double() - exact).abs().max()
    assert torch.allclose(gw.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


def test_rejects_shapes_it_does_not_compute():
    x = torch.randn(1, 4, 8, 8)
    for w in (torch.randn(4, 1, 4, 4), torch.randn(3, 1, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4, 1, 3, 5)):
        with pytest.raises(ValueError):
            depthwise_conv2d(x, w)


def test_compiled_paths_match_eager(compiled_paths):
    # the depthwise weight gradient's fused tap loop, at two image sizes
    for seed, (H, W) in enumerate([(12, 10), (7, 16)], start=11):
        x, w, go = _case(2, 16, H, W, 5, dtype=torch.float32, channels_last=True, seed=seed)
        _, gx, gw = _grads(depthwise_conv2d, x, w, go)
        _, gx0, gw0 = _grads(_reference, x, w, go)
        assert torch.allclose(gx, gx0, rtol=1e-5, atol=1e-5)
        assert torch.allclose(gw, gw0, rtol=1e-5, atol=1e-4)
        assert torch.allclose(depthwise_weight_grad(x, go, 5), gw0, rtol=1e-5, atol=1e-4)
    # BiWKV's fast path, forward and backward, through the dispatcher as training calls it; the
    # sequence lengths change as crops of several shapes do (a padded last chunk or none): the
    # compiled function turns dynamic at the second and must stay exact at each
    for B, T, C in [(2, 70, 6), (1, 45, 6), (3, 144, 6)]:
        g = torch.Generator().manual_seed(T)
        inputs = [torch.randn(C, generator=g) * 3 / T, torch.randn(C, generator=g) / T, torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)]
        gy = torch.randn(B, T, C, generator=g)
        outs = []
        for fn in (biwkv, biwkv_cpu):  # the dispatcher takes the compiled path here
            leaves = [t.clone().requires_grad_() for t in inputs]
            y = fn(*leaves)
            (y * gy).sum().backward()
            outs.append([y.detach()] + [t.grad for t in leaves])
        for name, a, b in zip(["y", "w", "u", "k", "v"], *outs):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (name, T)
    with torch.no_grad():  # inference never compiles: the eager function itself
        assert torch.equal(biwkv(*inputs), biwkv_cpu(*inputs))


def test_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    calls = []

    @_compile.compiled
    def double(t):
        calls.append(1)
        return 2 * t

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    _compile.set_compile(True)
    try:
        with pytest.warns(RuntimeWarning, match="torch.compile failed"):
            assert torch.equal(double.maybe_compiled(torch.ones(2)), torch.full((2,), 2.0))
        assert not _compile.compile_enabled()
        assert torch.equal(double.maybe_compiled(torch.ones(1)), torch.full((1,), 2.0))  # eager from now on
    finally:
        _compile.set_compile(False)
        _compile._STATE["failed"] = False
    assert len(calls) == 2
    assert "torch.compile failed (RuntimeError: no compiler here)" in capsys.readouterr().err


def test_use_compile_setting(monkeypatch):
    from lalic_codec import train as tr

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tr.use_compile("on", cuda) and not tr.use_compile("off", cpu)
    assert not tr.use_compile("auto", cuda)
    monkeypatch.setattr(_compile, "compiler_available", lambda: False)
    assert not tr.use_compile("auto", cpu)
    monkeypatch.setattr(_compile, "compiler_available", lambda: True)
    assert tr.use_compile("auto", cpu)
