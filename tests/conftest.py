"""Shared fixtures: tiny random-weight models saved as weight files, and test images; helpers for the kernel tests."""

import contextlib
import types
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


# ---- helpers shared by the kernel tests ------------------------------------------------------


@contextlib.contextmanager
def simulated_gpus(sm_counts):
    """Make ``torch.cuda`` report one GPU per entry of ``sm_counts``, with that many SMs (no CUDA needed).

    Only the queries a host-side planner could use are answered (``is_available``, ``device_count``,
    ``current_device``, ``get_device_properties``); nothing runs on these devices.  Give every
    simulated GPU its own device index so that no per-device cache can hide the difference.
    """
    props = [types.SimpleNamespace(name=f"simulated GPU with {n} SMs", multi_processor_count=n, major=9, minor=0,
                                   total_memory=80 << 30) for n in sm_counts]

    def index(device=None):
        if device is None:
            return 0
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return device.index if device.index is not None else 0

    saved = {name: getattr(torch.cuda, name) for name in
             ("is_available", "device_count", "current_device", "get_device_properties")}
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: len(props)
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_properties = lambda device=None: props[index(device)]
    try:
        yield [torch.device("cuda", i) for i in range(len(props))]
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
