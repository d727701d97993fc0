"""CPU time of the Triton kernel tests: the kernels under the Triton interpreter, on the tests' problems.

``tests/test_biwkv_triton.py`` and ``tests/test_selective_scan_triton.py`` run their checks in a
worker subprocess with ``TRITON_INTERPRET=1`` (the interpreter evaluates every program in
Python).  This script runs those workers the same way and prints how long each took, in all and
per case where the worker reports it: the figure to watch against a CI budget (the selective
scan's worker took about 30 s single-threaded on a laptop core when it was written; it used to be
asserted to stay under 240 s by the test suite).  No assertion on time here: it prints figures.

    python benchmarks/bench_interpreter_tests.py [--only biwkv|selective_scan] [--top 10]

Run it niced on a shared machine; it uses one thread (``OMP_NUM_THREADS=1``), like the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = {
    "biwkv": ROOT / "tests" / "test_biwkv_triton.py",
    "selective_scan": ROOT / "tests" / "test_selective_scan_triton.py",
}


def run_worker(script: Path) -> tuple[float, dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), "--worker"], env=env, capture_output=True, text=True,
                          cwd=script.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{script.name}: worker failed (exit {proc.returncode})")
    results: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            results.update(json.loads(line[len("RESULTS "):]))
        elif line.startswith("CASE "):
            entry = json.loads(line[len("CASE "):])
            results[entry["case"]] = entry
    return wall, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(WORKERS), help="one worker only")
    ap.add_argument("--top", type=int, default=10, help="slowest cases to list per worker")
    args = ap.parse_args()
    for name, script in WORKERS.items():
        if args.only and name != args.only:
            continue
        wall, results = run_worker(script)
        per_case = sorted(((v["seconds"], k) for k, v in results.items()
                           if isinstance(v, dict) and isinstance(v.get("seconds"), (int, float))), reverse=True)
        inside = results.get("_seconds", sum(s for s, _ in per_case))
        print(f"{name:15s} worker: {wall:7.1f} s wall (process start and imports included), "
              f"{inside:7.1f} s in the checks, {len(per_case) or '?'} cases")
        for s, case in per_case[: args.top]:
            print(f"    {s:7.2f} s  {case}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
