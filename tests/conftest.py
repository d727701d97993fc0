"""Shared fixtures: tiny random-weight models saved as weight files, and test images."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lalic_codec._paths import shared_dir

SHARED = shared_dir()
KODAK = SHARED / "data" / "kodak"

TINY = dict(N=8, M=32, dims=(16, 16, 16, 32, 16, 16), depths=(0, 1, 1, 1), groups=(4, 4, 8, 16))


@pytest.fixture(scope="session")
def tiny_vr_weights(tmp_path_factory) -> Path:
    """A variable-rate LALIC with random weights (same code path as the default model)."""
    from lalic_codec.models.checkpoints import save_weights
    from lalic_codec.models.lalic import VariableRateLALIC

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny-vr.safetensors"
    return save_weights(VariableRateLALIC(**TINY), path)


@pytest.fixture(scope="session")
def tiny_lalic_weights(tmp_path_factory) -> Path:
    """A fixed-rate LALIC with random weights, saved like an official training checkpoint."""
    from lalic_codec.models.lalic import LALIC

    torch.manual_seed(1)
    m = LALIC(**TINY)
    m.update(force=True)
    path = tmp_path_factory.mktemp("weights") / "checkpoint_best.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, path)
    return path


def natural_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth image with some texture (uint8 RGB), cheap to make at any size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 80 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], axis=-1)
    noise = rng.normal(0, 12, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def rgb_png(tmp_path) -> Path:
    p = tmp_path / "img.png"
    Image.fromarray(natural_image(97, 203)).save(p)
    return p
