"""Triton BiWKV: forward and backward of the official LALIC kernel's function.

Computes exactly what :func:`biwkv_ref.biwkv_reference` computes (see that module and
``shared/refvec/README.md`` section 1.1 for the definition): chunk length
``P = ceil(T/32)``, decay ``|t-j|`` across chunks and ``|t-j|-1`` inside one, the residual
term ``(1-e^w) exp(k_j + w(t-j))`` for ``s < j <= t``, self term ``exp(u + k_t)``, and the
``1e-6`` epsilon added in the domain shifted by the kernel's stabiliser ``M_t`` (a constant
for autograd).  Any ``T >= 1``, any ``C``; fp32 / bf16 / fp16 inputs are computed in fp32
(float64 inputs in float64), the output has the dtype of ``k``.

Notation (per batch b and channel; chunk c starts at ``s_c = c P``, ``q = t - s_c`` is the
position inside the chunk):  ``a_j = k_j + w q_j`` and ``b_j = k_j - w q_j``.  For a query t in
chunk c every weight is ``exp(X - w q_t)`` (past: ``X = a_j + w`` inside the chunk,
``a_j - wP(c-m)`` from an earlier chunk m) or ``exp(Y + w q_t)`` (future and residual:
``Y = b_j`` inside the chunk, ``b_j - wP(m-c)`` from a later chunk).  Every partial sum is a
"log-scaled state" ``(m, S_v, S_1)`` = ``sum exp(x_j - m) (v_j, 1)`` whose scale ``m`` is the
exact maximum of its exponents; combining states keeps it exact, which gives the kernel's
stabiliser ``M_t`` for free.

Work decomposition (same for forward and backward, three launches each)
----------------------------------------------------------------------
Each of the ``n <= 32`` chunks is cut into ``S`` segments of ``L`` rows, and channels into
blocks of ``BLOCK_C``.  One program handles one (batch, chunk, segment, channel block) and
walks its segment in tiles of ``[BLOCK_T, BLOCK_C]`` (coalesced along C):

The number of segments per chunk is a function of the problem shape alone (enough for about
:data:`TARGET_PROGRAMS` programs, a constant), not of the GPU's SM count: the split fixes the
order of the floating-point sums, so the rounding of the result does not change with the GPU
model (as in the selective scan's ``Plan``).

1. *summary*: one read of the segment, writes a few log-scaled sums per channel;
2. *combine*: one program per (batch, channel block of ``combine_c``, 1 on a GPU) combines the
   ``n x S`` summaries (chunk totals, the decayed cross-chunk sums as ``[n, n]`` masked
   reductions, exclusive prefix / suffix over the segments of a chunk) into the states that
   enter each segment from the left and from the right, and ``H_c = max_{j >= s_c} b_j``;
3. *output*: reads the segment again, carries the prefix states from tile to tile, and gets the
   in-tile terms from cumulative sums (the part of a segment right of a token is the segment
   total minus the prefix; all those terms are bounded by ``exp(M_t)``, so the subtraction is
   benign, exactly as in the official kernel and the PyTorch reference).

Pass 3 walks the segments in the reverse order of pass 1 so that the data read last by
pass 1 is still in L2 when pass 3 starts.  DRAM traffic per element: forward 2 reads of k, v
(the second partly from L2) and 1 write of y; when a gradient is needed it also writes M_t and
the shifted denominator Z_t (fp32; plus an fp32 copy of y for half-precision inputs).  The
backward reads (grad_y, y, M, Z) twice and k, v once, and writes dk, dv.  The summaries are
``O(B n S C)`` floats (a few per segment and channel), negligible next to that.

Per element the output pass evaluates 5 exponentials (2 in the summary pass), 4 cumulative sums
and 2 running maxima along T (the stabiliser ``M_t`` needs exact prefix maxima).

The backward is the transposed computation: for a key j, ``dv_j = sum_t W'_tj alpha_t`` and
``dk_j = v_j dv_j + sum_t W'_tj beta_t`` with ``W'_tj = W_tj exp(-M_t)``,
``alpha_t = g_t / Z_t``, ``beta_t = -alpha_t y_t`` (``Z_t`` the shifted denominator); the
query side is summarised with exponents ``-M_t +- w q_t``.  ``dw`` needs the distance-weighted
sums ``sum_t |t-j| W'_tj (.)``, carried as first moments in chunk coordinates; ``du`` only
needs the self terms.  ``dw`` and ``du`` are reduced per program and summed over the batch on
the host (deterministic).

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (used by the tests); there the prefix max is
evaluated as a masked reduction because the interpreter's generic scan is very slow.

Over 400 lines: one operator's forward and backward kernels and their host-side plan; the two
passes share the chunk notation above and are checked together against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import INTERPRET
from ._triton_common import acc_types as _acc
from ._triton_common import check_device as _check_device
from ._triton_common import next_pow2 as _next_pow2
from ._triton_common import quiet as _quiet
from .biwkv_ref import EPS, NEG, check_shapes, num_chunks_and_len  # NEG: log(0), finite (NEG - NEG = 0)

_NEG = tl.constexpr(NEG)  # globals used inside kernels must be constexpr (the GPU compiler refuses others)

MAX_SEGMENTS = 16  # segments per chunk (the combine pass is O(n S^2) per channel)
#: programs a launch aims at when choosing the segments per chunk.  Fixed, not read from the GPU:
#: the split decides the order of the floating-point sums, so the result then depends only on the
#: problem shape, never on the GPU model.  528 = 4 programs per SM on the 132 SMs of an H100 /
#: H200, where the tiles were tuned (the plans there are the ones the SM count used to give).
TARGET_PROGRAMS = 528
#: the same under the interpreter (programs run one after the other)
INTERPRET_TARGET_PROGRAMS = 16


# --------------------------------------------------------------------------------------------
# small device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


# tl.sum / tl.max / tl.cumsum are themselves jit functions, and every nested jit call costs
# milliseconds in the interpreter; tl.reduce / tl.associative_scan with triton's own combine
# functions compile to the same code and hit the interpreter's numpy fast paths.
try:
    from triton.language.standard import _elementwise_max as _MAX
    from triton.language.standard import _sum_combine as _ADD
except ImportError:  # pragma: no cover - other triton versions
    _MAX, _ADD = _max_combine, _add_combine


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
# Shape-dependent integers are not specialised (one compiled variant per dtype / tile config
# instead of one per image size); C is, so that rows of k, v keep their alignment information.


@triton.jit(do_not_specialize=["T", "P", "S", "L", "NCB", "NSEG", "QS"])
def _fwd_summary_kernel(
    k_ptr, v_ptr, w_ptr, sums_ptr,
    T, C, P, S, L, NCB, NSEG, QS,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Per segment: (max, sum e^(a-m) v, sum e^(a-m)) and the same for b (chunk-start row excluded)."""
    idx = tl.program_id(0).to(tl.int64)  # int64 scalars: no int32 overflow checks in the interpreter
    qs_ = idx * 0 + QS  # int64
    cb = idx % NCB
    b = idx // NCB // NSEG
    gs = idx // NCB % NSEG
    c = gs // S
    i = gs % S
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(ACC)
    r_start = c * P + i * L
    r_end = tl.minimum(tl.minimum(r_start + L, c * P + P), T)
    base = b * T * C

    am = tl.full([BLOCK_C], _NEG, ACC)
    av = tl.full([BLOCK_C], 0.0, ACC)
    a1 = tl.full([BLOCK_C], 0.0, ACC)
    bm = tl.full([BLOCK_C], _NEG, ACC)
    bv = tl.full([BLOCK_C], 0.0, ACC)
    b1 = tl.full([BLOCK_C], 0.0, ACC)
    ar = tl.arange(0, BLOCK_T).to(tl.int64)
    for r0 in range(r_start, r_end, BLOCK_T):
        rows = r0 + ar
        rvalid = rows < r_end
        q = rows - c * P
        qf = q.to(ACC)
        m2 = rvalid[:, None] & cmask[None, :]
        mb2 = m2 & (q > 0)[:, None]
        offs = base + rows[:, None] * C + ch[None, :]
        kk = tl.load(k_ptr + offs, mask=m2, other=0.0).to(ACC)
        vv = tl.load(v_ptr + offs, mask=m2, other=0.0).to(ACC)
        wq = w[None, :] * qf[:, None]
        xa = tl.where(m2, kk + wq, _NEG)
        xb = tl.where(mb2, kk - wq, _NEG)
        na = tl.maximum(am, tl.reduce(xa, 0, _MAX))
        ea = tl.where(m2, tl.exp(xa - na[None, :]), 0.0)
        fa = tl.exp(am - na)
        av = av * fa + tl.reduce(ea * vv, 0, _ADD)
        a1 = a1 * fa + tl.reduce(ea, 0, _ADD)
        am = na
        nb = tl.maximum(bm, tl.reduce(xb, 0, _MAX))
        eb = tl.where(mb2, tl.exp(xb - nb[None, :]), 0.0)
        fb = tl.exp(bm - nb)
        bv = bv * fb + tl.reduce(eb * vv, 0, _ADD)
        b1 = b1 * fb + tl.reduce(eb, 0, _ADD)
        bm = nb
    o = sums_ptr + (b * NSEG + gs) * C + ch
    tl.store(o + 0 * qs_, am, mask=cmask)
    tl.store(o + 1 * qs_, av, mask=cmask)
    tl.store(o + 2 * qs_, a1, mask=cmask)
    tl.store(o + 3 * qs_, bm, mask=cmask)
    tl.store(o + 4 * qs_, bv, mask=cmask)
    tl.store(o + 5 * qs_, b1, mask=cmask)


@triton.jit
def _lse_axis(x_m, mask, axis: tl.constexpr):
    """Max over ``axis`` of the masked exponents, and the matching factors exp(x - max)."""
    xm = tl.where(mask, x_m, _NEG)
    m = tl.reduce(xm, axis, _MAX)
    f = tl.where(mask, tl.exp(xm - tl.expand_dims(m, axis)), 0.0)
    return m, f


@triton.jit(do_not_specialize=["T", "P", "n", "S", "NSEG", "QS_IN", "QS_OUT"])
def _fwd_combine_kernel(
    sums_ptr, st_ptr, k_ptr, v_ptr, w_ptr,
    T, C, P, n, S, NSEG, QS_IN, QS_OUT,
    NP2: tl.constexpr, SP2: tl.constexpr, CB2: tl.constexpr, ACC: tl.constexpr,
):
    """Per (batch, block of CB2 channels): the states entering every segment (past, future,
    residual) and H_c.  Tensors are [chunk, segment, channel]."""
    pid = tl.program_id(0).to(tl.int64)
    ncb2 = (C + CB2 - 1) // CB2
    b = pid // ncb2
    ch = (pid % ncb2) * CB2 + tl.arange(0, CB2)
    qs_in_ = pid * 0 + QS_IN  # int64
    qs_out_ = pid * 0 + QS_OUT  # int64
    chm = ch < C
    w = tl.load(w_ptr + ch, mask=chm, other=0.0).to(ACC)
    cc = tl.arange(0, NP2).to(tl.int64)
    ss = tl.arange(0, SP2).to(tl.int64)
    c3 = cc[:, None, None]
    s3 = ss[None, :, None]
    h3 = ch[None, None, :]
    cvalid2 = (cc < n)[:, None] & chm[None, :]  # [chunk, channel]
    valid = (c3 < n) & (s3 < S) & (h3 < C)
    so = sums_ptr + (b * NSEG + c3 * S + s3) * C + h3
    sam = tl.load(so + 0 * qs_in_, mask=valid, other=_NEG)
    sav = tl.load(so + 1 * qs_in_, mask=valid, other=0.0)
    sa1 = tl.load(so + 2 * qs_in_, mask=valid, other=0.0)
    sbm = tl.load(so + 3 * qs_in_, mask=valid, other=_NEG)
    sbv = tl.load(so + 4 * qs_in_, mask=valid, other=0.0)
    sb1 = tl.load(so + 5 * qs_in_, mask=valid, other=0.0)

    # chunk totals [chunk, channel]; the b-family also gets the chunk-start token (b = k there)
    tam, f = _lse_axis(sam, valid, 1)
    tav = tl.reduce(f * sav, 1, _ADD)
    ta1 = tl.reduce(f * sa1, 1, _ADD)
    koff = b * T * C + (cc * P * C)[:, None] + ch[None, :]
    k0 = tl.load(k_ptr + koff, mask=cvalid2, other=0.0).to(ACC)
    v0 = tl.load(v_ptr + koff, mask=cvalid2, other=0.0).to(ACC)
    k0 = tl.where(cvalid2, k0, _NEG)
    tbm = tl.maximum(tl.reduce(sbm, 1, _MAX), k0)
    f = tl.where(valid, tl.exp(sbm - tbm[:, None, :]), 0.0)
    f0 = tl.where(cvalid2, tl.exp(k0 - tbm), 0.0)
    tbv = tl.reduce(f * sbv, 1, _ADD) + f0 * v0
    tb1 = tl.reduce(f * sb1, 1, _ADD) + f0

    # cross-chunk: [target chunk c, source chunk m, channel]
    ct = cc[:, None, None]
    cm = cc[None, :, None]
    decay = ((cm - ct) * P).to(ACC) * w[None, None, :]  # -w P (c - m) for m < c
    cpm, f = _lse_axis(tam[None, :, :] + decay, (cm < ct) & (cm < n), 1)
    cpv = tl.reduce(f * tav[None, :, :], 1, _ADD)
    cp1 = tl.reduce(f * ta1[None, :, :], 1, _ADD)
    cfm, f = _lse_axis(tbm[None, :, :] - decay, (cm > ct) & (cm < n), 1)
    cfv = tl.reduce(f * tbv[None, :, :], 1, _ADD)
    cf1 = tl.reduce(f * tb1[None, :, :], 1, _ADD)

    # inside a chunk: exclusive prefix (a, b) and suffix (b) over segments, one segment at a time
    epam = tl.full([NP2, SP2, CB2], _NEG, ACC)
    epav = tl.full([NP2, SP2, CB2], 0.0, ACC)
    epa1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    epbm = tl.full([NP2, SP2, CB2], _NEG, ACC)
    epbv = tl.full([NP2, SP2, CB2], 0.0, ACC)
    epb1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    esbm = tl.full([NP2, SP2, CB2], _NEG, ACC)
    esbv = tl.full([NP2, SP2, CB2], 0.0, ACC)
    esb1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    for j in range(0, S):
        jo = sums_ptr + (b * NSEG + cc[:, None] * S + j) * C + ch[None, :]
        jam = tl.load(jo + 0 * qs_in_, mask=cvalid2, other=_NEG)[:, None, :]
        jav = tl.load(jo + 1 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        ja1 = tl.load(jo + 2 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        jbm = tl.load(jo + 3 * qs_in_, mask=cvalid2, other=_NEG)[:, None, :]
        jbv = tl.load(jo + 4 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        jb1 = tl.load(jo + 5 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        before = s3 > j  # segment j lies left of segment i
        after = s3 < j
        x = tl.where(before, jam, _NEG)
        nm = tl.maximum(epam, x)
        fo = tl.exp(epam - nm)
        fn = tl.where(before, tl.exp(x - nm), 0.0)
        epav = epav * fo + fn * jav
        epa1 = epa1 * fo + fn * ja1
        epam = nm
        x = tl.where(before, jbm, _NEG)
        nm = tl.maximum(epbm, x)
        fo = tl.exp(epbm - nm)
        fn = tl.where(before, tl.exp(x - nm), 0.0)
        epbv = epbv * fo + fn * jbv
        epb1 = epb1 * fo + fn * jb1
        epbm = nm
        x = tl.where(after, jbm, _NEG)
        nm = tl.maximum(esbm, x)
        fo = tl.exp(esbm - nm)
        fn = tl.where(after, tl.exp(x - nm), 0.0)
        esbv = esbv * fo + fn * jbv
        esb1 = esb1 * fo + fn * jb1
        esbm = nm

    # past entering segment (c, i): earlier chunks, plus earlier segments of c with decay |t-j|-1
    epam = epam + w[None, None, :]
    pm = tl.maximum(cpm[:, None, :], epam)
    f1 = tl.exp(cpm[:, None, :] - pm)
    f2 = tl.exp(epam - pm)
    pv = f1 * cpv[:, None, :] + f2 * epav
    p1 = f1 * cp1[:, None, :] + f2 * epa1
    # future right of segment (c, i): later segments of c, later chunks
    fm = tl.maximum(cfm[:, None, :], esbm)
    f1 = tl.exp(cfm[:, None, :] - fm)
    f2 = tl.exp(esbm - fm)
    fv = f1 * cfv[:, None, :] + f2 * esbv
    f1s = f1 * cf1[:, None, :] + f2 * esb1
    # H_c = max_{j >= s_c} b_j: the whole chunk (start token included) and all later chunks
    h = tl.maximum(tbm, cfm)[:, None, :] + tl.full([NP2, SP2, CB2], 0.0, ACC)

    oo = st_ptr + (b * NSEG + c3 * S + s3) * C + h3
    tl.store(oo + 0 * qs_out_, pm, mask=valid)
    tl.store(oo + 1 * qs_out_, pv, mask=valid)
    tl.store(oo + 2 * qs_out_, p1, mask=valid)
    tl.store(oo + 3 * qs_out_, fm, mask=valid)
    tl.store(oo + 4 * qs_out_, fv, mask=valid)
    tl.store(oo + 5 * qs_out_, f1s, mask=valid)
    tl.store(oo + 6 * qs_out_, epbm, mask=valid)
    tl.store(oo + 7 * qs_out_, epbv, mask=valid)
    tl.store(oo + 8 * qs_out_, epb1, mask=valid)
    tl.store(oo + 9 * qs_out_, h, mask=valid)


@triton.jit(do_not_specialize=["T", "P", "S", "L", "NCB", "NSEG", "NPROG", "QS_IN", "QS_ST"])
def _fwd_output_kernel(
    k_ptr, v_ptr, w_ptr, u_ptr, sums_ptr, st_ptr, y_ptr, m_ptr, z_ptr, y32_ptr,
    T, C, P, S, L, NCB, NSEG, NPROG, QS_IN, QS_ST, eps,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    STORE_MZ: tl.constexpr, STORE_Y32: tl.constexpr, SCAN: tl.constexpr,
):
    idx = NPROG - tl.program_id(0).to(tl.int64) - 1  # reverse order of the summary pass (L2 reuse)
    qs_in_ = idx * 0 + QS_IN  # int64
    qs_st_ = idx * 0 + QS_ST  # int64
    cb = idx % NCB
    b = idx // NCB // NSEG
    gs = idx // NCB % NSEG
    c = gs // S
    i = gs % S
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(ACC)
    u = tl.load(u_ptr + ch, mask=cmask, other=0.0).to(ACC)
    ew = tl.exp(w)
    r_start = c * P + i * L
    r_end = tl.minimum(tl.minimum(r_start + L, c * P + P), T)
    base = b * T * C

    so = st_ptr + (b * NSEG + gs) * C + ch
    pm = tl.load(so + 0 * qs_st_, mask=cmask, other=_NEG)  # past entering the segment
    pv = tl.load(so + 1 * qs_st_, mask=cmask, other=0.0)
    p1 = tl.load(so + 2 * qs_st_, mask=cmask, other=0.0)
    fm = tl.load(so + 3 * qs_st_, mask=cmask, other=_NEG)  # future right of the segment
    fv = tl.load(so + 4 * qs_st_, mask=cmask, other=0.0)
    f1 = tl.load(so + 5 * qs_st_, mask=cmask, other=0.0)
    rm = tl.load(so + 6 * qs_st_, mask=cmask, other=_NEG)  # residual: earlier segments of the chunk
    rv = tl.load(so + 7 * qs_st_, mask=cmask, other=0.0)
    r1 = tl.load(so + 8 * qs_st_, mask=cmask, other=0.0)
    h = tl.load(so + 9 * qs_st_, mask=cmask, other=0.0)
    sg = sums_ptr + (b * NSEG + gs) * C + ch  # this segment's own b-family total
    gm = tl.load(sg + 3 * qs_in_, mask=cmask, other=_NEG)
    gv = tl.load(sg + 4 * qs_in_, mask=cmask, other=0.0)
    g1 = tl.load(sg + 5 * qs_in_, mask=cmask, other=0.0)

    # running prefix of the b-family inside this segment (chunk-start row excluded)
    spm = tl.full([BLOCK_C], _NEG, ACC)
    spv = tl.full([BLOCK_C], 0.0, ACC)
    sp1 = tl.full([BLOCK_C], 0.0, ACC)
    ar = tl.arange(0, BLOCK_T).to(tl.int64)
    for r0 in range(r_start, r_end, BLOCK_T):
        rows = r0 + ar
        rvalid = rows < r_end
        q = rows - c * P
        qf = q.to(ACC)
        m2 = rvalid[:, None] & cmask[None, :]
        mb2 = m2 & (q > 0)[:, None]
        offs = base + rows[:, None] * C + ch[None, :]
        kk = tl.load(k_ptr + offs, mask=m2, other=0.0).to(ACC)
        vv = tl.load(v_ptr + offs, mask=m2, other=0.0).to(ACC)
        wq = w[None, :] * qf[:, None]
        xa = tl.where(m2, kk + wq, _NEG)
        xb = tl.where(mb2, kk - wq, _NEG)
        ma = tl.reduce(xa, 0, _MAX)
        mb = tl.reduce(xb, 0, _MAX)
        ea = tl.where(m2, tl.exp(xa - ma[None, :]), 0.0)
        eb = tl.where(mb2, tl.exp(xb - mb[None, :]), 0.0)
        eav = ea * vv
        ebv = eb * vv
        ca_v = tl.associative_scan(eav, 0, _ADD) - eav  # exclusive: j < t
        ca_1 = tl.associative_scan(ea, 0, _ADD) - ea
        cb_v = tl.associative_scan(ebv, 0, _ADD)  # inclusive: j <= t
        cb_1 = tl.associative_scan(eb, 0, _ADD)
        if SCAN:  # running maxima for the stabiliser
            cma = tl.associative_scan(xa, 0, _max_combine)
            cmb = tl.associative_scan(xb, 0, _max_combine)
        else:  # interpreter: masked [T, T, C] reduction (its generic scan is very slow)
            le = tl.arange(0, BLOCK_T)[None, :, None] <= tl.arange(0, BLOCK_T)[:, None, None]
            cma = tl.reduce(tl.where(le, xa[None, :, :], _NEG), 1, _MAX)
            cmb = tl.reduce(tl.where(le, xb[None, :, :], _NEG), 1, _MAX)

        # past (j < t): state entering the tile + this tile's earlier rows (same chunk: +w)
        ps = tl.maximum(pm, ma + w)
        fp0 = tl.exp(pm - ps)
        fp1 = tl.exp(ma + w - ps)
        past_v = fp0[None, :] * pv[None, :] + fp1[None, :] * ca_v
        past_1 = fp0[None, :] * p1[None, :] + fp1[None, :] * ca_1
        pmax = tl.where((q == 0)[:, None], pm[None, :], tl.maximum(pm[None, :], cma + w[None, :]))

        # future (j > t) + (1 - e^w) residual (s < j <= t), one common scale
        fs = tl.maximum(tl.maximum(fm, gm), tl.maximum(tl.maximum(rm, spm), mb))
        kf = tl.exp(fm - fs)
        kg = tl.exp(gm - fs)
        kr = tl.exp(rm - fs) * (1.0 - ew)
        ksp = tl.exp(spm - fs)
        kt = tl.exp(mb - fs)
        const_v = kf * fv + kg * gv + kr * rv
        const_1 = kf * f1 + kg * g1 + kr * r1
        # segment prefix through t (P_t): future = segment total - P_t, residual = R_in + P_t
        fut_v = const_v[None, :] - ew[None, :] * (ksp[None, :] * spv[None, :] + kt[None, :] * cb_v)
        fut_1 = const_1[None, :] - ew[None, :] * (ksp[None, :] * sp1[None, :] + kt[None, :] * cb_1)
        rmax = tl.maximum(tl.maximum(rm, spm)[None, :], cmb)

        # the kernel's stabiliser M_t = max(o1, o2, u + k)
        o2 = pmax - wq
        o1 = tl.maximum(h[None, :], rmax + w[None, :]) + wq
        mt = tl.maximum(tl.maximum(o1, o2), u[None, :] + kk)
        cp = tl.exp(ps[None, :] - wq - mt)
        cf = tl.exp(fs[None, :] + wq - mt)
        cs = tl.exp(u[None, :] + kk - mt)
        num = cp * past_v + cf * fut_v + cs * vv
        den = cp * past_1 + cf * fut_1 + cs + eps
        yy = num / den
        tl.store(y_ptr + offs, yy.to(y_ptr.dtype.element_ty), mask=m2)
        if STORE_MZ:
            tl.store(m_ptr + offs, mt, mask=m2)
            tl.store(z_ptr + offs, den, mask=m2)
        if STORE_Y32:  # unrounded output for the backward of half-precision inputs
            tl.store(y32_ptr + offs, yy, mask=m2)

        # carry the prefixes past this tile
        pv = pv * fp0 + tl.reduce(eav, 0, _ADD) * fp1  # ps is the new past scale
        p1 = p1 * fp0 + tl.reduce(ea, 0, _ADD) * fp1
        pm = ps
        nsp = tl.maximum(spm, mb)
        fb0 = tl.exp(spm - nsp)
        fb1 = tl.exp(mb - nsp)
        spv = spv * fb0 + tl.reduce(ebv, 0, _ADD) * fb1
        sp1 = sp1 * fb0 + tl.reduce(eb, 0, _ADD) * fb1
        spm = nsp


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "P", "S", "L", "NCB", "NSEG", "QS"])
def _bwd_summary_kernel(
    g_ptr, y_ptr, m_ptr, z_ptr, w_ptr, sums_ptr,
    T, C, P, S, L, NCB, NSEG, QS,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Per segment, over queries t: family 1 (exponent -M + wq) and family 2 (-M - wq), each
    (max, sum e alpha, sum e beta, moments); moments use q (family 1) and q - 1 (family 2)."""
    idx = tl.program_id(0).to(tl.int64)  # int64 scalars: no int32 overflow checks in the interpreter
    qs_ = idx * 0 + QS  # int64
    cb = idx % NCB
    b = idx // NCB // NSEG
    gs = idx // NCB % NSEG
    c = gs // S
    i = gs % S
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(ACC)
    r_start = c * P + i * L
    r_end = tl.minimum(tl.minimum(r_start + L, c * P + P), T)
    base = b * T * C

    m1 = tl.full([BLOCK_C], _NEG, ACC)
    a0 = tl.full([BLOCK_C], 0.0, ACC)
    b0 = tl.full([BLOCK_C], 0.0, ACC)
    a1 = tl.full([BLOCK_C], 0.0, ACC)
    b1 = tl.full([BLOCK_C], 0.0, ACC)
    m2_ = tl.full([BLOCK_C], _NEG, ACC)
    c0 = tl.full([BLOCK_C], 0.0, ACC)
    d0 = tl.full([BLOCK_C], 0.0, ACC)
    c1 = tl.full([BLOCK_C], 0.0, ACC)
    d1 = tl.full([BLOCK_C], 0.0, ACC)
    ar = tl.arange(0, BLOCK_T).to(tl.int64)
    for r0 in range(r_start, r_end, BLOCK_T):
        rows = r0 + ar
        rvalid = rows < r_end
        q = rows - c * P
        qf = q.to(ACC)
        msk = rvalid[:, None] & cmask[None, :]
        offs = base + rows[:, None] * C + ch[None, :]
        gg = tl.load(g_ptr + offs, mask=msk, other=0.0).to(ACC)
        yy = tl.load(y_ptr + offs, mask=msk, other=0.0).to(ACC)
        em = -tl.load(m_ptr + offs, mask=msk, other=0.0).to(ACC)
        al = gg / tl.load(z_ptr + offs, mask=msk, other=1.0).to(ACC)
        be = -al * yy
        wq = w[None, :] * qf[:, None]
        x1 = tl.where(msk, em + wq, _NEG)
        x2 = tl.where(msk, em - wq, _NEG)
        n1 = tl.maximum(m1, tl.reduce(x1, 0, _MAX))
        e1 = tl.where(msk, tl.exp(x1 - n1[None, :]), 0.0)
        f1 = tl.exp(m1 - n1)
        a0 = a0 * f1 + tl.reduce(e1 * al, 0, _ADD)
        b0 = b0 * f1 + tl.reduce(e1 * be, 0, _ADD)
        a1 = a1 * f1 + tl.reduce(e1 * al * qf[:, None], 0, _ADD)
        b1 = b1 * f1 + tl.reduce(e1 * be * qf[:, None], 0, _ADD)
        m1 = n1
        n2 = tl.maximum(m2_, tl.reduce(x2, 0, _MAX))
        e2 = tl.where(msk, tl.exp(x2 - n2[None, :]), 0.0)
        f2 = tl.exp(m2_ - n2)
        c0 = c0 * f2 + tl.reduce(e2 * al, 0, _ADD)
        d0 = d0 * f2 + tl.reduce(e2 * be, 0, _ADD)
        c1 = c1 * f2 + tl.reduce(e2 * al * (qf - 1.0)[:, None], 0, _ADD)
        d1 = d1 * f2 + tl.reduce(e2 * be * (qf - 1.0)[:, None], 0, _ADD)
        m2_ = n2
    o = sums_ptr + (b * NSEG + gs) * C + ch
    tl.store(o + 0 * qs_, m1, mask=cmask)
    tl.store(o + 1 * qs_, a0, mask=cmask)
    tl.store(o + 2 * qs_, b0, mask=cmask)
    tl.store(o + 3 * qs_, a1, mask=cmask)
    tl.store(o + 4 * qs_, b1, mask=cmask)
    tl.store(o + 5 * qs_, m2_, mask=cmask)
    tl.store(o + 6 * qs_, c0, mask=cmask)
    tl.store(o + 7 * qs_, d0, mask=cmask)
    tl.store(o + 8 * qs_, c1, mask=cmask)
    tl.store(o + 9 * qs_, d1, mask=cmask)


@triton.jit(do_not_specialize=["P", "n", "S", "NSEG", "QS_IN", "QS_OUT"])
def _bwd_combine_kernel(
    sums_ptr, st_ptr, w_ptr,
    C, P, n, S, NSEG, QS_IN, QS_OUT,
    NP2: tl.constexpr, SP2: tl.constexpr, CB2: tl.constexpr, ACC: tl.constexpr,
):
    """Per (batch, block of CB2 channels): for every segment the query states to its left
    (family 1, all chunks), to its right inside the chunk (family 1, residual) and to its right
    (family 2, +w inside the chunk).  Moments are in the coordinates of the segment's chunk."""
    pid = tl.program_id(0).to(tl.int64)
    ncb2 = (C + CB2 - 1) // CB2
    b = pid // ncb2
    ch = (pid % ncb2) * CB2 + tl.arange(0, CB2)
    qs_in_ = pid * 0 + QS_IN  # int64
    qs_out_ = pid * 0 + QS_OUT  # int64
    chm = ch < C
    w = tl.load(w_ptr + ch, mask=chm, other=0.0).to(ACC)
    cc = tl.arange(0, NP2).to(tl.int64)
    ss = tl.arange(0, SP2).to(tl.int64)
    c3 = cc[:, None, None]
    s3 = ss[None, :, None]
    h3 = ch[None, None, :]
    cvalid2 = (cc < n)[:, None] & chm[None, :]
    valid = (c3 < n) & (s3 < S) & (h3 < C)
    so = sums_ptr + (b * NSEG + c3 * S + s3) * C + h3
    s1m = tl.load(so + 0 * qs_in_, mask=valid, other=_NEG)
    s1a0 = tl.load(so + 1 * qs_in_, mask=valid, other=0.0)
    s1b0 = tl.load(so + 2 * qs_in_, mask=valid, other=0.0)
    s1a1 = tl.load(so + 3 * qs_in_, mask=valid, other=0.0)
    s1b1 = tl.load(so + 4 * qs_in_, mask=valid, other=0.0)
    s2m = tl.load(so + 5 * qs_in_, mask=valid, other=_NEG)
    s2a0 = tl.load(so + 6 * qs_in_, mask=valid, other=0.0)
    s2b0 = tl.load(so + 7 * qs_in_, mask=valid, other=0.0)
    s2a1 = tl.load(so + 8 * qs_in_, mask=valid, other=0.0)
    s2b1 = tl.load(so + 9 * qs_in_, mask=valid, other=0.0)

    # chunk totals [chunk, channel]
    t1m, f = _lse_axis(s1m, valid, 1)
    t1a0 = tl.reduce(f * s1a0, 1, _ADD)
    t1b0 = tl.reduce(f * s1b0, 1, _ADD)
    t1a1 = tl.reduce(f * s1a1, 1, _ADD)
    t1b1 = tl.reduce(f * s1b1, 1, _ADD)
    t2m, f = _lse_axis(s2m, valid, 1)
    t2a0 = tl.reduce(f * s2a0, 1, _ADD)
    t2b0 = tl.reduce(f * s2b0, 1, _ADD)
    t2a1 = tl.reduce(f * s2a1, 1, _ADD)
    t2b1 = tl.reduce(f * s2b1, 1, _ADD)

    # cross-chunk [target c, source m, channel]; moments move to chunk c's coordinates
    ct = cc[:, None, None]
    cm = cc[None, :, None]
    off = ((cm - ct) * P).to(ACC)  # start of chunk m in chunk c's coordinates
    decay = off * w[None, None, :]
    clm, f = _lse_axis(t1m[None, :, :] + decay, (cm < ct) & (cm < n), 1)
    cla0 = tl.reduce(f * t1a0[None, :, :], 1, _ADD)
    clb0 = tl.reduce(f * t1b0[None, :, :], 1, _ADD)
    cla1 = tl.reduce(f * (t1a1[None, :, :] + off * t1a0[None, :, :]), 1, _ADD)
    clb1 = tl.reduce(f * (t1b1[None, :, :] + off * t1b0[None, :, :]), 1, _ADD)
    crm, f = _lse_axis(t2m[None, :, :] - decay, (cm > ct) & (cm < n), 1)
    cra0 = tl.reduce(f * t2a0[None, :, :], 1, _ADD)
    crb0 = tl.reduce(f * t2b0[None, :, :], 1, _ADD)
    cra1 = tl.reduce(f * (t2a1[None, :, :] + (off + 1.0) * t2a0[None, :, :]), 1, _ADD)
    crb1 = tl.reduce(f * (t2b1[None, :, :] + (off + 1.0) * t2b0[None, :, :]), 1, _ADD)

    # inside a chunk, one segment j at a time: family 1 left of i (e1*), family 1 right of i
    # (g1*), family 2 right of i (g2*)
    e1m = tl.full([NP2, SP2, CB2], _NEG, ACC)
    e1a0 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    e1b0 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    e1a1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    e1b1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    g1m = tl.full([NP2, SP2, CB2], _NEG, ACC)
    g1a0 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    g1b0 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    g1a1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    g1b1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    g2m = tl.full([NP2, SP2, CB2], _NEG, ACC)
    g2a0 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    g2b0 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    g2a1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    g2b1 = tl.full([NP2, SP2, CB2], 0.0, ACC)
    for j in range(0, S):
        jo = sums_ptr + (b * NSEG + cc[:, None] * S + j) * C + ch[None, :]
        jm = tl.load(jo + 0 * qs_in_, mask=cvalid2, other=_NEG)[:, None, :]
        ja0 = tl.load(jo + 1 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        jb0 = tl.load(jo + 2 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        ja1 = tl.load(jo + 3 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        jb1 = tl.load(jo + 4 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        before = s3 > j  # segment j lies left of segment i
        after = s3 < j
        x = tl.where(before, jm, _NEG)
        nm = tl.maximum(e1m, x)
        fo = tl.exp(e1m - nm)
        fn = tl.where(before, tl.exp(x - nm), 0.0)
        e1a0 = e1a0 * fo + fn * ja0
        e1b0 = e1b0 * fo + fn * jb0
        e1a1 = e1a1 * fo + fn * ja1
        e1b1 = e1b1 * fo + fn * jb1
        e1m = nm
        x = tl.where(after, jm, _NEG)
        nm = tl.maximum(g1m, x)
        fo = tl.exp(g1m - nm)
        fn = tl.where(after, tl.exp(x - nm), 0.0)
        g1a0 = g1a0 * fo + fn * ja0
        g1b0 = g1b0 * fo + fn * jb0
        g1a1 = g1a1 * fo + fn * ja1
        g1b1 = g1b1 * fo + fn * jb1
        g1m = nm
        jm = tl.load(jo + 5 * qs_in_, mask=cvalid2, other=_NEG)[:, None, :]
        ja0 = tl.load(jo + 6 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        jb0 = tl.load(jo + 7 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        ja1 = tl.load(jo + 8 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        jb1 = tl.load(jo + 9 * qs_in_, mask=cvalid2, other=0.0)[:, None, :]
        x = tl.where(after, jm, _NEG)
        nm = tl.maximum(g2m, x)
        fo = tl.exp(g2m - nm)
        fn = tl.where(after, tl.exp(x - nm), 0.0)
        g2a0 = g2a0 * fo + fn * ja0
        g2b0 = g2b0 * fo + fn * jb0
        g2a1 = g2a1 * fo + fn * ja1
        g2b1 = g2b1 * fo + fn * jb1
        g2m = nm

    # left: earlier chunks + earlier segments of this chunk
    lm = tl.maximum(clm[:, None, :], e1m)
    fa = tl.exp(clm[:, None, :] - lm)
    fb = tl.exp(e1m - lm)
    la0 = fa * cla0[:, None, :] + fb * e1a0
    lb0 = fa * clb0[:, None, :] + fb * e1b0
    la1 = fa * cla1[:, None, :] + fb * e1a1
    lb1 = fa * clb1[:, None, :] + fb * e1b1
    # right: later segments of this chunk (weight e^w, i.e. decay |t-j|-1) + later chunks
    g2m = g2m + w[None, None, :]
    rm = tl.maximum(crm[:, None, :], g2m)
    fa = tl.exp(crm[:, None, :] - rm)
    fb = tl.exp(g2m - rm)
    ra0 = fa * cra0[:, None, :] + fb * g2a0
    rb0 = fa * crb0[:, None, :] + fb * g2b0
    ra1 = fa * cra1[:, None, :] + fb * g2a1
    rb1 = fa * crb1[:, None, :] + fb * g2b1

    oo = st_ptr + (b * NSEG + c3 * S + s3) * C + h3
    tl.store(oo + 0 * qs_out_, lm, mask=valid)
    tl.store(oo + 1 * qs_out_, la0, mask=valid)
    tl.store(oo + 2 * qs_out_, lb0, mask=valid)
    tl.store(oo + 3 * qs_out_, la1, mask=valid)
    tl.store(oo + 4 * qs_out_, lb1, mask=valid)
    tl.store(oo + 5 * qs_out_, g1m, mask=valid)
    tl.store(oo + 6 * qs_out_, g1a0, mask=valid)
    tl.store(oo + 7 * qs_out_, g1b0, mask=valid)
    tl.store(oo + 8 * qs_out_, g1a1, mask=valid)
    tl.store(oo + 9 * qs_out_, g1b1, mask=valid)
    tl.store(oo + 10 * qs_out_, rm, mask=valid)
    tl.store(oo + 11 * qs_out_, ra0, mask=valid)
    tl.store(oo + 12 * qs_out_, rb0, mask=valid)
    tl.store(oo + 13 * qs_out_, ra1, mask=valid)
    tl.store(oo + 14 * qs_out_, rb1, mask=valid)


@triton.jit(do_not_specialize=["T", "P", "S", "L", "NCB", "NSEG", "NPROG", "QS_IN", "QS_ST", "QS_PART"])
def _bwd_output_kernel(
    g_ptr, y_ptr, m_ptr, z_ptr, k_ptr, v_ptr, w_ptr, u_ptr, sums_ptr, st_ptr,
    dk_ptr, dv_ptr, part_ptr,
    T, C, P, S, L, NCB, NSEG, NPROG, QS_IN, QS_ST, QS_PART,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    idx = NPROG - tl.program_id(0).to(tl.int64) - 1  # reverse order of the summary pass (L2 reuse)
    qs_in_ = idx * 0 + QS_IN  # int64
    qs_st_ = idx * 0 + QS_ST  # int64
    cb = idx % NCB
    b = idx // NCB // NSEG
    gs = idx // NCB % NSEG
    c = gs // S
    i = gs % S
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(ACC)
    u = tl.load(u_ptr + ch, mask=cmask, other=0.0).to(ACC)
    ew = tl.exp(w)
    omew = 1.0 - ew
    r_start = c * P + i * L
    r_end = tl.minimum(tl.minimum(r_start + L, c * P + P), T)
    base = b * T * C

    so = st_ptr + (b * NSEG + gs) * C + ch
    lm = tl.load(so + 0 * qs_st_, mask=cmask, other=_NEG)
    la0 = tl.load(so + 1 * qs_st_, mask=cmask, other=0.0)
    lb0 = tl.load(so + 2 * qs_st_, mask=cmask, other=0.0)
    la1 = tl.load(so + 3 * qs_st_, mask=cmask, other=0.0)
    lb1 = tl.load(so + 4 * qs_st_, mask=cmask, other=0.0)
    sm = tl.load(so + 5 * qs_st_, mask=cmask, other=_NEG)
    sa0 = tl.load(so + 6 * qs_st_, mask=cmask, other=0.0)
    sb0 = tl.load(so + 7 * qs_st_, mask=cmask, other=0.0)
    sa1 = tl.load(so + 8 * qs_st_, mask=cmask, other=0.0)
    sb1 = tl.load(so + 9 * qs_st_, mask=cmask, other=0.0)
    rm = tl.load(so + 10 * qs_st_, mask=cmask, other=_NEG)
    ra0 = tl.load(so + 11 * qs_st_, mask=cmask, other=0.0)
    rb0 = tl.load(so + 12 * qs_st_, mask=cmask, other=0.0)
    ra1 = tl.load(so + 13 * qs_st_, mask=cmask, other=0.0)
    rb1 = tl.load(so + 14 * qs_st_, mask=cmask, other=0.0)
    sg = sums_ptr + (b * NSEG + gs) * C + ch  # the segment's own query totals
    gm1 = tl.load(sg + 0 * qs_in_, mask=cmask, other=_NEG)
    ga0 = tl.load(sg + 1 * qs_in_, mask=cmask, other=0.0)
    gb0 = tl.load(sg + 2 * qs_in_, mask=cmask, other=0.0)
    ga1 = tl.load(sg + 3 * qs_in_, mask=cmask, other=0.0)
    gb1 = tl.load(sg + 4 * qs_in_, mask=cmask, other=0.0)
    gm2 = tl.load(sg + 5 * qs_in_, mask=cmask, other=_NEG) + w
    gc0 = tl.load(sg + 6 * qs_in_, mask=cmask, other=0.0)
    gd0 = tl.load(sg + 7 * qs_in_, mask=cmask, other=0.0)
    gc1 = tl.load(sg + 8 * qs_in_, mask=cmask, other=0.0)
    gd1 = tl.load(sg + 9 * qs_in_, mask=cmask, other=0.0)

    # one scale per family for the whole segment
    s1 = tl.maximum(tl.maximum(lm, sm), gm1)
    s2 = tl.maximum(rm, gm2)
    kl = tl.exp(lm - s1)
    ks = tl.exp(sm - s1)
    kg1 = tl.exp(gm1 - s1)
    kr = tl.exp(rm - s2)
    kg2 = tl.exp(gm2 - s2)
    # (segment + right-in-chunk) totals of family 1, and (segment + right) of family 2
    st_a0 = ks * sa0 + kg1 * ga0
    st_b0 = ks * sb0 + kg1 * gb0
    st_a1 = ks * sa1 + kg1 * ga1
    st_b1 = ks * sb1 + kg1 * gb1
    rt_a0 = kr * ra0 + kg2 * gc0
    rt_b0 = kr * rb0 + kg2 * gd0
    rt_a1 = kr * ra1 + kg2 * gc1
    rt_b1 = kr * rb1 + kg2 * gd1

    # running prefixes inside the segment (family 1 at scale pm1, family 2 at pm2 incl. +w)
    pm1 = tl.full([BLOCK_C], _NEG, ACC)
    pa0 = tl.full([BLOCK_C], 0.0, ACC)
    pb0 = tl.full([BLOCK_C], 0.0, ACC)
    pa1 = tl.full([BLOCK_C], 0.0, ACC)
    pb1 = tl.full([BLOCK_C], 0.0, ACC)
    pm2 = tl.full([BLOCK_C], _NEG, ACC)
    pc0 = tl.full([BLOCK_C], 0.0, ACC)
    pd0 = tl.full([BLOCK_C], 0.0, ACC)
    pc1 = tl.full([BLOCK_C], 0.0, ACC)
    pd1 = tl.full([BLOCK_C], 0.0, ACC)
    dw_acc = tl.full([BLOCK_C], 0.0, ACC)
    du_acc = tl.full([BLOCK_C], 0.0, ACC)
    ar = tl.arange(0, BLOCK_T).to(tl.int64)
    for r0 in range(r_start, r_end, BLOCK_T):
        rows = r0 + ar
        rvalid = rows < r_end
        q = rows - c * P
        qf = q.to(ACC)
        qc = qf[:, None]
        msk = rvalid[:, None] & cmask[None, :]
        offs = base + rows[:, None] * C + ch[None, :]
        gg = tl.load(g_ptr + offs, mask=msk, other=0.0).to(ACC)
        yy = tl.load(y_ptr + offs, mask=msk, other=0.0).to(ACC)
        em = -tl.load(m_ptr + offs, mask=msk, other=0.0).to(ACC)
        al = gg / tl.load(z_ptr + offs, mask=msk, other=1.0).to(ACC)
        be = -al * yy
        kk = tl.load(k_ptr + offs, mask=msk, other=0.0).to(ACC)
        vv = tl.load(v_ptr + offs, mask=msk, other=0.0).to(ACC)
        wq = w[None, :] * qc
        x1 = tl.where(msk, em + wq, _NEG)
        x2 = tl.where(msk, em - wq, _NEG)
        t1 = tl.reduce(x1, 0, _MAX)
        t2 = tl.reduce(x2, 0, _MAX)
        e1 = tl.where(msk, tl.exp(x1 - t1[None, :]), 0.0)
        e2 = tl.where(msk, tl.exp(x2 - t2[None, :]), 0.0)
        # query-side terms of this tile
        ua0 = e1 * al
        ub0 = e1 * be
        ua1 = ua0 * qc
        ub1 = ub0 * qc
        va0 = e2 * al
        vb0 = e2 * be
        va1 = va0 * (qc - 1.0)
        vb1 = vb0 * (qc - 1.0)
        # family 1, queries t < j: left state + (segment prefix + exclusive in-tile prefix)
        kp1 = tl.exp(pm1 - s1)
        kt1 = tl.exp(t1 - s1)
        p_a0 = (kp1 * pa0)[None, :] + kt1[None, :] * (tl.associative_scan(ua0, 0, _ADD) - ua0)
        p_b0 = (kp1 * pb0)[None, :] + kt1[None, :] * (tl.associative_scan(ub0, 0, _ADD) - ub0)
        p_a1 = (kp1 * pa1)[None, :] + kt1[None, :] * (tl.associative_scan(ua1, 0, _ADD) - ua1)
        p_b1 = (kp1 * pb1)[None, :] + kt1[None, :] * (tl.associative_scan(ub1, 0, _ADD) - ub1)
        l_a0 = (kl * la0)[None, :] + p_a0
        l_b0 = (kl * lb0)[None, :] + p_b0
        l_a1 = (kl * la1)[None, :] + p_a1
        l_b1 = (kl * lb1)[None, :] + p_b1
        # family 1, queries t >= j of this chunk (residual): (segment + right) - segment prefix
        s_a0 = st_a0[None, :] - p_a0
        s_b0 = st_b0[None, :] - p_b0
        s_a1 = st_a1[None, :] - p_a1
        s_b1 = st_b1[None, :] - p_b1
        # family 2, queries t > j: total - (segment prefix + inclusive in-tile prefix)
        kp2 = tl.exp(pm2 - s2)
        kt2 = tl.exp(t2 + w - s2)
        r_a0 = (rt_a0 - kp2 * pc0)[None, :] - kt2[None, :] * tl.associative_scan(va0, 0, _ADD)
        r_b0 = (rt_b0 - kp2 * pd0)[None, :] - kt2[None, :] * tl.associative_scan(vb0, 0, _ADD)
        r_a1 = (rt_a1 - kp2 * pc1)[None, :] - kt2[None, :] * tl.associative_scan(va1, 0, _ADD)
        r_b1 = (rt_b1 - kp2 * pd1)[None, :] - kt2[None, :] * tl.associative_scan(vb1, 0, _ADD)

        # key side
        kb = tl.exp(kk - wq + s1[None, :])
        ka = tl.exp(kk + wq + s2[None, :])
        cs = tl.where(msk, tl.exp(u[None, :] + kk + em), 0.0)
        res = tl.where((q > 0)[:, None], omew[None, :], 0.0)
        ga = kb * (l_a0 + res * s_a0) + ka * r_a0 + cs * al
        gb = kb * (l_b0 + res * s_b0) + ka * r_b0 + cs * be
        tl.store(dv_ptr + offs, ga.to(dv_ptr.dtype.element_ty), mask=msk)
        tl.store(dk_ptr + offs, (vv * ga + gb).to(dk_ptr.dtype.element_ty), mask=msk)
        # d/dw: distance-weighted sums (distances j - t, t - j - [same chunk], t - j)
        dl = qc * (vv * l_a0 + l_b0) - (vv * l_a1 + l_b1)
        dr = (vv * r_a1 + r_b1) - qc * (vv * r_a0 + r_b0)
        ds1 = (vv * s_a1 + s_b1) - qc * (vv * s_a0 + s_b0)
        ds0 = vv * s_a0 + s_b0
        dres = tl.where((q > 0)[:, None], omew[None, :] * ds1 - ew[None, :] * ds0, 0.0)
        dwt = kb * (dres - dl) - ka * dr
        dw_acc += tl.reduce(tl.where(msk, dwt, 0.0), 0, _ADD)
        du_acc += tl.reduce(cs * (al * vv + be), 0, _ADD)

        # carry the segment prefixes past this tile
        n1 = tl.maximum(pm1, t1)
        fo = tl.exp(pm1 - n1)
        fn = tl.exp(t1 - n1)
        pa0 = pa0 * fo + tl.reduce(ua0, 0, _ADD) * fn
        pb0 = pb0 * fo + tl.reduce(ub0, 0, _ADD) * fn
        pa1 = pa1 * fo + tl.reduce(ua1, 0, _ADD) * fn
        pb1 = pb1 * fo + tl.reduce(ub1, 0, _ADD) * fn
        pm1 = n1
        n2 = tl.maximum(pm2, t2 + w)
        fo = tl.exp(pm2 - n2)
        fn = tl.exp(t2 + w - n2)
        pc0 = pc0 * fo + tl.reduce(va0, 0, _ADD) * fn
        pd0 = pd0 * fo + tl.reduce(vb0, 0, _ADD) * fn
        pc1 = pc1 * fo + tl.reduce(va1, 0, _ADD) * fn
        pd1 = pd1 * fo + tl.reduce(vb1, 0, _ADD) * fn
        pm2 = n2
    po = part_ptr + (b * NSEG + gs) * C + ch
    tl.store(po, dw_acc, mask=cmask)
    tl.store(po + (idx * 0 + QS_PART), du_acc, mask=cmask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

class Plan:
    """How a (B, T, C) problem is cut: chunks, segments per chunk, tiles, channel blocks.

    ``block_t`` / ``bwd_block_t``: rows per tile of the forward / backward passes;
    ``block_c``: channels per program; ``segments``: segments per chunk (default: enough for
    about ``target_programs`` programs, :data:`TARGET_PROGRAMS` on a GPU; a function of the
    shape alone, so that the rounding does not depend on the GPU model); ``combine_c``: channels
    per program of the combine passes (1 on a GPU for parallelism, all in the interpreter).
    """

    def __init__(self, B, T, C, device, block_t=None, block_c=None, segments=None, num_warps=None,
                 bwd_block_t=None, bwd_num_warps=None, combine_c=None, target_programs=None):
        self.B, self.T, self.C = B, T, C
        self.n, self.P = num_chunks_and_len(T)
        interp = INTERPRET or device.type != "cuda"
        if block_c is None:
            block_c = min(64 if interp else 32, max(4, _next_pow2(C)))
        if block_t is None:
            block_t = 32
        if bwd_block_t is None:
            bwd_block_t = 32 if interp else 16
        self.block_c = _next_pow2(block_c)
        self.block_t = _next_pow2(block_t)
        self.bwd_block_t = _next_pow2(bwd_block_t)
        self.num_warps = num_warps or 4
        self.bwd_num_warps = bwd_num_warps or 4
        self.ncb = -(-C // self.block_c)
        if segments is None:
            target = target_programs or (INTERPRET_TARGET_PROGRAMS if interp else TARGET_PROGRAMS)
            base = B * self.ncb * self.n
            segments = max(1, min(MAX_SEGMENTS, -(-target // base), -(-self.P // self.block_t)))
        segments = max(1, min(int(segments), MAX_SEGMENTS, self.P))
        self.L = -(-self.P // segments)
        self.S = -(-self.P // self.L)
        self.nseg = self.n * self.S
        self.nprog = B * self.nseg * self.ncb
        self.np2 = _next_pow2(self.n)
        self.sp2 = _next_pow2(self.S)
        if combine_c is None:
            combine_c = min(64, _next_pow2(C)) if interp else 1
        self.combine_c = _next_pow2(combine_c)
        self.ncomb = B * -(-C // self.combine_c)
        self.combine_warps = 4 if self.np2 * max(self.np2, self.sp2) * self.combine_c <= 2048 else 8
        self.scan = not interp

    def __repr__(self):
        return (f"Plan(B={self.B}, T={self.T}, C={self.C}, n={self.n}, P={self.P}, S={self.S}, L={self.L}, "
                f"block_t={self.block_t}, bwd_block_t={self.bwd_block_t}, block_c={self.block_c}, "
                f"programs={self.nprog}, combine_c={self.combine_c})")


def _forward(w, u, k, v, plan: Plan, store_mz: bool):
    with _quiet():
        return _forward_impl(w, u, k, v, plan, store_mz)


def _backward(w, u, k, v, y, mbuf, zbuf, g, plan: Plan):
    with _quiet():
        return _backward_impl(w, u, k, v, y, mbuf, zbuf, g, plan)


def _forward_impl(w, u, k, v, plan: Plan, store_mz: bool):
    B, T, C = k.shape
    acc_tl, acc_t = _acc(k.dtype)
    dev = k.device
    sums = torch.empty((6, B, plan.nseg, C), device=dev, dtype=acc_t)
    states = torch.empty((10, B, plan.nseg, C), device=dev, dtype=acc_t)
    y = torch.empty((B, T, C), device=dev, dtype=k.dtype)
    store_y32 = store_mz and k.dtype != acc_t
    if store_mz:
        mbuf = torch.empty((B, T, C), device=dev, dtype=acc_t)
        zbuf = torch.empty((B, T, C), device=dev, dtype=acc_t)
    else:
        mbuf = zbuf = sums  # never written
    y32 = torch.empty((B, T, C), device=dev, dtype=acc_t) if store_y32 else y
    qs = B * plan.nseg * C
    _fwd_summary_kernel[(plan.nprog,)](
        k, v, w, sums, T, C, plan.P, plan.S, plan.L, plan.ncb, plan.nseg, qs,
        BLOCK_T=plan.block_t, BLOCK_C=plan.block_c, ACC=acc_tl, num_warps=plan.num_warps)
    _fwd_combine_kernel[(plan.ncomb,)](
        sums, states, k, v, w, T, C, plan.P, plan.n, plan.S, plan.nseg, qs, qs,
        NP2=plan.np2, SP2=plan.sp2, CB2=plan.combine_c, ACC=acc_tl, num_warps=plan.combine_warps)
    _fwd_output_kernel[(plan.nprog,)](
        k, v, w, u, sums, states, y, mbuf, zbuf, y32,
        T, C, plan.P, plan.S, plan.L, plan.ncb, plan.nseg, plan.nprog, qs, qs, EPS,
        BLOCK_T=plan.block_t, BLOCK_C=plan.block_c, ACC=acc_tl, STORE_MZ=store_mz, STORE_Y32=store_y32,
        SCAN=plan.scan,
        num_warps=plan.num_warps)
    return y, (mbuf, zbuf, y32) if store_mz else None


def _backward_impl(w, u, k, v, y, mbuf, zbuf, g, plan: Plan):
    B, T, C = k.shape
    acc_tl, acc_t = _acc(k.dtype)
    dev = k.device
    sums = torch.empty((10, B, plan.nseg, C), device=dev, dtype=acc_t)
    states = torch.empty((15, B, plan.nseg, C), device=dev, dtype=acc_t)
    part = torch.empty((2, B, plan.nseg, C), device=dev, dtype=acc_t)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    qs = B * plan.nseg * C
    _bwd_summary_kernel[(plan.nprog,)](
        g, y, mbuf, zbuf, w, sums, T, C, plan.P, plan.S, plan.L, plan.ncb, plan.nseg, qs,
        BLOCK_T=plan.bwd_block_t, BLOCK_C=plan.block_c, ACC=acc_tl, num_warps=plan.bwd_num_warps)
    _bwd_combine_kernel[(plan.ncomb,)](
        sums, states, w, C, plan.P, plan.n, plan.S, plan.nseg, qs, qs,
        NP2=plan.np2, SP2=plan.sp2, CB2=plan.combine_c, ACC=acc_tl, num_warps=plan.combine_warps)
    _bwd_output_kernel[(plan.nprog,)](
        g, y, mbuf, zbuf, k, v, w, u, sums, states, dk, dv, part,
        T, C, plan.P, plan.S, plan.L, plan.ncb, plan.nseg, plan.nprog, qs, qs, qs,
        BLOCK_T=plan.bwd_block_t, BLOCK_C=plan.block_c, ACC=acc_tl, num_warps=plan.bwd_num_warps)
    dw = part[0].sum(dim=(0, 1))
    du = part[1].sum(dim=(0, 1))
    return dw, du, dk, dv


class _BiWKVTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, plan):
        need = any(ctx.needs_input_grad[:4])
        y, mz = _forward(w, u, k, v, plan, store_mz=need)
        if need:
            ctx.save_for_backward(w, u, k, v, *mz)  # mz[2] is y itself unless k is half precision
            ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, gy):
        w, u, k, v, mbuf, zbuf, y = ctx.saved_tensors
        dw, du, dk, dv = _backward(w, u, k, v, y, mbuf, zbuf, gy.contiguous(), ctx.plan)
        nd = ctx.needs_input_grad
        return (dw.to(w.dtype) if nd[0] else None, du.to(u.dtype) if nd[1] else None,
                dk if nd[2] else None, dv if nd[3] else None, None)


def biwkv_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan | None = None,
                 **plan_kw) -> torch.Tensor:
    """BiWKV forward (differentiable), same function and signature as ``biwkv_reference``.

    ``w, u``: (C,), already divided by T; ``k, v``: (B, T, C).  Returns (B, T, C) in the dtype
    of ``k``.  Keyword arguments tune the decomposition (``block_t``, ``block_c``,
    ``segments``, ``num_warps``, ``bwd_block_t``, ``bwd_num_warps``, ``combine_c``,
    ``target_programs``), or ``plan`` gives a ready :class:`Plan` for this (B, T, C); the result
    does not depend on them beyond rounding.
    """
    check_shapes(w, u, k, v)
    B, T, C = k.shape
    _check_device(k, "biwkv_triton")
    if T == 0 or B == 0 or C == 0:
        return torch.zeros_like(k)
    if plan is None:
        plan = Plan(B, T, C, k.device, **plan_kw)
    elif plan_kw:
        raise TypeError("biwkv_triton: pass either plan or plan keywords, not both")
    elif (plan.B, plan.T, plan.C) != (B, T, C):
        raise ValueError(f"plan is for (B, T, C) = {(plan.B, plan.T, plan.C)}; got {(B, T, C)}")
    return _BiWKVTriton.apply(w.contiguous(), u.contiguous(), k.contiguous(), v.contiguous(), plan)


__all__ = ["biwkv_triton", "Plan", "EPS", "TARGET_PROGRAMS"]

