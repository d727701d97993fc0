"""The coding tree (models/latent_codecs.py) and the model registry (models/registry.py).

A model is a composition of latent codecs that code themselves: the stream list follows from the
tree, every stream is named by its path, and the names are those of FORMAT.md 11.3 (which
``codec info`` prints without loading the model).  The pipeline finds a model through the
registry and knows it only through the base class.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import TINY, natural_image
from lalic_codec.entropy.tables import fit_cdf_tables
from lalic_codec.formats import container
from lalic_codec.models import registry
from lalic_codec.models.base import CodingModel
from lalic_codec.models.entropy_models import EntropyBottleneck, GaussianConditional
from lalic_codec.models.lalic import INT_SCALE_V2, LALIC, VariableRateLALIC
from lalic_codec.models.latent_codecs import StreamCoder, unembed
from lalic_codec.models.mambaic import MambaIC


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(natural_image(h, w, seed).transpose(2, 0, 1)).float().div(255).unsqueeze(0)


@pytest.fixture(scope="module")
def models() -> dict:
    torch.manual_seed(0)
    out = {
        "lalic": LALIC(**TINY),
        "lalic-vr": VariableRateLALIC(**TINY, int_scale=INT_SCALE_V2),
        "mambaic": MambaIC(depths=(1, 1, 1, 1), N=8, M=20),
    }
    for m in out.values():
        m.update(force=True)
        m.eval()
    return out


def quality(model):
    return torch.tensor([3.5]) if model.variable_rate else None


def test_stream_names_follow_the_tree(models):
    assert models["lalic"].stream_names() == [
        "z", "y/g0/anchor", "y/g0/non_anchor", "y/g1/anchor", "y/g1/non_anchor",
        "y/g2/anchor", "y/g2/non_anchor", "y/g3/anchor", "y/g3/non_anchor",
    ]
    assert models["mambaic"].num_streams() == 11
    for m in models.values():
        # the names a reader gives a file without the model (FORMAT.md 11.3, codec info)
        assert m.stream_names() == container.stream_names(m.num_streams())


@pytest.mark.parametrize("name", ["lalic", "lalic-vr", "mambaic"])
def test_compress_names_its_streams_and_decoding_reads_them_in_order(models, name):
    m = models[name]
    x = image(128, 128)
    coded = m.compress(x, quality=quality(m))
    assert coded.names == m.stream_names() and len(coded.streams) == len(coded.names)
    assert coded.z_shape == m.hyper_shape(128, 128)
    out = m.decompress(coded.streams, coded.z_shape, quality=quality(m))
    assert torch.equal(out["y_hat"], coded.y_hat)
    # the tree itself, driven directly: the same streams, and a decoder reads every one of them
    tree = m.coding_tree()
    io = StreamCoder(rdo=m.rdo_lagrangian(quality(m)))  # the rounding the model's encoder uses
    enc = tree.code(io, m.analysis(x, quality(m)), scale_indexes=m.scale_indexes(quality(m)))
    assert io.streams == coded.streams and io.names == coded.names
    dec_io = StreamCoder(coded.streams)
    dec = tree.code(dec_io, None, coded.z_shape, scale_indexes=m.scale_indexes(quality(m)))
    assert dec_io.names == coded.names and torch.equal(dec["y_hat"], enc["y_hat"])


def test_a_checkerboard_node_codes_itself(models):
    """One channel group alone: two streams, anchor then non-anchor, and the decoder gets back the
    encoder's y_hat and residual symbols."""
    node = models["lalic"].group(2)
    g = node.context_prediction.in_channels
    torch.manual_seed(1)
    side_ch = 2 * g + TINY["dims"][3]  # channel context + hyper parameters
    y, side = torch.randn(1, g, 8, 12) * 3, torch.randn(1, side_ch, 8, 12)
    with torch.no_grad():
        enc = StreamCoder()
        with enc.scope("g2"):
            y_hat, res = node.code(enc, y, side)
        assert enc.names == ["g2/anchor", "g2/non_anchor"]
        dec = StreamCoder(enc.streams)
        y_hat2, res2 = node.code(dec, None, side)
    assert torch.equal(y_hat, y_hat2) and torch.equal(res, res2)
    assert torch.equal(res, torch.round(y - (y_hat - res)))  # y_hat = symbols + means


def test_entropy_models_own_their_streams():
    torch.manual_seed(2)
    eb = EntropyBottleneck(4)
    eb.update(force=True)
    z = torch.randn(1, 4, 3, 5) * 4
    data, sym = eb.compress(z)
    assert torch.equal(eb.decompress(data, (3, 5)), sym)
    gc = GaussianConditional()
    gc.update_scale_table(force=True)
    y, means = torch.randn(1, 2, 4, 4) * 5, torch.randn(1, 2, 4, 4)
    indexes = gc.build_indexes(torch.rand(1, 2, 4, 4) * 5)
    data, sym = gc.compress(y, indexes, means)
    assert torch.equal(sym, torch.round(y - means).int())
    assert torch.equal(gc.decompress(data, indexes), sym)


def test_stream_coder_refuses_a_missing_stream():
    io = StreamCoder([b"x"])
    assert io.read("z") == b"x"
    with io.scope("y"), pytest.raises(ValueError, match="y/g0 is missing"):
        io.read("g0")


def test_what_models_declare(models):
    lalic, vr, mamba = models["lalic"], models["lalic-vr"], models["mambaic"]
    assert (lalic.num_levels, vr.num_levels, mamba.num_levels) == (0, 8, 0)
    assert not lalic.variable_rate and vr.variable_rate and not mamba.variable_rate
    assert vr.device_independent and not lalic.device_independent and not mamba.device_independent
    for m in models.values():
        assert m.latent_shape(256, 192) == (16, 12) and m.hyper_shape(256, 192) == (4, 3)


def test_registry_finds_each_model_by_its_weights(models):
    assert registry.names() == ["lalic", "lalic-vr", "mambaic"]
    for name, m in models.items():
        cls = registry.get(name)
        assert issubclass(cls, CodingModel) and cls.registry_name == name and type(m) is cls
        assert registry.detect(m.state_dict()) is cls
    # official checkpoints: MambaIC's keys after eval.py's "module." stripping
    mamba_sd = {"module." + k: v for k, v in models["mambaic"].state_dict().items()}
    assert registry.detect(mamba_sd) is MambaIC
    assert registry.detect({"something.else": torch.zeros(1)}) is None


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("lalic")(type("Other", (CodingModel,), {}))


def _bits(gc: GaussianConditional, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """What the range coder spends on integer symbols under their tables (written out from the
    tables' frequencies and FORMAT.md 12.4, not the model's): an escaped value costs the escape
    symbol, the Uniform(33) class and the class's payload bits."""
    t = gc.tables()
    out = torch.empty(s.shape, dtype=torch.float64)
    for i in idx.unique().tolist():
        at = idx == i
        freq = t.frequencies(i)
        esc = len(freq) - 1
        k = s[at].long() - int(t.offset[i])
        inside = (k >= 0) & (k < esc)
        bits = torch.full(k.shape, -math.log2(freq[esc] / 65536), dtype=torch.float64)
        bits[inside] = torch.from_numpy(-np.log2(freq[k[inside].numpy()] / 65536))
        e = torch.where(k < 0, -2 * k - 1, 2 * (k - esc))[~inside]
        bits[~inside] += math.log2(33) + torch.tensor([math.floor(math.log2(v + 1)) for v in e.tolist()], dtype=torch.float64)
        out[at] = bits
    return out


def test_rd_rounding_takes_the_cheaper_of_round_and_one_step_towards_zero():
    gc = GaussianConditional()
    gc.update_scale_table(force=True)
    torch.manual_seed(3)
    r = torch.randn(4, 8, 16, 16) * 3
    idx = torch.randint(0, 64, r.shape, dtype=torch.int32)
    s0 = torch.round(r).double()
    assert torch.equal(gc.rd_symbols(r, idx, 0.0), s0.int())  # Lagrangian 0: plain rounding
    assert (_bits(gc, s0, idx) > 20).any()  # some values escape their narrow tables
    for lagrangian in (0.02, 0.1, 0.5):
        s = gc.rd_symbols(r, idx, lagrangian).double()
        moved = s != s0
        assert torch.equal(s[moved], (s0 - torch.sign(s0))[moved])  # only ever one step towards 0
        assert moved.any() and (s0[moved] != 0).all()
        cost = (r - s).square() + lagrangian * _bits(gc, s, idx)
        cost0 = (r - s0).square() + lagrangian * _bits(gc, s0, idx)
        cost1 = (r - (s0 - torch.sign(s0))).square() + lagrangian * _bits(gc, s0 - torch.sign(s0), idx)
        assert torch.allclose(cost, torch.minimum(cost0, torch.where(s0 != 0, cost1, cost0)), rtol=0, atol=1e-6)
    # a residual of 0.6 under the narrowest table: 1 costs 16 bits, 0 almost none
    one = torch.tensor([0.6]), torch.tensor([0], dtype=torch.int32)
    assert gc.rd_symbols(*one, 0.0).item() == 1 and gc.rd_symbols(*one, 0.05).item() == 0


def test_rd_rounding_follows_the_tables_it_codes_with():
    """With tables that make a symbol cheap (here 1 under the narrowest table, which a Gaussian of
    scale 0.11 makes 16 bits), the rounding keeps it where the Gaussian would have moved it to 0."""
    gc = GaussianConditional()
    gc.update_scale_table(force=True)
    one = torch.tensor([0.6]), torch.tensor([0], dtype=torch.int32)
    assert gc.rd_symbols(*one, 0.05).item() == 0
    t = gc.tables()
    counts = np.zeros(t.code_lengths().shape)
    counts[0, 1 - int(t.offset[0])] = counts[0, -int(t.offset[0])] = 10**6  # as many 1s as 0s
    gc._set_tables(*fit_cdf_tables(t, counts))
    assert gc.symbol_bits(torch.tensor([1.0]), one[1]).item() < 1.1
    assert gc.rd_symbols(*one, 0.05).item() == 1


def test_rd_rounded_symbols_decode_and_cost_fewer_bytes():
    gc = GaussianConditional()
    gc.update_scale_table(force=True)
    torch.manual_seed(4)
    means = torch.randn(1, 16, 32, 32)
    y = means + torch.randn(1, 16, 32, 32) * 2
    indexes = gc.build_indexes(torch.full(y.shape, 2.0))
    plain, sym0 = gc.compress(y, indexes, means)
    data, sym = gc.compress(y, indexes, means, rdo=0.2)
    assert torch.equal(gc.decompress(data, indexes), sym)
    assert not torch.equal(sym, sym0) and len(data) < len(plain)


def test_which_models_round_rate_distortion_optimally(models):
    """The variable-rate model's encoder does, with a Lagrangian that shrinks as the quality rises
    (the quantisation step's size); the official models' encoders round plainly, as their own
    code does (conformance compares their streams)."""
    assert models["lalic"].rdo_lagrangian() == 0 and models["mambaic"].rdo_lagrangian() == 0
    m = models["lalic-vr"]
    mus = [m.rdo_lagrangian(torch.tensor([q])) for q in (1.0, 2.5, 4.0, 8.0)]
    assert all(a > b > 0 for a, b in zip(mus, mus[1:]))
    x = image(128, 128, seed=5)
    q = torch.tensor([1.0])
    plain, rdo = m.compress(x, quality=q, rdo=0.0), m.compress(x, quality=q)
    assert plain.streams != rdo.streams  # y's symbols differ; z is coded the same way
    assert plain.streams[0] == rdo.streams[0]
    for c in (plain, rdo):
        assert torch.equal(m.decompress(c.streams, c.z_shape, quality=q)["y_hat"], c.y_hat)
