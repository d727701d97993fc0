"""The KLT start of training: g_a/g_s begin as an orthonormal block transform of the data."""

import torch

from conftest import TINY, natural_image
from lalic_codec.klt_init import klt_init, klt_psnr
from lalic_codec.models.lalic import DEFAULT_CONFIG, VariableRateLALIC


def images(n=6, size=64):
    return torch.stack([torch.from_numpy(natural_image(size, size, seed=i)).permute(2, 0, 1).float() / 255 for i in range(n)])


def test_klt_start_is_an_orthonormal_block_transform():
    torch.manual_seed(0)
    model = VariableRateLALIC(**DEFAULT_CONFIG)
    x = images()
    before = klt_psnr(model, x)
    info = klt_init(model, x)
    # the first two stages keep everything (12 of 48 and 48 of 64 channels), later ones most
    assert info["energy_stage1"] > 0.9999 and info["energy_stage2"] > 0.9999
    assert 0.9 < info["energy_stage4"] <= info["energy_stage3"] <= 1.0 + 1e-6
    # the synthesis is the analysis' transpose: on the kept subspace it inverts it
    after = klt_psnr(model, x)
    assert after > 28 and after > before + 10
    # through g_a[0], g_a[1] a 4x4 block of centred pixels is only rotated: norms are kept
    z = model.g_a[1](model.g_a[0](x))
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(z.square().sum(), centred.square().sum(), rtol=1e-4)
    # the latent is scaled for the largest lambda's quantisation step; the Bi-RWKV blocks start as identities
    assert info["latent_scale"] > 1
    assert all(float(b.gamma1.detach().abs().max()) == 0 for b in model.g_s if hasattr(b, "gamma1"))


def test_klt_start_on_narrow_configurations_keeps_what_fits():
    torch.manual_seed(0)
    model = VariableRateLALIC(**TINY)
    info = klt_init(model, images(4))
    assert info["energy_stage1"] > 0.9999  # 12 of 16 channels: lossless
    assert info["energy_stage2"] < 1.0  # 16 channels for a 48-value 4x4 block: not
    assert klt_psnr(model, images(4)) > 20
