"""Depthwise convolution (stride 1, "same" padding, odd square kernel) with a faster CPU backward.

LALIC's OmniShift is one depthwise 5x5 convolution per RWKV mix.  Its forward is cheap on CPU,
but PyTorch's backward runs far longer (measured on 2 cores at (4, 64, 64, 64) under bf16
autocast: forward 0.4 ms, forward and backward 18.5 ms), most of it in the weight gradient, a
correlation of the input with the output gradient at k x k offsets, per channel.  With training
compilation on (``_compile``) that gradient is a fused loop over the offsets, accumulated in
float32, that inductor vectorises over channels (2.0 ms at that shape); otherwise the dispatcher
leaves the convolution to PyTorch (its eager float32 weight gradient, ``depthwise_weight_grad``
without compilation, made the training step slower, not faster).

The input gradient is the forward convolution of the output gradient with the flipped kernel.
The forward is ``F.conv2d`` itself, so outputs are unchanged; without autograd (inference),
without compilation, or off the CPU (cuDNN's backward is fine), the dispatcher calls
``F.conv2d`` directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._compile import compile_enabled, compiled

__all__ = ["depthwise_conv2d", "depthwise_conv2d_fast_backward", "depthwise_weight_grad"]


@compiled
def _weight_grad_taps(x: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """(C, k*k) sums over batch and positions of ``g * x`` shifted by every offset; ``x``, ``g``:
    (B, H, W, C) (channels last), any float dtype, accumulated in float32 (float64 stays float64)."""
    _, H, W, _ = x.shape
    p = k // 2
    acc = torch.promote_types(x.dtype, torch.float32)
    xp = F.pad(x.to(acc), (0, 0, p, p, p, p))
    gf = g.to(acc)
    return torch.stack([(gf * xp[:, i : i + H, j : j + W, :]).sum((0, 1, 2)) for i in range(k) for j in range(k)], 1)


def depthwise_weight_grad(x: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient (C, 1, k, k), float32 (float64 for float64 inputs), of ``sum(g * depthwise_conv(x, w))`` with respect to ``w``:
    the compiled tap loop when training compilation is on, else PyTorch's kernel in float32."""
    C = x.shape[1]
    if compile_enabled():
        taps = _weight_grad_taps.maybe_compiled(x.detach().permute(0, 2, 3, 1), g.detach().permute(0, 2, 3, 1), k)
        return taps.reshape(C, 1, k, k)
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, gf = x.to(acc), g.to(acc)
    w0 = xf.new_empty((C, 1, k, k))
    return torch.ops.aten.convolution_backward(gf, xf, w0, None, (1, 1), (k // 2, k // 2), (1, 1), False, (0, 0), C, (False, True, False))[1]


class _DepthwiseConv(torch.autograd.Function):
    """Inputs: ``x``, the float32 weight ``w``, and the dtype to compute in (autocast's, or x's)."""

    @staticmethod
    def forward(ctx, x, w, dtype):
        xc = x.to(dtype)
        ctx.save_for_backward(xc, w)
        ctx.x_dtype = x.dtype
        return F.conv2d(xc, w.to(dtype), padding=w.shape[-1] // 2, groups=w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        k = w.shape[-1]
        gx = gw = None
        if ctx.needs_input_grad[0]:  # the primitive conv2d's own backward uses: the same bits on every CPU
            gx = torch.ops.aten.convolution_backward(g, x, w.to(g.dtype), None, (1, 1), (k // 2, k // 2), (1, 1), False, (0, 0), w.shape[0],
                                                     (True, False, False))[0].to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gw = depthwise_weight_grad(x, g, k).to(w.dtype)
        return gx, gw, None


def depthwise_conv2d(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, w, padding=k // 2, groups=C)`` for ``x`` (B, C, H, W) and ``w`` (C, 1, k, k),
    k odd; on the CPU with autograd and training compilation on, through the faster backward."""
    k = w.shape[-1]
    if w.shape[0] != x.shape[1] or w.shape[1] != 1 or w.shape[-2] != k or k % 2 == 0:
        raise ValueError(f"depthwise_conv2d needs x (B, C, H, W) and w (C, 1, k, k) with k odd, got {tuple(x.shape)} and {tuple(w.shape)}")
    if compile_enabled() and x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return depthwise_conv2d_fast_backward(x, w)
    return F.conv2d(x, w, padding=k // 2, groups=x.shape[1])


def depthwise_conv2d_fast_backward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The convolution through ``_DepthwiseConv``: under autocast computed in autocast's dtype, as
    ``F.conv2d`` would be, the weight's gradient kept in the weight's own dtype."""
    if torch.is_autocast_enabled("cpu") and x.is_floating_point():
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return _DepthwiseConv.apply(x, w, dtype)
    return _DepthwiseConv.apply(x, w, torch.promote_types(x.dtype, w.dtype))
