"""Parsing must not depend on the device: the integer scale path makes table choices exact, and
any desynchronisation (official float models across devices) is reported, never decoded."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, natural_image, torch_threads
from lalic_codec import imaging, loading, pipeline, tiling
from lalic_codec.entropy.coder import SymbolMismatchError
from lalic_codec.errors import DeviceMismatchError
from lalic_codec.formats import container as fmt
from lalic_codec.models.lalic import INT_SCALE_V2, LALIC, VariableRateLALIC


def perturb_float_path(model, rel: float, seed: int = 0):
    """Make every parameter-aggregation output differ by a relative `rel`, as another device's
    rounding would (returns a function that undoes it)."""
    g = torch.Generator().manual_seed(seed)
    undo = []
    for k in range(len(model.groups)):
        ep = model.group(k).entropy_parameters
        orig = ep.forward

        def noisy(x, orig=orig):
            out = orig(x)
            return out * (1 + rel * torch.randn(out.shape, generator=g))

        ep.forward = noisy
        undo.append((ep, orig))

    def restore():
        for ep, orig in undo:
            ep.forward = orig

    return restore


@pytest.fixture(scope="module", params=[True, INT_SCALE_V2], ids=["int_path_v1", "int_path_v2"])
def int_model(request):
    torch.manual_seed(3)
    m = VariableRateLALIC(**TINY, int_scale=request.param)
    m.update(force=True)
    return m.eval()


def test_integer_scale_path_parse_survives_float_differences(int_model):
    x = torch.from_numpy(natural_image(128, 192).transpose(2, 0, 1)).float().div(255).unsqueeze(0)
    q = torch.tensor([5.5])
    coded = int_model.compress(x, quality=q)
    clean = int_model.decompress(coded.streams, coded.z_shape, quality=q)
    restore = perturb_float_path(int_model, 1e-3)
    try:
        moved = int_model.decompress(coded.streams, coded.z_shape, quality=q)
    finally:
        restore()
    # the symbols (hence the parse) are identical; only the means moved
    diff = (moved["y_hat"] - clean["y_hat"]).abs()
    assert diff.max() < 0.05 and torch.equal(torch.round(moved["y_hat"] - clean["y_hat"]), torch.zeros_like(diff))


@pytest.mark.parametrize("threads", [1, 2])
def test_integer_scale_path_independent_of_thread_count(int_model, threads):
    x = torch.from_numpy(natural_image(128, 128, seed=1).transpose(2, 0, 1)).float().div(255).unsqueeze(0)
    q = torch.tensor([3.0])
    coded = int_model.compress(x, quality=q)
    with torch_threads(threads):
        dec = int_model.decompress(coded.streams, coded.z_shape, quality=q)
    assert torch.allclose(dec["y_hat"], coded.y_hat, atol=1e-4)


def test_float_scale_path_desync_is_detected_not_decoded():
    torch.manual_seed(4)
    m = LALIC(**TINY)
    m.update(force=True)
    m.eval()
    x = torch.from_numpy(natural_image(128, 192, seed=2).transpose(2, 0, 1)).float().div(255).unsqueeze(0)
    coded = m.compress(x)
    restore = perturb_float_path(m, 3e-2)
    try:
        with pytest.raises(SymbolMismatchError):
            m.decompress(coded.streams, coded.z_shape)
    finally:
        restore()


def test_cuda_coding_keeps_cudnn_to_deterministic_algorithms():
    """The flags a CUDA encode / decode runs under (transposed convolutions: cuDNN's backward-data
    algorithms, some with atomics), and that they are given back; on the CPU nothing changes."""
    from lalic_codec.models.base import deterministic_cuda

    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    try:
        cudnn.deterministic, cudnn.benchmark = False, True  # as a user's training script may leave them
        with deterministic_cuda(torch.device("cpu")):
            assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
        with deterministic_cuda(torch.device("cuda", 0)):
            assert (cudnn.deterministic, cudnn.benchmark) == (True, False)
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
        with pytest.raises(RuntimeError), deterministic_cuda(torch.device("cuda")):
            raise RuntimeError("a failed encode")
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def test_compress_and_decompress_run_every_network_inside_the_deterministic_scope(monkeypatch):
    import contextlib

    from lalic_codec.models import base

    inside, seen = [False], []

    @contextlib.contextmanager
    def spy(device):
        seen.append(device.type)
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(base, "deterministic_cuda", spy)
    torch.manual_seed(4)
    m = LALIC(**TINY)
    m.update(force=True)
    m.eval()
    calls = []
    for name in ("g_a", "g_s", "h_s"):
        getattr(m, name).register_forward_pre_hook(lambda mod, args, name=name: calls.append((name, inside[0])))
    x = torch.from_numpy(natural_image(64, 64, seed=2).transpose(2, 0, 1)).float().div(255).unsqueeze(0)
    coded = m.compress(x)
    m.decompress(coded.streams, coded.z_shape)
    assert seen == ["cpu", "cpu"]
    assert {c for c, ok in calls} >= {"g_a", "g_s", "h_s"} and all(ok for c, ok in calls), calls


def test_pipeline_names_the_device_class(tmp_path, tiny_lalic_weights):
    lm = loading.load_model("lalic", tiny_lalic_weights, "cpu")
    res = pipeline.encode_image(Image.fromarray(natural_image(128, 128, seed=5)), lm)
    assert fmt.read(res.data).header.device_class == fmt.DeviceClass.CPU
    restore = perturb_float_path(lm.model, 3e-2)
    try:
        with pytest.raises(DeviceMismatchError, match="computed on cpu"):
            pipeline.decode_bytes(res.data, tiny_lalic_weights, "cpu")
    finally:
        restore()


def test_integer_path_files_are_marked_device_independent(tmp_path):
    from lalic_codec.models.checkpoints import save_weights

    torch.manual_seed(5)
    path = save_weights(VariableRateLALIC(**TINY, int_scale=True), tmp_path / "int.safetensors")
    lm = loading.load_model("x", path, "cpu")
    assert lm.model.scale_path is not None
    res = pipeline.encode_image(Image.fromarray(natural_image(70, 90)), lm, 2.0)
    assert fmt.read(res.data).header.device_class == fmt.DeviceClass.DEVICE_INDEPENDENT
    dec = pipeline.decode_bytes(res.data, path, "cpu").image
    assert dec.size == (90, 70)


# ---------------------------------------------------------------------------------------------
# large images: independent tiles, blended


def test_tile_plan_covers_with_overlap():
    for h, w in [(500, 700), (1024, 1024), (1025, 3000), (4000, 6000)]:
        tiles = tiling.plan_tiles(h, w, 1024, 64)
        cover = np.zeros((h, w), bool)
        for x, y, tw, th in tiles:
            assert 0 <= x and x + tw <= w and 0 <= y and y + th <= h
            cover[y : y + th, x : x + tw] = True
        assert cover.all()
        for i, (x, _, tw, _) in enumerate(tiles[:-1]):
            nxt = tiles[i + 1]
            if nxt[1] == tiles[i][1]:  # same row: neighbours overlap by at least 32 pixels
                assert x + tw - nxt[0] >= tiling.DEFAULT_OVERLAP == 32
        assert all(tw % 64 == 0 or tw == w for _, _, tw, _ in tiles)
    assert tiling.plan_tiles(500, 700) == [(0, 0, 700, 500)]
    sizes = {(tw, th) for _, _, tw, th in tiling.plan_tiles(4000, 6000, 1024)}
    # 7 x 4 tiles; across, not 1024 wide: the fewest 64s that keep the overlaps, as evenly as they go
    assert sizes == {(896, 1024), (832, 1024)}


def test_tiled_file_decodes_seamlessly(tiny_vr_weights, monkeypatch):
    monkeypatch.setattr(pipeline, "POSTFILTER", False)  # the tiles' own pixels (test_postfilter.py: a filter across tiles)
    lm = loading.load_model("x", tiny_vr_weights, "cpu")
    rgb = natural_image(200, 330, seed=11)
    res = pipeline.encode_image(Image.fromarray(rgb), lm, 6.0, tile=192)
    lic = fmt.read(res.data)
    assert len(lic.tiles) == 2 * 2
    out = np.asarray(pipeline.decode_bytes(res.data, tiny_vr_weights, "cpu").image)
    assert out.shape == rgb.shape
    # inside a tile and away from overlaps, the pixels are that tile's own reconstruction
    one = fmt.LicFile(header=lic.header, metadata=lic.metadata, alpha=None, tiles=[lic.tiles[0]])
    t0 = lic.tiles[0]
    model = lm.model
    l, r, t, b = t0.pad
    with torch.inference_mode():
        x_hat = model.decompress(t0.streams, ((t0.h + t + b) // 64, (t0.w + l + r) // 64), quality=torch.tensor([6.0]),
                                 merged=lic.merged)["x_hat"]
    own = imaging.to_uint8(x_hat[0, :, t : t + t0.h, l : l + t0.w])
    x_end = min(t.x for t in lic.tiles if t.x > 0)
    y_end = min(t.y for t in lic.tiles if t.y > 0)
    assert np.array_equal(out[:y_end, :x_end], own[:y_end, :x_end])
    # blending weights: a linear cross-fade inside the overlap, 1 where only one tile covers
    w0 = tiling.tile_weights(t0, lic.header.width, lic.header.height)
    assert w0[0, 0] == min(t0.w, t0.h) - 0.5  # only the right and bottom edges are interior
    assert w0[0, -1] == 0.5 and w0[-1, 0] == 0.5 and w0.min() > 0


@pytest.mark.parametrize("layout", [True, INT_SCALE_V2], ids=["v1", "v2"])
def test_integer_path_layout_is_read_from_the_weights(tmp_path, layout):
    from lalic_codec.models.checkpoints import save_weights

    torch.manual_seed(4)
    path = save_weights(VariableRateLALIC(**TINY, int_scale=layout), tmp_path / "w.safetensors")
    sp = loading.load_model("default", str(path), "cpu").model.scale_path
    assert sp.signed == (layout is not True) and sp.deep == (layout is not True)
    if layout is not True:
        assert sp.heads[0][0].weight.shape[0] == INT_SCALE_V2["head"]
        assert sp.spatial_ctx[0].weight.shape[1] == 2 * TINY["groups"][0]  # signed and magnitude planes
