"""`codec train reshape`: architecture changes that keep what a model has learnt."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TINY
from lalic_codec import train as tr
from lalic_codec.models.lalic import VariableRateLALIC
from lalic_codec.reshape import ladder, model_kwargs, regain, reshape
from test_train import cfg_for, data_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def trained_like():
    """A tiny model with random (not identity) blocks, as training leaves them."""
    torch.manual_seed(3)
    m = VariableRateLALIC(**TINY, int_scale=True, ctx_hidden_rate=4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("gamma1", "gamma2")):
                p.uniform_(0.5, 1.5)
    m.update(force=True)
    return m


def _run(model, x, q):
    model.eval()
    with torch.no_grad():
        out = model(x, quality=torch.tensor([q]))
    return out["x_hat"], torch.cat([lik.flatten() for lik in out["likelihoods"].values()])


def _assert_same_function(model, reshaped, x):
    """The reshaped model reconstructs and prices ``x`` as the model did, at two qualities."""
    for q in (1.0, 3.5):
        a, la = _run(model, x, q)
        b, lb = _run(reshaped, x, q)
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(la, lb, atol=1e-6)


def _load(sd):
    m = VariableRateLALIC(**model_kwargs(sd), lambdas=tuple(sd["lambdas"].tolist()))
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("h_a.", "h_s.")) for k in missing)
    return m


def test_deeper_transforms_compute_exactly_what_the_model_computed(trained_like):
    sd, arch = reshape(trained_like.state_dict(), depths=(1, 2, 1, 2))
    assert arch["depths"] == (1, 2, 1, 2) and model_kwargs(sd)["depths"] == (1, 2, 1, 2)
    deeper = _load(sd)
    assert sum(p.numel() for p in deeper.parameters()) > sum(p.numel() for p in trained_like.parameters())
    x = torch.rand(1, 3, 64, 64)
    _assert_same_function(trained_like, deeper, x)
    # the old blocks keep their place in their level; the new ones come last, as identities
    # g_a (0, 1, 1) -> (1, 2, 1): conv, [new], conv, old, [new], conv, old, conv
    src = trained_like.state_dict()
    assert torch.equal(sd["g_a.2.weight"], src["g_a.1.weight"]) and torch.equal(sd["g_a.7.weight"], src["g_a.5.weight"])
    assert torch.equal(sd["g_a.3.gamma1"], src["g_a.2.gamma1"])
    assert torch.equal(sd["g_a.6.att.key.weight"], src["g_a.4.att.key.weight"])
    for new_block in ("g_a.1", "g_a.4"):
        assert not sd[new_block + ".gamma1"].any() and not sd[new_block + ".gamma2"].any()


def test_residual_units_compute_exactly_what_the_model_computed(trained_like):
    sd, arch = reshape(trained_like.state_dict(), units=(1, 2))
    assert arch["units"] == (1, 2) and model_kwargs(sd)["units"] == (1, 2)
    with_units = _load(sd)
    assert with_units.config.to_dict()["units"] == [1, 2] and "units" not in trained_like.config.to_dict()
    x = torch.rand(1, 3, 64, 64)
    _assert_same_function(trained_like, with_units, x)
    # g_a (0, 1, 1): conv, [unit], conv, block, conv, block, conv; g_s: ..., conv, [unit, unit], conv
    src = trained_like.state_dict()
    assert torch.equal(sd["g_a.2.weight"], src["g_a.1.weight"]) and torch.equal(sd["g_a.6.weight"], src["g_a.5.weight"])
    assert torch.equal(sd["g_a.3.gamma1"], src["g_a.2.gamma1"])
    assert torch.equal(sd["g_s.7.weight"], src["g_s.5.weight"])
    for unit in ("g_a.1", "g_s.5", "g_s.6"):
        assert sd[unit + ".c1.weight"].abs().sum() > 0 and not sd[unit + ".c2.weight"].any() and not sd[unit + ".c2.bias"].any()
    # a trained unit keeps its place when a block joins its level and another unit follows it
    with torch.no_grad():
        with_units.g_a[1].c2.weight.uniform_(-0.1, 0.1)
    again, arch = reshape(with_units.state_dict(), depths=(1, 1, 1, 1), units=(2, 2))
    assert arch["units"] == (2, 2) and arch["depths"] == (1, 1, 1, 1)
    # g_a: conv, [block], unit, [unit], conv, ...
    assert torch.equal(again["g_a.2.c2.weight"], with_units.g_a[1].c2.weight) and not again["g_a.1.gamma1"].any()
    assert not again["g_a.3.c2.weight"].any()
    _assert_same_function(with_units, _load(again), x)


def test_latent_residual_prediction_starts_as_the_identity_and_decodes_what_the_encoder_reconstructed(trained_like):
    sd, arch = reshape(trained_like.state_dict(), lrp=16)
    assert arch["lrp"] == 16 and model_kwargs(sd)["lrp"] == 16
    with_lrp = _load(sd)
    assert with_lrp.config.to_dict()["lrp"] == 16 and "lrp" not in trained_like.config.to_dict()
    groups = TINY["groups"]
    for k, g in enumerate(groups):  # the support: channel context (2 g) after group 0, then the side parameters
        c1 = sd[f"latent_codec.y.residual_prediction.y{k}.c1.weight"]
        assert c1.shape == (16, (k > 0) * 2 * g + TINY["M"] + g, 3, 3) and c1.abs().sum() > 0
        assert not sd[f"latent_codec.y.residual_prediction.y{k}.c2.weight"].any()
    x = torch.rand(1, 3, 64, 64)
    _assert_same_function(trained_like, with_lrp, x)
    # trained (non-zero) predictions: they move the latent by less than half a step, the symbols'
    # tables do not move (integer scale path), and the decoder gets the encoder's reconstruction
    with torch.no_grad():
        for k in range(len(groups)):
            with_lrp.latent_codec.y.residual_prediction[f"y{k}"].c2.weight.uniform_(-0.2, 0.2)
    with_lrp.eval()
    trained_like.eval()
    plain, refined = trained_like.compress(x, quality=2.0), with_lrp.compress(x, quality=2.0)
    assert len(refined.streams) == len(plain.streams) and refined.streams[:3] == plain.streams[:3]  # z, then group 0
    assert float((refined.y_hat - plain.y_hat).abs().max()) > 0
    lrp3 = with_lrp.latent_codec.y.residual_prediction["y3"]
    with torch.no_grad():
        support, y_q = torch.randn(1, lrp3.c1.in_channels - 16, 4, 4) * 50, torch.randn(1, 16, 4, 4)
        moved = (lrp3(support, y_q) - y_q).abs()
    assert 0.4 < float(moved.max()) <= 0.5 + 1e-6  # at most half a quantisation step, even for large inputs
    out = with_lrp.decompress(refined.streams, refined.z_shape, quality=2.0)
    assert torch.equal(out["y_hat"], refined.y_hat)
    # a wider latent keeps the trained predictions, and the new group's starts as the identity
    wide, arch = reshape(with_lrp.state_dict(), latent=TINY["M"] + 16)
    k = len(groups)
    assert arch["lrp"] == 16 and not wide[f"latent_codec.y.residual_prediction.y{k}.c2.weight"].any()
    assert torch.equal(wide["latent_codec.y.residual_prediction.y1.c2.weight"], with_lrp.latent_codec.y.residual_prediction["y1"].c2.weight)
    with pytest.raises(ValueError, match="already"):
        reshape(with_lrp.state_dict(), lrp=8)


def test_leaner_channel_context_keeps_the_strongest_units(trained_like):
    src = trained_like.state_dict()
    sd, arch = reshape(src, ctx_hidden_rate=1)
    M = TINY["M"]
    key = "latent_codec.y.channel_context.y1.1.ffn.key.weight"
    assert sd[key].shape == (M, M) and src[key].shape == (4 * M, M)
    assert model_kwargs(sd)["ctx_hidden_rate"] == 1
    strength = src[key].square().sum(1) * src[key.replace("key", "value")].norm(dim=0)
    kept = {tuple(r.tolist()) for r in sd[key]}
    assert {tuple(src[key][i].tolist()) for i in strength.topk(M).indices} == kept
    smaller = _load(sd)
    x_hat, lik = _run(smaller, torch.rand(1, 3, 64, 64), 2.0)
    assert torch.isfinite(x_hat).all() and (lik > 0).all()
    assert torch.equal(sd["g_s.0.weight"], src["g_s.0.weight"])  # the rest is untouched


def test_leaner_parameter_networks_keep_the_strongest_units(trained_like):
    src = trained_like.state_dict()
    sd, arch = reshape(src, param_hidden_rate=1)
    assert arch["param_hidden_rate"] == 1 and model_kwargs(sd)["param_hidden_rate"] == 1
    for k in range(len(TINY["groups"])):
        for i in (0, 2, 4):
            p = f"latent_codec.y.latent_codec.y{k}.entropy_parameters.{i}."
            out = src[p + "mix.weight"].shape[0]
            key, value = src[p + "key.weight"], src[p + "value.weight"]
            assert key.shape[0] == 2 * out and sd[p + "key.weight"].shape == (out, key.shape[1])
            keep = (key.square().sum(1) * value.norm(dim=0)).topk(out).indices.sort().values
            assert torch.equal(sd[p + "key.weight"], key[keep]) and torch.equal(sd[p + "value.weight"], value[:, keep])
    smaller = _load(sd)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in trained_like.parameters())
    x_hat, lik = _run(smaller, torch.rand(1, 3, 64, 64), 2.0)
    assert torch.isfinite(x_hat).all() and (lik > 0).all()


def test_new_ladder_carries_each_channels_gain_over_in_log_lambda(trained_like):
    src = trained_like.state_dict()
    old = src["lambdas"].tolist()
    # the same ladder: nothing changes
    same, _ = reshape(src, lambdas=old)
    assert torch.allclose(same["log_gain"], src["log_gain"], atol=1e-6)
    # levels halfway (in log lambda) between old ones, and one level past each end
    x = torch.log(torch.tensor(old, dtype=torch.float64))
    mid = torch.exp((x[:-1] + x[1:]) / 2)
    step = x[1] - x[0]
    new = [float(torch.exp(x[0] - step))] + mid.tolist()[: len(old) - 2] + [float(torch.exp(x[-1] + step))]
    sd, _ = reshape(src, lambdas=new)
    assert sd["lambdas"].tolist() == pytest.approx(new)
    for k in ("log_gain", "log_inv_gain"):
        t = src[k].double()
        assert torch.allclose(sd[k][1:-1].double(), (t[:-2] + t[1:-1])[: len(old) - 2] / 2, atol=1e-5)
        # beyond the ends: the channel's least-squares slope, so a perfectly linear table stays linear
        xc = x - x.mean()
        slope = (xc[:, None] * (t - t.mean(0))).sum(0) / xc.square().sum()
        assert torch.allclose(sd[k][0].double(), t[0] - slope * step, atol=1e-5)
        assert torch.allclose(sd[k][-1].double(), t[-1] + slope * step, atol=1e-5)
    line = 0.5 * x[:, None] + torch.arange(3, dtype=torch.float64)
    wider = torch.tensor(ladder(1e-4, 1.0, levels=len(old)), dtype=torch.float64)
    assert torch.allclose(regain(line, old, wider), 0.5 * torch.log(wider)[:, None] + torch.arange(3), atol=1e-9)
    # the reshaped model codes with the new trade-offs: more rate at its top level
    m = _load(sd)
    assert torch.allclose(m.lambda_for(len(old)), torch.tensor([new[-1]], dtype=torch.float32))
    assert ladder(0.0005, 0.16)[0] == 0.0005 and ladder(0.0005, 0.16)[-1] == 0.16


def test_wider_latent_keeps_the_reconstruction_and_adds_one_group(trained_like):
    src = trained_like.state_dict()
    M = TINY["M"]
    sd, arch = reshape(src, latent=M + 16)
    assert arch["M"] == M + 16 and arch["dims"][3] == M + 16 and arch["groups"] == TINY["groups"] + (16,) and arch["side_width"] == M
    # the architecture is read back from the shapes: the entropy model keeps its width
    assert model_kwargs(sd)["side_width"] == M and model_kwargs(sd)["groups"] == arch["groups"]
    wide = _load(sd)
    assert wide.config.to_dict()["side_width"] == M and "side_width" not in trained_like.config.to_dict()
    x = torch.rand(1, 3, 64, 64)
    trained_like.eval()
    wide.eval()
    for q in (1.0, 3.5):
        with torch.no_grad():
            a, b = trained_like(x, quality=torch.tensor([q])), wide(x, quality=torch.tensor([q]))
        # reconstruction and z exactly the old model's; the old groups code at the old rates
        assert torch.equal(a["x_hat"], b["x_hat"]) and torch.equal(a["z"], b["z"])
        assert torch.allclose(b["likelihoods"]["y"][:, :M], a["likelihoods"]["y"], atol=1e-6)
        assert b["y"][:, M:].abs().sum() > 0  # the new channels carry something, so synthesis can learn them
    # the new channels start at the old channels' mean gain, and share the CDF tables
    assert torch.allclose(sd["log_gain"][:, M:], src["log_gain"].mean(1, keepdim=True).expand(-1, 16))
    gc = "latent_codec.y.latent_codec.y{}.y.gaussian_conditional._quantized_cdf"
    assert torch.equal(sd[gc.format(len(TINY["groups"]))], src[gc.format(0)])
    # and the widened model codes: one more group's streams, decoded to what the encoder reconstructed
    coded = wide.compress(x, quality=2.0)
    assert len(coded.streams) == len(trained_like.compress(x, quality=2.0).streams) + 2
    out = wide.decompress(coded.streams, coded.z_shape, quality=2.0)
    assert torch.equal(out["y_hat"], coded.y_hat)


@pytest.mark.parametrize("kw", [dict(depths=(0, 0, 1, 1)), dict(depths=(1, 1, 1)), dict(ctx_hidden_rate=5), dict(ctx_hidden_rate=0),
                                dict(lambdas=(0.1, 0.2)), dict(lambdas=tuple(range(8, 0, -1))), dict(latent=32), dict(latent=16),
                                dict(param_hidden_rate=3), dict(param_hidden_rate=0), dict(units=(1,)), dict(units=(1, 1, 1)),
                                dict(lrp=0)])
def test_reshape_refuses_what_would_lose_or_invent_structure(trained_like, kw):
    with pytest.raises(ValueError):
        reshape(trained_like.state_dict(), **kw)


def test_reshaped_file_starts_a_run_with_its_architecture(tmp_path, data_dir, trained_like):  # noqa: F811
    weights = tmp_path / "w.pt"
    torch.save({"model": trained_like.state_dict()}, weights)
    out = tmp_path / "deeper.pt"
    res = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(out), "--depths", "1,1,1,1", "--ctx-hidden-rate", "2"])
    assert res.exit_code == 0, res.output
    assert "M 32 (0, 1, 1, 1) x4/2 -> M 32 (1, 1, 1, 1) x2/2" in res.output
    units = tmp_path / "units.pt"
    res = CliRunner().invoke(tr.cli, ["reshape", str(out), str(units), "--units", "1,1"])
    assert res.exit_code == 0 and "M 32 (1, 1, 1, 1) units (0, 0) x2/2 -> M 32 (1, 1, 1, 1) units (1, 1) x2/2" in res.output, res.output
    for u in ("1", "a,b"):
        bad = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(tmp_path / "x.pt"), "--units", u])
        assert bad.exit_code == 1 and not (tmp_path / "x.pt").exists(), bad.output
    bad = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(tmp_path / "x.pt"), "--depths", "0,0,0,0"])
    assert bad.exit_code == 1 and "at least the current" in bad.output and not (tmp_path / "x.pt").exists()
    for lam in ("0.01", "0.1,0.01", "a,b"):
        bad = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(tmp_path / "x.pt"), "--lambdas", lam])
        assert bad.exit_code == 1 and "lambdas" in bad.output.lower() and not (tmp_path / "x.pt").exists(), bad.output
    # a wider latent from innovation components of the training crops, the new group a copy of the last
    res = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(tmp_path / "w48.pt"), "--latent", "48", "--latent-init", "pca",
                                      "--new-group", "last", "--data", str(data_dir), "--holdout", "1", "--crops", "12"])
    assert res.exit_code == 0 and "M 32 (0, 1, 1, 1) x4/2 -> M 48 (0, 1, 1, 1) x4/2" in res.output, res.output
    w48 = torch.load(tmp_path / "w48.pt", weights_only=True)["model"]
    assert w48["log_gain"].shape[1] == 48 and w48["g_a.5.bias"][32:].any()  # centred rows: a bias, unlike random ones
    bad = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(tmp_path / "x.pt"), "--latent-init", "pca"])
    assert bad.exit_code == 1 and "--latent" in bad.output and not (tmp_path / "x.pt").exists(), bad.output
    wide = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(tmp_path / "wide.pt"), "--lambdas", "0.001,0.1"])
    assert wide.exit_code == 0 and "lambdas 0.001, " in wide.output and ", 0.1; wrote" in wide.output, wide.output
    assert torch.load(tmp_path / "wide.pt", weights_only=True)["model"]["lambdas"][-1].item() == pytest.approx(0.1)
    # arch={}: the run takes the architecture of the weights it starts from
    ckpt = tr.train(cfg_for(tmp_path / "r", data_dir, steps=1, val_count=0, arch={}, init_from=str(out)))
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["arch"]["depths"] == (1, 1, 1, 1) and state["config"]["arch"]["ctx_hidden_rate"] == 2
    _, _, model = tr.model_from_checkpoint(ckpt)
    assert model.config.depths == (1, 1, 1, 1) and model.config.ctx_hidden_rate == 2
    # residual units train and export; the weights file loads with them
    ckpt = tr.train(cfg_for(tmp_path / "ru", data_dir, steps=1, val_count=0, arch={}, init_from=str(units)))
    assert torch.load(ckpt, weights_only=True)["config"]["arch"]["units"] == (1, 1)
    from lalic_codec.models.checkpoints import load_state_dict_file

    trained_units = VariableRateLALIC.from_state_dict(load_state_dict_file(tr.export(ckpt, tmp_path / "units.safetensors")))
    assert trained_units.config.units == (1, 1) and trained_units.g_s[-2].c2.weight.any()  # the step moved the new unit
    # a latent residual prediction trains and exports, in fp16 like the transforms (not int8)
    res = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(tmp_path / "lrp.pt"), "--lrp", "16"])
    assert res.exit_code == 0 and "M 32 (0, 1, 1, 1) x4/2 -> M 32 (0, 1, 1, 1) x4/2 lrp 16" in res.output, res.output
    ckpt = tr.train(cfg_for(tmp_path / "rl", data_dir, steps=1, val_count=0, arch={}, init_from=str(tmp_path / "lrp.pt"),
                            lr_mults=((r"residual_prediction\.", 10.0),)))
    assert torch.load(ckpt, weights_only=True)["config"]["arch"]["lrp"] == 16
    exported = tr.export(ckpt, tmp_path / "lrp.safetensors")
    from safetensors import safe_open

    with safe_open(exported, "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("latent_codec.y.latent_codec.") and k.endswith(":int8_row_scale") for k in keys)
    assert not any(k.startswith("latent_codec.y.residual_prediction.") and k.endswith(":int8_row_scale") for k in keys)
    trained_lrp = VariableRateLALIC.from_state_dict(load_state_dict_file(exported))
    assert trained_lrp.config.lrp == 16 and trained_lrp.latent_codec.y.residual_prediction["y3"].c2.weight.any()  # the step moved it
    # a wider latent trains and exports too; the weights file loads with its side width
    res = CliRunner().invoke(tr.cli, ["reshape", str(weights), str(tmp_path / "m48.pt"), "--latent", "48", "--param-hidden-rate", "1"])
    assert res.exit_code == 0 and "M 32 (0, 1, 1, 1) x4/2 -> M 48 (0, 1, 1, 1) x4/1" in res.output, res.output
    ckpt = tr.train(cfg_for(tmp_path / "r48", data_dir, steps=1, val_count=0, arch={}, init_from=str(tmp_path / "m48.pt")))
    arch = torch.load(ckpt, weights_only=True)["config"]["arch"]
    assert arch["side_width"] == 32 and arch["param_hidden_rate"] == 1
    exported = tr.export(ckpt, tmp_path / "m48.safetensors")
    again = VariableRateLALIC.from_state_dict(load_state_dict_file(exported))
    assert again.config.dims[3] == 48 and again.config.side_width == 32 and again.groups == [4, 4, 8, 16, 16]
    assert again.config.param_hidden_rate == 1 and again.config.to_dict()["param_hidden_rate"] == 1


def test_block_klt_reference_of_the_ceiling_benchmark(tmp_path):
    """bench_transform_ceiling --klt: the linear reference keeps more with more coefficients, and all of them is exact."""
    from conftest import benchmark_script

    bench = benchmark_script("bench_transform_ceiling")
    rng = np.random.default_rng(1)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(48, 64, 3)), 0), 1)
    img = (255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)
    assert bench.blocks(img).shape == (3 * 4, 768)
    for i in range(3):
        Image.fromarray(np.roll(img, 7 * i, axis=1)).save(tmp_path / f"{i}.png")
    mean, vectors = bench.block_klt(tmp_path)
    assert vectors.shape == (768, 768)
    few, more, every = (bench.klt_psnr(img, mean, vectors, k) for k in (4, 24, 768))
    assert few < more and every > 90


def test_ceiling_benchmark_reads_any_image_size_and_refuses_an_empty_folder(tmp_path, capsys):
    """bench_transform_ceiling on training photos (JPEG, sizes not multiples of 64): cut to whole
    multiples of 64, one row per image and quality plus the mean; an empty folder is a clear error."""
    from conftest import benchmark_script

    bench = benchmark_script("bench_transform_ceiling")
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, size=(70, 135, 3), dtype=np.uint8)).save(tmp_path / "odd.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    bench.main(["--images", str(tmp_path), "--quality", "8", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.startswith(f"1 images from {tmp_path}")
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["odd"])
    ceiling, rounded = float(row[2]), float(row[3])
    assert 5 < rounded <= ceiling + 0.5 and ceiling < 60
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images in"):
        bench.main(["--images", str(empty)])


def test_wider_latent_from_innovation_components_and_the_last_groups_networks(trained_like):
    """The informed start of a wider latent: new channels uncorrelated with the old ones on the data,
    the size of the last group's, the new group's networks copies of the last group's."""
    from lalic_codec.reshape import analysis_patch_stats

    src = trained_like.state_dict()
    M, last = TINY["M"], TINY["groups"][-1]
    torch.manual_seed(5)
    crops = torch.rand(6, 3, 64, 64)
    crops = (crops + torch.roll(crops, 1, -1) + torch.roll(crops, 1, -2)) / 3  # some spatial correlation
    stats = analysis_patch_stats(trained_like, crops, batch=4)
    D = TINY["dims"][2] * 9
    assert stats[0].shape == (D,) and stats[1].shape == (D, D) and torch.allclose(stats[1], stats[1].T)
    sd, arch = reshape(src, latent=M + last, patch_stats=stats, group_start="last")
    wide = _load(sd).eval()
    trained_like.eval()
    with torch.no_grad():
        y = wide.g_a(crops)
        a, b = trained_like(crops[:1], quality=torch.tensor([3.0])), wide(crops[:1], quality=torch.tensor([3.0]))
    # the reconstruction, z and the old groups' rates are the old model's
    assert torch.equal(a["x_hat"], b["x_hat"]) and torch.equal(a["z"], b["z"])
    assert torch.allclose(b["likelihoods"]["y"][:, :M], a["likelihoods"]["y"], atol=1e-6)
    # on the crops the statistics came from: centred, uncorrelated with every old channel, as large
    # as the last group's channels on average
    flat = y.transpose(0, 1).reshape(y.shape[1], -1).double()
    flat = flat - flat.mean(1, keepdim=True)
    new, old = flat[M:], flat[:M]
    assert y[:, M:].mean().abs() < 1e-4 * y[:, M:].std()
    corr = (new @ old.T) / (new.norm(dim=1, keepdim=True) * old.norm(dim=1)[None])
    assert corr.abs().max() < 1e-6
    rms = lambda t: t.square().mean().sqrt()  # noqa: E731
    assert torch.isclose(rms(new), rms(old[M - last :]), rtol=1e-4)
    # the rows leave less of the patches unexplained (linearly) than random rows beside the old ones

    def unexplained(rows):
        w, cov = rows.reshape(len(rows), -1).double(), stats[1]
        return torch.trace(cov - cov @ w.T @ torch.linalg.solve(w @ cov @ w.T, w @ cov))

    ga = f"g_a.{len(wide.g_a) - 1}.weight"
    assert unexplained(sd[ga]) < 0.9 * unexplained(torch.cat([src[ga], torch.randn_like(sd[ga][M:])]))
    # the new group's networks are the last group's, its extra inputs zero, its means predicted at zero
    n = len(TINY["groups"])
    cc = "latent_codec.y.channel_context.y{}.0.weight"
    assert torch.equal(sd[cc.format(n)][:, : M - last], src[cc.format(n - 1)]) and not sd[cc.format(n)][:, M - last :].any()
    ep = "latent_codec.y.latent_codec.y{}.entropy_parameters.4."
    assert torch.equal(sd[ep.format(n) + "key.weight"], src[ep.format(n - 1) + "key.weight"])
    assert torch.equal(sd[ep.format(n) + "mix.weight"][:last], src[ep.format(n - 1) + "mix.weight"][:last])
    assert not sd[ep.format(n) + "mix.weight"][last:].any() and not sd[ep.format(n) + "value.weight"][last:].any()
    assert torch.equal(sd[f"scale_path.heads.{n}.0.weight"], src[f"scale_path.heads.{n - 1}.0.weight"])
    with torch.no_grad():
        side, _ = wide.channel_groups.side_params(n, torch.zeros(1, M, 4, 4), [torch.randn(1, g, 4, 4) for g in TINY["groups"]])
        _, means = wide.group(n).pass_params(0, None, side)
    assert not means.any()
    assert torch.allclose(sd["log_gain"][:, M:], src["log_gain"][:, M - last :].mean(1, keepdim=True).expand(-1, last))
    # it codes, and decodes what the encoder reconstructed
    coded = wide.compress(crops[:1], quality=2.0)
    assert torch.equal(wide.decompress(coded.streams, coded.z_shape, quality=2.0)["y_hat"], coded.y_hat)
    # a copy needs a new group as wide as the last one, and both options need a wider latent
    for kw in (dict(latent=M + last + 4, group_start="last"), dict(patch_stats=stats), dict(group_start="last"),
               dict(latent=M + last, group_start="warm"), dict(latent=M + D, patch_stats=stats)):
        with pytest.raises(ValueError):
            reshape(src, **kw)


def test_a_runs_state_reshaped_with_its_moments_and_average_resumes(tmp_path, data_dir):  # noqa: F811
    """--keep-state: a run's checkpoint reshaped (weights, moving average, Adam moments) and resumed."""
    ckpt = tr.train(cfg_for(tmp_path / "r", data_dir, steps=2, val_count=0, ema_half_life=5))
    state = torch.load(ckpt, weights_only=True)
    new_dir = tmp_path / "wide"
    args = ["reshape", str(ckpt), str(new_dir), "--keep-state", "--latent", "48", "--new-group", "last", "--units", "0,1"]
    res = CliRunner().invoke(tr.cli, args)
    assert res.exit_code == 0 and "-> M 48" in res.output, res.output
    again = CliRunner().invoke(tr.cli, args)  # a run folder is never overwritten
    assert again.exit_code == 1 and "exists" in again.output
    new = torch.load(new_dir / "checkpoint.pt", weights_only=True)
    assert new["step"] == state["step"] == 2 and new["samples"] == state["samples"] and new["config"]["arch"]["M"] == 48
    assert (new_dir / "log.jsonl").read_bytes() == (tmp_path / "r" / "run" / "log.jsonl").read_bytes()
    # the average is reshaped as the weights are: the same architecture, its own values
    names = {n for n, _ in _load(new["model"]).named_parameters()}
    assert set(new["ema"]) == names and new["ema"]["log_gain"].shape[1] == 48
    assert torch.equal(new["ema"]["g_s.0.weight"][:32], state["ema"]["g_s.0.weight"]) and not new["ema"]["g_s.0.weight"][32:].any()
    # Adam's moments: kept for the parameters copied unchanged, by name (the g_s unit's shift moves
    # g_s's last convolution from g_s.5 to g_s.6), none for new or grown ones
    opt = new["optimizer"]
    kept = opt["param_groups"][0]["names"]
    old_names = [n for g in state["optimizer"]["param_groups"] for n in g["names"]]

    def moments(st, names, name):
        return st["state"][names.index(name)]["exp_avg_sq"]

    assert torch.equal(moments(opt, kept, "g_s.6.weight"), moments(state["optimizer"], old_names, "g_s.5.weight"))
    assert torch.equal(moments(opt, kept, "g_a.1.weight"), moments(state["optimizer"], old_names, "g_a.1.weight"))
    for fresh in ("g_s.0.weight", "g_a.5.weight", "log_gain", "g_s.5.c1.weight", "latent_codec.y.latent_codec.y4.entropy_parameters.0.mix.weight"):
        assert fresh not in kept
    # the run goes on from it: its steps, with the average resumed rather than restarted
    res = CliRunner().invoke(tr.cli, ["run", "--resume", str(new_dir / "checkpoint.pt"), "--steps", "4"])
    assert res.exit_code == 0 and "it starts at them" not in res.output, res.output
    after = torch.load(new_dir / "checkpoint.pt", weights_only=True)
    assert after["step"] == 4 and after["config"]["arch"]["M"] == 48 and after["config"]["arch"]["units"] == (0, 1)
    assert not torch.equal(after["ema"]["g_s.0.weight"], new["ema"]["g_s.0.weight"])
    bad = CliRunner().invoke(tr.cli, ["reshape", str(tmp_path / "r" / "run" / "checkpoint.pt"), str(tmp_path / "x"), "--keep-state", "--lambdas", "a"])
    assert bad.exit_code == 1 and not (tmp_path / "x").exists()
