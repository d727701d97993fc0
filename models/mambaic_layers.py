"""Building blocks of MambaIC: VSS blocks (SS2D), window attention (SWAtten), stochastic depth.

Module and parameter names follow the official implementation (AuroraZengfh/MambaIC,
``models/MambaIC.py`` and ``models/VSS_module.py``) so that official state dicts load key for
key: an ``SS2D`` registers ``x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds`` and then
``out_norm, in_proj, conv2d, out_proj``; the Swin blocks keep ``msa.relative_position_params``
(heads, 2w-1, 2w-1) and ``msa.embedding_layer``; the attention block keeps CompressAI's
``conv_a``/``conv_b`` residual units.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.selective_scan import cross_merge, cross_scan, fused_cross_scan_kernel, selective_scan


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics: kept samples are scaled by 1/keep); identity in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0 else x * mask


# ---------------------------------------------------------------------------------------------
# VSS block: LayerNorm -> SS2D (four-direction selective scan) -> residual

#: below this many scan elements (b * 4 * d_inner * H*W) the four directions are scanned in one call;
#: larger maps are scanned one direction at a time to bound memory
_ONE_CALL_ELEMENTS = 1 << 24


class SS2D(nn.Module):
    """VMamba's 2-D selective scan block (``forward_type="v2"``, ``ssm_ratio=2``, ``d_state=16``, d_conv 3).

    in_proj -> (x, z); z = SiLU(z); x -> depthwise 3x3 conv -> SiLU -> cross scan (4 directions)
    -> x_proj / dt_proj -> selective scan (delta softplus, D skip) -> cross merge -> LayerNorm
    -> * z -> out_proj.  Works on (B, H, W, C) maps.
    """

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank="auto", d_conv: int = 3,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        K = 4
        self.d_model, self.d_inner, self.d_state, self.dt_rank = d_model, d_inner, d_state, dt_rank
        # parameters first (state-dict order of the official module)
        bound = d_inner**-0.5  # nn.Linear's default init range
        self.x_proj_weight = nn.Parameter(torch.empty(K, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        std = dt_rank**-0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, dt_rank).uniform_(-std, std))
        dt = torch.exp(torch.rand(K, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K * d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(K * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        z = F.silu(z)
        x = x.permute(0, 3, 1, 2)
        # CPU: convolve the channels-last view as it is (oneDNN's NHWC depthwise conv, ~7x cheaper than
        # copying to NCHW first); the result stays channels-last, which the token-major CPU scan reads for free
        x = F.silu(self.conv2d(x if x.device.type == "cpu" else x.contiguous()))
        y = self.scan(x)  # (B, H, W, d_inner), normalised
        return self.out_proj(y * z)

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """The official ``cross_selective_scan`` (force_fp32): (B, d_inner, H, W) -> LayerNorm'd (B, H, W, d_inner)."""
        B, D, H, W = x.shape
        L = H * W
        N, R, K = self.d_state, self.dt_rank, 4
        dtype = x.dtype
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        As = -torch.exp(self.A_logs.to(cd))
        Ds = self.Ds.to(cd)
        bias = self.dt_projs_bias.reshape(-1).to(cd)
        fused = fused_cross_scan_kernel(x, self._needs_grad(x)) if x.is_cuda else None
        if fused is not None:
            y = self._scan_fused(x, fused, As, Ds, bias)
        elif x.is_cuda:
            xs = cross_scan(x)  # (B, 4, D, L)
            x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
            dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
            dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
            ys = selective_scan(xs.reshape(B, K * D, L).to(cd), dts.reshape(B, K * D, L).to(cd), As,
                                Bs.contiguous().to(cd), Cs.contiguous().to(cd), Ds, bias, delta_softplus=True)
            y = cross_merge(ys.view(B, K, D, L), H, W)
        else:  # CPU: token-major, the four directions in one scan call for small maps, one at a time for large ones
            y = self._scan_by_direction(x, As, Ds, bias, cd, 4 if B * K * D * L <= _ONE_CALL_ELEMENTS else 1)
        y = self.out_norm(y.transpose(1, 2).contiguous()).view(B, H, W, -1)
        return y.to(dtype)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        params = (self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))

    def _scan_fused(self, x, fused, As, Ds, bias) -> torch.Tensor:
        """The one-call path in one fused kernel: the x projection at row-major positions (the cross
        scan only permutes tokens), then cross scan, dt projection, scan and cross merge inside."""
        B, D, H, W = x.shape
        x_dbl = torch.einsum("bdl,kcd->bkcl", x.reshape(B, D, H * W), self.x_proj_weight)
        return fused(x, x_dbl, self.dt_projs_weight, As, Ds, bias, delta_softplus=True)

    def _scan_by_direction(self, x, As, Ds, bias, cd, per_call: int = 1) -> torch.Tensor:
        """The CPU path: the same computation as the one-call path, ``per_call`` (1, 2 or 4) scan
        directions per selective-scan call (memory grows with it: large maps go one at a time).

        Token-major throughout: (B, L, D) rows with the channels innermost.  The projections are
        linear maps of token rows, the scan reads that layout and writes its output in it without
        transposing, and the result is a (B, D, L) view of (B, L, D) memory, the layout out_norm
        reads.  (A channel-major ``matmul(weight, xs)`` with a weight that requires grad makes torch
        fold the product and copy its transposed result back, ~20 ns per element.)
        """
        B, D, H, W = x.shape
        L = H * W
        N, R = self.d_state, self.dt_rank
        rows = x.permute(0, 2, 3, 1)
        if rows.is_contiguous():  # channels-last x (the CPU conv output)
            rows = rows.reshape(B, L, D)
        else:  # 2-D transposes: torch copies those with a blocked kernel, unlike a general permute
            planes = [x[i].reshape(D, L).t().contiguous() for i in range(B)]
            rows = planes[0].unsqueeze(0) if B == 1 else torch.stack(planes)
        cols = rows.view(B, H, W, D).transpose(1, 2).reshape(B, L, D)
        merged = [None, None]  # row-scan and column-scan orders
        for k0 in range(0, 4, per_call):
            ks = range(k0, k0 + per_call)
            seqs = [(rows, cols)[k % 2].flip(1) if k >= 2 else (rows, cols)[k % 2] for k in ks]
            x_dbl = [F.linear(s, self.x_proj_weight[k]) for s, k in zip(seqs, ks)]  # (B, L, R + 2N) each
            dts = [F.linear(xd[..., :R], self.dt_projs_weight[k]) for xd, k in zip(x_dbl, ks)]  # (B, L, D) each
            xs = seqs[0] if per_call == 1 else torch.cat(seqs, dim=2)  # (B, L, per_call * D)
            dts = dts[0] if per_call == 1 else torch.cat(dts, dim=2)
            x_dbl = torch.stack(x_dbl, dim=1)  # (B, per_call, L, R + 2N)
            Bs, Cs = x_dbl[..., R : R + N].transpose(2, 3), x_dbl[..., R + N :].transpose(2, 3)  # (B, per_call, N, L)
            sl = slice(k0 * D, (k0 + per_call) * D)
            ys = selective_scan(xs.transpose(1, 2).to(cd), dts.transpose(1, 2).to(cd), As[sl], Bs.to(cd), Cs.to(cd),
                                Ds[sl], bias[sl], delta_softplus=True).transpose(1, 2)  # (B, L, per_call * D)
            del seqs, xs, x_dbl, dts, Bs, Cs
            for j, k in enumerate(ks):
                yk = ys[..., j * D : (j + 1) * D]
                if k >= 2:
                    yk = yk.flip(1)
                merged[k % 2] = yk if merged[k % 2] is None else merged[k % 2] + yk
            del ys, yk
        y = merged[0] + merged[1].view(B, W, H, D).transpose(1, 2).reshape(B, L, D)
        return y.transpose(1, 2)


class VSSBlock(nn.Module):
    """``x + DropPath(SS2D(LayerNorm(x)))`` on (B, C, H, W) maps (computed channels-last)."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, d_state: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.op = SS2D(hidden_dim, d_state=d_state)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)
        t = t + self.drop_path(self.op(self.norm(t)))
        return t.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# window attention (Swin W-MSA / SW-MSA) and the SWAtten block


def _windows(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nH*nW, p*p, C), windows in row-major order, pixels row-major inside."""
    B, H, W, C = x.shape
    return x.view(B, H // p, p, W // p, p, C).transpose(2, 3).reshape(B, (H // p) * (W // p), p * p, C)


def _unwindows(x: torch.Tensor, H: int, W: int, p: int) -> torch.Tensor:
    B, _, _, C = x.shape
    return x.view(B, H // p, W // p, p, p, C).transpose(2, 3).reshape(B, H, W, C)


class WMSA(nn.Module):
    """Window multi-head self-attention with a relative-position bias; ``type="SW"`` shifts by half a window."""

    def __init__(self, input_dim: int, output_dim: int, head_dim: int, window_size: int, type: str):  # noqa: A002
        super().__init__()
        if type not in ("W", "SW"):
            raise ValueError(f"type must be 'W' or 'SW', got {type!r}")
        self.input_dim, self.output_dim, self.head_dim = input_dim, output_dim, head_dim
        self.scale = head_dim**-0.5
        self.n_heads = input_dim // head_dim
        self.window_size = window_size
        self.type = type
        self.embedding_layer = nn.Linear(input_dim, 3 * input_dim, bias=True)
        w = 2 * window_size - 1
        self.relative_position_params = nn.Parameter(torch.empty(self.n_heads, w, w))
        nn.init.trunc_normal_(self.relative_position_params, std=0.02)
        self.linear = nn.Linear(input_dim, output_dim)
        self._cache: dict = {}

    def _relative_index(self, device) -> torch.Tensor:
        key = ("rel", device)
        if key not in self._cache:
            p = self.window_size
            i, j = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
            ci, cj = i.reshape(-1), j.reshape(-1)
            di = ci[:, None] - ci[None, :] + p - 1
            dj = cj[:, None] - cj[None, :] + p - 1
            self._cache[key] = (di * (2 * p - 1) + dj).to(device)
        return self._cache[key]

    def relative_embedding(self) -> torch.Tensor:
        """(heads, p*p, p*p) bias: entry (q, k) reads the table at (dy + p - 1, dx + p - 1), d = q - k."""
        idx = self._relative_index(self.relative_position_params.device)
        return self.relative_position_params.reshape(self.n_heads, -1)[:, idx]

    def shift_mask(self, n_h: int, n_w: int, device) -> torch.Tensor:
        """(n_h*n_w, p*p, p*p) boolean: True where a shifted window mixes pixels that are not neighbours.

        After the cyclic shift by -p/2 the last window row (column) holds rows (columns) from the
        bottom (right) edge in its first p/2 lines and from the top (left) edge in the rest;
        pixels of the two parts may not attend to each other.
        """
        key = ("mask", n_h, n_w, device)
        if key not in self._cache:
            p = self.window_size
            s = p - p // 2
            part = torch.arange(p) >= s  # which part a line of the last window row/column belongs to
            line_mask = part[:, None] != part[None, :]  # (p, p): query line vs key line
            m = torch.zeros(n_h, n_w, p, p, p, p, dtype=torch.bool)  # (wi, wj, qi, qj, ki, kj)
            m[-1] |= line_mask.view(p, 1, p, 1).expand(p, p, p, p)  # rows of the last window row
            m[:, -1] |= line_mask.view(1, p, 1, p).expand(p, p, p, p)  # columns of the last window column
            self._cache[key] = m.view(n_h * n_w, p * p, p * p).to(device)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) with H, W multiples of the window -> (B, H, W, output_dim)."""
        p = self.window_size
        shifted = self.type != "W"
        if shifted:
            x = torch.roll(x, shifts=(-(p // 2), -(p // 2)), dims=(1, 2))
        B, H, W, C = x.shape
        n_h, n_w = H // p, W // p
        t = _windows(x, p)  # (B, nW, P, C)
        qkv = self.embedding_layer(t)
        nW, P = t.shape[1], t.shape[2]
        qkv = qkv.view(B, nW, P, 3 * self.n_heads, self.head_dim).permute(3, 0, 1, 2, 4)  # [q heads | k heads | v heads]
        q, k, v = qkv.chunk(3, dim=0)  # each (h, B, nW, P, hd)
        sim = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        sim = sim + self.relative_embedding()[:, None, None]
        if shifted:
            sim = sim.masked_fill(self.shift_mask(n_h, n_w, x.device), float("-inf"))
        probs = torch.softmax(sim, dim=-1)
        out = torch.matmul(probs, v)  # (h, B, nW, P, hd)
        out = out.permute(1, 2, 3, 0, 4).reshape(B, nW, P, self.n_heads * self.head_dim)
        out = _unwindows(self.linear(out), H, W, p)
        if shifted:
            out = torch.roll(out, shifts=(p // 2, p // 2), dims=(1, 2))
        return out


class SwinLayer(nn.Module):
    """Swin transformer block (official name ``Block``): x + MSA(LN x); x + MLP(LN x), 4x GELU MLP."""

    def __init__(self, input_dim: int, output_dim: int, head_dim: int, window_size: int, drop_path: float, type: str = "W"):  # noqa: A002
        super().__init__()
        self.ln1 = nn.LayerNorm(input_dim)
        self.msa = WMSA(input_dim, input_dim, head_dim, window_size, type)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.ln2 = nn.LayerNorm(input_dim)
        self.mlp = nn.Sequential(nn.Linear(input_dim, 4 * input_dim), nn.GELU(), nn.Linear(4 * input_dim, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.msa(self.ln1(x)))
        return x + self.drop_path(self.mlp(self.ln2(x)))


class SwinBlock(nn.Module):
    """A W-MSA layer then an SW-MSA layer on (B, C, H, W) maps.

    Maps whose sides are not multiples of the window are zero-padded (centred) to the next
    multiple and cropped back afterwards.  The official block pads maps with a side <= the
    window to window + 1 and never crops, which fails; where it works (sides multiples of the
    window and larger than it) no padding happens here either, so results agree.
    """

    def __init__(self, input_dim: int, output_dim: int, head_dim: int, window_size: int, drop_path: float):
        super().__init__()
        self.block_1 = SwinLayer(input_dim, output_dim, head_dim, window_size, drop_path, type="W")
        self.block_2 = SwinLayer(input_dim, output_dim, head_dim, window_size, drop_path, type="SW")
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.window_size
        H, W = x.shape[-2:]
        ph, pw = -H % p, -W % p
        top, left = ph // 2, pw // 2
        if ph or pw:
            x = F.pad(x, (left, pw - left, top, ph - top))
        t = x.permute(0, 2, 3, 1)
        t = self.block_2(self.block_1(t))
        t = t.permute(0, 3, 1, 2)
        if ph or pw:
            t = t[..., top : top + H, left : left + W]
        return t


class ResidualUnit(nn.Module):
    """CompressAI's ``AttentionBlock.ResidualUnit``: relu(x + conv1x1(relu(conv3x3(relu(conv1x1 x)))))."""

    def __init__(self, N: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(N, N // 2, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(N // 2, N // 2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(N // 2, N, 1),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) + x)


class SWAtten(nn.Module):
    """Window-attention block on entropy parameters (CompressAI ``AttentionBlock`` with a Swin non-local branch).

    ``x = in_conv(x)``; ``out_conv(conv_a(x) * sigmoid(conv_b(SwinBlock(x))) + x)``, with
    ``inter_dim`` channels inside (MambaIC always uses 128).
    """

    def __init__(self, input_dim: int, output_dim: int, head_dim: int, window_size: int, drop_path: float, inter_dim: int = 192):
        super().__init__()
        n = inter_dim if inter_dim is not None else input_dim
        self.conv_a = nn.Sequential(ResidualUnit(n), ResidualUnit(n), ResidualUnit(n))
        self.conv_b = nn.Sequential(ResidualUnit(n), ResidualUnit(n), ResidualUnit(n), nn.Conv2d(n, n, 1))
        self.non_local_block = SwinBlock(n, n, head_dim, window_size, drop_path)
        if inter_dim is not None:
            self.in_conv = nn.Conv2d(input_dim, inter_dim, 1)
            self.out_conv = nn.Conv2d(inter_dim, output_dim, 1)
        else:
            self.in_conv = self.out_conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_conv is not None:
            x = self.in_conv(x)
        z = self.non_local_block(x)
        out = self.conv_a(x) * torch.sigmoid(self.conv_b(z)) + x
        return self.out_conv(out) if self.out_conv is not None else out
