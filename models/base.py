"""What every coding network offers the pipeline (LALIC, the variable-rate LALIC, MambaIC).

The pipeline knows a model only through this interface: how to find and build it from a state
dict (:meth:`CodingModel.matches`, :meth:`CodingModel.from_state_dict`, see ``registry``), what
it offers (quality levels, device independence, latent and hyper-latent shapes, stream names)
and ``compress`` / ``decompress``.  Coding itself is the model's tree of latent codecs
(:meth:`CodingModel.coding_tree`); a subclass provides the transforms around it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from .latent_codecs import HyperpriorLatentCodec, StreamCoder


@contextlib.contextmanager
def deterministic_cuda(device: torch.device):
    """cuDNN restricted to its deterministic algorithms (and no autotuning) while coding on CUDA.

    With floating-point scales the encoder and the decoder must compute bitwise the same entropy
    parameters.  The hyper-synthesis of LALIC and MambaIC is made of transposed convolutions,
    which cuDNN runs as its backward-data convolution, and several of those algorithms accumulate
    with atomics: run to run, the sums come in another order.  The first end-to-end run on a GPU
    (an H200, bench-results/gpu-h200/e2e.txt) failed to decode what it had just encoded, without
    this.  The previous settings are restored afterwards (the flags are global)."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


@dataclass
class Coded:
    """Result of :meth:`CodingModel.compress`: streams in container order plus what the decoder needs to know."""

    streams: list[bytes]
    z_shape: tuple[int, int]
    y_hat: torch.Tensor | None = None
    debug: dict = field(default_factory=dict)
    #: the streams' names in the coding tree (``z``, ``y/g0/anchor`` ...)
    names: list[str] = field(default_factory=list)


class CodingModel(nn.Module):
    """Base class of the networks that code images into .lic streams.

    Subclasses provide ``forward(x, quality=None)`` (training / rate estimation), the transforms
    :meth:`analysis` and :meth:`synthesis`, the tree :meth:`coding_tree`, ``update(force=False)``
    (integer CDF tables), ``aux_loss()`` and :meth:`from_state_dict` / :meth:`matches`, and
    register with ``registry.register``.
    """

    #: the name the registry knows the architecture by (the model id of ``--weights`` files)
    registry_name: ClassVar[str] = ""
    #: the encoder pads tiles (centred) to a multiple of this
    pad_multiple = 128
    #: the network needs multiples of this
    size_multiple = 64
    #: downsampling of the latent y and of the hyper-latent z
    latent_stride = 16
    hyper_stride = 64
    #: whether ``quality`` selects the rate (a fixed-rate model ignores it)
    variable_rate = False

    # --- what the model offers ------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        """Quality levels: ``quality`` takes values in [1, num_levels] (0: a fixed-rate model)."""
        return 0

    @property
    def device_independent(self) -> bool:
        """Whether every table choice is exact on any device (so files decode anywhere)."""
        return False

    def latent_shape(self, h: int, w: int) -> tuple[int, int]:
        """Grid of the latent y for a padded input of h x w pixels."""
        return h // self.latent_stride, w // self.latent_stride

    def hyper_shape(self, h: int, w: int) -> tuple[int, int]:
        """Grid of the hyper-latent z for a padded input of h x w pixels."""
        return h // self.hyper_stride, w // self.hyper_stride

    def stream_names(self) -> list[str]:
        """Names of a tile's streams, in container order (FORMAT.md 11.3)."""
        return self.coding_tree().stream_names()

    def num_streams(self) -> int:
        return len(self.stream_names())

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"expected one RGB image of shape (1, 3, H, W); got {tuple(x.shape)}")
        m = self.size_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"image size {tuple(x.shape[2:])} must be a multiple of {m}; pad it first")

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def matches(cls, sd: dict) -> bool:
        """Whether a state dict holds weights of this architecture (looked at, not loaded)."""
        return False

    @classmethod
    def from_state_dict(cls, sd: dict, strict: bool = True) -> "CodingModel":
        raise NotImplementedError

    # --- what a subclass provides --------------------------------------------------------------------
    def coding_tree(self) -> HyperpriorLatentCodec:
        raise NotImplementedError

    def update(self, force: bool = False) -> bool:
        """Compute the entropy models' integer CDF tables (only where missing, unless ``force``)."""
        raise NotImplementedError

    def analysis(self, x: torch.Tensor, quality=None) -> torch.Tensor:
        """The latent y that the tree codes."""
        raise NotImplementedError

    def synthesis(self, y_hat: torch.Tensor, quality=None) -> torch.Tensor:
        """The image from the decoded latent (not clamped)."""
        raise NotImplementedError

    def reconstruct(self, y_hat: torch.Tensor, quality=None) -> torch.Tensor:
        """What :meth:`decompress` outputs for the latent ``y_hat``: the synthesis clamped to [0, 1]
        (an encoder calls it with the ``y_hat`` of :meth:`compress` to see what a decoder will)."""
        return self.synthesis(y_hat, quality).clamp_(0, 1)

    def scale_indexes(self, quality=None):
        """None (tables from the network's scales), or a function of the z symbols that gives the
        ``latent_codecs.ScaleIndexes`` of an integer scale path."""
        return None

    def rdo_lagrangian(self, quality=None) -> float:
        """The Lagrangian of the encoder's rate-distortion-optimised rounding of y (0: plain
        rounding, as the official models' encoders do)."""
        return 0.0

    # --- coding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, x: torch.Tensor, quality=None, debug: bool = False, rdo: float | None = None, merged: bool = False) -> Coded:
        """Encode a padded image (1, 3, H, W) in [0, 1] into entropy-coded streams (z first).
        ``rdo``: the rounding's Lagrangian (default :meth:`rdo_lagrangian`; 0 rounds plainly).
        ``merged``: one stream whose segments are the streams (FORMAT.md 12.8)."""
        self.check_input(x)
        with deterministic_cuda(x.device):
            y = self.analysis(x, quality)
            io = StreamCoder(trace=debug, rdo=self.rdo_lagrangian(quality) if rdo is None else rdo, merged=merged)
            out = self.coding_tree().code(io, y, scale_indexes=self.scale_indexes(quality))
            io.finish()
        z = out["z"]
        dbg = {"y": y, "z": z, "z_hat": out["z_hat"], **io.trace} if debug else {}
        return Coded(io.streams, tuple(z.shape[-2:]), out["y_hat"], dbg, io.names)

    @torch.no_grad()
    def decompress(self, streams: list[bytes], z_shape: tuple[int, int], quality=None, merged: bool = False) -> dict:
        """Decode the streams of :meth:`compress` (``merged``: its one stream of segments); returns
        ``x_hat`` (clamped to [0, 1]), ``y_hat``, ``z_hat``."""
        tree = self.coding_tree()
        n = 1 if merged else len(tree.stream_names())
        if len(streams) != n:
            raise ValueError(f"expected {n} streams, got {len(streams)}")
        zh, zw = (int(v) for v in z_shape)
        if zh < 1 or zw < 1:  # checked before any tensor is shaped from it (callers bound the size)
            raise ValueError(f"hyper-latent shape {zh}x{zw} is empty")
        device = next(self.parameters()).device
        with deterministic_cuda(device):
            io = StreamCoder(streams, merged=merged)
            out = tree.code(io, None, (zh, zw), scale_indexes=self.scale_indexes(quality))
            io.finish()
            x_hat = self.reconstruct(out["y_hat"], quality)
        return {"x_hat": x_hat, "y_hat": out["y_hat"], "z_hat": out["z_hat"]}
