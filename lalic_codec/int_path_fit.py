"""Fitting the integer scale path alone, on the frozen features of a trained model.

The integer scale path (``models/int_scale.py``) only picks table indexes.  The latent, the
means and the residual symbols it sees come from the rest of the network and do not depend on
it, so the path can be trained after the rest: run the trained network once over a fixed set of
training crops, keep y, the means, the residual symbols and z's symbols, and train the path alone
on that cache for the y rate.  Each step costs a few per cent of a full training step, and the
distortion cannot change.  Used by ``codec train fit-int-path`` (after a training run, before
export) and by ``benchmarks/compare_int_paths.py`` (layouts compared at equal CPU time); the
caches of training and held-out crops are made in :mod:`lalic_codec.train`
(:func:`~lalic_codec.train.int_path_training_cache`), which owns the data.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .models.int_scale import IntegerScalePath
from .models.lalic import checkerboard_mask


@torch.no_grad()
def features(model, x: torch.Tensor, q: torch.Tensor) -> dict:
    """y, the float scales and means of every channel group, and z's symbols, computed by the
    model's float path in evaluation mode (the means are those both paths code with)."""
    saved, model.scale_path = model.scale_path, None
    captured = []
    hooks = [gc.register_forward_pre_hook(lambda m, args: captured.append(args[:3])) for gc in model.gaussian_conditionals()]
    was = model.training
    try:
        model.eval()
        out = model(x, quality=q)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
        model.scale_path = saved
    z_sym = torch.round(out["z"] - model.entropy_bottleneck.medians().view(1, -1, 1, 1))
    ys, scales, means = zip(*captured)
    return {"z_sym": z_sym, "q": q, "y": list(ys), "scales": list(scales), "means": list(means), "pixels": x.shape[2] * x.shape[3] * x.shape[0]}


def rate_bits(path: IntegerScalePath, f: dict, gcs, exact: bool) -> torch.Tensor:
    """Total y bits of one cached batch with table indexes from ``path``: in training
    (``exact=False``) with the log-linear table interpolation and uniform noise, as in training the
    whole model; with ``exact`` the table entries and the quantised latent, as the coder sees them."""
    table = gcs[0].scale_table
    hyper = path.hyper_features(f["z_sym"], f["q"])
    prev, bits = [], 0.0
    for k, (y, mu) in enumerate(zip(f["y"], f["means"])):
        r = torch.round(y - mu)
        anchor = checkerboard_mask(*y.shape[-2:], True, y.device)
        idx = path.indexes(k, hyper, prev, None, f["q"]) * anchor + path.indexes(k, hyper, prev, r * anchor, f["q"]) * (1 - anchor)
        if exact:
            s, yq = table[idx.long()], r + mu
        else:
            s, yq = IntegerScalePath.table_scales(idx, table), y + torch.empty_like(y).uniform_(-0.5, 0.5)
        lik = gcs[k].likelihood_lower_bound(gcs[k].likelihood(yq, s, mu))
        bits = bits - torch.log2(lik).sum()
        prev.append(r)
    return bits


def float_bits(f: dict, gcs) -> float:
    """Total y bits of one cached batch with the float scales' table indexes (FORMAT.md 11.5)."""
    bits = 0.0
    for k, (y, s, mu) in enumerate(zip(f["y"], f["scales"], f["means"])):
        idx = gcs[k].build_indexes(s)
        lik = gcs[k].likelihood_lower_bound(gcs[k].likelihood(torch.round(y - mu) + mu, gcs[k].scale_table[idx.long()], mu))
        bits -= torch.log2(lik).sum().item()
    return bits


@torch.no_grad()
def held_out_bpp(path: IntegerScalePath, val: list[dict], gcs) -> float:
    was = path.training
    path.eval()
    try:
        return sum(rate_bits(path, f, gcs, exact=True).item() for f in val) / sum(f["pixels"] for f in val)
    finally:
        path.train(was)


def fit(path: IntegerScalePath, cache: list[dict], gcs, cpu_seconds: float, lr: float = 1e-3, bias_lr_mult: float = 20.0,
        val: list[dict] | None = None, log=None) -> dict:
    """Train ``path`` alone on ``cache`` for ``cpu_seconds`` of process CPU time (Adam, cosine decay
    to lr/20).  With ``val``, keeps the parameters with the lowest held-out rate (checked every
    ``len(cache)`` steps, and at the start) and returns a summary."""
    weights = [p for n, p in path.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in path.named_parameters() if n.endswith("bias")]
    opt = torch.optim.Adam([{"params": weights, "lr": lr, "base": lr}, {"params": biases, "lr": lr * bias_lr_mult, "base": lr * bias_lr_mult}])
    best = (held_out_bpp(path, val, gcs), {k: v.clone() for k, v in path.state_dict().items()}) if val else None
    start_bpp = best[0] if best else None
    path.train()
    c0, t0, step = time.process_time(), time.time(), 0
    while (used := time.process_time() - c0) < cpu_seconds:
        frac = used / cpu_seconds
        for g in opt.param_groups:
            g["lr"] = g["base"] * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        f = cache[step % len(cache)]
        loss = rate_bits(path, f, gcs, exact=False) / f["pixels"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if val and step % len(cache) == 0:
            v = held_out_bpp(path, val, gcs)
            if log:
                log(f"step {step}: held-out y {v:.4f} bpp")
            if v < best[0]:
                best = (v, {k: t.clone() for k, t in path.state_dict().items()})
    path.eval()
    if val:
        v = held_out_bpp(path, val, gcs)
        if v < best[0]:
            best = (v, {k: t.clone() for k, t in path.state_dict().items()})
        path.load_state_dict(best[1])
    return {"steps": step, "cpu_seconds": time.process_time() - c0, "seconds": time.time() - t0,
            "held_out_bpp_start": start_bpp, "held_out_bpp": best[0] if best else None}
