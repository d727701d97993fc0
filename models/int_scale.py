"""A device-independent scale path: an integer network that picks the CDF table of every symbol.

Why: the range decoder must choose exactly the table the encoder chose.  When that choice comes
from floating-point network outputs, a one-ULP difference between devices (or thread counts, or
convolution algorithms) near a table boundary desynchronises the decoder.  Following "Integer
networks for data compression with latent-variable models" (Balle, Johnston, Minnen, ICLR 2019)
and JPEG AI, the table index here is computed by an integer network whose inputs are themselves
exactly known to both sides: the hyper-latent symbols, the residual symbols of already decoded
channel groups and anchors, and the quality.  The means (which only move the reconstruction, not
the parse) stay in floating point in the LALIC network.

Arithmetic: every layer is ``out = clamp(round_half_up((W x + b) / 2^s), lo, hi)`` with integer
weights |W| <= 63, integer biases and integer activations in [0, 127].  At inference the products
and sums are evaluated in float64 on integer values through unfold + matmul (never a convolution
algorithm that transforms its operands, such as Winograd or FFT), so every intermediate value is
an integer far below 2^53 and the result is exact on every device in any summation order.
During training the same layers run in float32 with straight-through rounding (quantisation-aware
training); only inference must be exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .entropy_models import full_precision
from .layers import checkerboard_taps

W_MAX = 63
A_MAX = 127
NUM_SCALES = 64


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x + 0.5) - x).detach()


class IntConv2d(nn.Module):
    """Integer convolution ``clamp(round((W * x + b) / 2^shift), lo, hi)`` (see module docstring)."""

    def __init__(self, cin: int, cout: int, k: int = 1, shift: int = 8, act: bool = True, mask: torch.Tensor | None = None):
        super().__init__()
        self.k, self.shift, self.act = k, shift, act
        fan_in = cin * k * k
        # Parameters hold the effective real-valued weights and biases (integer / 2^shift), so that
        # optimiser steps have their usual size relative to the values; the integers are derived.
        w_lim = W_MAX / 2.0**shift
        self.weight = nn.Parameter((torch.randn(cout, cin, k, k) * math.sqrt(2.0 / fan_in)).clamp(-w_lim, w_lim))
        self.bias = nn.Parameter(torch.zeros(cout))
        if mask is not None:
            self.register_buffer("mask", mask.expand(cout, cin, k, k).clone())
        else:
            self.mask = None

    def int_weight(self) -> torch.Tensor:
        w = (self.weight * 2.0**self.shift).clamp(-W_MAX, W_MAX)
        w = _ste_round(w) if self.training else torch.floor(w + 0.5)
        return w * self.mask if self.mask is not None else w

    def int_bias(self) -> torch.Tensor:
        b = self.bias * 2.0**self.shift
        return _ste_round(b) if self.training else torch.floor(b + 0.5)

    @full_precision
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            acc = F.conv2d(x, self.int_weight(), self.int_bias(), padding=self.k // 2)
            y = acc / 2.0**self.shift
            if self.act:
                y = y.clamp(0, A_MAX)
            return _ste_round(y)
        return self._exact(x)

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        """Exact integer evaluation (float64 on integer values, unfold + matmul)."""
        B, C, H, W = x.shape
        w = self.int_weight().to(torch.float64).reshape(self.weight.shape[0], -1)
        cols = F.unfold(x.to(torch.float64), self.k, padding=self.k // 2)  # (B, C*k*k, H*W)
        acc = torch.matmul(w, cols) + self.int_bias().to(torch.float64).view(1, -1, 1)
        y = torch.floor((acc + 2.0 ** (self.shift - 1)) / 2.0**self.shift)
        if self.act:
            y = y.clamp(0, A_MAX)
        return y.reshape(B, -1, H, W).to(x.dtype)


def _clip_int(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return x.clamp(lo, hi)


class IntegerScalePath(nn.Module):
    """Table indexes (0..63) for every latent element of every channel group.

    Inputs (all integers): the hyper-latent symbols ``z_sym`` (B, Cz, h, w), the quality q
    (as round(16 q)), the residual symbols of earlier groups, and for the non-anchor pass the
    residual symbols of the group's anchors.

    Two layouts (FORMAT.md 11.6), told apart by their tensor shapes:

    * v1 (``signed=False, deep=False``, the default-v1 model): the contexts see only the
      magnitudes of the residual symbols; one layer per context, a two-layer head.
    * v2 (``signed=True, deep=True``): the contexts see the signed residuals and their
      magnitudes, the channel context has two layers and the head three.
    """

    def __init__(self, cz: int, groups: list[int], hidden: int = 96, ctx: int = 32, up: int = 4,
                 head: int = 64, signed: bool = False, deep: bool = False):
        super().__init__()
        self.groups = list(groups)
        self.up = up
        self.signed = signed
        self.deep = deep
        self.hyper = nn.Sequential(
            IntConv2d(cz + 1, hidden, 1),
            IntConv2d(hidden, hidden, 3),
            IntConv2d(hidden, ctx * up * up, 1),
        )
        f = 2 if signed else 1  # input planes per residual channel

        def channel_ctx(k: int) -> nn.Module:
            if not k:
                return nn.Identity()
            first = IntConv2d(f * sum(groups[:k]), ctx, 3)
            return nn.Sequential(first, IntConv2d(ctx, ctx, 1)) if deep else first

        def head_net(k: int, g: int) -> nn.Sequential:
            cin = ctx * (3 if k else 2) + 1
            if deep:
                return nn.Sequential(IntConv2d(cin, head, 1), IntConv2d(head, head, 1), IntConv2d(head, g, 1, act=False))
            return nn.Sequential(IntConv2d(cin, head, 1), IntConv2d(head, g, 1, act=False))

        self.channel_ctx = nn.ModuleList([channel_ctx(k) for k in range(len(groups))])
        self.spatial_ctx = nn.ModuleList([IntConv2d(f * g, ctx, 5, mask=checkerboard_taps((1, 1, 5, 5))) for g in groups])
        self.heads = nn.ModuleList([head_net(k, g) for k, g in enumerate(groups)])
        # centre the output range so an untrained head lands mid-table
        for h in self.heads:
            nn.init.constant_(h[-1].bias, NUM_SCALES / 2)

    @staticmethod
    def config_from_state_dict(sd: dict, prefix: str = "scale_path.") -> dict:
        """Constructor arguments (besides ``cz`` and ``groups``) of the path whose tensors ``sd`` holds."""
        hidden = sd[prefix + "hyper.0.weight"].shape[0]
        up = 4
        ctx = sd[prefix + "hyper.2.weight"].shape[0] // (up * up)
        head = sd[prefix + "heads.0.0.weight"].shape[0]
        g0 = sd[prefix + "spatial_ctx.0.weight"].shape[1]
        deep = (prefix + "heads.0.2.weight") in sd
        signed = g0 == 2 * sd[prefix + "heads.0.%d.weight" % (2 if deep else 1)].shape[0]
        return {"hidden": hidden, "ctx": ctx, "up": up, "head": head, "signed": signed, "deep": deep}

    def _residual_planes(self, r: torch.Tensor) -> torch.Tensor:
        """The integer input planes of residual symbols: clamp(4|r|, 0, 127), preceded in v2 by
        clamp(4r, -127, 127) (channel by channel: signed plane of every channel, then magnitudes)."""
        mag = _clip_int(r.abs() * 4, 0, A_MAX)
        if not self.signed:
            return mag
        return torch.cat([_clip_int(r * 4, -A_MAX, A_MAX), mag], dim=1)

    @staticmethod
    def quality_code(quality, like: torch.Tensor) -> torch.Tensor:
        """round(16 q) clipped to the activation range, as a (B, 1, 1, 1) integer tensor."""
        if quality is None:
            q = torch.zeros(like.shape[0], device=like.device, dtype=like.dtype)
        else:
            q = torch.as_tensor(quality, device=like.device, dtype=like.dtype).reshape(-1).expand(like.shape[0])
        return torch.floor(q * 16 + 0.5).clamp(0, A_MAX).view(-1, 1, 1, 1)

    def hyper_features(self, z_sym: torch.Tensor, quality) -> torch.Tensor:
        qc = self.quality_code(quality, z_sym)
        x = torch.cat([_clip_int(z_sym * 4, -A_MAX, A_MAX), qc.expand(-1, 1, *z_sym.shape[-2:])], dim=1)
        return F.pixel_shuffle(self.hyper(x), self.up)

    def indexes(self, k: int, hyper: torch.Tensor, prev: list[torch.Tensor], anchors: torch.Tensor | None, quality) -> torch.Tensor:
        """Scale-table index logits of group k on the full latent grid (integer-valued).

        ``prev``: the residual symbols of groups 0 .. k-1 (full grid); ``anchors``: the group's
        anchor residual symbols (zeros at non-anchors) for the non-anchor pass, None for the anchor pass.
        """
        feats = [hyper]
        if k:
            feats.append(self.channel_ctx[k](self._residual_planes(torch.cat(prev, dim=1))))
        if anchors is None:
            feats.append(hyper.new_zeros((hyper.shape[0], self.spatial_ctx[k].weight.shape[0], *hyper.shape[-2:])))
        else:
            feats.append(self.spatial_ctx[k](self._residual_planes(anchors)))
        qc = self.quality_code(quality, hyper).expand(-1, 1, *hyper.shape[-2:])
        feats.append(qc)
        out = self.heads[k](torch.cat(feats, dim=1))
        return out.clamp(0, NUM_SCALES - 1)

    def for_image(self, z_sym: torch.Tensor, quality) -> "PathIndexes":
        """The table indexes of one image (batch), from its z symbols and quality."""
        return PathIndexes(self, z_sym, quality)

    @staticmethod
    def table_scales(index: torch.Tensor, scale_table: torch.Tensor) -> torch.Tensor:
        """The scale of each (possibly fractional, during training) table index: log-linear in the index."""
        lo, hi = torch.log(scale_table[0]), torch.log(scale_table[-1])
        return torch.exp(lo + index * (hi - lo) / (NUM_SCALES - 1))


class PathIndexes:
    """The integer path's table indexes for one image (``latent_codecs.ScaleIndexes``): the hyper
    features are computed once from the z symbols, then group by group from the residuals."""

    def __init__(self, path: IntegerScalePath, z_sym: torch.Tensor, quality):
        self.path = path
        self.quality = quality
        self.hyper = path.hyper_features(z_sym, quality)

    def group(self, k: int, residuals: list[torch.Tensor]):
        prev = list(residuals)
        return lambda anchors: self.path.indexes(k, self.hyper, prev, anchors, self.quality)
