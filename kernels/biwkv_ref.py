"""Plain PyTorch reference of the BiWKV operator used by LALIC (fallback path, and the comparison for Triton).

The O(T^2) definition itself, term by term, is the naive oracle in ``biwkv_naive`` (tests only).

What it computes
----------------
Not the Vision-RWKV paper formula but the function that the official CUDA kernel
(``biwkv4_cuda_new.cu``) computes, which the official checkpoints were trained
with (see ``shared/refvec/README.md`` section 1.1).  For one (batch, channel)
pair with decay ``w`` and boost ``u`` (already divided by T by the caller),
keys ``k`` and values ``v`` over T tokens:

* ``P = ceil(T / 32)`` is the chunk length and ``s(t) = P * floor(t / P)`` the
  start of the chunk holding ``t``.
* the weight of token ``j`` for query ``t`` is
  ``exp(k_j - w (t - j))`` for ``j < s`` (earlier chunks),
  ``exp(k_j - w (t - j - 1))`` for ``s <= j < t`` (same chunk, before t),
  ``exp(k_j - w (j - t))`` for ``j > t``,
  plus ``(1 - e^w) exp(k_j + w (t - j))`` for ``s < j <= t`` (a residual of the
  kernel's subtract-and-rescale update; it can be negative), and
  ``exp(u + k_t)`` for ``j = t``.
* ``y_t = sum_j weight_tj v_j / (sum_j weight_tj + 1e-6 exp(M_t))`` where ``M_t``
  is the kernel's log-sum-exp stabiliser (the epsilon lives in the max-shifted
  domain).

How it computes it, in O(T * C) time and memory
-----------------------------------------------
The sequence is cut into the kernel's (at most 32) chunks of length P.  Inside a
chunk every term above is a prefix or suffix sum of ``exp(k_q +- w q) v_q``
(local position q), evaluated with ``cumsum`` after subtracting the chunk's
maximum exponent.  Between chunks the sums are combined through a small
``chunks x chunks`` matrix of decays.  Every partial sum carries its own
log-scale and everything is expressed relative to ``M_t`` before the final
division, so large ``|k|`` neither overflows nor underflows.  All operations
are differentiable, so autograd provides the backward pass.
"""

from __future__ import annotations

import math

import torch

#: the kernel's epsilon, added to the denominator in the domain shifted by the stabiliser M_t
EPS = 1e-6
#: stands for log(0); finite so that no inf - inf appears (NEG - NEG = 0, exp(NEG - x) = 0)
NEG = -1e30
_NEG = NEG


def num_chunks_and_len(T: int) -> tuple[int, int]:
    """Chunk length P = ceil(T/32) of the official kernel, and the number of chunks actually used."""
    P = max(1, math.ceil(T / 32))
    return math.ceil(T / P), P


def _prefix_max(x: torch.Tensor, exclusive: bool, block: int = 64) -> torch.Tensor:
    """Running maximum along dim 2 of a (B, n, P, C) tensor (no autograd).

    ``torch.cummax`` is slow on CPU; this blocked scan (log-depth inside blocks of
    ``block`` elements, then a carry between blocks) gives identical values.
    With ``exclusive`` the maximum covers positions strictly before each one
    (``_NEG`` at position 0).
    """
    B, n, P, C = x.shape
    L = min(block, P)
    Pp = -(-P // L) * L
    if Pp != P:
        x = torch.cat([x, x.new_full((B, n, Pp - P, C), _NEG)], dim=2)
    y = x.reshape(B, n, Pp // L, L, C).clone()
    d = 1
    while d < L:
        y[:, :, :, d:] = torch.maximum(y[:, :, :, d:], y[:, :, :, :-d])
        d *= 2
    if Pp // L > 1:
        carry = torch.cummax(y[:, :, :-1, -1], dim=2).values  # max of all earlier blocks
        y[:, :, 1:] = torch.maximum(y[:, :, 1:], carry.unsqueeze(3))
    y = y.reshape(B, n, Pp, C)
    if exclusive:
        return torch.cat([y.new_full((B, n, 1, C), _NEG), y[:, :, : P - 1]], dim=2)
    return y[:, :, :P]


def check_shapes(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless ``k, v`` are both (B, T, C) and ``w, u`` are (C,)."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[2]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"w and u must be ({C},); got {tuple(w.shape)} and {tuple(u.shape)}")


def biwkv_reference(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """BiWKV forward.  ``w, u``: (C,); ``k, v``: (B, T, C).  Returns (B, T, C) in the dtype of ``k``.

    Half-precision inputs are evaluated in float32 (as the official wrapper does);
    float64 inputs are evaluated in float64.  Differentiable in all four inputs; the
    log-sum-exp stabiliser ``M_t`` is treated as a constant by autograd (it only
    enters the result through the 1e-6 epsilon).
    """
    check_shapes(w, u, k, v)
    B, T, C = k.shape
    out_dtype = k.dtype
    cdtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    w, u, k, v = (x.to(cdtype) for x in (w, u, k, v))

    n, P = num_chunks_and_len(T)
    Tp = n * P
    if Tp != T:  # pad the last chunk with tokens of weight zero
        k = torch.cat([k, k.new_full((B, Tp - T, C), _NEG)], dim=1)
        v = torch.cat([v, v.new_zeros((B, Tp - T, C))], dim=1)
    k = k.view(B, n, P, C)
    v = v.view(B, n, P, C)

    q = torch.arange(P, dtype=cdtype, device=k.device).view(1, 1, P, 1)
    wq = w * q  # (1, 1, P, C): w times the position inside the chunk
    a = k + wq  # exponents of the past sums, relative to the chunk start
    b = k - wq  # exponents of the future and residual sums
    idx = torch.arange(n, device=k.device)
    dist = (idx.view(n, 1) - idx.view(1, n)).to(cdtype).view(1, n, n, 1)  # n - m
    lower = (dist > 0).to(cdtype)  # chunk m before chunk n
    upper = (dist < 0).to(cdtype)

    with torch.no_grad():  # stabilisers: any value works, these keep every exp() in range
        ma = a.amax(dim=2, keepdim=True)  # (B, n, 1, C)
        mb = b.amax(dim=2, keepdim=True)
    wP = (w * P).view(1, 1, 1, C)
    Lp = torch.where(lower > 0, ma.view(B, 1, n, C) - dist * wP, _NEG)  # log-coef of chunk m in past of n
    Lf = torch.where(upper > 0, mb.view(B, 1, n, C) + dist * wP, _NEG)  # ... in future of n
    with torch.no_grad():
        Rp = Lp.amax(dim=2, keepdim=True)  # (B, n, 1, C): largest log-coefficient per chunk
        Rf = Lf.amax(dim=2, keepdim=True)
        # the kernel's stabiliser M_t = max(o1, o2, u + k)
        o2 = torch.maximum(_prefix_max(a, exclusive=True) - wq + w, Rp - wq)
        o1 = torch.maximum(mb + wq, Rf + wq)
        if P > 1:  # residual terms: max_{0<q<=p} b_q + w (p + 1)
            cb = _prefix_max(b[:, :, 1:], exclusive=False)
            o1[:, :, 1:] = torch.maximum(o1[:, :, 1:], cb + wq[:, :, 1:] + w)
        M = torch.maximum(torch.maximum(o1, o2), u + k)
        gp = torch.maximum(ma + w, Rp)  # common log-scale of the past terms of a chunk
        gf = torch.maximum(mb, Rf)  # ... of the future and residual terms

    ea = torch.exp(a - ma)
    eb = torch.exp(b - mb)
    eav = ea * v
    ebv = eb * v

    # ---- within a chunk ---------------------------------------------------------------
    cum_a_v = torch.cumsum(eav, dim=2) - eav  # sum_{q<p} exp(a_q - ma) v_q
    cum_a_1 = torch.cumsum(ea, dim=2) - ea
    cum_b_v = torch.cumsum(ebv, dim=2)  # sum_{q<=p} exp(b_q - mb) v_q
    cum_b_1 = torch.cumsum(eb, dim=2)
    one_minus_ew = 1.0 - torch.exp(w)
    # future (q > p) plus residual (0 < q <= p), log-scale mb + w p
    fut_v = (cum_b_v[:, :, -1:] - cum_b_v) + one_minus_ew * (cum_b_v - ebv[:, :, :1])
    fut_1 = (cum_b_1[:, :, -1:] - cum_b_1) + one_minus_ew * (cum_b_1 - eb[:, :, :1])

    # ---- between chunks: chunk m's full sums with log-scales ma_m and mb_m ------------------
    Wp = torch.exp(Lp - Rp) * lower  # (B, n, n, C)
    Wf = torch.exp(Lf - Rf) * upper
    sa = torch.stack([eav.sum(dim=2), ea.sum(dim=2)], dim=1)  # (B, 2, n, C)
    sb = torch.stack([ebv.sum(dim=2), eb.sum(dim=2)], dim=1)
    past_x = (Wp.unsqueeze(1) * sa.unsqueeze(2)).sum(dim=3)  # (B, 2, n, C), log-scale Rp_n - w p
    fut_x = (Wf.unsqueeze(1) * sb.unsqueeze(2)).sum(dim=3)  # log-scale Rf_n + w p

    # ---- combine, relative to M ------------------------------------------------------------
    ap = torch.exp(ma + w - gp)  # per-chunk weights of the two past parts
    bp = torch.exp(Rp - gp)
    af = torch.exp(mb - gf)
    bf = torch.exp(Rf - gf)
    cp = torch.exp(gp - wq - M)  # per-token scales
    cf = torch.exp(gf + wq - M)
    cs = torch.exp(u + k - M)
    num = cp * (ap * cum_a_v + bp * past_x[:, 0].unsqueeze(2)) + cf * (af * fut_v + bf * fut_x[:, 0].unsqueeze(2)) + cs * v
    den = cp * (ap * cum_a_1 + bp * past_x[:, 1].unsqueeze(2)) + cf * (af * fut_1 + bf * fut_x[:, 1].unsqueeze(2)) + cs
    y = num / (den + EPS)
    return y.reshape(B, Tp, C)[:, :T].to(out_dtype)

