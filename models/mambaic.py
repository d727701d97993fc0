"""MambaIC: learned image compression with state-space models (Zeng et al., CVPR 2025).

A faithful re-implementation of the official model (AuroraZengfh/MambaIC, ``models/MambaIC.py``):
the same modules, state-dict keys and shapes, and the same computation, so the authors'
checkpoints (e.g. ``checkpoint0.025.pth.tar``) give the paper's results.

* Transforms: strided convolutions with VSS blocks (LayerNorm, SS2D: linear, depthwise conv,
  SiLU, selective scan in four directions with d_state 16) at width 2N; the hyper analysis
  ``h_a`` and two hyper synthesis transforms ``h_mean_s`` / ``h_scale_s`` likewise.
* Entropy model: five uniform channel slices.  For each slice, the mean and scale supports
  (hyper output plus the earlier decoded slices) pass window attention (``atten_mean`` /
  ``atten_scale``: SWAtten, window 8) and a conv stack (``cc_*_transforms``); a VSS-based
  context block (``context_vss``) combines them with the checkerboard spatial context and
  gives (means, scales), refined again by window attention (``anchor_atten_*``); latent
  residual prediction (``lrp_transforms``) adds ``0.5 tanh(...)`` to each decoded slice.
* Coding: the tree of latent codecs that LALIC uses (``latent_codecs``), built over the official
  flat modules on each use (:meth:`MambaIC.coding_tree`): stream ``z``, then for every slice an
  anchor stream and a non-anchor stream (``y/g<k>/anchor``, ``y/g<k>/non_anchor``), each the packed
  half-grid (anchors at (i + j) even) in C order, as for LALIC.

The official evaluation pads images to a multiple of 128; the official window attention
only runs when the latent is at least 16 x 16 (images >= 256), ours also runs on 128-pixel
sides (see :class:`mambaic_layers.SwinBlock`) and agrees with the official result wherever
that one runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from .base import CodingModel
from .checkpoints import normalize_keys
from .entropy_models import EntropyBottleneck, GaussianConditional, quantize_ste
from .latent_codecs import (
    ChannelGroupsLatentCodec,
    CheckerboardLatentCodec,
    GaussianConditionalLatentCodec,
    HyperLatentCodec,
    HyperpriorLatentCodec,
    StreamCoder,
    checkerboard_mask,
    unembed,
)
from .layers import CheckerboardMaskedConv2d, conv, deconv
from .mambaic_layers import SWAtten, VSSBlock
from .registry import register

#: widths the official constructor hard-codes
Z_CHANNELS = 192
WINDOW = 8
ATTN_DIM = 128
HEAD_DIM = 16
NUM_SLICES = 5
CONTEXT_DEPTH = 2


@dataclass
class MambaICConfig:
    N: int = 128
    M: int = 320
    depths: tuple = (2, 2, 9, 2)
    drop_path_rate: float = 0.1

    def to_dict(self) -> dict:
        return {"N": self.N, "M": self.M, "depths": list(self.depths), "drop_path_rate": self.drop_path_rate}


def _transform_stack(stages: list, blocks_dpr: list) -> nn.Sequential:
    """Interleave (conv, number of VSS blocks, dim) stages: conv, blocks, conv, blocks, ..., conv."""
    layers: list[nn.Module] = []
    it = iter(blocks_dpr)
    for item in stages:
        if isinstance(item, nn.Module):
            layers.append(item)
        else:
            n, dim = item
            layers.extend(VSSBlock(dim, drop_path=next(it)) for _ in range(n))
    return nn.Sequential(*layers)


def _param_transform(in_ch: int, out_ch: int) -> nn.Sequential:
    """The official cc/lrp transforms: conv3x3 -> 224 -> GELU -> 128 -> GELU -> out."""
    return nn.Sequential(
        conv(in_ch, 224, kernel_size=3, stride=1),
        nn.GELU(),
        conv(224, 128, kernel_size=3, stride=1),
        nn.GELU(),
        conv(128, out_ch, kernel_size=3, stride=1),
    )


class _MeanScaleSynthesis(nn.Module):
    """The two hyper-synthesis networks as one: z_hat -> (latent_means, latent_scales)."""

    def __init__(self, h_mean_s: nn.Module, h_scale_s: nn.Module):
        super().__init__()
        self.h_mean_s = h_mean_s
        self.h_scale_s = h_scale_s

    def forward(self, z_hat: torch.Tensor):
        latent_scales = self.h_scale_s(z_hat)
        return self.h_mean_s(z_hat), latent_scales


class _SliceCheckerboard(CheckerboardLatentCodec):
    """A slice's two passes: the context block and its attention refine (means, scales) on the full
    grid; each pass keeps its half.  Coding only: :meth:`MambaIC.forward` is the official training
    pass (full-grid masks), not the tree's."""

    def __init__(self, params, context_prediction: nn.Module, y: GaussianConditionalLatentCodec):
        super().__init__(None, context_prediction, y)
        self.params = params  # (ctx, support) -> (means, scales), full grid

    def pass_params(self, i: int, ctx: torch.Tensor | None, side: torch.Tensor):
        if ctx is None:
            B, _, H, W = side.shape
            ctx = side.new_zeros((B, 2 * self.context_prediction.in_channels, H, W))
        means, scales = self.params(ctx, side)
        return unembed(scales)[i], unembed(means)[i]


class _Slices(ChannelGroupsLatentCodec):
    """MambaIC's slices: attention supports from the hyper outputs and the earlier slices, and
    latent residual prediction on each decoded slice."""

    def __init__(self, model: "MambaIC", groups: list[int], latent_codec: nn.ModuleDict):
        super().__init__(groups, latent_codec)
        self.supports = model._slice_supports
        self.lrp = model._lrp

    def side_params(self, k: int, side, y_hats: list[torch.Tensor]):
        latent_means, latent_scales = side
        mean_support, support = self.supports(k, latent_means, latent_scales, y_hats)
        return support, mean_support

    def finish(self, k: int, y_q: torch.Tensor, mean_support, io: StreamCoder | None) -> torch.Tensor:
        if io is not None and io.trace is not None:
            io.trace.setdefault("y_q", []).append(y_q)
        return self.lrp(k, mean_support, y_q)


@register("mambaic")
class MambaIC(CodingModel):
    """The MambaIC network.  ``MambaIC()`` is the official configuration (123.8 M parameters)."""

    #: official evaluation pads images (centred, zeros) to a multiple of this
    pad_multiple = 128
    #: coded sizes must be multiples of this (y at 1/16 with whole attention windows, z at 1/64)
    size_multiple = 128

    def __init__(self, depths=(2, 2, 9, 2), drop_path_rate: float = 0.1, N: int = 128, M: int = 320,
                 num_slices: int = NUM_SLICES, max_support_slices: int = 5):
        super().__init__()
        if num_slices != NUM_SLICES:
            raise ValueError("MambaIC has exactly 5 slices (the official constructor asserts it)")
        if M % num_slices:
            raise ValueError(f"M = {M} must be divisible by {num_slices}")
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4:
            raise ValueError(f"depths must have 4 entries, got {depths}")
        self.config = MambaICConfig(N, M, depths, float(drop_path_rate))
        self.depths = depths
        self.num_slices = num_slices
        self.max_support_slices = max_support_slices
        self.M = M
        self.window_size = WINDOW
        nps = M // num_slices
        self.num_per_slice = nps
        C = 2 * N
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        d0, d1, d2, d3 = depths
        # registered first: the official parent class creates the entropy bottleneck before anything else
        self.entropy_bottleneck = EntropyBottleneck(Z_CHANNELS)
        self.g_a = _transform_stack(
            [conv(3, C, 5, 2), (d0, C), conv(C, C, 3, 2), (d1, C), conv(C, C, 3, 2), (d2, C), conv(C, M, 3, 2)], dpr[: d0 + d1 + d2]
        )
        self.h_a = _transform_stack([conv(M, C, 3, 2), (d3, C), conv(C, Z_CHANNELS, 3, 2)], dpr[d0 + d1 + d2 :])
        # the synthesis side uses the reversed depths with drop-path rates counted from the start
        r0, r1, r2, r3 = depths[::-1]
        self.h_mean_s = _transform_stack([deconv(Z_CHANNELS, C, 3, 2), (r0, C), deconv(C, M, 3, 2)], dpr[:r0])
        self.h_scale_s = _transform_stack([deconv(Z_CHANNELS, C, 3, 2), (r0, C), deconv(C, M, 3, 2)], dpr[:r0])
        self.g_s = _transform_stack(
            [deconv(M, C, 3, 2), (r1, C), deconv(C, C, 3, 2), (r2, C), deconv(C, C, 3, 2), (r3, C), deconv(C, 3, 5, 2)],
            dpr[r0 : r0 + r1 + r2 + r3],
        )
        support = [M + nps * min(i, 5) for i in range(num_slices)]
        swatten = lambda ch: nn.Sequential(SWAtten(ch, ch, HEAD_DIM, WINDOW, 0, inter_dim=ATTN_DIM))  # noqa: E731
        self.atten_mean = nn.ModuleList(swatten(ch) for ch in support)
        self.atten_scale = nn.ModuleList(swatten(ch) for ch in support)
        self.cc_mean_transforms = nn.ModuleList(_param_transform(ch, nps) for ch in support)
        self.cc_scale_transforms = nn.ModuleList(_param_transform(ch, nps) for ch in support)
        self.lrp_transforms = nn.ModuleList(_param_transform(M + nps * min(i + 1, 6), nps) for i in range(num_slices))
        self.anchor_atten_mean = nn.ModuleList(swatten(nps) for _ in range(num_slices))
        self.anchor_atten_scale = nn.ModuleList(swatten(nps) for _ in range(num_slices))
        context_dpr = [x.item() for x in torch.linspace(0, drop_path_rate, CONTEXT_DEPTH * num_slices)]
        for i in range(num_slices):
            dim = 2 * M + (2 if i == 0 else 4) * nps
            blocks = [VSSBlock(dim, drop_path=context_dpr[CONTEXT_DEPTH * i + j]) for j in range(CONTEXT_DEPTH)]
            setattr(self, f"context_vss_{i + 1}", nn.Sequential(*blocks, conv(dim, 2 * nps, kernel_size=3, stride=1)))
        # the official model registers the context blocks a second time, as a list (aliased keys)
        self.context_vss = nn.ModuleList(getattr(self, f"context_vss_{i + 1}") for i in range(num_slices))
        self.context_prediction = nn.ModuleList(
            CheckerboardMaskedConv2d(nps, 2 * nps, kernel_size=5, padding=2, stride=1) for _ in range(num_slices)
        )
        self.gaussian_conditional = GaussianConditional()

    # --- entropy-model housekeeping ---------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor:
        return self.entropy_bottleneck.loss()

    def update(self, force: bool = False) -> bool:
        """Compute the integer CDF tables (only where missing, unless ``force``); scale table 0.11..256, 64 levels."""
        updated = self.gaussian_conditional.update_scale_table(force=force)
        updated |= self.entropy_bottleneck.update(force=force)
        return updated

    def gaussian_conditionals(self) -> list[GaussianConditional]:
        return [self.gaussian_conditional]

    # --- the per-slice entropy parameters -----------------------------------------------------------
    def _slice_supports(self, i: int, latent_means, latent_scales, y_hat_slices):
        """(mean_support after attention, support for the context block) of slice ``i``."""
        support_slices = y_hat_slices if self.max_support_slices < 0 else y_hat_slices[: self.max_support_slices]
        mean_support = self.atten_mean[i](torch.cat([latent_means] + support_slices, dim=1))
        if i == 0:  # the official model also computes mu and scale here, and discards them
            support = torch.cat([latent_means, latent_scales], dim=1)
        else:
            scale_support = self.atten_scale[i](torch.cat([latent_scales] + support_slices, dim=1))
            mu = self.cc_mean_transforms[i](mean_support)
            scale = self.cc_scale_transforms[i](scale_support)
            support = torch.cat([mu, scale, latent_means, latent_scales], dim=1)
        return mean_support, support

    def _params(self, i: int, ctx: torch.Tensor, support: torch.Tensor):
        """(means, scales) of slice ``i`` from a spatial context (2 * nps channels) and the support."""
        means, scales = self.context_vss[i](torch.cat([ctx, support], dim=1)).chunk(2, dim=1)
        return self.anchor_atten_mean[i](means), self.anchor_atten_scale[i](scales)

    def _lrp(self, i: int, mean_support: torch.Tensor, y_hat_slice: torch.Tensor) -> torch.Tensor:
        return y_hat_slice + 0.5 * torch.tanh(self.lrp_transforms[i](torch.cat([mean_support, y_hat_slice], dim=1)))

    # --- forward (training / rate estimation) -----------------------------------------------------
    def forward(self, x: torch.Tensor, quality=None) -> dict:
        y = self.g_a(x)
        B, _, H, W = y.shape
        z = self.h_a(y)
        eb = self.entropy_bottleneck
        _, z_likelihoods = eb(z)
        medians = eb.medians().view(1, -1, 1, 1)
        z_hat = quantize_ste(z - medians) + medians
        latent_scales = self.h_scale_s(z_hat)
        latent_means = self.h_mean_s(z_hat)
        anchor = checkerboard_mask(H, W, True, y.device).to(y.dtype)
        non_anchor = 1.0 - anchor
        nps = self.num_per_slice
        y_hat_slices: list[torch.Tensor] = []
        likelihoods = []
        for i, y_slice in enumerate(y.chunk(self.num_slices, dim=1)):
            mean_support, support = self._slice_supports(i, latent_means, latent_scales, y_hat_slices)
            means_a, scales_a = self._params(i, y.new_zeros((B, 2 * nps, H, W)), support)
            y_hat_a = (quantize_ste(y_slice * anchor - means_a) + means_a) * anchor
            means_n, scales_n = self._params(i, self.context_prediction[i](y_hat_a), support)
            scales = scales_a * anchor + scales_n * non_anchor
            means = means_a * anchor + means_n * non_anchor
            _, lik = self.gaussian_conditional(y_slice, scales, means)
            y_hat_n = (quantize_ste(y_slice * non_anchor - means_n) + means_n) * non_anchor
            y_hat_slices.append(self._lrp(i, mean_support, y_hat_a + y_hat_n))
            likelihoods.append(lik)
        y_hat = torch.cat(y_hat_slices, dim=1)
        x_hat = self.g_s(y_hat)
        return {
            "x_hat": x_hat,
            "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods},
            "y": y,
            "y_hat": y_hat,
            "z": z,
            "z_hat": z_hat,
        }

    # --- coding (CodingModel) ------------------------------------------------------------------------
    def coding_tree(self) -> HyperpriorLatentCodec:
        """The latent codecs over this model's modules.  Built on each use: the official state dict
        is flat, so the tree cannot be registered, and modules swapped after construction (e.g. by
        ``torch.compile`` in a benchmark) are the ones it codes with."""
        gc = GaussianConditionalLatentCodec(self.gaussian_conditional)
        slices = nn.ModuleDict(
            {f"y{i}": _SliceCheckerboard(partial(self._params, i), self.context_prediction[i], gc) for i in range(self.num_slices)}
        )
        return HyperpriorLatentCodec(
            _Slices(self, [self.num_per_slice] * self.num_slices, slices),
            HyperLatentCodec(self.entropy_bottleneck, self.h_a, _MeanScaleSynthesis(self.h_mean_s, self.h_scale_s)),
        )

    def analysis(self, x: torch.Tensor, quality=None) -> torch.Tensor:
        return self.g_a(x)

    def synthesis(self, y_hat: torch.Tensor, quality=None) -> torch.Tensor:
        return self.g_s(y_hat)

    # --- construction from state dicts -------------------------------------------------------------
    @staticmethod
    def config_from_state_dict(sd: dict) -> MambaICConfig:
        """Infer (N, M, depths) from tensor shapes; every other width is fixed by the architecture."""

        def indices(pattern: str) -> list[int]:
            rx = re.compile(pattern)
            return sorted({int(m.group(1)) for k in sd if (m := rx.fullmatch(k))})

        try:
            convs = [i for i in indices(r"g_a\.(\d+)\.weight") if sd[f"g_a.{i}.weight"].dim() == 4]
            blocks = indices(r"g_a\.(\d+)\.norm\.weight")
            if len(convs) != 4:
                raise ValueError(f"g_a has {len(convs)} convolutions, MambaIC has 4")
            depths = [sum(1 for b in blocks if convs[k] < b < convs[k + 1]) for k in range(3)]
            depths.append(len(indices(r"h_a\.(\d+)\.norm\.weight")))
            N = sd["g_a.0.weight"].shape[0] // 2
            M = sd[f"g_a.{convs[-1]}.weight"].shape[0]
            slices = indices(r"context_prediction\.(\d+)\.weight")
        except (KeyError, IndexError, AttributeError, TypeError) as e:
            raise ValueError(f"not a MambaIC state dict (missing or malformed: {e})") from None
        if len(slices) != NUM_SLICES:
            raise ValueError(f"not a MambaIC state dict ({len(slices)} context predictions, expected {NUM_SLICES})")
        return MambaICConfig(N, M, tuple(depths))

    @classmethod
    def matches(cls, sd: dict) -> bool:
        # official MambaIC eval strips "module." wherever it occurs; from_state_dict does the same
        return any(k.replace("module.", "").startswith(("context_vss", "cc_mean_transforms")) for k in sd)

    @classmethod
    def from_state_dict(cls, sd: dict, strict: bool = True) -> "MambaIC":
        """Build the network that fits ``sd`` and load it.  Keys are normalised as the official eval
        does (every ``module.`` removed) plus CompressAI's old entropy-bottleneck names."""
        sd = normalize_keys(sd, strip_all_module=True)
        # the context blocks are registered twice (context_vss_{i+1} and context_vss.{i}); restore a missing name
        for k, v in list(sd.items()):
            if m := re.match(r"context_vss_(\d+)\.(.*)", k):
                sd.setdefault(f"context_vss.{int(m.group(1)) - 1}.{m.group(2)}", v)
            elif m := re.match(r"context_vss\.(\d+)\.(.*)", k):
                sd.setdefault(f"context_vss_{int(m.group(1)) + 1}.{m.group(2)}", v)
        cfg = cls.config_from_state_dict(sd)
        model = cls(depths=cfg.depths, N=cfg.N, M=cfg.M)
        model.load_state_dict(sd, strict=strict)
        return model
