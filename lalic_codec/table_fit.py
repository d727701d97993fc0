"""Fit the CDF tables of y in a weights file to the symbols its encoder codes.

A model codes each symbol of y with one of 64 CDF tables, which training builds as discretised
Gaussians of 64 scales.  What the encoder actually codes is not quite Gaussian: the network's
scales are not exact, and the rate-distortion-optimised rounding moves symbols towards zero.
``codec train fit-tables`` encodes crops of training images at every quality (the real encoder,
rounding included), counts which symbol each table coded, and writes a copy of the weights file
whose tables are fitted to those counts (``entropy.tables.fit_cdf_tables``: the counts with the
Gaussian as a prior).  Every other tensor of the file is copied byte for byte; the tables keep
their rows, symbols and escape (FORMAT.md 12.1), so any decoder reads them as before.  The
weights' fingerprint changes with the tables: files made with the fitted weights decode with
them only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .entropy.tables import CdfTables, fit_cdf_tables, symbol_counts

#: the weights' tensors that hold y's tables (every channel group's Gaussian conditional)
_Y_TABLE = "gaussian_conditional._quantized_cdf"


def y_tables(model) -> CdfTables:
    """The one table set every Gaussian conditional of ``model`` codes y with."""
    first, *others = (gc.tables() for gc in model.gaussian_conditionals())
    if any(not np.array_equal(a, b) for t in others for a, b in zip(t, first)):
        raise ValueError("the channel groups code y with different tables: fitting them is not supported")
    return first


def coded_counts(model, images: list[torch.Tensor], qualities: list[float],
                 log: Callable[[str], None] | None = None) -> np.ndarray:
    """Counts (:func:`symbol_counts`) of the y symbols ``model``'s encoder codes for each image at
    each quality: its own rate-distortion-optimised rounding, merged streams, no post-filter
    (which does not change y).  ``images``: (1, 3, H, W) in [0, 1], H and W multiples of 64."""
    tables = y_tables(model)
    counts = np.zeros(tables.code_lengths().shape, dtype=np.int64)
    for n, x in enumerate(images):
        for q in qualities:
            coded = model.compress(x, quality=torch.tensor([float(q)]), debug=True, merged=True)
            for idx, sym in zip(coded.debug["scale_indexes"], coded.debug["symbols"]):
                counts += symbol_counts(tables, idx.cpu().numpy(), sym.cpu().numpy())
        if log:
            log(f"image {n + 1}/{len(images)}: {int(counts.sum()):,} symbols")
    return counts


def write_with_y_tables(src: str | Path, dst: str | Path, tables: CdfTables, note: dict) -> Path:
    """Copy the weights file ``src`` to ``dst`` with y's tables replaced by ``tables`` (same rows,
    lengths and offsets: only the frequencies may change) and ``note`` in its ``"y_tables"``
    metadata; every other tensor and metadata entry is copied as it is."""
    from safetensors import safe_open

    from .models.checkpoints import _pack_cdf_table, write_safetensors

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    stored = [k for k in tensors if k.endswith(_Y_TABLE)]  # once, the other groups' aliases of it
    if not stored:
        raise ValueError(f"{Path(src).name} holds no tables of y")
    packed = json.loads(meta.get("packed_cdfs", "{}"))
    cdf, lengths = torch.from_numpy(tables.quantized_cdf), torch.from_numpy(tables.cdf_length)
    for key in stored:
        prefix = key[: -len("_quantized_cdf")]
        if not (torch.equal(tensors[prefix + "_cdf_length"], lengths)
                and np.array_equal(tensors[prefix + "_offset"].numpy(), tables.offset)):
            raise ValueError("the fitted tables have other rows than the file's")
        new = _pack_cdf_table(cdf, lengths) if key in packed else cdf.clone()  # packed as save_weights packs
        if new is None or new.shape != tensors[key].shape:
            raise ValueError("the fitted tables do not have the shape of the file's")
        tensors[key] = new
    meta["y_tables"] = json.dumps(note)
    return write_safetensors(tensors, dst, meta)


def fit_tables(src: str | Path, dst: str | Path, images: list[torch.Tensor], qualities: list[float],
               prior_weight: float = 100.0, note: dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Fit the y tables of the weights file ``src`` to what its encoder codes for ``images`` ((1, 3,
    H, W) in [0, 1], H and W multiples of 64) at ``qualities``; write the result to ``dst`` with
    ``note`` in its metadata.  Returns the fit's summary: symbols counted, and the bits of those
    symbols under the old and the new tables."""
    from . import loading

    if Path(src).suffix != ".safetensors":
        raise ValueError(f"{Path(src).name}: fit-tables reads and writes .safetensors weights (codec train export writes them)")
    if not images:
        raise ValueError("no image of at least 64 x 64 pixels to fit the tables to")
    model = loading.load_model("default", Path(src), "cpu").model
    base = y_tables(model)
    counts = coded_counts(model, images, qualities, log)
    fitted = fit_cdf_tables(base, counts, prior_weight)
    used = counts > 0  # the padding's lengths are infinite and never counted
    before = float((counts[used] * base.code_lengths()[used]).sum())
    after = float((counts[used] * fitted.code_lengths()[used]).sum())
    note = {**(note or {}), "images": len(images), "qualities": list(qualities), "prior_weight": prior_weight,
            "symbols": int(counts.sum())}
    write_with_y_tables(src, dst, fitted, note)
    return {**note, "bits_before": before, "bits_after": after}
