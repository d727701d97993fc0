"""What every coding network offers the pipeline (LALIC, the variable-rate LALIC, MambaIC)."""

from __future__ import annotations

import torch
import torch.nn as nn


class CodingModel(nn.Module):
    """Base class of the networks that code images into .lic streams.

    Subclasses provide ``forward(x, quality=None)`` (training / rate estimation),
    ``compress(x, quality=None, debug=False)`` returning the streams in container order,
    ``decompress(streams, z_shape, quality=None)``, ``num_streams()``, ``update(force=False)``
    (integer CDF tables) and ``aux_loss()``.
    """

    #: the encoder pads tiles (centred, zeros) to a multiple of this
    pad_multiple = 128
    #: the network needs multiples of this
    size_multiple = 64
    #: whether ``quality`` selects the rate (a fixed-rate model ignores it)
    variable_rate = False

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"expected one RGB image of shape (1, 3, H, W); got {tuple(x.shape)}")
        m = self.size_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"image size {tuple(x.shape[2:])} must be a multiple of {m}; pad it first")
