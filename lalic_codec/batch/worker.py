"""The worker of ``codec batch``: a callable class that Ray Data runs as an actor pool.

Each actor loads the model once (``__init__``) and codes batches of (input, output) rows
(``__call__``): read, code exactly as ``codec encode``/``decode`` do (same pipeline calls, so the
same bytes), write atomically, and return one result row per input, as JSON text in the column
``row``.  A bad input is a failed row; only the death of the process loses a batch, and Ray
retries that batch on a restarted actor (the driver then retries whatever is still missing one
input at a time).  Nothing here imports Ray at module level: the class also runs without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import __version__
from ..errors import BadInputError, CodecError, CorruptFileError, ModelError, NotALicFileError
from . import inputs

#: result columns, in manifest order (``psnr`` only with --psnr)
COLUMNS = ("source", "output", "status", "error", "message", "exit_code", "width", "height", "input_bytes",
           "bytes", "bpp", "quality", "seconds", "worker")
#: inputs read ahead of the one being coded, per actor
READ_AHEAD = 4


def weights_file(data: bytes, suffix: str) -> str:
    """Weights shipped with the job, as a local file named by their hash (written once per node)."""
    digest = hashlib.sha256(data).hexdigest()[:32]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lalic-codec" / "batch-weights"
    path = cache / f"{digest}{suffix}"
    if not path.is_file() or path.stat().st_size != len(data):
        cache.mkdir(parents=True, exist_ok=True)
        from ..files import write_output

        write_output(str(path), data, force=True)  # atomic: concurrent actors on a node race harmlessly
    return str(path)


def _weights(shipped) -> str | None:
    """``shipped``: None, or [object ref or bytes, suffix] (a list, so that Ray does not resolve it)."""
    if shipped is None:
        return None
    ref, suffix = shipped
    if not isinstance(ref, bytes):
        import ray

        ref = ray.get(ref)
    return weights_file(ref, suffix)


def new_row(src: str, dst: str, psnr: bool) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(source=src, output=dst, status="ok", exit_code=0)
    if psnr:
        row["psnr"] = None
    return row


def failed(row: dict, err: BaseException) -> dict:
    """``row`` as a failure: error class, one-line message naming the input, exit code."""
    from ..files import named_error

    if isinstance(err, CodecError):
        err = named_error(row["source"], err)
        code = err.exit_code
    else:  # as codec encode's folder mode: an unexpected error on one file is that file's failure
        code = 1
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    row.update(status="failed", error=type(err).__name__, message=msg, exit_code=code)
    return row


class Coder:
    """``job``: the options of the command (see :func:`lalic_codec.batch.job.job_spec`)."""

    def __init__(self, job: dict, weights=None):
        import torch

        from .. import loading
        from .._runtime import available_cores, tune_allocator

        if job.get("version") not in (None, __version__):
            raise ModelError(f"this worker has lalic-codec {__version__}, the driver {job['version']}: "
                             "install the same version on every node")
        tune_allocator()
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        self.job = job
        self.weights = _weights(weights)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        # the model, loaded once: encode uses it; decode finds it in loading's cache
        self.lm = loading.load_model(job.get("model") or "default", self.weights, job.get("device", "auto"))
        self.max_memory = job.get("max_memory")
        if self.max_memory is None and job.get("mode") == "encode":  # `codec encode`'s default, shared
            from .. import memory  # by the workers one machine can hold

            share = max(1, available_cores() // max(1, int(job.get("threads") or 1)))
            self.max_memory = memory.default_budget("encode", self.lm.device) // share
        self.pool = ThreadPoolExecutor(READ_AHEAD)

    def __call__(self, batch):
        rows = list(zip((str(s) for s in batch["src"]), (str(d) for d in batch["dst"])))
        reads = [self.pool.submit(_read, src) for src, _ in rows]  # I/O overlaps the coding
        out = []
        for i, ((src, dst), fut) in enumerate(zip(rows, reads)):
            self._fault_hook(src, before=True)
            out.append(json.dumps(self.code(src, dst, fut)))
            if i == 0:
                self._fault_hook(src, before=False)
        return {"row": out}

    def code(self, src: str, dst: str, fut) -> dict:
        started = time.perf_counter()
        row = new_row(src, dst, self.job.get("psnr", False))
        row["worker"] = self.worker
        try:
            data = fut.result()
            row["input_bytes"] = len(data)
            if self.job["mode"] == "encode":
                self._encode(data, row)
            else:
                self._decode(data, row)
        except Exception as e:  # one bad input (MemoryError included) must not stop the batch
            failed(row, e)
        row["seconds"] = round(time.perf_counter() - started, 6)
        return row

    def _encode(self, data: bytes, row: dict) -> None:
        from .. import imaging, pipeline

        job = self.job
        limit = imaging.MAX_PIXELS if job.get("max_pixels") is None else job["max_pixels"]
        im = imaging.open_image(data, max_pixels=limit, name=row["source"])
        if job.get("target_bpp") is not None:
            res = pipeline.encode_to_target(im, self.lm, job["target_bpp"], tile=job["tile"], max_memory=self.max_memory)
        else:
            res = pipeline.encode_image(im, self.lm, job.get("quality"), tile=job["tile"], max_memory=self.max_memory)
        inputs.write_bytes(row["output"], res.data)
        row.update(width=res.width, height=res.height, bytes=len(res.data), bpp=res.bpp,
                   quality=res.quality if self.lm.variable_rate else None)
        if job.get("psnr"):
            ref = imaging.open_image(data, max_pixels=limit)
            dec = pipeline.decode_bytes(res.data, self.weights, job.get("device", "auto"), pipeline.limits(job.get("max_pixels")))
            row["psnr"] = imaging.image_psnr(ref, dec.image)
        if res.notes:
            row["message"] = "; ".join(res.notes)

    def _decode(self, data: bytes, row: dict) -> None:
        from .. import imaging, pipeline
        from ..files import output_format

        job = self.job
        try:
            res = pipeline.decode_bytes(data, self.weights, job.get("device", "auto"), pipeline.limits(job.get("max_pixels")))
        except (BadInputError, CorruptFileError) as e:
            _, kind = imaging.file_kind(data[:4096])
            if type(e) is NotALicFileError and data and kind:  # say what it is, as codec decode does
                e = NotALicFileError(f"not a .lic file ({kind})")
            raise e from None
        fmt_name = output_format(row["output"], job.get("ext"))
        inputs.write_bytes(row["output"], lambda f: imaging.save_image(res.image, f, fmt_name))
        h = res.header
        row.update(width=h.width, height=h.height, bytes=len(data), bpp=8.0 * len(data) / (h.width * h.height),
                   quality=h.quality or None)
        lost = imaging.lost_in_format(res.image, fmt_name)
        if lost:
            row["message"] = "; ".join(lost)

    def _fault_hook(self, src: str, before: bool) -> None:
        """Tests only: ``job["fault"]`` = a marker path: the first actor to get here dies (no
        cleanup, as a killed process) after writing the first output of its batch;
        ``"poison:NAME"``: an actor dies whenever it is about to code an input named NAME."""
        fault = self.job.get("fault")
        if not fault:
            return
        if fault.startswith("poison:"):
            if before and Path(src).name == fault[len("poison:"):]:
                os._exit(1)
            return
        if before:
            return
        try:
            fd = os.open(fault, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, self.worker.encode())
        os.close(fd)
        os._exit(1)


def _read(src: str) -> bytes:
    return inputs.read_bytes(src)
