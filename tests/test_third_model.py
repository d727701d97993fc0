"""Adding a model is one new file plus one registration (issue 15, item 2).

``ToyModel`` is a whole third model: a few convolutions around the shared nodes of the coding tree
(``models/latent_codecs.py``), and the methods of ``models/base.CodingModel`` that build it and
say what it offers.  The ``toy`` fixture is the one registration (``registry.register``), undone
after each test.  The file is then coded through the public API and the ``codec`` command as they
are: nothing in the pipeline, the API or the CLI knows the toy.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from PIL import Image

import lalic_codec
from lalic_codec import imaging, loading, tiling
from lalic_codec.cli import main
from lalic_codec.formats import container as fmt
from lalic_codec.models import registry
from lalic_codec.models.base import CodingModel
from lalic_codec.models.checkpoints import load_state_dict_file, save_weights
from lalic_codec.models.entropy_models import EntropyBottleneck
from lalic_codec.models.latent_codecs import (ChannelGroupsLatentCodec, CheckerboardLatentCodec, HyperLatentCodec,
                                              HyperpriorLatentCodec)

from conftest import natural_image

NAME = "toy-test-model"
GROUPS = (2, 3)  # the latent's channel groups
SIDE, CTX, HYPER = 4, 2, 3  # channels of the hyper parameters, of group 1's channel context, of z
STREAMS = ["z", "y/g0/anchor", "y/g0/non_anchor", "y/g1/anchor", "y/g1/non_anchor"]


class ToyModel(CodingModel):
    """Fixed-rate: y = g_a(x) at 1/16 (one strided convolution), z = h_a(y) at 1/64, y coded in two
    channel groups of two checkerboard passes each under the hyper parameters h_s(z_hat)."""

    def __init__(self):
        super().__init__()
        M = sum(GROUPS)
        self.g_a = nn.Conv2d(3, M, 16, stride=16)
        self.g_s = nn.ConvTranspose2d(M, 3, 16, stride=16)
        groups = nn.ModuleDict({
            f"y{k}": CheckerboardLatentCodec(
                entropy_parameters=nn.Conv2d(2 * g + SIDE + (CTX if k else 0), 2 * g, 1),  # position by position
                context_prediction=nn.Conv2d(g, 2 * g, 3, padding=1),
            )
            for k, g in enumerate(GROUPS)
        })
        channel_context = nn.ModuleDict({"y1": nn.Conv2d(GROUPS[0], CTX, 3, padding=1)})
        hyper = HyperLatentCodec(EntropyBottleneck(HYPER), nn.Conv2d(M, HYPER, 4, stride=4), nn.ConvTranspose2d(HYPER, SIDE, 4, stride=4))
        self.latent_codec = HyperpriorLatentCodec(ChannelGroupsLatentCodec(list(GROUPS), groups, channel_context), hyper)

    @classmethod
    def matches(cls, sd: dict) -> bool:
        return "g_a.weight" in sd and "latent_codec.y.latent_codec.y0.entropy_parameters.weight" in sd

    @classmethod
    def from_state_dict(cls, sd: dict, strict: bool = True) -> "ToyModel":
        model = cls()
        model.load_state_dict(sd, strict=strict)
        return model

    def coding_tree(self) -> HyperpriorLatentCodec:
        return self.latent_codec

    def update(self, force: bool = False) -> bool:
        updated = self.latent_codec.hyper.entropy_bottleneck.update(force=force)
        for k in range(len(GROUPS)):
            updated |= self.latent_codec.y.group(k).gaussian_conditional.update_scale_table(force=force)
        return updated

    def analysis(self, x: torch.Tensor, quality=None) -> torch.Tensor:
        return self.g_a(x)

    def synthesis(self, y_hat: torch.Tensor, quality=None) -> torch.Tensor:
        return self.g_s(y_hat)


@pytest.fixture
def toy(tmp_path):
    """(weights file, the model built from it): registered under NAME for the test only."""
    registry.register(NAME)(ToyModel)
    try:
        torch.manual_seed(0)
        path = save_weights(ToyModel(), tmp_path / "toy.safetensors", fp16=False)
        reference = ToyModel.from_state_dict(load_state_dict_file(path)).eval()
        yield path, reference
    finally:
        registry.unregister(NAME)
        loading.clear_model_cache()
    assert NAME not in registry.names()


def test_the_registry_finds_the_third_model_by_its_weights(toy):
    path, reference = toy
    assert NAME in registry.names() and registry.get(NAME) is ToyModel
    assert registry.detect(load_state_dict_file(path)) is ToyModel  # and no built-in model claims it
    lm = loading.load_model("default", path, "cpu")  # --weights: the model id is the registered name
    assert lm.model_id == NAME and isinstance(lm.model, ToyModel) and not lm.variable_rate
    assert reference.stream_names() == STREAMS and reference.num_streams() == 5


def test_a_third_model_codes_through_the_api_and_the_container(toy):
    path, reference = toy
    h, w = 150, 200  # padded to 256 x 256: one tile, coded once (no small-image search)
    rgb = natural_image(h, w, seed=3)
    data = lalic_codec.encode(Image.fromarray(rgb), weights=path, device="cpu")
    lic = fmt.read(data)
    assert (lic.header.model_id, lic.header.quality, lic.header.streams_per_tile, lic.merged) == (NAME, 0.0, 1, True)
    assert lic.header.device_class == int(fmt.DeviceClass.CPU)  # the base class: not device-independent
    assert len(lic.tiles) == 1
    tile = lic.tiles[0]
    # the container holds the model's own streams, in its tree's order
    x = tiling._to_tensor(rgb, tile.pad, torch.device("cpu"))
    assert tuple(x.shape[-2:]) == (256, 256)
    coded = reference.compress(x, merged=True)  # the streams as segments of one (FORMAT.md 12.8)
    assert coded.names == STREAMS and coded.z_shape == reference.hyper_shape(256, 256) == (4, 4)
    assert tile.streams == coded.streams
    # and the decoder gives back what the model's decompress computes, cropped to the image
    image = lalic_codec.decode(data, weights=path, device="cpu")
    assert image.size == (w, h) and image.mode == "RGB"
    l, r, t, b = tile.pad
    x_hat = reference.decompress(coded.streams, coded.z_shape, merged=True)["x_hat"]
    assert np.array_equal(np.asarray(image), imaging.to_uint8(x_hat[0, :, t : t + h, l : l + w]))


def test_codec_info_names_the_third_models_streams(toy, tmp_path, monkeypatch):
    """Per-stream sizes by name, in files of one stream per model stream (merged streams, FORMAT.md
    12.8, are one stream: test_pipeline)."""
    from lalic_codec import pipeline

    monkeypatch.setattr(pipeline, "MERGED_STREAMS", False)
    path, _ = toy
    src, lic_path, out = tmp_path / "in.png", tmp_path / "in.lic", tmp_path / "out.png"
    Image.fromarray(natural_image(70, 90, seed=4)).save(src)
    runner = CliRunner()
    r = runner.invoke(main, ["encode", str(src), str(lic_path), "--weights", str(path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["info", str(lic_path)])
    assert r.exit_code == 0, r.output
    assert f"model:       {NAME}" in r.output and "fixed-rate model" in r.output
    streams = fmt.read(lic_path.read_bytes()).tiles[0].streams
    for name, stream in zip(STREAMS, streams, strict=True):  # each name beside its size
        assert re.search(rf"^ +{re.escape(name)} +{len(stream)}$", r.output, re.M), (name, r.output)
    r = runner.invoke(main, ["decode", str(lic_path), str(out), "--weights", str(path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (90, 70)
