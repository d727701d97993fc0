"""Device dispatch shared by the kernels' dispatchers (``biwkv``, ``selective_scan``); imports no triton."""

from __future__ import annotations

import importlib
import os

import torch


def force_reference() -> bool:
    """``LALIC_FORCE_REFERENCE`` set (to anything but ``0``): every dispatcher uses the PyTorch reference."""
    return os.environ.get("LALIC_FORCE_REFERENCE", "") not in ("", "0")


def use_triton(x: torch.Tensor, module: str) -> bool:
    """Whether the Triton module ``module`` (a name inside this package, e.g. ``"biwkv_triton"``)
    serves tensor ``x``: a CUDA tensor, the reference not forced, and the module (triton) importable."""
    if not x.is_cuda or force_reference():
        return False
    try:
        importlib.import_module(f"{__package__}.{module}")
    except ImportError:
        return False
    return True


__all__ = ["force_reference", "use_triton"]
