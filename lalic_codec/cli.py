"""The ``codec`` command.

Start-up matters: ``codec --help``, ``codec --version`` and ``codec info`` never import torch
(the networks are imported inside the commands that need them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .errors import BadInputError, CodecError, CorruptFileError, NotALicFileError
from .exits import exit_codes, signals_interrupt
from .files import (OUTPUT_FORMATS, clean_stale_temps, display_name, entry_name, folder_pairs, make_folder, named_error,
                    output_format, read_input, refuse_overwriting_inputs, take_image, take_lic, write_output)
from .options import (bad_option, check_quality, check_tile, common_model_options, encode_options, format_ext,
                      max_memory_option, max_pixels_option)


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


def _clean_for(output: str, started: float) -> None:
    """Single-file mode: remove a killed run's temporary files for this output name."""
    if output != "-":
        p = Path(output)
        clean_stale_temps(p.parent if str(p.parent) else Path("."), {p.name}, started)


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
        _say(f"  {entry_name(p)}: ignored ({why})", quiet)
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


def _single_output(input: str, output: str, out_suffix: str) -> str:
    """Single-file mode: an OUT that ends in a slash, or is an existing folder, means
    OUT/<IN's name><out_suffix>; a missing folder is created."""
    slashes = tuple(s for s in (os.sep, os.altsep) if s)
    if output == "-" or not (output.endswith(slashes) or Path(output).is_dir()):
        return output
    if input == "-":
        raise click.UsageError(f"OUT {output!r} is a folder: give a file name (or -) to write what is read from stdin")
    folder = Path(output)
    make_folder(folder)
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


def _refuse_folder_to_stdout(input: str, output: str) -> None:
    if output == "-":
        raise click.UsageError(f"IN {input} is a folder: OUT must be a folder too, not - (stdout takes one file)")


def _check_format_matches(output: str, ext: str | None) -> None:
    """decode OUT --format X: a usage error when OUT's extension asks for another format."""
    suffix = "" if output == "-" else Path(output).suffix.lower()
    if ext and suffix in OUTPUT_FORMATS and OUTPUT_FORMATS[suffix] != OUTPUT_FORMATS[ext]:
        raise bad_option("ext", f"{ext[1:]} conflicts with {output}, whose extension asks for {OUTPUT_FORMATS[suffix]}")


@main.command()
@click.argument("input", metavar="IN")
@click.argument("output", metavar="OUT")
@encode_options("memory budget that picks the tiles (2G, 800M...); default: half the memory available")
@common_model_options
@max_pixels_option
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
    with signals_interrupt():
        _encode(input, output, model, quality, target_bpp, tile, max_memory, device, weights, max_pixels, force, skip_existing, recursive, report_psnr, quiet, started)


def _encode(input, output, model, quality, target_bpp, tile, max_memory, device, weights, max_pixels, force, skip_existing, recursive, report_psnr, quiet, started):
    with exit_codes():
        if quality is not None and target_bpp is not None:
            raise click.UsageError("give --quality or --target-bpp, not both")
        _refuse_terminal(output, "binary .lic data", "codec encode IN - > OUT.lic")
        from . import imaging, loading, pipeline

        check_tile(tile)
        lm = loading.load_model(model, weights, device)
        check_quality(quality, lm)
        limit = imaging.MAX_PIXELS if max_pixels is None else max_pixels

        def job(src: str, dst: str) -> None:
            data = read_input(src)
            im = imaging.open_image(data, max_pixels=limit, name=display_name(src))
            if target_bpp is not None:
                res = pipeline.encode_to_target(im, lm, target_bpp, tile=tile, on_trial=lambda r: _trial(r, target_bpp, quiet), max_memory=max_memory)
            else:
                res = pipeline.encode_image(im, lm, quality, tile=tile, max_memory=max_memory)
            write_output(dst, res.data, force)
            msg = f"{display_name(src)} -> {display_name(dst, 'stdout')}: {res.width}x{res.height}, {len(res.data)} bytes, {res.bpp:.4f} bpp"
            if lm.variable_rate:
                msg += f", quality {res.quality:g}"
            if report_psnr:
                ref = imaging.open_image(data, max_pixels=limit)
                dec = pipeline.decode_bytes(res.data, weights, device, pipeline.limits(max_pixels))
                msg += f", PSNR {imaging.image_psnr(ref, dec.image):.2f} dB"
            for note in res.notes:
                msg += f" ({note})"
            _say(msg, quiet)

        if input != "-" and Path(input).is_dir():
            _refuse_folder_to_stdout(input, output)
            pairs, ignored = folder_pairs(Path(input), Path(output), take_image, ".lic", recursive)
            sys.exit(_run_batch(pairs, job, quiet, skip_existing, force, "encoded", started, ignored))
        output = _single_output(input, output, ".lic")
        refuse_overwriting_inputs([(input, output)])
        if output != "-" and Path(output).suffix.lower() != ".lic":
            _say(f"codec: warning: {output} does not end in .lic (encode writes .lic files whatever their name; decode makes images)", quiet)
        _clean_for(output, started)
        job(input, output)


@main.command()
@click.argument("input", metavar="IN")
@click.argument("output", metavar="OUT")
@common_model_options
@max_pixels_option
@click.option("--force", "-f", is_flag=True, help="overwrite existing outputs")
@click.option("--skip-existing", is_flag=True, help="folders: leave outputs that already exist")
@click.option("--recursive", "-r", is_flag=True, help="folders: include subfolders, keeping their tree in OUT")
@click.option("--format", "ext", callback=format_ext, default=None, help="output format for stdout and folders (png, jpg, webp, bmp, tif, ppm)")
@max_memory_option("refuse files whose tiles need more memory than this (2G, 800M...); default: the memory available")
@click.option("--quiet", is_flag=True, help="print nothing but errors")
def decode(input, output, device, weights, max_pixels, force, skip_existing, recursive, ext, max_memory, quiet):
    """Decompress IN (.lic) into image OUT; the format follows OUT's extension (PNG by default)."""
    from ._runtime import tune_allocator

    started = time.time()
    tune_allocator()
    with signals_interrupt():
        _decode(input, output, device, weights, max_pixels, force, skip_existing, recursive, ext, max_memory, quiet, started)


def _decode(input, output, device, weights, max_pixels, force, skip_existing, recursive, ext, max_memory, quiet, started):
    """``ext``: the extension that --format names (".jpg"), or None."""
    with exit_codes():
        _refuse_terminal(output, "image data", f"codec decode IN - {f'--format {ext[1:]} ' if ext else ''}> OUT{ext or '.png'}")
        from . import imaging, pipeline

        lim = pipeline.limits(max_pixels)

        def job(src: str, dst: str) -> None:
            data = read_input(src)
            try:
                res = pipeline.decode_bytes(data, weights, device, lim, max_memory=max_memory)
            except (BadInputError, CorruptFileError) as e:
                _, kind = imaging.file_kind(data[:4096])
                if type(e) is NotALicFileError and data and kind:  # say what it is rather than its first bytes
                    e = NotALicFileError(f"not a .lic file ({kind})")
                raise named_error(src, e) from None
            fmt_name = output_format(dst, ext)
            write_output(dst, lambda f: imaging.save_image(res.image, f, fmt_name), force)
            notes = "".join(f" ({note})" for note in imaging.lost_in_format(res.image, fmt_name))
            _say(f"{display_name(src)} -> {display_name(dst, 'stdout')}: {res.header.width}x{res.header.height} {res.image.mode}{notes}", quiet)

        if input != "-" and Path(input).is_dir():
            _refuse_folder_to_stdout(input, output)
            pairs, ignored = folder_pairs(Path(input), Path(output), take_lic, ext or ".png", recursive)
            sys.exit(_run_batch(pairs, job, quiet, skip_existing, force, "decoded", started, ignored))
        output = _single_output(input, output, ext or ".png")
        _check_format_matches(output, ext)
        refuse_overwriting_inputs([(input, output)])
        _clean_for(output, started)
        job(input, output)


@main.command()
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@max_pixels_option
def info(file, as_json, max_pixels):
    """Describe a .lic file without decoding it (header, metadata, streams, CRC check)."""
    with exit_codes():
        from .formats import container

        data = read_input(file)
        limits = container.Limits() if max_pixels is None else container.Limits(max_pixels=max_pixels)
        d = container.read_info(data, limits)
        # FORMAT.md 11.3; one stream of segments where they are merged (12.8)
        d["stream_names"] = ["merged"] if d["merged_streams"] else container.stream_names(d["streams_per_tile"])
        text = container.info_lines(d, file)
        click.echo(json.dumps(d, indent=2) if as_json else text)
        if not d["crc_ok"]:
            from .errors import CrcMismatchError

            sys.exit(CrcMismatchError.exit_code)


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
