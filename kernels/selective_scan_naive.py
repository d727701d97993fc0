"""Naive oracle of the selective scan: the recurrence token by token, in float64.  For tests only.

The ground truth that ``selective_scan_ref.selective_scan_reference`` (its chunked and
sequential forms) and ``selective_scan_triton`` are checked against; it reproduces the stored
official results of ``shared/refvec/selective_scan_cases.pt`` to 1e-10.  Differentiable (a
Python loop over tokens: keep L small).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_naive(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False) -> torch.Tensor:
    """``h_l = exp(delta_l A) h_{l-1} + delta_l u_l B_l``, ``y_l = <h_l, C_l> + D u_l`` in float64.

    Shapes as :func:`selective_scan_ref.selective_scan_reference`: ``u, delta``: (b, K*D, L);
    ``A``: (K*D, N); ``B, C``: (b, K, N, L) or (b, N, L); ``D, delta_bias``: (K*D,).  Returns
    (b, K*D, L) in float64.
    """
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, KD, L = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    G = KD // B.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.double().view(1, -1, 1)
    if delta_softplus:
        delta = F.softplus(delta)
    Bc = B.repeat_interleave(G, dim=1)  # (b, KD, N, L)
    Cc = C.repeat_interleave(G, dim=1)
    h = u.new_zeros((b, KD, A.shape[1]))
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double().view(1, -1, 1) * u
    return y


__all__ = ["selective_scan_naive"]
