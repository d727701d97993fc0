"""Our LALIC against the official implementation: state-dict layout and reference outputs."""

import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED
from lalic_codec.models.checkpoints import fingerprint, load_state_dict_file, normalize_keys, unwrap_checkpoint
from lalic_codec.models.lalic import LALIC, embed

REF = SHARED / "refvec" / "lalic"


@pytest.fixture(scope="module")
def official_sd():
    return torch.load(REF / "small_state_dict.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def small(official_sd):
    kwargs = json.loads((REF / "small_config.json").read_text())["kwargs"]
    m = LALIC(**kwargs)
    m.load_state_dict(official_sd, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def expected():
    return torch.load(REF / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def inputs():
    return torch.load(REF / "input.pt", weights_only=True)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_default_model_matches_official_manifest():
    manifest = json.loads((REF / "manifest_full.json").read_text())
    m = LALIC()
    m.update(force=True)
    sd = m.state_dict()
    expected_keys = [e["key"] for e in manifest["state_dict"]]
    assert list(sd.keys()) == expected_keys
    changing = manifest["keys_whose_shape_changes_with_update"]
    for e in manifest["state_dict"]:
        key = e["key"]
        if key in changing and "entropy_bottleneck" in key:
            continue  # CDF widths of the factorized prior depend on the (random) parameter values
        assert list(sd[key].shape) == e["shape"], key
        assert str(sd[key].dtype).replace("torch.", "") == e["dtype"], key
    unique = {id(p) for p in m.parameters()}
    assert sum(p.numel() for p in m.parameters()) == manifest["num_parameters_unique"] == 66_133_045
    assert len(unique) == len(list(m.parameters()))
    # aliases: the top-level hyper transforms are the latent codec's
    assert m.h_a is m.latent_codec.hyper.h_a and m.h_s is m.latent_codec.hyper.h_s


def test_config_is_inferred_from_shapes(official_sd):
    cfg = LALIC.config_from_state_dict(official_sd)
    kwargs = json.loads((REF / "small_config.json").read_text())["kwargs"]
    assert list(cfg.dims) == kwargs["dims"] and list(cfg.depths) == kwargs["depths"]
    assert list(cfg.groups) == kwargs["groups"] and cfg.N == kwargs["N"]
    m = LALIC.from_state_dict(official_sd)
    assert fingerprint(m) == fingerprint(LALIC.from_state_dict(official_sd))


def test_default_config_round_trips_through_inference():
    sd = LALIC().state_dict()
    cfg = LALIC.config_from_state_dict(sd)
    assert cfg.dims == (96, 144, 256, 320, 256, 192) and cfg.depths == (2, 4, 6, 6)
    assert list(cfg.groups) == [16, 16, 32, 64, 192] and cfg.N == 128


@pytest.mark.parametrize("case", ["x", "pad"])
def test_forward_matches_official(small, expected, inputs, case):
    x = inputs["x"] if case == "x" else inputs["x_pad_padded"]
    e = expected if case == "x" else expected["pad"]
    with torch.no_grad():
        out = small(x)
    assert maxdiff(out["x_hat"], e["fwd_x_hat"]) < 1e-5
    assert maxdiff(out["likelihoods"]["y"], e["fwd_likelihoods_y"]) < 1e-5
    assert maxdiff(out["likelihoods"]["z"], e["fwd_likelihoods_z"]) < 1e-5
    assert maxdiff(out["y"], e["fwd_y"]) < 1e-4
    assert maxdiff(out["z"], e["fwd_z"]) < 1e-4
    assert torch.equal(out["z_hat"], e["fwd_z_hat"])
    assert maxdiff(out["y_hat"], e["fwd_y_hat"]) < 1e-5


@pytest.mark.parametrize("case", ["x", "pad"])
def test_compress_decompress_match_official(small, expected, inputs, case):
    x = inputs["x"] if case == "x" else inputs["x_pad_padded"]
    e = expected if case == "x" else expected["pad"]
    coded = small.compress(x, debug=True)
    assert len(coded.streams) == 9 and coded.z_shape == tuple(e["shape"]["hyper"])
    assert torch.equal(coded.debug["z_hat"], e["enc_z_hat"])
    # the quantised symbols are exactly the official ones; the means agree to float rounding
    means = torch.cat([embed(torch.stack(coded.debug["means"][2 * k : 2 * k + 2])) for k in range(4)], dim=1)
    indexes = torch.cat([embed(torch.stack(coded.debug["scale_indexes"][2 * k : 2 * k + 2])) for k in range(4)], dim=1)
    assert maxdiff(means, e["enc_means"]) < 1e-5
    assert torch.equal(indexes, e["enc_scale_indexes"])
    assert torch.equal(torch.round(coded.y_hat - means), torch.round(e["enc_y_hat"] - e["enc_means"]))
    assert maxdiff(coded.y_hat, e["enc_y_hat"]) < 1e-5
    # our range coder is not CompressAI's rANS, so the bytes differ, but not the size by much
    ours, theirs = sum(map(len, coded.streams)), sum(e["string_lengths"])
    assert 0.9 < ours / theirs < 1.02

    dec = small.decompress(coded.streams, coded.z_shape)
    assert torch.equal(dec["y_hat"], coded.y_hat)  # the decoder reproduces the encoder exactly
    assert maxdiff(dec["y_hat"], e["dec_y_hat"]) < 1e-5
    assert maxdiff(dec["x_hat"], e["dec_x_hat"]) < 1e-5
    if case == "pad":
        l, r, t, b = inputs["padding_lrtb"]
        crop = dec["x_hat"][..., t : x.shape[2] - b, l : x.shape[3] - r]
        assert maxdiff(crop, e["x_hat_unpadded_decoded"]) < 1e-5


def test_stored_reparam_weights_are_ignored(small, inputs, official_sd):
    # the official state dict stores 123.0 in every merged OmniShift kernel; eval recomputes them
    reparam = [k for k in official_sd if k.endswith("conv5x5_reparam.weight")]
    assert len(reparam) == 32 and all((official_sd[k] == 123.0).all() for k in reparam)
    x = inputs["x"][..., :64, :64]
    with torch.no_grad():
        before = small(x)["x_hat"]
        saved = {k: small.state_dict()[k].clone() for k in reparam}
        for k in reparam:
            small.state_dict()[k].normal_()
        after = small(x)["x_hat"]
        for k, v in saved.items():
            small.state_dict()[k].copy_(v)
    assert torch.equal(before, after)


def test_official_checkpoint_wrappers(tmp_path, official_sd):
    # DataParallel prefixes, CompressAI 1.2.6 entropy-bottleneck names and the training-dict wrapper
    renamed = {}
    for k, v in official_sd.items():
        k2 = "module." + k
        for name, old in (("matrices", "_matrix"), ("biases", "_bias"), ("factors", "_factor")):
            k2 = k2.replace(f"entropy_bottleneck.{name}.", f"entropy_bottleneck.{old}")
        renamed[k2] = v
    path = tmp_path / "checkpoint_best.pth.tar"
    torch.save({"epoch": 3, "state_dict": renamed, "loss": 1.0, "optimizer": {"lr": [1e-4]}}, path)
    sd = load_state_dict_file(path)
    assert set(sd) == set(official_sd)
    m = LALIC.from_state_dict(sd)
    ref = LALIC.from_state_dict(official_sd)
    assert fingerprint(m) == fingerprint(ref)
    assert unwrap_checkpoint({"model_state_dict": official_sd}) is official_sd
    assert normalize_keys({"module.module.a": torch.zeros(1)}) == {"a": torch.zeros(1)}


def test_omnishift_merged_kernel_equals_the_four_branches():
    # training evaluates OmniShift as one merged 5x5 convolution: same values and gradients as
    # the official alpha0*x + alpha1*conv1x1 + alpha2*conv3x3 + alpha3*conv5x5
    from lalic_codec.models.layers import OmniShift

    torch.manual_seed(0)
    om = OmniShift(6).double().train()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64, requires_grad=True)
    a = om.alpha
    ref = a[0] * x + a[1] * om.conv1x1(x) + a[2] * om.conv3x3(x) + a[3] * om.conv5x5(x)
    out = om(x)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, om.alpha, om.conv3x3.weight])
    grads = torch.autograd.grad((out * g).sum(), [x, om.alpha, om.conv3x3.weight])
    for a_, b_ in zip(grads, grads_ref):
        assert torch.allclose(a_, b_, atol=1e-10)
