"""Shared fixtures: tiny random-weight models saved as weight files, and test images; helpers for the kernel tests."""

import contextlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from case_worker import run_case_worker, serve_cases  # noqa: F401  (the tests import them from here)
from lalic_codec._paths import shared_dir

SHARED = shared_dir()
KODAK = SHARED / "data" / "kodak"

TINY = dict(N=8, M=32, dims=(16, 16, 16, 32, 16, 16), depths=(0, 1, 1, 1), groups=(4, 4, 8, 16))


@pytest.fixture(scope="session")
def tiny_vr_weights(tmp_path_factory) -> Path:
    """A variable-rate LALIC with random weights (same code path as the default model)."""
    from lalic_codec.models.checkpoints import save_weights
    from lalic_codec.models.lalic import VariableRateLALIC

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny-vr.safetensors"
    return save_weights(VariableRateLALIC(**TINY), path)


@pytest.fixture(scope="session")
def tiny_lalic_weights(tmp_path_factory) -> Path:
    """A fixed-rate LALIC with random weights, saved like an official training checkpoint."""
    from lalic_codec.models.lalic import LALIC

    torch.manual_seed(1)
    m = LALIC(**TINY)
    m.update(force=True)
    path = tmp_path_factory.mktemp("weights") / "checkpoint_best.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, path)
    return path


def benchmark_script(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` loaded as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads, then restore the previous count.  The float parts
    of coding (the means, the synthesis) may round differently with another thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def natural_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth image with some texture (uint8 RGB), cheap to make at any size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 80 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], axis=-1)
    noise = rng.normal(0, 12, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def rgb_png(tmp_path) -> Path:
    p = tmp_path / "img.png"
    Image.fromarray(natural_image(97, 203)).save(p)
    return p


# ---- helpers shared by the kernel tests ------------------------------------------------------


@contextlib.contextmanager
def simulated_gpus(sm_counts):
    """Make ``torch.cuda`` report one GPU per entry of ``sm_counts``, with that many SMs (no CUDA needed).

    Only the queries a host-side planner could use are answered (``is_available``, ``device_count``,
    ``current_device``, ``get_device_properties``); nothing runs on these devices.  Give every
    simulated GPU its own device index so that no per-device cache can hide the difference.
    """
    props = [types.SimpleNamespace(name=f"simulated GPU with {n} SMs", multi_processor_count=n, major=9, minor=0,
                                   total_memory=80 << 30) for n in sm_counts]

    def index(device=None):
        if device is None:
            return 0
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return device.index if device.index is not None else 0

    saved = {name: getattr(torch.cuda, name) for name in
             ("is_available", "device_count", "current_device", "get_device_properties")}
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: len(props)
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_properties = lambda device=None: props[index(device)]
    try:
        yield [torch.device("cuda", i) for i in range(len(props))]
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


def rel_errors(out, ref, names, floor: float = 0.0) -> dict:
    """Per output: max |out - ref| relative to max |ref| (at least ``floor``; absolute when that is 0),
    whether ``out`` is finite, and its dtype.  ``ref`` entries that are None are left out."""
    errs = {}
    for name, a, b in zip(names, out, ref):
        if b is None:
            continue
        scale = max(b.abs().max().item(), floor)
        err = (a.double() - b.double()).abs().max().item()
        errs[name] = err / scale if scale > 0 else err
        errs[name + "_finite"] = bool(torch.isfinite(a).all())
        errs[name + "_dtype"] = str(a.dtype)
    return errs


def assert_errors_below(errs: dict, tol: dict) -> None:
    """Every output named in ``tol`` is finite and its relative error (see :func:`rel_errors`) below its tolerance."""
    for name, t in tol.items():
        assert errs[name + "_finite"], f"{name}: non-finite values"
        assert errs[name] < t, f"{name}: relative error {errs[name]:.3g} >= {t:g}"


def run_with_grads(fn, args, gy=None, **kwargs):
    """``fn(*args, **kwargs)`` on fresh leaves and the gradients of ``sum(y * gy)`` (float64 ``gy``,
    random when not given): ``([y, grad of each arg (None for None args)], gy)``."""
    xs = [a.clone().requires_grad_() if a is not None else None for a in args]
    y = fn(*xs, **kwargs)
    if gy is None:
        gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y.double() * gy).sum().backward()
    return [y.detach()] + [x.grad if x is not None else None for x in xs], gy


# ---- kernel checks in worker subprocesses, case by case: run_case_worker and serve_cases (case_worker.py)


def selected_cases(request, param: str = "case") -> list:
    """The ``param`` parameters (worker case names) of the requesting module's tests that this session runs."""
    names = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and spec is not None and param in spec.params:
            names.append(spec.params[param])
    return list(dict.fromkeys(names))


def case_result(results: dict, name: str):
    """The result of worker case ``name``; fails the calling test (only it) if the case failed."""
    entry = results.get(name)
    if entry is None:
        pytest.fail(f"case {name}: not run by the worker", pytrace=False)
    if "error" in entry:
        pytest.fail(f"case {name} failed in the worker:\n{entry['error']}", pytrace=False)
    return entry["result"]
