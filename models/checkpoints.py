"""Loading weights: official checkpoints (.pth/.pth.tar/.pt) and our safetensors files.

Official checkpoints are pickles; they are only ever opened with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers, so a crafted file cannot run code.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from ..errors import MissingWeightsError, ModelError, WeightsFileError

_EB_OLD = re.compile(r"(entropy_bottleneck)\._(matrix|bias|factor)(\d+)$")
_EB_PLURAL = {"matrix": "matrices", "bias": "biases", "factor": "factors"}


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
        _check_format(meta.get("format"), path.name)
        sd = dequantize_int8_rows(sd, meta.get("int8_rows"), path.name)
        sd = expand_aliases(sd, meta.get("aliases"), path.name)
        sd = unpack_cdf_tables(sd, meta.get("packed_cdfs"), path.name)
        return restore_checkerboard_masks(sd, meta.get("checkerboard_masks"), path.name)
    return normalize_keys(unwrap_checkpoint(read_checkpoint(path)))


def read_checkpoint(path: str | Path, what: str = "weights file"):
    """What a PyTorch checkpoint holds, loaded weights-only (nothing in it is run), on the CPU; a
    :class:`~lalic_codec.errors.ModelError` with a one-line message for a missing file (``what``
    names it), a file that is no checkpoint, a damaged one, or one that is not weights-only."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{what} not found: {path}")
    import pickle
    import warnings

    not_one = _not_a_checkpoint(path)
    if not_one:
        raise ModelError(f"{path.name} is not a checkpoint ({not_one})")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses what is not tensors and plain containers
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        calls = f"loading it would call {m[1]}, which" if m else "it holds more than tensors and plain containers, and loading it"
        raise ModelError(
            f"{path.name} is not a weights-only checkpoint: {calls} could run code; refused (nothing in it was run). "
            "Save the state dict alone (torch.save(model.state_dict(), ...)) or use a .safetensors file"
        ) from None
    except Exception as e:  # damaged archives and pickles of many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "failed finding central directory" in first or isinstance(e, EOFError):
            raise ModelError(f"{path.name} is a damaged or truncated checkpoint") from None
        raise ModelError(f"cannot load {path.name} as a weights-only checkpoint: {first[:200]}") from None
    return obj


#: the first bytes of files that are given as weights by mistake
_NOT_WEIGHTS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"\x89LIC", "a .lic file, not weights"))


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a PyTorch checkpoint, judged from its first bytes, or None if it may be
    one: a zip archive (what torch.save writes) or a pickle (older torch.save, raw pickles)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or _starts_a_pickle(head, truncated=len(head) == 1 << 16):
        return None
    for magic, what in _NOT_WEIGHTS:
        if head.startswith(magic):
            return what
    n = int.from_bytes(head[:8], "little")
    if len(head) > 9 and head[8:9] == b"{" and 2 <= n <= 100_000_000:
        return "it looks like a safetensors file: name it *.safetensors"
    if b"\0" not in head:
        import codecs

        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is fine
            return "a text file?"
        except UnicodeDecodeError:
            pass
    return "neither a PyTorch checkpoint nor a .safetensors file"


def _starts_a_pickle(head: bytes, truncated: bool) -> bool:
    """True if ``head`` begins with a well-formed pickle (read, never run), or might when cut short."""
    import pickletools

    try:
        for op, _, _ in pickletools.genops(head):
            if op.name == "STOP":
                return True
    except Exception as e:  # an unknown opcode: not a pickle; running out of bytes: cut short
        return truncated and "unknown" not in str(e)
    return truncated


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


#: the newest ``"format"`` of our weights files this version reads (``save_weights``)
WEIGHTS_FORMAT = 4


def _check_format(fmt: str | None, name: str) -> None:
    """Refuse a weights file of a newer format than this version reads, with a clear message
    (instead of an error about tensors it would misread)."""
    m = re.fullmatch(r"lalic-codec weights v(\d+)", fmt or "")
    if m and int(m[1]) > WEIGHTS_FORMAT:
        raise WeightsFileError(f"cannot read {name}: it is a weights file of format v{m[1]}, from a newer lalic-codec "
                               f"(this one reads up to v{WEIGHTS_FORMAT}); upgrade lalic-codec")


def _int8_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float tensor as int8 values and one float32 scale per row (per output channel): the
    row's largest magnitude over 127, so the row's values are ``q * scale`` to within half a
    scale; an all-zero row has scale 0."""
    rows = v.detach().float().reshape(v.shape[0], -1)
    scale = rows.abs().amax(dim=1) / 127
    q = torch.round(rows / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(v.shape).contiguous(), scale.contiguous()


def _metadata_map(text: str, entry: str, well_formed, what: str, name: str) -> dict:
    """The JSON map a reserved metadata entry holds, each item checked by ``well_formed(key,
    value)``; anything else is refused (``WeightsFileError``) naming the entry and ``what`` the
    map should hold."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(well_formed(k, v) for k, v in value.items()):
        raise WeightsFileError(f"cannot read {name}: its '{entry}' metadata is not a JSON map of {what}")
    return value


def dequantize_int8_rows(sd: dict, rows: str | None, name: str = "the weights file") -> dict:
    """Restore the tensors ``save_weights`` wrote as int8: ``rows`` is the file's ``"int8_rows"``
    metadata, a JSON map ``{"name": "scale name"}``; the tensor ``name`` (int8, at least 2-D) times
    the float32 vector ``scale name`` (one finite value >= 0 per row: per index of dimension 0),
    computed in float32, is the float32 tensor loaded; the scale tensors are dropped.  Maps of
    another form, or tensors that do not fit them, are refused (``WeightsFileError``)."""
    if rows is None:
        return sd
    rmap = _metadata_map(rows, "int8_rows", lambda k, v: isinstance(k, str) and isinstance(v, str) and k != v,
                         "tensor names to scale names", name)
    out = dict(sd)
    for key, scale_key in rmap.items():
        q, scale = sd.get(key), sd.get(scale_key)
        if q is None or scale is None:
            raise WeightsFileError(f"cannot read {name}: int8 tensor {key!r} or its scales {scale_key!r} are missing")
        if (q.dtype != torch.int8 or q.dim() < 2 or scale.dtype != torch.float32 or scale.shape != (q.shape[0],)
                or not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()) or scale_key in rmap):
            raise WeightsFileError(f"cannot read {name}: int8 tensor {key!r} does not match its scales {scale_key!r}")
        out[key] = (q.float().reshape(q.shape[0], -1) * scale[:, None]).reshape(q.shape)
        out.pop(scale_key)
    return out


def expand_aliases(sd: dict, aliases: str | None, name: str = "the weights file") -> dict:
    """Restore the tensors ``save_weights`` wrote once: ``aliases`` is the file's ``"aliases"``
    metadata, a JSON map ``{"dup.key": "stored.key"}``; each dup gets its own copy of the stored
    tensor.  A map that is not of that form, names a tensor the file lacks or one it already
    holds is refused (``ModelError``, also a ``ValueError``)."""
    if aliases is None:
        return sd
    amap = _metadata_map(aliases, "aliases", lambda k, v: isinstance(k, str) and isinstance(v, str), "names to names", name)
    out = dict(sd)
    for dup, first in amap.items():
        if first not in sd:
            raise WeightsFileError(f"cannot read {name}: alias {dup!r} refers to {first!r}, which the file does not hold")
        if dup in sd:
            raise WeightsFileError(f"cannot read {name}: alias {dup!r} names a tensor the file also holds")
        out[dup] = sd[first].clone()
    return out


def _pack_cdf_table(cdf: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
    """The rows of a quantised CDF table cut to their lengths and concatenated (1-D int32), or
    None when the padding beyond a row's length is not all zeros (then the table is kept whole)."""
    if cdf.dim() != 2 or lengths.dim() != 1 or cdf.dtype != torch.int32 or len(lengths) != len(cdf):
        return None
    lengths = lengths.to(torch.int64)
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > cdf.shape[1]):
        return None
    keep = torch.arange(cdf.shape[1]) < lengths[:, None]
    if torch.any(cdf[~keep] != 0):
        return None
    return cdf[keep].contiguous()


def unpack_cdf_tables(sd: dict, packed: str | None, name: str = "the weights file") -> dict:
    """Restore the quantised CDF tables ``save_weights`` wrote packed: ``packed`` is the file's
    ``"packed_cdfs"`` metadata, a JSON map ``{"...._quantized_cdf": width}``.  Each such tensor
    is the concatenation of its rows cut to the sibling ``_cdf_length``; the table is those rows
    zero-padded to ``width`` columns, as CompressAI builds it.  Inconsistent maps, lengths or
    sizes are refused (``WeightsFileError``)."""
    if packed is None:
        return sd
    pmap = _metadata_map(
        packed, "packed_cdfs",
        lambda k, w: isinstance(k, str) and k.endswith("_quantized_cdf") and isinstance(w, int) and not isinstance(w, bool) and w >= 0,
        "CDF table names to widths", name)
    out = dict(sd)
    for key, width in pmap.items():
        flat, lengths = sd.get(key), sd.get(key[: -len("_quantized_cdf")] + "_cdf_length")
        if flat is None or lengths is None:
            raise WeightsFileError(f"cannot read {name}: packed CDF table {key!r} or its lengths are missing")
        lengths = lengths.to(torch.int64)
        if (
            flat.dim() != 1
            or flat.dtype != torch.int32
            or lengths.dim() != 1
            or (lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > width))
            or int(lengths.sum()) != flat.numel()
        ):
            raise WeightsFileError(f"cannot read {name}: packed CDF table {key!r} does not match its lengths")
        table = torch.zeros(len(lengths), width, dtype=torch.int32)
        table[torch.arange(width) < lengths[:, None]] = flat
        out[key] = table
    return out


_MASK_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def restore_checkerboard_masks(sd: dict, masks: str | None, name: str = "the weights file") -> dict:
    """Restore the checkerboard masks ``save_weights`` left out: ``masks`` is the file's
    ``"checkerboard_masks"`` metadata, a JSON map ``{"....mask": [[shape], "float16" | "float32"]}``;
    each is :func:`checkerboard_taps` of that 4-D shape and dtype.  A map of another form, or one
    naming a tensor the file holds, is refused (``WeightsFileError``)."""
    if masks is None:
        return sd
    from .layers import checkerboard_taps

    def well_formed(k, v) -> bool:
        return (isinstance(k, str) and k.endswith(".mask") and isinstance(v, list) and len(v) == 2
                and isinstance(v[0], list) and len(v[0]) == 4 and v[1] in _MASK_DTYPES
                and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 4096 for n in v[0]))

    mmap = _metadata_map(masks, "checkerboard_masks", well_formed, "mask names to [shape, dtype]", name)
    out = dict(sd)
    for key, (shape, dtype) in mmap.items():
        if key in sd:
            raise WeightsFileError(f"cannot read {name}: checkerboard mask {key!r} is also stored in the file")
        out[key] = checkerboard_taps(shape, _MASK_DTYPES[dtype])
    return out


#: buffers that stay float32 in fp16 weight files (they define coding tables or tiny bounds)
_KEEP_FP32 = ("scale_table", "scale_bound", "lambdas", ".bound", "quantiles", "target")

#: table buffers written once when several modules hold bit-identical copies (the Gaussian tables
#: of every channel group); the copies are recorded in the ``"aliases"`` metadata
_SHARED_TABLES = ("_quantized_cdf", "_cdf_length", "_offset", "scale_table")


#: how large a float tensor ``save_weights`` writes as int8 when its name matches ``int8``
_INT8_MIN_SIZE = 4096
#: the scales of an int8 tensor are stored under its name and this suffix
_INT8_SCALE = ":int8_row_scale"


def save_weights(model: torch.nn.Module, path: str | Path, fp16: bool = True, metadata: dict | None = None,
                 int8: str | None = None) -> Path:
    """Write a model as safetensors: CDF tables computed if missing (int32), floats in fp16 unless
    ``fp16=False``; a module registered under two names (LALIC's top-level ``h_a``/``h_s``) is
    written once, under its first name, and the loaders restore the alias.  Bit-identical table
    buffers (``_SHARED_TABLES``, e.g. the Gaussian tables of every channel group) are also written
    once; the other names go to the ``"aliases"`` metadata (a reserved key), which
    ``load_state_dict_file`` expands.  Quantised CDF tables are written packed (each row cut to
    its ``_cdf_length``, the zero padding dropped; their widths in the reserved ``"packed_cdfs"``
    metadata): the Gaussian table keeps about 14 % of its 64 x 3,133 entries.  Checkerboard masks
    (``....mask`` buffers equal to :func:`~.layers.checkerboard_taps` of their shape, 1.3 MB of
    the default model) are not written; their shapes and dtypes go to the reserved
    ``"checkerboard_masks"`` metadata.  ``int8``: a regular expression; the float tensors whose
    names it matches (``re.match``), with at least 2 dimensions and ``_INT8_MIN_SIZE`` values, are
    written as int8 with a float32 scale per row (:func:`_int8_rows`; listed in the reserved
    ``"int8_rows"`` metadata), half the size of fp16.  The loaded state dict is the one saved."""
    import json

    model.update(force=False)
    tensors = {}
    seen: set = set()
    tables: dict = {}  # (dtype, shape, sha256) -> the first table buffer written with them
    aliases: dict = {}
    int8_rows: dict = {}
    for k, v in model.state_dict(keep_vars=True).items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
        if v.numel() and key in seen:
            continue  # an alias of a tensor already written
        seen.add(key)
        v = v.detach().cpu().contiguous()
        if (int8 is not None and v.is_floating_point() and v.dim() >= 2 and v.numel() >= _INT8_MIN_SIZE
                and not k.endswith((".mask", *_KEEP_FP32)) and re.match(int8, k)):
            tensors[k], tensors[k + _INT8_SCALE] = _int8_rows(v)
            int8_rows[k] = k + _INT8_SCALE
            continue
        if fp16 and v.is_floating_point() and not k.endswith(_KEEP_FP32):
            v = v.half()
        if k.endswith(_SHARED_TABLES):
            raw = _raw_bytes(v)
            first = tables.setdefault((v.dtype, tuple(v.shape), hashlib.sha256(raw).digest()), k)
            if first != k and _raw_bytes(tensors[first]) == raw:
                aliases[k] = first
                continue
        tensors[k] = v
    state = model.state_dict()
    packed: dict = {}
    for k in [k for k in tensors if k.endswith("_quantized_cdf")]:
        lengths = state.get(k[: -len("_quantized_cdf")] + "_cdf_length")
        flat = None if lengths is None else _pack_cdf_table(tensors[k], lengths.detach().cpu())
        if flat is not None:
            packed[k] = tensors[k].shape[1]
            tensors[k] = flat
    # an aliased table is packed as its stored copy is (the loader expands aliases, then unpacks)
    packed.update({dup: packed[first] for dup, first in aliases.items() if first in packed})
    from .layers import checkerboard_taps

    masks: dict = {}  # checkerboard masks are a function of their shape: not written
    for k in [k for k in tensors if k.endswith(".mask")]:
        v = tensors[k]
        dtype = str(v.dtype).removeprefix("torch.")
        if v.dim() == 4 and dtype in _MASK_DTYPES and torch.equal(v, checkerboard_taps(v.shape, v.dtype)):
            masks[k] = [list(v.shape), dtype]
            del tensors[k]
    version = 4 if int8_rows else 3 if masks else 2 if packed else 1
    meta = {"format": f"lalic-codec weights v{version}", "architecture": type(model).__name__}
    if hasattr(model, "config"):
        meta["config"] = json.dumps(model.config.to_dict())
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    for reserved in ("aliases", "packed_cdfs", "checkerboard_masks", "int8_rows"):
        meta.pop(reserved, None)
    if packed:
        meta["packed_cdfs"] = json.dumps(packed)
    if masks:
        meta["checkerboard_masks"] = json.dumps(masks)
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    if int8_rows:
        meta["int8_rows"] = json.dumps(int8_rows)
    return write_safetensors(tensors, path, meta)


def write_safetensors(tensors: dict, path: str | Path, metadata: dict) -> Path:
    """Write ``tensors`` and ``metadata`` (strings) as the safetensors file ``path``: through a
    temporary file beside it and a rename, so ``path`` is never half-written, with the
    permissions the umask gives (safetensors creates its files 0600)."""
    import os

    from safetensors.torch import save_file

    from ..files import _umask

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return path
