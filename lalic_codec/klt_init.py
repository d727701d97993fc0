"""Analytic start for training LALIC-family models: the transforms begin as a two-level block KLT.

Training a learned codec from random weights spends its first many thousand steps discovering
what any transform coder knows: decorrelate blocks of pixels and spend bits on the strong
components.  With the compute of a laptop that is most of a run.  ``klt_init`` sets the linear
skeleton of ``g_a`` and ``g_s`` to a block Karhunen-Loeve transform estimated from the training
images, so step 0 is already a working (blocky) transform coder and training spends its steps on
the entropy model and on the Bi-RWKV blocks' non-linear refinements:

* each stride-2 convolution of ``g_a`` maps every 2x2 cell of the previous stage's components
  (pixels, centred on the data's channel means, for the first) onto the cell vectors' leading
  principal components, as many as it has channels: with the default widths the first two
  stages keep everything (4x4 blocks, 48 values), the third the leading 96 components of each
  8x8 block, the fourth the leading 128 of each 16x16 block, times a scale that puts the
  quantisation step where the high-rate approximation wants it for the largest lambda;
* ``g_s`` is the transpose of each of these (orthonormal components, so it is their inverse on
  the retained subspace) and adds the means back;
* every Bi-RWKV block of ``g_a`` and ``g_s`` starts as the identity (layer scales 0); hyper
  transforms and entropy model keep their random start.

Only the architecture's own tensors are set, so the result is an ordinary state dict.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.layers import RwkvBlock


def _cells(z: torch.Tensor, used: int) -> torch.Tensor:
    """(n, C, H, W) map -> (n*H/2*W/2, 4*used) vectors of 2x2 cells, ordered (dy, dx, channel)."""
    z = z[:, :used]
    n, c, h, w = z.shape
    z = z.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1)  # n, i, j, dy, dx, c
    return z.reshape(-1, 4 * c)


def _pca(v: torch.Tensor, k: int) -> torch.Tensor:
    """Leading k principal directions of the rows of v (uncentred second moment), as (dim, k)."""
    v = v.double()
    cov = v.T @ v / v.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:k]
    return evecs[:, order].float()


def _cell_weight(U: torch.Tensor, used: int, out_ch: int, in_ch: int, k: int) -> torch.Tensor:
    """Stride-2 conv weight (out_ch, in_ch, k, k) projecting each 2x2 cell of ``used`` channels
    onto the columns of U (4*used, k_used <= out_ch); the remaining output channels stay zero."""
    w = torch.zeros(out_ch, in_ch, k, k)
    o = k // 2
    Ur = U.T.reshape(U.shape[1], 2, 2, used)  # component, dy, dx, c
    for dy in range(2):
        for dx in range(2):
            w[: U.shape[1], :used, o + dy, o + dx] = Ur[:, dy, dx, :]
    return w


def _transpose_weight(conv_w: torch.Tensor, deconv: nn.ConvTranspose2d) -> torch.Tensor:
    """The deconvolution weight (in, out, k, k) whose non-overlapping taps invert a stride-2 cell
    conv weight: the adjoint, re-centred on the deconvolution's own tap offsets."""
    k_c = conv_w.shape[-1]
    k_d = deconv.kernel_size[0]
    oc, od = k_c // 2, k_d // 2
    w = torch.zeros_like(deconv.weight)
    for dy in range(2):
        for dx in range(2):
            # conv: out[o] += w[o, c, oc+dy, oc+dx] * in[c]; deconv output (2i+dy, 2j+dx) reads tap od+dy
            w[:, :, od + dy, od + dx] = conv_w[: w.shape[0], : w.shape[1], oc + dy, oc + dx]
    return w


def sample_crops(files, count: int = 96, crop: int = 128, seed: int = 0) -> torch.Tensor:
    """``count`` random square crops (n, 3, S, S) in [0, 1] from random ``files``; S is ``crop``
    (or the smallest side of a smaller image) rounded down to a multiple of 16."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        with Image.open(files[int(rng.integers(len(files)))]) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        H, W = a.shape[:2]
        c = min(crop, H, W) // 16 * 16
        t, l = int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1))
        out.append(torch.from_numpy(np.ascontiguousarray(a[t : t + c, l : l + c].transpose(2, 0, 1))))
    size = min(x.shape[1] for x in out)
    return torch.stack([x[:, :size, :size] for x in out])


@torch.no_grad()
def klt_init(model, x: torch.Tensor, lam_max: float | None = None) -> dict:
    """Set ``model``'s g_a/g_s to the block KLT of the images ``x`` (n, 3, H, W) in [0, 1], H and W
    multiples of 16; the Bi-RWKV blocks of g_a/g_s become identities.  Returns a summary: the
    share of the energy each stage keeps, and the latent scale."""
    ga, gs = model.g_a, model.g_s
    convs = [m for m in ga if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in gs if isinstance(m, nn.ConvTranspose2d)]
    if len(convs) != 4 or len(deconvs) != 4:
        raise ValueError("klt_init expects LALIC's four-stage g_a and g_s")
    x = x.float()
    mean = x.mean(dim=(0, 2, 3))
    z, used, kept, summary = x - mean.view(1, 3, 1, 1), 3, 1.0, {}
    for i, conv in enumerate(convs):
        # each stage: the principal components of 2x2 cells of the previous stage's components
        v = _cells(z, used)
        k = min(4 * used, conv.out_channels)
        U = _pca(v, k)
        kept *= float((v @ U).square().sum() / v.square().sum())
        summary[f"energy_stage{i + 1}"] = kept
        conv.weight.copy_(_cell_weight(U, used, conv.out_channels, conv.in_channels, conv.kernel_size[0]))
        conv.bias.zero_()
        z = F.conv2d(z, conv.weight, None, stride=2, padding=conv.padding)
        used = k
    convs[0].bias.copy_(-(convs[0].weight.sum(dim=(2, 3)) @ mean))  # the stages see centred pixels

    N4 = convs[-1].out_channels
    if lam_max is None:
        lam_max = float(model.lambdas.max()) if hasattr(model, "lambdas") else 0.0483
    # high-rate approximation, per 16x16 block: rate (N4/256)(h - log2 step) bits per pixel,
    # MSE N4 step^2 / (12 * 768); bpp + lam 255^2 MSE is minimal where the derivatives in step
    # cancel: step^2 = (N4/256) / ln 2 * 12 * 768 / (2 N4 lam 255^2)
    step2 = (N4 / 256) / math.log(2) * 12 * 768 / (2 * N4 * lam_max * 255.0**2)
    scale = 1.0 / math.sqrt(step2)

    # synthesis: the transposes (orthonormal components: the inverse on the kept subspace)
    for conv, deconv in zip(convs, reversed(deconvs)):
        deconv.weight.copy_(_transpose_weight(conv.weight, deconv))
        deconv.bias.zero_()
    deconvs[-1].bias.copy_(mean)
    convs[-1].weight.mul_(scale)
    deconvs[0].weight.div_(scale)

    for blk in list(ga) + list(gs):
        if isinstance(blk, RwkvBlock):
            blk.gamma1.zero_()
            blk.gamma2.zero_()
    summary["latent_scale"] = scale
    return summary


def klt_psnr(model, x: torch.Tensor) -> float:
    """PSNR of the unquantised g_s(g_a(x)) (a check of the initialisation)."""
    with torch.no_grad():
        xh = model.g_s(model.g_a(x))
    return float(-10 * torch.log10(F.mse_loss(xh.clamp(0, 1), x)))
