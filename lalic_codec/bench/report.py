"""What ``codec bench`` writes: JSON files (non-finite values as null), ``summary.md`` and the
rate-distortion plot ``rd.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .curves import BD_METRICS, Curve, is_finite

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
    if any(c.values("ms-ssim-db") and any(is_finite(v) for v in c.values("ms-ssim-db")) for c in curves):
        panels.append(("ms-ssim-db", "MS-SSIM (dB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], panels):
        for i, c in enumerate(curves):
            ys = c.values(metric)
            if ys is None:
                continue
            pts = sorted((b, y) for b, y in zip(c.values("bpp"), ys) if is_finite(b) and is_finite(y))
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
