"""End-to-end encode / decode on one CUDA GPU: official LALIC and official MambaIC, entropy coding included.

Full official configurations (LALIC: 66.1 M parameters; MambaIC: 123.8 M) with random weights
(timing does not depend on the weight values), a Kodak-sized image (768x512, a smooth synthetic
image with texture; ``--image`` takes a real one).  One run prints everything and writes JSON:

    python benchmarks/bench_e2e_gpu.py --out e2e.json                 # eager variants
    python benchmarks/bench_e2e_gpu.py --compile --out e2e_compile.json   # + torch.compile / CUDA graphs
    python benchmarks/bench_e2e_gpu.py --models lalic --repeat 20 --size 1536x2048

What is timed (median and minimum of ``--repeat`` runs after ``--warmup`` runs, with
``torch.cuda.synchronize()`` before every clock reading):

* encode: the image (float, host) to the GPU, ``model.compress`` (analysis, hyper-prior, the
  entropy model pass by pass, range coding of every stream);
* decode: ``model.decompress`` (range decoding pass by pass, entropy model, synthesis) and x_hat
  back to the host.

Peak GPU memory is ``torch.cuda.max_memory_allocated`` during one encode / one decode.  The time
split comes from one extra instrumented run per variant: range coding (the time inside
``encode_stream`` / ``decode_stream``), host/device transfers (``Tensor.cpu()`` of GPU tensors
after a synchronize, host-to-device ``Tensor.to``, each followed by a synchronize) and the network
(the rest: GPU work and kernel launches).  The instrumented run is slower than the timed ones by
the synchronizations it adds.

Variants (``--variants``; every variant checks that decoding gives the encoder's y_hat; all eager
variants must give identical bytes):

* ``eager``: the models as the codec runs them (Triton BiWKV / selective scan, the unfused SS2D path);
* ``overlap-thread`` / ``overlap-process``: the same, with the range coder of ``compress`` off the
  critical path: each stream is handed to a worker (thread pool, or a pool of spawned processes
  that escapes the GIL) as soon as its symbols reach the host, and the GPU goes on with the next
  pass; the byte strings are collected when ``compress`` returns.  The bytes are the same
  (``tests/test_bench_e2e.py``).  Decoding cannot overlap: every pass needs the symbols of the
  previous one;
* ``fused`` (MambaIC): the fused SS2D kernel (``LALIC_SS2D_FUSED=1``; the unfused path is the default);
* ``reference``: the PyTorch reference kernels on the GPU (``LALIC_FORCE_REFERENCE=1``), not run
  unless asked for;
* with ``--compile [MODE ...]``: ``compile-<mode>`` (and ``compile-<mode>+overlap``) compile the
  transforms (g_a, g_s, h_a, h_s / h_mean_s / h_scale_s; ``--compile-entropy`` also the
  entropy-model blocks) with ``torch.compile(mode=MODE)``; ``reduce-overhead`` uses CUDA graphs.
  The Triton kernels enter the graphs as opaque custom operators (no graph breaks, so CUDA
  graphs can capture whole transforms).

Targets for context: the LALIC paper reports 274 ms encode / 150 ms decode on an RTX 4090; ours
on one H100: <= 60 ms encode and <= 50 ms decode.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _gpu_common import ensure_package  # noqa: E402

TARGETS_MS = {"lalic": (60.0, 50.0)}  # (encode, decode) on one H100


def _import_codec():
    ensure_package()
    import lalic_codec.entropy.coder as coder
    import lalic_codec.models.lalic as lalic_mod
    import lalic_codec.models.mambaic as mambaic_mod

    return coder, lalic_mod, mambaic_mod


def _coding_module():
    """The module whose ``encode_stream`` / ``decode_stream`` the models' entropy models call."""
    ensure_package()
    import lalic_codec.models.entropy_models as entropy_models

    return entropy_models


# ------------------------------------------------------------------------------------------
# inputs and models
# ------------------------------------------------------------------------------------------


def synthetic_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, h, w) in [0, 1]: smooth colour waves plus noise (bit rates of a natural photo's order)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 80 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], axis=0)
    img = np.clip(base + rng.normal(0, 12, size=(3, h, w)), 0, 255).round() / 255.0
    return torch.from_numpy(img.astype(np.float32)).unsqueeze(0)


def load_image(path: str, h: int, w: int) -> torch.Tensor:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    x = x[..., :h, :w]
    return torch.nn.functional.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), mode="replicate")


def build_model(name: str, device: torch.device, small: bool = False):
    """The official configuration (random weights); ``small``: tiny widths and depths (tests)."""
    _, lalic_mod, mambaic_mod = _import_codec()
    torch.manual_seed(0)
    if name == "lalic":
        model = (lalic_mod.LALIC(N=8, M=16, dims=(8, 8, 8, 16, 8, 8), depths=(1, 1, 1, 1), groups=(2, 2, 4, 4, 4))
                 if small else lalic_mod.LALIC())
    else:
        model = mambaic_mod.MambaIC(depths=(1, 1, 1, 1), N=8, M=20) if small else mambaic_mod.MambaIC()
    model.update(force=True)
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------
# overlapped range coding (encoder)
# ------------------------------------------------------------------------------------------


class _Pending:
    """A stream being range-coded by a worker; resolved into bytes after ``compress``."""

    __slots__ = ("future",)

    def __init__(self, future):
        self.future = future


def _timed(encode):
    """Thread-pool job: (stream bytes, seconds spent coding)."""

    def job(symbols, indexes, tables):
        t = time.perf_counter()
        data = encode(symbols, indexes, tables)
        return data, time.perf_counter() - t

    return job


class OverlappedCoder:
    """Range-code the streams of ``model.compress`` on a worker pool, off the critical path.

    ``compress`` calls ``encode_stream(symbols, indexes, tables)`` with host arrays as soon as a
    pass's symbols are known and only appends the result to its list of streams; here that call
    submits the job and returns a placeholder at once, so the caller goes on queueing the next
    GPU pass while a worker codes the stream.  :meth:`compress` swaps the placeholders for the
    bytes.  The same function codes the same arrays, so the bytes are identical.

    ``kind``: ``"thread"`` (shares the GIL with the caller; the range coder releases it only in
    places) or ``"process"`` (spawned workers, arrays are pickled; no GIL contention).
    """

    def __init__(self, kind: str = "thread", workers: int = 2):
        coder, _, _ = _import_codec()
        self.kind = kind
        self._encode = coder.encode_stream
        self._modules = (_coding_module(),)
        if kind == "thread":
            self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="range-coder")
        elif kind == "process":
            import multiprocessing as mp

            # spawned (CUDA-safe); the job is the coder's own function, importable by reference
            self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
            for f in [self.pool.submit(os.getpid) for _ in range(workers)]:  # start the workers now
                f.result()
        else:
            raise ValueError(f"unknown overlap kind {kind!r}")
        self.wait_s = 0.0  # last compress(): time spent waiting for the workers after compress returned
        self.worker_s = 0.0  # last compress(): seconds the workers spent coding (off the critical path)

    def _submit(self, symbols, indexes, tables):
        job = _timed(self._encode) if self.kind == "thread" else self._encode
        return _Pending(self.pool.submit(job, np.ascontiguousarray(symbols), np.ascontiguousarray(indexes), tables))

    @contextlib.contextmanager
    def _patched(self):
        saved = [m.encode_stream for m in self._modules]
        for m in self._modules:
            m.encode_stream = self._submit
        try:
            yield
        finally:
            for m, f in zip(self._modules, saved):
                m.encode_stream = f

    def compress(self, model, x, **kw):
        with self._patched():
            coded = model.compress(x, **kw)
        t = time.perf_counter()
        streams, worker = [], 0.0
        for s in coded.streams:
            if isinstance(s, _Pending):
                s = s.future.result()
                if isinstance(s, tuple):
                    s, dt = s
                    worker += dt
                else:
                    worker = float("nan")  # not measured in worker processes
            streams.append(s)
        coded.streams = streams
        self.wait_s = time.perf_counter() - t
        self.worker_s = worker
        return coded

    def close(self):
        self.pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------
# instrumentation: range coding / transfers / network
# ------------------------------------------------------------------------------------------


class Split:
    """Times spent in range coding and in host/device copies during one call (instrumented run)."""

    def __init__(self, sync):
        self.sync = sync
        self.coding = 0.0
        self.transfer = 0.0
        self.n_transfers = 0

    @contextlib.contextmanager
    def active(self):
        mods = (_coding_module(),)
        saved_enc = [m.encode_stream for m in mods]
        saved_dec = [m.decode_stream for m in mods]
        saved_cpu, saved_to = torch.Tensor.cpu, torch.Tensor.to
        split = self

        def timed(fn):
            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    split.coding += time.perf_counter() - t
            return wrapper

        def cpu(self_, *a, **k):
            if not self_.is_cuda:
                return saved_cpu(self_, *a, **k)
            split.sync()  # pending GPU work belongs to the network, not to the copy
            t = time.perf_counter()
            out = saved_cpu(self_, *a, **k)
            split.transfer += time.perf_counter() - t
            split.n_transfers += 1
            return out

        def to(self_, *a, **k):
            if self_.is_cuda:
                return saved_to(self_, *a, **k)
            t = time.perf_counter()
            out = saved_to(self_, *a, **k)
            if out.is_cuda:
                split.sync()
                split.transfer += time.perf_counter() - t
                split.n_transfers += 1
            return out

        for m, e, d in zip(mods, saved_enc, saved_dec):
            m.encode_stream, m.decode_stream = timed(e), timed(d)
        torch.Tensor.cpu, torch.Tensor.to = cpu, to
        try:
            yield self
        finally:
            torch.Tensor.cpu, torch.Tensor.to = saved_cpu, saved_to
            for m, e, d in zip(mods, saved_enc, saved_dec):
                m.encode_stream, m.decode_stream = e, d


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------


_OPS: dict = {}


def _kernel_ops() -> dict:
    """The Triton-backed operators as opaque custom ops (registered once per process), so that
    torch.compile keeps a whole transform in one graph (and CUDA graphs can capture it) instead
    of breaking the graph at every kernel call."""
    if _OPS:
        return _OPS
    from lalic_codec.kernels.biwkv import biwkv as biwkv_dispatch

    def biwkv_impl(w, u, k, v):
        return biwkv_dispatch(w, u, k, v)

    def scan_impl(x, x_dbl, w, A, D, bias, softplus):
        from lalic_codec.kernels.selective_scan_triton import cross_selective_scan_fused

        return cross_selective_scan_fused(x, x_dbl, w, A, D, bias, softplus)

    biwkv_op = torch.library.custom_op("lalic_bench::biwkv", biwkv_impl, mutates_args=(),
                                       schema="(Tensor w, Tensor u, Tensor k, Tensor v) -> Tensor")
    biwkv_op.register_fake(lambda w, u, k, v: torch.empty_like(k))
    scan_op = torch.library.custom_op(
        "lalic_bench::ss2d_scan", scan_impl, mutates_args=(),
        schema="(Tensor x, Tensor x_dbl, Tensor w, Tensor A, Tensor? D, Tensor? bias, bool softplus) -> Tensor")

    def scan_fake(x, x_dbl, w, A, D, bias, softplus):
        B, Dm, H, W = x.shape
        return x.new_empty((B, Dm, H * W), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    scan_op.register_fake(scan_fake)
    _OPS.update(biwkv=biwkv_op, scan=scan_op)
    return _OPS


class Compiled:
    """Compile a model's transforms (and optionally its entropy-model blocks) in place; undo with restore().

    The Triton kernels enter the graphs as opaque custom operators (``_kernel_ops``); where that
    is not possible they are wrapped in ``torch.compiler.disable`` (a graph break).
    """

    def __init__(self, name, model, mode, entropy=False):
        import lalic_codec.models.layers as layers
        import lalic_codec.models.mambaic_layers as ml

        self.saved = []
        orig_fused = ml.fused_cross_scan_kernel  # the codec's dispatcher decides when the fused kernel runs
        try:
            ops = _kernel_ops()
        except Exception as e:  # noqa: BLE001 - older torch: graph breaks instead
            print(f"  (custom ops unavailable: {e}; the kernels break the graphs)")
            ops = None
        if ops is not None:
            op_b, op_s = ops["biwkv"], ops["scan"]
            self._patch(layers, "biwkv", lambda w, u, k, v: op_b(w, u, k, v))

            def fused_kernel(x, needs_grad):
                if orig_fused(x, needs_grad) is None:
                    return None
                return lambda x_, x_dbl, w, A, D=None, bias=None, delta_softplus=True: op_s(
                    x_, x_dbl, w, A, D, bias, delta_softplus)

            self._patch(ml, "fused_cross_scan_kernel", fused_kernel)
        else:
            self._patch(layers, "biwkv", torch.compiler.disable(layers.biwkv))

            def fused_kernel(x, needs_grad):
                fn = orig_fused(x, needs_grad)
                return torch.compiler.disable(fn) if fn is not None else None

            self._patch(ml, "fused_cross_scan_kernel", torch.compiler.disable(fused_kernel))
        self._patch(ml, "selective_scan", torch.compiler.disable(ml.selective_scan))
        opts = dict(mode=None if mode == "default" else mode)
        names = ["g_a", "g_s", "h_a"] + (["h_s"] if name == "lalic" else ["h_mean_s", "h_scale_s"])
        for n in names:
            self._patch(model, n, torch.compile(getattr(model, n), **opts))
        if name == "lalic":  # the hyper transforms are registered twice (aliases)
            self._patch(model.latent_codec.hyper, "h_a", model.h_a)
            self._patch(model.latent_codec.hyper, "h_s", model.h_s)
        if entropy:
            if name == "lalic":
                cg = model.latent_codec.y
                for key in list(cg.channel_context.keys()):
                    self._patch_item(cg.channel_context, key, torch.compile(cg.channel_context[key], **opts))
                for key in list(cg.latent_codec.keys()):
                    grp = cg.latent_codec[key]
                    self._patch(grp, "entropy_parameters", torch.compile(grp.entropy_parameters, **opts))
            else:
                for lst in ("atten_mean", "atten_scale", "cc_mean_transforms", "cc_scale_transforms", "lrp_transforms",
                            "anchor_atten_mean", "anchor_atten_scale", "context_vss"):
                    ml_ = getattr(model, lst)
                    for i in range(len(ml_)):
                        self._patch_item(ml_, i, torch.compile(ml_[i], **opts))

    def _patch(self, obj, attr, value):
        self.saved.append((obj, attr, getattr(obj, attr), False))
        setattr(obj, attr, value)

    def _patch_item(self, container, key, value):
        self.saved.append((container, key, container[key], True))
        container[key] = value

    def restore(self):
        for obj, attr, value, item in reversed(self.saved):
            if item:
                obj[attr] = value
            else:
                setattr(obj, attr, value)
        self.saved.clear()


# ------------------------------------------------------------------------------------------
# one variant
# ------------------------------------------------------------------------------------------


def _median(v):
    return statistics.median(v) if v else float("nan")


def run_variant(name, model, x_host, device, variant, args, overlap=None, cudagraphs=False) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if cudagraphs else None
    H, W = x_host.shape[-2:]

    def encode():
        if mark:
            mark()
        x = x_host.to(device)
        return overlap.compress(model, x) if overlap else model.compress(x)

    def decode(coded):
        if mark:
            mark()
        out = model.decompress(coded.streams, coded.z_shape)
        return out["x_hat"].cpu(), out["y_hat"].clone()

    res = dict(model=name, variant=variant)
    try:
        for _ in range(args.warmup):
            coded = encode()
            decode(coded)
        enc, dec = [], []
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            coded = encode()
            y_hat_enc = coded.y_hat.clone()
            sync()
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            x_hat, y_hat_dec = decode(coded)
            sync()
            dec.append(time.perf_counter() - t)
        res.update(enc_ms=1e3 * _median(enc), enc_min_ms=1e3 * min(enc), dec_ms=1e3 * _median(dec),
                   dec_min_ms=1e3 * min(dec), enc_runs_ms=[1e3 * v for v in enc], dec_runs_ms=[1e3 * v for v in dec])
        res["roundtrip_ok"] = bool(torch.equal(y_hat_enc, y_hat_dec))
        res["bytes"] = sum(len(s) for s in coded.streams)
        res["bpp"] = 8 * res["bytes"] / (H * W)
        res["streams"] = [bytes(s) for s in coded.streams]  # compared between variants, not written out
        res["x_hat_mse"] = float(((x_hat - x_host) ** 2).mean())
        if device.type == "cuda":  # peak memory of one encode and one decode
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            coded = encode()
            sync()
            res["enc_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            res["enc_peak_over_weights_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
            decode(coded)
            sync()
            res["dec_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            res["dec_peak_over_weights_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        # time split (instrumented run)
        for what, fn in (("enc", encode), ("dec", lambda: decode(coded))):
            split = Split(sync)
            sync()
            t = time.perf_counter()
            with split.active():
                out = fn()
            sync()
            total = time.perf_counter() - t
            coding = split.coding
            if what == "enc" and overlap is not None:
                coding = overlap.wait_s  # the workers' coding time is off the critical path; waiting is not
                res["enc_coding_worker_ms"] = 1e3 * overlap.worker_s
            res[f"{what}_split_total_ms"] = 1e3 * total
            res[f"{what}_split_coding_ms"] = 1e3 * coding
            res[f"{what}_split_transfer_ms"] = 1e3 * split.transfer
            res[f"{what}_split_network_ms"] = 1e3 * max(0.0, total - coding - split.transfer)
            res[f"{what}_transfers"] = split.n_transfers
            del out
    except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' figures
        import traceback

        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-3000:]
        print(f"  {name} {variant}: FAILED: {res['error']}", flush=True)
    return res


# ------------------------------------------------------------------------------------------


def fmt_row(r) -> str:
    if "error" in r:
        return f"{r['model']:8s} {r['variant']:28s} FAILED: {r['error'][:100]}"
    t = TARGETS_MS.get(r["model"])
    mark = ""
    if t:
        mark = " ".join(("enc " + ("ok" if r["enc_ms"] <= t[0] else "MISS"), "dec " + ("ok" if r["dec_ms"] <= t[1] else "MISS")))
    return (f"{r['model']:8s} {r['variant']:28s} {r['enc_ms']:8.1f} {r['enc_min_ms']:8.1f} {r['dec_ms']:8.1f} "
            f"{r['dec_min_ms']:8.1f} {r.get('enc_peak_mib', float('nan')):8.0f} {r.get('dec_peak_mib', float('nan')):8.0f} "
            f"{r.get('enc_split_network_ms', float('nan')):6.1f}/{r.get('enc_split_coding_ms', float('nan')):5.1f}/"
            f"{r.get('enc_split_transfer_ms', float('nan')):4.1f} "
            f"{r.get('dec_split_network_ms', float('nan')):6.1f}/{r.get('dec_split_coding_ms', float('nan')):5.1f}/"
            f"{r.get('dec_split_transfer_ms', float('nan')):4.1f} {r['bpp']:6.3f} "
            f"{'ok' if r['roundtrip_ok'] else 'FAIL':4s} {r.get('same_bytes', ''):5s} {mark}")


HEADER = (f"{'model':8s} {'variant':28s} {'enc ms':>8s} {'enc min':>8s} {'dec ms':>8s} {'dec min':>8s} "
          f"{'encMiB':>8s} {'decMiB':>8s} {'enc net/ec/xfer':>17s} {'dec net/ec/xfer':>17s} {'bpp':>6s} "
          f"{'rt':4s} {'bytes':5s} target")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=["lalic", "mambaic"], default=["lalic", "mambaic"])
    ap.add_argument("--size", default="512x768", help="HxW of the image (multiples of 128), default Kodak 512x768")
    ap.add_argument("--image", help="an image file to code instead of the synthetic one (cropped / padded to --size)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["eager", "overlap-thread", "overlap-process", "fused"],
                    help="eager overlap-thread overlap-process fused reference")
    ap.add_argument("--overlap-workers", type=int, default=2)
    ap.add_argument("--compile", nargs="*", metavar="MODE", default=None,
                    help="also run torch.compile'd transforms, modes (default: default reduce-overhead)")
    ap.add_argument("--compile-entropy", action="store_true", help="--compile: also the entropy-model blocks")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls / convolutions (changes rounding)")
    ap.add_argument("--out", help="write the results as JSON to this path")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests: run the logic on CPU
    ap.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # tests: tiny models
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        msg = ("bench_e2e_gpu: no CUDA device available; this benchmark needs an NVIDIA GPU "
               "(CPU timings: benchmarks/bench_lalic_cpu.py, benchmarks/bench_mambaic_cpu.py).")
        print(msg)
        if args.out:
            Path(args.out).write_text(json.dumps({"error": msg}))
        return 0
    device = torch.device(args.device)
    H, W = (int(v) for v in args.size.lower().split("x"))
    if H % 128 or W % 128:
        print(f"bench_e2e_gpu: --size {args.size} must be multiples of 128 (MambaIC codes those)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = False  # the same algorithms for encoder and decoder
    x_host = load_image(args.image, H, W) if args.image else synthetic_image(H, W)
    info = dict(torch=torch.__version__, size=[H, W], repeat=args.repeat, warmup=args.warmup, tf32=args.tf32)
    if device.type == "cuda":
        import triton

        info.update(device=torch.cuda.get_device_name(0), triton=triton.__version__)
    print(f"bench_e2e_gpu: {info}", flush=True)

    results = []
    for name in args.models:
        t = time.perf_counter()
        model = build_model(name, device, small=args.small)
        params = sum(p.numel() for p in model.parameters() if p.is_floating_point())
        print(f"\n{name}: {params / 1e6:.1f} M parameters, built in {time.perf_counter() - t:.1f} s", flush=True)
        variants = [v for v in args.variants if not (v == "fused" and name != "mambaic")]
        runs = []
        for v in variants:
            env_saved = {k: os.environ.get(k) for k in ("LALIC_SS2D_FUSED", "LALIC_FORCE_REFERENCE")}
            overlap = None
            try:
                if v == "fused":
                    os.environ["LALIC_SS2D_FUSED"] = "1"
                if v == "reference":
                    os.environ["LALIC_FORCE_REFERENCE"] = "1"
                if v.startswith("overlap-"):
                    overlap = OverlappedCoder(v.split("-", 1)[1], args.overlap_workers)
                t = time.perf_counter()
                r = run_variant(name, model, x_host, device, v, args, overlap=overlap)
                r["wall_s"] = time.perf_counter() - t
            finally:
                if overlap is not None:
                    overlap.close()
                for k, val in env_saved.items():
                    if val is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = val
            runs.append(r)
            print("  " + fmt_row(r), flush=True)
        modes = args.compile if args.compile is None or args.compile else ["default", "reduce-overhead"]
        if modes:  # many blocks share one forward: let dynamo keep a graph for every shape
            import torch._dynamo as dynamo  # (a plain "import torch._dynamo" would make torch local here)

            for attr, val in (("recompile_limit", 512), ("cache_size_limit", 512), ("accumulated_recompile_limit", 8192),
                              ("accumulated_cache_size_limit", 8192)):
                if hasattr(dynamo.config, attr):
                    setattr(dynamo.config, attr, val)
        for mode in modes or []:
            comp = None
            try:
                comp = Compiled(name, model, mode, entropy=args.compile_entropy)
                for ov in (None, "thread"):
                    overlap = OverlappedCoder(ov, args.overlap_workers) if ov else None
                    v = f"compile-{mode}" + ("+overlap" if ov else "")
                    t = time.perf_counter()
                    r = run_variant(name, model, x_host, device, v, args, overlap=overlap,
                                    cudagraphs=mode.startswith("reduce-overhead"))
                    r["wall_s"] = time.perf_counter() - t
                    if overlap is not None:
                        overlap.close()
                    runs.append(r)
                    print("  " + fmt_row(r), flush=True)
            except Exception as e:  # noqa: BLE001
                runs.append(dict(model=name, variant=f"compile-{mode}", error=f"{type(e).__name__}: {e}"))
                print(f"  compile-{mode}: FAILED: {e}", flush=True)
            finally:
                if comp is not None:
                    comp.restore()
                dynamo.reset()
        # the eager variants must produce the same bytes
        ref_streams = next((r["streams"] for r in runs if r.get("variant") == "eager" and "streams" in r), None)
        for r in runs:
            if "streams" in r and ref_streams is not None:
                r["same_bytes"] = "same" if r["streams"] == ref_streams else "diff"
            r.pop("streams", None)
        results.extend(runs)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\nSummary (ms: median of the timed runs; MiB: peak allocated; split from one instrumented run: "
          "network / range coding / host-device transfers)")
    print(HEADER)
    print("-" * len(HEADER))
    for r in results:
        print(fmt_row(r))
    bad = [r for r in results if "error" not in r and not r["roundtrip_ok"]]
    diff = [r for r in results if r.get("same_bytes") == "diff" and not r["variant"].startswith("compile")]
    if bad:
        print("ROUND TRIP FAILED: " + ", ".join(f"{r['model']}/{r['variant']}" for r in bad))
    if diff:
        print("BYTES DIFFER FROM EAGER: " + ", ".join(f"{r['model']}/{r['variant']}" for r in diff))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(info=info, results=results), indent=1,
                                             default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
        print(f"wrote {args.out}")
    return 1 if bad or diff else 0


if __name__ == "__main__":
    sys.exit(main())
