"""Measures, rate-distortion curves and BD-rates of ``codec bench``: bits per pixel, PSNR and
MS-SSIM; curves in CompressAI's results layout (measured here, or published ones read from JSON);
the Bjontegaard delta rate of a curve against an anchor."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._paths import shared_dir
from ..errors import BadInputError

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


#: pytorch-msssim's 5 scales with an 11-tap window need more than 160 pixels on each side
MS_SSIM_MIN_SIDE = 161


def default_anchors_dir() -> Path:
    """Published curves: ``$LALIC_ANCHORS``, else ``shared/anchors`` beside the repository."""
    env = os.environ.get("LALIC_ANCHORS")
    return Path(env) if env else shared_dir() / "anchors"



# ------------------------------------------------------------------------------------------------
# measures (pure functions)


def bits_per_pixel(n_bytes: int, width: int, height: int) -> float:
    return 8.0 * n_bytes / (width * height)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two 8-bit images, the codec's own definition (peak 255, mean over all samples)."""
    from ..imaging import psnr as _psnr

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


def is_finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _rd_points(rates, dists) -> list[tuple[float, float]]:
    """(rate, distortion) sorted by rate, keeping only points better than every cheaper one."""
    pts = sorted((float(r), float(d)) for r, d in zip(rates, dists) if is_finite(r) and is_finite(d) and r > 0)
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


def bd_rate(anchor_rate, anchor_dist, test_rate, test_dist, unit: str = "dB", within: tuple | None = None) -> BDResult:
    """Bjontegaard delta rate (percent, pchip) of a test curve against an anchor curve.

    Points need not be sorted or equal in number; points not better than a cheaper point of the
    same curve are left out.  The rates are averaged over the common quality range (reported with
    the result), or over its part inside ``within = (lo, hi)`` (e.g. to compare two models whose
    ladders span different qualities over the same range); curves with no common range give
    ``None`` and the reason."""
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
    if within is not None:
        lo, hi = max(lo, float(within[0])), min(hi, float(within[1]))
        if hi <= lo:
            return BDResult(None, f"the common quality range has no part in {within[0]:.2f}-{within[1]:.2f} {unit}")
    import bjontegaard as bd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value, f_anchor, f_test = bd.bd_rate(
            [r for r, _ in a], [d for _, d in a], [r for r, _ in t], [d for _, d in t],
            method="pchip", require_matching_points=False, min_overlap=0, interpolators=True,
        )
        if within is not None:  # the package's own average, over the narrower range (log10 rates)
            value = (10 ** ((f_test.integrate(lo, hi) - f_anchor.integrate(lo, hi)) / (hi - lo)) - 1) * 100
    if not is_finite(value):
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
