"""``codec bench``: rate-distortion and speed of our models and of the codecs people use today.

For every model and quality (and every conventional codec and quality) on a folder of images:
bits per pixel from the real encoded sizes (``.lic`` files with their headers), PSNR and MS-SSIM
on the 8-bit RGB decoded output against the RGB input as the pipeline prepares it, encode and
decode wall seconds, and peak memory.  Then BD-rates (Bjontegaard, pchip) of every curve against
an anchor, which may be a published curve (CompressAI's JSON layout).

Outputs (``--out``): ``<curve>.json`` per measured curve in CompressAI's results layout,
``per-image.json``, ``bd-rate.json``, ``summary.md`` and ``rd.png``.

* :mod:`.curves`: measures (bpp, PSNR, MS-SSIM), curves (measured and published) and BD-rates;
* :mod:`.coders`: our models and the conventional codecs, as the points of a curve;
* :mod:`.runner`: the command (``cli``) and the run (``run``, ``measure``);
* :mod:`.report`: the JSON files, ``summary.md`` and ``rd.png``.

Also runnable as ``python -m lalic_codec.bench``.  No torch at module level: the command checks
for the optional packages (``pip install -e '.[bench]'``) before anything heavy is imported.
"""

from __future__ import annotations

from ..errors import BadInputError, CodecError, MissingExtrasError
from .coders import (CODEC_LABELS, CODECS, DEFAULT_LADDERS, Coder, ModelCoder, PillowCoder, Source, codec_available,
                     codec_version)
from .curves import (BD_METRICS, KEYS, MS_SSIM_MIN_SIDE, BDResult, Curve, bd_rate, bd_table, bits_per_pixel,
                     default_anchors_dir, find_published, load_curve, ms_ssim, ms_ssim_db, psnr, resolve_anchor)
from .report import plot_rd, summary_markdown, write_json
from .runner import EXTRAS, cli, load_sources, measure, peak_rss_mib, require_extras, run

__all__ = [
    "BadInputError", "CodecError", "MissingExtrasError",
    "CODEC_LABELS", "CODECS", "DEFAULT_LADDERS", "Coder", "ModelCoder", "PillowCoder", "Source", "codec_available", "codec_version",
    "BD_METRICS", "KEYS", "MS_SSIM_MIN_SIDE", "BDResult", "Curve", "bd_rate", "bd_table", "bits_per_pixel", "default_anchors_dir",
    "find_published", "load_curve", "ms_ssim", "ms_ssim_db", "psnr", "resolve_anchor",
    "plot_rd", "summary_markdown", "write_json",
    "EXTRAS", "cli", "load_sources", "measure", "peak_rss_mib", "require_extras", "run",
]
