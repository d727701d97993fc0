"""Loading weights: official checkpoints (.pth/.pth.tar/.pt) and our safetensors files.

Official checkpoints are pickles; they are only ever opened with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers, so a crafted file cannot run code.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from ..errors import MissingWeightsError, ModelError

_EB_OLD = re.compile(r"(entropy_bottleneck)\._(matrix|bias|factor)(\d+)$")
_EB_PLURAL = {"matrix": "matrices", "bias": "biases", "factor": "factors"}


class WeightsFileError(ModelError, ValueError):
    """A safetensors weights file whose structure is inconsistent (e.g. a broken alias)."""


def unwrap_checkpoint(obj) -> dict:
    """The state dict inside a checkpoint: ``obj["state_dict"]``, ``["model_state_dict"]``, ``["model"]`` or ``obj``."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(torch.is_tensor(v) for v in inner.values()):
                return inner
        if any(torch.is_tensor(v) for v in obj.values()):
            return obj
    raise ModelError("the checkpoint holds no state dict (expected a dict of tensors or a 'state_dict' entry)")


def normalize_keys(sd: dict, strip_all_module: bool = False) -> dict:
    """Undo training wrappers and old naming: ``module.`` prefixes (DataParallel), CompressAI 1.2.6's
    ``entropy_bottleneck._matrix0`` style names, and ``.downsample.`` -> ``.skip.`` (official eval's rename)."""
    out = {}
    for key, value in sd.items():
        if not torch.is_tensor(value):
            continue
        k = key.replace("module.", "") if strip_all_module else re.sub(r"^(module\.)+", "", key)
        k = k.replace(".downsample.", ".skip.")
        m = _EB_OLD.search(k)
        if m:
            k = k[: m.start()] + f"{m.group(1)}.{_EB_PLURAL[m.group(2)]}.{m.group(3)}"
        out[k] = value
    return out


def load_state_dict_file(path: str | Path) -> dict:
    """Read a checkpoint or safetensors file into a plain {name: tensor} dict (CPU, keys normalised)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"cannot read {path.name}: {e}") from None
        return expand_aliases(sd, meta.get("aliases"), path.name)
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds; weights_only refuses code objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {path.name} as a weights-only checkpoint: {first[:200]}") from None
    return normalize_keys(unwrap_checkpoint(obj))


def fingerprint(model: torch.nn.Module) -> bytes:
    """16-byte fingerprint of a model's exact weights: SHA-256 over its state dict in sorted key order
    (name, dtype, shape, raw bytes of the float32/int32 tensors).  Stored in every .lic header."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_raw_bytes(t))
    return h.digest()[:16]


def _raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor (bfloat16, which numpy lacks, as int16)."""
    return t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()


def expand_aliases(sd: dict, aliases: str | None, name: str = "the weights file") -> dict:
    """Restore the tensors ``save_weights`` wrote once: ``aliases`` is the file's ``"aliases"``
    metadata, a JSON map ``{"dup.key": "stored.key"}``; each dup gets its own copy of the stored
    tensor.  A map that is not of that form, names a tensor the file lacks or one it already
    holds is refused (``ModelError``, also a ``ValueError``)."""
    if aliases is None:
        return sd
    import json

    try:
        amap = json.loads(aliases)
    except ValueError:
        amap = None
    if not isinstance(amap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in amap.items()):
        raise WeightsFileError(f"cannot read {name}: its 'aliases' metadata is not a JSON map of names to names")
    out = dict(sd)
    for dup, first in amap.items():
        if first not in sd:
            raise WeightsFileError(f"cannot read {name}: alias {dup!r} refers to {first!r}, which the file does not hold")
        if dup in sd:
            raise WeightsFileError(f"cannot read {name}: alias {dup!r} names a tensor the file also holds")
        out[dup] = sd[first].clone()
    return out


#: buffers that stay float32 in fp16 weight files (they define coding tables or tiny bounds)
_KEEP_FP32 = ("scale_table", "scale_bound", "lambdas", ".bound", "quantiles", "target")

#: table buffers written once when several modules hold bit-identical copies (the Gaussian tables
#: of every channel group); the copies are recorded in the ``"aliases"`` metadata
_SHARED_TABLES = ("_quantized_cdf", "_cdf_length", "_offset", "scale_table")


def save_weights(model: torch.nn.Module, path: str | Path, fp16: bool = True, metadata: dict | None = None) -> Path:
    """Write a model as safetensors: CDF tables computed if missing (int32), floats in fp16 unless
    ``fp16=False``; a module registered under two names (LALIC's top-level ``h_a``/``h_s``) is
    written once, under its first name, and the loaders restore the alias.  Bit-identical table
    buffers (``_SHARED_TABLES``, e.g. the Gaussian tables of every channel group) are also written
    once; the other names go to the ``"aliases"`` metadata (a reserved key), which
    ``load_state_dict_file`` expands, so the loaded state dict is the one saved."""
    import json
    import os

    from safetensors.torch import save_file

    model.update(force=False)
    tensors = {}
    seen: set = set()
    tables: dict = {}  # (dtype, shape, sha256) -> the first table buffer written with them
    aliases: dict = {}
    for k, v in model.state_dict(keep_vars=True).items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
        if v.numel() and key in seen:
            continue  # an alias of a tensor already written
        seen.add(key)
        v = v.detach().cpu().contiguous()
        if fp16 and v.is_floating_point() and not k.endswith(_KEEP_FP32):
            v = v.half()
        if k.endswith(_SHARED_TABLES):
            raw = _raw_bytes(v)
            first = tables.setdefault((v.dtype, tuple(v.shape), hashlib.sha256(raw).digest()), k)
            if first != k and _raw_bytes(tensors[first]) == raw:
                aliases[k] = first
                continue
        tensors[k] = v
    meta = {"format": "lalic-codec weights v1", "architecture": type(model).__name__}
    if hasattr(model, "config"):
        meta["config"] = json.dumps(model.config.to_dict())
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    meta.pop("aliases", None)
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
