"""Host-side helpers shared by the Triton kernels (BiWKV, selective scan)."""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = _interpret()  # triton picks the interpreter when the kernels are decorated, i.e. on import


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def acc_types(dtype: torch.dtype):
    """(Triton, torch) accumulation dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def quiet():
    """The interpreter evaluates masked-off lanes with numpy too: silence their floating-point warnings."""
    if INTERPRET:
        import numpy as np

        return np.errstate(over="ignore", invalid="ignore", under="ignore", divide="ignore")
    return contextlib.nullcontext()


def check_device(t: torch.Tensor, name: str) -> None:
    if not (t.is_cuda or INTERPRET):
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)")
