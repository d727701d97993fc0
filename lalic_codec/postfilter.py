"""The post-filter: a linear filter fitted by the encoder to each image and applied by the decoder
to the reconstruction before its final rounding (FORMAT.md 7.3).

A learned decoder's error is not white: a small Wiener filter, fitted by least squares to the
very image being coded (the encoder has the original), removes part of it.  The filter is point
symmetric (the taps at ``d`` and ``-d`` are equal), K x K for K in 1, 3, 5, 7, and mixes the three
colour channels; its coefficients are integers in units of ``2^-P`` and cost 12 to about 450 bytes,
so the encoder keeps it only where the distortion it removes is worth its bytes at the quality's
rate-distortion trade-off (``lambda``, the one the model was trained for).

The block's content (all integers are zigzag LEB128 varints, FORMAT.md section 2 and 7.3)::

    u8 K, u8 P, then for each output channel o = R, G, B: for each input channel i = R, G, B
    the T = (K^2 + 1) / 2 taps of ``offsets(K)`` in order, then o's bias

and the output is ``O_o = R_o + (b_o + sum_i sum_t c[o][i][t] (R_i(p + d_t) + R_i(p - d_t))) / 2^P``
(the centre tap ``d_0 = (0, 0)`` counted once), with edge pixels repeated outside the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import container as fmt

#: the kernel sizes a file may use, and those the encoder tries
KERNEL_SIZES = (1, 3, 5, 7)
ENCODER_KERNEL_SIZES = (1, 3, 5, 7)
#: the precisions (fraction bits) the encoder tries for each kernel size: coarser costs fewer bytes
ENCODER_FRACTION_BITS = (6, 7, 8, 9, 10, 11, 12)
#: how many of the candidates, best first by the estimate from the normal equations, the encoder
#: applies to the image to choose among them
EXACT_CANDIDATES = 3
#: largest magnitude of a coefficient and of a bias (integers, in units of 2^-P)
MAX_COEF = 2**15
MAX_BIAS = 2**23
#: rows per band when applying, and when fitting (bounds the temporary memory on large images)
BAND_ROWS = 256
FIT_BAND_ROWS = 32
#: at most this many feature values per band when fitting (fewer rows in a band of a wide image)
FIT_FEATURE_VALUES = 1 << 21


def offsets(k: int) -> list[tuple[int, int]]:
    """The taps of a K x K point-symmetric filter: the centre, then one offset ``(dy, dx)`` of each
    pair ``+-(dy, dx)``, those with ``(dy, dx) > (0, 0)`` in lexicographic order."""
    r = k // 2
    return [(0, 0)] + [(dy, dx) for dy in range(0, r + 1) for dx in range(-r, r + 1) if (dy, dx) > (0, 0)]


@dataclass
class PostFilter:
    """``coefs[o, i, t]`` multiplies input channel i at the tap pair ``offsets(k)[t]`` for output
    channel o; ``bias[o]`` is added; both in units of ``2^-fraction_bits``."""

    k: int
    fraction_bits: int
    coefs: np.ndarray  # (3, 3, T) int64
    bias: np.ndarray  # (3,) int64

    def to_bytes(self) -> bytes:
        out = bytearray([self.k, self.fraction_bits])
        for o in range(3):
            for v in [*self.coefs[o].reshape(-1).tolist(), int(self.bias[o])]:
                out += fmt._varint(2 * v if v >= 0 else -2 * v - 1)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> PostFilter:
        """Parse a block's content; raises ValueError with what is wrong (the caller names the block)."""
        if len(data) < 2:
            raise ValueError("shorter than its 2-byte head")
        k, p = data[0], data[1]
        if k not in KERNEL_SIZES:
            raise ValueError(f"kernel size {k} (expected one of {', '.join(map(str, KERNEL_SIZES))})")
        if not 1 <= p <= 15:
            raise ValueError(f"{p} fraction bits (expected 1..15)")
        t = len(offsets(k))
        pos, values = 2, []
        for _ in range(3 * (3 * t + 1)):
            v, pos = _read_varint(data, pos)
            values.append(v // 2 if v % 2 == 0 else -(v + 1) // 2)
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes after the last coefficient")
        a = np.array(values, dtype=np.int64).reshape(3, 3 * t + 1)
        coefs, bias = a[:, :-1].reshape(3, 3, t), a[:, -1]
        if np.abs(coefs).max() >= MAX_COEF or np.abs(bias).max() >= MAX_BIAS:
            raise ValueError("a coefficient out of range")
        return cls(k, p, coefs, bias)

    def kernel(self):
        """The filter as a (3, 3, K, K) float32 correlation kernel in code values (the identity included)."""
        import torch

        r = self.k // 2
        w = np.zeros((3, 3, self.k, self.k), dtype=np.float64)
        for t, (dy, dx) in enumerate(offsets(self.k)):
            w[:, :, r + dy, r + dx] += self.coefs[:, :, t]
            if t:
                w[:, :, r - dy, r - dx] += self.coefs[:, :, t]
        w /= 2.0**self.fraction_bits
        w[np.arange(3), np.arange(3), r, r] += 1.0
        return torch.from_numpy(w.astype(np.float32))


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for n in range(4):
        if pos >= len(data):
            raise ValueError("ends inside a coefficient")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * n)
        if not byte & 0x80:
            if byte == 0 and n:
                raise ValueError("a varint that is not the shortest encoding")
            return value, pos
    raise ValueError("a varint longer than 4 bytes")


def _bands(h: int, r: int, rows: int = BAND_ROWS):
    """(rows of the band, rows read with the band's halo, top and bottom rows repeated at the image edge)."""
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        a, b = max(0, y0 - r), min(h, y1 + r)
        yield y0, y1, a, b, r - (y0 - a), r - (b - y1)


def apply(recon: np.ndarray, pf: PostFilter) -> np.ndarray:
    """The filtered image: ``recon`` (H, W, 3) float32 code values before rounding -> (H, W, 3) uint8,
    rounded half up and clamped to [0, 255] (FORMAT.md 7.3)."""
    import torch
    import torch.nn.functional as F

    h, w, _ = recon.shape
    r = pf.k // 2
    weight = pf.kernel()
    bias = torch.from_numpy((pf.bias / 2.0**pf.fraction_bits).astype(np.float32))
    out = np.empty((h, w, 3), dtype=np.uint8)
    src = torch.from_numpy(np.ascontiguousarray(recon, dtype=np.float32))
    with torch.inference_mode():
        for y0, y1, a, b, top, bottom in _bands(h, r):
            x = src[a:b].permute(2, 0, 1).unsqueeze(0)
            if r:
                x = F.pad(x, (r, r, top, bottom), mode="replicate")
            y = F.conv2d(x, weight, bias)[0].permute(1, 2, 0)
            out[y0:y1] = y.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _features(band: np.ndarray, k: int, top: int, bottom: int, step: int = 1) -> np.ndarray:
    """(rows x W, 3 T + 1) float64 for every ``step``-th row of the band (from its first): per input
    channel the centre and the sums of each tap pair, then 1."""
    r = k // 2
    p = np.pad(band, ((top, bottom), (r, r), (0, 0)), mode="edge") if r else band
    hh, ww = p.shape[0] - 2 * r, p.shape[1] - 2 * r
    cols = []
    for i in range(3):
        for t, (dy, dx) in enumerate(offsets(k)):
            a = p[r + dy : r + dy + hh : step, r + dx : r + dx + ww, i]
            cols.append(a if not t else a + p[r - dy : r - dy + hh : step, r - dx : r - dx + ww, i])
    cols.append(np.ones(cols[0].shape, dtype=p.dtype))
    return np.stack(cols, -1).reshape(-1, len(cols)).astype(np.float64, copy=False)


def _columns(k: int, kmax: int) -> list[int]:
    """Columns of the K x K features within the ``kmax`` x ``kmax`` ones."""
    small, big = offsets(k), offsets(kmax)
    t = len(big)
    return [i * t + big.index(o) for i in range(3) for o in small] + [3 * t]


def _normal_equations(original: np.ndarray, recon: np.ndarray, kmax: int, row_step: int):
    """(Gram matrix of the ``kmax`` features, their products with the error ``original - recon``,
    the number of pixels gathered) over every ``row_step``-th row."""
    h, w, _ = recon.shape
    n = 3 * len(offsets(kmax)) + 1
    gram, rhs, used = np.zeros((n, n)), np.zeros((n, 3)), 0
    # a band's features hold at most FIT_FEATURE_VALUES numbers, whatever the width
    rows = max(1, min(FIT_BAND_ROWS, FIT_FEATURE_VALUES // (w * n)))
    for y0, y1, a, b, top, bottom in _bands(h, kmax // 2, rows * row_step):  # bands start on a used row
        idx = np.arange(y0, y1, row_step)
        feats = _features(recon[a:b].astype(np.float64), kmax, top, bottom, row_step)
        target = (original[idx].astype(np.float64) - recon[idx]).reshape(-1, 3)
        gram += feats.T @ feats
        rhs += feats.T @ target
        used += len(feats)
    return gram, rhs, used


def _round_compensated(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Integers near each row of ``w`` (solutions in units of their quantisation step) that keep the
    squared error ``(q - w)^T G (q - w)`` small: each coefficient is rounded in turn and its rounding
    error spread over those not yet rounded (optimal brain quantisation, as GPTQ rounds network
    weights), ``u`` being the upper Cholesky factor of ``G``'s inverse (the update does not depend on
    the step's size).  Plain rounding of a solution whose colour channels nearly cancel needs
    several more fraction bits for the same error."""
    w = w.copy()
    for j in range(w.shape[1]):
        e = w[:, j] - np.round(w[:, j])
        w[:, j:] -= np.outer(e / u[j, j], u[j, j:])
    return np.round(w)


def fit(original: np.ndarray, recon: np.ndarray, lam: float, kernel_sizes=ENCODER_KERNEL_SIZES,
        fraction_bits=ENCODER_FRACTION_BITS, row_step: int = 3,
        exact: int = EXACT_CANDIDATES) -> tuple[PostFilter | None, dict]:
    """The filter the encoder keeps for this image, or None when none pays for its bytes.

    ``original`` (H, W, 3) uint8, ``recon`` (H, W, 3) float32 code values before rounding (what the
    decoder reconstructs), ``lam``: the rate-distortion trade-off of the training loss
    ``bpp + lam * 255^2 * MSE``, so a change of the squared error by ``dSSE`` (code values, summed
    over the 3 channels) is worth ``lam * dSSE / 3`` bits.

    The normal equations are gathered once on every ``row_step``-th row.  Each kernel size of
    ``kernel_sizes`` is solved by least squares and quantised at each precision of
    ``fraction_bits`` (:func:`_round_compensated`); every candidate's squared error follows from the
    normal equations without filtering the image, and the ``exact`` best by that estimate, less
    their blocks' bytes (content, length and CRC32), are then applied exactly as a decoder applies
    them and judged on the whole image.  Returns (filter or None, {(K, P): (SSE, bytes)} of the
    candidates applied, and "none": the SSE without a filter)."""
    h, w, _ = recon.shape
    kmax = max(kernel_sizes)
    gram, rhs, used = _normal_equations(original, recon, kmax, row_step)
    scale = h * w / max(1, used)  # the gathered rows stand for the whole image
    estimates = []
    steps = 2.0 ** np.repeat(np.asarray(fraction_bits, dtype=np.float64), 3)[:, None]  # a row per (P, channel)
    for k in kernel_sizes:
        cols = _columns(k, kmax)
        g = gram[np.ix_(cols, cols)]
        g = g + 1e-6 * np.trace(g) / len(cols) * np.eye(len(cols))
        ginv = np.linalg.inv(g)
        sol = (ginv @ rhs[cols]).T  # (3, 3 T + 1)
        try:
            u = np.linalg.cholesky(ginv).T
        except np.linalg.LinAlgError:  # not positive definite in floating point: round plainly
            u = np.eye(len(cols))
        rounded = _round_compensated(np.tile(sol, (len(fraction_bits), 1)) * steps, u).reshape(len(fraction_bits), 3, -1)
        t = len(offsets(k))
        for p, q in zip(fraction_bits, rounded.astype(np.int64)):
            step = 2.0**p
            q[:, :-1] = np.clip(q[:, :-1], 1 - MAX_COEF, MAX_COEF - 1)
            q[:, -1] = np.clip(q[:, -1], 1 - MAX_BIAS, MAX_BIAS - 1)
            pf = PostFilter(k, p, q[:, :-1].reshape(3, 3, t), q[:, -1])
            c = q / step
            dsse = scale * float(np.einsum("oi,ij,oj->", c, g, c) - 2.0 * np.sum(c * rhs[cols].T))
            nbytes = len(pf.to_bytes()) + 8
            estimates.append((lam * -dsse / 3.0 - 8 * nbytes, pf, nbytes))
    estimates.sort(key=lambda e: -e[0])
    base = _sse(original, recon, rounded=True)
    report: dict = {"none": base}
    best, best_gain = None, 0.0
    for est, pf, nbytes in estimates[:exact]:
        if est <= 0:
            break
        sse = _sse(original, apply(recon, pf))
        report[(pf.k, pf.fraction_bits)] = (sse, nbytes)
        gain = lam * (base - sse) / 3.0 - 8 * nbytes
        if gain > best_gain:
            best, best_gain = pf, gain
    return best, report


def _sse(a: np.ndarray, b: np.ndarray, rounded: bool = False) -> float:
    """Squared error of ``b`` (with ``rounded``: of ``b`` rounded half up and clamped) against ``a``,
    band by band (no image-sized float64 temporaries)."""
    total = 0.0
    for y0 in range(0, a.shape[0], BAND_ROWS):
        bb = b[y0 : y0 + BAND_ROWS].astype(np.float64)
        if rounded:
            bb = np.clip(np.floor(bb + 0.5), 0, 255)
        d = a[y0 : y0 + BAND_ROWS].astype(np.float64) - bb
        total += float(np.vdot(d, d))
    return total
