"""The kernel tests' worker harness (``case_worker.run_case_worker``): cases shared out to several
worker processes, each case's result or error kept apart, a worker that dies replaced."""

from __future__ import annotations

import textwrap
from pathlib import Path

from case_worker import run_case_worker

WORKER = """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from case_worker import serve_cases

    def die():
        os._exit(3)

    def boom():
        raise ValueError("boom")

    def meet():  # wait (at most 60 s) until two workers are in this case at once
        open(os.path.join({room!r}, str(os.getpid())), "w").close()
        t = time.time()
        while len(os.listdir({room!r})) < 2 and time.time() - t < 60:
            time.sleep(0.01)
        return len(os.listdir({room!r}))

    CASES = {{f"ok{{i}}": (lambda i=i: [i, os.getpid()]) for i in range(4)}}
    CASES.update(die=die, boom=boom, meet1=meet, meet2=meet,
                 env=lambda: [os.environ.get("OMP_NUM_THREADS"), os.environ.get("MARK")])
    if __name__ == "__main__":
        serve_cases(CASES, [a for a in sys.argv[1:] if not a.startswith("--")])
"""


def worker(tmp_path: Path) -> Path:
    (tmp_path / "room").mkdir()
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(Path(__file__).parent), room=str(tmp_path / "room"))))
    return script


def test_two_workers_share_the_cases_and_each_case_keeps_its_own_outcome(tmp_path, monkeypatch):
    monkeypatch.setenv("LALIC_TEST_WORKERS", "2")
    names = ["meet1", "meet2", "ok0", "die", "ok1", "boom", "env", "ok2", "ok3"]
    got = run_case_worker(worker(tmp_path), names, interpret=False, env_extra={"MARK": "x"}, timeout=300)
    assert set(got) == set(names)
    assert got["meet1"]["result"] == got["meet2"]["result"] == 2  # both workers at once
    assert [got[f"ok{i}"]["result"][0] for i in range(4)] == list(range(4))
    assert "the worker died in this case (worker exit status 3)" in got["die"]["error"]
    assert "ValueError: boom" in got["boom"]["error"] and "result" not in got["boom"]
    assert got["env"]["result"] == ["1", "x"]  # one thread each, the extra environment passed


def test_a_dead_worker_is_replaced_for_the_cases_left(tmp_path, monkeypatch):
    monkeypatch.setenv("LALIC_TEST_WORKERS", "1")
    got = run_case_worker(worker(tmp_path), ["ok0", "die", "ok1", "ok2"], interpret=False, timeout=300)
    assert "error" in got["die"]
    before, after = got["ok0"]["result"][1], {got["ok1"]["result"][1], got["ok2"]["result"][1]}
    assert len(after) == 1 and before not in after  # one fresh worker took the rest
