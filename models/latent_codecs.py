"""Latent codecs: the nodes of a model's entropy-coding tree (after CompressAI's ``latent_codecs``).

A node codes one latent given side information and returns its dequantised value; a model is a
composition of nodes, and the streams of a tile are what the tree writes, in the order it writes
them, each named by its path in the tree (FORMAT.md 11.3)::

    HyperpriorLatentCodec                 z first, then y
      hyper: HyperLatentCodec             "z": z = h_a(y), factorized prior; h_s(z_hat) is y's side input
      y: ChannelGroupsLatentCodec         "y/g0/...", "y/g1/...": groups in channel order, each
           latent_codec.y<k>: CheckerboardLatentCodec     "anchor", then "non_anchor"
                y: GaussianConditionalLatentCodec          one stream per pass

LALIC registers this tree as its ``latent_codec`` (the module names give CompressAI's state-dict
keys); MambaIC builds the same node classes over its flat, officially named modules.

Encoder and decoder run the same node code (:meth:`LatentCodec.code`): a :class:`StreamCoder`
says which direction it is, collects the streams an encoder writes and hands a decoder the
streams in the same order, so the decoder mirrors the encoder by construction.  The leaves call
the entropy models' own ``compress`` / ``decompress``.

Which CDF table codes each symbol: by default the Gaussian conditional's table for the network's
scale; a model with an integer scale path passes ``scale_indexes`` (:class:`ScaleIndexes`)
instead, set up from the z symbols once z is known.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch
import torch.nn as nn

from ..entropy.coder import SegmentDecoder, SegmentEncoder
from . import entropy_models  # its encode_stream / decode_stream (benchmarks/bench_e2e_gpu.py swaps them)
from .entropy_models import EntropyBottleneck, GaussianConditional, quantize_ste
from .int_scale import IntegerScalePath

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
# streams and table indexes


class StreamCoder:
    """The streams of one tile in coding order, named by their path in the tree.

    ``StreamCoder()`` encodes: nodes :meth:`write` their streams.  ``StreamCoder(streams)``
    decodes: nodes :meth:`read` them back in the same order.  With ``trace`` an encoder also
    keeps, stream by stream, the means, table indexes and symbols of y it coded with
    (``trace["means"]``, ``trace["scale_indexes"]``, ``trace["symbols"]``; conformance tests compare
    the first two with the official model's, ``codec train fit-tables`` counts the others).
    ``rdo`` > 0 makes the Gaussian leaves choose their symbols by rate-distortion-optimised
    rounding with that Lagrangian (``GaussianConditional.rd_symbols``) instead of plain rounding.
    """

    def __init__(self, streams: list[bytes] | None = None, trace: bool = False, rdo: float = 0.0, merged: bool = False):
        self.encoding = streams is None
        self.rdo = float(rdo)
        self.streams: list[bytes] = [] if streams is None else list(streams)
        self.names: list[str] = []
        self.trace: dict | None = {"means": [], "scale_indexes": [], "symbols": []} if trace else None
        self._path: list[str] = []
        self.segments: SegmentEncoder | SegmentDecoder | None = None
        if merged:  # the tile's streams as segments of one stream (FORMAT.md 12.8)
            if self.encoding:
                self.segments = SegmentEncoder()
            elif len(self.streams) != 1:
                raise ValueError(f"a tile of merged streams has 1 stream, not {len(self.streams)}")
            else:
                self.segments = SegmentDecoder(self.streams[0])

    @contextlib.contextmanager
    def scope(self, name: str):
        """Streams coded inside are named ``name/...``."""
        self._path.append(name)
        try:
            yield self
        finally:
            self._path.pop()

    def _name(self, name: str) -> str:
        return "/".join(self._path + [name])

    def write(self, name: str, data: bytes) -> None:
        self.names.append(self._name(name))
        self.streams.append(data)

    def read(self, name: str) -> bytes:
        i = len(self.names)
        if i >= len(self.streams):
            raise ValueError(f"stream {self._name(name)} is missing (the tile has {len(self.streams)} streams)")
        self.names.append(self._name(name))
        return self.streams[i]

    def put(self, name: str, symbols: torch.Tensor, indexes: torch.Tensor, tables) -> None:
        """Encode the symbols of stream ``name``, each with the CDF table its index names: as a
        stream of its own (``encode_stream``), or as the next segment of the merged stream."""
        sym, idx = symbols.cpu().numpy(), indexes.cpu().numpy()
        if self.segments is None:
            self.write(name, entropy_models.encode_stream(sym, idx, tables))
        else:
            self.names.append(self._name(name))
            self.segments.add(sym, idx, tables)

    def take(self, name: str, indexes: torch.Tensor, tables) -> torch.Tensor:
        """Decode what :meth:`put` encoded: the symbols, shaped like ``indexes``, on its device."""
        idx = indexes.cpu().numpy()
        if self.segments is None:
            sym = entropy_models.decode_stream(self.read(name), idx, tables)
        else:
            self.names.append(self._name(name))
            sym = self.segments.take(idx, tables)
        return torch.from_numpy(sym).to(indexes.device)

    def finish(self) -> None:
        """After the tree: an encoder of merged streams seals the one stream into :attr:`streams`;
        a decoder checks that it read all of it and that the symbols match its checksum."""
        if self.segments is None:
            return
        if self.encoding:
            self.streams = [self.segments.finish()]
        else:
            self.segments.finish()


#: table indexes of one channel group on the full latent grid, given the group's anchor residual
#: symbols (zeros at non-anchors) for the non-anchor pass, or None for the anchor pass
IndexFn = Callable[[torch.Tensor | None], torch.Tensor]


class ScaleIndexes(Protocol):
    """Table indexes that do not come from the network's scales (the integer scale path)."""

    def group(self, k: int, residuals: list[torch.Tensor]) -> IndexFn:
        """Indexes of group ``k``; ``residuals``: the residual symbols of groups 0 .. k-1 (full grid)."""


# ---------------------------------------------------------------------------------------------
# nodes


class LatentCodec(nn.Module):
    """A node of the coding tree.  ``stream_names()`` lists its streams in coding order (relative
    to the node); ``code`` (encode or decode, as the :class:`StreamCoder` says) returns what it
    decoded; ``forward`` is the training / rate-estimation pass."""

    def stream_names(self) -> list[str]:
        raise NotImplementedError


class GaussianConditionalLatentCodec(LatentCodec):
    """A leaf: one stream of symbols ``round(y - means)`` under a Gaussian conditional."""

    def __init__(self, gaussian_conditional: GaussianConditional | None = None):
        super().__init__()
        self.gaussian_conditional = gaussian_conditional if gaussian_conditional is not None else GaussianConditional()

    def stream_names(self) -> list[str]:
        return [""]

    def code(self, io: StreamCoder, name: str, y: torch.Tensor | None, indexes: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """Code stream ``name``; returns the symbols (in the means' dtype): ``symbols + means`` is y_hat."""
        gc = self.gaussian_conditional
        if io.encoding:
            sym = gc.coded_symbols(y, indexes, means, rdo=io.rdo)
            io.put(name, sym, indexes, gc.tables())
            if io.trace is not None:
                io.trace["means"].append(means)
                io.trace["scale_indexes"].append(indexes)
                io.trace["symbols"].append(sym)
        else:
            sym = io.take(name, indexes, gc.tables())
        return sym.to(means.dtype)


class CheckerboardLatentCodec(LatentCodec):
    """Two passes over a checkerboard (He et al., CVPR 2021): the anchors ((i + j) even) with a zero
    spatial context, then the non-anchors with the masked context of the decoded anchors.  Each
    pass codes a packed half-grid (FORMAT.md 11.4) as one stream.

    The parameter network works position by position (1x1 mixing, per-token layers), so each pass
    evaluates it only on the packed half-grid of its positions; :meth:`pass_params` is where a
    model with another parameter network plugs in.
    """

    PASSES = ("anchor", "non_anchor")

    def __init__(self, entropy_parameters: nn.Module, context_prediction: nn.Module, y: GaussianConditionalLatentCodec | None = None):
        super().__init__()
        self.entropy_parameters = entropy_parameters
        self.context_prediction = context_prediction
        self.y = y if y is not None else GaussianConditionalLatentCodec()

    @property
    def gaussian_conditional(self) -> GaussianConditional:
        return self.y.gaussian_conditional

    def stream_names(self) -> list[str]:
        return list(self.PASSES)

    def pass_params(self, i: int, ctx: torch.Tensor | None, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, means) of pass ``i``, packed; ``ctx``: the spatial context on the full grid
        (None: zero, the anchor pass); ``side``: the side parameters on the full grid."""
        B, _, H, W = side.shape
        if ctx is None:
            ctx = side.new_zeros((B, 2 * self.context_prediction.in_channels, H, W // 2))
        else:
            ctx = unembed(ctx)[1]
        params = self.entropy_parameters(torch.cat([ctx, unembed(side)[i]], dim=1))
        return params.chunk(2, dim=1)

    def code(self, io: StreamCoder, y: torch.Tensor | None, side: torch.Tensor, indexes: IndexFn | None = None):
        """Anchor pass, then non-anchor pass; returns (y_hat, residual symbols), both full grid."""
        B, _, H, W = side.shape
        y_ = unembed(y) if io.encoding else (None, None)
        y_hat_ = side.new_zeros((2, B, self.context_prediction.in_channels, H, W // 2))
        syms: list[torch.Tensor] = []
        for i, name in enumerate(self.PASSES):
            ctx = None if i == 0 else self.context_prediction(embed(y_hat_))
            scales, means = self.pass_params(i, ctx, side)
            if indexes is None:
                idx = self.gaussian_conditional.build_indexes(scales)
            else:
                anchors = None if i == 0 else embed(torch.stack([syms[0], torch.zeros_like(syms[0])]))
                idx = unembed(indexes(anchors))[i].int()
            syms.append(self.y.code(io, name, y_[i], idx, means))
            y_hat_[i] = syms[-1] + means
        return embed(y_hat_), embed(torch.stack(syms))

    def forward(self, y: torch.Tensor, side: torch.Tensor, indexes: IndexFn | None = None):
        """Training/evaluation pass ("two-pass" checkerboard).

        Returns (y_hat, likelihoods, residual symbols, float-scale likelihoods).  ``indexes``
        (optional) replaces the network's scales by scale-table indexes from an integer scale path.
        The network's own (floating-point) scales still give the fourth value, the likelihoods the
        float path would have coded with (None without ``indexes``): training learns both, and
        their ratio is the integer path's rate overhead.
        """
        B, g, H, W = y.shape
        anchor = checkerboard_mask(H, W, True, y.device)
        non_anchor = 1.0 - anchor
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
        if indexes is None:
            scales = float_scales
        else:
            idx = indexes(None) * anchor + indexes(residual * anchor) * non_anchor
            scales = table_scales(idx, gc.scale_table, exact=not self.training)
            # the float scales learn to code the latent the integer path codes: no gradient from
            # their rate reaches the latent or the means
            _, float_likelihoods = gc(y.detach(), float_scales, means.detach())
        _, likelihoods = gc(y, scales, means)
        return y_hat_a + y_hat_n, likelihoods, residual, float_likelihoods


class ChannelGroupsLatentCodec(LatentCodec):
    """Channel groups coded one after the other (ELIC's uneven groups): the side input of group k is
    the channel context of groups 0 .. k-1 (``channel_context["y<k>"]``) beside the hyper
    parameters.  Groups are ``latent_codec["y<k>"]``; their streams are named ``g<k>/...``.

    ``residual_prediction`` (optional, ``residual_prediction["y<k>"]``: a module called as
    ``f(support, y_q)``) refines each decoded group from the support its parameters were computed
    from; the refined group is what later groups' channel context and the synthesis see.  It changes
    no symbol and no table index, only the dequantised values.

    :meth:`side_params` and :meth:`finish` are where a model with other supports (MambaIC's
    attention supports and latent residual prediction) plugs in."""

    def __init__(self, groups: list[int], latent_codec: nn.ModuleDict, channel_context: nn.ModuleDict | None = None,
                 residual_prediction: nn.ModuleDict | None = None):
        super().__init__()
        self.groups = list(groups)
        self.channel_context = channel_context
        self.latent_codec = latent_codec
        self.residual_prediction = residual_prediction

    def group(self, k: int) -> CheckerboardLatentCodec:
        return self.latent_codec[f"y{k}"]

    def stream_names(self) -> list[str]:
        return [f"g{k}/{n}" for k in range(len(self.groups)) for n in self.group(k).stream_names()]

    def side_params(self, k: int, side, y_hats: list[torch.Tensor]):
        """(side input of group k's node, what :meth:`finish` needs) from the parent's side input
        and the decoded groups 0 .. k-1."""
        if k > 0:
            ctx = self.channel_context[f"y{k}"](torch.cat(y_hats, dim=1))
            side = torch.cat([ctx, side], dim=1)
        return side, (side if self.residual_prediction is not None else None)

    def finish(self, k: int, y_q: torch.Tensor, extra, io: StreamCoder | None) -> torch.Tensor:
        """The decoded group k from its dequantised values: refined by the residual prediction where
        there is one (``extra``: its support), else as they are."""
        if self.residual_prediction is None:
            return y_q
        return self.residual_prediction[f"y{k}"](extra, y_q)

    def code(self, io: StreamCoder, y: torch.Tensor | None, side, scale_indexes: ScaleIndexes | None = None) -> torch.Tensor:
        ys = y.split(self.groups, dim=1) if io.encoding else [None] * len(self.groups)
        y_hats: list[torch.Tensor] = []
        residuals: list[torch.Tensor] = []
        for k in range(len(self.groups)):
            side_k, extra = self.side_params(k, side, y_hats)
            indexes = None if scale_indexes is None else scale_indexes.group(k, residuals)
            with io.scope(f"g{k}"):
                y_q, r = self.group(k).code(io, ys[k], side_k, indexes)
            y_hats.append(self.finish(k, y_q, extra, io))
            residuals.append(r)
        return torch.cat(y_hats, dim=1)

    def forward(self, y: torch.Tensor, side, scale_indexes: ScaleIndexes | None = None):
        """Returns (y_hat, likelihoods, float-scale likelihoods or None)."""
        y_split = y.split(self.groups, dim=1)
        y_hats, likelihoods, float_likelihoods, residuals = [], [], [], []
        for k in range(len(self.groups)):
            side_k, extra = self.side_params(k, side, y_hats)
            indexes = None if scale_indexes is None else scale_indexes.group(k, residuals)
            y_hat_k, lik_k, res_k, flik_k = self.group(k)(y_split[k], side_k, indexes)
            y_hats.append(self.finish(k, y_hat_k, extra, None))
            likelihoods.append(lik_k)
            float_likelihoods.append(flik_k)
            residuals.append(res_k)
        flik = torch.cat(float_likelihoods, dim=1) if scale_indexes is not None else None
        return torch.cat(y_hats, dim=1), torch.cat(likelihoods, dim=1), flik


class HyperLatentCodec(LatentCodec):
    """The hyper-latent: ``z = h_a(y)`` coded under a factorized prior (one stream, "z");
    ``h_s(z_hat)`` is the side input of y."""

    def __init__(self, entropy_bottleneck: EntropyBottleneck, h_a: nn.Module, h_s: nn.Module):
        super().__init__()
        self.entropy_bottleneck = entropy_bottleneck
        self.h_a = h_a
        self.h_s = h_s

    def stream_names(self) -> list[str]:
        return ["z"]

    def code(self, io: StreamCoder, y: torch.Tensor | None, z_shape: tuple[int, int] | None = None):
        """Returns (side parameters, z symbols, z or None when decoding, z_hat)."""
        eb = self.entropy_bottleneck
        if io.encoding:
            z = self.h_a(y)
            z_sym = eb.symbols(z)
            io.put("z", z_sym, eb.indexes(z.shape), eb.tables())
        else:
            z = None
            z_sym = io.take("z", eb.indexes((1, eb.channels, *z_shape)), eb.tables()).to(eb.quantiles.device)
        z_hat = eb.dequantize(z_sym)
        return self.h_s(z_hat), z_sym, z, z_hat

    def forward(self, y: torch.Tensor):
        """Returns (side parameters, z, z_hat, z likelihoods, z symbols)."""
        eb = self.entropy_bottleneck
        z = self.h_a(y)
        _, z_likelihoods = eb(z)
        medians = eb.medians().view(1, -1, 1, 1)
        z_hat = quantize_ste(z - medians) + medians
        params = self.h_s(z_hat)
        return params, z, z_hat, z_likelihoods, torch.round(z - medians).detach()


class HyperpriorLatentCodec(LatentCodec):
    """z first (``hyper``), then y (``y``) with the hyper parameters as its side input.

    ``scale_indexes``, if given, maps the z symbols (in z_hat's dtype) to the :class:`ScaleIndexes`
    that choose y's tables."""

    def __init__(self, y: ChannelGroupsLatentCodec, hyper: HyperLatentCodec):
        super().__init__()
        self.y = y
        self.hyper = hyper

    def stream_names(self) -> list[str]:
        return self.hyper.stream_names() + [f"y/{n}" for n in self.y.stream_names()]

    def code(self, io: StreamCoder, y: torch.Tensor | None, z_shape: tuple[int, int] | None = None,
             scale_indexes: Callable[[torch.Tensor], ScaleIndexes] | None = None) -> dict:
        """Returns ``y_hat``, ``z_hat`` and (encoding) ``z``."""
        params, z_sym, z, z_hat = self.hyper.code(io, y, z_shape)
        indexes = None if scale_indexes is None else scale_indexes(z_sym.to(z_hat.dtype))
        with io.scope("y"):
            y_hat = self.y.code(io, y, params, indexes)
        return {"y_hat": y_hat, "z": z, "z_hat": z_hat}

    def forward(self, y: torch.Tensor, scale_indexes: Callable[[torch.Tensor], ScaleIndexes] | None = None) -> dict:
        params, z, z_hat, z_likelihoods, z_sym = self.hyper(y)
        indexes = None if scale_indexes is None else scale_indexes(z_sym)
        y_hat, y_likelihoods, float_likelihoods = self.y(y, params, indexes)
        return {"y_hat": y_hat, "z": z, "z_hat": z_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods},
                "float_likelihoods_y": float_likelihoods}
