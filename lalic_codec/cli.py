"""The ``codec`` command.

Start-up matters: ``codec --help``, ``codec --version`` and ``codec info`` never import torch
(the networks are imported inside the commands that need them).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .errors import BadInputError, CodecError, CorruptFileError, NotALicFileError, OutputExistsError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".gif", ".tga"}
#: what --model accepts: the choices shown, then other names of the same models
MODELS = ("default", "lalic", "mambaic")
MODEL_ALIASES = ("default-v3", "lalic-vr")
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM", ".tga": "TGA"}


# ------------------------------------------------------------------------------------------------
# helpers


#: the progress bar of the folder being processed, if shown: lines are printed above it
_bar = None


def _say(msg: str, quiet: bool = False) -> None:
    if quiet:
        return
    if _bar is not None and not _bar.disable:
        _bar.write(msg, file=sys.stderr)  # clears the bar, prints the line, draws the bar again
    else:
        click.echo(msg, err=True)


def _stdout_is_terminal() -> bool:
    return _is_terminal(sys.stdout)


def _stderr_is_terminal() -> bool:
    return _is_terminal(sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False


def _refuse_terminal(output: str, what: str, example: str) -> None:
    """Refuse, as zstd and gzip do, to write binary data to a terminal (OUT is - and stdout is one)."""
    if output == "-" and _stdout_is_terminal():
        raise click.UsageError(
            f"refusing to write {what} to a terminal (OUT is -): redirect stdout to a file or a pipe, "
            f"e.g. {example}"
        )


def _fail(err: BaseException) -> int:
    if isinstance(err, CodecError):
        click.echo(f"codec: error: {err}", err=True)
        return err.exit_code
    if os.environ.get("LALIC_DEBUG"):
        raise err
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    click.echo(f"codec: internal error: {type(err).__name__}: {detail} (set LALIC_DEBUG=1 for a traceback)", err=True)
    return 1


@contextmanager
def _exit_codes():
    """The one error path of the commands: a usage error stays click's (exit 2), Ctrl-C exits 130,
    anything else becomes its one-line message and documented exit code (:func:`_fail`)."""
    try:
        yield
    except click.UsageError:
        raise
    except KeyboardInterrupt:
        click.echo("codec: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        sys.exit(_fail(e))


def _shown(path: str, std: str = "stdin") -> str:
    """A path as messages name it: ``std`` (stdin, stdout) for -."""
    return path if path != "-" else std


def _named(src: str, err: CodecError) -> CodecError:
    """``err`` (about input ``src``) with a message that starts with the input's name."""
    name = _shown(src)
    if str(err).startswith(f"{name}: "):
        return err
    try:
        named = type(err)(f"{name}: {err}")
    except TypeError:  # an error class with another constructor: keep it as it is
        return err
    return named


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
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
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
    names = set(names)
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


@contextmanager
def _signals_interrupt():
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt like Ctrl-C does, so that the same cleanup runs
    (temporary file removed, exit status 130); the previous handlers are restored afterwards."""
    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            old[sig] = signal.signal(sig, _raise_interrupt)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _clean_for(output: str, started: float) -> None:
    """Single-file mode: remove a killed run's temporary files for this output name."""
    if output != "-":
        p = Path(output)
        clean_stale_temps(p.parent if str(p.parent) else Path("."), {p.name}, started)


def _output_format(path: str, ext: str | None = None) -> str:
    """Pillow's name of the format to write to ``path``: its extension's, or ``ext``'s (from
    ``--format``) on stdout and for names without an extension, or PNG."""
    suffix = "" if path == "-" else Path(path).suffix.lower()
    if not suffix:
        return OUTPUT_FORMATS[ext] if ext else "PNG"
    if suffix not in OUTPUT_FORMATS:
        raise BadInputError(f"{path}: unknown output format {suffix!r} (use .png, .jpg, .webp, .bmp, .tif or .ppm)")
    return OUTPUT_FORMATS[suffix]


def _run_batch(pairs, job, quiet: bool, skip_existing: bool, force: bool, verb: str, started: float | None = None, ignored=()) -> int:
    """Process (input, output) pairs; report bad files and go on; list the ``ignored`` entries of the
    folder, [(path, reason)]; return the exit status."""
    from tqdm import tqdm

    by_folder: dict = {}
    for _, dst in pairs:
        by_folder.setdefault(Path(dst).parent, set()).add(Path(dst).name)
    stale = sum(clean_stale_temps(d, names, time.time() if started is None else started) for d, names in by_folder.items())
    if stale:
        _say(f"removed {stale} temporary file{'s' * (stale != 1)} left by an interrupted run", quiet)
    failures, done, skipped = [], 0, 0
    with tqdm(pairs, unit="file", disable=quiet or not _stderr_is_terminal(), file=sys.stderr, leave=False) as bar, _lines_above(bar):
        for src, dst in bar:
            if skip_existing and Path(dst).exists():
                skipped += 1
                continue
            bar.set_postfix_str("", refresh=False)  # a --target-bpp search shows its trials there
            try:
                job(str(src), str(dst))
                done += 1
            except KeyboardInterrupt:
                bar.close()
                click.echo(f"{verb} {done} file{'s' * (done != 1)} before the interruption"
                           f"{f', {len(failures)} failed' if failures else ''}; "
                           "run again with --skip-existing to finish", err=True)
                raise
            except CodecError as e:
                failures.append((src, e))
            except Exception as e:  # one bad file must not stop the batch
                if os.environ.get("LALIC_DEBUG"):
                    raise
                failures.append((src, CodecError(f"{type(e).__name__}: {e}")))
    parts = [f"{verb} {done} file{'s' * (done != 1)}"]
    if skipped:
        parts.append(f"skipped {skipped} existing")
    if ignored:
        parts.append(f"{len(ignored)} ignored")
    if failures:
        parts.append(f"{len(failures)} failed")
    _say(", ".join(parts), quiet and not failures)
    for p, why in ignored:
        _say(f"  {_entry(p)}: ignored ({why})", quiet)
    for src, e in failures:
        click.echo(f"  {e}" if str(e).startswith(f"{src}: ") else f"  {src}: {e}", err=True)
    return failures[0][1].exit_code if failures else 0


@contextmanager
def _lines_above(bar):
    """While ``bar`` is shown, :func:`_say` prints its lines above it instead of across it."""
    global _bar
    _bar = bar
    try:
        yield bar
    finally:
        _bar = None


def _trial(res, target_bpp: float, quiet: bool) -> None:
    """--target-bpp: one line per quality tried (in folders, the progress bar's postfix)."""
    line = f"quality {res.quality:g}: {res.bpp:.4f} bpp (target {target_bpp:g})"
    if _bar is not None:
        _bar.set_postfix_str(line)
    else:
        _say(f"  trying {line}", quiet)


def _pairs(src_dir: Path, dst_dir: Path, take, out_suffix: str, recursive: bool = False):
    """Folders: the (input, output) pairs, and the entries left out with the reason for each,
    [(path, reason)].  ``take(path)`` is None for a file to process, else why not; with
    ``recursive``, subfolders are walked and their tree is kept under ``dst_dir``."""
    if dst_dir.exists() and not dst_dir.is_dir():
        raise BadInputError(f"{dst_dir} is not a folder")
    files, ignored = [], []
    _collect(src_dir, take, recursive, dst_dir, files, ignored)
    if not files:
        shown = ", ".join(f"{_entry(p, src_dir)} ({why})" for p, why in ignored[:3])
        more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        raise BadInputError(f"{src_dir}: no input files found" + (f" (ignored: {shown}{more})" if ignored else ""))
    pairs = [(p, dst_dir / p.relative_to(src_dir).parent / (p.stem + out_suffix)) for p in files]
    _refuse_clashes(pairs)
    for folder in sorted({dst.parent for _, dst in pairs} | {dst_dir}):
        _make_folder(folder)
    return pairs, ignored


def _collect(folder: Path, take, recursive: bool, out_dir: Path, files: list, ignored: list) -> None:
    """Walk ``folder`` for :func:`_pairs` (links to folders are not followed; the output folder,
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
                _collect(p, take, recursive, out_dir, files, ignored)
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


def _entry(p: Path, relative_to: Path | None = None) -> str:
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


def _takes_image(pipeline):
    """encode's ``take`` for :func:`_pairs`: image extensions, and any file whose content is an
    image in a format we read (AVIF, names without an extension...), as in single-file mode."""

    def take(p: Path) -> str | None:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return None
        head = _first_bytes(p)
        if head is None:
            return None
        plugin, what = pipeline.file_kind(head)
        return None if plugin is not None else (what or "not an image the codec reads")

    return take


def _takes_lic(pipeline):
    """decode's ``take`` for :func:`_pairs`: .lic files, by extension or content."""

    def take(p: Path) -> str | None:
        if p.suffix.lower() == ".lic":
            return None
        head = _first_bytes(p)
        if head is None or head.startswith(b"\x89LIC"):
            return None
        _, what = pipeline.file_kind(head)
        return f"{what}, not a .lic file" if what else "not a .lic file"

    return take


def _refuse_clashes(pairs) -> None:
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


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"{folder}: cannot create folder ({e.strerror or e})") from None


def _single_output(input: str, output: str, out_suffix: str) -> str:
    """Single-file mode: an OUT that ends in a slash, or is an existing folder, means
    OUT/<IN's name><out_suffix>; a missing folder is created."""
    slashes = tuple(s for s in (os.sep, os.altsep) if s)
    if output == "-" or not (output.endswith(slashes) or Path(output).is_dir()):
        return output
    if input == "-":
        raise click.UsageError(f"OUT {output!r} is a folder: give a file name (or -) to write what is read from stdin")
    folder = Path(output)
    _make_folder(folder)
    return str(folder / (Path(input).stem + out_suffix))


# ------------------------------------------------------------------------------------------------
# commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="codec")
def main():
    """lalic-codec: compress images with learned codecs into .lic files.

    \b
      codec encode photo.png photo.lic          (bundled default model)
      codec decode photo.lic photo.png
      codec info photo.lic
      codec encode photos/ compressed/          (whole folders)
      cat a.png | codec encode - - | codec decode - b.png
    """


def _max_pixels_option(f):
    return click.option(
        "--max-pixels", type=click.IntRange(min=1), default=None, metavar="N",
        help="refuse images and .lic files of more than N pixels (default 2^28 = 268435456)",
    )(f)


def _memory_size(ctx, param, value):
    """Callback for --max-memory: "2G", "800M", bytes... -> bytes; at least what the model needs."""
    if value is None:
        return None
    from .memory import MIN_BUDGET, format_memory, parse_memory

    try:
        n = parse_memory(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if n < MIN_BUDGET:
        raise click.BadParameter(f"{value} is less than the {format_memory(MIN_BUDGET)} that the model and the smallest tiles need")
    return n


def _max_memory_option(help: str):
    return click.option("--max-memory", callback=_memory_size, default=None, metavar="SIZE", help=help)


def _finite(ctx, param, value):
    """Callback: refuse nan and infinities (click's FloatRange lets them through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _refuse_folder_to_stdout(input: str, output: str) -> None:
    if output == "-":
        raise click.UsageError(f"IN {input} is a folder: OUT must be a folder too, not - (stdout takes one file)")


def _check_format_matches(output: str, ext: str | None) -> None:
    """decode OUT --format X: a usage error when OUT's extension asks for another format."""
    suffix = "" if output == "-" else Path(output).suffix.lower()
    if ext and suffix in OUTPUT_FORMATS and OUTPUT_FORMATS[suffix] != OUTPUT_FORMATS[ext]:
        raise _bad_option("ext", f"{ext[1:]} conflicts with {output}, whose extension asks for {OUTPUT_FORMATS[suffix]}")


def _format_ext(ctx, param, value):
    """Callback for decode --format: "jpg", "JPG" or ".jpg" -> ".jpg"; unknown formats refused."""
    if value is None:
        return None
    ext = "." + value.lower().lstrip(".")
    if ext not in OUTPUT_FORMATS:
        raise click.BadParameter(f"{value!r} is not an output format; use one of {', '.join(e[1:] for e in OUTPUT_FORMATS)}")
    return ext


def _bad_option(name: str, message: str) -> click.BadParameter:
    """A usage error (exit 2) about option ``name``, for checks that need the model or the pipeline."""
    ctx = click.get_current_context()
    return click.BadParameter(message, ctx=ctx, param=next(p for p in ctx.command.params if p.name == name))


def _check_tile(tile: int | None, pipeline) -> None:
    if tile is None:  # chosen from the memory budget
        return
    try:
        pipeline.plan_tiles(tile, tile, tile)  # the rule lives with the tiling
    except BadInputError as e:
        raise _bad_option("tile", str(e)) from None


def _check_quality(quality: float | None, lm) -> None:
    if quality is not None and lm.variable_rate and quality > lm.model.num_levels:
        raise _bad_option("quality", f"{quality:g} is not in the range 1<=x<={lm.model.num_levels} of model {lm.model_id}")


def _model_name(ctx, param, value):
    """Callback for --model: refuse names that are no model of ours."""
    if value is not None and value not in MODELS + MODEL_ALIASES:
        raise click.BadParameter(f"unknown model {value} (choose from {', '.join(MODELS)})")
    return value


def _encode_options(memory_help: str):
    """--model, --quality, --target-bpp, --tile and --max-memory: the coding options of codec encode
    and codec batch encode, defined once so that their defaults cannot drift apart."""
    options = (
        click.option("--model", default="default", show_default=True, callback=_model_name, help="default (bundled), lalic or mambaic (these need --weights)"),
        click.option("--quality", "-q", type=click.FloatRange(min=1), callback=_finite, default=None, help="1 (smallest) .. 8 (best), fractions allowed; default 4"),
        click.option("--target-bpp", type=click.FloatRange(min=0, min_open=True), callback=_finite, default=None, help="largest quality whose file is at most this many bits per pixel"),
        click.option("--tile", type=int, default=None, metavar="N", help="code images as overlapping tiles of at most N x N pixels (multiple of 64); default: the largest tiles --max-memory allows"),
        _max_memory_option(memory_help),
    )

    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply


def _common_model_options(f):
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="where the network runs")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False), default=None, help="weights file (official checkpoint or .safetensors)")(f)
    return f


@main.command()
@click.argument("input", metavar="IN")
@click.argument("output", metavar="OUT")
@_encode_options("memory budget that picks the tiles (2G, 800M...); default: half the memory available")
@_common_model_options
@_max_pixels_option
@click.option("--force", "-f", is_flag=True, help="overwrite existing outputs")
@click.option("--skip-existing", is_flag=True, help="folders: leave outputs that already exist")
@click.option("--recursive", "-r", is_flag=True, help="folders: include subfolders, keeping their tree in OUT")
@click.option("--psnr", "report_psnr", is_flag=True, help="also decode the result and print its PSNR")
@click.option("--quiet", is_flag=True, help="print nothing but errors")
def encode(input, output, model, quality, target_bpp, tile, max_memory, device, weights, max_pixels, force, skip_existing, recursive, report_psnr, quiet):
    """Compress image IN into OUT (.lic).  IN and OUT may be folders, or - for stdin/stdout."""
    from ._runtime import tune_allocator

    started = time.time()
    tune_allocator()
    with _signals_interrupt():
        _encode(input, output, model, quality, target_bpp, tile, max_memory, device, weights, max_pixels, force, skip_existing, recursive, report_psnr, quiet, started)


def _encode(input, output, model, quality, target_bpp, tile, max_memory, device, weights, max_pixels, force, skip_existing, recursive, report_psnr, quiet, started):
    with _exit_codes():
        if quality is not None and target_bpp is not None:
            raise click.UsageError("give --quality or --target-bpp, not both")
        _refuse_terminal(output, "binary .lic data", "codec encode IN - > OUT.lic")
        from . import pipeline

        _check_tile(tile, pipeline)
        lm = pipeline.load_model(model, weights, device)
        _check_quality(quality, lm)
        limit = pipeline.MAX_PIXELS if max_pixels is None else max_pixels

        def job(src: str, dst: str) -> None:
            data = read_input(src)
            im = pipeline.open_image(data, max_pixels=limit, name=_shown(src))
            if target_bpp is not None:
                res = pipeline.encode_to_target(im, lm, target_bpp, tile=tile, on_trial=lambda r: _trial(r, target_bpp, quiet), max_memory=max_memory)
            else:
                res = pipeline.encode_image(im, lm, quality, tile=tile, max_memory=max_memory)
            write_output(dst, res.data, force)
            msg = f"{_shown(src)} -> {_shown(dst, 'stdout')}: {res.width}x{res.height}, {len(res.data)} bytes, {res.bpp:.4f} bpp"
            if lm.variable_rate:
                msg += f", quality {res.quality:g}"
            if report_psnr:
                ref = pipeline.open_image(data, max_pixels=limit)
                dec = pipeline.decode_bytes(res.data, weights, device, pipeline.limits(max_pixels))
                msg += f", PSNR {pipeline.image_psnr(ref, dec.image):.2f} dB"
            for note in res.notes:
                msg += f" ({note})"
            _say(msg, quiet)

        if input != "-" and Path(input).is_dir():
            _refuse_folder_to_stdout(input, output)
            pairs, ignored = _pairs(Path(input), Path(output), _takes_image(pipeline), ".lic", recursive)
            sys.exit(_run_batch(pairs, job, quiet, skip_existing, force, "encoded", started, ignored))
        output = _single_output(input, output, ".lic")
        if output != "-" and Path(output).suffix.lower() != ".lic":
            _say(f"codec: warning: {output} does not end in .lic (encode writes .lic files whatever their name; decode makes images)", quiet)
        _clean_for(output, started)
        job(input, output)


@main.command()
@click.argument("input", metavar="IN")
@click.argument("output", metavar="OUT")
@_common_model_options
@_max_pixels_option
@click.option("--force", "-f", is_flag=True, help="overwrite existing outputs")
@click.option("--skip-existing", is_flag=True, help="folders: leave outputs that already exist")
@click.option("--recursive", "-r", is_flag=True, help="folders: include subfolders, keeping their tree in OUT")
@click.option("--format", "ext", callback=_format_ext, default=None, help="output format for stdout and folders (png, jpg, webp, bmp, tif, ppm)")
@_max_memory_option("refuse files whose tiles need more memory than this (2G, 800M...); default: the memory available")
@click.option("--quiet", is_flag=True, help="print nothing but errors")
def decode(input, output, device, weights, max_pixels, force, skip_existing, recursive, ext, max_memory, quiet):
    """Decompress IN (.lic) into image OUT; the format follows OUT's extension (PNG by default)."""
    from ._runtime import tune_allocator

    started = time.time()
    tune_allocator()
    with _signals_interrupt():
        _decode(input, output, device, weights, max_pixels, force, skip_existing, recursive, ext, max_memory, quiet, started)


def _decode(input, output, device, weights, max_pixels, force, skip_existing, recursive, ext, max_memory, quiet, started):
    """``ext``: the extension that --format names (".jpg"), or None."""
    with _exit_codes():
        _refuse_terminal(output, "image data", f"codec decode IN - {f'--format {ext[1:]} ' if ext else ''}> OUT{ext or '.png'}")
        from . import pipeline

        lim = pipeline.limits(max_pixels)

        def job(src: str, dst: str) -> None:
            data = read_input(src)
            try:
                res = pipeline.decode_bytes(data, weights, device, lim, max_memory=max_memory)
            except (BadInputError, CorruptFileError) as e:
                _, kind = pipeline.file_kind(data[:4096])
                if type(e) is NotALicFileError and data and kind:  # say what it is rather than its first bytes
                    e = NotALicFileError(f"not a .lic file ({kind})")
                raise _named(src, e) from None
            fmt_name = _output_format(dst, ext)
            write_output(dst, lambda f: pipeline.save_image(res.image, f, fmt_name), force)
            _say(f"{_shown(src)} -> {_shown(dst, 'stdout')}: {res.header.width}x{res.header.height} {res.image.mode}", quiet)

        if input != "-" and Path(input).is_dir():
            _refuse_folder_to_stdout(input, output)
            pairs, ignored = _pairs(Path(input), Path(output), _takes_lic(pipeline), ext or ".png", recursive)
            sys.exit(_run_batch(pairs, job, quiet, skip_existing, force, "decoded", started, ignored))
        output = _single_output(input, output, ext or ".png")
        _check_format_matches(output, ext)
        _clean_for(output, started)
        job(input, output)


def info_lines(d: dict, file: str) -> str:
    """The text ``codec info`` prints for a :func:`~lalic_codec.formats.container.read_info` dict
    (adds its ``bpp``)."""
    d["bpp"] = 8.0 * d["file_bytes"] / (d["width"] * d["height"])
    lines = [
        f"file:        {file} ({d['file_bytes']} bytes, {d['bpp']:.4f} bpp)",
        f"format:      .lic version {d['format_version']}",
        f"image:       {d['width']}x{d['height']} {d['colour_mode']}, {d['bit_depth']}-bit",
        f"model:       {d['model_id']} (weights {d['weights_fingerprint']})",
        f"quality:     {d['quality']:g}" if d["quality"] else "quality:     fixed-rate model",
        f"entropy:     parameters computed on {d['device_class_name']}",
        f"tiles:       {d['tile_count']}, {len(d['tiles'][0]['stream_bytes'])} streams each",
        f"streams:     {d['stream_bytes_total']} bytes" + (f" ({d['tile_count']} tiles added up)" if d["tile_count"] > 1 else ""),
    ]
    # by name (FORMAT.md 11.3), in coding order
    names = d.get("stream_names") or [f"stream {i}" for i in range(len(d["tiles"][0]["stream_bytes"]))]
    width = max(map(len, names))
    for i, name in enumerate(names):
        lines.append(f"{'':13}{name:<{width}} {sum(t['stream_bytes'][i] for t in d['tiles']):>8}")
    if d.get("metadata"):
        lines.append(f"metadata:    {d['metadata']['content_bytes']} bytes ({d['metadata']['compressed_bytes']} compressed)")
    if d.get("alpha"):
        lines.append(f"alpha:       {d['alpha']['content_bytes']} bytes ({d['alpha']['compressed_bytes']} compressed)")
    lines.append("integrity:   all CRCs OK" if d["crc_ok"] else "integrity:   CORRUPT: " + "; ".join(d["crc_errors"]))
    return "\n".join(lines)


@main.command()
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_max_pixels_option
def info(file, as_json, max_pixels):
    """Describe a .lic file without decoding it (header, metadata, streams, CRC check)."""
    try:
        from .formats import container

        data = read_input(file)
        limits = container.Limits() if max_pixels is None else container.Limits(max_pixels=max_pixels)
        d = container.read_info(data, limits)
        d["stream_names"] = container.stream_names(d["streams_per_tile"])  # FORMAT.md 11.3
        text = info_lines(d, file)
        click.echo(json.dumps(d, indent=2) if as_json else text)
        if not d["crc_ok"]:
            from .errors import CrcMismatchError

            sys.exit(CrcMismatchError.exit_code)
    except KeyboardInterrupt:
        click.echo("codec: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        sys.exit(_fail(e))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def train(ctx):
    """Train or export the default model (see: codec train --help)."""
    from .train import cli as train_cli

    train_cli.main(args=ctx.args, prog_name="codec train", standalone_mode=True)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def bench(ctx):
    """Rate-distortion and speed against JPEG, WebP, AVIF, JPEG XL (see: codec bench --help)."""
    from .bench import cli as bench_cli  # imported here: the benchmark and its extras load only when used

    bench_cli.main(args=ctx.args, prog_name="codec bench", standalone_mode=True)


if __name__ == "__main__":  # python -m lalic_codec.cli: run the module proper, which has codec batch
    from lalic_codec.cli import main as _main

    _main()
else:
    from .batch.command import batch  # codec batch (Ray is imported only when it runs)

    main.add_command(batch)
