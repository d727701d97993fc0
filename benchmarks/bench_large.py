"""Large images: quality at equal size, seams and peak memory of tile plans at 4, 12 and 24 megapixels.

Images are made by tiling and mirroring Kodak photographs up to the target size (natural content,
no upsampling blur).  Each plan is coded at ``--quality`` and, for the comparison at equal size,
once more at a quality chosen to land on the bits per pixel of the first plan (the reference);
PSNR is interpolated in log-rate between the two.  Every encode and every decode runs in a fresh
process, so that its peak resident memory (ru_maxrss) is its own.

Plans (``--plans``): ``auto`` (the encoder's default: the largest tiles its memory budget allows),
``mem:SIZE`` (``--max-memory SIZE``), ``tile:N`` (``--tile N``) and ``legacy`` (the plan before
tiles came from a memory budget: equal tiles of at most 1024 x 1024 overlapping by at least 64).

Seams: PSNR in 16-pixel bands centred on the plan's tile edges against the whole image, in the
plan's decode and in another plan's decode, which has no seams there (the reference's, or the
second plan's for the reference).  The band's content and the two rates shift both alike; the
``penalty`` is what is left: how much worse (dB) the band is relative to its image where the
plan has seams than where the other has none.

    python benchmarks/bench_large.py [--sizes 4,12,24,2000x1500] [--plans auto,legacy,tile:1024] [--quality 4]
                                     [--device cpu] [--threads N] [--weights W]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lalic_codec import imaging, loading, pipeline, tiling
from lalic_codec._paths import shared_dir


def dimensions(size: str) -> tuple[int, int]:
    """(width, height) of a size given as megapixels ("24": 3:2, multiples of 8) or as "2000x1500"."""
    if "x" in size:
        W, H = (int(v) for v in size.split("x"))
        return W, H
    W = int(round((float(size) * 1e6 * 1.5) ** 0.5 / 8)) * 8
    return W, int(round(float(size) * 1e6 / W / 8)) * 8


def mosaic(size: str) -> np.ndarray:
    files = sorted((shared_dir() / "data" / "kodak").glob("*.png"))
    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    tiles = [t for t in tiles if t.shape[0] < t.shape[1]]  # landscape ones: 512 x 768
    W, H = dimensions(str(size))
    out = np.zeros((H, W, 3), np.uint8)
    k = 0
    # pieces of 509 x 761: the mosaic's straight borders then fall on the model's 16-pixel latent grid
    # no more often in one tile plan than in another (on it, a straight edge is coded sharper and
    # cheaper; pieces of 512 x 768 favoured plans whose tiles start at multiples of 64)
    ph, pw = 509, 761
    for y in range(0, H, ph):
        for x in range(0, W, pw):
            t = tiles[k % len(tiles)][1 : 1 + ph, 3 : 3 + pw]
            if (x // pw + y // ph) % 2:
                t = t[:, ::-1]
            k += 1
            out[y : y + ph, x : x + pw] = t[: H - y, : W - x]
    return out


def legacy_plan(h: int, w: int, tile: int = 1024, overlap: int = 64) -> list[tuple[int, int, int, int]]:
    """The reference encoder's plan before tiles came from a memory budget (up to commit 43e9293):
    equal tiles, each the smallest multiple of 64 that keeps ``overlap`` pixels with its neighbour."""

    def axis(n: int) -> list[tuple[int, int]]:
        if n <= tile:
            return [(0, n)]
        count = -(-(n - overlap) // (tile - overlap))
        size = min(tile, -(-(-(-(n + (count - 1) * overlap) // count)) // 64) * 64)
        return [(round(i * (n - size) / (count - 1)), size) for i in range(count)]

    return [(x, y, tw, th) for y, th in axis(h) for x, tw in axis(w)]


def plan_for(spec: str, h: int, w: int, lm) -> list[tuple[int, int, int, int]]:
    if spec == "legacy":
        return legacy_plan(h, w)
    if spec == "auto":
        return tiling.tile_plan(h, w, lm)
    if spec.startswith("mem:"):
        from lalic_codec.memory import parse_memory

        return tiling.tile_plan(h, w, lm, max_memory=parse_memory(spec[4:]))
    if spec.startswith("tile:"):
        return tiling.tile_plan(h, w, lm, tile=int(spec[5:]))
    raise SystemExit(f"unknown plan {spec!r} (auto, legacy, mem:SIZE, tile:N)")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def band_mask(h: int, w: int, tiles) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    for x, y, tw, th in tiles:
        for e in (x, x + tw):
            if 0 < e < w:
                mask[:, max(0, e - 8) : e + 8] = True
        for e in (y, y + th):
            if 0 < e < h:
                mask[max(0, e - 8) : e + 8, :] = True
    return mask


# ------------------------------------------------------------------------------------------------
# one encode or decode, in a process of its own


def worker(job: dict) -> dict:
    import torch

    from lalic_codec._runtime import tune_allocator

    tune_allocator()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    lm = loading.load_model("default", job.get("weights"), job["device"])
    t = time.perf_counter()
    if job["op"] == "encode":
        rgb = mosaic(job["size"])
        H, W = rgb.shape[:2]
        plan = plan_for(job["plan"], H, W, lm)
        t = time.perf_counter()
        res = pipeline.encode_image(Image.fromarray(rgb), lm, job["quality"], plan=plan)
        Path(job["out"]).write_bytes(res.data)
        padded = sum((-(-tw // 64) * 64) * (-(-th // 64) * 64) for _, _, tw, th in plan)
        biggest = max((-(-tw // 64) * 64, -(-th // 64) * 64) for _, _, tw, th in plan)
        return dict(seconds=time.perf_counter() - t, peak_gib=peak_rss_gib(), bpp=res.bpp, tiles=plan,
                    coded=padded / (H * W), biggest=f"{biggest[0]}x{biggest[1]}", size=f"{W}x{H}")
    data = Path(job["file"]).read_bytes()
    t = time.perf_counter()
    dec = pipeline.decode_bytes(data, job.get("weights"), job["device"])
    seconds = time.perf_counter() - t
    np.save(job["out"], np.asarray(dec.image.convert("RGB")))
    return dict(seconds=seconds, peak_gib=peak_rss_gib())


def run(job: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{job['op']} {job.get('plan', '')} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def code(spec: str, size: str, q: float, args, tmp: Path, rgb: np.ndarray) -> dict:
    lic = tmp / f"{spec.replace(':', '-')}-{size}-{q:g}.lic"
    base = dict(device=args.device, weights=args.weights, threads=args.threads, size=size)
    enc = run(dict(base, op="encode", plan=spec, quality=q, out=str(lic)))
    dec = run(dict(base, op="decode", file=str(lic), out=str(lic.with_suffix(".npy"))))
    image = np.load(lic.with_suffix(".npy"))
    return dict(enc, spec=spec, q=q, enc_s=enc["seconds"], dec_s=dec["seconds"], enc_gib=enc["peak_gib"], dec_gib=dec["peak_gib"],
                psnr=imaging.psnr(rgb, image), image=image)


def at_rate(a: dict, b: dict, bpp: float) -> float:
    """PSNR at ``bpp``, linear in log-rate through two codings (extrapolated if not between them)."""
    if abs(math.log(a["bpp"] / b["bpp"])) < 1e-9:
        return a["psnr"]
    f = math.log(bpp / a["bpp"]) / math.log(b["bpp"] / a["bpp"])
    return a["psnr"] + f * (b["psnr"] - a["psnr"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4,12,24", help="megapixels or WxH, comma-separated")
    ap.add_argument("--plans", default="auto,legacy", help="the first is the reference for equal size")
    ap.add_argument("--quality", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    plans = args.plans.split(",")
    q = args.quality
    print(f"model {args.weights or loading.DEFAULT_MODEL}, device {args.device}, quality {q:g}; reference plan {plans[0]}; "
          "peak = ru_maxrss of a fresh process per encode / decode")
    print(f"{'MP':>4} {'size':>9} {'plan':>9} {'tiles':>5} {'largest':>9} {'coded':>6} {'bpp':>7} {'PSNR':>6} {'@ref bpp':>8} "
          f"{'enc s':>6} {'dec s':>6} {'enc GiB':>7} {'dec GiB':>7}  seams (dB): band / all; the same in the other decode; penalty")
    print(f"(the other decode: {plans[0]}'s; for {plans[0]} itself, {plans[1] if len(plans) > 1 else 'none'}'s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes.split(","):
            rgb = mosaic(size)
            H, W = rgb.shape[:2]
            rows = []
            for spec in plans:
                r = code(spec, size, q, args, tmp, rgb)
                ref = rows[0] if rows else r
                if r is ref:
                    r["equal"] = r["psnr"]
                elif abs(math.log(ref["bpp"] / r["bpp"])) < 0.005:  # the same rate already
                    r["equal"] = r["psnr"]
                else:  # a second quality, aimed at the reference's rate (~20 % of rate per quality step)
                    q2 = min(8.0, max(1.0, q + math.log(ref["bpp"] / r["bpp"]) / math.log(1.2)))
                    r["equal"] = at_rate(r, code(spec, size, round(q2, 3), args, tmp, rgb), ref["bpp"])
                rows.append(r)
            for i, r in enumerate(rows):
                mask = band_mask(H, W, r["tiles"])
                other = rows[1 if i == 0 else 0] if len(rows) > 1 else None
                if not mask.any():
                    seams = "no seams"
                else:
                    # the band against the whole image, in this decode and in one without these seams:
                    # the difference is the seams' own cost, whatever the band's content and the rates
                    band, whole = imaging.psnr(rgb[mask], r["image"][mask]), r["psnr"]
                    seams = f"{band:.2f} / {whole:.2f}"
                    if other is not None:
                        band_o = imaging.psnr(rgb[mask], other["image"][mask])
                        seams += f"; {band_o:.2f} / {other['psnr']:.2f}; {(band_o - other['psnr']) - (band - whole):+.2f}"
                print(f"{H * W / 1e6:4.1f} {r['size']:>9} {r['spec']:>9} {len(r['tiles']):5d} {r['biggest']:>9} {r['coded']:6.3f} {r['bpp']:7.4f} "
                      f"{r['psnr']:6.2f} {r['equal']:8.2f} {r['enc_s']:6.1f} {r['dec_s']:6.1f} {r['enc_gib']:7.2f} {r['dec_gib']:7.2f}  {seams}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
