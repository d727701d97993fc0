"""LALIC: learned image compression with Bi-RWKV linear attention (Feng et al., CVPR 2025).

A faithful re-implementation of the official model (sjtu-medialab/RwkvCompress, ``models/lalic.py``):
the same modules, the same state-dict keys and shapes, and the same computation, so official
checkpoints give the paper's results.  The entropy model is ELIC's space-channel context model
(SCCTX) with RWKV channel-context blocks: uneven channel groups, a checkerboard spatial context
inside each group, and parameter aggregation with channel-mix blocks.

The entropy model is a tree of latent codecs (``latent_codecs``), registered as ``latent_codec``
with CompressAI's module names: a hyperprior (z first), then channel groups, each a checkerboard
of two passes under a Gaussian conditional.  Coding works on one image at a time; ``compress``
returns the streams in the order the tree writes them (FORMAT.md 11.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from .base import Coded, CodingModel  # noqa: F401  (Coded: re-exported)
from .entropy_models import EntropyBottleneck, GaussianConditional
from .int_scale import IntegerScalePath
from .latent_codecs import (  # noqa: F401  (packing helpers: re-exported)
    ChannelGroupsLatentCodec,
    CheckerboardLatentCodec,
    GaussianConditionalLatentCodec,
    HyperLatentCodec,
    HyperpriorLatentCodec,
    checkerboard_mask,
    embed,
    unembed,
)
from .layers import CheckerboardMaskedConv2d, LatentResidualPrediction, ResidualUnit, RwkvBlock, conv, deconv, parameter_aggregation
from .registry import register


def _channel_groups(groups: list[int], side: int, N: int, hidden_rate: int, param_hidden_rate: int = 2, lrp: int = 0) -> ChannelGroupsLatentCodec:
    """ELIC's channel groups with RWKV channel context (official module names and creation order);
    ``side``: the width of the hyper side information and of the channel context (official: M);
    ``lrp``: the hidden width of a latent residual prediction per group (official: none, 0)."""
    channel_context = nn.ModuleDict(
        {
            f"y{k}": nn.Sequential(
                nn.Conv2d(sum(groups[:k]), side, 3, padding=1),
                RwkvBlock(side, hidden_rate=hidden_rate),
                RwkvBlock(side, hidden_rate=hidden_rate),
                nn.Conv2d(side, groups[k] * 2, 1),
            )
            for k in range(1, len(groups))
        }
    )
    latent_codec = nn.ModuleDict(
        {
            f"y{k}": CheckerboardLatentCodec(
                parameter_aggregation(2 * g + (k > 0) * 2 * g + side, 2 * g, 2 * N, hidden_rate=param_hidden_rate),
                CheckerboardMaskedConv2d(g, 2 * g, kernel_size=5, stride=1, padding=2),
                GaussianConditionalLatentCodec(),
            )
            for k, g in enumerate(groups)
        }
    )
    residual_prediction = None
    if lrp:  # the support of group k: its channel context (2 g_k wide) and the side parameters
        residual_prediction = nn.ModuleDict(
            {f"y{k}": LatentResidualPrediction((k > 0) * 2 * g + side, g, int(lrp)) for k, g in enumerate(groups)}
        )
    return ChannelGroupsLatentCodec(groups, latent_codec, channel_context, residual_prediction)


def with_hyper_aliases(sd: dict) -> dict:
    """Restore the top-level h_a/h_s aliases that our weight files leave out."""
    out = dict(sd)
    for k, v in sd.items():
        if k.startswith("latent_codec.hyper.h_a.") or k.startswith("latent_codec.hyper.h_s."):
            out.setdefault(k[len("latent_codec.hyper."):], v)
    return out


@dataclass
class LALICConfig:
    N: int = 128
    M: int = 320
    dims: tuple = (96, 144, 256, 320, 256, 192)
    depths: tuple = (2, 4, 6, 6)
    groups: tuple | None = None  # default: (16, 16, 32, 64, M - 128)
    ctx_hidden_rate: int = 8  # hidden width of the channel context's RWKV blocks, in multiples of the side width (official: 8)
    side_width: int | None = None  # width of h_s's output and of the channel context (official and default: M)
    param_hidden_rate: int = 2  # hidden width of the parameter networks' blocks, in multiples of their output (official: 2)
    units: tuple = (0, 0)  # residual convolution units at the 1/2 level of g_a and of g_s (official: none)
    lrp: int = 0  # hidden width of each channel group's latent residual prediction (official: none, 0)

    def resolved_groups(self) -> list[int]:
        return list(self.groups) if self.groups else [16, 16, 32, 64, self.M - 128]

    def to_dict(self) -> dict:
        d = {"N": self.N, "M": self.M, "dims": list(self.dims), "depths": list(self.depths), "groups": self.resolved_groups()}
        if self.ctx_hidden_rate != 8:
            d["ctx_hidden_rate"] = self.ctx_hidden_rate
        if self.side_width not in (None, self.dims[3]):
            d["side_width"] = self.side_width
        if self.param_hidden_rate != 2:
            d["param_hidden_rate"] = self.param_hidden_rate
        if any(self.units):
            d["units"] = list(self.units)
        if self.lrp:
            d["lrp"] = self.lrp
        return d


@register("lalic")
class LALIC(CodingModel):
    """The LALIC network.  ``LALIC()`` is the official default configuration (66.1 M parameters)."""

    #: official evaluation pads images (centred, zeros) to a multiple of this
    pad_multiple = 128
    #: the network itself needs multiples of this (y at 1/16, z at 1/64)
    size_multiple = 64

    def __init__(self, N=128, M=320, dims=(96, 144, 256, 320, 256, 192), depths=(2, 4, 6, 6), groups=None, checkpointing=False, ctx_hidden_rate=8,
                 side_width=None, param_hidden_rate=2, units=(0, 0), lrp=0):
        """``side_width``: the width of the hyper synthesis's output and of the channel context, where
        it differs from the latent width dims[3] (the official model ties them; a latent widened by
        ``codec train reshape --latent`` keeps the trained entropy model's width); ``param_hidden_rate``:
        the parameter networks' hidden width in multiples of their output (official: 2); ``units``:
        how many :class:`ResidualUnit` follow the 1/2 level's blocks in g_a and in g_s (official: 0, 0);
        ``lrp``: the hidden width of a :class:`LatentResidualPrediction` after each channel group
        (official: none, 0)."""
        super().__init__()
        side_width = None if side_width in (None, dims[3]) else int(side_width)
        units = tuple(int(u) for u in units)
        self.config = LALICConfig(N, M, tuple(dims), tuple(depths), tuple(groups) if groups else None, ctx_hidden_rate, side_width,
                                  int(param_hidden_rate), units, int(lrp))
        N1, N2, N3, N4, N5, N6 = dims
        L1, L2, L3, L4 = depths
        groups = self.config.resolved_groups()
        if sum(groups) != N4:
            raise ValueError(f"channel groups {groups} must add up to the latent width dims[3] = {N4}")
        self.groups = groups
        M = N4  # the official model uses dims[3] as the latent width
        S = side_width or M
        blocks = lambda n, d: [RwkvBlock(d, checkpointing=checkpointing) for _ in range(n)]  # noqa: E731
        Ua, Us = units

        self.g_a = nn.Sequential(
            conv(3, N1, 5), *blocks(L1, N1), *(ResidualUnit(N1) for _ in range(Ua)), conv(N1, N2, 3), *blocks(L2, N2), conv(N2, N3, 3),
            *blocks(L3, N3), conv(N3, N4, 3)
        )
        self.g_s = nn.Sequential(
            deconv(N4, N3, 3), *blocks(L3, N3), deconv(N3, N2, 3), *blocks(L2, N2), deconv(N2, N1, 3), *blocks(L1, N1),
            *(ResidualUnit(N1) for _ in range(Us)), deconv(N1, 3, 5)
        )
        h_a = nn.Sequential(conv(N4, N5, 5), *blocks(L4, N5), conv(N5, N6, 5))
        h_s = nn.Sequential(deconv(N6, N5, 5), *blocks(L4, N5), deconv(N5, S, 5))
        self.latent_codec = HyperpriorLatentCodec(_channel_groups(groups, S, N, ctx_hidden_rate, int(param_hidden_rate), int(lrp)), HyperLatentCodec(EntropyBottleneck(N6), h_a, h_s))
        # the official model also registers the hyper transforms at the top level (aliased keys)
        self.h_a = h_a
        self.h_s = h_s
        #: optional integer scale path (device-independent table indexes); None: the network's scales
        self.scale_path: IntegerScalePath | None = None

    # --- convenient accessors ----------------------------------------------------------------
    @property
    def entropy_bottleneck(self) -> EntropyBottleneck:
        return self.latent_codec.hyper.entropy_bottleneck

    @property
    def channel_groups(self) -> ChannelGroupsLatentCodec:
        return self.latent_codec.y

    def group(self, k: int) -> CheckerboardLatentCodec:
        return self.latent_codec.y.group(k)

    def gaussian_conditionals(self) -> list[GaussianConditional]:
        return [self.group(k).gaussian_conditional for k in range(len(self.groups))]

    def aux_loss(self) -> torch.Tensor:
        return self.entropy_bottleneck.loss()

    def update(self, force: bool = False) -> bool:
        """Compute the integer CDF tables (only where missing, unless ``force``)."""
        updated = self.entropy_bottleneck.update(force=force)
        for gc in self.gaussian_conditionals():
            updated |= gc.update_scale_table(force=force)
        return updated

    # --- what the pipeline needs (CodingModel) ----------------------------------------------------
    @property
    def device_independent(self) -> bool:
        return self.scale_path is not None

    def coding_tree(self) -> HyperpriorLatentCodec:
        return self.latent_codec

    def scale_indexes(self, quality=None):
        return None if self.scale_path is None else partial(self.scale_path.for_image, quality=quality)

    def analysis(self, x: torch.Tensor, quality=None) -> torch.Tensor:
        return self.latent_gain(self.g_a(x), quality)

    def synthesis(self, y_hat: torch.Tensor, quality=None) -> torch.Tensor:
        return self.g_s(self.latent_inverse_gain(y_hat, quality))

    # --- rate hooks (identity here; the variable-rate model scales the latent) ---------------------

    def latent_gain(self, y: torch.Tensor, quality=None) -> torch.Tensor:
        return y

    def latent_inverse_gain(self, y_hat: torch.Tensor, quality=None) -> torch.Tensor:
        return y_hat

    # --- forward (training / rate estimation) -----------------------------------------------------
    def forward(self, x: torch.Tensor, quality=None) -> dict:
        y = self.analysis(x, quality)
        t = self.latent_codec(y, self.scale_indexes(quality))
        out = {
            "x_hat": self.synthesis(t["y_hat"], quality),
            "likelihoods": t["likelihoods"],
            "y": y,
            "y_hat": t["y_hat"],
            "z": t["z"],
            "z_hat": t["z_hat"],
        }
        if self.scale_path is not None:  # what the float scales would have cost (not coded)
            out["float_likelihoods_y"] = t["float_likelihoods_y"]
        return out

    # --- construction from state dicts -------------------------------------------------------------
    @staticmethod
    def config_from_state_dict(sd: dict) -> LALICConfig:
        """Infer (N, dims, depths, groups) from tensor shapes, so any checkpoint of this architecture loads.

        N only sets the minimum width 2N of the parameter-aggregation ramp; the smallest middle
        width of the ramps is used (loading then checks every shape).
        """

        def indices(pattern: str) -> list[int]:
            rx = re.compile(pattern)
            return sorted({int(m.group(1)) for k in sd if (m := rx.fullmatch(k))})

        try:
            convs = indices(r"g_a\.(\d+)\.weight")
            blocks = indices(r"g_a\.(\d+)\.gamma1")
            if len(convs) != 4:
                raise ValueError(f"g_a has {len(convs)} convolutions, LALIC has 4")
            dims = [sd[f"g_a.{i}.weight"].shape[0] for i in convs]
            depths = [sum(1 for b in blocks if convs[i] < b < convs[i + 1]) for i in range(3)]
            dims.append(sd["latent_codec.hyper.h_a.0.weight"].shape[0])
            dims.append(sd["latent_codec.hyper.entropy_bottleneck.quantiles"].shape[0])
            depths.append(len(indices(r"latent_codec\.hyper\.h_a\.(\d+)\.gamma1")))
            units = (len(indices(r"g_a\.(\d+)\.c1\.weight")), len(indices(r"g_s\.(\d+)\.c1\.weight")))
            groups = [
                sd[f"latent_codec.y.latent_codec.y{k}.context_prediction.weight"].shape[1]
                for k in indices(r"latent_codec\.y\.latent_codec\.y(\d+)\.context_prediction\.weight")
            ]
            mids = [
                sd[f"latent_codec.y.latent_codec.y{k}.entropy_parameters.{i}.mix.weight"].shape[0]
                for k in range(len(groups))
                for i in (0, 2)
            ]
        except (KeyError, IndexError, AttributeError, TypeError) as e:
            raise ValueError(f"not a LALIC state dict (missing or malformed: {e})") from None
        if not groups:
            raise ValueError("not a LALIC state dict (no channel groups)")
        last = max(indices(r"latent_codec\.hyper\.h_s\.(\d+)\.weight"))
        side = sd[f"latent_codec.hyper.h_s.{last}.weight"].shape[1]  # a transposed convolution: (in, out, k, k)
        key = "latent_codec.y.channel_context.y1.1.ffn.key.weight"
        rate = sd[key].shape[0] // side if key in sd else 8
        ep = "latent_codec.y.latent_codec.y0.entropy_parameters.0."
        param_rate = sd[ep + "key.weight"].shape[0] // sd[ep + "mix.weight"].shape[0] if ep + "key.weight" in sd else 2
        lrp_key = "latent_codec.y.residual_prediction.y0.c1.weight"
        lrp = sd[lrp_key].shape[0] if lrp_key in sd else 0
        return LALICConfig(min(mids) // 2, dims[3], tuple(dims), tuple(depths), tuple(groups), rate, None if side == dims[3] else side, param_rate,
                           units, lrp)

    @classmethod
    def matches(cls, sd: dict) -> bool:
        return "g_a.0.weight" in sd and any(k.startswith("latent_codec.y.channel_context") for k in sd) and not VariableRateLALIC.matches(sd)

    @classmethod
    def from_state_dict(cls, sd: dict, strict: bool = True) -> "LALIC":
        """Build the network that fits ``sd`` and load it (the top-level h_a/h_s may be left out)."""
        sd = with_hyper_aliases(sd)
        model = cls._from_config(LALIC.config_from_state_dict(sd), sd)
        model.load_state_dict(sd, strict=strict)
        return model

    @classmethod
    def _from_config(cls, cfg: LALICConfig, sd: dict) -> "LALIC":
        return cls(cfg.N, cfg.M, cfg.dims, cfg.depths, cfg.groups, ctx_hidden_rate=cfg.ctx_hidden_rate, side_width=cfg.side_width,
                   param_hidden_rate=cfg.param_hidden_rate, units=cfg.units, lrp=cfg.lrp)


#: rate-distortion trade-offs of the variable-rate model's quality ladder 1..8 (loss = R + lambda 255^2 MSE)
DEFAULT_LAMBDAS = tuple(float(f"{0.0018 * (0.0483 / 0.0018) ** (i / 7):.6f}") for i in range(8))


#: the encoder's rate-distortion-optimised rounding (:meth:`VariableRateLALIC.rdo_lagrangian`):
#: Lagrangian per unit of mean inverse gain (default-v6: 0.10 at quality 1, 0.032 at 4, 0.008 at 8)
RDO_SCALE = 0.0128


@register("lalic-vr")
class VariableRateLALIC(LALIC):
    """LALIC with per-channel gain vectors on the latent, one per quality level (Cui et al., CVPR 2021).

    ``y`` is multiplied by ``exp(log_gain[q])`` before quantisation and the decoded latent by
    ``exp(log_inv_gain[q])`` before synthesis.  A continuous quality q in [1, L] interpolates the
    log-gains of the two neighbouring levels, so one network covers the whole rate range.
    """

    variable_rate = True
    pad_multiple = 64

    def __init__(self, *args, lambdas=DEFAULT_LAMBDAS, int_scale: bool | dict = False, **kwargs):
        """``int_scale``: False, True (the v1 integer scale path) or the path's keyword arguments
        (see :class:`IntegerScalePath`; e.g. ``INT_SCALE_V2``)."""
        super().__init__(*args, **kwargs)
        M = self.config.dims[3]
        if int_scale:
            self.scale_path = IntegerScalePath(self.config.dims[5], self.groups, **(int_scale if isinstance(int_scale, dict) else {}))
        lam = torch.tensor(lambdas, dtype=torch.float32)
        self.register_buffer("lambdas", lam)
        # high-rate theory: the quantisation step scales like lambda^(-1/2)
        init = 0.5 * torch.log(lam / lam[-1])
        self.log_gain = nn.Parameter(init.view(-1, 1).repeat(1, M))
        self.log_inv_gain = nn.Parameter(-init.view(-1, 1).repeat(1, M))

    @property
    def num_levels(self) -> int:
        return self.lambdas.numel()

    def _interp(self, table: torch.Tensor, quality) -> torch.Tensor:
        q = torch.as_tensor(quality, dtype=table.dtype, device=table.device).reshape(-1)
        L = self.num_levels
        if bool(((q < 1) | (q > L)).any()):
            raise ValueError(f"quality must lie in [1, {L}]")
        pos = q - 1
        lo = pos.floor().clamp(max=L - 2).long()
        f = (pos - lo).unsqueeze(1)
        return ((1 - f) * table[lo] + f * table[lo + 1]).unsqueeze(-1).unsqueeze(-1)

    def lambda_for(self, quality) -> torch.Tensor:
        """Lambda of a (possibly fractional) quality, interpolated log-linearly."""
        return torch.exp(self._interp(torch.log(self.lambdas).unsqueeze(1), quality)).reshape(-1)

    def rdo_lagrangian(self, quality=None) -> float:
        """:data:`RDO_SCALE` times the mean inverse gain of ``quality``: the quantisation step's size
        in the image's terms (about 1.4x per quality level), so the rounding moves fewer symbols
        towards 0 at the top qualities, where the later symbols' contexts lose more by it.
        ``benchmarks/bench_rdo.py`` with default-v6 on the first 6 Kodak images, against plain
        rounding: BD-rate -1.98 %; quality 1 -34.6 % rate at -0.99 dB, 4 -10.3 % at -0.38 dB, 8
        -0.6 % at -0.02 dB.  On the same 6 images: 0.75 x this Lagrangian -1.96 %, 1.33 x -1.88 %;
        0.6 x on anchors and 1.4 x on non-anchors -1.81 %, the reverse -1.37 %.  On 4 Kodak images
        (kodim01, 05, 14, 23): a constant 0.05 at every quality -1.89 % (+0.16 % at quality 8), a
        constant 0.1 -0.43 % (+1.32 % at 8)."""
        if quality is None:
            raise ValueError("the variable-rate model needs a quality")
        return RDO_SCALE * float(torch.exp(self._interp(self.log_inv_gain.detach(), quality)).mean())

    def latent_gain(self, y, quality=None):
        if quality is None:
            raise ValueError("the variable-rate model needs a quality")
        return y * torch.exp(self._interp(self.log_gain, quality))

    def latent_inverse_gain(self, y_hat, quality=None):
        if quality is None:
            raise ValueError("the variable-rate model needs a quality")
        return y_hat * torch.exp(self._interp(self.log_inv_gain, quality))

    @classmethod
    def matches(cls, sd: dict) -> bool:
        return "lambdas" in sd and "log_gain" in sd

    @classmethod
    def _from_config(cls, cfg: LALICConfig, sd: dict) -> "VariableRateLALIC":
        int_scale = IntegerScalePath.config_from_state_dict(sd) if any(k.startswith("scale_path.") for k in sd) else False
        return cls(cfg.N, cfg.M, cfg.dims, cfg.depths, cfg.groups, lambdas=tuple(sd["lambdas"].tolist()), int_scale=int_scale,
                   ctx_hidden_rate=cfg.ctx_hidden_rate, side_width=cfg.side_width, param_hidden_rate=cfg.param_hidden_rate, units=cfg.units, lrp=cfg.lrp)


#: the v2 integer scale path: signed residual contexts, two-layer channel context, three-layer head
INT_SCALE_V2 = dict(hidden=128, ctx=48, head=96, signed=True, deep=True)

#: the bundled default model's architecture (about 7.4 M parameters, integer scale path)
DEFAULT_CONFIG = dict(N=32, M=128, dims=(48, 64, 96, 128, 96, 64), depths=(0, 1, 2, 1), groups=(8, 8, 16, 32, 64), int_scale=True)
