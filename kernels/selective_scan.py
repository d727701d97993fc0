"""Selective-scan dispatcher: Triton on CUDA tensors (when available), the PyTorch reference elsewhere.

``kernels/selective_scan_triton.py``, if present and importable (it imports triton), must
provide ``selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None,
delta_softplus=False)`` with exactly the semantics and shapes of
:func:`selective_scan_ref.selective_scan_reference`.  Set ``LALIC_FORCE_REFERENCE=1`` to use
the reference on every device (debugging).  The cross scan and cross merge are plain tensor
reshuffles and run as PyTorch code on every device.

:func:`fused_cross_scan_kernel` dispatches SS2D's fused cross scan + scan + cross merge
(``selective_scan_triton.cross_selective_scan_fused``, inference on CUDA only).
"""

from __future__ import annotations

import os

import torch

from ._dispatch import use_triton
from .selective_scan_ref import cross_merge, cross_scan, selective_scan_reference

__all__ = ["selective_scan", "cross_scan", "cross_merge", "fused_cross_scan_kernel"]


def _use_triton(u: torch.Tensor) -> bool:
    return use_triton(u, "selective_scan_triton")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Mamba selective scan as MambaIC's SS2D calls it; see ``selective_scan_ref`` for the definition.

    ``u, delta``: (b, K*D, L); ``A``: (K*D, N); ``B, C``: (b, K, N, L); ``D, delta_bias``: (K*D,).
    """
    if _use_triton(u):
        from .selective_scan_triton import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias, delta_softplus)


def fused_cross_scan_kernel(x: torch.Tensor, needs_grad: bool):
    """Dispatcher of the fused Triton cross scan + selective scan + cross merge: the kernel for a
    CUDA map when ``LALIC_SS2D_FUSED=1`` and no gradient is needed (and triton imports,
    ``LALIC_FORCE_REFERENCE`` is unset), else None: the unfused path (differentiable).

    The unfused path is the default because it is the faster one where measured: on an H200
    (bench-results/gpu-h200/time_scan.txt, Kodak stage 1, 256x384, fp32), SS2D fused 24.3 ms
    (transpose mode) / 43.5 ms (gather), unfused with the Triton scan 14.0 ms."""
    if not x.is_cuda or needs_grad or os.environ.get("LALIC_SS2D_FUSED", "0") != "1" or not _use_triton(x):
        return None
    from .selective_scan_triton import cross_selective_scan_fused

    return cross_selective_scan_fused
