"""``codec bench``: rate-distortion and speed of our models and of the codecs people use today.

For every model and quality (and every conventional codec and quality) on a folder of images:
bits per pixel from the real encoded sizes (``.lic`` files with their headers), PSNR and MS-SSIM
on the 8-bit RGB decoded output against the RGB input as the pipeline prepares it, encode and
decode wall seconds, and peak memory.  Then BD-rates (Bjontegaard, pchip) of every curve against
an anchor, which may be a published curve (CompressAI's JSON layout).

Outputs (``--out``): ``<curve>.json`` per measured curve in CompressAI's results layout,
``per-image.json``, ``bd-rate.json``, ``summary.md`` and ``rd.png``.

Also runnable as ``python -m lalic_codec.bench``.  No torch at module level: the command checks
for the optional packages (``pip install -e '.[bench]'``) before anything heavy is imported.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from ._paths import shared_dir
from .errors import BadInputError, CodecError, MissingExtrasError

#: import name -> package name, for the packages only the benchmark needs
EXTRAS = {"matplotlib": "matplotlib", "bjontegaard": "bjontegaard", "pytorch_msssim": "pytorch-msssim"}
#: pytorch-msssim's 5 scales with an 11-tap window need more than 160 pixels on each side
MS_SSIM_MIN_SIDE = 161
CODECS = ("jpeg", "webp", "avif", "jxl")
DEFAULT_LADDERS = {
    "jpeg": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "webp": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "avif": (10, 20, 30, 40, 50, 60, 70, 80, 90),
    "jxl": (10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
}
CODEC_LABELS = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF", "jxl": "JPEG XL"}
#: CompressAI's result keys, and the other spellings found in published files
KEYS = {
    "bpp": ("bpp",),
    "psnr": ("psnr-rgb", "psnr"),
    "ms-ssim": ("ms-ssim-rgb", "ms-ssim"),
    "ms-ssim-db": ("ms-ssim-db-rgb", "ms-ssim-rgb-db", "ms-ssim-db"),
    "enc": ("encoding_time",),
    "dec": ("decoding_time",),
}
#: (metric, title, field suffix in bd-rate.json)
BD_METRICS = (("psnr", "PSNR", "psnr"), ("ms-ssim-db", "MS-SSIM dB", "ms_ssim_db"))


def default_anchors_dir() -> Path:
    """Published curves: ``$LALIC_ANCHORS``, else ``shared/anchors`` beside the repository."""
    env = os.environ.get("LALIC_ANCHORS")
    return Path(env) if env else shared_dir() / "anchors"


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
# measures (pure functions)


def bits_per_pixel(n_bytes: int, width: int, height: int) -> float:
    return 8.0 * n_bytes / (width * height)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two 8-bit images, the pipeline's own definition (peak 255, mean over all samples)."""
    from .pipeline import psnr as _psnr

    return _psnr(a, b)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM of two (H, W, 3) uint8 images (pytorch-msssim, data_range 255); None when too small."""
    if min(a.shape[0], a.shape[1]) < MS_SSIM_MIN_SIDE:
        return None
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float().unsqueeze(0)

    with torch.inference_mode():
        return float(_ms_ssim(t(a), t(b), data_range=255, size_average=True))


def ms_ssim_db(m: float | None) -> float | None:
    if m is None:
        return None
    return math.inf if m >= 1.0 else -10.0 * math.log10(1.0 - m)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _rd_points(rates, dists) -> list[tuple[float, float]]:
    """(rate, distortion) sorted by rate, keeping only points better than every cheaper one."""
    pts = sorted((float(r), float(d)) for r, d in zip(rates, dists) if _finite(r) and _finite(d) and r > 0)
    out: list[tuple[float, float]] = []
    for r, d in pts:
        if not out or d > out[-1][1]:
            out.append((r, d))
    return out


@dataclass
class BDResult:
    value: float | None  # percent; negative = fewer bits than the anchor for the same quality
    note: str | None = None  # why value is None
    common_range: tuple | None = None  # (lo, hi) quality range the rates were averaged over
    overlap: float | None = None  # that range as a fraction of the two curves' joint range


def bd_rate(anchor_rate, anchor_dist, test_rate, test_dist, unit: str = "dB") -> BDResult:
    """Bjontegaard delta rate (percent, pchip) of a test curve against an anchor curve.

    Points need not be sorted or equal in number; points not better than a cheaper point of the
    same curve are left out.  The rates are averaged over the common quality range (reported with
    the result); curves with no common range give ``None`` and the reason."""
    a = _rd_points(anchor_rate, anchor_dist)
    t = _rd_points(test_rate, test_dist)
    for pts, rates, who in ((a, anchor_rate, "the anchor has"), (t, test_rate, "this curve has")):
        if len(pts) < 2:
            why = f"{who} {len(pts)} usable point{'s' * (len(pts) != 1)}, 2 needed"
            if len(pts) < len(rates):
                why += " (points null or no better than a cheaper one are left out)"
            return BDResult(None, why)
    a_lo, a_hi, t_lo, t_hi = a[0][1], a[-1][1], t[0][1], t[-1][1]
    lo, hi = max(a_lo, t_lo), min(a_hi, t_hi)
    if hi <= lo:
        return BDResult(None, f"no common quality range (anchor {a_lo:.2f}-{a_hi:.2f} {unit}, this curve {t_lo:.2f}-{t_hi:.2f} {unit})")
    import bjontegaard as bd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = bd.bd_rate(
            [r for r, _ in a], [d for _, d in a], [r for r, _ in t], [d for _, d in t],
            method="pchip", require_matching_points=False, min_overlap=0,
        )
    if not _finite(value):
        return BDResult(None, "not computable")
    overlap = (hi - lo) / (max(a_hi, t_hi) - min(a_lo, t_lo))
    return BDResult(float(value), None, (lo, hi), overlap)


# ------------------------------------------------------------------------------------------------
# curves


@dataclass
class Curve:
    name: str
    description: str
    results: dict  # CompressAI keys -> lists, one value per point
    meta: dict = field(default_factory=dict)
    key: str = ""  # file stem (measured) or path under the anchors folder (published)
    published: bool = False
    points: list = field(default_factory=list)  # labels of the points (quality, weights)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.key})" if self.published else self.name

    def values(self, metric: str) -> list | None:
        for k in KEYS[metric]:
            if k in self.results:
                return [None if v is None else float(v) for v in self.results[k]]
        if metric == "ms-ssim-db":
            m = self.values("ms-ssim")
            return None if m is None else [ms_ssim_db(v) for v in m]
        return None

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "meta": self.meta, "results": self.results}


def load_curve(path: str | Path, key: str | None = None) -> Curve:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
        res = d["results"]
        n = len(res["bpp"])
        if not any(k in res and len(res[k]) == n for k in KEYS["psnr"] + KEYS["ms-ssim"] + KEYS["ms-ssim-db"]):
            raise KeyError("psnr")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{p}: not a rate-distortion curve in CompressAI's layout ({type(e).__name__}: {e})") from None
    return Curve(str(d.get("name") or p.stem), str(d.get("description") or ""), res, d.get("meta") or {},
                 key or p.stem, published=True, points=[None] * n)


def find_published(name: str, root: Path) -> tuple[Path, str]:
    """A published curve by path, by path under ``root`` (with or without .json), or by unique file stem."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        try:
            return p, p.resolve().relative_to(root.resolve()).with_suffix("").as_posix()
        except ValueError:
            return p, p.stem
    for cand in (root / name, root / f"{name}.json"):
        if cand.is_file():
            return cand, cand.relative_to(root).with_suffix("").as_posix()
    found = sorted(root.rglob("*.json")) if root.is_dir() else []
    keys = {f.relative_to(root).with_suffix("").as_posix(): f for f in found}
    hits = [k for k in keys if k == name or k.endswith("/" + name)]
    if len(hits) == 1:
        return keys[hits[0]], hits[0]
    if len(hits) > 1:
        raise BadInputError(f"published curve {name!r} is ambiguous: {', '.join(hits)}")
    avail = ", ".join(sorted(keys)) if keys else f"none: {root} has no .json curves"
    raise BadInputError(f"no published curve {name!r} (available: {avail}; set --anchors-dir or LALIC_ANCHORS)")


def resolve_anchor(name: str, curves: list[Curve], root: Path) -> Curve:
    """The anchor among the curves (by file stem, name or label, case-insensitive), else a published one."""
    n = name.lower()
    for c in curves:
        if n in (c.key.lower(), c.name.lower(), c.label.lower()):
            return c
    path, key = find_published(name, root)
    for c in curves:
        if c.published and c.key == key:
            return c
    c = load_curve(path, key)
    curves.append(c)
    return c


def bd_table(curves: list[Curve], anchor: Curve) -> list[dict]:
    rows = []
    for c in curves:
        row = {"curve": c.label, "anchor": c is anchor}
        for metric, title, suffix in BD_METRICS:
            ra, da, rt, dt = anchor.values("bpp"), anchor.values(metric), c.values("bpp"), c.values(metric)
            if not da or all(v is None for v in da):
                r = BDResult(None, f"the anchor has no {title} values")
            elif not dt or all(v is None for v in dt):
                r = BDResult(None, f"this curve has no {title} values")
            else:
                r = bd_rate(ra, da, rt, dt)
            row[f"bd_rate_{suffix}"] = r.value
            row[f"range_{suffix}"] = list(r.common_range) if r.common_range else None
            row[f"note_{suffix}"] = r.note
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# coders


@dataclass
class Source:
    name: str
    image: object  # the opened PIL image, as the CLI would open it
    rgb: np.ndarray  # the RGB input as the pipeline prepares it


class Coder:
    """One curve: ``points`` are its rate points, ``encode``/``decode`` one image at one point."""

    name: str
    key: str
    description: str
    points: list
    rate_key = "quality"

    def encode(self, src: Source, point) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, point) -> np.ndarray:
        raise NotImplementedError

    def meta(self) -> dict:
        return {}

    def point_label(self, point):
        return point


class PillowCoder(Coder):
    FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF", "jxl": "JXL"}

    def __init__(self, codec: str, qualities):
        self.key, self.name, self.points = codec, CODEC_LABELS[codec], list(qualities)
        self.format = self.FORMATS[codec]
        self.description = f"{self.name} through Pillow defaults with quality set ({codec_version(codec)})"

    def encode(self, src: Source, q) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(src.rgb, "RGB").save(buf, format=self.format, quality=int(q))
        return buf.getvalue()

    def decode(self, data: bytes, q) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)


def codec_version(codec: str) -> str:
    import PIL
    from PIL import features

    if codec == "jxl":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"pillow-jxl-plugin {version('pillow-jxl-plugin')}"
        except PackageNotFoundError:
            return "JPEG XL plugin"
    lib = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}[codec]
    v = features.version(lib)
    libname = {"jpeg": "libjpeg", "webp": "libwebp", "avif": "libavif"}[codec]
    if codec == "jpeg" and features.check_feature("libjpeg_turbo"):
        libname = "libjpeg-turbo"
        v = features.version_feature("libjpeg_turbo") or v
    return f"Pillow {PIL.__version__}, {libname} {v}"


def codec_available(codec: str) -> str | None:
    """None if the codec can be used here, else why not."""
    from PIL import Image, features

    if codec == "jxl":
        try:
            import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)
        except ImportError:
            return "JPEG XL skipped: pillow-jxl-plugin is not installed"
        return None if "JXL" in Image.SAVE else "JPEG XL skipped: the Pillow plugin did not register an encoder"
    feature = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}[codec]
    if not features.check(feature):
        return f"{CODEC_LABELS[codec]} skipped: this Pillow ({Image.__version__}) was built without it"
    return None


class ModelCoder(Coder):
    """A model of ours: one point per quality (variable-rate) or per weights file (fixed-rate)."""

    def __init__(self, model: str, weights: list[str], qualities, device: str):
        from . import pipeline

        self.key = self.name = model
        self.device = device
        self.notes: list[str] = []
        if len(weights) > 1:
            loaded = [pipeline.load_model(model, w, device) for w in weights]
            if any(lm.variable_rate for lm in loaded):
                raise BadInputError(f"model {model}: give one weights file for a variable-rate model (its points are --quality)")
            self.points = [(w, None) for w in weights]
            self.rate_key = "weights"
            lm = loaded[0]
        else:
            w = weights[0] if weights else None
            lm = pipeline.load_model(model, w, device)
            if lm.variable_rate:
                L = lm.model.num_levels
                qs = list(qualities) if qualities else [float(q) for q in range(1, L + 1)]
                bad = [q for q in qs if not 1 <= q <= L]
                if bad:
                    raise BadInputError(f"model {model}: quality must be between 1 and {L}, got {bad[0]:g}")
                self.points = [(w, q) for q in qs]
            else:
                self.points = [(w, None)]
                self.rate_key = "weights"
        if self.rate_key == "weights" and qualities:
            self.notes.append(f"{model} has a fixed rate: --quality does not apply, its points are its weights files")
        from . import __version__

        src = ", ".join(str(w) for w in weights) if weights else "bundled weights"
        fps = ", ".join(pipeline.load_model(model, w, device).fingerprint.hex() for w in dict.fromkeys(w for w, _ in self.points))
        self.lm = lm
        self.description = f"lalic-codec {__version__}, model {lm.model_id} ({src}; fingerprint {fps}), device {lm.device}"

    def encode(self, src: Source, point) -> bytes:
        from . import pipeline

        w, q = point
        lm = pipeline.load_model(self.name, w, self.device)  # cached: a dictionary look-up
        return pipeline.encode_image(src.image, lm, q).data

    def decode(self, data: bytes, point) -> np.ndarray:
        from . import pipeline

        return np.asarray(pipeline.decode_bytes(data, point[0], self.device).image.convert("RGB"), dtype=np.uint8)

    def point_label(self, point):
        w, q = point
        return q if self.rate_key == "quality" else (Path(w).name if w else self.name)


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
    from . import pipeline
    from .files import IMAGE_SUFFIXES

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
            im = pipeline.open_image(f.read_bytes())
        except BadInputError as e:
            raise BadInputError(f"{f}: {e}") from None
        out.append(Source(f.name, im, pipeline.prepare_image(im).rgb))
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
# outputs


def _clean(v):
    """JSON-safe: non-finite floats become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")


def _f(v, digits: int) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:+.2f} %"


def summary_markdown(curves: list[Curve], anchor: Curve, bd_rows: list[dict], header: dict, notes: list[str]) -> str:
    lines = [f"# codec bench: {header['dataset']}", ""]
    lines.append(f"{header['images']} image{'s' * (header['images'] != 1)} ({', '.join(header['image_names'][:6])}"
                 f"{', ...' if header['images'] > 6 else ''}); device {header['device']}; torch {header['torch']}, "
                 f"{header['threads']} thread{'s' * (header['threads'] != 1)}; {header['date']}.")
    lines.append("bpp from the real encoded sizes (headers included); PSNR and MS-SSIM on 8-bit RGB; "
                 "times are wall seconds per image; peak RSS is the process high-water mark during the point.")
    if notes:
        lines += [""] + [f"* {n}" for n in notes]
    lines += ["", f"## BD-rate against {anchor.label}", "",
              "Bjontegaard delta rate (pchip): average bit-rate difference at equal quality, over the quality "
              "range the two curves share (in brackets); negative is better.", "",
              "| curve | BD-rate (PSNR) | BD-rate (MS-SSIM dB) |", "| --- | ---: | ---: |"]
    for row in bd_rows:
        cells = []
        for _, _, suffix in BD_METRICS:
            v, note, rng = row[f"bd_rate_{suffix}"], row[f"note_{suffix}"], row[f"range_{suffix}"]
            if row["anchor"]:
                cells.append("anchor")
            elif v is None:
                cells.append(f"n/a: {note}")
            else:
                cells.append(f"{_pct(v)} [{rng[0]:.2f}-{rng[1]:.2f} dB]")
        lines.append(f"| {row['curve']} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Rate-distortion and speed", "",
              "| curve | quality | bpp | PSNR (dB) | MS-SSIM (dB) | encode (s) | decode (s) | peak RSS (MiB) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in curves:
        cols = [c.values(k) for k in ("bpp", "psnr", "ms-ssim-db", "enc", "dec")]
        rss = c.results.get("peak_rss_mib")
        n = len(cols[0])
        for i in range(n):
            get = lambda col, d: _f(col[i], d) if col is not None else "n/a"  # noqa: E731
            q = c.points[i] if i < len(c.points) and c.points[i] is not None else "published"
            q = f"{q:g}" if isinstance(q, float) else str(q)
            lines.append(f"| {c.label} | {q} | {get(cols[0], 4)} | {get(cols[1], 2)} | {get(cols[2], 2)} | "
                         f"{get(cols[3], 4)} | {get(cols[4], 4)} | {get(rss, 0)} |")
    return "\n".join(lines) + "\n"


def plot_rd(curves: list[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("psnr", "PSNR (dB)")]
    if any(c.values("ms-ssim-db") and any(_finite(v) for v in c.values("ms-ssim-db")) for c in curves):
        panels.append(("ms-ssim-db", "MS-SSIM (dB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], panels):
        for i, c in enumerate(curves):
            ys = c.values(metric)
            if ys is None:
                continue
            pts = sorted((b, y) for b, y in zip(c.values("bpp"), ys) if _finite(b) and _finite(y))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if c.published else "-",
                    marker="" if c.published else "o", markersize=4, label=c.label, color=f"C{i % 10}", linewidth=1.2 if c.published else 1.8)
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    from .exits import exit_codes

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

    from . import __version__
    from ._runtime import tune_allocator

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


if __name__ == "__main__":
    cli(prog_name="python -m lalic_codec.bench")
