"""The ``codec bench`` command and the benchmark run: check the optional packages, open the images,
measure every coder at every point (sizes, quality, times, peak memory), then BD-rates and the
report (:mod:`.report`)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import click
import numpy as np

from ..errors import BadInputError, CodecError, MissingExtrasError
from .coders import CODECS, DEFAULT_LADDERS, Coder, ModelCoder, PillowCoder, Source, codec_available
from .curves import (MS_SSIM_MIN_SIDE, Curve, bd_table, bits_per_pixel, default_anchors_dir, find_published, load_curve,
                     ms_ssim, ms_ssim_db, psnr, resolve_anchor)
from .report import plot_rd, summary_markdown, write_json

#: import name -> package name, for the packages only the benchmark needs
EXTRAS = {"matplotlib": "matplotlib", "bjontegaard": "bjontegaard", "pytorch_msssim": "pytorch-msssim"}


def require_extras() -> None:
    """Import the optional packages (matplotlib on the Agg backend first) or raise one clear error."""
    missing = []
    for mod, pkg in EXTRAS.items():
        try:
            if mod == "matplotlib":
                import matplotlib

                matplotlib.use("Agg")
            else:
                __import__(mod)  # bjontegaard imports matplotlib.pyplot: after the backend is set
        except ImportError:
            missing.append(pkg)
    if missing:
        raise MissingExtrasError(
            f"codec bench needs the optional benchmark packages (missing: {', '.join(missing)}); "
            "install them with: pip install -e '.[bench]'"
        )


# ------------------------------------------------------------------------------------------------
# measuring


def _reset_peak_rss() -> bool:
    """Linux: reset the RSS high-water mark (VmHWM) so that the next reading is this point's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def load_sources(folder: Path, limit: int | None) -> list[Source]:
    from .. import imaging
    from ..files import IMAGE_SUFFIXES

    if folder.is_file():
        files = [folder]
    elif folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise BadInputError(f"{folder}: no such folder")
    if limit is not None:
        files = files[:limit]
    if not files:
        raise BadInputError(f"{folder}: no images found")
    out = []
    for f in files:
        try:
            im = imaging.open_image(f.read_bytes())
        except BadInputError as e:
            raise BadInputError(f"{f}: {e}") from None
        out.append(Source(f.name, im, imaging.prepare_image(im).rgb))
    return out


def _mean(xs):
    if not xs or any(x is None for x in xs):
        return None
    return float(np.mean(xs))


def measure(coder: Coder, sources: list[Source], bar=None, warmup: bool = True) -> tuple[Curve, list[dict]]:
    """Encode and decode every image at every point; returns the curve and the per-image records."""
    import torch

    cuda = isinstance(coder, ModelCoder) and coder.lm.device.type == "cuda"
    if warmup:  # first-call costs (kernel compilation, table set-up, codec initialisation) are not timed
        coder.decode(coder.encode(sources[0], coder.points[0]), coder.points[0])
    records, res = [], {k: [] for k in ("bpp", "psnr-rgb", "ms-ssim-rgb", "ms-ssim-db-rgb", "encoding_time", "decoding_time")}
    labels, peaks, cuda_peaks, small = [], [], [], 0
    for point in coder.points:
        label = coder.point_label(point)
        labels.append(label)
        if bar is not None:
            bar.set_description(f"{coder.name} {label}")
        _reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats(coder.lm.device)
        rows = []
        for src in sources:
            t0 = time.perf_counter()
            data = coder.encode(src, point)
            t1 = time.perf_counter()
            dec = coder.decode(data, point)
            t2 = time.perf_counter()
            if dec.shape != src.rgb.shape:
                raise CodecError(f"{coder.name}: {src.name} decoded to {dec.shape[1]}x{dec.shape[0]}, expected {src.rgb.shape[1]}x{src.rgb.shape[0]}")
            h, w = src.rgb.shape[:2]
            m = ms_ssim(src.rgb, dec)
            small += m is None
            rows.append({
                "curve": coder.name, coder.rate_key: label, "image": src.name, "width": w, "height": h,
                "bytes": len(data), "bpp": bits_per_pixel(len(data), w, h), "psnr": psnr(src.rgb, dec),
                "ms_ssim": m, "ms_ssim_db": ms_ssim_db(m), "encode_s": t1 - t0, "decode_s": t2 - t1,
            })
            if bar is not None:
                bar.update(1)
        peaks.append(peak_rss_mib())
        if cuda:
            cuda_peaks.append(torch.cuda.max_memory_allocated(coder.lm.device) / 2**20)
        for key, col in (("bpp", "bpp"), ("psnr-rgb", "psnr"), ("ms-ssim-rgb", "ms_ssim"), ("ms-ssim-db-rgb", "ms_ssim_db"),
                         ("encoding_time", "encode_s"), ("decoding_time", "decode_s")):
            res[key].append(_mean([r[col] for r in rows]))
        records += rows
    res[coder.rate_key] = labels
    res["peak_rss_mib"] = peaks
    if cuda:
        res["peak_cuda_mib"] = cuda_peaks
    meta = {"images": len(sources), **coder.meta()}
    if small:
        meta["ms_ssim_note"] = f"MS-SSIM is null: images smaller than {MS_SSIM_MIN_SIDE} px on a side"
    return Curve(coder.name, coder.description, res, meta, coder.key, points=labels), records


# ------------------------------------------------------------------------------------------------
# the command


def _split(values) -> list[str]:
    return [v.strip() for s in values for v in s.split(",") if v.strip()]


def _parse_weights(items, models) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if len(models) != 1:
                raise click.UsageError(f"--weights {item}: say which model it is for (--weights MODEL=PATH)")
            name, path = models[0], item
        if name not in models:
            raise click.UsageError(f"--weights {item}: {name!r} is not one of the models (--model {' --model '.join(models) or '...'})")
        out.setdefault(name, []).append(path)
    return out


def _parse_float_list(items, what: str) -> list[float]:
    try:
        return [float(v) for v in _split(items)]
    except ValueError:
        raise click.UsageError(f"{what}: expected numbers separated by commas") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--model", "models", multiple=True, help="model to evaluate (repeatable): default, lalic, mambaic; 'none' for codecs only  [default: default]")
@click.option("--weights", "weights", multiple=True, metavar="MODEL=PATH", help="weights file of a model (repeatable; several for a fixed-rate model make its points)")
@click.option("--quality", "qualities", multiple=True, metavar="Q[,Q...]", help="quality ladder of the variable-rate models  [default: 1..8]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="where the networks run")
@click.option("--codecs", default=",".join(CODECS), show_default=True, help="conventional codecs to compare with ('none' for none)")
@click.option("--codec-quality", "codec_qualities", multiple=True, metavar="CODEC=Q[,Q...]", help="quality ladder of a conventional codec (repeatable)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="only the first N images (sorted by name)")
@click.option("--anchor", default=None, help="curve for the BD-rates: a curve of this run (jpeg, default, ...) or a published one (e.g. vtm)  [default: jpeg, else the first curve]")
@click.option("--published", multiple=True, metavar="NAME", help="published curve to include (repeatable): a JSON file or a name under --anchors-dir, e.g. kodak-compressai/vtm")
@click.option("--published-dir", multiple=True, type=click.Path(file_okay=False, path_type=Path), help="include every JSON curve in this folder (repeatable)")
@click.option("--anchors-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="where published names are looked up  [default: $LALIC_ANCHORS or ../shared/anchors]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"), show_default=True, help="output folder")
@click.option("--no-warmup", is_flag=True, help="time the first encode too (by default one untimed encode/decode per curve comes first)")
@click.option("--quiet", is_flag=True, help="no progress bar, no summary on stdout")
def cli(folder, models, weights, qualities, device, codecs, codec_qualities, limit, anchor, published, published_dir, anchors_dir, out_dir, no_warmup, quiet):
    """Rate-distortion and speed of our models and of JPEG, WebP, AVIF and JPEG XL on the images in FOLDER.

    \b
      codec bench ../shared/data/kodak --anchor vtm --published vtm
      codec bench photos/ --model lalic --weights lalic=a.pth.tar --weights lalic=b.pth.tar
    """
    from ..exits import exit_codes

    with exit_codes():
        require_extras()
        run(folder, models, weights, qualities, device, codecs, codec_qualities, limit, anchor, published, published_dir,
            anchors_dir, out_dir, not no_warmup, quiet)


def run(folder, models, weights, qualities, device, codecs, codec_qualities, limit, anchor, published, published_dir,
        anchors_dir, out_dir, warmup=True, quiet=False) -> dict:
    """The whole benchmark; returns what it wrote (paths and BD rows)."""
    models = [m for m in _split(models or ["default"]) if m.lower() != "none"]
    if len(set(models)) != len(models):
        raise click.UsageError("--model: each model once (a fixed-rate model takes several --weights instead)")
    wmap = _parse_weights(weights, models)
    qs = _parse_float_list(qualities, "--quality")
    codec_list = [c for c in _split([codecs.lower()]) if c != "none"]
    for c in codec_list:
        if c not in CODECS:
            raise click.UsageError(f"--codecs: unknown codec {c!r} (use {', '.join(CODECS)})")
    ladders = {c: list(DEFAULT_LADDERS[c]) for c in CODECS}
    for item in codec_qualities:
        c, sep, vals = item.partition("=")
        if not sep or c.lower() not in CODECS:
            raise click.UsageError(f"--codec-quality {item}: expected CODEC=Q,Q,... with CODEC one of {', '.join(CODECS)}")
        ladders[c.lower()] = [int(v) for v in _parse_float_list([vals], "--codec-quality")]
    root = Path(anchors_dir) if anchors_dir else default_anchors_dir()

    from tqdm import tqdm

    import torch

    from .. import __version__
    from .._runtime import tune_allocator

    tune_allocator()  # as the codec command does: timings are the CLI's
    sources = load_sources(Path(folder), limit)
    notes: list[str] = []
    coders: list[Coder] = []
    for m in models:
        coders.append(ModelCoder(m, wmap.get(m, []), qs, device))
        notes += coders[-1].notes
    for c in codec_list:
        why = codec_available(c)
        if why:
            notes.append(why)
        else:
            coders.append(PillowCoder(c, ladders[c]))
    curves: list[Curve] = []
    for name in published:
        path, key = find_published(name, root)
        curves_pub = load_curve(path, key)
        curves.append(curves_pub)
    for d in published_dir:
        files = sorted(Path(d).glob("*.json"))
        if not files:
            raise BadInputError(f"{d}: no .json curves")
        curves += [load_curve(f, f.stem) for f in files]
    if not coders and not curves:
        raise click.UsageError("nothing to compare: no model, no codec and no published curve")
    anchor_curve = None
    if anchor is not None and anchor.lower() not in {n.lower() for c in coders for n in (c.key, c.name)}:
        anchor_curve = resolve_anchor(anchor, curves, root)  # before the long part: a typo fails at once

    total = len(sources) * sum(len(c.points) for c in coders)
    records: list[dict] = []
    measured: list[Curve] = []
    with tqdm(total=total, unit="img", file=sys.stderr, disable=True if quiet else None, leave=False) as bar:
        for coder in coders:
            curve, recs = measure(coder, sources, bar, warmup)
            measured.append(curve)
            records += recs
    if any(r["ms_ssim"] is None for r in records):
        n = len({r["image"] for r in records if r["ms_ssim"] is None})
        notes.append(f"MS-SSIM not reported (null) for {n} image{'s' * (n != 1)} smaller than {MS_SSIM_MIN_SIDE} px on a side")
    curves = measured + curves
    if anchor is None:
        anchor_curve = next((c for c in measured if c.key == "jpeg"), curves[0])
    elif anchor_curve is None:
        anchor_curve = resolve_anchor(anchor, curves, root)
    rows = bd_table(curves, anchor_curve)

    dev = next((c.lm.device for c in coders if isinstance(c, ModelCoder)), "cpu")
    header = {
        "dataset": str(folder), "images": len(sources), "image_names": [s.name for s in sources], "device": str(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "lalic_codec": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for c in measured:
        c.meta.update({"dataset": str(folder), "image_names": header["image_names"], "device": header["device"],
                       "torch": header["torch"], "threads": header["threads"], "date": header["date"]})
        p = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', c.key)}.json"
        write_json(p, c.to_json())
        written.append(p)
    write_json(out / "per-image.json", records)
    write_json(out / "bd-rate.json", {"anchor": anchor_curve.label, "method": "Bjontegaard delta rate, pchip (bjontegaard package)",
                                      "unit": "percent", "curves": rows})
    summary = summary_markdown(curves, anchor_curve, rows, header, notes)
    (out / "summary.md").write_text(summary)
    plot_rd(curves, out / "rd.png", f"{Path(folder).name}: {len(sources)} image{'s' * (len(sources) != 1)}")
    written += [out / "per-image.json", out / "bd-rate.json", out / "summary.md", out / "rd.png"]
    if not quiet:
        click.echo(summary)
        click.echo("wrote " + ", ".join(str(p) for p in written))
    return {"written": written, "bd_rate": rows, "curves": curves, "anchor": anchor_curve, "notes": notes}
