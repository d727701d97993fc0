"""LALIC: learned image compression with Bi-RWKV linear attention (Feng et al., CVPR 2025).

A faithful re-implementation of the official model (sjtu-medialab/RwkvCompress, ``models/lalic.py``):
the same modules, the same state-dict keys and shapes, and the same computation, so official
checkpoints give the paper's results.  The entropy model is ELIC's space-channel context model
(SCCTX) with RWKV channel-context blocks: uneven channel groups, a checkerboard spatial context
inside each group, and parameter aggregation with channel-mix blocks.

Coding works on one image at a time.  ``compress`` returns the list of streams in container order:
the hyper-latent z first, then for every channel group an anchor stream and a non-anchor stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from ..entropy.coder import decode_stream, encode_stream
from .base import CodingModel
from .entropy_models import EntropyBottleneck, GaussianConditional, quantize_ste
from .int_scale import IntegerScalePath
from .layers import CheckerboardMaskedConv2d, RwkvBlock, conv, deconv, parameter_aggregation

# ---------------------------------------------------------------------------------------------
# checkerboard helpers: anchors are the positions with (i + j) even


def unembed(y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (2, B, C, H, W/2): [anchors, non-anchors], packed row by row."""
    B, C, H, W = y.shape
    out = y.new_empty((2, B, C, H, W // 2))
    out[0, ..., 0::2, :] = y[..., 0::2, 0::2]
    out[0, ..., 1::2, :] = y[..., 1::2, 1::2]
    out[1, ..., 0::2, :] = y[..., 0::2, 1::2]
    out[1, ..., 1::2, :] = y[..., 1::2, 0::2]
    return out


def embed(y_: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unembed`."""
    _, B, C, H, W2 = y_.shape
    y = y_.new_empty((B, C, H, W2 * 2))
    y[..., 0::2, 0::2] = y_[0, ..., 0::2, :]
    y[..., 1::2, 1::2] = y_[0, ..., 1::2, :]
    y[..., 0::2, 1::2] = y_[1, ..., 0::2, :]
    y[..., 1::2, 0::2] = y_[1, ..., 1::2, :]
    return y


def checkerboard_mask(h: int, w: int, anchor: bool, device=None) -> torch.Tensor:
    ij = torch.arange(h, device=device).view(h, 1) + torch.arange(w, device=device).view(1, w)
    return ((ij % 2 == 0) == anchor).float()


def table_scales(index: torch.Tensor, scale_table: torch.Tensor, exact: bool) -> torch.Tensor:
    """Scales of scale-table indexes: the table entries themselves at inference, a log-linear
    interpolation (differentiable in the index) during training."""
    if exact:
        return scale_table[index.long()]
    return IntegerScalePath.table_scales(index, scale_table)


# ---------------------------------------------------------------------------------------------
# latent-codec containers, named as in CompressAI so that state-dict keys match


class _GaussianLatent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gaussian_conditional = GaussianConditional()


class CheckerboardGroup(nn.Module):
    """One channel group: checkerboard spatial context + parameter aggregation + Gaussian conditional."""

    def __init__(self, g: int, side_ch: int, min_ch: int):
        super().__init__()
        self.entropy_parameters = parameter_aggregation(2 * g + side_ch, 2 * g, min_ch)
        self.context_prediction = CheckerboardMaskedConv2d(g, 2 * g, kernel_size=5, stride=1, padding=2)
        self.y = _GaussianLatent()

    @property
    def gaussian_conditional(self) -> GaussianConditional:
        return self.y.gaussian_conditional

    def forward(self, y: torch.Tensor, side: torch.Tensor, index_fn=None):
        """Training/evaluation pass ("two-pass" checkerboard).

        Returns (y_hat, likelihoods, residual symbols, float-scale likelihoods).  ``index_fn(anchors)``
        (optional) replaces the network's scales by scale-table indexes from an integer scale path:
        called with None for the anchor pass and with the anchors' residual symbols (zeros
        elsewhere) for the non-anchor pass.  The network's own (floating-point) scales still give the
        fourth value, the likelihoods the float path would have coded with (None without
        ``index_fn``): training learns both, and their ratio is the integer path's rate overhead.
        """
        B, g, H, W = y.shape
        anchor = checkerboard_mask(H, W, True, y.device)
        non_anchor = 1.0 - anchor
        # the parameter network works position by position (1x1 mixing, per-token layers), so each
        # pass evaluates it only where its output is used: on the packed half-grid of its positions
        side_ = unembed(side)
        y_ = unembed(y)
        zero_ctx = y.new_zeros((B, 2 * g, H, W // 2))
        s_a, m_a = self.entropy_parameters(torch.cat([zero_ctx, side_[0]], dim=1)).chunk(2, dim=1)
        y_hat_a = embed(torch.stack([quantize_ste(y_[0] - m_a) + m_a, torch.zeros_like(m_a)]))
        ctx = unembed(self.context_prediction(y_hat_a))[1]
        s_n, m_n = self.entropy_parameters(torch.cat([ctx, side_[1]], dim=1)).chunk(2, dim=1)
        y_hat_n = embed(torch.stack([torch.zeros_like(m_n), quantize_ste(y_[1] - m_n) + m_n]))
        means = embed(torch.stack([m_a, m_n]))
        residual = torch.round(y - means).detach()
        gc = self.gaussian_conditional
        float_scales = embed(torch.stack([s_a, s_n]))
        float_likelihoods = None
        if index_fn is None:
            scales = float_scales
        else:
            idx = index_fn(None) * anchor + index_fn(residual * anchor) * non_anchor
            scales = table_scales(idx, gc.scale_table, exact=not self.training)
            # the float scales learn to code the latent the integer path codes: no gradient from
            # their rate reaches the latent or the means
            _, float_likelihoods = gc(y.detach(), float_scales, means.detach())
        _, likelihoods = gc(y, scales, means)
        return y_hat_a + y_hat_n, likelihoods, residual, float_likelihoods

    def code(self, side: torch.Tensor, step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Anchor pass then non-anchor pass on packed half-grids (the order the streams are coded in).

        ``step(i, scales, means)`` codes pass ``i`` (0 anchors, 1 non-anchors) and returns its
        dequantised values, packed (B, g, H, W/2); the same routine drives encoder and decoder.
        """
        side_ = unembed(side)
        B, _, H, W2 = side_.shape[1:]
        g = self.context_prediction.in_channels
        y_hat_ = side.new_zeros((2, B, g, H, W2))
        for i in (0, 1):
            if i == 0:
                ctx = side.new_zeros((B, 2 * g, H, W2))
            else:
                ctx = unembed(self.context_prediction(embed(y_hat_)))[1]
            params = self.entropy_parameters(torch.cat([ctx, side_[i]], dim=1))
            scales, means = params.chunk(2, dim=1)
            y_hat_[i] = step(i, scales, means)
        return embed(y_hat_)


class ChannelGroups(nn.Module):
    def __init__(self, groups: list[int], M: int, N: int, hidden_rate: int = 8):
        super().__init__()
        self.groups = list(groups)
        self.channel_context = nn.ModuleDict(
            {
                f"y{k}": nn.Sequential(
                    nn.Conv2d(sum(groups[:k]), M, 3, padding=1),
                    RwkvBlock(M, hidden_rate=hidden_rate),
                    RwkvBlock(M, hidden_rate=hidden_rate),
                    nn.Conv2d(M, groups[k] * 2, 1),
                )
                for k in range(1, len(groups))
            }
        )
        self.latent_codec = nn.ModuleDict(
            {f"y{k}": CheckerboardGroup(g, (k > 0) * 2 * g + M, 2 * N) for k, g in enumerate(groups)}
        )

    def side_params(self, k: int, hyper_params: torch.Tensor, y_hats: list[torch.Tensor]) -> torch.Tensor:
        if k == 0:
            return hyper_params
        ctx = self.channel_context[f"y{k}"](torch.cat(y_hats, dim=1))
        return torch.cat([ctx, hyper_params], dim=1)


class _Hyper(nn.Module):
    def __init__(self, entropy_bottleneck: EntropyBottleneck, h_a: nn.Module, h_s: nn.Module):
        super().__init__()
        self.entropy_bottleneck = entropy_bottleneck
        self.h_a = h_a
        self.h_s = h_s


class _Hyperprior(nn.Module):
    def __init__(self, y: ChannelGroups, hyper: _Hyper):
        super().__init__()
        self.y = y
        self.hyper = hyper


@dataclass
class LALICConfig:
    N: int = 128
    M: int = 320
    dims: tuple = (96, 144, 256, 320, 256, 192)
    depths: tuple = (2, 4, 6, 6)
    groups: tuple | None = None  # default: (16, 16, 32, 64, M - 128)
    ctx_hidden_rate: int = 8  # hidden width of the channel context's RWKV blocks, in multiples of M (official: 8)

    def resolved_groups(self) -> list[int]:
        return list(self.groups) if self.groups else [16, 16, 32, 64, self.M - 128]

    def to_dict(self) -> dict:
        d = {"N": self.N, "M": self.M, "dims": list(self.dims), "depths": list(self.depths), "groups": self.resolved_groups()}
        if self.ctx_hidden_rate != 8:
            d["ctx_hidden_rate"] = self.ctx_hidden_rate
        return d


@dataclass
class Coded:
    """Result of :meth:`LALIC.compress`: streams in container order plus what the decoder needs to know."""

    streams: list[bytes]
    z_shape: tuple[int, int]
    y_hat: torch.Tensor | None = None
    debug: dict = field(default_factory=dict)


class LALIC(CodingModel):
    """The LALIC network.  ``LALIC()`` is the official default configuration (66.1 M parameters)."""

    #: official evaluation pads images (centred, zeros) to a multiple of this
    pad_multiple = 128
    #: the network itself needs multiples of this (y at 1/16, z at 1/64)
    size_multiple = 64

    def __init__(self, N=128, M=320, dims=(96, 144, 256, 320, 256, 192), depths=(2, 4, 6, 6), groups=None, checkpointing=False, ctx_hidden_rate=8):
        super().__init__()
        self.config = LALICConfig(N, M, tuple(dims), tuple(depths), tuple(groups) if groups else None, ctx_hidden_rate)
        N1, N2, N3, N4, N5, N6 = dims
        L1, L2, L3, L4 = depths
        groups = self.config.resolved_groups()
        if sum(groups) != N4:
            raise ValueError(f"channel groups {groups} must add up to the latent width dims[3] = {N4}")
        self.groups = groups
        M = N4  # the official model uses dims[3] as the latent width
        blocks = lambda n, d: [RwkvBlock(d, checkpointing=checkpointing) for _ in range(n)]  # noqa: E731

        self.g_a = nn.Sequential(
            conv(3, N1, 5), *blocks(L1, N1), conv(N1, N2, 3), *blocks(L2, N2), conv(N2, N3, 3), *blocks(L3, N3), conv(N3, N4, 3)
        )
        self.g_s = nn.Sequential(
            deconv(N4, N3, 3), *blocks(L3, N3), deconv(N3, N2, 3), *blocks(L2, N2), deconv(N2, N1, 3), *blocks(L1, N1), deconv(N1, 3, 5)
        )
        h_a = nn.Sequential(conv(N4, N5, 5), *blocks(L4, N5), conv(N5, N6, 5))
        h_s = nn.Sequential(deconv(N6, N5, 5), *blocks(L4, N5), deconv(N5, N4, 5))
        self.latent_codec = _Hyperprior(ChannelGroups(groups, M, N, ctx_hidden_rate), _Hyper(EntropyBottleneck(N6), h_a, h_s))
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
    def channel_groups(self) -> ChannelGroups:
        return self.latent_codec.y

    def group(self, k: int) -> CheckerboardGroup:
        return self.latent_codec.y.latent_codec[f"y{k}"]

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

    # --- rate hooks (identity here; the variable-rate model scales the latent) ---------------------

    def latent_gain(self, y: torch.Tensor, quality=None) -> torch.Tensor:
        return y

    def latent_inverse_gain(self, y_hat: torch.Tensor, quality=None) -> torch.Tensor:
        return y_hat

    # --- forward (training / rate estimation) -----------------------------------------------------
    def forward(self, x: torch.Tensor, quality=None) -> dict:
        y = self.latent_gain(self.g_a(x), quality)
        eb = self.entropy_bottleneck
        z = self.h_a(y)
        z_tilde, z_likelihoods = eb(z)
        medians = eb.medians().view(1, -1, 1, 1)
        z_hat = quantize_ste(z - medians) + medians
        hyper_params = self.h_s(z_hat)
        y_split = y.split(self.groups, dim=1)
        y_hats, likelihoods, float_likelihoods, residuals = [], [], [], []
        hyper_int = None
        if self.scale_path is not None:
            z_sym = torch.round(z - medians).detach()
            hyper_int = self.scale_path.hyper_features(z_sym, quality)
        for k in range(len(self.groups)):
            side = self.channel_groups.side_params(k, hyper_params, y_hats)
            index_fn = None
            if hyper_int is not None:
                index_fn = partial(self.scale_path.indexes, k, hyper_int, list(residuals), quality=quality)
            y_hat_k, lik_k, res_k, flik_k = self.group(k)(y_split[k], side, index_fn)
            y_hats.append(y_hat_k)
            likelihoods.append(lik_k)
            float_likelihoods.append(flik_k)
            residuals.append(res_k)
        y_hat = torch.cat(y_hats, dim=1)
        x_hat = self.g_s(self.latent_inverse_gain(y_hat, quality))
        out = {
            "x_hat": x_hat,
            "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods},
            "y": y,
            "y_hat": y_hat,
            "z": z,
            "z_hat": z_hat,
        }
        if self.scale_path is not None:  # what the float scales would have cost (not coded)
            out["float_likelihoods_y"] = torch.cat(float_likelihoods, dim=1)
        return out

    # --- coding ---------------------------------------------------------------------------------
    def num_streams(self) -> int:
        return 1 + 2 * len(self.groups)

    @torch.no_grad()
    def compress(self, x: torch.Tensor, quality=None, debug: bool = False) -> Coded:
        """Encode a padded image (1, 3, H, W) in [0, 1] into entropy-coded streams."""
        self.check_input(x)
        y = self.latent_gain(self.g_a(x), quality)
        eb = self.entropy_bottleneck
        z = self.h_a(y)
        z_sym = eb.symbols(z)
        streams = [encode_stream(z_sym.cpu().numpy(), eb.indexes(z.shape).numpy(), eb.tables())]
        z_hat = eb.dequantize(z_sym)
        dbg: dict = {"y": y, "z": z, "z_hat": z_hat, "means": [], "scale_indexes": []} if debug else {}
        y_split = y.split(self.groups, dim=1)

        def code_symbols(k, i, indexes, means):
            sym = torch.round(unembed(y_split[k])[i] - means).int()
            streams.append(encode_stream(sym.cpu().numpy(), indexes.cpu().numpy(), self.group(k).gaussian_conditional.tables()))
            if debug:
                dbg["means"].append(means)
                dbg["scale_indexes"].append(indexes)
            return sym

        y_hat = self._code_groups(self.h_s(z_hat), z_sym, quality, code_symbols)
        return Coded(streams, tuple(z.shape[-2:]), y_hat, dbg)

    @torch.no_grad()
    def decompress(self, streams: list[bytes], z_shape: tuple[int, int], quality=None) -> dict:
        """Decode the streams of :meth:`compress`; returns ``x_hat`` (clamped to [0, 1]) and ``y_hat``."""
        if len(streams) != self.num_streams():
            raise ValueError(f"expected {self.num_streams()} streams, got {len(streams)}")
        zh, zw = (int(v) for v in z_shape)
        if zh < 1 or zw < 1:  # checked before any tensor is shaped from it (callers bound the size)
            raise ValueError(f"hyper-latent shape {zh}x{zw} is empty")
        eb = self.entropy_bottleneck
        device = eb.quantiles.device
        z_shape4 = (1, eb.channels, zh, zw)
        z_sym = decode_stream(streams[0], eb.indexes(z_shape4).numpy(), eb.tables())
        z_sym = torch.from_numpy(z_sym).to(device)
        z_hat = eb.dequantize(z_sym)
        pos = iter(range(1, len(streams)))

        def decode_symbols(k, i, indexes, means):
            sym = decode_stream(streams[next(pos)], indexes.cpu().numpy(), self.group(k).gaussian_conditional.tables())
            return torch.from_numpy(sym).to(means.device)

        y_hat = self._code_groups(self.h_s(z_hat), z_sym, quality, decode_symbols)
        x_hat = self.g_s(self.latent_inverse_gain(y_hat, quality)).clamp_(0, 1)
        return {"x_hat": x_hat, "y_hat": y_hat, "z_hat": z_hat}

    def _code_groups(self, hyper_params: torch.Tensor, z_sym: torch.Tensor, quality, code_symbols) -> torch.Tensor:
        """Run the entropy model group by group, pass by pass, in stream order.

        ``code_symbols(k, i, indexes, means)`` encodes or decodes the packed symbols of pass ``i``
        of group ``k`` and returns them; the same routine drives the encoder and the decoder.
        """
        y_hats: list[torch.Tensor] = []
        residuals: list[torch.Tensor] = []
        hyper_int = None
        if self.scale_path is not None:
            hyper_int = self.scale_path.hyper_features(z_sym.to(hyper_params.dtype), quality)
        for k in range(len(self.groups)):
            side = self.channel_groups.side_params(k, hyper_params, y_hats)
            gc = self.group(k).gaussian_conditional
            packed: list[torch.Tensor] = []

            def step(i, scales, means, k=k, gc=gc, packed=packed):
                if hyper_int is None:
                    indexes = gc.build_indexes(scales)
                else:
                    anchors = None if i == 0 else embed(torch.stack([packed[0], torch.zeros_like(packed[0])]))
                    full = self.scale_path.indexes(k, hyper_int, residuals, anchors, quality)
                    indexes = unembed(full)[i].int()
                sym = code_symbols(k, i, indexes, means)
                packed.append(sym.to(means.dtype))
                return packed[-1] + means

            y_hats.append(self.group(k).code(side, step))
            residuals.append(embed(torch.stack(packed)))
        return torch.cat(y_hats, dim=1)

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
        key = "latent_codec.y.channel_context.y1.1.ffn.key.weight"
        rate = sd[key].shape[0] // dims[3] if key in sd else 8
        return LALICConfig(min(mids) // 2, dims[3], tuple(dims), tuple(depths), tuple(groups), rate)

    @classmethod
    def from_state_dict(cls, sd: dict, strict: bool = True) -> "LALIC":
        cfg = cls.config_from_state_dict(sd)
        model = cls(cfg.N, cfg.M, cfg.dims, cfg.depths, cfg.groups, ctx_hidden_rate=cfg.ctx_hidden_rate)
        model.load_state_dict(sd, strict=strict)
        return model


#: rate-distortion trade-offs of the variable-rate model's quality ladder 1..8 (loss = R + lambda 255^2 MSE)
DEFAULT_LAMBDAS = tuple(float(f"{0.0018 * (0.0483 / 0.0018) ** (i / 7):.6f}") for i in range(8))


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

    def latent_gain(self, y, quality=None):
        if quality is None:
            raise ValueError("the variable-rate model needs a quality")
        return y * torch.exp(self._interp(self.log_gain, quality))

    def latent_inverse_gain(self, y_hat, quality=None):
        if quality is None:
            raise ValueError("the variable-rate model needs a quality")
        return y_hat * torch.exp(self._interp(self.log_inv_gain, quality))

    @classmethod
    def from_state_dict(cls, sd: dict, strict: bool = True) -> "VariableRateLALIC":
        cfg = LALIC.config_from_state_dict(sd)
        int_scale = IntegerScalePath.config_from_state_dict(sd) if any(k.startswith("scale_path.") for k in sd) else False
        model = cls(cfg.N, cfg.M, cfg.dims, cfg.depths, cfg.groups, lambdas=tuple(sd["lambdas"].tolist()), int_scale=int_scale, ctx_hidden_rate=cfg.ctx_hidden_rate)
        model.load_state_dict(sd, strict=strict)
        return model


#: the v2 integer scale path: signed residual contexts, two-layer channel context, three-layer head
INT_SCALE_V2 = dict(hidden=128, ctx=48, head=96, signed=True, deep=True)

#: the bundled default model's architecture (about 7.4 M parameters, integer scale path)
DEFAULT_CONFIG = dict(N=32, M=128, dims=(48, 64, 96, 128, 96, 64), depths=(0, 1, 2, 1), groups=(8, 8, 16, 32, 64), int_scale=True)
