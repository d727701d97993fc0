"""Files and folders of the commands: reading inputs, writing outputs atomically (and cleaning the
temporary files of killed runs), naming inputs in messages, and walking folders into (input,
output) pairs.  Used by ``codec encode/decode`` (:mod:`lalic_codec.cli`), ``codec batch`` and
``codec bench``; import-light (the standard library, and the suffix tables and
:func:`~.imaging.file_kind` of :mod:`.imaging`, which imports Pillow but not numpy or torch).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

from .errors import BadInputError, CodecError, OutputExistsError
from . import imaging
from .imaging import IMAGE_SUFFIXES, OUTPUT_FORMATS  # defined there; cli and bench take them from here


def display_name(path: str, std: str = "stdin") -> str:
    """A path as messages name it: ``std`` (stdin, stdout) for -."""
    return path if path != "-" else std


def named_error(src: str, err: CodecError) -> CodecError:
    """``err`` (about input ``src``) with a message that starts with the input's name."""
    name = display_name(src)
    if str(err).startswith(f"{name}: "):
        return err
    try:
        renamed = type(err)(f"{name}: {err}")
    except TypeError:  # an error class with another constructor: keep it as it is
        return err
    return renamed


def read_input(path: str, max_bytes: int = 2**31) -> bytes:
    if path == "-":
        data = sys.stdin.buffer.read(max_bytes + 1)
    else:
        p = Path(path)
        if not p.exists():
            raise BadInputError(f"{path}: no such file")
        if p.is_dir():
            raise BadInputError(f"{path}: is a folder (give a folder as output too to process it)")
        try:
            if p.stat().st_size > max_bytes:
                raise BadInputError(f"{path}: larger than {max_bytes} bytes")
            data = p.read_bytes()
        except OSError as e:
            raise BadInputError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise BadInputError("input larger than 2 GiB")
    return data


def write_output(path: str, data_or_writer, force: bool) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the target.

    ``data_or_writer`` is bytes or a callable taking a binary file object.  Nothing is left behind
    on failure or interruption (SIGINT, SIGTERM), and an existing file is replaced only with
    ``force``.  The temporary file, ``.<name>.XXXXXXXX.tmp``, is locked while it is written, so
    that a later run can tell the leftovers of a killed process (SIGKILL, power loss) from the
    work of a live one (:func:`clean_stale_temps`).
    """
    if path == "-":
        import io

        buf = io.BytesIO()
        data_or_writer(buf) if callable(data_or_writer) else buf.write(data_or_writer)
        sys.stdout.buffer.write(buf.getvalue())
        sys.stdout.buffer.flush()
        return
    p = Path(path)
    if p.is_dir():
        raise BadInputError(f"{path} is a folder")
    if p.exists() and not force:
        raise OutputExistsError(f"{path} exists (use --force to overwrite)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise BadInputError(f"{parent}: no such folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{_temp_stem(p.name, _name_max(parent))}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise BadInputError(f"{path}: cannot write ({e.strerror})") from None
    try:
        _try_lock(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            data_or_writer(f) if callable(data_or_writer) else f.write(data_or_writer)
            f.flush()
            os.fsync(f.fileno())
            if os.name == "posix":
                os.replace(tmp, p)  # still open and locked: never an unlocked temporary file
        if os.name != "posix":
            os.replace(tmp, p)
        _fsync_dir(parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, CodecError):
            raise BadInputError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


#: the temporary files of :func:`write_output`: "." + output name + "." + mkstemp's 8 characters + ".tmp"
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")
#: what a temporary file's name adds to its output's name
_TEMP_EXTRA = len(".") + len(".") + 8 + len(".tmp")


def _name_max(folder: Path) -> int:
    """The longest file name the folder's file system takes, in bytes (255 where it does not say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


def _temp_stem(name: str, name_max: int) -> str:
    """The output name as the temporary file's name carries it: whole, or cut (at a byte, as the file
    system counts) so that the temporary name still fits the file system's limit ``name_max``
    (:func:`_name_max`) when the output's own name is close to it (an output of 255 bytes has a
    temporary name of 269)."""
    raw = os.fsencode(name)
    room = max(1, name_max - _TEMP_EXTRA)
    return name if len(raw) <= room else os.fsdecode(raw[:room])


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock without waiting (POSIX); False if another process holds one."""
    try:
        import fcntl
    except ImportError:  # Windows: no locks, and no cleaning of temporary files either
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); best effort."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_temps(folder: Path, names, before: float) -> int:
    """Delete the temporary files that a killed run of ours left in ``folder``; returns how many.

    Only ``.<name>.XXXXXXXX.tmp`` files of an output ``name`` in ``names`` are considered, and only
    those last modified before ``before`` (this run's start) whose lock nobody holds: a writer
    holds its lock until the file is renamed, and the system releases it when the writer dies,
    so the temporary file of a concurrent run is never touched.  Without POSIX locks nothing is
    deleted.  Leftovers are never mistaken for outputs: they do not have the output's name.
    """
    name_max = _name_max(folder)
    names = {_temp_stem(n, name_max) for n in names}
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if not m or m["name"] not in names:
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= before:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _try_lock(fd):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_format(path: str, ext: str | None = None) -> str:
    """Pillow's name of the format to write to ``path``: its extension's, or ``ext``'s (from
    ``--format``) on stdout and for names without an extension, or PNG."""
    suffix = "" if path == "-" else Path(path).suffix.lower()
    if not suffix:
        return OUTPUT_FORMATS[ext] if ext else "PNG"
    if suffix not in OUTPUT_FORMATS:
        raise BadInputError(f"{path}: unknown output format {suffix!r} (use .png, .jpg, .webp, .bmp, .tif or .ppm)")
    return OUTPUT_FORMATS[suffix]


def folder_pairs(src_dir: Path, dst_dir: Path, take, out_suffix: str, recursive: bool = False):
    """Folders: the (input, output) pairs, and the entries left out with the reason for each,
    [(path, reason)].  ``take(path)`` is None for a file to process, else why not; with
    ``recursive``, subfolders are walked and their tree is kept under ``dst_dir``."""
    if dst_dir.exists() and not dst_dir.is_dir():
        raise BadInputError(f"{dst_dir} is not a folder")
    files, ignored = [], []
    collect_files(src_dir, take, recursive, dst_dir, files, ignored)
    if not files:
        shown = ", ".join(f"{entry_name(p, src_dir)} ({why})" for p, why in ignored[:3])
        more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        raise BadInputError(f"{src_dir}: no input files found" + (f" (ignored: {shown}{more})" if ignored else ""))
    pairs = [(p, dst_dir / p.relative_to(src_dir).parent / (p.stem + out_suffix)) for p in files]
    refuse_clashes(pairs)
    refuse_overwriting_inputs(pairs)
    for folder in sorted({dst.parent for _, dst in pairs} | {dst_dir}):
        make_folder(folder)
    return pairs, ignored


def collect_files(folder: Path, take, recursive: bool, out_dir: Path, files: list, ignored: list) -> None:
    """Walk ``folder`` for :func:`folder_pairs` (links to folders are not followed; the output folder,
    when inside, is passed over)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        ignored.append((folder, f"cannot list it: {e.strerror or e}"))
        return
    for p in entries:
        if p.is_dir():
            if p.is_symlink():
                ignored.append((p, "a link to a folder, not followed"))
            elif p.resolve() == out_dir.resolve():
                continue
            elif recursive:
                collect_files(p, take, recursive, out_dir, files, ignored)
            else:
                ignored.append((p, "a folder; -r includes subfolders"))
        elif not p.is_file():
            ignored.append((p, "not a regular file"))
        else:
            why = take(p)
            if why is None:
                files.append(p)
            else:
                ignored.append((p, why))


def entry_name(p: Path, relative_to: Path | None = None) -> str:
    """A folder entry as messages name it: folders end in /."""
    name = str(p.relative_to(relative_to)) if relative_to is not None else str(p)
    return name + "/" if p.is_dir() else name


def _first_bytes(p: Path, n: int = 4096) -> bytes | None:
    """The first ``n`` bytes of file ``p``; None if it cannot be read (its job will say why)."""
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError:
        return None


def take_image(p: Path) -> str | None:
    """encode's ``take`` for :func:`folder_pairs`: image extensions (:data:`.imaging.IMAGE_SUFFIXES`),
    and any file whose content is an image in a format we read (AVIF, names without an
    extension...), as in single-file mode (:func:`.imaging.file_kind`)."""
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return None
    head = _first_bytes(p)
    if head is None:
        return None
    plugin, what = imaging.file_kind(head)
    return None if plugin is not None else (what or "not an image the codec reads")


def take_lic(p: Path) -> str | None:
    """decode's ``take`` for :func:`folder_pairs`: .lic files, by extension or content."""
    if p.suffix.lower() == ".lic":
        return None
    head = _first_bytes(p)
    if head is None or head.startswith(b"\x89LIC"):
        return None
    _, what = imaging.file_kind(head)
    return f"{what}, not a .lic file" if what else "not a .lic file"


def refuse_clashes(pairs) -> None:
    """Folders: refuse, before anything is written, inputs that would be written to the same output
    (``x.png`` and ``x.jpg``; ``a.lic`` and ``a.LIC``).  Names are compared as the system does
    (``os.path.normcase``: ignoring case on Windows)."""
    by_dst: dict = {}
    for src, dst in pairs:
        by_dst.setdefault(os.path.normcase(str(dst)), []).append((src, dst))
    clashes = [group for group in by_dst.values() if len(group) > 1]
    if not clashes:
        return
    srcs = [str(src) for src, _ in clashes[0]]
    names = ", ".join(srcs[:-1]) + " and " + srcs[-1]
    more = f" (and {len(clashes) - 1} more such clash{'es' * (len(clashes) > 2)})" if len(clashes) > 1 else ""
    raise BadInputError(f"{names} would {'both' if len(srcs) == 2 else 'all'} be written to {clashes[0][0][1]}{more}")


def _identity(path) -> tuple[int, int] | None:
    """(device, inode) of an existing local file (links and hard links resolve to their target);
    None for ``-``, URLs and what does not exist."""
    if str(path) == "-" or "://" in str(path):
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def refuse_overwriting_inputs(pairs) -> None:
    """Refuse, before anything is written and whatever ``--force`` says, outputs that are inputs:
    ``codec encode a.png a.png`` (which replaced the photo by its .lic), a folder coded into
    itself where a name's stem and the output suffix give back an input (``x.lic`` holding a
    PNG).  Files are compared by identity (``os.stat``'s device and inode), so other spellings,
    case-insensitive file systems and links to an input are refused too; ``-`` and URLs are
    passed over."""
    src_ids = [_identity(src) for src, _ in pairs]
    inputs: dict = {}
    for ident, (src, _) in zip(src_ids, pairs):
        if ident is not None:
            inputs.setdefault(ident, src)
    for src_id, (src, dst) in zip(src_ids, pairs):
        ident = _identity(dst)
        if ident is None or ident not in inputs:
            continue
        owner = src if src_id == ident else inputs[ident]
        what = "both the input and the output" if str(owner) == str(dst) else f"the same file as the input {owner}"
        raise BadInputError(f"{dst} is {what}: refusing to write over an input (give another output name)")


def make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"{folder}: cannot create folder ({e.strerror or e})") from None
