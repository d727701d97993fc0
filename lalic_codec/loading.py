"""Model loading: the bundled models, weights files, the device, and a per-process cache.

:func:`load_model` finds the weights (a bundled model by name, or a file), builds the network the
registry recognises in them (:func:`build_from_state_dict`) and keeps it, per file and device, for
the rest of the process (:func:`clear_model_cache` empties that cache).  Used by the encode/decode
layer (:mod:`.pipeline`), the Python API and ``codec batch``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import models as _models_pkg
from .errors import BadInputError, MissingWeightsError, ModelError
from .models.checkpoints import fingerprint, load_state_dict_file

MODELS_DIR = Path(_models_pkg.__file__).resolve().parent  # works for wheel and editable installs
#: bundled variable-rate model: model id -> weights file inside the package
BUNDLED = {"default-v10": "default-v10.safetensors"}
DEFAULT_MODEL = "default-v10"
#: bundled models of earlier versions: model id -> (its weights file, a commit that holds it)
RETIRED = {"default-v1": ("default-v1.safetensors", "87fa0ac"), "default-v2": ("default-v2.safetensors", "caecd4e"),
           "default-v3": ("default-v3.safetensors", "5763145"), "default-v4": ("default-v4.safetensors", "b5b79d9"),
           "default-v5": ("default-v5.safetensors", "c71b065"), "default-v6": ("default-v6.safetensors", "0536dc0"),
           "default-v7": ("default-v7.safetensors", "f9a1f07"),
           "default-v8": ("default-v8.safetensors", "ec0dd90"), "default-v9": ("default-v9.safetensors", "22bb939")}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    model_id: str
    fingerprint: bytes
    device: torch.device

    @property
    def variable_rate(self) -> bool:
        return bool(self.model.variable_rate)


_cache: dict = {}
_cache_lock = threading.Lock()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda was requested but no CUDA GPU is available")
    if device not in ("cpu", "cuda"):
        raise BadInputError(f"unknown device {device!r} (use cpu, cuda or auto)")
    return torch.device(device)


def _float_state(sd: dict) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def build_from_state_dict(sd: dict, model_name: str | None = None) -> tuple[torch.nn.Module, str]:
    """Construct the right network for a state dict (the registered class whose ``matches``
    accepts it); returns (model, its registry name)."""
    from .models import registry

    sd = _float_state(sd)
    try:
        cls = registry.detect(sd)
        if cls is None:
            raise ModelError(f"unrecognised weights: not a state dict of a known model ({', '.join(registry.names())})")
        return cls.from_state_dict(sd), cls.registry_name
    except ModelError:
        raise
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"the weights do not fit the {model_name or 'detected'} architecture: {first[:300]}") from None


def load_model(model: str = DEFAULT_MODEL, weights: str | Path | None = None, device: str | None = "auto") -> LoadedModel:
    """Load (once per process) the bundled model or a weights file, on ``device``."""
    dev = resolve_device(device)
    if weights is None:
        if model in ("default", DEFAULT_MODEL):
            model = DEFAULT_MODEL
        if model in RETIRED and model not in BUNDLED:
            name, rev = RETIRED[model]
            raise MissingWeightsError(
                f"this file was encoded with the earlier bundled model {model!r}, which {DEFAULT_MODEL!r} "
                f"replaced; decode it with --weights {name} (git show {rev}:models/{name} > {name})"
            )
        if model not in BUNDLED:
            raise MissingWeightsError(
                f"model {model!r} has no bundled weights; pass --weights PATH (e.g. the official checkpoint)"
            )
        path = MODELS_DIR / BUNDLED[model]
        if not path.is_file():
            raise MissingWeightsError(f"the bundled weights {path.name} are missing from this installation")
    else:
        path = Path(weights)
    try:
        stat = path.stat()
    except OSError:
        raise MissingWeightsError(f"weights file not found: {path}") from None
    # the bundled name is part of the key: the same file given as --weights gets the id of its kind
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(dev), model if weights is None else None)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        sd = load_state_dict_file(path)
        net, kind = build_from_state_dict(sd, model)
        net.update(force=False)  # tables stored with the weights are used as they are
        net = net.to(dev).eval()
        model_id = model if weights is None else kind
        loaded = LoadedModel(net, model_id, fingerprint(net), dev)
        _cache[key] = loaded
        return loaded


def clear_model_cache() -> None:
    with _cache_lock:
        _cache.clear()
