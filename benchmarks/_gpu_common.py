"""Helpers shared by the GPU benchmark scripts (bench_kernels_gpu, bench_scan_gpu, bench_e2e_gpu)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def ensure_package() -> None:
    """Make ``lalic_codec`` importable from a source checkout that is not pip-installed.

    pyproject.toml maps ``lalic_codec.kernels`` / ``.models`` / ``.formats`` to the top-level
    ``kernels/``, ``models/``, ``formats/`` directories; an (editable) install provides that
    mapping, a bare checkout (the GPU machine has no network to install from) does not, so it
    is rebuilt here.
    """
    try:
        import lalic_codec.kernels  # noqa: F401
        import lalic_codec.models  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import lalic_codec

    for sub in ("kernels", "formats", "models"):
        name = f"lalic_codec.{sub}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, root / sub / "__init__.py",
                                                      submodule_search_locations=[str(root / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(lalic_codec, sub, mod)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import triton.testing

    n = 1 << 28  # 1 GiB of fp32
    a = torch.empty(n, device="cuda", dtype=torch.float32).uniform_()
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=200, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * 4 * n / (t * 1e-3)


def max_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that relative to max |b|), in float64."""
    a, b = a.double(), b.double()
    abs_err = (a - b).abs().max().item()
    return abs_err, abs_err / max(b.abs().max().item(), 1e-300)
