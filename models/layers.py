"""Building blocks of LALIC: Bi-RWKV blocks, OmniShift, masked convolutions, parameter aggregation.

Module and parameter names follow the official implementation (sjtu-medialab/RwkvCompress)
so that official state dicts load key for key.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.biwkv import biwkv
from ..kernels.depthwise import depthwise_conv2d


def conv(in_ch: int, out_ch: int, kernel_size: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(in_ch: int, out_ch: int, kernel_size: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(
        in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, output_padding=stride - 1
    )


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), tokens in row-major order."""
    return x.flatten(2).transpose(1, 2)


def to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class OmniShift(nn.Module):
    """Re-parameterisable depthwise 5x5 mixing: alpha0*x + alpha1*conv1x1 + alpha2*conv3x3 + alpha3*conv5x5.

    The four branches are linear, so they are always evaluated as one 5x5 depthwise convolution
    whose kernel is computed from the branch weights on every call: in eval mode this is the
    official re-parameterisation, in training the same function with the same gradients as
    summing the branches (and 2-3x faster on CPU, where PyTorch runs small depthwise kernels
    group by group); in CPU training with compilation on (``codec train run --compile``) its
    weight gradient takes a faster path (``kernels.depthwise``).  The stored ``conv5x5_reparam.weight`` is kept only so that official state
    dicts load, and is never read.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv1x1 = nn.Conv2d(dim, dim, 1, groups=dim, bias=False)
        self.conv3x3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.conv5x5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False)
        self.alpha = nn.Parameter(torch.randn(4))
        self.conv5x5_reparam = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False)
        self.conv5x5_reparam.weight.requires_grad_(False)

    def merged_weight(self) -> torch.Tensor:
        a = self.alpha
        w = a[3] * self.conv5x5.weight
        w = w + a[2] * F.pad(self.conv3x3.weight, (1, 1, 1, 1))
        center = a[1] * self.conv1x1.weight + a[0]
        return w + F.pad(center, (2, 2, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.merged_weight())


class SpatialMix(nn.Module):
    """Bi-RWKV spatial mix: OmniShift, then k, v, r projections, BiWKV(decay/T, boost/T, k, v), sigmoid(r) gate."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.omni_shift = OmniShift(dim)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.decay = nn.Parameter(torch.randn(dim))
        self.boost = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        T = x.shape[1]
        xs = to_tokens(self.omni_shift(to_map(x, h, w)))
        k = self.key(xs)
        v = self.value(xs)
        r = torch.sigmoid(self.receptance(xs))
        y = biwkv(self.decay / T, self.boost / T, k, v)
        return self.output(r * y)


class ChannelMix(nn.Module):
    """RWKV channel mix: OmniShift, sigmoid(receptance) * value(relu(key)^2)."""

    def __init__(self, dim: int, hidden_rate: int = 4):
        super().__init__()
        hidden = int(hidden_rate * dim)
        self.omni_shift = OmniShift(dim)
        self.key = nn.Linear(dim, hidden, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        xs = to_tokens(self.omni_shift(to_map(x, h, w)))
        k = torch.square(torch.relu(self.key(xs)))
        return torch.sigmoid(self.receptance(xs)) * self.value(k)


class RwkvBlock(nn.Module):
    """x += gamma1 * SpatialMix(LN(x)); x += gamma2 * ChannelMix(LN(x)), on (B, C, H, W) maps."""

    def __init__(self, dim: int, hidden_rate: int = 4, checkpointing: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.att = SpatialMix(dim)
        self.ffn = ChannelMix(dim, hidden_rate)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.gamma2 = nn.Parameter(torch.ones(dim))
        self.checkpointing = checkpointing

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        t = to_tokens(x)
        t = t + self.gamma1 * self.att(self.ln1(t), h, w)
        t = t + self.gamma2 * self.ffn(self.ln2(t), h, w)
        return to_map(t, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and x.requires_grad:
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class ResidualUnit(nn.Module):
    """x + conv(GELU(conv(x))), two 3x3 convolutions at one width; the second starts at zero, so a
    new unit computes the identity (our default model's nonlinearity at the 1/2 level of g_a and
    g_s, where the official LALIC has RWKV blocks that cost about 14x more on a CPU)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.c2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.gelu(self.c1(x)))


class LatentResidualPrediction(nn.Module):
    """Latent residual prediction (Minnen and Singh, ICIP 2020) for one channel group:
    ``y_q + 0.5 tanh(c2(GELU(c1([support, y_q]))))``, 3x3 convolutions, where ``support`` is what the
    group's parameters were computed from (hyper side parameters, and the channel context of the
    earlier groups).  It predicts the quantisation residual ``y - y_q`` (in quantisation steps, hence
    the bound of 0.5) from information the decoder has; the second convolution starts at zero, so a
    new one computes the identity."""

    def __init__(self, support: int, dim: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(support + dim, hidden, kernel_size, padding=kernel_size // 2)
        self.c2 = nn.Conv2d(hidden, dim, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, support: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
        return y_q + 0.5 * torch.tanh(self.c2(F.gelu(self.c1(torch.cat([support, y_q], dim=1)))))


class EntropyParametersBlock(nn.Module):
    """Parameter-aggregation layer: 1x1 mix, then x + sigmoid(r(LN x)) * value(relu(key(LN x))^2)."""

    def __init__(self, dim: int, out_dim: int, expansion_factor: int = 2):
        super().__init__()
        hidden = int(expansion_factor * out_dim)
        self.mix = nn.Conv2d(dim, out_dim, 1)
        self.norm = nn.LayerNorm(out_dim)
        self.key = nn.Linear(out_dim, hidden, bias=False)
        self.value = nn.Linear(hidden, out_dim, bias=False)
        self.receptance = nn.Linear(out_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(x)
        h, w = x.shape[-2:]
        t = self.norm(to_tokens(x))
        k = torch.square(torch.relu(self.key(t)))
        t = torch.sigmoid(self.receptance(t)) * self.value(k)
        return x + to_map(t, h, w)


def channel_ramp(in_ch: int, out_ch: int, min_ch: int, num_layers: int = 3) -> list[int]:
    """Channel widths of the parameter-aggregation ramp (ELIC): floor(linspace), middle widths >= min_ch."""
    chs = torch.linspace(in_ch, out_ch, num_layers + 1).floor().int().tolist()  # float32, as ELIC does
    return [chs[0]] + [max(c, min_ch) for c in chs[1:-1]] + [chs[-1]]


def parameter_aggregation(in_ch: int, out_ch: int, min_ch: int, num_layers: int = 3, hidden_rate: int = 2) -> nn.Sequential:
    """ELIC's parameter network; ``hidden_rate``: the blocks' hidden width in multiples of their output width (official: 2)."""
    chs = channel_ramp(in_ch, out_ch, min_ch, num_layers)
    layers: list[nn.Module] = []
    for i in range(num_layers):
        if i:
            layers.append(nn.Identity())
        layers.append(EntropyParametersBlock(chs[i], chs[i + 1], hidden_rate))
    return nn.Sequential(*layers)


def checkerboard_taps(shape, dtype=torch.float32) -> torch.Tensor:
    """The mask of a checkerboard-context convolution: 1 at the kernel taps (i, j) with i + j odd
    (the anchors around a non-anchor), 0 elsewhere, the centre included, for every (output,
    input) channel pair.  Weights files leave such masks out and rebuild them from the shape."""
    m = torch.zeros(shape, dtype=dtype)
    m[..., 0::2, 1::2] = 1
    m[..., 1::2, 0::2] = 1
    return m


class CheckerboardMaskedConv2d(nn.Conv2d):
    """Conv2d whose taps are masked to the checkerboard anchors: mask 1 where (i + j) is odd, centre 0.

    The official layer multiplies its weight by the mask in place at every forward; we
    apply the mask functionally (same outputs) so unmasked stored taps never matter.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", checkerboard_taps(self.weight.shape, self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)
