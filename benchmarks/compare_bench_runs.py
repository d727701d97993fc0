"""Compare two `codec bench` runs of a model (say a candidate and the shipped model) at equal range.

A model's BD-rate is averaged over the quality range it shares with the anchor, so two models
whose quality ladders span different ranges are not compared on equal terms by their own
figures: a ladder reaching lower rates adds the region where learned codecs trail VTM most.
This prints, for each run, the BD-rate of its curve against the published VTM-9.1 anchor and
against a codec measured in the same run (AVIF), over the run's own range and over the old run's
range, then the new curve against the old one directly, and the model-shipping rule of the
default-model issue (at least 3 points better against VTM), judged over the old run's range.

    python benchmarks/compare_bench_runs.py NEW_RUN_DIR OLD_RUN_DIR [--curve default] \
        [--anchor kodak-compressai/vtm] [--same-run avif] [--points 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lalic_codec import bench
from lalic_codec.bench.curves import is_finite


def psnr_range(curve: bench.Curve) -> tuple[float, float]:
    values = [v for v in curve.values("psnr") if is_finite(v)]
    return min(values), max(values)


def bd(anchor: bench.Curve, test: bench.Curve, within=None) -> bench.BDResult:
    return bench.bd_rate(anchor.values("bpp"), anchor.values("psnr"), test.values("bpp"), test.values("psnr"), within=within)


def fmt(r: bench.BDResult) -> str:
    if r.value is None:
        return f"n/a ({r.note})"
    lo, hi = r.common_range
    return f"{r.value:+7.2f} %  over {lo:.2f}-{hi:.2f} dB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new", help="folder of the new `codec bench` run")
    ap.add_argument("old", help="folder of the old run (e.g. bench-results/kodak)")
    ap.add_argument("--curve", default="default", help="the model's curve in both runs (file stem)")
    ap.add_argument("--anchor", default="kodak-compressai/vtm", help="published anchor (under the anchors folder)")
    ap.add_argument("--same-run", default="avif", help="a codec measured in each run (file stem)")
    ap.add_argument("--points", type=float, default=3.0, help="improvement against the anchor the shipping rule asks")
    args = ap.parse_args(argv)

    root = bench.default_anchors_dir()
    anchor_path, anchor_key = bench.find_published(args.anchor, root)
    anchor = bench.load_curve(anchor_path, anchor_key)
    runs = {}
    for which in ("new", "old"):
        folder = Path(getattr(args, which))
        runs[which] = (bench.load_curve(folder / f"{args.curve}.json"),
                       bench.load_curve(folder / f"{args.same_run}.json") if (folder / f"{args.same_run}.json").is_file() else None)
    old_range = psnr_range(runs["old"][0])
    print(f"anchor {anchor_key}; old range {old_range[0]:.2f}-{old_range[1]:.2f} dB (the old {args.curve} curve)")
    figures = {}
    for which in ("new", "old"):
        curve, same = runs[which]
        lo, hi = psnr_range(curve)
        print(f"{which}: {getattr(args, which)} ({args.curve}: {lo:.2f}-{hi:.2f} dB)")
        for label, within in (("own range", None), ("old range", old_range)):
            r = bd(anchor, curve, within)
            figures[which, label] = r.value
            line = f"  vs {anchor_key:<22} {label:<9} {fmt(r)}"
            if same is not None:
                line += f"   vs {args.same_run} (same run) {fmt(bd(same, curve, within))}"
            print(line)
    direct = bd(runs["old"][0], runs["new"][0])
    print(f"new {args.curve} against old {args.curve}: {fmt(direct)}")
    new, old = figures["new", "old range"], figures["old", "old range"]
    if new is not None and old is not None:
        gain = old - new
        verdict = "met" if gain >= args.points else "not met"
        print(f"shipping rule (at least {args.points:g} points better against {anchor_key}, over the old range): "
              f"{old:+.2f} -> {new:+.2f} % ({gain:+.2f} points): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
