"""The kernel tests' worker processes, case by case (imported by ``conftest``; kept apart from it
so that a worker script need not import torch to serve its cases).

The Triton tests run their kernels under the interpreter (TRITON_INTERPRET=1), which must be set
before triton is imported and must not leak into other test modules: each test file is also a
worker script.  The tests of a file share a few worker processes (one per core, each on one
thread, taking the next case when done with one), which run only the cases of the tests selected
in this session (``-k`` runs one case alone); a case that raises fails only its test, and a case
that kills its worker (crash, timeout) fails alone too: the others run in a fresh worker.
"""

from __future__ import annotations

import sys

import pytest


def serve_cases(cases: dict, names) -> None:
    """Worker side: run the named cases (every case when ``names`` is empty; read one name a line
    from standard input when it is ``["-"]``), printing ``START name`` before and one ``CASE {json}``
    line after each: ``{"case", "seconds", "result" | "error"}``."""
    import json
    import time
    import traceback

    names = list(names)
    for name in (line.strip() for line in sys.stdin) if names == ["-"] else names or list(cases):
        print("START " + name, flush=True)
        t0 = time.perf_counter()
        try:
            entry = {"case": name, "result": cases[name]()}
        except Exception:  # noqa: BLE001 - reported to the test of this case
            entry = {"case": name, "error": traceback.format_exc(limit=-6)}
        entry["seconds"] = time.perf_counter() - t0
        print("CASE " + json.dumps(entry), flush=True)
        print(f"{entry['seconds']:7.2f}s {name}", file=sys.stderr, flush=True)


def case_workers(n_cases: int) -> int:
    """How many worker processes share a file's cases: one per core this process may run on (each
    worker computes on one thread), at most 4 and at most one per case; ``LALIC_TEST_WORKERS``
    overrides it."""
    import os

    env = os.environ.get("LALIC_TEST_WORKERS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_cases, int(env) if env else min(cores, 4)))


def run_case_worker(script, cases, flag: str = "--worker", interpret: bool = True, env_extra=None,
                    timeout: float = 900) -> dict:
    """Run the ``cases`` of ``python script flag -`` (see :func:`serve_cases`) in
    :func:`case_workers` processes at once, each taking the next case not yet taken when it has
    finished one; return {case: entry}.  A worker that dies marks the case it was running as failed
    and is replaced by a fresh one for the cases left.  ``timeout``: seconds for the whole call;
    a worker still running then is killed, its case failed, and the cases not started fail too."""
    import json
    import os
    import subprocess
    import tempfile
    import threading
    import time

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(env_extra or {})
    todo = list(dict.fromkeys(cases))
    results: dict = {}
    lock = threading.Lock()
    deadline = time.monotonic() + timeout
    no_triton = []

    def take():
        with lock:
            return todo.pop(0) if todo and time.monotonic() < deadline else None

    def serve():
        name = take()
        while name is not None:  # one worker process per pass; a new one after a death
            with tempfile.TemporaryFile("w+") as err:
                proc = subprocess.Popen([sys.executable, str(script), flag, "-"], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
                killer = threading.Timer(max(0.0, deadline - time.monotonic()), proc.kill)
                killer.start()
                out = []
                try:
                    while name is not None:
                        proc.stdin.write(name + "\n")
                        proc.stdin.flush()
                        entry = None
                        for line in proc.stdout:
                            out.append(line)
                            if line.startswith("CASE "):
                                entry = json.loads(line[len("CASE "):])
                                break
                        if entry is None:  # the worker died (or was killed at the deadline) in this case
                            break
                        results[entry["case"]] = entry
                        name = take()
                except BrokenPipeError:  # died before reading the name
                    pass
                finally:
                    if name is None:  # every case taken: the worker ends at the end of its input
                        proc.stdin.close()
                    else:
                        proc.kill()
                    rc = proc.wait()
                    killer.cancel()
                if name is None:
                    break
                err.seek(0)
                text = err.read()
                if "No module named 'triton'" in text:
                    no_triton.append(text)
                    return
                why = "timeout" if time.monotonic() >= deadline else f"worker exit status {rc}"
                results[name] = {"case": name, "error": f"the worker died in this case ({why}):\n"
                                 f"{''.join(out)[-2000:]}\n{text[-6000:]}"}
                name = take()

    threads = [threading.Thread(target=serve) for _ in range(case_workers(len(todo)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if no_triton and not results:
        pytest.skip("triton is not importable")
    for name in cases:
        results.setdefault(name, {"case": name, "error": f"not run: the workers' {timeout:g} s ran out" if not no_triton
                                  else "no result: triton is not importable in the worker"})
    return results
