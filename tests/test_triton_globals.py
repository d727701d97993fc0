"""Every global a Triton kernel reads is one the GPU compiler accepts.

Triton's GPU front end refuses a kernel that reads a plain module-level Python value (a float
constant, say) unless it is a ``tl.constexpr``; the CPU interpreter, which runs all the other
kernel tests here, accepts it.  That difference let the BiWKV kernels read ``NEG`` (log 0) as a
plain float: correct under the interpreter, a CompilationError on the first real GPU (an H200,
2026-12-04).  This test reads each ``@triton.jit`` function's global names and checks their
values, without a GPU: modules (``tl``), other kernels, and ``tl.constexpr`` values only.

It runs in a subprocess so that triton is imported without ``TRITON_INTERPRET`` (the decorator
then gives the GPU ``JITFunction``) and the test process stays free of triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

MODULES = ["lalic_codec.kernels.biwkv_triton", "lalic_codec.kernels.selective_scan_triton"]

PROBE = r"""
import importlib, json, sys, types
import triton.language as tl
from triton.runtime.jit import JITFunction

report = {}
for name in sys.argv[1:]:
    mod = importlib.import_module(name)
    kernels = {k: f for k, f in vars(mod).items() if isinstance(f, JITFunction) and f.fn.__module__ == name}
    bad = []
    for kname, f in kernels.items():
        g = f.fn.__globals__
        for n in f.fn.__code__.co_names:
            if n in g and not isinstance(g[n], (types.ModuleType, JITFunction, tl.constexpr)):
                bad.append(f"{kname} reads {n} ({type(g[n]).__name__})")
    report[name] = {"kernels": len(kernels), "bad": bad}
print(json.dumps(report))
"""


def _report(modules, path_first: str | None = None) -> dict:
    """PROBE's report on ``modules``, run without TRITON_INTERPRET (``path_first`` leads PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if path_first is not None:
        env["PYTHONPATH"] = os.pathsep.join([path_first, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", PROBE, *modules], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_read_only_constexpr_globals():
    report = _report(MODULES)
    for name in MODULES:
        assert report[name]["kernels"] >= 5, f"{name}: found no Triton kernels to check"
        assert report[name]["bad"] == [], f"{name}: globals the GPU compiler refuses: {report[name]['bad']}"


def test_the_check_catches_a_plain_float_global(tmp_path):
    """The probe itself: a kernel reading a plain float global is reported, a constexpr one is not."""
    (tmp_path / "probe_kernels.py").write_text(
        "import triton\nimport triton.language as tl\n"
        "PLAIN = -1e30\nOK = tl.constexpr(-1e30)\n"
        "@triton.jit\ndef bad(x_ptr):\n    tl.store(x_ptr, PLAIN)\n"
        "@triton.jit\ndef good(x_ptr):\n    tl.store(x_ptr, OK)\n")
    report = _report(["probe_kernels"], path_first=str(tmp_path))["probe_kernels"]
    assert report["kernels"] == 2
    assert report["bad"] == ["bad reads PLAIN (float)"]
