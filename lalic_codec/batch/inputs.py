"""Inputs and outputs of ``codec batch``: what SRC names, where each output goes, reading and
atomic writing, on local paths or any fsspec URL (``s3://``, ``gs://``... where the filesystem
package is installed).

SRC is a folder (``-r`` for subfolders), a glob (``photos/*.jpg``, ``s3://b/in/**/*.png`` with
``-r``) or a manifest: a text file with one input path or URL a line (blank lines and ``#``
comments ignored; relative paths are relative to the manifest's folder).  Outputs mirror the
inputs' tree under DST: relative to SRC for a folder, to the glob's fixed prefix for a glob, to
the inputs' common folder for a manifest.  Local folders are walked by the CLI's own
:func:`~lalic_codec.files.collect_files` (images taken by extension or content); remote inputs are taken
by extension.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
import re
import secrets
from pathlib import Path, PurePosixPath

from ..files import (clean_stale_temps, collect_files, entry_name, folder_pairs, make_folder, read_input, refuse_clashes, refuse_overwriting_inputs,
                     take_image, take_lic, write_output)
from ..errors import BadInputError
from ..imaging import IMAGE_SUFFIXES

#: fsspec protocols whose writes are atomic by themselves (an object appears whole or not at all)
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
#: the result manifest's default name, in DST (left out when DST is listed as an input folder)
MANIFEST_NAME = "batch-manifest.jsonl"
MAX_INPUT_BYTES = 2**31


def is_url(path: str) -> bool:
    """An fsspec URL other than ``file://`` (which is a local path)."""
    m = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]+)://", path)
    return bool(m) and m.group(1).lower() != "file"


def local(path: str) -> str:
    """``file://`` URLs as plain paths."""
    return path[len("file://"):] if path.startswith("file://") else path


def _fs(url: str):
    try:
        import fsspec
    except ImportError:
        from ..errors import MissingExtrasError

        raise MissingExtrasError(f"{url}: URLs need fsspec: pip install -e '.[distributed]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise BadInputError(f"{url}: {str(e).splitlines()[0]}") from None


def _url(fs, path: str) -> str:
    """A path fsspec returned (no protocol) as a URL again, in one spelling for each object."""
    return fs.unstrip_protocol(path)


def canonical(url: str) -> str:
    """URLs: one spelling per object (``memory://a`` and ``memory:///a`` are one file); paths unchanged."""
    if not is_url(url):
        return url
    fs, path = _fs(url)
    return _url(fs, path).rstrip("/") if path.rstrip("/") else _url(fs, path)


def _tail(url: str) -> str:
    return url.split("://", 1)[1]


def _join(root: str, rel: PurePosixPath) -> str:
    if is_url(root):
        return root.rstrip("/") + "/" + rel.as_posix()
    return str(Path(root) / rel)


def _remote_take(decode: bool):
    def take(name: str) -> str | None:
        suffix = PurePosixPath(name).suffix.lower()
        if decode:
            return None if suffix == ".lic" else "not a .lic file (remote inputs are taken by extension)"
        return None if suffix in IMAGE_SUFFIXES else "not an image extension (remote inputs are taken by extension)"

    return take


def plan(src: str, dst: str, decode: bool, recursive: bool, out_suffix: str):
    """(pairs, ignored): [(input, output)] as strings, and [(entry, reason)] left out.  Local
    output folders are created."""
    take = take_lic if decode else take_image
    src, dst = canonical(local(src)), canonical(local(dst))
    if not is_url(src) and not is_url(dst) and Path(src).is_dir():
        pairs, ignored = folder_pairs(Path(src), Path(dst), take, out_suffix, recursive)  # as codec encode DIR DIR
        return ([(str(s), str(d)) for s, d in pairs],
                [(entry_name(p), why) for p, why in ignored if p.name != MANIFEST_NAME])
    files, ignored, base = _inputs(src, dst, take, _remote_take(decode), recursive)
    if not files:
        shown = ", ".join(f"{p} ({why})" for p, why in ignored[:3])
        raise BadInputError(f"{src}: no input files found" + (f" (ignored: {shown})" if ignored else ""))
    pairs = []
    for f in files:
        rel = PurePosixPath(posixpath.relpath(_tail(f), _tail(base)) if is_url(f) else Path(f).relative_to(base).as_posix())
        pairs.append((f, _join(dst, rel.parent / (rel.stem + out_suffix))))
    refuse_clashes(pairs)
    refuse_overwriting_inputs(pairs)
    if not is_url(dst):
        for folder in sorted({Path(d).parent for _, d in pairs} | {Path(dst)}):
            make_folder(folder)
    return pairs, ignored


def _inputs(src: str, dst: str, take, remote_take, recursive: bool):
    """(files, ignored, base folder) of a glob, a manifest, a remote folder, or a local folder
    going to a remote DST."""
    files, ignored = [], []

    def add(name: str, why: str | None) -> None:
        (files.append(name) if why is None else ignored.append((name, why)))

    if any(c in src for c in "*?["):  # a glob: the tree is mirrored from its fixed prefix
        prefix = src[: min(src.index(c) for c in "*?[" if c in src)]
        if is_url(src):
            fs, pattern = _fs(src)
            for p in sorted(fs.glob(pattern, detail=False)):
                if not fs.isdir(p):
                    add(_url(fs, p), remote_take(p))
            return files, ignored, canonical(prefix.rpartition("/")[0] if "/" in _tail(prefix) else prefix)
        for p in sorted(_glob.glob(src, recursive=recursive)):
            if not os.path.isdir(p):
                add(os.path.abspath(p), take(Path(p)))
        return files, ignored, os.path.abspath(os.path.dirname(prefix) or ".")
    if is_url(src):
        fs, path = _fs(src)
        if fs.isdir(path):
            found = fs.find(path, detail=True) if recursive else fs.ls(path, detail=True)
            for info in sorted(found.values() if isinstance(found, dict) else found, key=lambda i: i["name"]):
                url = _url(fs, info["name"])
                if info.get("type") == "directory":
                    ignored.append((url + "/", "a folder; -r includes subfolders"))
                elif url != _join(dst, PurePosixPath(MANIFEST_NAME)):
                    add(url, remote_take(info["name"]))
            return files, ignored, src
        if not fs.isfile(path):
            raise BadInputError(f"{src}: no such file or folder")
        if remote_take(path) is None:  # one input
            return [src], [], src.rpartition("/")[0]
        return _manifest(fs.cat_file(path).decode("utf-8", "replace"), src.rpartition("/")[0])
    p = Path(src)
    if p.is_dir():  # a local folder into a remote DST
        found, left = [], []
        collect_files(p, take, recursive, Path(os.devnull), found, left)
        return [str(f) for f in found], [(entry_name(q), why) for q, why in left], str(p)
    if not p.is_file():
        raise BadInputError(f"{src}: no such file or folder")
    if take(p) is None and p.suffix.lower() not in (".txt", ".lst", ".list"):  # one input
        return [str(p.resolve())], [], str(p.resolve().parent)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{src}: neither a folder, a glob nor a manifest (one input a line): {e}") from None
    return _manifest(text, str(p.resolve().parent))


def _manifest(text: str, folder: str):
    """A manifest's entries (relative ones from ``folder``), nothing ignored, and their common folder."""
    files = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_url(line):
            files.append(canonical(line))
        elif is_url(folder):
            files.append(canonical(posixpath.join(folder, line)))
        else:
            files.append(os.path.abspath(os.path.join(folder, local(line))))
    if not files:
        return [], [], folder
    kinds = {f.split("://", 1)[0] if is_url(f) else "" for f in files}
    if len(kinds) > 1:
        raise BadInputError("the manifest mixes local paths and URLs, or URLs of several kinds: their tree cannot be mirrored")
    if is_url(files[0]):
        proto = files[0].split("://", 1)[0]
        return files, [], f"{proto}://" + posixpath.commonpath([posixpath.dirname(_tail(f)) for f in files])
    return files, [], os.path.commonpath([os.path.dirname(f) for f in files])


# ------------------------------------------------------------------------------------------------
# existing outputs, reading, writing


def existing(pairs, dst: str) -> set:
    """The outputs of ``pairs`` that exist now (remote: one listing of DST, not one request each).
    Temporary files never count: they do not have an output's name."""
    if not is_url(dst):
        return {d for _, d in pairs if os.path.isfile(d)}
    fs, root = _fs(dst)
    try:
        found = {_url(fs, p) for p in fs.find(root)}
    except FileNotFoundError:
        return set()
    return {d for _, d in pairs if d in found}


def clean_temps(pairs, started: float) -> int:
    """Local outputs: delete the temporary files that killed workers left (see files.clean_stale_temps)."""
    by_folder: dict = {}
    for _, d in pairs:
        if not is_url(d):
            by_folder.setdefault(Path(d).parent, set()).add(Path(d).name)
    return sum(clean_stale_temps(folder, names, started) for folder, names in by_folder.items())


def read_bytes(src: str, max_bytes: int = MAX_INPUT_BYTES) -> bytes:
    if not is_url(src):
        return read_input(local(src), max_bytes)
    fs, path = _fs(src)
    try:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise BadInputError(f"{src}: larger than {max_bytes} bytes")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise BadInputError(f"{src}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"{src}: is a folder") from None
    except OSError as e:
        raise BadInputError(f"{src}: cannot read ({e.strerror or e})") from None


def write_bytes(dst: str, data_or_writer) -> None:
    """Write an output so that it appears whole or not at all (overwriting: the driver has
    already applied --force and --skip-existing).  Local: the CLI's write_output (temporary name,
    fsync, rename); object stores: one upload, atomic by itself; other fsspec filesystems: a
    temporary ``.NAME.XXXXXXXX.tmp`` beside it, then a move."""
    if not is_url(dst):
        path = local(dst)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # other nodes (a shared filesystem)
        write_output(path, data_or_writer, force=True)
        return
    if callable(data_or_writer):
        import io

        buf = io.BytesIO()
        data_or_writer(buf)
        data = buf.getvalue()
    else:
        data = data_or_writer
    fs, path = _fs(dst)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    try:
        if proto in OBJECT_STORES:
            fs.pipe_file(path, data)
            return
        folder, name = posixpath.split(path)
        fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        fs.pipe_file(tmp, data)
        try:
            fs.mv(tmp, path)
        except BaseException:
            fs.rm(tmp)
            raise
    except OSError as e:
        raise BadInputError(f"{dst}: cannot write ({e.strerror or e})") from None
