"""Start-up time of the `codec` command for the calls that must stay light (target: < 0.3 s).

`codec --help`, `codec --version` and `codec info` never import torch; this prints the median
wall time of each over several runs, with the bare interpreter as a baseline.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lalic_codec.formats import container as fmt


def sample_file(folder: Path) -> Path:
    header = fmt.Header(
        model_id="default-v10", weights_fingerprint=bytes(16), quality=4.0, width=768, height=512,
        colour_mode=fmt.ColourMode.RGB, bit_depth=8, device_class=1, streams_per_tile=11,
    )
    tile = fmt.Tile(0, 0, 768, 512, (0, 0, 0, 0), [bytes(1000)] * 11)
    path = folder / "sample.lic"
    path.write_bytes(fmt.write(fmt.LicFile(header=header, tiles=[tile])))
    return path


def timed(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(runs: int = 7) -> None:
    with tempfile.TemporaryDirectory() as d:
        lic = sample_file(Path(d))
        codec = [sys.executable, "-m", "lalic_codec.cli"]
        rows = [
            ("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
            ("codec --version", codec + ["--version"]),
            ("codec --help", codec + ["--help"]),
            ("codec info FILE", codec + ["info", str(lic)]),
            ("codec info --json FILE", codec + ["info", "--json", str(lic)]),
        ]
        print(f"median of {runs} runs")
        for name, cmd in rows:
            print(f"{name:28s} {timed(cmd, runs) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
