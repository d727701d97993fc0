"""Speed of one training step of the default model on this machine, with a per-part breakdown.

Prints pixels per second of the whole step (forward, backward, gradient clipping, Adam, the
factorized prior's auxiliary step) and how the step's time divides between the parts of the
network.  Each part's time is measured by replaying every call of its modules, forward and
backward, on the inputs recorded from a real step; "loss and glue" is what the full forward and
backward take beyond the sum of the parts (the rate and distortion terms, quantisation,
concatenations).

    python benchmarks/bench_train_step.py [--batch 8] [--crop 128] [--threads 2] [--steps 10]
                                          [--weights models/default-v10.safetensors] [--compile auto|on|off]
                                          [--profile] [--denormals flush|keep]
                                          [--images DIR] [--quality Q] [--freeze PATTERN ...]

``--profile`` also prints the operators that take the most time (torch.profiler, self CPU).
The synthetic input (smooth noise) does not cost what photos do: ``--images DIR`` times the centre
crops of real ones (``--quality``: all at one quality; the latent residual prediction's backward
passes met subnormal floats at high qualities, see ``--denormals``).  ``--freeze PATTERN`` times the
step with the parameters whose names match frozen, as ``codec train run --lr-mult PATTERN=0``
trains (no gradients computed for them, nor backward passes that only they need).
"""

from __future__ import annotations

import argparse
import time

import torch

from lalic_codec import train as tr
from lalic_codec._runtime import tune_allocator


def _parts(model) -> dict[str, list[torch.nn.Module]]:
    cg = model.channel_groups
    parts = {
        "analysis g_a": [model.g_a],
        "synthesis g_s": [model.g_s],
        "hyper (h_a, h_s, factorized prior)": [model.h_a, model.h_s, model.entropy_bottleneck],
        "channel context (RWKV)": list(cg.channel_context.values()),
        "parameter networks + checkerboard context": [m for g in cg.latent_codec.values() for m in (g.entropy_parameters, g.context_prediction)],
        "Gaussian likelihoods": [g.gaussian_conditional for g in cg.latent_codec.values()],
    }
    if cg.residual_prediction is not None:
        parts["latent residual prediction"] = list(cg.residual_prediction.values())
    if model.scale_path is not None:
        sp = model.scale_path
        parts["integer scale path"] = [sp.hyper, *[m for m in sp.channel_ctx if not isinstance(m, torch.nn.Identity)], *sp.spatial_ctx, *sp.heads]
    return parts


def _detach(a):
    if isinstance(a, torch.Tensor):
        a = a.detach()
        return a.requires_grad_(True) if a.is_floating_point() else a
    if isinstance(a, (list, tuple)):
        return type(a)(_detach(v) for v in a)
    return a


def _scalar(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.requires_grad else out.new_zeros((), dtype=torch.float32)
    return sum((_scalar(o) for o in out), torch.zeros(()))


def _record_calls(model, parts, x, q):
    calls = {name: [] for name in parts}
    hooks = []
    for name, mods in parts.items():
        for m in mods:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, kwargs, name=name: calls[name].append((mod, _detach(args), _detach(kwargs))), with_kwargs=True))
    model(x, quality=q)
    for h in hooks:
        h.remove()
    return calls


def _time(fn, repeat: int) -> float:
    """Fastest of ``repeat`` runs after one warm-up (the least disturbed by other work on the machine)."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--weights", default=None, help="start from these weights and their architecture (default: random, the default architecture)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--quality", type=float, default=None, help="every crop at this quality (default: drawn as training draws them)")
    ap.add_argument("--images", default=None, help="a folder of photos: time their centre crops instead of a synthetic smooth input")
    ap.add_argument("--denormals", choices=["flush", "keep"], default="flush", help="subnormal floats as zero (as codec train run) or computed in full")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast, as codec train run --bf16")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile of the CPU fast paths, as codec train run --compile")
    ap.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last", help="memory layout of images and convolution weights")
    ap.add_argument("--freeze", action="append", default=[], metavar="PATTERN", help="freeze the parameters whose names match (a regular expression), as --lr-mult PATTERN=0")
    args = ap.parse_args()
    tune_allocator()
    if args.denormals == "flush":  # as `codec train run` does (_runtime.denormals_flushed), before the thread pool starts
        torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = tr.TrainConfig(batch=args.batch, crop=args.crop, init_from=args.weights, lr_mults=tuple((p, 0.0) for p in args.freeze))
    sd = None
    if args.weights:  # the architecture of the weights (e.g. a `codec train reshape` candidate)
        from lalic_codec.models.checkpoints import load_state_dict_file
        from lalic_codec.reshape import model_kwargs

        sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict_file(args.weights).items()}
        cfg.arch = model_kwargs(sd)
    model = tr.build_model(cfg.arch)
    if sd is not None:
        model.load_state_dict(sd, strict=False)
    model.train()
    frozen = tr.freeze_by_lr_mult(model, cfg)
    main_p, scale_p, aux_p = tr.split_params(model)
    opt = tr.make_adam(tr.param_groups(model, cfg), 1e-5)
    aux_opt = tr.make_adam(aux_p, 1e-5)
    if args.images:  # real photos: the centre crops of the first `batch` images, cut to the smallest
        files = tr.list_images(args.images)[: args.batch]
        if len(files) < args.batch:
            ap.error(f"--images {args.images}: {len(files)} images, fewer than --batch {args.batch}")
        x = tr.collate_crops([tr.centre_crop(f, args.crop)[0] for f in files])
    else:
        g = torch.Generator().manual_seed(1)
        x = torch.rand(args.batch, 3, args.crop, args.crop, generator=g)
        # a smooth, image-like input: random noise upsampled, so rates resemble real crops
        x = torch.nn.functional.interpolate(torch.rand(args.batch, 3, args.crop // 8, args.crop // 8, generator=g), size=args.crop, mode="bicubic").clamp(0, 1) * 0.8 + 0.2 * x
    q = tr.quality_levels(0, 0, args.batch, model.num_levels) if args.quality is None else torch.full((args.batch,), float(args.quality))
    if args.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    bf16 = tr.use_bf16(args.bf16, torch.device("cpu"))
    from lalic_codec.kernels._compile import compile_enabled, set_compile

    set_compile(tr.use_compile(args.compile, torch.device("cpu")))

    def forward_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, quality=q)
        bpp, mse = tr.rd_terms(out, x)
        loss = (bpp + model.lambda_for(q) * 255.0**2 * mse).mean()
        fb = tr.float_y_bpp(out, x)
        if fb is not None:
            loss = loss + cfg.float_rate_weight * fb.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(main_p + scale_p, 1.0)
        opt.step()
        aux_opt.zero_grad(set_to_none=True)
        model.aux_loss().backward()
        aux_opt.step()

    def full_step():
        forward_backward()
        optimizer_step()

    t0 = time.perf_counter()
    full_step()  # compiles every shape the step meets, where compilation is on
    first_s = time.perf_counter() - t0
    step_s = _time(full_step, args.steps)
    fb_s = _time(forward_backward, args.steps)
    forward_backward()
    opt_s = _time(optimizer_step, args.steps)

    parts = _parts(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        calls = _record_calls(model, parts, x, q)
    part_s = {}
    for name, cs in calls.items():

        def replay(cs=cs):
            for mod, a, kw in cs:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    s = _scalar(mod(*a, **kw))
                if s.requires_grad:
                    s.backward()

        part_s[name] = _time(replay, args.steps)
    model.zero_grad(set_to_none=True)

    px = x.shape[0] * x.shape[2] * x.shape[3]
    print(f"training step, batch {args.batch} x {x.shape[2]}x{x.shape[3]} ({args.images or 'synthetic'}), qualities {q.tolist()}, {args.threads} threads, bf16 autocast {'on' if bf16 else 'off'}, "
          f"compiled fast paths {'on' if compile_enabled() else 'off'}, denormals {args.denormals}, torch {torch.__version__}")
    if args.freeze:
        print(f"  frozen: {frozen:,} values matching {', '.join(args.freeze)}")
    print(f"  first step {first_s:.1f} s (compilation included)")
    print(f"  step {step_s:.3f} s  ->  {px / step_s:,.0f} pixels/s")
    print(f"  {'part':<46} {'s/step':>8} {'share':>7}")
    rows = list(part_s.items()) + [("loss and glue (forward+backward - parts)", fb_s - sum(part_s.values())), ("optimizer (clip, Adam, aux)", opt_s)]
    for name, s in rows:
        print(f"  {name:<46} {s:8.3f} {s / step_s:7.1%}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                full_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
