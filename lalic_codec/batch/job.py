"""The driver of ``codec batch``: plan the inputs, start or join Ray, run the actor pool over a
dataset of (input, output) rows, write the result manifest and print the summary.

The manifest is JSON Lines (one object a line, written as results arrive, so an interrupted job
keeps what it finished): ``source``, ``output``, ``status`` (ok, skipped, failed), ``error`` (the
error's class) and ``message``, ``exit_code``, ``width``, ``height``, ``input_bytes``, ``bytes``
(of the .lic file: written by encode, read by decode), ``bpp``, ``quality``, ``seconds`` (read,
code and write, in the worker), ``worker`` (host:pid) and, with ``--psnr``, ``psnr``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

import click

from .. import __version__
from ..errors import CodecError, OutputExistsError
from . import inputs
from .worker import Coder, failed, new_row


class WorkerLostError(CodecError):
    """The worker coding an input died on every attempt (out of memory, killed)."""

    exit_code = 1


@dataclass
class Options:
    model: str | None = "default"
    quality: float | None = None
    target_bpp: float | None = None
    tile: int | None = None  # None: the largest tiles the memory budget allows
    max_memory: int | None = None  # bytes per worker; None: its share of the machine's
    device: str = "auto"
    weights: str | None = None
    max_pixels: int | None = None
    force: bool = False
    skip_existing: bool = False
    recursive: bool = False
    psnr: bool = False
    quiet: bool = False
    ext: str | None = None
    address: str | None = None
    workers: int | None = None
    threads: int = 1
    gpus: float | None = None
    batch_size: int = 4
    max_retries: int = 3
    manifest: str | None = None


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        from ..errors import MissingExtrasError

        raise MissingExtrasError("codec batch needs Ray: pip install -e '.[distributed]' "
                                 "(or pip install 'ray[data]>=2.9' 'fsspec>=2023.1')") from None
    return ray


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        click.echo(msg, err=True)


def run(mode: str, src: str, dst: str, o: Options) -> int:
    """Code every input of SRC into DST; returns the exit status (that of the first failure)."""
    started = time.time()
    ray = require_ray()
    decode = mode == "decode"
    pairs, ignored = inputs.plan(src, dst, decode, o.recursive, (o.ext or ".png") if decode else ".lic")
    dst = inputs.canonical(inputs.local(dst))
    shipped = _weights_bytes(o)
    exist = inputs.existing(pairs, dst)
    order = {s: i for i, (s, _) in enumerate(pairs)}
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    failures, sizes = [], [0, 0, 0.0]  # input bytes, output bytes, worker seconds of the coded inputs
    manifest = Manifest(o.manifest or inputs._join(dst, PurePosixPath(inputs.MANIFEST_NAME)))

    def record(row: dict) -> None:
        manifest.write(row)
        counts[row["status"]] += 1
        if row["status"] == "failed":
            failures.append(row)
        elif row["status"] == "ok":
            sizes[0] += row["input_bytes"] or 0
            sizes[1] += (row["bytes"] if not decode else 0) or 0
            sizes[2] += row["seconds"] or 0.0

    todo = []
    for s, d in pairs:
        if d in exist and not o.force:  # decided once, here: workers then always (re)write
            row = new_row(s, d, o.psnr)
            if o.skip_existing:
                row["status"] = "skipped"
            else:
                failed(row, OutputExistsError(f"{d} exists (use --force to overwrite)"))
            record(row)
        else:
            todo.append((s, d))
    stale = inputs.clean_temps(todo, started)
    if stale:
        say(f"removed {stale} temporary file{'s' * (stale != 1)} left by an interrupted run", o.quiet)
    pool = ""
    try:
        if todo:
            owns = connect(ray, o.address, o.quiet)
            try:
                spec, workers, res = job_spec(ray, mode, o)
                pool = f" on {workers} worker{'s' * (workers != 1)} ({res})"
                for row in execute(ray, todo, spec, shipped, workers, o):
                    record(row)
            finally:
                if owns:
                    ray.shutdown()
    except KeyboardInterrupt:
        manifest.close()
        click.echo(f"{mode}d {counts['ok']} file{'s' * (counts['ok'] != 1)} before the interruption; "
                   "run again with --skip-existing to finish", err=True)
        raise
    manifest.close()
    wall = time.time() - started
    n = counts["ok"]
    parts = [f"{mode}d {n} file{'s' * (n != 1)}"]
    if counts["skipped"]:
        parts.append(f"skipped {counts['skipped']} existing")
    if ignored:
        parts.append(f"{len(ignored)} ignored")
    if counts["failed"]:
        parts.append(f"{counts['failed']} failed")
    rate = f"{n / wall:.2f} images/s, {sizes[0] / wall / 1e6:.3f} MB/s in"
    if not decode:
        rate += f", {sizes[1] / wall / 1e6:.3f} MB/s out"
    per = f", {sizes[2] / n:.3f} s per image in a worker" if n else ""
    say(f"{', '.join(parts)} in {wall:.1f} s{pool}: {rate}{per}; manifest {manifest.path}",
        o.quiet and not failures)
    for p, why in ignored:
        say(f"  {p}: ignored ({why})", o.quiet)
    failures.sort(key=lambda r: order.get(r["source"], 0))
    for row in failures:
        click.echo(f"  {row['message']}", err=True)
    return failures[0]["exit_code"] if failures else 0


def _weights_bytes(o: Options):
    """--weights: read here (a local path or a URL) and checked by loading them, to be shipped to
    the workers through the object store; the model is also loaded here to check --quality."""
    from .. import loading
    from ..options import check_quality

    data = None
    path = o.weights
    if o.weights is not None:
        data = inputs.read_bytes(o.weights)
        from .worker import weights_file

        path = weights_file(data, PurePosixPath(o.weights).suffix)
    if o.weights is not None or o.quality is not None:
        check_quality(o.quality, loading.load_model(o.model or "default", path, "cpu"))
    return None if data is None else (data, PurePosixPath(o.weights).suffix)


def connect(ray, address: str | None, quiet: bool = False) -> bool:
    """Join the cluster at ``address`` (auto, ray://..., host:port), or start a local Ray instance;
    True when this call started or joined it (and so shuts it down).  An instance already
    initialised in this process (tests, notebooks) is used as it is."""
    if ray.is_initialized():
        return False
    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=not quiet)
    return True


def job_spec(ray, mode: str, o: Options):
    """(the workers' job, pool size, resources per worker in words) from the cluster's resources."""
    res = ray.cluster_resources()
    gpus = o.gpus or 0.0
    device = o.device
    if gpus and not res.get("GPU"):
        say("codec: warning: --gpus-per-worker given, but the cluster has no GPUs: workers run on CPU")
        gpus = 0.0
    if device == "cuda" and not gpus:
        raise click.UsageError("--device cuda needs --gpus-per-worker (Ray hides the GPUs from workers that ask for none)")
    if gpus and device == "auto":
        device = "cuda"
    if o.workers:
        workers = o.workers
    elif gpus:
        workers = max(1, int(res["GPU"] // gpus))
    else:
        workers = max(1, int(res.get("CPU", 1) // o.threads))
    spec = dict(mode=mode, model=o.model, quality=o.quality, target_bpp=o.target_bpp, tile=o.tile, max_memory=o.max_memory, device=device,
                max_pixels=o.max_pixels, psnr=o.psnr, ext=o.ext, threads=o.threads, gpus=gpus, version=__version__,
                fault=os.environ.get("LALIC_BATCH_TEST_FAULT"))  # tests only: see Coder._fault_hook
    where = f"{o.threads} CPU thread{'s' * (o.threads != 1)}" + (f", {gpus:g} GPU" if gpus else "") + " each"
    return spec, workers, where


def execute(ray, todo, spec: dict, shipped, workers: int, o: Options):
    """Yield one result row per input of ``todo``.  Ray restarts a dead actor and retries its
    batch (up to --max-retries times); inputs still without a row afterwards are run again one
    per task (so that an input that kills its worker cannot take others with it), then recorded
    as failed."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = -1  # a batch lost beyond its retries: its inputs are retried below
    ctx.enable_progress_bars = not o.quiet and _stderr_is_terminal()
    if not ctx.enable_progress_bars:  # nor the log lines that replace them, nor a warning that they are off
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # a batch lost with its worker: one line, not a traceback (this function says what it does about it)
    lost = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    lost.setLevel(logging.CRITICAL if o.quiet else logging.WARNING)
    if not any(isinstance(f, _OneLine) for f in lost.filters):
        lost.addFilter(_OneLine())
    weights = None if shipped is None else [ray.put(shipped[0]), shipped[1]]  # once into the object store
    done = set()
    remaining, batch_size = list(todo), o.batch_size
    for attempt in range(2):
        rows = [{"src": s, "dst": d} for s, d in remaining]
        blocks = min(len(rows), max(1, -(-len(rows) // batch_size)), 4096)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                Coder, fn_constructor_kwargs=dict(job=spec, weights=weights), batch_size=batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows)),
                                                   max_tasks_in_flight_per_actor=None if attempt == 0 else 1),
                num_cpus=o.threads,
                **({"num_gpus": spec["gpus"]} if spec["gpus"] else {}), **_retries(ray, o.max_retries))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["row"]:
                row = json.loads(str(text))
                if row["source"] not in done:  # a retried batch may repeat rows of an earlier attempt
                    done.add(row["source"])
                    yield row
        remaining = [(s, d) for s, d in remaining if s not in done]
        if not remaining:
            return
        say(f"codec: {len(remaining)} input{'s' * (len(remaining) != 1)} lost with {'their' if len(remaining) != 1 else 'its'} "
            f"worker{f' ({o.max_retries} retries)' if attempt == 0 and o.max_retries else ''}; {'retrying one per task' if attempt == 0 else 'recorded as failed'}")
        batch_size = 1
    for s, d in remaining:
        yield failed(new_row(s, d, o.psnr), WorkerLostError(
            f"{s}: the worker coding it died on every attempt (out of memory or killed)"))


class _OneLine(logging.Filter):
    """A log record with a traceback -> one line ending in the exception's first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            record.msg = f"{record.getMessage()} ({type(e).__name__}: {first[:200]})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _retries(ray, max_retries: int) -> dict:
    """Ray's actor restarts (unbounded: a restarted actor reloads the model) and retries of the
    batch a dead actor was coding (bounded: an input that kills every worker it reaches is
    retried alone, then recorded as failed).  Passed as remote arguments while map_batches takes
    them (Ray Data's own default is unbounded retries)."""
    import inspect

    params = inspect.signature(ray.data.Dataset.map_batches).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {}
    return {"max_restarts": -1, "max_task_retries": max_retries}


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Manifest:
    """The result rows as JSON Lines, flushed row by row; a remote manifest is written locally
    and uploaded when the job ends."""

    def __init__(self, path: str):
        self.path = path
        if inputs.is_url(path):
            fd, self.local = tempfile.mkstemp(prefix="codec-batch-", suffix=".jsonl")
            self.f = os.fdopen(fd, "w", encoding="utf-8")
        else:
            self.local = inputs.local(path)
            os.makedirs(os.path.dirname(os.path.abspath(self.local)), exist_ok=True)
            self.f = open(self.local, "w", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f.closed:
            return
        self.f.close()
        if inputs.is_url(self.path):
            with open(self.local, "rb") as f:
                inputs.write_bytes(self.path, f.read())
            os.unlink(self.local)
