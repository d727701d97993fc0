"""Single-bit flips: are they all reported as corruption, never decoded to a wrong image?

Makes valid .lic files with tiny random-weight models (RGB, grayscale, 16-bit, palette, alpha,
metadata, multi-tile, fixed-rate; the byte layout does not depend on the weights), flips bits one
at a time -- every bit of every file by default, or ``--flips N`` random ones -- decodes each
damaged file with the full decoder and counts the outcomes:

* ``detected: <check>``: refused, and by which check (header / block / geometry / stream CRC,
  truncation or trailing bytes after a damaged length field, magic, version...);
* ``decoded identically``: the flip changed nothing in the output (same PNG bytes, metadata
  included);
* ``UNDETECTED: decoded differently``: a wrong image was produced.

    python benchmarks/bitflips.py                 # exhaustive, about 70,000 flips
    python benchmarks/bitflips.py --flips 10000 --seed 3
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flips", type=int, default=None, help="random flips instead of every bit of every file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fuzzer is a development tool beside the tests
    import fuzz

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lalic-bitflips-") as tmp:
        weights = fuzz.make_weights(Path(tmp))
        seeds = [s for s in fuzz.make_seeds(weights) if s.kind == "lic"]
        refs = {s.name: fuzz.reference_png(s.data, weights[s.model]) for s in seeds}
        if args.flips is None:
            plan = [(s, bit) for s in seeds for bit in range(8 * len(s.data))]
        else:
            rng = random.Random(args.seed)
            total = sum(len(s.data) for s in seeds)
            plan = []
            for _ in range(args.flips):  # uniform over all bits of all files
                k = rng.randrange(8 * total)
                for s in seeds:
                    if k < 8 * len(s.data):
                        plan.append((s, k))
                        break
                    k -= 8 * len(s.data)
        outcomes: Counter = Counter()
        per_file: dict = {s.name: Counter() for s in seeds}
        undetected = []
        for s, bit in plan:
            b = bytearray(s.data)
            b[bit // 8] ^= 1 << (bit % 8)
            out = fuzz.flip_outcome(bytes(b), weights[s.model], refs[s.name])
            outcomes[out] += 1
            per_file[s.name][out.split(":")[0]] += 1
            if out.startswith("UNDETECTED"):
                undetected.append((s.name, bit))
    elapsed = time.perf_counter() - t0

    n = len(plan)
    detected = sum(v for k, v in outcomes.items() if k.startswith("detected"))
    same = outcomes["decoded identically"]
    print(f"{n} single-bit flips over {len(seeds)} files ({sum(len(s.data) for s in seeds)} bytes), {elapsed:.0f} s")
    print(f"  detected:            {detected} ({100 * detected / n:.3f} %)")
    print(f"  decoded identically: {same}")
    print(f"  UNDETECTED:          {len(undetected)}")
    print("by outcome:")
    for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {v:7d}  {k}")
    print("by file (detected / identical / undetected):")
    for s in seeds:
        c = per_file[s.name]
        print(f"  {s.name:26s} {len(s.data):5d} B  {c['detected']:6d} / {c['decoded identically']} / {c['UNDETECTED']}")
    for name, bit in undetected[:20]:
        print(f"  undetected: {name} byte {bit // 8} bit {bit % 8}")
    return 1 if undetected else 0


if __name__ == "__main__":
    sys.exit(main())
