"""Triton selective scan (MambaIC's SS2D core): forward, backward, and a fused cross-scan/merge.

Computes what :func:`selective_scan_ref.selective_scan_reference` computes (see that module and
``shared/refvec/README.md`` section 1.2): per channel ``c`` (direction ``k = c // Dk``) and
state ``n < N`` (d_state, 16 in MambaIC),
``delta <- softplus(delta + delta_bias)`` (threshold 20), ``h_l = exp(delta_l A_cn) h_{l-1} +
delta_l u_l B_kn,l``, ``y_l = sum_n C_kn,l h_l + D_c u_l``.  fp32 / bf16 / fp16 inputs are
computed with fp32 state (float64 inputs in float64); the output has u's dtype.

Entry points
------------
* :func:`selective_scan_triton` -- the reference's signature and semantics (``u, delta``:
  (b, K*Dk, L); ``A``: (K*Dk, N); ``B, C``: (b, K, N, L) or (b, N, L); ``D, delta_bias``: (K*Dk,)),
  differentiable (``torch.autograd.Function``: gradients for u, delta, A, B, C, D, delta_bias).
* :func:`cross_selective_scan_fused` -- inference only: SS2D's whole ``cross_scan -> x_proj /
  dt_proj -> selective scan -> cross_merge`` after the x projection.  It takes the NCHW map
  ``x`` (B, D, H, W) and ``x_dbl`` (B, 4, R + 2N, H*W), the x projection of every direction
  evaluated at row-major positions (``einsum("bdl,kcd->bkcl", x, x_proj_weight)``; the cross
  scan is a permutation of tokens, so projecting first and permuting later is the same), and
  returns the merged (B, D, H*W) row-major output.  Inside the kernel every direction reads its
  scan order straight from the map: directions 0 / 2 walk the row-major sequence forwards /
  backwards (``reverse`` scans, tiles right to left: no flipped copies), directions 1 / 3 the
  column-major sequence, either by index arithmetic on the NCHW map (``col_mode="gather"``:
  token ``m`` at ``(m % H) W + m // H``, strided) or from a transposed copy of the map and of
  their x_dbl rows (``col_mode="transpose"``, the default: every load contiguous and
  vectorised, for one extra read and write of the map).  ``delta = dt_projs_weight[k] @
  x_dbl[k, :R]`` (+ bias, softplus) is formed in the kernel (the (B, 4, D, L) delta tensor of the
  unfused path is never written).  Each direction writes its output at its own positions in a
  (B, 4, D, L) buffer; a tiled kernel sums the four in the order of the official
  ``CrossMerge``, ``(y0 + y2) + T(y1 + y3)`` (T: column-major tiles transposed in registers).
  Deterministic: no atomics, so encoder and decoder get bit-identical results.

Work decomposition
------------------
One program handles one (batch, direction / channel group, block of ``BLOCK_D`` channels,
segment of the sequence); the sequence is cut into ``S`` segments of whole tiles of
``BLOCK_T`` tokens so that batch-1 inference still launches enough programs to fill a large
GPU (``Plan``: about ``TARGET_PROGRAMS`` programs, independent of the GPU model so that
rounding does not depend on it).  A program walks its segment tile by tile with the state
``h`` ([BLOCK_D, N], fp32) in registers; inside a tile, for each state ``n`` in turn, the
recurrence is a first-order linear scan over the tile, evaluated with
``tl.associative_scan`` on the pairs ``(exp(delta A), delta u B)`` (composition of affine
maps: products of decays, never quotients, so strong decays need no special path).  The
output accumulates ``sum_n C h`` over the state loop; all tensors are 2-D [BLOCK_D, BLOCK_T]
(coalesced along the sequence), the loop over ``n`` reuses the loaded tile.

With ``S > 1`` a *summary* pass first computes, for every segment whose state another segment
needs, its total ``sum delta`` and its far-end state from a zero start (``sum_t exp(A (Delta_end
- Delta_t)) B_t x_t``: one exponential per element, a cumulative sum of delta and a reduction,
no scan); the scan pass then combines the summaries of the segments before it (in scan order)
into its entering state (``O(S)`` tiny loads; ``S <= MAX_SEGMENTS``).  DRAM traffic of the
unfused scan: u and delta read once (twice with ``S > 1``), y written once; B and C are shared by
all channel blocks (L2).  Fused: the map and x_dbl read once per direction (twice with
``S > 1``), the (B, 4, D, L) fp32 buffer written once and read by the merge.  Exponentials (the
MUFU-bound part): one per (channel, state, token) in the scan pass, one more in the summary pass.

Backward (unfused entry point): the forward pass saves the state entering every tile
((b, channels, tiles, N), 1/BLOCK_T of the state history).  The adjoint ``lam_t = C_t g_t +
exp(delta_{t+1} A) lam_{t+1}`` runs right to left with the same two-level decomposition
(segment summaries of the decayed adjoint ``exp(delta A) lam`` at each segment start, then a
scan pass that walks its tiles backwards, recomputes the forward states of the tile from the
saved entering state, and forms ``du, ddelta`` per element, ``dB, dC`` per channel block
(summed over blocks on the host) and ``dA, dD`` per segment (summed on the host); ``ddelta_bias``
is the sum of ``ddelta``).  With ``h_t - delta_t u_t B_t = exp(delta_t A) h_{t-1}`` no shifted
state is needed; the shifted decay ``exp(delta_{t+1} A)`` is recomputed from a shifted load.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (used by the tests).  The interpreter
evaluates a scan with a user combine function one element at a time; when it is active this
module installs an equivalent vectorised (Hillis-Steele) evaluation of such scans
(:func:`_install_interpreter_scan`), which changes nothing on a GPU.

Over 400 lines: one operator's kernels (forward, backward, the fused cross-scan/merge) and their
host-side wrappers, which share the segment plan and the notation above.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton_common import INTERPRET
from ._triton_common import acc_types as _acc
from ._triton_common import check_device as _check_device
from ._triton_common import next_pow2 as _next_pow2
from ._triton_common import quiet as _quiet
from .selective_scan_ref import LOG2E, check_scan_shapes

_LOG2E = tl.constexpr(LOG2E)  # globals used inside kernels must be constexpr
#: segments per sequence at most (the scan pass combines the summaries of the segments before it)
MAX_SEGMENTS = 32
#: programs a launch aims at (fixed, not per GPU: results then do not depend on the GPU model)
TARGET_PROGRAMS = 1024


# --------------------------------------------------------------------------------------------
# interpreter support: vectorised scans with user combine functions
# --------------------------------------------------------------------------------------------


def _install_interpreter_scan() -> None:
    """Make the interpreter evaluate ``tl.associative_scan`` with a user combine function in
    log2(n) vectorised steps (Hillis-Steele) instead of once per element.

    Only used under ``TRITON_INTERPRET=1``; the result is the same scan (the combine function is
    associative; only the bracketing of the rounding differs, as it does on a GPU).  Falls back
    to triton's own evaluation if its interpreter internals are not as expected.
    """
    try:
        from triton.runtime import interpreter as itp

        scan_ops = itp.ScanOps
        original = scan_ops.generic_scan
    except (ImportError, AttributeError):  # pragma: no cover - other triton versions
        return
    if getattr(scan_ops, "_lalic_vectorised", False):
        return
    import numpy as np

    def vectorised(self, inputs):
        data = [np.array(arg.handle.data, copy=True) for arg in inputs]
        ax = self.axis
        n = data[0].shape[ax]
        k = 1
        while k < n:
            # block shapes must stay powers of two: combine every element with the one k before it
            # (rolled; the first k results are discarded)
            head = (slice(None),) * ax + (slice(0, k),)
            prev = [self.to_tensor(np.roll(d, k, axis=ax), arg.dtype) for d, arg in zip(data, inputs)]
            cur = [self.to_tensor(d, arg.dtype) for d, arg in zip(data, inputs)]
            with np.errstate(all="ignore"):
                res = self.combine_fn.fn(*prev, *cur)
            res = res if isinstance(res, tuple) else (res,)
            new = []
            for d, r in zip(data, res):
                nd = np.array(np.broadcast_to(r.handle.data if isinstance(r, tl.core.tensor) else r, d.shape), dtype=d.dtype)
                nd[head] = d[head]
                new.append(nd)
            data = new
            k *= 2
        return [self.to_tensor(d, arg.dtype) for d, arg in zip(data, inputs)]

    def generic_scan(self, inputs):
        try:
            return vectorised(self, inputs)
        except Exception:  # noqa: BLE001 - fall back to the interpreter's own loop
            return original(self, inputs)

    scan_ops.generic_scan = generic_scan
    scan_ops._lalic_vectorised = True


if INTERPRET:
    _install_interpreter_scan()


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------

# tl.sum / tl.cumsum are jit wrappers (a nested jit call costs milliseconds in the
# interpreter); tl.reduce / tl.associative_scan with triton's own combine function compile to
# the same code and hit the interpreter's numpy fast paths.
try:
    from triton.language.standard import _sum_combine as _ADD
except ImportError:  # pragma: no cover - other triton versions

    @triton.jit
    def _ADD(a, b):
        return a + b


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """Compose ``h -> a1 h + b1`` (earlier in scan order) with ``h -> a2 h + b2`` (later)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(r):
    """``log1p(exp(r))`` (``r`` if ``r > 20``, as in the CUDA kernel), with an accurate log1p."""
    e = tl.exp(tl.minimum(r, 20.0))
    v = 1.0 + e
    dv = v - 1.0
    lp = tl.where(dv == 0.0, e, tl.log(v) * (e / tl.where(dv == 0.0, 1.0, dv)))
    return tl.where(r > 20.0, r, lp)


@triton.jit
def _col_major_to_row_major(m, H, W):
    """Row-major position of element ``m`` of the column-major (column scan) order of an H x W map."""
    return (m % H) * W + m // H


@triton.jit
def _load_tile(u_ptr, dl_ptr, w_ptr, bias_ptr, xb_ptr, u_row, dl_row, w_row, c, pos, m2, tmask, dmask, R, sx_r,
               ACC: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """u and delta (bias, softplus, zero outside the tile) of one tile: ([BLOCK_D, BLOCK_T]) x 2.

    Unfused: delta is loaded.  Fused: ``delta = W_k @ x_dbl[k, :R]`` (``xb_ptr`` points at
    x_dbl[b, k, 0, 0], ``w_row`` at dt_projs_weight[k, d, 0]).
    """
    uu = tl.load(u_ptr + u_row[:, None] + pos[None, :], mask=m2, other=0.0).to(ACC)
    if FUSED:
        dl = tl.zeros([BLOCK_D, BLOCK_T], dtype=ACC)
        for r in range(0, R):
            wr = tl.load(w_ptr + w_row + r, mask=dmask, other=0.0).to(ACC)
            xr = tl.load(xb_ptr + r * sx_r + pos, mask=tmask, other=0.0).to(ACC)
            dl += wr[:, None] * xr[None, :]
    else:
        dl = tl.load(dl_ptr + dl_row[:, None] + pos[None, :], mask=m2, other=0.0).to(ACC)
    if HAS_BIAS:
        dl += tl.load(bias_ptr + c, mask=dmask, other=0.0).to(ACC)[:, None]
    if SOFTPLUS:
        dl = _softplus(dl)
    dl = tl.where(m2, dl, 0.0)
    return uu, dl


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
# Program ids: channel block fastest (programs that share B, C tiles run together), then the
# direction / group k, the segment, the batch.
#
# Every program scans a contiguous range of its source sequence in memory order ("m").  The
# unfused scan: m is the token index.  Fused: direction k reads the map in row-major order
# (k = 0, 2) or in column-major order (k = 1, 3; GATHER: row-major position (m % H) W + m // H
# of x, else the transposed copy xT); directions 2 and 3 run right to left (``rev``), so they
# need no reversed copies either: their segments are combined from the right, their tiles are
# walked backwards and scanned with ``reverse=True``.


@triton.jit(do_not_specialize=["Dk", "H", "W", "R", "S", "NSEG", "SEGT", "NCB", "NT"])
def _fwd_summary_kernel(
    u_ptr, uT_ptr, dl_ptr, A_ptr, B_ptr, bias_ptr, w_ptr, hsum_ptr, dsum_ptr,
    L, Dk, K, H, W, R, S, NSEG, SEGT, NCB, NT,
    su_b, su_c, sd_b, sd_c, sB_b, sB_k, sB_n,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
    FUSED: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Summaries of the segments whose state another segment needs (NSEG = S - 1 per sequence):
    the sum of delta and the state at the segment's far end from a zero state at its near end.

    Left-to-right scans: segments 0 .. S-2, ``sum_t exp(A (Delta_end - Delta_t)) B_t x_t``;
    right-to-left scans: segments 1 .. S-1, ``sum_t exp(A (Delta_t - delta_t)) B_t x_t``
    (Delta_t: sum of delta from the segment's start to t inclusive).
    """
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % NCB
    rest = pid // NCB
    k = rest % K
    rest = rest // K
    sq = rest % NSEG
    b = rest // NSEG
    d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < Dk
    c = k * Dk + d
    nidx = tl.arange(0, NP)  # states, padded to a power of two
    m_dn = dmask[:, None] & (nidx < N)[None, :]
    ar = tl.arange(0, BLOCK_T)
    last = ar == BLOCK_T - 1
    src = u_ptr
    if FUSED:
        rev = k >= 2
        col = (k % 2) == 1
        s = sq + rev.to(tl.int64)
        u_row = b * su_b + d * su_c
        if not GATHER:
            if col:
                src = uT_ptr
    else:
        rev = False
        s = sq
        u_row = b * su_b + c * su_c
    dl_row = b * sd_b + c * sd_c
    w_row = c * R
    xb_ptr = B_ptr + b * sB_b + k * sB_k  # fused: x_dbl[b, k]; unfused: B[b, k]
    Bn_base = xb_ptr
    if FUSED:  # rows [dt (R), B (N), C (N)] of x_dbl
        Bn_base += R * sB_n
    h = tl.zeros([BLOCK_D, NP], dtype=ACC)
    before = tl.zeros([BLOCK_D], dtype=ACC)
    SEG = SEGT * BLOCK_T  # tokens per segment
    s0 = s * SEG
    s1 = tl.minimum(s0 + SEG, L)
    for t0 in range(s0, s1, BLOCK_T):
        t0 = tl.multiple_of(t0, BLOCK_T)  # segments are whole tiles
        m = t0 + ar
        tmask = m < s1
        m2 = dmask[:, None] & tmask[None, :]
        pos = m
        if FUSED:
            if GATHER:
                pos = tl.where(col, _col_major_to_row_major(m, H, W), m)
        uu, dl = _load_tile(src, dl_ptr, w_ptr, bias_ptr, xb_ptr, u_row, dl_row, w_row, c, pos, m2, tmask, dmask,
                            R, sB_n, ACC, FUSED, HAS_BIAS, SOFTPLUS, BLOCK_D, BLOCK_T)
        x = dl * uu
        cum = tl.associative_scan(dl, 1, _ADD)
        tot = tl.reduce(tl.where(last[None, :], cum, 0.0), 1, _ADD)
        if rev:  # decay from the segment start to t, token t excluded
            ex = before[:, None] + (cum - dl)
        else:  # decay from t to the tile end, token t excluded
            ex = tl.maximum(tot[:, None] - cum, 0.0)
        for n in range(0, N):
            a2 = tl.load(A_ptr + c * N + n, mask=dmask, other=0.0).to(ACC) * _LOG2E
            bn = tl.load(Bn_base + n * sB_n + pos, mask=tmask, other=0.0).to(ACC)
            contrib = tl.reduce(tl.exp2(ex * a2[:, None]) * x * bn[None, :], 1, _ADD)
            sel = nidx[None, :] == n  # column n of the [BLOCK_D, N] state (inline: jit calls are slow when interpreted)
            hn = tl.reduce(tl.where(sel, h, 0.0), 1, _ADD)
            if not rev:
                hn = tl.exp2(tot * a2) * hn
            h = tl.where(sel, (hn + contrib)[:, None], h)
        before += tot
    o = (b * (K * Dk) + c) * NSEG + sq
    tl.store(dsum_ptr + o, before, mask=dmask)
    tl.store(hsum_ptr + o[:, None] * N + nidx[None, :], h, mask=m_dn)


@triton.jit(do_not_specialize=["Dk", "H", "W", "R", "S", "NSEG", "SEGT", "NCB", "NT"])
def _fwd_scan_kernel(
    u_ptr, uT_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, w_ptr, y_ptr, hsum_ptr, dsum_ptr, hs_ptr,
    L, Dk, K, H, W, R, S, NSEG, SEGT, NCB, NT,
    su_b, su_c, sd_b, sd_c, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sy_b, sy_c,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
    FUSED: tl.constexpr, GATHER: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr,
):
    """y of one segment; the entering state combines the summaries of the segments before it
    (in scan order).  STORE_STATES (unfused): also the state entering every tile."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % NCB
    rest = pid // NCB
    k = rest % K
    rest = rest // K
    s = rest % S
    b = rest // S
    d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < Dk
    c = k * Dk + d
    nidx = tl.arange(0, NP)  # states, padded to a power of two
    m_dn = dmask[:, None] & (nidx < N)[None, :]
    ar = tl.arange(0, BLOCK_T)
    src = u_ptr
    if FUSED:
        rev = k >= 2
        col = (k % 2) == 1
        u_row = b * su_b + d * su_c
        if not GATHER:
            if col:
                src = uT_ptr
    else:
        rev = False
        u_row = b * su_b + c * su_c
    edge = tl.where(rev, 0, BLOCK_T - 1)  # the column that holds the state leaving a tile
    dl_row = b * sd_b + c * sd_c
    y_row = b * sy_b + c * sy_c
    w_row = c * R
    xb_ptr = B_ptr + b * sB_b + k * sB_k
    Bn_base = xb_ptr
    Cn_base = C_ptr + b * sC_b + k * sC_k
    if FUSED:  # rows [dt (R), B (N), C (N)] of x_dbl
        Bn_base += R * sB_n
        Cn_base += (R + N) * sC_n

    # state entering the segment: the summaries of the segments before it in scan order
    h = tl.zeros([BLOCK_D, NP], dtype=ACC)
    if S > 1:
        A2 = tl.load(A_ptr + c[:, None] * N + nidx[None, :], mask=m_dn, other=0.0).to(ACC) * _LOG2E
        sb = (b * (K * Dk) + c) * NSEG
        nprev = tl.where(rev, S - 1 - s, s)
        for jj in range(0, nprev):
            j = tl.where(rev, S - 2 - jj, jj)
            dj = tl.load(dsum_ptr + sb + j, mask=dmask, other=0.0)
            hj = tl.load(hsum_ptr + (sb + j)[:, None] * N + nidx[None, :], mask=m_dn, other=0.0)
            h = tl.exp2(A2 * dj[:, None]) * h + hj
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=dmask, other=0.0).to(ACC)
    SEG = SEGT * BLOCK_T  # tokens per segment
    s0 = s * SEG
    s1 = tl.minimum(s0 + SEG, L)
    ntiles = (s1 - s0 + BLOCK_T - 1) // BLOCK_T
    for it in range(0, ntiles):
        t0 = tl.multiple_of(s0 + tl.where(rev, ntiles - 1 - it, it) * BLOCK_T, BLOCK_T)
        m = t0 + ar
        tmask = m < s1
        m2 = dmask[:, None] & tmask[None, :]
        pos = m
        if FUSED:
            if GATHER:
                pos = tl.where(col, _col_major_to_row_major(m, H, W), m)
        if STORE_STATES:  # the state entering this tile, for the backward pass
            tile = t0 // BLOCK_T
            tl.store(hs_ptr + ((b * (K * Dk) + c)[:, None] * NT + tile) * N + nidx[None, :], h, mask=m_dn)
        uu, dl = _load_tile(src, dl_ptr, w_ptr, bias_ptr, xb_ptr, u_row, dl_row, w_row, c, pos, m2, tmask, dmask,
                            R, sB_n, ACC, FUSED, HAS_BIAS, SOFTPLUS, BLOCK_D, BLOCK_T)
        x = dl * uu
        if HAS_D:
            y = Dv[:, None] * uu
        else:
            y = tl.zeros([BLOCK_D, BLOCK_T], dtype=ACC)
        for n in range(0, N):
            a2 = tl.load(A_ptr + c * N + n, mask=dmask, other=0.0).to(ACC) * _LOG2E
            bn = tl.load(Bn_base + n * sB_n + pos, mask=tmask, other=0.0).to(ACC)
            cn = tl.load(Cn_base + n * sC_n + pos, mask=tmask, other=0.0).to(ACC)
            da = tl.exp2(dl * a2[:, None])
            if rev:
                pa, hl = tl.associative_scan((da, x * bn[None, :]), 1, _affine_combine, reverse=True)
            else:
                pa, hl = tl.associative_scan((da, x * bn[None, :]), 1, _affine_combine)
            sel = nidx[None, :] == n  # column n of the [BLOCK_D, N] state
            hn = hl + pa * tl.reduce(tl.where(sel, h, 0.0), 1, _ADD)[:, None]
            y += hn * cn[None, :]
            h_out = tl.reduce(tl.where(ar[None, :] == edge, hn, 0.0), 1, _ADD)
            h = tl.where(sel, h_out[:, None], h)
        tl.store(y_ptr + y_row[:, None] + pos[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _merge4_kernel(y4_ptr, out_ptr, D, H, W, TRANSPOSED: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_W: tl.constexpr):
    """out = (y0 + y2) + T(y1 + y3): the official CrossMerge order, (B, 4, D, L) -> (B, D, L).

    y0, y2 are in row-major order; y1, y3 in column-major order (TRANSPOSED: read as [W, H]
    tiles and transposed in registers) or already at row-major positions.
    """
    pid = tl.program_id(0).to(tl.int64)
    nw = (W + BLOCK_W - 1) // BLOCK_W
    nh = (H + BLOCK_H - 1) // BLOCK_H
    tw = pid % nw
    th = (pid // nw) % nh
    bd = pid // (nw * nh)  # b * D + d
    L = H * W
    hh = th * BLOCK_H + tl.arange(0, BLOCK_H)
    ww = tw * BLOCK_W + tl.arange(0, BLOCK_W)
    mrow = (hh < H)[:, None] & (ww < W)[None, :]
    rm = hh[:, None] * W + ww[None, :]
    base = (bd // D) * (4 * D * L) + (bd % D) * L
    out = tl.load(y4_ptr + base + rm, mask=mrow, other=0.0) + tl.load(y4_ptr + base + 2 * D * L + rm, mask=mrow, other=0.0)
    if TRANSPOSED:
        mcol = (ww < W)[:, None] & (hh < H)[None, :]
        cm = ww[:, None] * H + hh[None, :]
        t = tl.load(y4_ptr + base + D * L + cm, mask=mcol, other=0.0) + tl.load(y4_ptr + base + 3 * D * L + cm, mask=mcol, other=0.0)
        out = out + tl.trans(t)
    else:
        out = out + (tl.load(y4_ptr + base + D * L + rm, mask=mrow, other=0.0)
                     + tl.load(y4_ptr + base + 3 * D * L + rm, mask=mrow, other=0.0))
    tl.store(out_ptr + bd * L + rm, out, mask=mrow)

# --------------------------------------------------------------------------------------------
# backward (unfused entry point)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["Dk", "S", "SEGT", "NCB"])
def _bwd_summary_kernel(
    dl_ptr, g_ptr, A_ptr, C_ptr, bias_ptr, msum_ptr, dsum_ptr,
    L, Dk, K, S, SEGT, NCB,
    sd_b, sd_c, sC_b, sC_k, sC_n,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Segments 1 .. S-1: sum of delta and the decayed adjoint at the segment start from a zero
    right boundary, ``sum_t exp(A Delta_t) C_t g_t`` (Delta_t: sum of delta from the segment
    start to t inclusive)."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % NCB
    rest = pid // NCB
    k = rest % K
    rest = rest // K
    s = rest % (S - 1) + 1
    b = rest // (S - 1)
    d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < Dk
    c = k * Dk + d
    nidx = tl.arange(0, NP)  # states, padded to a power of two
    m_dn = dmask[:, None] & (nidx < N)[None, :]
    ar = tl.arange(0, BLOCK_T)
    last = ar == BLOCK_T - 1
    dl_row = b * sd_b + c * sd_c
    Cn_base = C_ptr + b * sC_b + k * sC_k
    mu = tl.zeros([BLOCK_D, NP], dtype=ACC)
    before = tl.zeros([BLOCK_D], dtype=ACC)
    SEG = SEGT * BLOCK_T  # tokens per segment
    s0 = s * SEG
    s1 = tl.minimum(s0 + SEG, L)
    for t0 in range(s0, s1, BLOCK_T):
        t0 = tl.multiple_of(t0, BLOCK_T)  # segments are whole tiles
        l = t0 + ar
        tmask = l < s1
        m2 = dmask[:, None] & tmask[None, :]
        dl = tl.load(dl_ptr + dl_row[:, None] + l[None, :], mask=m2, other=0.0).to(ACC)
        if HAS_BIAS:
            dl += tl.load(bias_ptr + c, mask=dmask, other=0.0).to(ACC)[:, None]
        if SOFTPLUS:
            dl = _softplus(dl)
        dl = tl.where(m2, dl, 0.0)
        gg = tl.load(g_ptr + dl_row[:, None] + l[None, :], mask=m2, other=0.0).to(ACC)
        cum = before[:, None] + tl.associative_scan(dl, 1, _ADD)
        for n in range(0, N):
            a2 = tl.load(A_ptr + c * N + n, mask=dmask, other=0.0).to(ACC) * _LOG2E
            cn = tl.load(Cn_base + n * sC_n + l, mask=tmask, other=0.0).to(ACC)
            contrib = tl.reduce(tl.exp2(cum * a2[:, None]) * gg * cn[None, :], 1, _ADD)
            mu = tl.where(nidx[None, :] == n, mu + contrib[:, None], mu)
        before = tl.reduce(tl.where(last[None, :], cum, 0.0), 1, _ADD)
    o = (b * (K * Dk) + c) * S + s
    tl.store(dsum_ptr + o, before, mask=dmask)
    tl.store(msum_ptr + o[:, None] * N + nidx[None, :], mu, mask=m_dn)


@triton.jit(do_not_specialize=["Dk", "S", "SEGT", "NCB", "NT", "NB"])
def _bwd_scan_kernel(
    u_ptr, dl_ptr, g_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, hs_ptr, msum_ptr, dsum_ptr,
    du_ptr, ddl_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr,
    L, Dk, K, S, SEGT, NCB, NT, NB,
    su_b, su_c, sd_b, sd_c, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Gradients of one segment, tiles right to left.

    Writes du, ddelta (w.r.t. the raw delta) per element; dB, dC summed over this program's
    channels into (NCB, b, K, N, L) partials; dA (b, S, KD, N) and dD (b, S, KD) per segment.
    """
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % NCB
    rest = pid // NCB
    k = rest % K
    rest = rest // K
    s = rest % S
    b = rest // S
    KD = K * Dk
    d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < Dk
    c = k * Dk + d
    nidx = tl.arange(0, NP)  # states, padded to a power of two
    m_dn = dmask[:, None] & (nidx < N)[None, :]
    ar = tl.arange(0, BLOCK_T)
    first = ar == 0
    u_row = b * su_b + c * su_c
    dl_row = b * sd_b + c * sd_c
    Bn_base = B_ptr + b * sB_b + k * sB_k
    Cn_base = C_ptr + b * sC_b + k * sC_k
    part = ((cb * NB + b) * K + k) * N * L  # dB / dC partials of this channel block

    # decayed adjoint entering the segment from the right: segments S-1 .. s+1
    A2 = tl.load(A_ptr + c[:, None] * N + nidx[None, :], mask=m_dn, other=0.0).to(ACC) * _LOG2E
    nu = tl.zeros([BLOCK_D, NP], dtype=ACC)
    sb = (b * KD + c) * S
    for jj in range(0, S - 1 - s):
        j = S - 1 - jj
        dj = tl.load(dsum_ptr + sb + j, mask=dmask, other=0.0)
        mj = tl.load(msum_ptr + (sb + j)[:, None] * N + nidx[None, :], mask=m_dn, other=0.0)
        nu = tl.exp2(A2 * dj[:, None]) * nu + mj
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=dmask, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=dmask, other=0.0).to(ACC)
    dA = tl.zeros([BLOCK_D, NP], dtype=ACC)
    dD = tl.zeros([BLOCK_D], dtype=ACC)
    SEG = SEGT * BLOCK_T  # tokens per segment
    s0 = s * SEG
    s1 = tl.minimum(s0 + SEG, L)
    ntiles = (s1 - s0 + BLOCK_T - 1) // BLOCK_T
    for it in range(0, ntiles):
        t0 = tl.multiple_of(s0 + (ntiles - 1 - it) * BLOCK_T, BLOCK_T)
        l = t0 + ar
        tmask = l < s1
        m2 = dmask[:, None] & tmask[None, :]
        # shifted by one token inside the tile (the last column continues with the carried nu)
        mnext = m2 & (ar < BLOCK_T - 1)[None, :] & ((l + 1) < s1)[None, :]
        uu = tl.load(u_ptr + u_row[:, None] + l[None, :], mask=m2, other=0.0).to(ACC)
        raw = tl.load(dl_ptr + dl_row[:, None] + l[None, :], mask=m2, other=0.0).to(ACC)
        rawn = tl.load(dl_ptr + dl_row[:, None] + (l + 1)[None, :], mask=mnext, other=0.0).to(ACC)
        if HAS_BIAS:
            raw += bias[:, None]
            rawn += bias[:, None]
        if SOFTPLUS:
            dl = _softplus(raw)
            dln = _softplus(rawn)
        else:
            dl = raw
            dln = rawn
        dl = tl.where(m2, dl, 0.0)
        dln = tl.where(mnext, dln, 0.0)
        gg = tl.load(g_ptr + dl_row[:, None] + l[None, :], mask=m2, other=0.0).to(ACC)
        x = dl * uu
        tile = t0 // BLOCK_T
        h0 = tl.load(hs_ptr + ((b * KD + c)[:, None] * NT + tile) * N + nidx[None, :], mask=m_dn, other=0.0)
        s_du = tl.zeros([BLOCK_D, BLOCK_T], dtype=ACC)  # sum_n lam B
        s_dd = tl.zeros([BLOCK_D, BLOCK_T], dtype=ACC)  # sum_n lam (u B + A (h - delta u B))
        for n in range(0, N):
            an = tl.load(A_ptr + c * N + n, mask=dmask, other=0.0).to(ACC)
            a2 = an * _LOG2E
            bn = tl.load(Bn_base + n * sB_n + l, mask=tmask, other=0.0).to(ACC)
            cn = tl.load(Cn_base + n * sC_n + l, mask=tmask, other=0.0).to(ACC)
            da = tl.exp2(dl * a2[:, None])
            bb = x * bn[None, :]
            pa, hl = tl.associative_scan((da, bb), 1, _affine_combine)
            sel = nidx[None, :] == n  # column n of the [BLOCK_D, N] states
            hn = hl + pa * tl.reduce(tl.where(sel, h0, 0.0), 1, _ADD)[:, None]
            dan = tl.exp2(dln * a2[:, None])
            pl, ll = tl.associative_scan((dan, gg * cn[None, :]), 1, _affine_combine, reverse=True)
            lam = ll + pl * tl.reduce(tl.where(sel, nu, 0.0), 1, _ADD)[:, None]
            ah = hn - bb  # exp(delta A) h_{t-1}
            s_du += lam * bn[None, :]
            s_dd += lam * (uu * bn[None, :] + an[:, None] * ah)
            dA = tl.where(sel, dA + tl.reduce(lam * dl * ah, 1, _ADD)[:, None], dA)
            tl.store(dB_ptr + part + n * L + l, tl.reduce(lam * x, 0, _ADD), mask=tmask)
            tl.store(dC_ptr + part + n * L + l, tl.reduce(gg * hn, 0, _ADD), mask=tmask)
            nu = tl.where(sel, tl.reduce(tl.where(first[None, :], da * lam, 0.0), 1, _ADD)[:, None], nu)
        du = dl * s_du
        if HAS_D:
            du += Dv[:, None] * gg
            dD += tl.reduce(gg * uu, 1, _ADD)
        if SOFTPLUS:
            sig = 1.0 / (1.0 + tl.exp(-raw))
            s_dd = s_dd * tl.where(raw > 20.0, 1.0, sig)
        tl.store(du_ptr + dl_row[:, None] + l[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddl_ptr + dl_row[:, None] + l[None, :], s_dd.to(ddl_ptr.dtype.element_ty), mask=m2)
    o = (b * S + s) * KD + c
    tl.store(dA_ptr + o[:, None] * N + nidx[None, :], dA, mask=m_dn)
    tl.store(dD_ptr + o, dD, mask=dmask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


class Plan:
    """How a scan is cut: ``block_d`` channels x ``block_t`` tokens per tile, ``segments``
    segments per sequence (default: about ``target_programs`` programs in all), warps.

    ``bwd_*``: the same for the backward pass (its tiles are the forward's: ``block_t``).
    """

    def __init__(self, b, K, Dk, L, device, block_d=None, block_t=None, segments=None, num_warps=None,
                 bwd_block_d=None, bwd_segments=None, bwd_num_warps=None, target_programs=None):
        self.b, self.K, self.Dk, self.L = b, K, Dk, L
        interp = INTERPRET or device.type != "cuda"
        if block_d is None:
            block_d = 32 if interp else 16
        if block_t is None:
            block_t = 64
        self.block_d = max(1, min(_next_pow2(block_d), _next_pow2(Dk)))
        self.block_t = max(2, _next_pow2(block_t))
        self.num_warps = num_warps or 4
        self.ncb = -(-Dk // self.block_d)
        self.nt = -(-L // self.block_t)  # tiles
        # the interpreter runs programs one after the other: one segment unless asked for more
        target = target_programs or (1 if interp else TARGET_PROGRAMS)
        base = b * K * self.ncb
        if segments is None:
            segments = -(-target // max(1, base))
        self.S, self.seg = self._cut(segments)
        if bwd_block_d is None:  # the backward tile holds about twice as many live values
            bwd_block_d = self.block_d if interp else max(1, self.block_d // 2)
        self.bwd_block_d = max(1, min(_next_pow2(bwd_block_d), _next_pow2(Dk)))
        self.bwd_ncb = -(-Dk // self.bwd_block_d)
        if bwd_segments is None:
            bwd_segments = -(-target // max(1, b * K * self.bwd_ncb))
        self.bwd_S, self.bwd_seg = self._cut(bwd_segments)
        self.bwd_num_warps = bwd_num_warps or 4

    def _cut(self, segments):
        """(segments, tokens per segment): whole tiles per segment, every segment non-empty."""
        S = max(1, min(int(segments), MAX_SEGMENTS, self.nt))
        tiles = -(-self.nt // S)
        return -(-self.nt // tiles), tiles * self.block_t

    def __repr__(self):
        return (f"Plan(b={self.b}, K={self.K}, Dk={self.Dk}, L={self.L}, block_d={self.block_d}, "
                f"block_t={self.block_t}, S={self.S}, seg={self.seg}, programs={self.b * self.K * self.ncb * self.S}, "
                f"bwd_block_d={self.bwd_block_d}, bwd_S={self.bwd_S})")


def _forward(u, delta, A, B, C, D, bias, softplus, plan: Plan, store_states: bool):
    b, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    Dk = KD // K
    acc_tl, acc_t = _acc(u.dtype)
    dev = u.device
    y = torch.empty_like(u)
    hs = torch.empty((b, KD, plan.nt, N), device=dev, dtype=acc_t) if store_states else y
    S = plan.S
    if S > 1:
        hsum = torch.empty((b, KD, S - 1, N), device=dev, dtype=acc_t)
        dsum = torch.empty((b, KD, S - 1), device=dev, dtype=acc_t)
    else:
        hsum = dsum = y  # never read
    Dp = D if D is not None else A
    bp = bias if bias is not None else A
    common = dict(N=N, NP=_next_pow2(N), BLOCK_D=plan.block_d, BLOCK_T=plan.block_t, ACC=acc_tl, FUSED=False, GATHER=False,
                  HAS_BIAS=bias is not None, SOFTPLUS=bool(softplus), num_warps=plan.num_warps)
    with _quiet():
        if S > 1:
            _fwd_summary_kernel[(b * K * plan.ncb * (S - 1),)](
                u, u, delta, A, B, bp, A, hsum, dsum,
                L, Dk, K, 1, 1, 0, S, S - 1, plan.seg // plan.block_t, plan.ncb, plan.nt,
                u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1), B.stride(2),
                **common)
        _fwd_scan_kernel[(b * K * plan.ncb * S,)](
            u, u, delta, A, B, C, Dp, bp, A, y, hsum, dsum, hs,
            L, Dk, K, 1, 1, 0, S, max(1, S - 1), plan.seg // plan.block_t, plan.ncb, plan.nt,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1), B.stride(2),
            C.stride(0), C.stride(1), C.stride(2), y.stride(0), y.stride(1),
            HAS_D=D is not None, STORE_STATES=store_states, **common)
    return y, (hs if store_states else None)


def _backward(u, delta, A, B, C, D, bias, softplus, hs, g, plan: Plan):
    b, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    Dk = KD // K
    acc_tl, acc_t = _acc(u.dtype)
    dev = u.device
    S, ncb, bd = plan.bwd_S, plan.bwd_ncb, plan.bwd_block_d
    du = torch.empty_like(u)
    ddl = torch.empty(delta.shape, device=dev, dtype=acc_t)
    dB = torch.empty((ncb, b, K, N, L), device=dev, dtype=acc_t)
    dC = torch.empty((ncb, b, K, N, L), device=dev, dtype=acc_t)
    dA = torch.empty((b, S, KD, N), device=dev, dtype=acc_t)
    dD = torch.empty((b, S, KD), device=dev, dtype=acc_t)
    if S > 1:
        msum = torch.empty((b, KD, S, N), device=dev, dtype=acc_t)
        dsum = torch.empty((b, KD, S), device=dev, dtype=acc_t)
    else:
        msum = dsum = dA  # never read
    Dp = D if D is not None else A
    bp = bias if bias is not None else A
    common = dict(N=N, NP=_next_pow2(N), BLOCK_D=bd, BLOCK_T=plan.block_t, ACC=acc_tl, HAS_BIAS=bias is not None,
                  SOFTPLUS=bool(softplus), num_warps=plan.bwd_num_warps)
    with _quiet():
        if S > 1:
            _bwd_summary_kernel[(b * K * ncb * (S - 1),)](
                delta, g, A, C, bp, msum, dsum, L, Dk, K, S, plan.bwd_seg // plan.block_t, ncb,
                delta.stride(0), delta.stride(1), C.stride(0), C.stride(1), C.stride(2), **common)
        _bwd_scan_kernel[(b * K * ncb * S,)](
            u, delta, g, A, B, C, Dp, bp, hs, msum, dsum, du, ddl, dB, dC, dA, dD,
            L, Dk, K, S, plan.bwd_seg // plan.block_t, ncb, plan.nt, b,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1), B.stride(2),
            C.stride(0), C.stride(1), C.stride(2), HAS_D=D is not None, **common)
    return du, ddl, dA.sum(dim=(0, 1)), dB.sum(dim=0), dC.sum(dim=0), dD.sum(dim=(0, 1))


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, bias, softplus, plan):
        need = any(ctx.needs_input_grad[:7])
        y, hs = _forward(u, delta, A, B, C, D, bias, softplus, plan, store_states=need)
        if need:
            ctx.save_for_backward(u, delta, A, B, C, D, bias, hs)
            ctx.softplus, ctx.plan = softplus, plan
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, D, bias, hs = ctx.saved_tensors
        du, ddl, dA, dB, dC, dD = _backward(u, delta, A, B, C, D, bias, ctx.softplus, hs, gy.contiguous(), ctx.plan)
        nd = ctx.needs_input_grad
        return (du if nd[0] else None,
                ddl.to(delta.dtype) if nd[1] else None,
                dA.to(A.dtype) if nd[2] else None,
                dB.to(B.dtype) if nd[3] else None,
                dC.to(C.dtype) if nd[4] else None,
                dD.to(D.dtype) if D is not None and nd[5] else None,
                ddl.sum(dim=(0, 2)).to(bias.dtype) if bias is not None and nd[6] else None,
                None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, **plan_kw):
    """Selective scan, same signature and semantics as ``selective_scan_reference`` (differentiable).

    ``u, delta``: (b, K*Dk, L); ``A``: (K*Dk, N); ``B, C``: (b, K, N, L) (channel c uses group
    c // Dk) or (b, N, L); ``D, delta_bias``: (K*Dk,) or None.  Returns (b, K*Dk, L) in u's dtype.
    Keyword arguments tune the decomposition (see :class:`Plan`); the result does not depend
    on them beyond rounding.
    """
    B, C, (b, KD, L, N, K) = check_scan_shapes(u, delta, A, B, C)
    if D is not None and D.shape != (KD,):
        raise ValueError(f"D must be ({KD},); got {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (KD,):
        raise ValueError(f"delta_bias must be ({KD},); got {tuple(delta_bias.shape)}")
    _check_device(u, "selective_scan_triton")
    if b == 0 or KD == 0 or L == 0:
        return torch.zeros_like(u)
    plan = Plan(b, K, KD // K, L, u.device, **plan_kw)
    return _SelectiveScanFn.apply(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                                  D.contiguous() if D is not None else None,
                                  delta_bias.contiguous() if delta_bias is not None else None,
                                  bool(delta_softplus), plan)


# --------------------------------------------------------------------------------------------
# fused cross scan / scan / cross merge (inference)
# --------------------------------------------------------------------------------------------


#: how the column-order directions (k = 1, 3) read the map: "transpose" (a transposed copy of x and
#: of their x_dbl rows, so that every direction reads contiguous memory and the merge transposes
#: their output tile by tile) or "gather" (index arithmetic into the NCHW map itself: no copies,
#: strided reads and writes)
COL_MODES = ("transpose", "gather")
#: the default column mode (``LALIC_SCAN_COL_MODE`` overrides it, for benchmarks)
DEFAULT_COL_MODE = os.environ.get("LALIC_SCAN_COL_MODE", "transpose")


def cross_selective_scan_fused(x, x_dbl, dt_projs_weight, A, D=None, delta_bias=None, delta_softplus=True,
                               col_mode: str | None = None, **plan_kw) -> torch.Tensor:
    """SS2D's four-direction scan in one pass over the NCHW map (no gradient).

    ``x``: (B, Dm, H, W) (the SiLU'd depthwise-conv output); ``x_dbl``: (B, 4, R + 2N, H*W) with
    ``x_dbl[:, k] = x_proj_weight[k] @ x.flatten(2)`` at row-major positions, rows [dt (R), B (N),
    C (N)]; ``dt_projs_weight``: (4, Dm, R); ``A``: (4*Dm, N); ``D``, ``delta_bias``: (4*Dm,).

    Returns (B, Dm, H*W) in the compute dtype (float64 for float64 x, else float32), equal up to
    rounding to ``cross_merge(selective_scan(cross_scan(x), dt_projs_weight[k] @ dts, A, Bs, Cs,
    D, delta_bias, delta_softplus))`` with ``dts, Bs, Cs`` the cross-scanned split of x_dbl.
    ``col_mode``: see :data:`COL_MODES` (default :data:`DEFAULT_COL_MODE`).  Keyword arguments
    tune the decomposition (:class:`Plan`).
    """
    col_mode = col_mode or DEFAULT_COL_MODE
    if x.dim() != 4:
        raise ValueError(f"x must be (B, D, H, W); got {tuple(x.shape)}")
    Bt, Dm, H, W = x.shape
    L = H * W
    if dt_projs_weight.dim() != 3 or dt_projs_weight.shape[:2] != (4, Dm):
        raise ValueError(f"dt_projs_weight must be (4, {Dm}, R); got {tuple(dt_projs_weight.shape)}")
    R = dt_projs_weight.shape[2]
    if A.dim() != 2 or A.shape[0] != 4 * Dm:
        raise ValueError(f"A must be ({4 * Dm}, N); got {tuple(A.shape)}")
    N = A.shape[1]
    if x_dbl.shape != (Bt, 4, R + 2 * N, L):
        raise ValueError(f"x_dbl must be ({Bt}, 4, {R + 2 * N}, {L}); got {tuple(x_dbl.shape)}")
    if col_mode not in COL_MODES:
        raise ValueError(f"col_mode must be one of {COL_MODES}; got {col_mode!r}")
    _check_device(x, "cross_selective_scan_fused")
    acc_tl, acc_t = _acc(x.dtype)
    if Bt == 0 or Dm == 0 or L == 0:
        return torch.zeros((Bt, Dm, L), device=x.device, dtype=acc_t)
    gather = col_mode == "gather"
    if gather:  # strided reads: one element per thread along the sequence, warp-wide scans
        plan_kw.setdefault("block_t", 32)
    with torch.no_grad():
        plan = Plan(Bt, 4, Dm, L, x.device, **plan_kw)
        x = x.contiguous()
        if gather:
            xT = x
            xd = x_dbl.contiguous()
        else:
            xT = x.transpose(2, 3).contiguous()  # column scan order, contiguous
            C2 = x_dbl.shape[2]
            xd = torch.empty((Bt, 4, C2, L), device=x.device, dtype=x_dbl.dtype)
            xd[:, 0::2] = x_dbl[:, 0::2]
            xd[:, 1::2] = x_dbl[:, 1::2].reshape(Bt, 2, C2, H, W).transpose(3, 4).reshape(Bt, 2, C2, L)
        w = dt_projs_weight.contiguous()
        A = A.contiguous()
        Dp = D.contiguous() if D is not None else A
        bp = delta_bias.contiguous() if delta_bias is not None else A
        y4 = torch.empty((Bt, 4, Dm, L), device=x.device, dtype=acc_t)
        S = plan.S
        if S > 1:
            hsum = torch.empty((Bt, 4 * Dm, S - 1, N), device=x.device, dtype=acc_t)
            dsum = torch.empty((Bt, 4 * Dm, S - 1), device=x.device, dtype=acc_t)
        else:
            hsum = dsum = y4  # never read
        common = dict(N=N, NP=_next_pow2(N), BLOCK_D=plan.block_d, BLOCK_T=plan.block_t, ACC=acc_tl, FUSED=True, GATHER=gather,
                      HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), num_warps=plan.num_warps)
        sx = (x.stride(0), x.stride(1))
        sdb = (xd.stride(0), xd.stride(1), xd.stride(2))
        with _quiet():
            if S > 1:
                _fwd_summary_kernel[(Bt * 4 * plan.ncb * (S - 1),)](
                    x, xT, x, A, xd, bp, w, hsum, dsum,
                    L, Dm, 4, H, W, R, S, S - 1, plan.seg // plan.block_t, plan.ncb, plan.nt,
                    *sx, 0, 0, *sdb, **common)
            _fwd_scan_kernel[(Bt * 4 * plan.ncb * S,)](
                x, xT, x, A, xd, xd, Dp, bp, w, y4, hsum, dsum, y4,
                L, Dm, 4, H, W, R, S, max(1, S - 1), plan.seg // plan.block_t, plan.ncb, plan.nt,
                *sx, 0, 0, *sdb, *sdb, y4.stride(0), y4.stride(2),
                HAS_D=D is not None, STORE_STATES=False, **common)
            y = torch.empty((Bt, Dm, L), device=x.device, dtype=acc_t)
            bh, bw = min(32, max(2, _next_pow2(H))), min(32, max(2, _next_pow2(W)))
            grid = (Bt * Dm * triton.cdiv(H, bh) * triton.cdiv(W, bw),)
            _merge4_kernel[grid](y4, y, Dm, H, W, TRANSPOSED=not gather, BLOCK_H=bh, BLOCK_W=bw, num_warps=4)
    return y


__all__ = ["selective_scan_triton", "cross_selective_scan_fused", "Plan", "COL_MODES"]
