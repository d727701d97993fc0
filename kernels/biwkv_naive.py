"""Naive oracle of the BiWKV operator: the O(T^2) definition, term by term.  For tests only.

This is the ground truth the fast paths are checked against (``biwkv_ref.biwkv_reference``, the
chunked O(T C) PyTorch form; ``biwkv_cpu.biwkv_cpu``; ``biwkv_triton.biwkv_triton``).  It builds
the full (B, T, T, C) weight tensor from the definition in ``biwkv_ref``'s docstring (the
official CUDA kernel's function, ``shared/refvec/README.md`` section 1.1), so keep T small.
"""

from __future__ import annotations

import math

import torch

from .biwkv_ref import EPS


def biwkv_naive(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, detach_max: bool = False) -> torch.Tensor:
    """O(T^2) evaluation of BiWKV straight from its definition (shapes as ``biwkv_reference``).

    ``detach_max`` makes autograd treat the stabiliser ``M_t`` as a constant, as the reference does.
    """
    B, T, C = k.shape
    P = max(1, math.ceil(T / 32))
    t = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    s = (t // P) * P
    dt = (t - j).to(k.dtype)
    w_ = w.view(1, 1, C)
    e_before = k.unsqueeze(1) - w_ * dt.unsqueeze(-1)  # (B, t, j, C), decay |t-j|
    e_same = e_before + w_  # decay |t-j| - 1
    e_after = k.unsqueeze(1) + w_ * dt.unsqueeze(-1)  # j > t: -w (j - t)
    e_res = k.unsqueeze(1) + w_ * dt.unsqueeze(-1)  # residual exponent k_j + w (t - j)
    m_before = (j < s).unsqueeze(-1)
    m_same = ((j >= s) & (j < t)).unsqueeze(-1)
    m_after = (j > t).unsqueeze(-1)
    m_res = ((j > s) & (j <= t)).unsqueeze(-1)
    m_self = (j == t).unsqueeze(-1)
    neg = torch.full_like(e_before, -math.inf)
    e_main = torch.where(m_before, e_before, torch.where(m_same, e_same, torch.where(m_after, e_after, neg)))
    e_self = torch.where(m_self, (u.view(1, 1, C) + k.unsqueeze(1)).expand_as(e_before), neg)
    # stabiliser, exactly as the kernel forms it
    o2 = torch.where(m_before | m_same, e_main, neg).amax(dim=2)
    o1a = torch.where((j >= s).unsqueeze(-1), e_after.expand_as(e_before), neg).amax(dim=2)
    o1b = torch.where(m_res, e_res + w_, neg).amax(dim=2)
    M = torch.maximum(torch.maximum(o1a, o1b), torch.maximum(o2, u.view(1, C) + k))
    if detach_max:
        M = M.detach()
    Mx = M.unsqueeze(2)
    wt = torch.exp(e_main - Mx) + torch.exp(e_self - Mx)
    wt = wt + torch.where(m_res, (1 - torch.exp(w_)) * torch.exp(e_res - Mx), torch.zeros_like(e_res))
    num = (wt * v.unsqueeze(1)).sum(dim=2)
    den = wt.sum(dim=2)
    return num / (den + EPS)


__all__ = ["biwkv_naive"]
