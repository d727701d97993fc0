"""The click options and checks that ``codec encode/decode`` and ``codec batch encode/decode``
share, defined once so that their defaults cannot drift apart.  Import-light (click, and the
output formats of :mod:`.imaging`, which imports Pillow but not numpy or torch; the memory budget
and the tiling are imported when an option is checked)."""

from __future__ import annotations

import math

import click

from .errors import BadInputError
from .imaging import OUTPUT_FORMATS

#: what --model accepts: the choices shown, then other names of the same models
MODELS = ("default", "lalic", "mambaic")


MODEL_ALIASES = ("default-v10", "lalic-vr")


def max_pixels_option(f):
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


def max_memory_option(help: str):
    return click.option("--max-memory", callback=_memory_size, default=None, metavar="SIZE", help=help)


def finite(ctx, param, value):
    """Callback: refuse nan and infinities (click's FloatRange lets them through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def format_ext(ctx, param, value):
    """Callback for decode --format: "jpg", "JPG" or ".jpg" -> ".jpg"; unknown formats refused."""
    if value is None:
        return None
    ext = "." + value.lower().lstrip(".")
    if ext not in OUTPUT_FORMATS:
        raise click.BadParameter(f"{value!r} is not an output format; use one of {', '.join(e[1:] for e in OUTPUT_FORMATS)}")
    return ext


def bad_option(name: str, message: str) -> click.BadParameter:
    """A usage error (exit 2) about option ``name``, for checks that need the model or the pipeline."""
    ctx = click.get_current_context()
    return click.BadParameter(message, ctx=ctx, param=next(p for p in ctx.command.params if p.name == name))


def check_tile(tile: int | None) -> None:
    if tile is None:  # chosen from the memory budget
        return
    from . import tiling  # imports torch: only when --tile is given

    try:
        tiling.plan_tiles(tile, tile, tile)  # the rule lives with the tiling
    except BadInputError as e:
        raise bad_option("tile", str(e)) from None


def check_quality(quality: float | None, lm) -> None:
    if quality is not None and lm.variable_rate and quality > lm.model.num_levels:
        raise bad_option("quality", f"{quality:g} is not in the range 1<=x<={lm.model.num_levels} of model {lm.model_id}")


def _model_name(ctx, param, value):
    """Callback for --model: refuse names that are no model of ours."""
    if value is not None and value not in MODELS + MODEL_ALIASES:
        raise click.BadParameter(f"unknown model {value} (choose from {', '.join(MODELS)})")
    return value


def encode_options(memory_help: str):
    """--model, --quality, --target-bpp, --tile and --max-memory: the coding options of codec encode
    and codec batch encode, defined once so that their defaults cannot drift apart."""
    options = (
        click.option("--model", default="default", show_default=True, callback=_model_name, help="default (bundled), lalic or mambaic (these need --weights)"),
        click.option("--quality", "-q", type=click.FloatRange(min=1), callback=finite, default=None, help="1 (smallest) .. 8 (best), fractions allowed; default 4"),
        click.option("--target-bpp", type=click.FloatRange(min=0, min_open=True), callback=finite, default=None, help="largest quality whose file is at most this many bits per pixel"),
        click.option("--tile", type=int, default=None, metavar="N", help="code images as overlapping tiles of at most N x N pixels (multiple of 64); default: the largest tiles --max-memory allows"),
        max_memory_option(memory_help),
    )

    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply


def common_model_options(f):
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="where the network runs")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False), default=None, help="weights file (official checkpoint or .safetensors)")(f)
    return f
