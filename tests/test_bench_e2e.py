"""benchmarks/bench_e2e_gpu.py: the overlapped range coder gives the same bytes, and the script runs.

The overlap option hands every stream of ``compress`` to a worker (thread or spawned process)
while the caller goes on with the next pass; the bytes must be exactly those of the plain
``compress`` and must decode to the same y_hat.  Checked on CPU with tiny LALIC and MambaIC
networks; the whole benchmark (all eager variants, the time split, the table and the JSON) is
run on CPU too, and without ``--device`` it must exit cleanly when there is no GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import benchmark_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e_gpu.py"


@pytest.fixture(scope="module")
def bench():
    return benchmark_script("bench_e2e_gpu")


@pytest.mark.parametrize("name", ["lalic", "mambaic"])
def test_overlapped_range_coding_gives_identical_bytes(bench, name):
    import lalic_codec.models.entropy_models as entropy_models
    from lalic_codec.entropy.coder import encode_stream

    torch.set_num_threads(1)
    model = bench.build_model(name, torch.device("cpu"), small=True)
    x = bench.synthetic_image(128, 128, seed=1)
    ref = model.compress(x)
    assert len(ref.streams) == model.num_streams()
    for kind in ("thread", "process"):
        ov = bench.OverlappedCoder(kind, workers=2)
        try:
            coded = ov.compress(model, x)
            again = ov.compress(model, x)
        finally:
            ov.close()
        assert all(isinstance(s, bytes) for s in coded.streams), kind
        assert coded.streams == ref.streams, kind
        assert again.streams == ref.streams, kind
        assert torch.equal(coded.y_hat, ref.y_hat)
        out = model.decompress(coded.streams, coded.z_shape)
        assert torch.equal(out["y_hat"], ref.y_hat)
        # the entropy models' encoder function is restored afterwards
        assert entropy_models.encode_stream is encode_stream


def test_whole_benchmark_runs_on_cpu(bench, tmp_path):
    out = tmp_path / "e2e.json"
    rc = bench.main(["--device", "cpu", "--small", "--size", "128x128", "--repeat", "1", "--warmup", "0",
                     "--models", "lalic", "--variants", "eager", "overlap-thread", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in res] == ["eager", "overlap-thread"]
    for r in res:
        assert "error" not in r, r
        assert r["roundtrip_ok"] and r["same_bytes"] == "same"
        for what in ("enc", "dec"):
            parts = [r[f"{what}_split_{p}_ms"] for p in ("network", "coding", "transfer")]
            assert all(p >= 0 for p in parts)
            assert r[f"{what}_ms"] > 0
    assert res[0]["enc_split_coding_ms"] > 0 and res[0]["dec_split_coding_ms"] > 0


def test_exits_cleanly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout
    assert "error" in json.loads(out.read_text())
