"""``codec batch encode|decode SRC DST``: the click commands.  Import-light (click and the commands'
option helpers): Ray, fsspec and torch are imported when a command runs."""

from __future__ import annotations

import sys

import click

from ..exits import exit_codes, signals_interrupt
from ..options import check_tile, common_model_options, encode_options, format_ext, max_pixels_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def batch():
    """Code whole datasets on a Ray cluster (needs: pip install -e '.[distributed]').

    \b
    SRC is a folder (-r: with subfolders), a glob or a manifest (a text file, one path or URL a
    line); local paths or fsspec URLs (s3://, gs://...). Outputs mirror the input tree under DST.
      codec batch encode photos/ compressed/ --workers 4        (a local Ray instance)
      codec batch encode s3://b/photos/ s3://b/lic/ -r --address auto --gpus-per-worker 0.5
    """


def _batch_options(f):
    for opt in reversed([
        click.option("--force", "-f", is_flag=True, help="overwrite existing outputs"),
        click.option("--skip-existing", is_flag=True, help="leave outputs that already exist (resume a job)"),
        click.option("--recursive", "-r", is_flag=True, help="include subfolders (and ** in globs), keeping their tree in DST"),
        click.option("--quiet", is_flag=True, help="print nothing but errors"),
        click.option("--address", default=None, metavar="ADDR", help="Ray cluster to join: auto, ray://HOST:10001 or HOST:6379 (default: a local Ray instance)"),
        click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N", help="actors in the pool (default: the cluster's CPUs / threads, or GPUs / GPUs per worker)"),
        click.option("--threads-per-worker", "threads", type=click.IntRange(min=1), default=1, show_default=True, metavar="T", help="CPU threads (and Ray CPUs) per worker"),
        click.option("--gpus-per-worker", "gpus", type=click.FloatRange(min=0, min_open=True), default=None, metavar="G", help="GPUs per worker (fractions share a GPU); CPU workers when the cluster has none"),
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, metavar="N", help="inputs per call to a worker (also the work a dead worker's retry redoes)"),
        click.option("--max-retries", type=click.IntRange(min=0), default=3, show_default=True, metavar="N", help="retries of a batch whose worker died"),
        click.option("--manifest", default=None, metavar="PATH", help="result manifest, JSON Lines (default DST/batch-manifest.jsonl)"),
    ]):
        f = opt(f)
    return f


def _run(mode: str, src: str, dst: str, **kw) -> None:
    from .._runtime import tune_allocator

    with exit_codes():
        from .job import Options, run

        o = Options(**kw)
        if o.quality is not None and o.target_bpp is not None:
            raise click.UsageError("give --quality or --target-bpp, not both")
        if mode == "encode":
            check_tile(o.tile)
        tune_allocator()
        with signals_interrupt():
            code = run(mode, src, dst, o)
    sys.exit(code)


@batch.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@encode_options("memory budget of each worker that picks the tiles (2G, 800M...); default: half the memory available, shared by the workers of a machine")
@common_model_options
@max_pixels_option
@click.option("--psnr", "psnr", is_flag=True, help="also decode each result and record its PSNR")
@_batch_options
def encode(src, dst, **kw):
    """Compress every image of SRC into DST/**.lic, on Ray workers (--weights are shipped to them)."""
    _run("encode", src, dst, **kw)


@batch.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@common_model_options
@max_pixels_option
@click.option("--format", "ext", callback=format_ext, default=None, help="output format (png, jpg, webp, bmp, tif, ppm; default png)")
@_batch_options
def decode(src, dst, **kw):
    """Decompress every .lic file of SRC into images under DST, on Ray workers."""
    _run("decode", src, dst, model=None, **kw)

