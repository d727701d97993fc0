"""Training-time compilation of the CPU fast paths with ``torch.compile`` (inductor).

The fast CPU paths (``biwkv_cpu``, the depthwise convolution's weight gradient) are chains of
elementwise operations, prefix sums and reductions over large tensors.  Eager PyTorch runs each
as its own pass over memory, and autograd adds more passes in the backward; inductor fuses them
into a few vectorised C++ loops.  Measured on 2 cores (AVX-512): BiWKV forward and backward at
(4, 4096, 64) 61 -> 29 ms; the depthwise 5x5 weight gradient at (4, 64, 64, 64) 2.0 ms, where
PyTorch's forward and backward of that convolution under bf16 autocast take 18.5 ms.

It is off unless a training run turns it on (``codec train run --compile``): inference keeps the
eager paths, which the conformance tests pin bit for bit, and a command-line call should not pay
the compile time.  A compiled function serves only calls that build an autograd graph.

Shapes are PyTorch's automatic dynamic ones (``dynamic=None``): a call site is compiled for its
first shape, and once more, with symbolic sizes, when a second shape reaches it.  A run on one
crop size pays one compile per call site (about a minute in all on 2 cores); a run whose crops
come in many shapes (``--crop 512`` on photos of 320 x 448 and 448 x 512) pays two, instead of
one per shape.  Measured: batch 1, five crop shapes from 320 x 448 to 512 x 512 in turn, one
thread, default-v8: eager 9.2 s per round, compiled 6.8 s (1.35x) after a first round of 99 s.

If compiling fails (no C++ compiler, an unsupported platform), the failure is reported once and
the eager function is used from then on.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from typing import Callable

import torch

_STATE = {"on": False, "failed": False}


def compiler_available() -> bool:
    """Whether a C++ compiler for inductor's CPU code is on the PATH (``$CXX``, g++, c++, clang++)."""
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(n and shutil.which(n) for n in names)


def set_compile(on: bool) -> None:
    """Turn training-time compilation of the CPU fast paths on or off (process-wide)."""
    _STATE["on"] = bool(on)
    if on:
        import torch._dynamo

        # every call site of an operator has its own static shapes (a dozen in a LALIC step)
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)


def compile_enabled() -> bool:
    return _STATE["on"] and not _STATE["failed"]


def compiled(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile`` (automatic dynamic shapes) while compilation is on, else ``fn`` itself;
    decorate the eager function and call ``<fn>.maybe_compiled(...)`` where a compiled version
    may serve."""
    holder: dict = {}

    @functools.wraps(fn)
    def maybe_compiled(*args, **kwargs):
        if not compile_enabled():
            return fn(*args, **kwargs)
        if "c" not in holder:
            holder["c"] = torch.compile(fn, dynamic=None)
        try:
            return holder["c"](*args, **kwargs)
        except Exception as e:  # a broken toolchain must not stop training: fall back, say so once
            _STATE["failed"] = True
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile failed ({msg[:200]}); using the eager CPU paths", RuntimeWarning, stacklevel=2)
            print(f"lalic-codec: torch.compile failed ({msg[:200]}); using the eager CPU paths", file=sys.stderr)
            return fn(*args, **kwargs)

    fn.maybe_compiled = maybe_compiled
    return fn


__all__ = ["compile_enabled", "compiled", "compiler_available", "set_compile"]
