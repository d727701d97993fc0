"""Fast CPU path of the BiWKV operator: one stabiliser per sequence, chunk sums by matrix product.

The function is the official kernel's (see ``biwkv_ref`` for its definition).  For a query at
local position p of chunk n (t = nP + p) and a key at position q of chunk m (j = mP + q), every
weight factors into a part of t, a part of j and a part of the chunk distance:

    earlier chunks    e^{-w(t-j)}         = e^{-wp} . e^{wq} e^{k_j} . e^{-wP(n-m)}
    same chunk, q < p e^{-w(t-j-1)}       = e^{-wp} . e^{wq} e^{k_j} . e^{w}
    same chunk, q > p e^{-w(j-t)}         = e^{wp}  . e^{-wq} e^{k_j}
    later chunks      e^{-w(j-t)}         = e^{wp}  . e^{-wq} e^{k_j} . e^{-wP(m-n)}
    residual 0<q<=p   (1-e^w) e^{w(t-j)}  = (1-e^w) e^{wp} . e^{-wq} e^{k_j}
    self              e^{u + k_t}

so numerator and denominator are prefix and suffix sums: inside the chunks over the tokens, and
between chunks over the chunk totals.  That is a few dozen operations on (B, T, C) tensors,
differentiable by autograd, several times faster than the per-token stabilised reference for the
sequence lengths of training crops.

Numerics: ``e^{k}`` is taken relative to the largest key of each (batch, channel); every other
factor lies within ``e^{+-(|w| T + |u|)}``.  When the keys' range plus that span could leave the
float range (:func:`fast_path_ok`), the dispatcher uses the reference instead.  The kernel's
stabiliser ``M_t`` enters only through its 1e-6 epsilon, ``y = num / (den + 1e-6 e^{M_t})``;
``e^{M_t}`` is the largest term of ``den``, and is replaced here by ``den`` itself, which changes
the result by at most 1e-6 relative.
"""

from __future__ import annotations

import torch

from ._compile import compiled
from .biwkv_ref import EPS, num_chunks_and_len

#: largest exponent span (natural-log units) the fast path accepts, per dtype
_MAX_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def fast_path_ok(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`biwkv_cpu` may be used: float32/64 and exponents within range."""
    if k.dtype not in _MAX_SPAN or k.shape[1] == 0:
        return False
    with torch.no_grad():
        span = (k.amax(dim=1) - k.amin(dim=1)).max() + w.abs().max() * k.shape[1] + u.abs().max()
        return bool(span < _MAX_SPAN[k.dtype])


@compiled
def biwkv_cpu(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """BiWKV forward, ``w, u``: (C,); ``k, v``: (B, T, C) of float32 or float64 (no range check:
    see :func:`fast_path_ok`).  Differentiable in all four inputs; ``biwkv_cpu.maybe_compiled`` is
    the same function under ``torch.compile`` while training compilation is on (``_compile``)."""
    B, T, C = k.shape
    w, u, v = w.to(k.dtype), u.to(k.dtype), v.to(k.dtype)
    n, P = num_chunks_and_len(T)
    ek = torch.exp(k - k.detach().amax(dim=1, keepdim=True))
    X = torch.cat([ek * v, ek], dim=0)  # numerator and denominator terms, (2B, T, C)
    if n * P != T:  # the last chunk is short: pad with terms of weight zero
        X = torch.cat([X, X.new_zeros((2 * B, n * P - T, C))], dim=1)
    X = X.view(2 * B, n, P, C)
    q = torch.arange(P, dtype=k.dtype, device=k.device).view(P, 1)
    e_plus, e_minus = torch.exp(w * q), torch.exp(-w * q)  # e^{wq}, e^{-wq}: (P, C)
    XA, XB = X * e_plus, X * e_minus
    cum_a, cum_b = torch.cumsum(XA, dim=2), torch.cumsum(XB, dim=2)
    tot_a, tot_b = cum_a[:, :, -1], cum_b[:, :, -1]  # chunk totals, (2B, n, C)
    # chunk m's total reaches chunk n with weight e^{-wP|n-m|} = e^{-wPn} e^{wPm} (n > m), or
    # e^{wPn} e^{-wPm} (n < m): exclusive prefix and suffix sums over the chunks
    g = torch.exp((w * P) * torch.arange(n, dtype=k.dtype, device=k.device).view(n, 1))  # e^{wPm}: (n, C)
    ta = tot_a * g
    past = (torch.cumsum(ta, dim=1) - ta) / g
    tb = tot_b / g
    future = (torch.cumsum(tb.flip(1), dim=1).flip(1) - tb) * g
    ew = torch.exp(w)
    out = (
        e_minus * (past.unsqueeze(2) + ew * (cum_a - XA))
        + e_plus * (future.unsqueeze(2) + (tot_b.unsqueeze(2) - cum_b) + (1.0 - ew) * (cum_b - XB[:, :, :1]))
        + torch.exp(u) * X
    )
    out = out.reshape(2 * B, n * P, C)[:, :T]
    return out[:B] / (out[B:] * (1.0 + EPS))


__all__ = ["biwkv_cpu", "fast_path_ok"]
