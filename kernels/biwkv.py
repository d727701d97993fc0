"""BiWKV dispatcher: Triton on CUDA tensors; elsewhere the fast path (``biwkv_cpu``) where its
exponent range allows, else the PyTorch reference.

Set ``LALIC_FORCE_REFERENCE=1`` to use the reference on every device (debugging).
"""

from __future__ import annotations

import torch

from ._dispatch import force_reference, use_triton
from .biwkv_cpu import biwkv_cpu, fast_path_ok
from .biwkv_ref import biwkv_reference, check_shapes

__all__ = ["biwkv"]


def _use_triton(k: torch.Tensor) -> bool:
    return use_triton(k, "biwkv_triton")


def biwkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional WKV with the official kernel's semantics; see ``biwkv_ref`` for the definition.

    ``w``, ``u``: (C,) decay and boost, already divided by T; ``k``, ``v``: (B, T, C).
    """
    if _use_triton(k):
        from .biwkv_triton import biwkv_triton

        return biwkv_triton(w, u, k, v)
    check_shapes(w, u, k, v)
    if not force_reference():
        # half-precision inputs (CPU autocast) are evaluated in float32, as the reference does
        kf = k.float() if k.dtype in (torch.bfloat16, torch.float16) else k
        if fast_path_ok(w, u, kf):
            fn = biwkv_cpu.maybe_compiled if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v)) else biwkv_cpu
            return fn(w, u, kf, v.to(kf.dtype)).to(k.dtype)
    return biwkv_reference(w, u, k, v)
