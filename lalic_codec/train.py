"""Training pipeline for the variable-rate default model (``codec train`` / ``python -m lalic_codec.train``).

* Data: any folder of images; random crops (256 by default; a 512 fine-tune crops up to 512 and
  at most the image) and flips, decoded in DataLoader workers.  Which file, which crop, which
  quality level and which training noise every sample gets is a pure function of (seed, sample
  index), so a resumed run sees exactly the batches an uninterrupted run would have seen.  Each
  epoch's order puts files whose crops have one shape into the same step where it can, so that
  the processes of a data parallel step take equal time.
* Processes: ``--procs N`` shares each step's batches out among N processes (data parallel,
  torch.distributed's gloo backend); their gradients are summed before the step, so the run
  computes what one process would.
* Loss: bpp + lambda_q * 255^2 * MSE per sample, with q drawn uniformly from the quality ladder,
  plus the factorized prior's auxiliary quantile loss on its own optimizer.  Adam, linear warm-up,
  constant rate, cosine decay over the last part of the run, gradient clipping; bf16 autocast on CUDA.
* Checkpoints hold model, optimizers, step and sample count (the data and the training noise
  follow from them and the seed); a JSONL log holds losses and
  periodic validation (estimated bpp and PSNR at several qualities on a few validation images).
* ``export`` turns a checkpoint into the shipped safetensors file (fp16 transforms, the entropy
  model's large weights int8 with a scale per row, int32 CDF tables).

Over 400 lines: one concern, a training run (data, loss, schedule, checkpoints and resumption,
validation, export), whose parts share the run's state; the model changes between runs live in
``reshape.py``, ``klt_init.py`` and ``int_path_fit.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from ._paths import shared_dir
from ._runtime import available_cores, denormals_flushed, tune_allocator
from .errors import Interrupted
from .exits import INTERRUPT_SIGNALS, exit_codes
from .imaging import IMAGE_SUFFIXES

DEFAULT_TRAIN_DIRS = (str(shared_dir() / "data" / "train"), str(shared_dir() / "data" / "train-more"))


def runs_dir() -> Path:
    """Where training runs keep their state by default: outside the work tree, so that it survives
    a fresh checkout (``$LALIC_RUNS``, else ``$XDG_CACHE_HOME/lalic-codec/runs``, else
    ``~/.cache/lalic-codec/runs``)."""
    if os.environ.get("LALIC_RUNS"):
        return Path(os.environ["LALIC_RUNS"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "lalic-codec" / "runs"


@dataclass
class TrainConfig:
    data: tuple = DEFAULT_TRAIN_DIRS  # one or more folders, pooled
    val_data: str | None = None  # None: a fixed held-out part of `data` (`holdout` images, never trained on)
    holdout: int = 24
    out: str = str(runs_dir() / "default")
    steps: int = 100_000
    batch: int = 8
    accum: int = 1
    crop: int = 256
    lr: float = 1e-4
    aux_lr: float = 1e-3
    warmup: int = 500
    decay_start: float = 0.8  # fraction of `steps` after which the rate decays (cosine) to lr/20
    clip: float = 1.0
    ema_half_life: int = 0  # steps; > 0 keeps an exponential moving average of the weights beside them
    scale_path_lr_mult: float = 5.0  # the integer scale path learns in index units: a larger step
    scale_path_bias_lr_mult: float = 100.0  # ... and its biases (table indexes, activations 0..127) far larger
    gain_lr_mult: float = 5.0  # the latent gains (log units) set each quality's rate
    lr_mults: tuple = ()  # (regular expression, multiplier): the parameters whose names match learn at that multiple (last match wins; 0 freezes)
    float_rate_weight: float = 0.5  # weight of the float scales' y rate (trained beside the integer path's)
    val_crop: int = 512  # validation codes the centre crop of at most this size
    bf16: str = "auto"  # bf16 autocast for the transforms and context networks: auto (CUDA only), on, off
    compile: str = "auto"  # torch.compile of the CPU fast paths (BiWKV, depthwise backward): auto (CPU with a C++ compiler), on, off
    layout: str = "auto"  # memory layout of a CPU run's images and convolution weights: auto (measured at the start), channels_last, contiguous
    seed: int = 0
    workers: int = 1
    log_every: int = 20
    val_every: int = 500
    val_count: int = 6
    val_qualities: tuple = (1.0, 4.0, 8.0)
    ckpt_every: int = 200
    threads: int = 0  # 0: torch's default (with procs > 1: the cores shared out among the processes)
    procs: int = 1  # training processes sharing each step's batches (data parallel, torch.distributed's gloo); accum a multiple
    init_from: str | None = None
    init: str = "klt"  # fresh runs: "klt" (transforms start as a block KLT of the data) or "random"
    arch: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# data


def list_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise click.ClickException(f"no images found in {folder}")
    return files


def _folders(data) -> list[str]:
    return [data] if isinstance(data, (str, Path)) else [str(d) for d in data]


def split_data(data, holdout: int) -> tuple[list[Path], list[Path]]:
    """(training files, held-out validation files) of the pooled folders.

    The held-out images are the ``holdout`` files whose names hash lowest (SHA-256 of the file
    name): a fixed choice that does not depend on the folder order, the machine or the seed, and
    that stays put when images are added elsewhere."""
    import hashlib

    files = sorted({p for d in _folders(data) for p in list_images(d)})
    if holdout <= 0:
        return files, []
    if holdout >= len(files):
        raise click.ClickException(f"--holdout {holdout}: only {len(files)} images in the training folders")
    ranked = sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    held = set(ranked[:holdout])
    return [p for p in files if p not in held], sorted(held)


def _mix(*xs: int) -> int:
    """A stable 63-bit hash of integers (independent of PYTHONHASHSEED)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (x + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h >> 1


class CropDataset(torch.utils.data.Dataset):
    """Item ``(file_index, sample_seed)`` -> a random crop with a random flip, as a float tensor in [0, 1]."""

    def __init__(self, files: list[Path], crop: int):
        self.files = files
        self.crop = crop

    def __len__(self) -> int:
        return len(self.files)

    def crop_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each file's crops, from the image headers alone."""
        shapes = []
        for f in self.files:
            with Image.open(f) as im:
                W, H = im.size
            shapes.append(_crop_shape(max(W, 64), max(H, 64), self.crop))
        return shapes

    def __getitem__(self, item):
        idx, seed = item
        rng = np.random.default_rng(seed)
        with Image.open(self.files[idx]) as im:
            img = im.convert("RGB")
        W, H = img.size
        if W < 64 or H < 64:  # enlarged to one block
            img = img.resize((max(W, 64), max(H, 64)), Image.BICUBIC)
            W, H = img.size
        ch, cw = _crop_shape(W, H, self.crop)
        top = int(rng.integers(0, H - ch + 1))
        left = int(rng.integers(0, W - cw + 1))
        a = np.asarray(img.crop((left, top, left + cw, top + ch)), dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            a = a[:, ::-1]
        if rng.random() < 0.5:
            a = a[::-1]
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _crop_shape(W: int, H: int, crop: int) -> tuple[int, int]:
    """(height, width) of the crops of a W x H image (at least 64 x 64): at most ``crop`` and
    the image, in multiples of 64."""
    return min(crop, H // 64 * 64), min(crop, W // 64 * 64)


def collate_crops(items: list[torch.Tensor]) -> torch.Tensor:
    """A batch of crops, each cut to the smallest height and width among them: crops of images
    smaller than ``--crop`` (e.g. a 512 fine-tune on photos of 320 x 448) differ in shape."""
    h = min(t.shape[1] for t in items)
    w = min(t.shape[2] for t in items)
    return torch.stack([t[:, :h, :w] for t in items])


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave the stop signals to the training process.  Ctrl-C reaches the whole
    foreground process group, and ``kill -TERM -PGID`` does too: a worker killed by it would make the
    next batch fail with "DataLoader worker ... is killed by signal" before the run could save
    and stop; the training process shuts its workers down itself when it stops."""
    for s in INTERRUPT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StepSampler(torch.utils.data.Sampler):
    """Infinite stream of (file_index, sample_seed) starting at sample ``start``; epoch e uses a
    permutation seeded by (seed, e).

    ``share = (batch, accum, rank, procs)``: only the samples of the batches one training process
    of ``procs`` codes, batch ``a`` of every step's ``accum`` (counted from ``start``) going to
    process ``a % procs``; the processes together draw exactly the stream of one.

    ``keys`` (one per file, e.g. its crops' shape) and ``group`` (the samples of a step): each
    epoch's order puts files of one key together in the steps, as far as the keys' counts allow
    (:func:`_grouped_order`), so that a step's crops have one shape: the processes of a data
    parallel step then take equal time instead of waiting for the largest crop, and a batch of
    several crops is not cut to the smallest.  Steps are counted from sample 0 of the stream
    (``start`` a multiple of ``group``, as a run's sample count is)."""

    def __init__(self, n: int, seed: int, start: int = 0, share: tuple | None = None, keys: list | None = None, group: int = 1):
        if keys is not None and len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} files")
        self.n, self.seed, self.start, self.share, self.keys, self.group = n, seed, start, share, keys, group

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(_mix(self.seed, epoch))
        perm = rng.permutation(self.n)
        if self.keys is None or self.group <= 1:
            return perm
        return _grouped_order(perm, self.keys, self.group, (epoch * self.n) % self.group, rng)

    def __iter__(self):
        s = self.start
        while True:
            epoch, pos = divmod(s, self.n)
            perm = self.epoch_order(epoch)
            while pos < self.n:
                if self.share is None or _batch_owner(s - self.start, *self.share):
                    yield int(perm[pos]), _mix(self.seed, 1, s)
                pos += 1
                s += 1


def _grouped_order(perm: np.ndarray, keys: list, group: int, phase: int, rng: np.random.Generator) -> np.ndarray:
    """An epoch's order of the files in ``perm`` (each once) in which the steps of ``group`` samples
    hold files of one key where possible; the epoch starts ``phase`` samples into a step.

    Each key's files, in ``perm``'s order, are cut into groups of ``group``; the files left over
    (fewer than ``group`` of a key) are ordered by key and grouped among themselves; the groups
    are shuffled.  The epoch's first ``-phase % group`` files complete the step the previous epoch
    left open, and its last files (``n`` not a multiple of ``group``) open the next one."""
    by_key: dict = {}
    for i in perm:
        by_key.setdefault(keys[i], []).append(int(i))
    groups, left = [], []
    for files in by_key.values():
        full = len(files) // group * group
        groups += [files[j : j + group] for j in range(0, full, group)]
        left += files[full:]
    left.sort(key=lambda i: repr(keys[i]))  # stable: perm's order within a key
    head = (-phase) % group
    while len(left) < head and groups:  # too few left over to fill the open step: break a group
        left = groups.pop() + left
    start, left = left[:head], left[head:]
    groups += [left[j : j + group] for j in range(0, len(left), group)]
    tail = groups.pop() if groups and len(groups[-1]) < group else []
    shuffled = [groups[j] for j in rng.permutation(len(groups))]
    return np.array(start + [i for g in shuffled for i in g] + tail, dtype=np.int64)


def run_sampler(dataset: CropDataset, cfg: TrainConfig, start: int = 0, rank: int = 0, procs: int = 1) -> StepSampler:
    """The sampler of a training run's process ``rank`` of ``procs``, from sample ``start``: each
    step's crops of one shape where the files allow (see :class:`StepSampler`)."""
    share = (cfg.batch, cfg.accum, rank, procs) if procs > 1 else None
    return StepSampler(len(dataset), cfg.seed, start=start, share=share, keys=dataset.crop_shapes(), group=cfg.batch * cfg.accum)


def _batch_owner(offset: int, batch: int, accum: int, rank: int, procs: int) -> bool:
    """Whether sample ``offset`` (counted from a step boundary) belongs to process ``rank``."""
    return (offset // batch) % accum % procs == rank


def quality_levels(seed: int, step: int, batch: int, levels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_mix(seed, 2, step))
    return torch.randint(1, levels + 1, (batch,), generator=g).float()


# ------------------------------------------------------------------------------------------------
# model, loss, schedule


def build_model(arch: dict):
    from .models.lalic import DEFAULT_CONFIG, VariableRateLALIC

    model = VariableRateLALIC(**(arch or DEFAULT_CONFIG))
    model.update(force=True)  # the scale table is needed in training; export recomputes all tables
    return model


def use_bf16(setting: str, device: torch.device) -> bool:
    """Whether the training step runs under bf16 autocast.  The entropy models and the integer
    scale path always compute in float32 (``full_precision``).  "auto" turns it on for CUDA only:
    on a CPU with bf16 instructions (AVX512-BF16, AMX) it makes a step about 1.3x faster, but at
    equal CPU time float32 trained better (model card, "What was tried": a 512-pixel fine-tune of
    default-v9, 2 CPU hours each, -1.19 % against -0.93 % held out), so "on" must be asked for."""
    if setting not in ("auto", "on", "off"):
        raise click.ClickException(f"--bf16 must be auto, on or off, not {setting!r}")
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda"


def use_compile(setting: str, device: torch.device) -> bool:
    """Whether the training step compiles the CPU fast paths (``kernels._compile``: BiWKV and the
    depthwise convolutions' weight gradient, fused by inductor).  "auto" turns it on for CPU
    training where a C++ compiler is found; CUDA runs use the Triton kernels instead."""
    from .kernels._compile import compiler_available

    if setting not in ("auto", "on", "off"):
        raise click.ClickException(f"--compile must be auto, on or off, not {setting!r}")
    if setting != "auto":
        return setting == "on"
    return device.type == "cpu" and compiler_available()


LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def time_layouts(model, crop: int, reps: int = 2) -> dict[str, float]:
    """Seconds of the transforms' forward and backward pass (g_a, then g_s, on one ``crop`` x
    ``crop`` image) in each memory layout: the fastest of ``reps`` after one untimed pass.  The
    model is left in the last layout measured, its gradients cleared."""
    from .kernels._compile import compile_enabled, set_compile

    x0 = torch.rand(1, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    out = {}
    compiling = compile_enabled()
    set_compile(False)  # eager: the layouts differ in the convolutions, not in the compiled paths
    try:
        for name, fmt in LAYOUTS.items():
            model.to(memory_format=fmt)
            x = x0.contiguous(memory_format=fmt)
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                model.g_s(model.g_a(x)).square().mean().backward()
                times.append(time.perf_counter() - t0)
            out[name] = min(times[1:])
    finally:
        set_compile(compiling)
    for p in model.parameters():
        p.grad = None
    return out


def resolve_layout(cfg: TrainConfig, resume: str | None = None, say=click.echo) -> TrainConfig:
    """``cfg`` with ``layout`` "auto" replaced by the faster layout of this run's transforms on this
    machine (:func:`time_layouts` at the run's crop and thread count).  Which is faster depends on
    the CPU's convolution kernels and on the crop: channels_last was chosen on the Xeons with AMX
    of earlier rounds; on an AVX2 EPYC, one thread, the transforms' pass at 512 took 2.86 s in the
    contiguous layout against 3.61 s in channels_last (a whole training step 3.42 against 4.19 s:
    the weight gradients of the 1/2 level's convolutions 2-3x slower), while at 256 the two timed
    within noise.  The choice is saved with the run's settings, so a resumed run keeps it
    (``--layout auto`` measures again).  CUDA runs keep PyTorch's layout."""
    if cfg.layout not in ("auto", *LAYOUTS):
        raise click.ClickException(f"--layout must be auto, channels_last or contiguous, not {cfg.layout!r}")
    if cfg.layout != "auto" or torch.cuda.is_available():
        return cfg
    arch = cfg.arch
    if resume:
        arch = read_training_state(resume)["config"].get("arch") or arch
    elif cfg.init_from and not arch:
        from .models.checkpoints import load_state_dict_file
        from .reshape import model_kwargs

        arch = model_kwargs(load_state_dict_file(cfg.init_from))
    threads = torch.get_num_threads()
    if _threads(cfg):
        torch.set_num_threads(_threads(cfg))
    try:
        torch.manual_seed(cfg.seed)
        times = time_layouts(build_model(arch), cfg.crop)
    finally:
        torch.set_num_threads(threads)
    best = min(times, key=times.get)
    say(f"--layout auto: {best} ({', '.join(f'{k} {v:.3f} s' for k, v in times.items())}: the transforms' forward and backward "
        f"of one {cfg.crop}-pixel crop)", err=True)
    return replace(cfg, layout=best)


def _bpp(likelihoods: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample bits per pixel of the image ``x`` that ``likelihoods`` (B, ...) code."""
    return torch.log(likelihoods).flatten(1).sum(1) / (-math.log(2) * x.shape[2] * x.shape[3])


def rd_terms(out: dict, x: torch.Tensor):
    """Per-sample bits per pixel and MSE."""
    bpp = sum(_bpp(lik, x) for lik in out["likelihoods"].values())
    mse = (out["x_hat"].float() - x).square().flatten(1).mean(1)
    return bpp, mse


def float_y_bpp(out: dict, x: torch.Tensor) -> torch.Tensor | None:
    """Per-sample bits per pixel of y had the float scales been coded (None without a scale path)."""
    lik = out.get("float_likelihoods_y")
    return None if lik is None else _bpp(lik, x)


def y_bpp(out: dict, x: torch.Tensor) -> torch.Tensor:
    """Per-sample bits per pixel of y as coded."""
    return _bpp(out["likelihoods"]["y"], x)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    start = int(cfg.decay_start * cfg.steps)
    if step < start:
        return 1.0
    t = min(1.0, (step - start) / max(1, cfg.steps - start))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def split_params(model):
    """(network parameters, integer scale path parameters, factorized-prior quantiles)."""
    main, scale_path, aux = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("quantiles"):
            aux.append(p)
        elif name.startswith("scale_path."):
            scale_path.append(p)
        else:
            main.append(p)
    return main, scale_path, aux


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """Adam parameter groups, each with its learning-rate multiplier and parameter names.

    Adam moves every parameter by about the learning rate per step whatever its gradient, so
    parameters in large units need larger rates: the latent gains, and above all the integer
    scale path, whose biases are in table-index and activation units (a rate of 1e-4 would take
    10^4 steps to move one table index; measured at 1200 steps, the scale path chose worse
    scales than one constant per channel)."""
    base = {"main": 1.0, "gain": cfg.gain_lr_mult, "scale_w": cfg.scale_path_lr_mult, "scale_b": cfg.scale_path_bias_lr_mult}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or name.endswith("quantiles"):
            continue
        if name.startswith("scale_path."):
            kind = "scale_b" if name.endswith(".bias") else "scale_w"
        elif name in ("log_gain", "log_inv_gain"):
            kind = "gain"
        else:
            kind = "main"
        g = groups.setdefault((kind, lr_mult_of(name, cfg)), {"params": [], "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return [{**g, "lr_mult": base[kind] * m} for (kind, m), g in groups.items()]


def lr_mult_of(name: str, cfg: TrainConfig) -> float:
    """The ``--lr-mult`` multiplier of a parameter: that of the last pattern its name matches (1 if none)."""
    mult = 1.0
    for pattern, m in cfg.lr_mults:
        if re.search(pattern, name):
            mult = float(m)
    return mult


def freeze_by_lr_mult(model, cfg: TrainConfig) -> int:
    """Freeze the parameters whose ``--lr-mult`` is 0 (no gradients computed); how many values."""
    frozen = 0
    for name, p in model.named_parameters():
        if not name.endswith("quantiles") and lr_mult_of(name, cfg) == 0:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam, fused where this torch build offers it (one kernel for all parameters instead of
    about ten small operations per tensor: a few percent of a CPU training step)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _load_optimizer(opt, saved: dict, groups: list[dict], model) -> None:
    """Load Adam state saved under a possibly different grouping, matching parameters by name."""
    saved_groups = saved["param_groups"]
    if all("names" in g for g in saved_groups):
        old_names = [n for g in saved_groups for n in g["names"]]
    else:  # checkpoints before named groups: network parameters, then the scale path
        main_p, scale_p, _ = split_params(model)
        ids = {id(p): n for n, p in model.named_parameters()}
        old_names = [ids[id(p)] for p in main_p + scale_p]
    new_names = [n for g in groups for n in g["names"]]
    if old_names == new_names and len(saved_groups) == len(groups):
        opt.load_state_dict(saved)
        return
    position = {n: i for i, n in enumerate(new_names)}
    state = {position[n]: saved["state"][i] for i, n in enumerate(old_names) if i in saved["state"] and n in position}
    fresh = opt.state_dict()
    fresh["state"] = state
    opt.load_state_dict(fresh)


def centre_crop(path: Path, crop: int) -> torch.Tensor:
    """(1, 3, h, w) in [0, 1]: the centre of an image, at most ``crop`` and a multiple of 64 on each side."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    H, W = a.shape[:2]
    h, w = min(crop, H // 64 * 64), min(crop, W // 64 * 64)
    top, left = (H - h) // 2, (W - w) // 2
    return torch.from_numpy(a[top : top + h, left : left + w].transpose(2, 0, 1).copy()).unsqueeze(0)


@torch.no_grad()
def validate(model, files: list[Path], qualities, device, crop: int = 512, stop=None) -> dict | None:
    """Estimated bpp and PSNR per quality on the centre crops (at most ``crop``, multiples of 64) of
    ``files``; with an integer scale path also ``y_bpp`` (coded) and ``y_bpp_float`` (what the
    float scales would cost).  ``stop``, called before each image, abandons the validation (None)
    when it returns true: a stopping run does not wait for it."""
    model.eval()
    res = {}
    for q in qualities:
        rows = []
        for f in files:
            if stop is not None and stop():
                model.train()
                return None
            x = centre_crop(f, crop).to(device)
            out = model(x, quality=torch.tensor([q], device=device))
            bpp, _ = rd_terms(out, x)
            x_hat = (out["x_hat"].clamp(0, 1) * 255).round() / 255
            mse = (x_hat - x).square().mean().item()
            row = {"bpp": bpp.item(), "psnr": -10 * math.log10(max(mse, 1e-12)), "y_bpp": y_bpp(out, x).item()}
            fb = float_y_bpp(out, x)
            if fb is not None:
                row["y_bpp_float"] = fb.item()
            rows.append(row)
        res[f"q{q:g}"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    model.train()
    return res


def _zero_acc() -> dict:
    return {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "y_bpp": 0.0, "y_bpp_float": 0.0, "aux": 0.0, "n": 0}


def _lineage_totals(path: str | Path) -> dict:
    """Cumulative CPU seconds, pixels and steps recorded in a checkpoint or exported weights file."""
    path = Path(path)
    if path.suffix == ".pt":
        return dict(load_checkpoint(path).get("totals", {}))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    out = {}
    for key, name, cast in (("total_cpu_seconds", "cpu_seconds", float), ("total_pixels", "pixels", int), ("total_steps", "steps", int)):
        if key in meta:
            out[name] = cast(meta[key])
    return out


# ------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_training_state(path: str | Path) -> dict:
    """What a training checkpoint holds; a missing file, or one that is no checkpoint of
    ``codec train run`` (no model or config entry), is a :class:`~lalic_codec.errors.ModelError`."""
    from .errors import ModelError
    from .models.checkpoints import read_checkpoint

    state = read_checkpoint(path, "checkpoint")
    missing = [k for k in ("model", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ModelError(f"{Path(path).name} is not a training checkpoint of codec train run (no {' or '.join(missing)} entry)")
    return state


def model_from_checkpoint(path: str | Path, ema: bool = False):
    """(state, config, model) of a training checkpoint: the model built with the run's architecture
    and holding its weights (``ema``: their moving average instead, see :class:`WeightAverage`).  A
    missing file, or one that is no checkpoint of ``codec train run`` (or, with ``ema``, one without
    an average), is a :class:`~lalic_codec.errors.ModelError` (one line, exit status 5)."""
    state = read_training_state(path)
    cfg = TrainConfig(**{**asdict(TrainConfig()), **state["config"]})
    model = build_model(cfg.arch)
    model.load_state_dict(state["model"])
    if ema:
        from .errors import ModelError

        if not state.get("ema"):
            raise ModelError(f"{Path(path).name} holds no moving average of the weights (train with --ema-half-life)")
        WeightAverage.load_into(model, state["ema"])
    return state, cfg, model


class WeightAverage:
    """An exponential moving average of a model's parameters, kept beside them in float32
    (Polyak averaging): after every optimizer step ``avg += (1 - d) * (param - avg)`` with
    ``d = 2 ** (-1 / half_life)``.  Validated beside the live weights and exported with
    ``codec train export --ema``; it lets a run train at a constant learning rate across many
    sessions instead of restarting a warm-up and a decay in each."""

    def __init__(self, model, half_life: int, saved: dict | None = None):
        self.decay = 2.0 ** (-1.0 / half_life)
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if saved is not None and set(saved) == set(self.names):
            self.avg = [saved[n].to(p.device, torch.float32).clone() for n, p in zip(self.names, self.params)]
            self.resumed = True
        else:  # a new average (or the architecture changed): start at the weights themselves
            self.avg = [p.detach().float().clone() for p in self.params]
            self.resumed = False

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.avg, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.avg))

    @staticmethod
    @torch.no_grad()
    def load_into(model, avg: dict) -> None:
        for n, p in model.named_parameters():
            p.copy_(avg[n])

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the average inside the block, its own weights again after it."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)


def train(cfg: TrainConfig, resume: str | None = None, max_seconds: float | None = None) -> Path:
    """Train (or resume) a run; stops after ``cfg.steps`` steps, ``max_seconds`` of wall time, or
    SIGINT/SIGTERM/SIGHUP, and always leaves a complete checkpoint behind.  Stopped by a signal, it
    raises :class:`~lalic_codec.errors.Interrupted` (exit status 130) once the state is saved.

    ``cfg.procs > 1``: this process and ``procs - 1`` helpers it starts share each step's ``accum``
    batches (data parallel); their gradients are summed before the one optimizer step each of them
    takes, so the run computes what one process would (:class:`_StepSync`).  This process decides
    when to stop, logs, validates and saves; the helpers ignore the stop signals and follow it."""
    if cfg.procs < 1 or cfg.accum % cfg.procs:
        raise click.ClickException(f"--procs {cfg.procs}: it must divide --accum ({cfg.accum}): each process codes whole batches")
    with denormals_flushed():
        cfg = resolve_layout(cfg, resume)  # once, before any helper starts: every process computes alike
        if cfg.procs == 1:
            return _train(cfg, resume, max_seconds)
        return _train_with_helpers(cfg, resume, max_seconds)


def _train_with_helpers(cfg: TrainConfig, resume: str | None, max_seconds: float | None) -> Path:
    """``train`` as the first of ``cfg.procs`` processes, the others spawned here (:func:`_helper`)."""
    import multiprocessing
    import tempfile

    spawn = multiprocessing.get_context("spawn")  # fork is unsafe once torch runs threads
    with tempfile.TemporaryDirectory(prefix="lalic-train-") as tmp:
        store = os.path.join(tmp, "store")  # torch.distributed's rendezvous file
        helpers = [spawn.Process(target=_helper, args=(r, store, cfg, resume), name=f"codec-train-{r}") for r in range(1, cfg.procs)]
        for h in helpers:
            h.start()
        try:
            return _train(cfg, resume, max_seconds, rank=0, store=store)
        finally:
            for h in helpers:  # they leave with this process's last step (or at once if it failed)
                h.join(timeout=120)
                if h.is_alive():
                    h.terminate()
                    h.join()


def _helper(rank: int, store: str, cfg: TrainConfig, resume: str | None) -> None:
    """A helper training process: Ctrl-C and ``kill -TERM -PGID`` reach it too, but the run's first
    process decides when every process stops (after a whole step, with the state saved)."""
    for s in INTERRUPT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    with denormals_flushed():
        _train(cfg, resume, None, rank=rank, store=store)


def _threads(cfg: TrainConfig) -> int:
    """torch CPU threads of one training process: ``--threads``, else the cores shared out among
    the ``--procs`` processes (0 with one process: torch's default)."""
    if cfg.threads or cfg.procs == 1:
        return cfg.threads
    return max(1, available_cores() // cfg.procs)


class _StepSync:
    """What the processes of a data-parallel run exchange (torch.distributed, gloo, on this machine):
    at the start, the first process's weights; before each step, whether to stop (the first process
    decides); after each step's batches, the sum of their gradients and of their figures.  Summing
    the gradients of batches that one process would have accumulated in turn gives what it would
    have computed: each process then takes the same optimizer step on the same weights."""

    def __init__(self, rank: int, procs: int, store: str, params: list):
        import torch.distributed as dist

        self.dist = dist
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=procs)
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.total = sum(self.sizes)

    def share_weights(self, tensors) -> None:
        for t in tensors:
            buf = t.detach().contiguous()
            self.dist.broadcast(buf, 0)
            if buf.data_ptr() != t.data_ptr():
                with torch.no_grad():
                    t.copy_(buf)

    def agree(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int32)
        self.dist.broadcast(t, 0)
        return bool(t.item())

    def sum_step(self, figures: list[float]) -> list[float]:
        """Sum the gradients (in place; None where no process has one) and ``figures`` over the processes."""
        ps = self.params
        parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in ps]
        has = torch.tensor([p.grad is not None for p in ps], dtype=torch.float32)
        flat = torch.cat([*parts, has, torch.tensor(figures, dtype=torch.float32)])
        self.dist.all_reduce(flat)
        grads = flat[: self.total].split(self.sizes)
        for p, g, h in zip(ps, grads, flat[self.total : self.total + len(ps)].tolist()):
            if h:
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(g.view(p.shape))
            else:
                p.grad = None
        return flat[self.total + len(ps) :].tolist()

    def close(self) -> None:
        self.dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: str | None, max_seconds: float | None, rank: int = 0, store: str | None = None) -> Path:
    """One training process of a run (``train``): rank 0 of ``cfg.procs``, or a helper."""
    procs = cfg.procs if store is not None else 1
    say = click.echo if rank == 0 else (lambda *a, **k: None)
    tune_allocator()
    threads = _threads(cfg)
    if threads:
        torch.set_num_threads(threads)
    if procs > 1 and threads * procs > available_cores():
        say(f"--procs {procs} --threads {cfg.threads}: {procs * cfg.threads} threads on {available_cores()} cores (--threads is per process)", err=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"

    state = None
    if resume:
        state = load_checkpoint(Path(resume))
        saved = TrainConfig(**{**asdict(cfg), **state["config"]})
        # the run's identity (data, seed, architecture) comes from the checkpoint; the phase
        # settings (steps, crop, batch, lr...) are whatever this invocation asks for
        cfg = TrainConfig(**{**asdict(cfg), "data": saved.data, "holdout": saved.holdout, "seed": saved.seed, "arch": saved.arch})

    sd = None
    if cfg.init_from and state is None:
        from .models.checkpoints import load_state_dict_file

        sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict_file(cfg.init_from).items()}
        if not cfg.arch:  # the run continues the architecture of the weights it starts from
            from .reshape import model_kwargs

            cfg = replace(cfg, arch=model_kwargs(sd))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch).to(device)
    if sd is not None:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(("h_a.", "h_s."))]  # aliases
        if unexpected:
            raise click.ClickException(f"--init-from: {len(unexpected)} unexpected tensors, e.g. {unexpected[0]}")
        if missing:
            say(f"--init-from: {len(missing)} tensors not in the file start fresh (e.g. {missing[0]})", err=True)
    elif cfg.init == "klt" and state is None:
        from .klt_init import klt_init, sample_crops

        info = klt_init(model, sample_crops(split_data(cfg.data, cfg.holdout)[0], seed=cfg.seed).to(device))
        say(
            f"KLT start: the latent keeps {info['energy_stage4']:.2%} of the training crops' energy",
            err=True,
        )
    elif cfg.init not in ("klt", "random"):
        raise click.ClickException(f"--init must be klt or random, not {cfg.init!r}")
    layout = LAYOUTS.get(cfg.layout, torch.channels_last) if device.type == "cpu" else None  # resolve_layout chose "auto"
    if layout is not None:
        model = model.to(memory_format=layout)
    if cfg.lr_mults:
        frozen = freeze_by_lr_mult(model, cfg)
        if frozen:
            say(f"--lr-mult: {frozen / 1e6:.2f} M values frozen", err=True)
    main_p, scale_p, aux_p = split_params(model)
    groups = param_groups(model, cfg)
    opt = make_adam(groups, cfg.lr)
    aux_opt = make_adam(aux_p, cfg.aux_lr)
    step, samples, elapsed = 0, 0, 0.0
    # cumulative totals over every run this one descends from (--init-from carries them on)
    totals = {"cpu_seconds": 0.0, "pixels": 0, "steps": 0}
    if cfg.init_from and state is None:
        totals.update(_lineage_totals(cfg.init_from))
    if state is not None:
        model.load_state_dict(state["model"])
        _load_optimizer(opt, state["optimizer"], groups, model)
        aux_opt.load_state_dict(state["aux_optimizer"])
        step, samples, elapsed = state["step"], state["samples"], state.get("train_seconds", 0.0)
        totals.update(state.get("totals", {}))
    for g in opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(step, cfg) * g["lr_mult"]
    average = WeightAverage(model, cfg.ema_half_life, (state or {}).get("ema")) if cfg.ema_half_life > 0 else None
    if average is not None and state is not None and not average.resumed:
        why = "an average of other parameters" if state.get("ema") else "no average of these weights"
        say(f"--ema-half-life: the checkpoint holds {why}; it starts at them", err=True)
    sync = None
    if procs > 1:
        sync = _StepSync(rank, procs, store, [p for g in opt.param_groups for p in g["params"]])
        sync.share_weights(list(model.state_dict().values()) + (average.avg if average is not None else []))
    model.train()

    files, held_out = split_data(cfg.data, cfg.holdout)
    val_pool = list_images(cfg.val_data) if cfg.val_data else held_out
    val_files = val_pool[: cfg.val_count] if cfg.val_count else []
    per_step = cfg.batch * cfg.accum
    dataset = CropDataset(files, cfg.crop)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch,
        sampler=run_sampler(dataset, cfg, samples, rank, procs),
        collate_fn=collate_crops,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None,
        worker_init_fn=_worker_ignores_stop_signals if cfg.workers > 0 else None,
    )
    batches = iter(loader)
    log = open(out_dir / "log.jsonl", "a") if rank == 0 else None
    levels = model.num_levels
    bf16 = use_bf16(cfg.bf16, device)
    from .kernels._compile import set_compile

    set_compile(use_compile(cfg.compile, device))
    stop = {"signal": None}  # the first stop signal received: the run ends its step, saves and stops

    def on_signal(signum, frame):
        if stop["signal"] is None:
            click.echo(f"codec: {signal.Signals(signum).name}: stopping after this step; the run's state will be saved", err=True)
            stop["signal"] = signum
        else:
            click.echo("codec: already stopping: the run's state is being saved (kill -9 would lose the steps since the last save)", err=True)

    def stopping() -> bool:
        return stop["signal"] is not None

    old_handlers = {s: signal.signal(s, on_signal) for s in INTERRUPT_SIGNALS} if rank == 0 else {}

    def snapshot() -> dict:
        st = {
            "config": asdict(cfg),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "aux_optimizer": aux_opt.state_dict(),
            "step": step,
            "samples": samples,
            "train_seconds": elapsed,
            "totals": dict(totals),
            "device": device.type,
        }
        if average is not None:
            st["ema"] = average.state_dict()
        return st

    t_start = time.time()
    acc = _zero_acc()
    figure_names = ("loss", "bpp", "mse", "y_bpp", "y_bpp_float")
    try:
        while True:
            done = step >= cfg.steps or stop["signal"] is not None or (max_seconds is not None and time.time() - t_start > max_seconds)
            if sync is not None:
                done = sync.agree(done)  # the first process decides
            if done:
                break
            t0, c0 = time.time(), time.process_time()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg) * g["lr_mult"]
            q = quality_levels(cfg.seed, step, per_step, levels).to(device)
            opt.zero_grad(set_to_none=True)
            figures = [0.0] * len(figure_names)
            pixels = 0
            for a in range(rank, cfg.accum, procs):  # this process's batches of the step
                x = next(batches).to(device, non_blocking=True)
                pixels += x.shape[0] * x.shape[2] * x.shape[3]
                if layout is not None:
                    x = x.contiguous(memory_format=layout)
                qa = q[a * cfg.batch : (a + 1) * cfg.batch]
                # the training noise, like the crops, a function of (seed, sample index): the same
                # whichever process codes the batch
                torch.manual_seed(_mix(cfg.seed, 3, samples + a * cfg.batch))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = model(x, quality=qa)
                bpp, mse = rd_terms(out, x)
                lam = model.lambda_for(qa)
                loss = (bpp + lam * 255.0**2 * mse).mean()
                fbpp = float_y_bpp(out, x)
                total = loss if fbpp is None else loss + cfg.float_rate_weight * fbpp.mean()
                (total / cfg.accum).backward()
                for i, v in enumerate((loss, bpp.mean(), mse.mean(), y_bpp(out, x).mean(), fbpp.mean() if fbpp is not None else None)):
                    if v is not None:
                        figures[i] += v.item() / cfg.accum
            cpu = time.process_time() - c0
            if sync is not None:  # the gradients and figures of every process's batches
                *figures, pixels, cpu_all = sync.sum_step([*figures, pixels, cpu])
                pixels = int(pixels)
            else:
                cpu_all = cpu
            for k, v in zip(figure_names, figures):
                acc[k] += v
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(main_p + scale_p, cfg.clip)
            opt.step()
            aux_opt.zero_grad(set_to_none=True)
            aux = model.aux_loss()
            aux.backward()
            aux_opt.step()
            if average is not None:
                average.update()
            acc["aux"] += aux.item()
            acc["n"] += 1
            step += 1
            samples += per_step
            elapsed += time.time() - t0
            # every process's CPU time; the optimizer's part (after the exchange) taken as this one's
            totals["cpu_seconds"] += cpu_all + (time.process_time() - c0 - cpu) * procs
            totals["pixels"] += pixels
            totals["steps"] += 1
            if rank == 0 and step % cfg.log_every == 0:
                n = acc.pop("n")
                rec = {k: v / n for k, v in acc.items()}
                rec.update(type="train", step=step, lr=cfg.lr * lr_factor(step - 1, cfg), sec_per_step=(time.time() - t0), train_seconds=round(elapsed, 1), time=time.time(),
                           cpu_hours=round(totals["cpu_seconds"] / 3600, 4), pixels=totals["pixels"], total_steps=totals["steps"])
                rec["psnr"] = -10 * math.log10(max(rec["mse"], 1e-12))
                log.write(json.dumps(rec) + "\n")
                log.flush()
                acc = _zero_acc()
            if rank == 0 and val_files and cfg.val_every and step % cfg.val_every == 0:
                val = validate(model, val_files, cfg.val_qualities, device, cfg.val_crop, stop=stopping)
                if val is not None:  # None: abandoned by a stop signal
                    log.write(json.dumps({"type": "val", "step": step, "time": time.time(), "cpu_hours": round(totals["cpu_seconds"] / 3600, 4), **val}) + "\n")
                    if average is not None:
                        with average.swapped_in():
                            val = validate(model, val_files, cfg.val_qualities, device, cfg.val_crop, stop=stopping)
                        if val is not None:
                            log.write(json.dumps({"type": "val_ema", "step": step, "time": time.time(), **val}) + "\n")
                log.flush()
            if step % cfg.ckpt_every == 0:
                # the factorized prior's quantiles, solved directly (the aux loss alone is far too slow
                # for the runs we can afford; it keeps them close in between)
                model.entropy_bottleneck.fit_quantiles()
                if rank == 0:
                    save_checkpoint(ckpt_path, snapshot())
    finally:
        if rank == 0:
            save_checkpoint(ckpt_path, snapshot())
            log.close()
        if sync is not None:
            sync.close()
        set_compile(False)
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if stop["signal"] is not None:
        name = signal.Signals(stop["signal"]).name
        raise Interrupted(f"{name}: training stopped at step {step}; its state is saved in {ckpt_path} "
                          f"(continue with: codec train run --resume {ckpt_path})")
    return ckpt_path


# ------------------------------------------------------------------------------------------------
# export


#: the tensors ``export`` writes as int8 with a scale per row: the entropy model's (hyper
#: transforms, channel context, parameter networks) and the integer scale path's.  On default-v8,
#: 14.57 -> 9.12 MB, held-out BD-rate +0.05 % (``benchmarks/compare_checkpoints.py``, 12 images);
#: g_a's in int8 as well cost +3.4 %, all of g_a and g_s +12 %: the transforms stay fp16, and so
#: does the latent residual prediction, whose output the synthesis sees as it is.
INT8_TENSORS = r"(latent_codec\.(?!y\.residual_prediction\.)|scale_path\.)"


def export(checkpoint: str | Path, out: str | Path, fp16: bool = True, notes: dict | None = None, ema: bool = False,
           int8: bool = True) -> Path:
    """Write the shipped weights: model tensors (fp16 unless ``fp16=False``; the entropy model's
    large ones int8 with a scale per row unless ``int8=False``, see :data:`INT8_TENSORS`), CDF
    tables (int32) and metadata (architecture, lambdas, training summary) as a safetensors file.
    ``ema``: the run's moving average of the weights instead of the weights themselves.  ``fp16=False``
    writes every float exactly (float32, no int8)."""
    from .models.checkpoints import save_weights

    state, cfg, model = model_from_checkpoint(checkpoint, ema=ema)
    model.entropy_bottleneck.fit_quantiles()
    model.update(force=True)
    meta = {
        "lambdas": model.lambdas.tolist(),
        "train_steps": str(state["step"]),
        "train_samples": str(state["samples"]),
        "train_seconds": f"{state.get('train_seconds', 0.0):.0f}",
        "train_device": state.get("device", "?"),
        "train_crop": str(cfg.crop),
        "train_weights": f"moving average, half-life {cfg.ema_half_life} steps" if ema else "final",
        **{f"total_{k}": str(v) for k, v in state.get("totals", {}).items()},
        "notes": notes or {},
    }
    return save_weights(model, out, fp16=fp16, metadata=meta, int8=INT8_TENSORS if int8 and fp16 else None)


# ------------------------------------------------------------------------------------------------
# command line


@click.group(invoke_without_command=False, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Train the default model, resume training, fit its integer scale path, or export a checkpoint."""


def _parse_lr_mults(ctx, param, values) -> tuple:
    out = []
    for v in values:
        pattern, sep, k = v.rpartition("=")
        try:
            mult = float(k)
            re.compile(pattern)
        except (ValueError, re.error) as e:
            raise click.BadParameter(f"{v!r}: PATTERN=K with a regular expression and a number ({e})") from None
        if not sep or not pattern or mult < 0:
            raise click.BadParameter(f"{v!r}: PATTERN=K with a regular expression and a number at least 0")
        out.append((pattern, mult))
    return tuple(out)


@cli.command("run")
@click.option("--data", multiple=True, default=DEFAULT_TRAIN_DIRS, show_default=True, help="folder of training images (repeat to pool several)")
@click.option("--holdout", default=24, show_default=True, help="images of --data held out for validation (a fixed choice by name hash), never trained on")
@click.option("--val-data", default=None, help="validate on this folder instead of the held-out images")
@click.option("--out", default=str(runs_dir() / "default"), show_default=True, help="run folder (checkpoint.pt, log.jsonl)")
@click.option("--steps", default=100_000, show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--accum", default=1, show_default=True, help="gradient accumulation (batches per step)")
@click.option("--crop", default=256, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--warmup", default=500, show_default=True)
@click.option("--decay-start", default=0.8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=1, show_default=True)
@click.option("--threads", default=0, show_default=True, help="torch CPU threads of each training process (0: torch's default; with --procs, the cores shared out)")
@click.option("--procs", default=1, show_default=True, type=click.IntRange(min=1),
              help="training processes that share each step's --accum batches (data parallel; their gradients summed, so the run computes what one process would): on a CPU, two processes of one thread train faster than one of two")
@click.option("--val-every", default=500, show_default=True)
@click.option("--val-count", default=6, show_default=True)
@click.option("--ckpt-every", default=200, show_default=True)
@click.option("--log-every", default=20, show_default=True)
@click.option("--init-from", default=None, help="start from these weights (e.g. the shipped default model)")
@click.option("--init", type=click.Choice(["klt", "random"]), default="klt", show_default=True,
              help="fresh runs: transforms start as a two-level block KLT of the training data, or random")
@click.option("--resume", default=None, help="resume exactly from a checkpoint.pt")
@click.option("--float-rate-weight", default=0.5, show_default=True, help="weight of the float scales' y rate beside the integer path's")
@click.option("--bf16", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="bf16 autocast (rates stay float32): auto = CUDA only (on a CPU, float32 trained better at equal time)")
@click.option("--compile", "compile", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="torch.compile the CPU fast paths (BiWKV, depthwise backward; a minute or two at the start, again at the first crop of another shape): auto = CPU with a C++ compiler")
@click.option("--layout", type=click.Choice(["auto", "channels_last", "contiguous"]), default="auto", show_default=True,
              help="memory layout of a CPU run's images and convolution weights: auto = the faster for this run's transforms on this machine, measured at the start (seconds; 20 at 512 pixels) and kept by --resume")
@click.option("--ema-half-life", default=0, show_default=True, type=click.IntRange(min=0),
              help="keep a moving average of the weights with this half-life in steps (0: none); validated beside them, exported with export --ema")
@click.option("--lr-mult", "lr_mults", multiple=True, callback=_parse_lr_mults, metavar="PATTERN=K",
              help="the parameters whose names match the regular expression PATTERN learn at K x the rate (repeat; the last match wins; 0 freezes them), e.g. 'g_s\\.\\d+\\.c[12]\\.=10' for new residual units")
@click.option("--max-minutes", default=None, type=click.FloatRange(min=0, min_open=True), help="stop cleanly (and checkpoint) after this much wall time")
@exit_codes()
def run_cmd(resume, max_minutes, **kw):
    """Train (or resume training) the variable-rate default model.

    With --resume, the run continues with the settings it was saved with, in the checkpoint's own
    folder; only the options given on this command line change (e.g. --steps to extend it)."""
    if resume:
        from click.core import ParameterSource

        ctx = click.get_current_context()
        given = {k for k in kw if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
        saved = read_training_state(resume)["config"]
        kw = {**asdict(TrainConfig()), **saved, "out": str(Path(resume).parent), **{k: kw[k] for k in given}}
        if "procs" in given and "threads" not in given:  # the saved thread count was for the saved process count
            kw["threads"] = 0
    kw["data"] = tuple(kw["data"])
    cfg = TrainConfig(**kw)
    path = train(cfg, resume=resume, max_seconds=None if max_minutes is None else 60 * max_minutes)
    click.echo(f"checkpoint: {path}")


def int_path_training_cache(model, files: list[Path], batches: int, crop: int = 128, batch: int = 8, seed: int = 12345) -> list[dict]:
    """The integer scale path's fit (:mod:`lalic_codec.int_path_fit`): features of ``batches``
    batches of random crops (qualities drawn as in training)."""
    from .int_path_fit import features

    ds = CropDataset(files, crop)
    sampler = iter(StepSampler(len(files), seed=seed))
    return [features(model, torch.stack([ds[next(sampler)] for _ in range(batch)]), quality_levels(seed, b, batch, model.num_levels)) for b in range(batches)]


def int_path_validation_cache(model, files: list[Path], crop: int = 256, qualities=(1.0, 4.0, 8.0)) -> list[dict]:
    """The integer scale path's fit: features of the centre crops of ``files`` at each quality."""
    from .int_path_fit import features

    out = []
    for f in files:
        x = centre_crop(f, crop)
        out.extend(features(model, x, torch.tensor([q])) for q in qualities)
    return out


@cli.command("fit-int-path")
@click.argument("checkpoint")
@click.option("--out", default=None, help="checkpoint to write (default: CHECKPOINT with -intfit before .pt)")
@click.option("--cpu-minutes", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="process CPU time for the fit")
@click.option("--batches", default=300, show_default=True, help="cached training batches of 8 crops of 128")
@click.option("--layout", type=click.Choice(["keep", "v1", "v2"]), default="keep", show_default=True,
              help="keep the checkpoint's integer path and continue it, or start a fresh path of this layout")
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--threads", default=0, show_default=True, help="torch CPU threads (0: default)")
@exit_codes()
def fit_int_path_cmd(checkpoint, out, cpu_minutes, batches, layout, lr, threads):
    """Train the integer scale path alone on the frozen rest of CHECKPOINT (the distortion cannot
    change); keeps the parameters with the lowest y rate on the held-out images."""
    from . import int_path_fit as ipf
    from .models.int_scale import IntegerScalePath
    from .models.lalic import DEFAULT_CONFIG, INT_SCALE_V2

    tune_allocator()
    if threads:
        torch.set_num_threads(threads)
    state, cfg, model = model_from_checkpoint(checkpoint)
    if model.scale_path is None:
        raise click.ClickException(f"{checkpoint}: this model has no integer scale path")
    if layout != "keep":
        kw = INT_SCALE_V2 if layout == "v2" else True
        torch.manual_seed(cfg.seed)
        model.scale_path = IntegerScalePath(model.config.dims[5], model.groups, **(kw if isinstance(kw, dict) else {}))
        cfg.arch = {**(cfg.arch or DEFAULT_CONFIG), "int_scale": kw}
        state["optimizer"] = _drop_optimizer_state(state["optimizer"], "scale_path.")
    train_files, held_out = split_data(cfg.data, cfg.holdout)
    t0 = time.time()
    cache = int_path_training_cache(model, train_files, batches)
    val = int_path_validation_cache(model, held_out)
    gcs = model.gaussian_conditionals()
    click.echo(f"features of {batches} batches and {len(val)} held-out crops in {time.time() - t0:.0f} s; "
               f"float scales {sum(ipf.float_bits(f, gcs) for f in val) / sum(f['pixels'] for f in val):.4f} y bpp held out", err=True)
    res = ipf.fit(model.scale_path, cache, gcs, 60 * cpu_minutes, lr=lr, val=val, log=lambda m: click.echo(m, err=True))
    click.echo(f"integer path: held-out y {res['held_out_bpp_start']:.4f} -> {res['held_out_bpp']:.4f} bpp "
               f"({res['steps']} steps, {res['cpu_seconds']:.0f} CPU s)", err=True)
    state["config"] = asdict(cfg)
    state["model"] = model.state_dict()
    totals = dict(state.get("totals", {}))
    totals["cpu_seconds"] = totals.get("cpu_seconds", 0.0) + res["cpu_seconds"]
    state["totals"] = totals
    state.setdefault("int_path_fits", []).append(res | {"layout": layout, "batches": batches})
    dest = Path(out) if out else Path(checkpoint).with_name(Path(checkpoint).stem + "-intfit.pt")
    save_checkpoint(dest, state)
    click.echo(f"checkpoint: {dest}")


@cli.command("fit-tables")
@click.argument("weights")
@click.argument("out")
@click.option("--images", default=64, show_default=True, type=click.IntRange(min=1),
              help="training images to encode (spread over the training part of --data; never the held-out ones)")
@click.option("--crop", default=512, show_default=True, type=click.IntRange(min=64), help="centre crop of each image, at most this (multiples of 64)")
@click.option("--qualities", default="1,2,3,4,5,6,7,8", show_default=True, help="qualities each image is encoded at")
@click.option("--prior-weight", default=100.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="weight of the Gaussian tables against the counts, in symbols")
@click.option("--data", multiple=True, default=DEFAULT_TRAIN_DIRS, show_default=True, help="folder of training images (repeat to pool several)")
@click.option("--holdout", default=24, show_default=True, help="images of --data held out by `codec train run` (left out here too)")
@click.option("--threads", default=0, show_default=True, help="torch CPU threads (0: default)")
@exit_codes()
def fit_tables_cmd(weights, out, images, crop, qualities, prior_weight, data, holdout, threads):
    """Write WEIGHTS to OUT with y's CDF tables fitted to the symbols its encoder codes for
    training images (FORMAT.md 12.1: same rows, new frequencies); every other tensor is copied
    as it is.  Files made with OUT decode with OUT only (its fingerprint differs)."""
    from .table_fit import fit_tables

    if threads:
        torch.set_num_threads(threads)
    try:
        qs = [float(v) for v in qualities.split(",")]
    except ValueError:
        raise click.BadParameter(f"{qualities!r}: numbers separated by commas", param_hint="--qualities") from None
    if not qs or any(not 1 <= q <= 8 for q in qs):
        raise click.BadParameter(f"{qualities!r}: qualities from 1 to 8", param_hint="--qualities")
    train_files, _ = split_data(tuple(data), holdout)
    if not train_files:
        raise click.ClickException("no training images in --data")
    step = max(1, len(train_files) // images)
    files = train_files[::step][:images]
    t0 = time.time()
    images = [x for x in (centre_crop(f, crop) for f in files) if x.shape[-1] and x.shape[-2]]  # under 64 pixels: empty
    try:
        res = fit_tables(weights, out, images, qs, prior_weight, note={"crop": crop}, log=lambda m: click.echo(m, err=True))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{res['symbols']:,} symbols of {res['images']} images at {len(qs)} qualities in {time.time() - t0:.0f} s: "
               f"{res['bits_before'] / 8e3:,.1f} -> {res['bits_after'] / 8e3:,.1f} kB under the fitted tables "
               f"({100 * (res['bits_after'] / res['bits_before'] - 1):+.2f} %, in sample); wrote {out}")


def _drop_optimizer_state(saved: dict, prefix: str) -> dict:
    """Adam state without the entries of parameters whose names start with ``prefix``."""
    names = [n for g in saved["param_groups"] for n in g.get("names", [])]
    keep = {i for i, n in enumerate(names) if not n.startswith(prefix)}
    return {**saved, "state": {i: v for i, v in saved["state"].items() if i in keep}}


@cli.command("reshape")
@click.argument("source")
@click.argument("out")
@click.option("--depths", default=None, help="transform depths L1,L2,L3,L4, each at least the current one: new RWKV blocks start as identities")
@click.option("--ctx-hidden-rate", type=int, default=None, help="hidden width of the channel context's channel mix, in multiples of M: keeps the most important units")
@click.option("--lambdas", default=None, metavar="LOW,HIGH", help="a new quality ladder, spaced geometrically from LOW (quality 1) to HIGH; the latent gains follow")
@click.option("--latent", type=int, default=None, metavar="M", help="a wider latent: one channel group of M minus the current M channels is added, the reconstruction unchanged")
@click.option("--param-hidden-rate", type=int, default=None, help="hidden width of the parameter networks' blocks, in multiples of their output: keeps the most important units")
@click.option("--units", default=None, metavar="A,S", help="residual convolution units at the 1/2 level of g_a and g_s, each at least the current number: new ones start as identities")
@click.option("--lrp", type=int, default=None, metavar="H",
              help="add a latent residual prediction of hidden width H after each channel group (starts as the identity)")
@click.option("--latent-init", type=click.Choice(["random", "pca"]), default="random", show_default=True,
              help="with --latent, the new analysis rows: random, or the principal components of what the present rows leave out of "
                   "g_a's last convolution's input, measured on crops of --data")
@click.option("--new-group", type=click.Choice(["fresh", "last"]), default="fresh", show_default=True,
              help="with --latent, the new channel group's entropy networks: fresh, or copies of the last group's (the same width)")
@click.option("--data", multiple=True, default=DEFAULT_TRAIN_DIRS, show_default=True, help="training images for --latent-init pca (repeat to pool)")
@click.option("--holdout", default=24, show_default=True, help="images of --data left out, as codec train run holds them out")
@click.option("--crops", default=64, show_default=True, help="random crops of 256 pixels for --latent-init pca")
@click.option("--keep-state", is_flag=True,
              help="SOURCE is a run's checkpoint.pt and OUT a new run folder: its weights, moving average and Adam moments "
                   "reshaped (new and grown tensors start fresh), to continue with codec train run --resume OUT/checkpoint.pt")
@exit_codes()
def reshape_cmd(source, out, depths, ctx_hidden_rate, lambdas, latent, param_hidden_rate, units, lrp, latent_init, new_group, data, holdout, crops,
                keep_state):
    """Write SOURCE (a checkpoint or weights file) with another architecture to OUT (.pt), keeping
    what it has learnt; continue with `codec train run --init-from OUT` (or, with --keep-state,
    `--resume OUT/checkpoint.pt`)."""
    from .models.checkpoints import load_state_dict_file
    from .reshape import ladder, model_kwargs, reshape, reshape_run

    state = read_training_state(source) if keep_state else None
    sd = {k: v.float() if v.is_floating_point() else v for k, v in (state["model"] if keep_state else load_state_dict_file(source)).items()}
    dest = Path(out) / "checkpoint.pt" if keep_state else Path(out)
    if keep_state and dest.exists():
        raise click.ClickException(f"{dest} exists: --keep-state writes a new run folder")
    try:
        d = None if depths is None else tuple(int(v) for v in depths.split(","))
        u = None if units is None else tuple(int(v) for v in units.split(","))
        lam = None
        if lambdas is not None:
            try:
                ends = [float(v) for v in lambdas.split(",")]
            except ValueError:
                ends = []
            if len(ends) != 2:
                raise ValueError(f"--lambdas {lambdas}: two numbers, LOW,HIGH")
            lam = ladder(*ends, levels=int(sd["lambdas"].numel()))
        stats_of = None
        if latent_init == "pca":
            if latent is None:
                raise ValueError("--latent-init pca: give --latent too")
            from .klt_init import sample_crops
            from .loading import build_from_state_dict
            from .reshape import analysis_patch_stats

            sample = sample_crops(split_data(list(data), holdout)[0], count=crops, crop=256)

            def stats_of(weights: dict):
                return analysis_patch_stats(build_from_state_dict(weights)[0].eval(), sample)

        kw = dict(depths=d, ctx_hidden_rate=ctx_hidden_rate, lambdas=lam, latent=latent, param_hidden_rate=param_hidden_rate, units=u, lrp=lrp,
                  group_start=new_group)
        if keep_state:
            new_state = reshape_run({**state, "model": sd}, stats_of, **kw)
            new_sd = new_state["model"]
        else:
            new_sd, _ = reshape(sd, patch_stats=stats_of(sd) if stats_of else None, **kw)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    arch = model_kwargs(new_sd)
    if keep_state:
        dest.parent.mkdir(parents=True, exist_ok=True)
        log = Path(source).parent / "log.jsonl"
        if log.is_file():  # the lineage's history goes on in the new folder
            (dest.parent / "log.jsonl").write_bytes(log.read_bytes())
        save_checkpoint(dest, new_state)
    else:
        save_checkpoint(dest, {"model": new_sd, "totals": _lineage_totals(source)})
    before = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and not k.startswith(("h_a.", "h_s.")))
    after = sum(v.numel() for k, v in new_sd.items() if v.is_floating_point() and not k.startswith(("h_a.", "h_s.")))
    was = model_kwargs(sd)
    show_units = any(was["units"]) or any(arch["units"])  # shown where the transforms have residual units

    def text(a: dict) -> str:
        return (f"M {a['M']} {a['depths']}{' units ' + str(a['units']) if show_units else ''} x{a['ctx_hidden_rate']}/{a['param_hidden_rate']}"
                f"{' lrp ' + str(a['lrp']) if a['lrp'] else ''}")

    click.echo(f"{text(was)} -> {text(arch)}: "
               f"{before / 1e6:.2f} M -> {after / 1e6:.2f} M values; "
               f"lambdas {', '.join(f'{v:g}' for v in new_sd['lambdas'].tolist())}; wrote {dest}")


@cli.command("export")
@click.argument("checkpoint")
@click.argument("out")
@click.option("--fp32", is_flag=True, help="keep float32 weights (all of them, exactly)")
@click.option("--no-int8", is_flag=True, help="write the entropy model's weights in fp16 too, not int8 with a scale per row")
@click.option("--ema", is_flag=True, help="export the run's moving average of the weights (--ema-half-life)")
@exit_codes()
def export_cmd(checkpoint, out, fp32, no_int8, ema):
    """Export CHECKPOINT to the safetensors weights file OUT."""
    click.echo(f"wrote {export(checkpoint, out, fp16=not fp32, ema=ema, int8=not no_int8)}")


def main():
    cli(prog_name="python -m lalic_codec.train")


if __name__ == "__main__":
    sys.exit(main())
