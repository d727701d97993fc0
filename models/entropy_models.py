"""Entropy models with CompressAI-compatible parameters and buffers.

``EntropyBottleneck`` (factorized prior, Balle et al. 2018) and ``GaussianConditional``
keep CompressAI's names (``_quantized_cdf``, ``_offset``, ``_cdf_length``, ``scale_table``,
``quantiles`` whose middle column holds the medians, ``matrices.N`` ...) so that official
checkpoints load unchanged, and reproduce its training/eval semantics.  The integer CDF
tables stored in a checkpoint are used as they are; they are computed only when a model is
built or retrained (``update``), and then saved with the weights, so that every machine
codes with exactly the same tables.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..entropy.coder import decode_stream, encode_stream
from ..entropy.tables import CdfTables, gaussian_cdf_tables, gaussian_scale_table, pmf_to_cdf_tables

_TABLE_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length")


_HALF = (torch.float16, torch.bfloat16)


def full_precision(fn):
    """Run a method outside autocast, with half-precision tensor arguments cast to float32.

    Rates are logarithms of small probability differences: mixed-precision training (bf16
    autocast: by default on CUDA, on a CPU with ``--bf16 on``) keeps them in float32.  Without
    autocast and with float32/float64 inputs the method runs unchanged."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or not torch.is_autocast_enabled(t.device.type) and t.dtype not in _HALF:
            return fn(self, *args, **kwargs)
        up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a  # noqa: E731
        with torch.autocast(t.device.type, enabled=False):
            return fn(self, *(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper


class _LowerBoundFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x, bound)
        return torch.max(x, bound)

    @staticmethod
    def backward(ctx, grad):
        x, bound = ctx.saved_tensors
        pass_through = (x >= bound) | (grad < 0)
        return pass_through * grad, None


class LowerBound(nn.Module):
    """max(x, bound) whose gradient still pushes values up from below the bound."""

    def __init__(self, bound: float):
        super().__init__()
        self.register_buffer("bound", torch.Tensor([float(bound)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LowerBoundFn.apply(x, self.bound.to(x.dtype))


def quantize_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


class EntropyModel(nn.Module):
    def __init__(self, likelihood_bound: float = 1e-9):
        super().__init__()
        self.use_likelihood_bound = likelihood_bound > 0
        if self.use_likelihood_bound:
            self.likelihood_lower_bound = LowerBound(likelihood_bound)
        for name in _TABLE_BUFFERS:
            self.register_buffer(name, torch.IntTensor())
        self._tables_cache: CdfTables | None = None

    def quantize(self, inputs: torch.Tensor, mode: str, means: torch.Tensor | None = None) -> torch.Tensor:
        if mode == "noise":
            return inputs + torch.empty_like(inputs).uniform_(-0.5, 0.5)
        outputs = inputs - means if means is not None else inputs
        outputs = torch.round(outputs)
        if mode == "dequantize":
            return outputs + means if means is not None else outputs
        if mode == "symbols":
            return outputs.int()
        raise ValueError(f"unknown quantization mode {mode!r}")

    def has_tables(self) -> bool:
        return self._offset.numel() > 0

    def tables(self) -> CdfTables:
        """The integer CDF tables as a validated numpy ``CdfTables`` (cached)."""
        if self._tables_cache is None:
            if not self.has_tables():
                raise RuntimeError("entropy model has no CDF tables; call update() first")
            self._tables_cache = CdfTables.from_arrays(
                self._quantized_cdf.cpu().numpy(), self._cdf_length.cpu().numpy(), self._offset.cpu().numpy()
            )
        return self._tables_cache

    def _set_tables(self, quantized_cdf, cdf_length, offset) -> None:
        dev = self._offset.device
        self._quantized_cdf = torch.tensor(np.array(quantized_cdf), dtype=torch.int32, device=dev)
        self._cdf_length = torch.tensor(np.array(cdf_length), dtype=torch.int32, device=dev)
        self._offset = torch.tensor(np.array(offset), dtype=torch.int32, device=dev)
        self._tables_cache = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # table buffers change shape with update(): take the checkpoint's shapes
        for name in _TABLE_BUFFERS + getattr(self, "_resizable_buffers", ()):
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                setattr(self, name, torch.empty_like(cur, device=cur.device).resize_(state_dict[key].shape))
        self._tables_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EntropyBottleneck(EntropyModel):
    """Factorized prior over each channel of z (CompressAI ``EntropyBottleneck`` semantics)."""

    def __init__(self, channels: int, tail_mass: float = 1e-9, init_scale: float = 10.0, filters=(3, 3, 3, 3)):
        super().__init__()
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        self.init_scale = float(init_scale)
        self.tail_mass = float(tail_mass)
        self.quantiles = nn.Parameter(torch.Tensor([-init_scale, 0, init_scale]).repeat(channels, 1, 1))
        target = float(np.log(2 / self.tail_mass - 1))
        self.register_buffer("target", torch.Tensor([-target, 0, target]))
        # registered after likelihood_lower_bound, as in CompressAI, so the state-dict order matches
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        fs = (1,) + self.filters + (1,)
        scale = self.init_scale ** (1 / (len(self.filters) + 1))
        for i in range(len(self.filters) + 1):
            init = float(np.log(np.expm1(1 / scale / fs[i + 1])))
            self.matrices.append(nn.Parameter(torch.full((channels, fs[i + 1], fs[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, fs[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(self.filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, fs[i + 1], 1)))

    def medians(self) -> torch.Tensor:
        """(C, 1, 1) medians of the learned densities."""
        return self.quantiles[:, :, 1:2]

    def _logits_cumulative(self, inputs: torch.Tensor, stop_gradient: bool) -> torch.Tensor:
        logits = inputs
        for i in range(len(self.filters) + 1):
            m, b = self.matrices[i], self.biases[i]
            if stop_gradient:
                m, b = m.detach(), b.detach()
            logits = torch.matmul(F.softplus(m), logits) + b
            if i < len(self.factors):
                f = self.factors[i].detach() if stop_gradient else self.factors[i]
                logits = logits + torch.tanh(f) * torch.tanh(logits)
        return logits

    def _likelihood(self, inputs: torch.Tensor, stop_gradient: bool = False):
        lower = self._logits_cumulative(inputs - 0.5, stop_gradient)
        upper = self._logits_cumulative(inputs + 0.5, stop_gradient)
        return torch.sigmoid(upper) - torch.sigmoid(lower), lower, upper

    @full_precision
    def forward(self, x: torch.Tensor, training: bool | None = None):
        """Returns (noisy or quantized x, likelihoods); x is (B, C, ...)."""
        if training is None:
            training = self.training
        xt = x.transpose(0, 1)
        shape = xt.shape
        values = xt.reshape(shape[0], 1, -1)
        outputs = self.quantize(values, "noise" if training else "dequantize", self.medians())
        likelihood, _, _ = self._likelihood(outputs)
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        outputs = outputs.reshape(shape).transpose(0, 1).contiguous()
        likelihood = likelihood.reshape(shape).transpose(0, 1).contiguous()
        return outputs, likelihood

    def loss(self) -> torch.Tensor:
        """Auxiliary loss that moves ``quantiles`` to the tail_mass/2, median and 1-tail_mass/2 points."""
        logits = self._logits_cumulative(self.quantiles, stop_gradient=True)
        return torch.abs(logits - self.target).sum()

    @torch.no_grad()
    def fit_quantiles(self, bound: float = 1000.0, iterations: int = 50) -> float:
        """Set ``quantiles`` to the points the auxiliary loss moves them towards (the tail_mass/2,
        median and 1 - tail_mass/2 points of each learned density), directly, by bisection: the
        cumulative is increasing, so this is exact to float precision where the auxiliary loss
        needs many thousand steps.  Searches [-bound, bound]; returns the auxiliary loss after."""
        q = self.quantiles
        shape = (self.channels, 1, 3)
        lo = torch.full(shape, -bound, dtype=q.dtype, device=q.device)
        hi = torch.full(shape, bound, dtype=q.dtype, device=q.device)
        target = self.target.to(q.dtype).view(1, 1, 3)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            below = self._logits_cumulative(mid, stop_gradient=True) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        q.copy_((lo + hi) / 2)
        return float(self.loss())

    # --- coding ------------------------------------------------------------------------
    def symbols(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantize(z, "symbols", self.medians().detach().view(1, -1, 1, 1))

    def dequantize(self, symbols: torch.Tensor) -> torch.Tensor:
        return symbols.to(self.quantiles.dtype) + self.medians().detach().view(1, -1, 1, 1)

    def indexes(self, shape) -> torch.Tensor:
        B, C, H, W = shape
        return torch.arange(C, dtype=torch.int32).view(1, C, 1, 1).expand(B, C, H, W)

    def compress(self, z: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """One stream of ``round(z - median)``, table c for channel c, elements in C order
        (FORMAT.md 11.3); returns (stream, symbols)."""
        z_sym = self.symbols(z)
        return encode_stream(z_sym.cpu().numpy(), self.indexes(z.shape).numpy(), self.tables()), z_sym

    def decompress(self, data: bytes, hw: tuple[int, int]) -> torch.Tensor:
        """The symbols of a :meth:`compress` stream of one (C, h, w) latent, as (1, C, h, w) on the model's device."""
        sym = decode_stream(data, self.indexes((1, self.channels, *hw)).numpy(), self.tables())
        return torch.from_numpy(sym).to(self.quantiles.device)

    @torch.no_grad()
    def update(self, force: bool = False) -> bool:
        """Compute the integer CDF tables from the learned densities (CompressAI ``update``)."""
        if self.has_tables() and not force:
            return False
        q = self.quantiles.detach().float().cpu()
        medians = q[:, 0, 1]
        minima = torch.clamp(torch.ceil(medians - q[:, 0, 0]).int(), min=0)
        maxima = torch.clamp(torch.ceil(q[:, 0, 2] - medians).int(), min=0)
        pmf_start = medians - minima
        pmf_length = maxima + minima + 1
        max_length = int(pmf_length.max())
        samples = (torch.arange(max_length)[None, :] + pmf_start[:, None, None]).to(self.quantiles.device)
        pmf, lower, upper = self._likelihood(samples, stop_gradient=True)
        pmf = pmf[:, 0, :].float().cpu()
        tail_mass = (torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])).float().cpu()
        cdf = pmf_to_cdf_tables(pmf.numpy(), tail_mass[:, 0].numpy(), pmf_length.numpy())
        self._set_tables(cdf, (pmf_length + 2).numpy(), (-minima).numpy())
        return True


class GaussianConditional(EntropyModel):
    """Gaussian likelihood with per-element scales and means; coded through a table of 64 scales."""

    def __init__(self, scale_bound: float = 0.11, tail_mass: float = 1e-9):
        super().__init__()
        self.tail_mass = float(tail_mass)
        self.register_buffer("scale_table", torch.Tensor())
        self.register_buffer("scale_bound", torch.Tensor([float(scale_bound)]))
        self.lower_bound_scale = LowerBound(scale_bound)
        self._resizable_buffers = ("scale_table",)

    @staticmethod
    def _standardized_cumulative(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.erfc(-(2**-0.5) * x)

    @full_precision
    def likelihood(self, inputs: torch.Tensor, scales: torch.Tensor, means: torch.Tensor | None = None) -> torch.Tensor:
        values = inputs - means if means is not None else inputs
        scales = self.lower_bound_scale(scales)
        values = torch.abs(values)
        upper = self._standardized_cumulative((0.5 - values) / scales)
        lower = self._standardized_cumulative((-0.5 - values) / scales)
        return upper - lower

    @full_precision
    def forward(self, inputs, scales, means=None, training: bool | None = None):
        if training is None:
            training = self.training
        outputs = self.quantize(inputs, "noise" if training else "dequantize", means)
        likelihood = self.likelihood(outputs, scales, means)
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        return outputs, likelihood

    def build_indexes(self, scales: torch.Tensor) -> torch.Tensor:
        """Index of the CDF table for each scale: the first table scale >= the (bounded) scale.

        Same result as CompressAI's loop ``63 - sum(scales <= s for s in table[:-1])``.
        """
        scales = torch.max(scales, self.scale_bound.to(scales.dtype))
        table = self.scale_table[:-1].to(device=scales.device, dtype=scales.dtype).contiguous()
        return torch.searchsorted(table, scales.contiguous(), right=False).int()

    def compress(self, y: torch.Tensor, indexes: torch.Tensor, means: torch.Tensor, rdo: float = 0.0) -> tuple[bytes, torch.Tensor]:
        """One stream of the symbols of ``y - means`` (:meth:`coded_symbols`), each coded with the
        table its index names; returns (stream, symbols)."""
        sym = self.coded_symbols(y, indexes, means, rdo)
        return encode_stream(sym.cpu().numpy(), indexes.cpu().numpy(), self.tables()), sym

    def coded_symbols(self, y: torch.Tensor, indexes: torch.Tensor, means: torch.Tensor, rdo: float = 0.0) -> torch.Tensor:
        """The symbols the encoder codes for ``y``: ``round(y - means)``, or with ``rdo > 0`` the
        rate-distortion-optimised rounding of :meth:`rd_symbols`."""
        return self.quantize(y, "symbols", means) if rdo <= 0 else self.rd_symbols(y - means, indexes, rdo)

    @full_precision
    def rd_symbols(self, residual: torch.Tensor, indexes: torch.Tensor, lagrangian: float) -> torch.Tensor:
        """Rate-distortion-optimised rounding (the encoder's choice: a decoder only dequantises).

        Each element's symbol is ``round(residual)`` or, where that is not 0, the next integer
        towards 0, whichever costs less in ``(residual - symbol)^2 + lagrangian * bits(symbol)``,
        with ``bits`` the symbol's code length under the element's CDF table (:meth:`symbol_bits`:
        what the range coder spends on it, whatever distribution the table holds).  Decisions
        ignore what a symbol changes in the contexts of later ones; ``lagrangian`` is tuned for
        that (``rdo_lagrangian`` of the model)."""
        s0 = torch.round(residual)
        if lagrangian <= 0:
            return s0.int()
        s1 = s0 - torch.sign(s0)
        cost0 = (residual - s0).square() + lagrangian * self.symbol_bits(s0, indexes).to(residual.dtype)
        cost1 = (residual - s1).square() + lagrangian * self.symbol_bits(s1, indexes).to(residual.dtype)
        return torch.where(cost1 < cost0, s1, s0).int()

    def symbol_bits(self, symbols: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
        """Bits the range coder spends on each (integer-valued) symbol under the table its index
        names (float64): ``-log2`` of the symbol's 16-bit frequency, and for a value outside the
        row's range its escape symbol's, the escape class's ``log2(33)`` and the class's payload
        bits (FORMAT.md 12.4)."""
        tables = self.tables()
        cache = getattr(self, "_bits_cache", None)
        if cache is None or cache[0] is not tables or cache[1] != symbols.device:
            lengths = torch.from_numpy(tables.code_lengths()).to(symbols.device)
            offset = torch.from_numpy(tables.offset.astype(np.int64)).to(symbols.device)
            escape = torch.from_numpy(tables.num_symbols() - 1).to(symbols.device)
            cache = self._bits_cache = (tables, symbols.device, lengths, offset, escape)
        lengths, offset, escape = cache[2:]
        idx = indexes.long()
        t = symbols.long() - offset[idx]
        esc = escape[idx]
        inside = (t >= 0) & (t < esc)
        bits = lengths[idx, torch.where(inside, t, esc)]
        e = torch.where(t < 0, -2 * t - 1, 2 * (t - esc))  # the escape's class is floor(log2(e + 1))
        extra = math.log2(33) + torch.floor(torch.log2((e + 1).clamp(min=1).double()))
        return torch.where(inside, bits, bits + extra)

    def decompress(self, data: bytes, indexes: torch.Tensor) -> torch.Tensor:
        """The symbols of a :meth:`compress` stream (shaped like ``indexes``, on its device)."""
        return torch.from_numpy(decode_stream(data, indexes.cpu().numpy(), self.tables())).to(indexes.device)

    @torch.no_grad()
    def update_scale_table(self, scale_table=None, force: bool = False) -> bool:
        if self.has_tables() and not force:
            return False
        st = gaussian_scale_table() if scale_table is None else np.asarray(scale_table, dtype=np.float32)
        t = gaussian_cdf_tables(st, tail_mass=self.tail_mass)
        self.scale_table = torch.as_tensor(np.array(st), dtype=torch.float32, device=self.scale_bound.device)
        self._set_tables(t.quantized_cdf, t.cdf_length, t.offset)
        return True
