"""MambaIC through the codec command: an official-style training checkpoint, encode, decode."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lalic_codec import imaging, loading, tiling
from lalic_codec.cli import main
from lalic_codec.models.mambaic import MambaIC

#: the reference-vector configuration (the constructor hard-codes most widths: 20 M parameters)
SMALL = dict(depths=(1, 1, 1, 1), N=8, M=20)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def mambaic_checkpoint(tmp_path_factory):
    """Random weights saved as official train.py does under nn.DataParallel ("module." prefixes),
    plus "module." inside some keys, which official eval.py also strips."""
    torch.manual_seed(2)
    m = MambaIC(**SMALL).eval()
    m.update(force=True)
    sd = {"module." + k.replace(".op.", ".module.op."): v for k, v in m.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "checkpoint0.025.pth.tar"
    torch.save({"epoch": 1, "state_dict": sd, "loss": 1.0, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def encoder_reconstruction(lm, rgb: np.ndarray) -> np.ndarray:
    """What the encoder reconstructs from its own quantised latent (no bitstream involved)."""
    H, W = rgb.shape[:2]
    pad = tiling.centred_padding(H, W, lm.model.pad_multiple, tiling.MIN_CANVAS)
    x = tiling._to_tensor(rgb, pad, lm.device)
    with torch.inference_mode():
        x_hat = lm.model.g_s(lm.model.compress(x).y_hat).clamp(0, 1)
    l, r, t, b = pad
    return imaging.to_uint8(x_hat[0, :, t : t + H, l : l + W])


def test_encode_decode_round_trip(tmp_path, rgb_png, mambaic_checkpoint, tiny_lalic_weights):
    lic, out = tmp_path / "a.lic", tmp_path / "a.png"
    r = run("encode", "--model", "mambaic", "--weights", mambaic_checkpoint, rgb_png, lic)
    assert r.exit_code == 0, r.output
    info = json.loads(run("info", lic, "--json").output)
    # 11 streams, merged into one (FORMAT.md 12.8)
    assert info["model_id"] == "mambaic" and info["streams_per_tile"] == 1 and info["merged_streams"] and info["crc_ok"]
    assert (info["width"], info["height"]) == (203, 97)
    r = run("decode", "--weights", mambaic_checkpoint, lic, out)
    assert r.exit_code == 0, r.output
    decoded = np.asarray(Image.open(out))
    assert decoded.shape == (97, 203, 3)
    lm = loading.load_model("mambaic", mambaic_checkpoint, "cpu")
    assert isinstance(lm.model, MambaIC) and lm.model_id == "mambaic"
    rgb = np.asarray(Image.open(rgb_png).convert("RGB"))
    assert np.array_equal(decoded, encoder_reconstruction(lm, rgb))
    # other weights, or none, are refused
    r = run("decode", "--weights", tiny_lalic_weights, lic, tmp_path / "b.png")
    assert r.exit_code == 5 and "fingerprint" in r.output
    r = run("decode", lic, tmp_path / "c.png")
    assert r.exit_code == 5 and "--weights" in r.output
