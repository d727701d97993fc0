"""Our safetensors weights files: the Gaussian CDF tables every channel group repeats are stored
once (``"aliases"`` metadata), loading restores them exactly, and the fingerprint does not move."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import TINY
from lalic_codec import loading, pipeline
from lalic_codec.errors import ModelError
from lalic_codec.models.checkpoints import fingerprint, load_state_dict_file, save_weights
from lalic_codec.models.lalic import VariableRateLALIC

ROOT = Path(pipeline.__file__).resolve().parent.parent
TABLES = ("_quantized_cdf", "_cdf_length", "_offset", "scale_table")


def module_alias(key: str) -> bool:
    """LALIC's top-level h_a/h_s, which repeat latent_codec.hyper.h_a/h_s and are never written."""
    return key.startswith(("h_a.", "h_s."))


def tiny_model(fp16_exact: bool = False) -> VariableRateLALIC:
    torch.manual_seed(3)
    m = VariableRateLALIC(**TINY).eval()
    if fp16_exact:  # every float representable in fp16, so an fp16 file holds the model exactly
        with torch.no_grad():
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_floating_point():
                    t.copy_(t.half().float())
    m.update(force=True)
    return m


def reload(path) -> torch.nn.Module:
    net, _ = loading.build_from_state_dict(load_state_dict_file(path))
    net.update(force=False)
    return net.eval()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fp16", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, fp16):
    m = tiny_model(fp16_exact=fp16)
    path = save_weights(m, tmp_path / "w.safetensors", fp16=fp16)
    expected = {k: v for k, v in m.state_dict().items() if not module_alias(k)}
    sd = load_state_dict_file(path)
    assert sd.keys() == expected.keys()
    for k, v in sd.items():
        assert torch.equal(v.float() if v.is_floating_point() else v, expected[k]), k
    assert_same_state(reload(path).state_dict(), m.state_dict())
    assert fingerprint(reload(path)) == fingerprint(m)
    # the restored copies are separate tensors, so a second save finds (and aliases) them again
    again = save_weights(reload(path), tmp_path / "again.safetensors", fp16=fp16)
    assert again.stat().st_size == path.stat().st_size and fingerprint(reload(again)) == fingerprint(m)


def test_weights_files_get_normal_permissions(tmp_path):
    """safetensors creates its files readable by their owner alone; a weights file is for sharing."""
    import os

    old = os.umask(0o022)
    try:
        path = save_weights(tiny_model(), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob("*.tmp"))


def test_equal_gaussian_tables_are_stored_once(tmp_path):
    m = tiny_model()
    path = save_weights(m, tmp_path / "w.safetensors", metadata={"aliases": {"stale": "ignored"}})
    with safe_open(str(path), "pt") as f:
        stored, aliases = set(f.keys()), json.loads(f.metadata()["aliases"])
    groups = len(m.groups)
    assert groups > 1
    gc = [k for k in m.state_dict() if ".gaussian_conditional." in k and k.endswith(TABLES)]
    assert len(gc) == 4 * groups and len([k for k in gc if k in stored]) == 4  # one copy of each table
    assert set(aliases) == set(gc) - stored and set(aliases.values()) <= stored
    masks = {k for k in m.state_dict() if k.endswith(".mask")}  # rebuilt from their shapes
    assert set(m.state_dict()) - stored == set(aliases) | masks | {k for k in m.state_dict() if module_alias(k)}
    for dup, first in aliases.items():
        assert dup.rsplit(".", 1)[1] == first.rsplit(".", 1)[1]
        assert torch.equal(m.state_dict()[dup], m.state_dict()[first])


def test_different_tables_are_not_aliased(tmp_path):
    m = tiny_model()
    m.group(1).gaussian_conditional.update_scale_table([0.11 * 1.1**i for i in range(64)], force=True)
    path = save_weights(m, tmp_path / "w.safetensors", fp16=False)
    with safe_open(str(path), "pt") as f:
        aliases = json.loads(f.metadata()["aliases"])
    assert not any(".y1." in k or ".y1." in v for k, v in aliases.items())
    assert fingerprint(reload(path)) == fingerprint(m)


def test_alias_free_files_still_load(tmp_path):
    """Files written before the aliases (e.g. the first default-v1) load as they always did."""
    m = tiny_model()
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if not module_alias(k)}, str(tmp_path / "old.safetensors"))
    assert fingerprint(reload(tmp_path / "old.safetensors")) == fingerprint(m)


def test_bundled_weights_have_the_fingerprint_of_the_committed_kodak_run():
    """The shipped file (written with aliases) loads to the weights the committed bench measured."""
    bundled = loading.MODELS_DIR / loading.BUNDLED[loading.DEFAULT_MODEL]
    with safe_open(str(bundled), "pt") as f:
        assert "aliases" in (f.metadata() or {})
    recorded = json.loads((ROOT / "bench-results" / "kodak" / "default.json").read_text())
    assert f"fingerprint {fingerprint(reload(bundled)).hex()}" in json.dumps(recorded)


@pytest.mark.parametrize(
    "aliases, message",
    [
        ({"b.scale_table": "missing.scale_table"}, "which the file does not hold"),
        ({"a.scale_table": "a.scale_table"}, "names a tensor the file also holds"),
        (["a.scale_table"], "not a JSON map"),
        ({"b.scale_table": 3}, "not a JSON map"),
        ("{not json", "not a JSON map"),
    ],
)
def test_broken_aliases_are_refused(tmp_path, aliases, message):
    path = tmp_path / "bad.safetensors"
    meta = {"aliases": aliases if isinstance(aliases, str) else json.dumps(aliases)}
    save_file({"a.scale_table": torch.ones(4)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=message) as e:
        load_state_dict_file(path)
    assert isinstance(e.value, ModelError) and "bad.safetensors" in str(e.value)  # the CLI's exit 5, one line


def test_cdf_tables_are_written_packed(tmp_path):
    """Each quantised CDF table is stored as its rows cut to their lengths (the zero padding
    dropped): the file shrinks and loading gives the padded tables back bit for bit."""
    m = tiny_model()
    path = save_weights(m, tmp_path / "w.safetensors", fp16=False)
    state = m.state_dict()
    with safe_open(str(path), "pt") as f:
        meta, stored = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    packed = json.loads(meta["packed_cdfs"])
    tables = {k for k in state if k.endswith("_quantized_cdf") and not module_alias(k)}
    assert set(packed) == tables and meta["format"] == "lalic-codec weights v3"
    saved = 0
    for k in tables & set(stored):
        lengths = state[k.replace("_quantized_cdf", "_cdf_length")]
        assert stored[k].dim() == 1 and stored[k].numel() == int(lengths.sum()) and packed[k] == state[k].shape[1]
        assert torch.equal(stored[k], torch.cat([row[:n] for row, n in zip(state[k], lengths.tolist())]))
        saved += state[k].numel() - stored[k].numel()
    assert saved > 0
    sd = load_state_dict_file(path)
    for k in tables:
        assert sd[k].dtype == torch.int32 and torch.equal(sd[k], state[k]), k
    assert fingerprint(reload(path)) == fingerprint(m)


def test_a_table_with_nonzero_padding_is_kept_whole(tmp_path):
    m = tiny_model()
    gc = m.group(0).gaussian_conditional
    row = int(gc._cdf_length.argmin())
    assert int(gc._cdf_length[row]) < gc._quantized_cdf.shape[1]
    gc._quantized_cdf[row, -1] = 7  # beyond the row's length: packing would lose it
    path = save_weights(m, tmp_path / "w.safetensors", fp16=False)
    key = next(k for k, v in m.state_dict().items() if v.data_ptr() == gc._quantized_cdf.data_ptr())
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor(key).dim() == 2 and key not in json.loads(f.metadata()["packed_cdfs"])
    assert torch.equal(load_state_dict_file(path)[key], gc._quantized_cdf)


@pytest.mark.parametrize(
    "packed, flat, message",
    [
        ({"a._quantized_cdf": 4}, [1, 2, 3], "does not match its lengths"),  # 3 values, lengths sum to 5
        ({"a._quantized_cdf": 2}, [1, 2, 3, 4, 5], "does not match its lengths"),  # a row longer than the width
        ({"b._quantized_cdf": 4}, [1, 2, 3, 4, 5], "or its lengths are missing"),
        ({"a._quantized_cdf": "4"}, [1, 2, 3, 4, 5], "not a JSON map"),
        ({"a.scale_table": 4}, [1, 2, 3, 4, 5], "not a JSON map"),
        ("[1]", [1, 2, 3, 4, 5], "not a JSON map"),
    ],
)
def test_broken_packed_tables_are_refused(tmp_path, packed, flat, message):
    path = tmp_path / "bad.safetensors"
    tensors = {"a._quantized_cdf": torch.tensor(flat, dtype=torch.int32), "a._cdf_length": torch.tensor([2, 3], dtype=torch.int32)}
    save_file(tensors, str(path), metadata={"packed_cdfs": packed if isinstance(packed, str) else json.dumps(packed)})
    with pytest.raises(ValueError, match=message) as e:
        load_state_dict_file(path)
    assert isinstance(e.value, ModelError) and "bad.safetensors" in str(e.value)


def test_packed_tables_unpack_to_zero_padded_rows(tmp_path):
    path = tmp_path / "ok.safetensors"
    tensors = {"a._quantized_cdf": torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32), "a._cdf_length": torch.tensor([2, 3], dtype=torch.int32)}
    save_file(tensors, str(path), metadata={"packed_cdfs": json.dumps({"a._quantized_cdf": 4})})
    assert load_state_dict_file(path)["a._quantized_cdf"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 0]]


def test_checkerboard_masks_are_rebuilt_not_stored(tmp_path):
    """The masks of the checkerboard contexts are a function of their shape (1.3 MB of the default
    model's file): left out, listed with shape and dtype, rebuilt bit for bit; the fingerprint of
    the loaded model, which every .lic header holds, does not move.  A mask of another pattern is
    stored as it is."""
    torch.manual_seed(3)
    m = VariableRateLALIC(**TINY, int_scale=True).eval()
    m.update(force=True)
    masks = {k for k in m.state_dict() if k.endswith(".mask") and not module_alias(k)}
    assert any("context_prediction" in k for k in masks) and any("scale_path" in k for k in masks)
    for fp16 in (False, True):
        path = save_weights(m, tmp_path / f"w{fp16}.safetensors", fp16=fp16)
        with safe_open(str(path), "pt") as f:
            meta, stored = f.metadata(), set(f.keys())
        listed = json.loads(meta["checkerboard_masks"])
        assert set(listed) == masks and not masks & stored and meta["format"] == "lalic-codec weights v3"
        sd = load_state_dict_file(path)
        for k in masks:
            assert sd[k].dtype == (torch.float16 if fp16 else torch.float32) and torch.equal(sd[k].float(), m.state_dict()[k]), k
    assert fingerprint(reload(path.with_name("wFalse.safetensors"))) == fingerprint(m)
    odd = next(k for k in sorted(masks) if "context_prediction" in k)
    m.state_dict()[odd][0, 0, 0, 0] = 1  # not the checkerboard: kept in the file
    path = save_weights(m, tmp_path / "odd.safetensors", fp16=False)
    with safe_open(str(path), "pt") as f:
        assert odd in f.keys() and odd not in json.loads(f.metadata()["checkerboard_masks"])
    assert torch.equal(load_state_dict_file(path)[odd], m.state_dict()[odd])


@pytest.mark.parametrize(
    "masks, message",
    [
        ({"a.mask": [[2, 1, 3, 3], "float32"]}, "is also stored in the file"),
        ({"b.weight": [[2, 1, 3, 3], "float32"]}, "not a JSON map"),
        ({"b.mask": [[2, 1, 3], "float32"]}, "not a JSON map"),
        ({"b.mask": [[2, 1, 3, 3], "int8"]}, "not a JSON map"),
        ({"b.mask": [[2, 1, 3, 0], "float16"]}, "not a JSON map"),
        ({"b.mask": [[2, 1, 3, 1e9], "float16"]}, "not a JSON map"),
        ("{not json", "not a JSON map"),
    ],
)
def test_broken_mask_lists_are_refused(tmp_path, masks, message):
    path = tmp_path / "bad.safetensors"
    meta = {"checkerboard_masks": masks if isinstance(masks, str) else json.dumps(masks)}
    save_file({"a.mask": torch.ones(2, 1, 3, 3)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=message) as e:
        load_state_dict_file(path)
    assert isinstance(e.value, ModelError) and "bad.safetensors" in str(e.value)
    path = tmp_path / "ok.safetensors"
    save_file({"a.weight": torch.ones(1)}, str(path), metadata={"checkerboard_masks": json.dumps({"b.mask": [[1, 1, 3, 3], "float32"]})})
    assert load_state_dict_file(path)["b.mask"][0, 0].tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]


def int8_candidates(m) -> set:
    """What ``save_weights(..., int8=INT8_TENSORS)`` must write as int8: the entropy model's and
    the scale path's float tensors of at least 2 dimensions and 4096 values, masks aside."""
    return {k for k, v in m.state_dict().items()
            if k.startswith(("latent_codec.", "scale_path.")) and v.is_floating_point() and v.dim() >= 2
            and v.numel() >= 4096 and not k.endswith(".mask")}


def test_entropy_weights_are_written_as_int8_rows(tmp_path):
    """The entropy model's large weights are stored as int8 with a float32 scale per row: each
    loads as q * scale, within half a scale of the model's value (the row's largest magnitude
    maps to 127); everything else is stored as before, the file is smaller, the loaded model's
    fingerprint is the same on every load, and saving the loaded model again changes nothing
    beyond float32 rounding."""
    from lalic_codec.train import INT8_TENSORS

    torch.manual_seed(3)
    m = VariableRateLALIC(**TINY, int_scale=True).eval()
    m.update(force=True)
    expected = int8_candidates(m)
    assert any(k.startswith("scale_path.") for k in expected) and any(".channel_context." in k for k in expected)
    plain = save_weights(m, tmp_path / "plain.safetensors")
    path = save_weights(m, tmp_path / "int8.safetensors", int8=INT8_TENSORS)
    with safe_open(str(path), "pt") as f:
        meta, stored = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    rows = json.loads(meta["int8_rows"])
    assert set(rows) == expected and meta["format"] == "lalic-codec weights v4"
    state = m.state_dict()
    for k, scale_key in rows.items():
        q, scale = stored[k], stored[scale_key]
        assert q.dtype == torch.int8 and q.shape == state[k].shape and scale.dtype == torch.float32 and scale.shape == (q.shape[0],)
        rowmax = state[k].reshape(q.shape[0], -1).abs().amax(1)
        assert torch.equal(scale, rowmax / 127) and int(q.abs().max()) == 127
    sd, before = load_state_dict_file(path), load_state_dict_file(plain)
    assert sd.keys() == before.keys()  # the scales are not part of the state dict
    for k, v in sd.items():
        if k in rows:
            s = stored[rows[k]].reshape(-1, *[1] * (v.dim() - 1))
            assert v.dtype == torch.float32 and torch.equal(v, stored[k].float() * s), k
            assert bool(((v - state[k]).abs() <= s / 2 + 1e-7).all()), k
        else:
            assert torch.equal(v, before[k]), k
    assert path.stat().st_size < 0.8 * plain.stat().st_size
    assert fingerprint(reload(path)) == fingerprint(reload(path)) != fingerprint(reload(plain))
    again = load_state_dict_file(save_weights(reload(path), tmp_path / "again.safetensors", int8=INT8_TENSORS))
    for k in rows:
        assert torch.allclose(again[k], sd[k], rtol=1e-6, atol=0), k


def test_an_all_zero_row_gets_scale_zero():
    """No division by zero; the other rows are within half a scale."""
    from lalic_codec.models.checkpoints import _int8_rows

    torch.manual_seed(0)
    w = torch.randn(3, 5, 3, 3)
    w[1] = 0
    q, scale = _int8_rows(w)
    assert scale[1] == 0 and not q[1].any() and bool(torch.isfinite(scale).all())
    assert bool(((q.float() * scale[:, None, None, None] - w).abs() <= scale[:, None, None, None] / 2 + 1e-7).all())


@pytest.mark.parametrize(
    "rows, tensors, message",
    [
        ({"a.weight": "s"}, {"a.weight": torch.ones(2, 3, dtype=torch.int8)}, "or its scales 's' are missing"),
        ({"a.weight": "s"}, {"a.weight": torch.ones(2, 3), "s": torch.ones(2)}, "does not match its scales"),  # not int8
        ({"a.weight": "s"}, {"a.weight": torch.ones(2, 3, dtype=torch.int8), "s": torch.ones(3)}, "does not match"),
        ({"a.weight": "s"}, {"a.weight": torch.ones(2, 3, dtype=torch.int8), "s": torch.ones(2, dtype=torch.float16)}, "does not match"),
        ({"a.weight": "s"}, {"a.weight": torch.ones(2, 3, dtype=torch.int8), "s": torch.tensor([1.0, float("nan")])}, "does not match"),
        ({"a.weight": "s"}, {"a.weight": torch.ones(2, 3, dtype=torch.int8), "s": torch.tensor([1.0, -1.0])}, "does not match"),
        ({"a.weight": "s"}, {"a.weight": torch.ones(6, dtype=torch.int8), "s": torch.ones(6)}, "does not match"),
        ({"a.weight": "a.weight"}, {"a.weight": torch.ones(2, 3, dtype=torch.int8)}, "not a JSON map"),
        ({"a.weight": 3}, {"a.weight": torch.ones(2, 3, dtype=torch.int8)}, "not a JSON map"),
        ("{not json", {"a.weight": torch.ones(2, 3, dtype=torch.int8)}, "not a JSON map"),
    ],
)
def test_broken_int8_rows_are_refused(tmp_path, rows, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"int8_rows": rows if isinstance(rows, str) else json.dumps(rows)})
    with pytest.raises(ValueError, match=message) as e:
        load_state_dict_file(path)
    assert isinstance(e.value, ModelError) and "bad.safetensors" in str(e.value)
    ok = tmp_path / "ok.safetensors"
    save_file({"a.weight": torch.tensor([[1, -127], [0, 5]], dtype=torch.int8), "s": torch.tensor([0.5, 2.0])}, str(ok),
              metadata={"int8_rows": json.dumps({"a.weight": "s"})})
    assert load_state_dict_file(ok).keys() == {"a.weight"}
    assert load_state_dict_file(ok)["a.weight"].tolist() == [[0.5, -63.5], [0.0, 10.0]]


def test_weights_files_of_a_newer_format_are_refused_clearly(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({"a.weight": torch.ones(2)}, str(path), metadata={"format": "lalic-codec weights v9"})
    with pytest.raises(ModelError, match=r"format v9, from a newer lalic-codec \(this one reads up to v4\); upgrade"):
        load_state_dict_file(path)
    save_file({"a.weight": torch.ones(2)}, str(path), metadata={"format": "lalic-codec weights v4"})
    assert load_state_dict_file(path)["a.weight"].tolist() == [1.0, 1.0]
