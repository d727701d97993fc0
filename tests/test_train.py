"""Training pipeline: loss terms, deterministic data, exact resume, export."""

import json
import re

import click
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, natural_image
from lalic_codec import train as tr


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(5):
        Image.fromarray(natural_image(70 + 9 * i, 90, seed=i)).save(d / f"im{i}.png")
    Image.fromarray(natural_image(40, 50, seed=9)).save(d / "small.jpg")  # smaller than a crop
    return d


def cfg_for(tmp_path, data_dir, **kw):
    base = dict(data=(str(data_dir),), val_data=None, holdout=1, out=str(tmp_path / "run"), steps=4, batch=2, crop=64,
                warmup=2, workers=0, val_count=1, val_every=2, ckpt_every=2, log_every=1, threads=1, compile="off",
                layout="channels_last", arch={**TINY, "int_scale": True})  # a fixed layout: runs compared bit for bit
    base.update(kw)
    return tr.TrainConfig(**base)


def test_sampler_and_crops_are_a_function_of_seed_and_position(data_dir):
    files = tr.list_images(data_dir)
    a = list(zip(range(20), tr.StepSampler(len(files), seed=3)))
    b = list(zip(range(10), tr.StepSampler(len(files), seed=3, start=10)))
    assert [x for _, x in a[10:]] == [x for _, x in b]
    ds = tr.CropDataset(files, 64)
    item = a[7][1]
    assert torch.equal(ds[item], ds[item])
    assert ds[item].shape == (3, 64, 64)
    assert ds[(len(files) - 1, 1)].shape[1] % 64 == 0  # small images are enlarged to one block


def test_crops_larger_than_some_images_make_batches_of_their_smallest_shape(tmp_path, data_dir):
    """A fine-tune with crops larger than some images (``--crop 512`` on photos of 320 x 448)
    gets crops of several shapes: a batch is cut to the smallest (the default collate would fail
    to stack them), and the pixels counted are those trained on."""
    data_dir = tmp_path / "sizes"
    data_dir.mkdir()
    for i, (h, w) in enumerate([(200, 150), (140, 260), (100, 100), (130, 200), (70, 90)]):
        Image.fromarray(natural_image(h, w, seed=i)).save(data_dir / f"im{i}.png")
    files = tr.split_data((str(data_dir),), 1)[0]  # what the run below trains on
    ds = tr.CropDataset(files, 128)
    sizes = []
    for f in files:
        with Image.open(f) as im:
            sizes.append(im.size)
    shapes = [tr._crop_shape(max(W, 64), max(H, 64), 128) for W, H in sizes]  # at most crop and image, in 64s
    assert len(set(shapes)) > 1 and all(tuple(ds[(i, 5)].shape[1:]) == shapes[i] for i in range(len(files)))
    batch = tr.collate_crops([ds[(0, 1)], ds[(1, 2)], ds[(3, 3)]])
    h, w = min(shapes[i][0] for i in (0, 1, 3)), min(shapes[i][1] for i in (0, 1, 3))
    assert batch.shape == (3, 3, h, w) and torch.equal(batch[2], ds[(3, 3)][:, :h, :w])

    cfg = cfg_for(tmp_path, data_dir, crop=128, batch=3, accum=2, steps=2, val_count=0)
    ckpt = tr.train(cfg)
    state = torch.load(ckpt, weights_only=True)
    trained = [tr.collate_crops([ds[item] for item in b]) for b in _batches(ds, cfg, 4)]
    assert state["totals"]["pixels"] == sum(b.shape[0] * b.shape[2] * b.shape[3] for b in trained)


def _batches(ds, cfg, count):
    """The first ``count`` batches of (file index, sample seed) a run of ``cfg`` on ``ds`` draws."""
    it = iter(tr.run_sampler(ds, cfg))
    return [[next(it) for _ in range(cfg.batch)] for _ in range(count)]


@pytest.mark.parametrize("group", [2, 3])
def test_a_steps_crops_have_one_shape_where_the_files_allow(group):
    """The run's sampler puts files whose crops have one shape into the same step, so that data
    parallel processes wait less for each other and batches are not cut to their smallest crop:
    every epoch still draws each file once, the steps count from sample 0 across epochs (whose
    length is not a multiple of the step), and only the leftovers of each shape share a step."""
    rng = np.random.default_rng(1)
    keys = [("abcd"[k],) for k in rng.choice(4, size=29, p=[0.5, 0.3, 0.15, 0.05])]
    sampler = tr.StepSampler(len(keys), seed=5, keys=keys, group=group)
    epochs = 6
    stream = [i for _, (i, _) in zip(range(epochs * len(keys)), sampler)]
    for e in range(epochs):
        assert sorted(stream[e * len(keys) : (e + 1) * len(keys)]) == list(range(len(keys)))
    steps = [stream[j : j + group] for j in range(0, len(stream), group)]
    mixed = sum(len({keys[i] for i in s}) > 1 for s in steps)
    # per epoch at most one leftover step per key boundary and one across the epoch's boundary
    assert mixed <= epochs * (len(set(keys)) + 1)
    plain = [i for _, (i, _) in zip(range(len(stream)), tr.StepSampler(len(keys), seed=5))]
    plain_mixed = sum(len({keys[i] for i in plain[j : j + group]}) > 1 for j in range(0, len(plain), group))
    assert mixed < plain_mixed / 3
    assert stream != plain and sorted(stream[: len(keys)]) == sorted(plain[: len(keys)])
    # a resumed run continues the same stream; data parallel processes share it out
    later = [x for _, x in zip(range(20), tr.StepSampler(len(keys), seed=5, start=4 * group, keys=keys, group=group))]
    assert [i for i, _ in later] == stream[4 * group : 4 * group + 20]
    parts = [[x for _, x in zip(range(2 * len(keys)), tr.StepSampler(len(keys), seed=5, keys=keys, group=group, share=(1, group, r, group)))] for r in range(group)]
    for r in range(group):
        assert [i for i, _ in parts[r]] == stream[r::group][: 2 * len(keys)]


def test_exact_resume(tmp_path, data_dir):
    full = cfg_for(tmp_path / "a", data_dir)
    tr.train(full)
    straight = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)

    half = cfg_for(tmp_path / "b", data_dir, steps=2)
    tr.train(half)
    resumed_cfg = cfg_for(tmp_path / "b", data_dir)
    tr.train(resumed_cfg, resume=str(tmp_path / "b" / "run" / "checkpoint.pt"))
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)

    assert straight["step"] == resumed["step"] == 4
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    log = [json.loads(line) for line in open(tmp_path / "b" / "run" / "log.jsonl")]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]
    assert any(r["type"] == "val" and "q4" in r for r in log)
    assert all(np.isfinite(r["loss"]) for r in log if r["type"] == "train")


def test_loss_terms_and_lambda_interpolation():
    from lalic_codec.models.lalic import VariableRateLALIC

    m = VariableRateLALIC(**TINY)
    m.update(force=True)
    x = torch.rand(2, 3, 64, 64)
    out = m(x, quality=torch.tensor([1.0, 8.0]))
    bpp, mse = tr.rd_terms(out, x)
    assert bpp.shape == mse.shape == (2,)
    bits = -sum(torch.log2(l[0]).sum() for l in out["likelihoods"].values())
    assert torch.allclose(bpp[0], bits / (64 * 64))
    lam = m.lambda_for(torch.tensor([1.0, 1.5, 8.0]))
    assert lam[0] == pytest.approx(0.0018) and lam[2] == pytest.approx(0.0483)
    assert lam[1] == pytest.approx((0.0018 * m.lambdas[1].item()) ** 0.5)  # log-linear between levels
    with pytest.raises(ValueError):
        m.lambda_for(torch.tensor([0.5]))


def test_bf16_autocast_is_automatic_on_cuda_only_and_asked_for_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tr.use_bf16("auto", cuda) and not tr.use_bf16("auto", cpu)  # float32 trained better on CPU
    assert tr.use_bf16("on", cpu) and not tr.use_bf16("off", cuda)
    with pytest.raises(click.ClickException, match="must be auto, on or off"):
        tr.use_bf16("yes", cpu)


def test_time_layouts_times_the_same_transforms_in_both_layouts():
    from lalic_codec.models.lalic import VariableRateLALIC

    torch.manual_seed(0)
    model = VariableRateLALIC(**TINY)
    x = torch.rand(1, 3, 64, 64)
    before = model.g_s(model.g_a(x)).detach()
    times = tr.time_layouts(model, 64, reps=1)
    assert set(times) == {"channels_last", "contiguous"} and all(t > 0 for t in times.values())
    assert all(p.grad is None for p in model.parameters())  # nothing left for an optimizer to take
    for fmt in tr.LAYOUTS.values():  # the same function in either layout: only the speed differs
        model.to(memory_format=fmt)
        assert torch.allclose(model.g_s(model.g_a(x.contiguous(memory_format=fmt))), before, atol=1e-5)


def test_layout_auto_is_measured_at_the_start_saved_and_kept_by_resume(tmp_path, data_dir, monkeypatch):
    """--layout auto trains in the layout the transforms ran faster in at the run's crop; the
    choice is saved with the run's settings, so --resume keeps it unless --layout is given."""
    from click.testing import CliRunner

    measured = []
    fastest = {"layout": "contiguous"}

    def timed(model, crop, reps=2):
        measured.append(crop)
        return {name: 1.0 if name == fastest["layout"] else 2.0 for name in tr.LAYOUTS}

    monkeypatch.setattr(tr, "time_layouts", timed)
    ckpt = tr.train(cfg_for(tmp_path, data_dir, layout="auto", steps=2))
    state = torch.load(ckpt, weights_only=True)
    assert measured == [64] and state["config"]["layout"] == "contiguous"
    w = state["model"]["g_a.0.weight"]  # (out, 3, 5, 5): the two layouts store it differently
    assert w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
    fastest["layout"] = "channels_last"
    res = CliRunner().invoke(tr.cli, ["run", "--resume", str(ckpt), "--steps", "3"])
    assert res.exit_code == 0 and measured == [64], res.output  # kept, not measured again
    assert torch.load(ckpt, weights_only=True)["config"]["layout"] == "contiguous"
    res = CliRunner().invoke(tr.cli, ["run", "--resume", str(ckpt), "--steps", "4", "--layout", "auto"])
    assert res.exit_code == 0 and measured == [64, 64], res.output
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4 and state["config"]["layout"] == "channels_last"
    assert state["model"]["g_a.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert tr.resolve_layout(cfg_for(tmp_path, data_dir, layout="contiguous")).layout == "contiguous" and measured == [64, 64]
    with pytest.raises(click.ClickException, match="--layout must be"):
        tr.resolve_layout(cfg_for(tmp_path, data_dir, layout="nhwc"))


def test_lr_schedule():
    cfg = tr.TrainConfig(steps=1000, warmup=100, decay_start=0.8)
    assert tr.lr_factor(0, cfg) == pytest.approx(0.01)
    assert tr.lr_factor(500, cfg) == 1.0
    assert tr.lr_factor(999, cfg) < 0.1 and tr.lr_factor(900, cfg) < 1.0


def test_export_and_load_in_pipeline(tmp_path, data_dir):
    from lalic_codec import loading, pipeline

    cfg = cfg_for(tmp_path, data_dir, steps=1, val_count=0)
    ckpt = tr.train(cfg)
    out = tr.export(ckpt, tmp_path / "w.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("g_a.0.weight").dtype == torch.float16
        assert f.get_tensor("latent_codec.hyper.entropy_bottleneck._quantized_cdf").dtype == torch.int32
        int8 = json.loads(meta["int8_rows"])  # the entropy model's large weights: int8, a scale per row
        assert int8 and all(re.match(tr.INT8_TENSORS, k) and f.get_tensor(k).dtype == torch.int8 for k in int8)
    assert meta["train_steps"] == "1" and json.loads(meta["config"])["groups"] == [4, 4, 8, 16]
    for kw, fmt in (({"int8": False}, "v3"), ({"fp16": False}, "v3")):  # fp16 (or float32) everywhere
        with safe_open(str(tr.export(ckpt, tmp_path / "other.safetensors", **kw)), "pt") as f:
            assert "int8_rows" not in f.metadata() and f.metadata()["format"] == f"lalic-codec weights {fmt}"
            assert f.get_tensor(next(iter(int8))).dtype == (torch.float16 if "int8" in kw else torch.float32)
    lm = loading.load_model("x", out, "cpu")
    assert lm.variable_rate and lm.model.scale_path is not None
    res = pipeline.encode_image(Image.fromarray(natural_image(64, 64)), lm, 3)
    assert pipeline.decode_bytes(res.data, out, "cpu").image.size == (64, 64)


def test_integer_scale_path_moves_at_normal_learning_rates():
    # regression: with parameters in integer units, Adam's 1e-4..1e-3 steps never crossed a
    # rounding boundary and the scale path stayed frozen at its initial table index
    from lalic_codec.models.lalic import VariableRateLALIC

    torch.manual_seed(0)
    m = VariableRateLALIC(**TINY, int_scale=True)
    m.update(force=True)
    _, scale_p, _ = tr.split_params(m)
    layers = [mod for mod in m.scale_path.modules() if hasattr(mod, "int_weight")]
    before = [layer.int_weight().detach().clone() for layer in layers]
    opt = torch.optim.Adam(scale_p, lr=2e-4 * tr.TrainConfig().scale_path_lr_mult)
    x = torch.rand(2, 3, 64, 64)
    for _ in range(3):
        out = m(x, quality=torch.tensor([2.0, 7.0]))
        bpp, _ = tr.rd_terms(out, x)
        opt.zero_grad()
        bpp.mean().backward()
        opt.step()
    changed = sum((layer.int_weight() != b).sum().item() for layer, b in zip(layers, before))
    total = sum(b.numel() for b in before)
    assert changed > 0.01 * total


def test_param_groups_and_optimizer_state_remapped_by_name():
    from lalic_codec.models.lalic import VariableRateLALIC

    torch.manual_seed(0)
    m = VariableRateLALIC(**TINY, int_scale=True)
    cfg = tr.TrainConfig()
    groups = tr.param_groups(m, cfg)
    by_kind = {g["lr_mult"]: g for g in groups}
    assert by_kind[cfg.scale_path_bias_lr_mult]["names"] and all(n.endswith(".bias") for n in by_kind[cfg.scale_path_bias_lr_mult]["names"])
    assert "log_gain" in [n for g in groups for n in g["names"]]
    assert sum(len(g["params"]) for g in groups) == sum(1 for n, p in m.named_parameters() if p.requires_grad and not n.endswith("quantiles"))
    # a checkpoint from before the named groups (network, scale path) resumes with its Adam state
    main_p, scale_p, _ = tr.split_params(m)
    legacy = torch.optim.Adam([{"params": main_p}, {"params": scale_p}], lr=1e-3)
    for p in main_p + scale_p:
        p.grad = torch.randn_like(p)
    legacy.step()
    opt = torch.optim.Adam(groups, lr=1e-3)
    tr._load_optimizer(opt, legacy.state_dict(), groups, m)
    bias = m.scale_path.heads[0][-1].bias
    assert torch.equal(opt.state[bias]["exp_avg"], legacy.state[bias]["exp_avg"])
    assert torch.equal(opt.state[m.log_gain]["exp_avg_sq"], legacy.state[m.log_gain]["exp_avg_sq"])


def test_lr_mult_scales_or_freezes_parameters_by_name(tmp_path, data_dir):
    """`--lr-mult PATTERN=K`: new layers can learn faster than the trained rest, or alone (K = 0
    freezes); the setting is saved with the run and the Adam state follows the parameters."""
    from click.testing import CliRunner

    ckpt = tr.train(cfg_for(tmp_path / "a", data_dir, steps=1, val_count=0))
    start = torch.load(ckpt, weights_only=True)["model"]
    res = CliRunner().invoke(tr.cli, ["run", "--resume", str(ckpt), "--steps", "3", "--lr-mult", ".=0", "--lr-mult", r"^g_s\.=10"])
    assert res.exit_code == 0 and "M values frozen" in res.output, res.output
    after = torch.load(ckpt, weights_only=True)
    assert after["step"] == 3 and [tuple(v) for v in after["config"]["lr_mults"]] == [(".", 0.0), (r"^g_s\.", 10.0)]
    for k in ("g_a.0.weight", "log_gain", "scale_path.heads.0.1.bias", "latent_codec.hyper.h_s.0.weight"):
        assert torch.equal(start[k], after["model"][k]), k
    assert not torch.equal(start["g_s.0.weight"], after["model"]["g_s.0.weight"])
    groups = after["optimizer"]["param_groups"]
    assert len(groups) == 1 and groups[0]["lr_mult"] == 10.0 and all(n.startswith("g_s.") for n in groups[0]["names"])
    cfg = tr.TrainConfig(**after["config"])  # the log shows the base rate, whichever group comes first
    logged = [json.loads(line) for line in open(tmp_path / "a" / "run" / "log.jsonl")]
    assert [(r["step"], r["lr"]) for r in logged if r["type"] == "train"][-1] == (3, cfg.lr * tr.lr_factor(2, cfg))
    assert tr.lr_mult_of("g_s.3.c1.weight", tr.TrainConfig(lr_mults=((r"\.c[12]\.", 10.0), ("^g_s", 2.0)))) == 2.0
    for bad in ("g_s", "(=1", "g_s=-1", "=2", "g_s=x"):
        res = CliRunner().invoke(tr.cli, ["run", "--resume", str(ckpt), "--lr-mult", bad])
        assert res.exit_code == 2 and "PATTERN=K" in res.output, (bad, res.output)


def test_next_round_starts_from_shipped_weights(tmp_path, data_dir):
    """`codec train run --init-from WEIGHTS`: the shipped fp16 weights are the starting point
    (not the KLT start), and training goes on from them."""
    first = tr.train(cfg_for(tmp_path / "a", data_dir, steps=2, val_count=0))
    shipped = tr.export(first, tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(shipped))
    tr.train(cfg_for(tmp_path / "b", data_dir, steps=0, val_count=0, init_from=str(shipped)))
    start = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)["model"]
    for k in ("g_a.0.weight", "log_gain", "scale_path.heads.0.1.bias", "latent_codec.hyper.entropy_bottleneck.quantiles"):
        assert torch.equal(start[k], sd[k].float()), k
    tr.train(cfg_for(tmp_path / "b", data_dir, steps=2, val_count=0), resume=str(tmp_path / "b" / "run" / "checkpoint.pt"))
    after = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    assert after["step"] == 2 and not torch.equal(after["model"]["g_a.0.weight"], start["g_a.0.weight"])


def test_fit_int_path_changes_only_the_path_and_never_worsens_held_out_rate(tmp_path, data_dir):
    from click.testing import CliRunner

    cfg = cfg_for(tmp_path, data_dir, steps=2, holdout=2)
    ckpt = tr.train(cfg)
    before = torch.load(ckpt, weights_only=True)
    out = tmp_path / "fit.pt"
    res = CliRunner().invoke(tr.cli, ["fit-int-path", str(ckpt), "--out", str(out), "--cpu-minutes", "0.05", "--batches", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    after = torch.load(out, weights_only=True)
    fit = after["int_path_fits"][-1]
    assert fit["steps"] > 0 and fit["held_out_bpp"] <= fit["held_out_bpp_start"]
    changed = {k for k in before["model"] if not torch.equal(before["model"][k], after["model"][k])}
    assert changed and all(k.startswith("scale_path.") for k in changed)
    assert after["totals"]["cpu_seconds"] > before["totals"]["cpu_seconds"]
    # a fresh v2 path: the checkpoint's architecture follows, and training resumes from it
    res = CliRunner().invoke(tr.cli, ["fit-int-path", str(ckpt), "--out", str(out), "--cpu-minutes", "0.05", "--batches", "2", "--layout", "v2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    v2 = torch.load(out, weights_only=True)
    assert v2["config"]["arch"]["int_scale"]["signed"] is True
    assert "scale_path.heads.0.2.weight" in v2["model"]
    tr.train(cfg_for(tmp_path, data_dir, steps=3, holdout=2), resume=str(out))


@pytest.mark.parametrize("args", [["train", "-h"], ["train", "run", "-h"], ["train", "export", "-h"], ["train", "fit-int-path", "-h"], ["train", "fit-tables", "-h"]])
def test_train_help_with_short_option(args):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lalic_codec.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("Usage:"), r.stderr


@pytest.mark.parametrize("case", ["missing", "text", "state-dict"])
def test_export_of_a_missing_or_non_checkpoint_file_is_one_line_and_exit_status_5(tmp_path, case):
    """README "Exit status": 5 for missing weights or a file that is no checkpoint; one line, no traceback."""
    import subprocess
    import sys

    src = tmp_path / "run.pt"
    if case == "text":
        src.write_text("not a checkpoint\n")
    elif case == "state-dict":  # weights alone, as torch.save(model.state_dict()) writes: no training state
        torch.save({"w": torch.zeros(2)}, src)
    out = tmp_path / "w.safetensors"
    r = subprocess.run([sys.executable, "-m", "lalic_codec.cli", "train", "export", str(src), str(out)], capture_output=True, text=True)
    assert r.returncode == 5, r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("codec: error: "), r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_cli_resume_continues_with_the_saved_settings_in_the_same_folder(tmp_path, data_dir):
    """`codec train run --resume C` continues the run with the settings it was saved with, in its
    own folder (not with the command's defaults: batch 8, lr 1e-4, 100,000 steps, written to
    runs/default); only the options given change."""
    from click.testing import CliRunner

    tr.train(cfg_for(tmp_path / "a", data_dir, lr=3e-4))
    straight = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)
    tr.train(cfg_for(tmp_path / "b", data_dir, steps=2, lr=3e-4))
    ckpt = tmp_path / "b" / "run" / "checkpoint.pt"
    res = CliRunner().invoke(tr.cli, ["run", "--resume", str(ckpt), "--steps", "4"])
    assert res.exit_code == 0, res.output
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["step"] == straight["step"] == 4
    assert resumed["config"]["batch"] == 2 and resumed["config"]["lr"] == 3e-4
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    log = [json.loads(line) for line in open(tmp_path / "b" / "run" / "log.jsonl")]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]  # written beside the checkpoint
    # nothing given: the run is complete at its saved 4 steps, so nothing more is trained
    res = CliRunner().invoke(tr.cli, ["run", "--resume", str(ckpt)])
    assert res.exit_code == 0 and torch.load(ckpt, weights_only=True)["step"] == 4, res.output
    # an option given on the command line changes that setting only
    res = CliRunner().invoke(tr.cli, ["run", "--resume", str(ckpt), "--steps", "5"])
    assert res.exit_code == 0, res.output
    again = torch.load(ckpt, weights_only=True)
    assert again["step"] == 5 and again["config"]["steps"] == 5 and again["config"]["crop"] == 64
    bad = CliRunner().invoke(tr.cli, ["run", "--resume", str(tmp_path / "nothing.pt")])
    assert bad.exit_code == 5 and len(bad.output.strip().splitlines()) == 1, bad.output


def test_cli_resume_with_other_procs_shares_the_cores_unless_threads_are_given(tmp_path, data_dir, monkeypatch):
    """The saved thread count was for the saved number of processes: `--procs` given alone goes
    back to sharing the cores out (`--threads 0`); given beside it, `--threads` holds."""
    from click.testing import CliRunner

    ckpt = tr.train(cfg_for(tmp_path, data_dir, steps=0, threads=2))
    seen = []
    monkeypatch.setattr(tr, "train", lambda cfg, resume, max_seconds: seen.append(cfg) or ckpt)
    for args in ([], ["--procs", "2", "--accum", "2"], ["--procs", "2", "--accum", "2", "--threads", "1"]):
        res = CliRunner().invoke(tr.cli, ["run", "--resume", str(ckpt), *args])
        assert res.exit_code == 0, res.output
    assert [(c.procs, c.threads) for c in seen] == [(1, 2), (2, 0), (2, 1)]
    assert tr._threads(seen[1]) == max(1, tr.available_cores() // 2)


def test_moving_average_of_the_weights(tmp_path, data_dir, capsys):
    """--ema-half-life H: after each step avg += (1 - d) (w - avg), d = 2^(-1/H), starting at the
    first weights; it resumes exactly, is validated beside the weights and exported with --ema."""
    first = tr.train(cfg_for(tmp_path / "a", data_dir, steps=0, val_count=0))
    w0 = torch.load(first, weights_only=True)["model"]
    init = tr.export(first, tmp_path / "w0.safetensors", fp16=False)
    tr.train(cfg_for(tmp_path / "b", data_dir, steps=1, val_count=0, init_from=str(init), ema_half_life=3))
    one = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    d = 2 ** (-1 / 3)
    for k in ("g_a.0.weight", "log_gain", "scale_path.heads.0.1.bias"):
        expected = d * w0[k] + (1 - d) * one["model"][k]
        assert not torch.equal(one["model"][k], w0[k]) and torch.allclose(one["ema"][k], expected, atol=1e-6), k

    straight = tr.train(cfg_for(tmp_path / "c", data_dir, steps=4, init_from=str(init), ema_half_life=3))
    tr.train(cfg_for(tmp_path / "d", data_dir, steps=2, init_from=str(init), ema_half_life=3))
    resumed = tr.train(cfg_for(tmp_path / "d", data_dir, steps=4, ema_half_life=3), resume=str(tmp_path / "d" / "run" / "checkpoint.pt"))
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert a["ema"].keys() == b["ema"].keys() and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    # a checkpoint without an average, or with one of other parameters: the average starts at the
    # weights, and the message says which
    for name, ema in (("e", None), ("f", {"renamed.weight": torch.zeros(1)})):
        ckpt = tmp_path / name / "run" / "checkpoint.pt"
        tr.train(cfg_for(tmp_path / name, data_dir, steps=1, val_count=0, init_from=str(init)))
        st = torch.load(ckpt, weights_only=True)
        if ema is not None:
            st["ema"] = ema
            torch.save(st, ckpt)
        capsys.readouterr()
        again = torch.load(tr.train(cfg_for(tmp_path / name, data_dir, steps=2, val_count=0, ema_half_life=3), resume=str(ckpt)), weights_only=True)
        why = "no average of these weights" if ema is None else "an average of other parameters"
        assert f"the checkpoint holds {why}; it starts at them" in capsys.readouterr().err
        assert "g_a.0.weight" in again["ema"] and "renamed.weight" not in again["ema"]
    log = [json.loads(line) for line in open(tmp_path / "c" / "run" / "log.jsonl")]
    val, val_ema = ([r for r in log if r["type"] == t] for t in ("val", "val_ema"))
    assert [r["step"] for r in val] == [r["step"] for r in val_ema] == [2, 4] and val[-1]["q4"] != val_ema[-1]["q4"]
    # keeping and validating the average leaves the training itself exactly as it is without it
    plain = torch.load(tr.train(cfg_for(tmp_path / "e", data_dir, steps=4, init_from=str(init))), weights_only=True)
    assert "ema" not in plain and all(torch.equal(a["model"][k], plain["model"][k]) for k in a["model"])

    out = tr.export(straight, tmp_path / "ema.safetensors", fp16=False, ema=True)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("g_a.0.weight"), a["ema"]["g_a.0.weight"])
        assert f.metadata()["train_weights"] == "moving average, half-life 3 steps"
    from lalic_codec.errors import ModelError

    with pytest.raises(ModelError, match="no moving average"):
        tr.export(first, tmp_path / "x.safetensors", ema=True)


def test_a_stop_signal_abandons_validation_and_a_second_one_is_answered(tmp_path, data_dir, monkeypatch, capsys):
    """Ctrl-C while the run validates (the bundled model's 24 images x 3 qualities, twice with a
    moving average, take about a minute) stops it at once: the run saves and stops without the
    rest of the validation, and a second Ctrl-C says the state is being saved instead of nothing."""
    import signal

    from lalic_codec.errors import Interrupted

    calls = []
    real = tr.centre_crop

    def crop(f, size):
        calls.append(f)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(f, size)

    monkeypatch.setattr(tr, "centre_crop", crop)
    # the handler the run must put back: Python's default, or SIG_IGN where pytest was started as
    # a background job of a non-interactive shell (which starts it with SIGINT ignored)
    before = signal.getsignal(signal.SIGINT)
    cfg = cfg_for(tmp_path, data_dir, steps=10, val_every=2, ema_half_life=3, val_qualities=(1, 4, 8))
    with pytest.raises(Interrupted, match="SIGINT: training stopped at step 2;"):
        tr.train(cfg)
    assert len(calls) == 1  # not 3 qualities x (live + average)
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in log] == ["train", "train"]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    err = capsys.readouterr().err
    assert "SIGINT: stopping after this step" in err and "already stopping" in err
    assert signal.getsignal(signal.SIGINT) == before


@pytest.mark.parametrize("sig, procs", [("SIGINT", 1), ("SIGTERM", 1), ("SIGTERM", 2)])
def test_a_signal_to_the_whole_process_group_stops_the_run_cleanly(tmp_path, data_dir, sig, procs):
    """Ctrl-C reaches every process of the terminal's foreground group, DataLoader workers included
    (as does ``kill -TERM -PGID``): the run still ends its step, saves its state and exits 130 with
    one line saying how to continue, instead of failing on a worker the signal killed (exit 1).
    With ``--procs 2`` the helper process stops with it, after the same step, and none is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tiny = tr.export(tr.train(cfg_for(tmp_path / "a", data_dir, steps=0, val_count=0)), tmp_path / "tiny.safetensors", fp16=False)
    run = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "lalic_codec.cli", "train", "run", "--init-from", str(tiny), "--data", str(data_dir), "--holdout", "1",
         "--val-count", "0", "--batch", "2", "--crop", "64", "--workers", "1", "--threads", "1", "--compile", "off",
         "--log-every", "1", "--ckpt-every", "100000", "--steps", "100000", "--out", str(run), "--procs", str(procs), "--accum", str(procs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if (run / "log.jsonl").exists() and len((run / "log.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1]
        os.killpg(p.pid, getattr(signal, sig))
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert p.returncode == 130, err
    assert "internal error" not in err and "codec: error" not in err
    assert f"codec: interrupted: {sig}: training stopped at step {saved['step']}; its state is saved in" in err
    assert saved["step"] >= 2 and f"codec train run --resume {run / 'checkpoint.pt'}" in err
    deadline = time.time() + 30
    while time.time() < deadline:  # nothing of the run is left: helpers and data workers are gone
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("processes of the stopped run are still alive")


def test_the_processes_of_a_data_parallel_run_share_out_each_steps_batches():
    files = 7
    whole = list(zip(range(36), tr.StepSampler(files, seed=4, start=5)))
    parts = [list(zip(range(18), tr.StepSampler(files, seed=4, start=5, share=(3, 2, r, 2)))) for r in range(2)]
    items = [x for _, x in whole]
    # per step of 2 batches of 3: batch 0 to process 0, batch 1 to process 1
    assert [x for _, x in parts[0]] == [x for i, x in enumerate(items) if (i // 3) % 2 == 0]
    assert [x for _, x in parts[1]] == [x for i, x in enumerate(items) if (i // 3) % 2 == 1]


def test_two_training_processes_compute_what_one_process_does(tmp_path, data_dir):
    """``--procs 2``: each process codes one of the step's two batches and the gradients are summed,
    so the weights, the optimizer's state, the moving average and the log's figures are those of
    one process coding both batches in turn (the same thread count in each: bit for bit)."""
    kw = dict(steps=3, batch=1, accum=2, threads=1, ema_half_life=2, val_every=0, ckpt_every=2)
    one = torch.load(tr.train(cfg_for(tmp_path / "one", data_dir, **kw)), weights_only=True)
    two = torch.load(tr.train(cfg_for(tmp_path / "two", data_dir, procs=2, **kw)), weights_only=True)
    assert one["step"] == two["step"] == 3 and one["samples"] == two["samples"] == 6
    for part in ("model", "ema"):
        for k, v in one[part].items():
            assert torch.equal(v, two[part][k]), (part, k)
    moments = lambda st: [t for s in st["optimizer"]["state"].values() for t in s.values() if t.dim()]
    assert all(torch.equal(a, b) for a, b in zip(moments(one), moments(two)))
    assert one["totals"]["pixels"] == two["totals"]["pixels"] and two["totals"]["cpu_seconds"] > 0
    logs = [[json.loads(line) for line in open(tmp_path / run / "run" / "log.jsonl")] for run in ("one", "two")]
    for a, b in zip(*logs):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["bpp"] == pytest.approx(b["bpp"], rel=1e-5)
    assert len(logs[0]) == len(logs[1]) == 3


def test_procs_must_divide_the_batches_of_a_step(tmp_path, data_dir):
    with pytest.raises(click.ClickException, match="--procs 2: it must divide --accum"):
        tr.train(cfg_for(tmp_path, data_dir, procs=2, accum=3))


def _subnormal_survives() -> bool:
    """Whether this thread computes subnormal floats (1e-39 times 1 stays 1e-39) or flushes them."""
    return bool((torch.tensor([1e-39]) * 1.0).item() != 0.0)


def test_training_flushes_subnormal_floats_and_restores_plain_computation_after(tmp_path, data_dir, monkeypatch):
    """Subnormal floats made the latent residual prediction's backward passes 10-50x slower on
    x86: a run computes with them flushed to zero, in its own process and in its helpers, and the
    calling thread gets plain computation back when the run ends."""
    seen = []
    monkeypatch.setattr(tr, "_train", lambda cfg, resume, max_seconds, **kw: seen.append(_subnormal_survives()) or tmp_path)
    assert _subnormal_survives()
    tr.train(cfg_for(tmp_path, data_dir, steps=1))
    tr._helper(1, str(tmp_path / "store"), cfg_for(tmp_path, data_dir, steps=1), None)
    assert seen == [False, False]
    assert _subnormal_survives()


def test_threads_started_while_subnormals_are_flushed_flush_them_too():
    """The setting is per thread and threads inherit it when created: a fresh process that enters
    ``denormals_flushed`` before its first parallel operation flushes in every thread of the pool."""
    import subprocess
    import sys

    code = (
        "import numpy as np, torch\n"
        "from lalic_codec._runtime import denormals_flushed\n"
        "torch.set_num_threads(2)\n"
        "x = torch.from_numpy(np.full(1 << 20, 1e-39, np.float32))\n"  # no torch operation yet
        "with denormals_flushed():\n"
        "    print(int(((x * 1.0) != 0).sum()), end=' ')\n"  # parallel: both threads' halves
        "print(int((x[:1] * 1.0).item() != 0))\n"  # this thread, after the block
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1"]


def test_fit_tables_refits_only_y_tables_and_files_decode_with_the_fitted_weights(tmp_path, data_dir):
    from click.testing import CliRunner
    from safetensors import safe_open

    from lalic_codec import loading, pipeline
    from lalic_codec.errors import CodecError

    ckpt = tr.train(cfg_for(tmp_path, data_dir, steps=1, val_count=0, holdout=2))
    src, out = tr.export(ckpt, tmp_path / "w.safetensors"), tmp_path / "fit.safetensors"
    args = ["fit-tables", str(src), str(out), "--data", str(data_dir), "--holdout", "2", "--crop", "64", "--qualities", "1,8", "--threads", "1"]
    res = CliRunner().invoke(tr.cli, args)
    assert res.exit_code == 0, res.output
    before, after = (float(v.replace(",", "")) for v in re.search(r"([\d,.]+) -> ([\d,.]+) kB", res.output).groups())
    assert after < before  # the counted symbols cost less under tables fitted to them
    with safe_open(str(src), "pt") as a, safe_open(str(out), "pt") as b:
        assert a.keys() == b.keys()
        changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
        meta_a, meta_b = a.metadata(), b.metadata()
    assert len(changed) == 1 and changed[0].endswith("gaussian_conditional._quantized_cdf")
    note = json.loads(meta_b.pop("y_tables"))
    assert meta_a == meta_b and note["images"] == 3 and note["qualities"] == [1.0, 8.0]  # small.jpg is under 64 pixels
    old, new = (loading.load_model("x", w, "cpu") for w in (src, out))
    assert old.fingerprint != new.fingerprint
    t0, t1 = old.model.gaussian_conditionals()[0].tables(), new.model.gaussian_conditionals()[0].tables()
    t1.validate()
    assert np.array_equal(t0.cdf_length, t1.cdf_length) and np.array_equal(t0.offset, t1.offset)
    assert all(gc.tables() is t1 or np.array_equal(gc.tables().quantized_cdf, t1.quantized_cdf) for gc in new.model.gaussian_conditionals())
    img = Image.fromarray(natural_image(96, 80, seed=3))
    data = pipeline.encode_image(img, new, 2).data
    assert pipeline.decode_bytes(data, out, "cpu").image.size == (80, 96)
    with pytest.raises(CodecError, match="weights"):
        pipeline.decode_bytes(data, src, "cpu")
    res = CliRunner().invoke(tr.cli, args[:3] + ["--qualities", "0,9"])
    assert res.exit_code == 2 and "qualities from 1 to 8" in res.output
    res = CliRunner().invoke(tr.cli, ["fit-tables", str(ckpt), str(tmp_path / "x.safetensors"), "--data", str(data_dir), "--holdout", "2", "--crop", "64"])
    assert res.exit_code == 1 and "reads and writes .safetensors" in res.output and not (tmp_path / "x.safetensors").exists()
