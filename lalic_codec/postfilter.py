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

The classified filter (FORMAT.md 7.4, :class:`ClassifiedFilter`) sorts the pixels into classes by
the local activity and direction of the rounded reconstruction, as video coders' adaptive loop
filters do, and gives each class its own such filter (or none): a learned decoder's error depends
on the local texture, so one filter per kind of neighbourhood removes more of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import container as fmt

#: the kernel sizes a file may use, and those the encoder tries
KERNEL_SIZES = (1, 3, 5, 7)
ENCODER_KERNEL_SIZES = (1, 3, 5)
#: the precisions (fraction bits) the encoder tries for each kernel size: coarser costs fewer bytes
ENCODER_FRACTION_BITS = (6, 7, 8, 9, 10, 11, 12)
#: how many of the candidates, best first by the estimate from the normal equations, the encoder
#: applies to the image to choose among them, besides the best plain filter; 0: the estimate
#: decides (it is exact but for the output's rounding and clamping where every row is gathered, as
#: by default, and chose as the applied filters did on 39 of 40 test captures, for 30 % less time)
EXACT_CANDIDATES = 0
#: largest magnitude of a coefficient and of a bias (integers, in units of 2^-P)
MAX_COEF = 2**15
MAX_BIAS = 2**23
#: rows per band when applying, and when fitting (bounds the temporary memory on large images)
BAND_ROWS = 256
FIT_BAND_ROWS = 32
#: at most this many feature values per band when fitting (fewer rows in a band of a wide image),
#: and when applying a classified filter
FIT_FEATURE_VALUES = 1 << 21
APPLY_FEATURE_VALUES = 1 << 23

#: whether the encoder tries classified filters (FORMAT.md 7.4) beside the plain ones
CLASSIFIED = True
#: the classified filter (FORMAT.md 7.4): the direction class counts a file may use, the most
#: activity classes, and the radius of the window over which a pixel's gradients are summed
DIRECTION_CLASSES = (1, 5)
MAX_ACTIVITY_CLASSES = 8
CLASS_RADIUS = 2
#: the encoder's classified candidates: their kernel sizes, and the activity classes (the quantiles
#: of the image's own activity) and direction classes it tries (each pair but (1, 1), the plain filter)
ENCODER_CLASS_KERNELS = (3, 5)
ENCODER_ACTIVITY_CLASSES = (1, 2, 4, 8)
ENCODER_DIRECTION_CLASSES = (1, 5)
#: a class with fewer gathered pixels than this many per coefficient gets no filter
MIN_PIXELS_PER_COEF = 8


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
            out += _zigzag_bytes([*self.coefs[o].reshape(-1).tolist(), int(self.bias[o])])
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
        values, pos = _read_zigzag(data, 2, 3 * (3 * t + 1))
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


def _read_varint(data: bytes, pos: int, what: str = "a coefficient") -> tuple[int, int]:
    value = 0
    for n in range(4):
        if pos >= len(data):
            raise ValueError(f"ends inside {what}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * n)
        if not byte & 0x80:
            if byte == 0 and n:
                raise ValueError("a varint that is not the shortest encoding")
            return value, pos
    raise ValueError("a varint longer than 4 bytes")


def _zigzag_bytes(values) -> bytes:
    out = bytearray()
    for v in values:
        out += fmt._varint(2 * v if v >= 0 else -2 * v - 1)
    return bytes(out)


def _read_zigzag(data: bytes, pos: int, n: int) -> tuple[list[int], int]:
    values = []
    for _ in range(n):
        v, pos = _read_varint(data, pos)
        values.append(v // 2 if v % 2 == 0 else -(v + 1) // 2)
    return values, pos


def _varint_bytes(u: np.ndarray) -> np.ndarray:
    """Bytes of the varint of each non-negative integer of ``u``, elementwise."""
    return 1 + (u >= 1 << 7) + (u >= 1 << 14) + (u >= 1 << 21)


def _zigzag_sizes(q: np.ndarray) -> np.ndarray:
    """Bytes of the zigzag varints of the integers ``q``, summed over the last axis."""
    return _varint_bytes(np.where(q >= 0, 2 * q, -2 * q - 1)).sum(-1)


@dataclass
class ClassifiedFilter:
    """The classified post-filter (FORMAT.md 7.4): a pixel's class is ``a * directions + d``, ``a``
    the number of ``thresholds`` below its activity and ``d`` its direction class; ``coefs[c]`` and
    ``bias[c]`` are class c's filter as :class:`PostFilter`'s, applied where ``enabled[c]``."""

    k: int
    fraction_bits: int
    thresholds: np.ndarray  # (A - 1,) int64, strictly increasing, >= 0
    directions: int  # D: 1 or 5
    coefs: np.ndarray  # (A D, 3, 3, T) int64
    bias: np.ndarray  # (A D, 3) int64
    enabled: np.ndarray  # (A D,) bool

    @property
    def classes(self) -> int:
        return (len(self.thresholds) + 1) * self.directions

    def to_bytes(self) -> bytes:
        a = len(self.thresholds) + 1
        out = bytearray([self.k, self.fraction_bits, a, self.directions])
        prev = -1
        for t in self.thresholds.tolist():
            out += fmt._varint(t - prev - 1)
            prev = t
        mask = bytearray((self.classes + 7) // 8)
        for c in np.flatnonzero(self.enabled):
            mask[c // 8] |= 1 << (c % 8)
        out += mask
        for c in np.flatnonzero(self.enabled):
            for o in range(3):
                out += _zigzag_bytes([*self.coefs[c, o].reshape(-1).tolist(), int(self.bias[c, o])])
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClassifiedFilter:
        """Parse a classified block's content; raises ValueError with what is wrong."""
        if len(data) < 4:
            raise ValueError("shorter than its 4-byte head")
        k, p, a, d = data[:4]
        if k not in KERNEL_SIZES:
            raise ValueError(f"kernel size {k} (expected one of {', '.join(map(str, KERNEL_SIZES))})")
        if not 1 <= p <= 15:
            raise ValueError(f"{p} fraction bits (expected 1..15)")
        if not 1 <= a <= MAX_ACTIVITY_CLASSES:
            raise ValueError(f"{a} activity classes (expected 1..{MAX_ACTIVITY_CLASSES})")
        if d not in DIRECTION_CLASSES:
            raise ValueError(f"{d} direction classes (expected one of {', '.join(map(str, DIRECTION_CLASSES))})")
        pos, thresholds, prev = 4, [], -1
        for _ in range(a - 1):
            v, pos = _read_varint(data, pos, "a threshold")
            prev += v + 1
            thresholds.append(prev)
        n = a * d
        mask = data[pos : pos + (n + 7) // 8]
        if len(mask) < (n + 7) // 8:
            raise ValueError("ends inside the class mask")
        pos += len(mask)
        enabled = np.array([bool(mask[c // 8] >> (c % 8) & 1) for c in range(n)])
        if n % 8 and mask[-1] >> (n % 8):
            raise ValueError("a class mask bit set beyond the last class")
        if not enabled.any():
            raise ValueError("no class has a filter")
        t = len(offsets(k))
        coefs = np.zeros((n, 3, 3, t), dtype=np.int64)
        bias = np.zeros((n, 3), dtype=np.int64)
        for c in np.flatnonzero(enabled):
            values, pos = _read_zigzag(data, pos, 3 * (3 * t + 1))
            q = np.array(values, dtype=np.int64).reshape(3, 3 * t + 1)
            coefs[c], bias[c] = q[:, :-1].reshape(3, 3, t), q[:, -1]
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes after the last coefficient")
        if np.abs(coefs).max() >= MAX_COEF or np.abs(bias).max() >= MAX_BIAS:
            raise ValueError("a coefficient out of range")
        return cls(k, p, np.array(thresholds, dtype=np.int64), d, coefs, bias, enabled)



def parse(data: bytes, classified: bool = False) -> PostFilter | ClassifiedFilter:
    """A post-filter block's content (FORMAT.md 7.3, or 7.4 where the file's flags say classified)."""
    return ClassifiedFilter.from_bytes(data) if classified else PostFilter.from_bytes(data)


def gradient_sums(recon: np.ndarray, y0: int, y1: int) -> tuple[np.ndarray, ...]:
    """The classification's four gradient sums (horizontal, vertical, and the two diagonals) of rows
    ``y0 .. y1 - 1``, each (y1 - y0, W) int64 (FORMAT.md 7.4): on the luma ``R + 2 G + B`` of the
    rounded reconstruction, the absolute second differences at every pixel (edges repeated), summed
    over the (2 CLASS_RADIUS + 1)^2 window around the pixel (the differences of positions outside
    the image taken from the nearest pixel of the image)."""
    h, w, _ = recon.shape
    r = CLASS_RADIUS
    la, lb = max(0, y0 - r - 1), min(h, y1 + r + 1)
    q = np.clip(np.floor(recon[la:lb] + np.float32(0.5)), 0, 255).astype(np.int32)  # the sums stay below 2^17
    lum = q[..., 0] + 2 * q[..., 1] + q[..., 2]
    # a repeated row above (below) a band that does not start (end) at the image's edge is never used:
    # the window reaches at most r rows beyond the band, and the differences one more
    p = np.pad(lum, 1, mode="edge")
    c = 2 * lum
    grads = (np.abs(c - p[1:-1, :-2] - p[1:-1, 2:]), np.abs(c - p[:-2, 1:-1] - p[2:, 1:-1]),
             np.abs(c - p[:-2, :-2] - p[2:, 2:]), np.abs(c - p[:-2, 2:] - p[2:, :-2]))
    rows = np.clip(np.arange(y0 - r, y1 + r), 0, h - 1) - la
    cols = np.clip(np.arange(-r, w + r), 0, w - 1)
    n = y1 - y0
    out = []
    for g in grads:
        g = g[rows]  # (n + 2 r, W): the window's rows, repeated beyond the image
        v = g[: n].copy()
        for i in range(1, 2 * r + 1):
            v += g[i : i + n]
        v = v[:, cols]
        s = v[:, :w].copy()
        for i in range(1, 2 * r + 1):
            s += v[:, i : i + w]
        out.append(s.astype(np.int64))
    return tuple(out)


def classes(sums: tuple[np.ndarray, ...], thresholds: np.ndarray, directions: int) -> np.ndarray:
    """Each pixel's class ``a * directions + d`` from its :func:`gradient_sums` (FORMAT.md 7.4)."""
    sh, sv, s1, s2 = sums
    a = np.searchsorted(np.asarray(thresholds, dtype=np.int64), sh + sv, side="left")
    if directions == 1:
        return a
    diagonal = np.maximum(sh, sv) * np.minimum(s1, s2) < np.maximum(s1, s2) * np.minimum(sh, sv)
    d = np.where(diagonal, np.where(s1 > 2 * s2, 3, np.where(s2 > 2 * s1, 4, 0)),
                 np.where(sh > 2 * sv, 1, np.where(sv > 2 * sh, 2, 0)))
    return a * directions + d


def _bands(h: int, r: int, rows: int = BAND_ROWS):
    """(rows of the band, rows read with the band's halo, top and bottom rows repeated at the image edge)."""
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        a, b = max(0, y0 - r), min(h, y1 + r)
        yield y0, y1, a, b, r - (y0 - a), r - (b - y1)


def apply(recon: np.ndarray, pf: PostFilter | ClassifiedFilter) -> np.ndarray:
    """The filtered image: ``recon`` (H, W, 3) float32 code values before rounding -> (H, W, 3) uint8,
    rounded half up and clamped to [0, 255] (FORMAT.md 7.3, 7.4)."""
    if isinstance(pf, ClassifiedFilter):
        return _apply_classified(recon, pf)
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


def _apply_classified(recon: np.ndarray, cf: ClassifiedFilter, labels: np.ndarray | None = None) -> np.ndarray:
    """``labels``: each pixel's class (H, W), if known (the encoder's fit computes them once).  The
    pixels of each class with a filter are gathered, filtered through their point-symmetric
    features (:func:`_feature_rows`) and put back."""
    import torch

    h, w, _ = recon.shape
    r = cf.k // 2
    t = len(offsets(cf.k))
    weights = {int(c): torch.from_numpy(np.concatenate([cf.coefs[c].reshape(3, 3 * t), cf.bias[c][:, None]], axis=1)
                                         .astype(np.float32) / np.float32(2.0**cf.fraction_bits))
               for c in np.flatnonzero(cf.enabled)}  # (3, 3 T + 1) each: the features' order
    out = np.empty((h, w, 3), dtype=np.uint8)
    rows = max(1, min(BAND_ROWS, APPLY_FEATURE_VALUES // (w * (3 * t + 1))))
    with torch.inference_mode():
        for y0, y1, a, b, top, bottom in _bands(h, r, rows):
            feats = torch.from_numpy(_feature_rows(recon[a:b], cf.k, top, bottom, dtype=np.float32))
            label = (classes(gradient_sums(recon, y0, y1), cf.thresholds, cf.directions) if labels is None
                     else labels[y0:y1]).reshape(-1)
            order, ends = _by_class(label, cf.classes)
            order = torch.from_numpy(order)
            y = torch.from_numpy(recon[y0:y1].reshape(-1, 3).T.astype(np.float32))  # (3, pixels), a copy
            for c, wc in weights.items():
                if ends[c + 1] > ends[c]:
                    idx = order[ends[c] : ends[c + 1]]
                    y.index_add_(1, idx, wc @ feats.index_select(1, idx))
            out[y0:y1] = y.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).t().reshape(y1 - y0, w, 3).numpy()
    return out


def _by_class(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(an order of the pixels that puts each class's together, in their order; the ``count + 1``
    bounds of the classes in it): class ``c``'s pixels are ``order[ends[c] : ends[c + 1]]``."""
    order = np.argsort(labels, kind="stable")
    return order, np.searchsorted(labels[order], np.arange(count + 1))


def _features(band: np.ndarray, k: int, top: int, bottom: int, step: int = 1, dtype=np.float64) -> np.ndarray:
    """(rows x W, 3 T + 1) ``dtype`` for every ``step``-th row of the band (from its first): per input
    channel the centre and the sums of each tap pair, then 1 (a transposed view of
    :func:`_feature_rows`)."""
    return _feature_rows(band, k, top, bottom, step, dtype).T


def _feature_rows(band: np.ndarray, k: int, top: int, bottom: int, step: int = 1, dtype=np.float64) -> np.ndarray:
    """:func:`_features` transposed: (3 T + 1, rows x W), each feature one contiguous row."""
    r = k // 2
    p = np.pad(band, ((top, bottom), (r, r), (0, 0)), mode="edge") if r else band
    p = np.ascontiguousarray(p.transpose(2, 0, 1), dtype=dtype)  # (3, rows, W): planes
    hh, ww = p.shape[1] - 2 * r, p.shape[2] - 2 * r
    taps = offsets(k)
    out = np.empty((3 * len(taps) + 1, len(range(0, hh, step)), ww), dtype=dtype)
    for i in range(3):
        for t, (dy, dx) in enumerate(taps):
            a = p[i, r + dy : r + dy + hh : step, r + dx : r + dx + ww]
            if t:
                np.add(a, p[i, r - dy : r - dy + hh : step, r - dx : r - dx + ww], out=out[i * len(taps) + t])
            else:
                out[i * len(taps)] = a
    out[-1] = 1
    return out.reshape(len(out), -1)


def _columns(k: int, kmax: int) -> list[int]:
    """Columns of the K x K features within the ``kmax`` x ``kmax`` ones."""
    small, big = offsets(k), offsets(kmax)
    t = len(big)
    return [i * t + big.index(o) for i in range(3) for o in small] + [3 * t]


def _normal_equations(original: np.ndarray, recon: np.ndarray, kmax: int, row_step: int, labels=None, count: int = 1):
    """(Gram matrix of the ``kmax`` features, their products with the error ``original - recon``,
    the number of pixels gathered, and the Gram matrices and products of each class: (count, n, n),
    (count, n, 3)) over every ``row_step``-th row.  ``labels``: the classes (0 .. count - 1) of the
    gathered pixels in row order; None: all in class 0.

    Each band's sums are taken in float32 (twice the speed of float64) on features centred on
    mid-grey, so that their products stay small, then added up in float64 and moved back to the
    uncentred features exactly: with ``f = A f'``, ``A`` the identity plus the centring offsets
    ``s`` in the constant feature's column, the sums are ``A G' A^T`` and ``A r'``."""
    h, w, _ = recon.shape
    taps = offsets(kmax)
    n = 3 * len(taps) + 1
    grams, rhss, used = np.zeros((count, n, n)), np.zeros((count, n, 3)), 0
    centred = recon - np.float32(128)
    # a band's features hold at most FIT_FEATURE_VALUES numbers, whatever the width
    rows = max(1, min(FIT_BAND_ROWS, FIT_FEATURE_VALUES // (w * n)))
    for y0, y1, a, b, top, bottom in _bands(h, kmax // 2, rows * row_step):  # bands start on a used row
        idx = np.arange(y0, y1, row_step)
        feats = _feature_rows(centred[a:b], kmax, top, bottom, row_step, dtype=np.float32)  # (n, pixels)
        target = (original[idx].astype(np.float32) - recon[idx]).reshape(-1, 3)
        m = feats.shape[1]
        if labels is None or count == 1:
            grams[0] += feats @ feats.T
            rhss[0] += feats @ target
        else:
            order, ends = _by_class(labels[used : used + m], count)
            f, t = feats[:, order], target[order]
            for c in range(count):
                if ends[c + 1] > ends[c]:
                    fc = f[:, ends[c] : ends[c + 1]]
                    grams[c] += fc @ fc.T
                    rhss[c] += fc @ t[ends[c] : ends[c + 1]]
        used += m
    shift = np.eye(n)
    shift[:-1, -1] = [128.0 if t == 0 else 256.0 for _ in range(3) for t in range(len(taps))]
    grams, rhss = shift @ grams @ shift.T, shift @ rhss
    return grams.sum(0), rhss.sum(0), used, (grams, rhss)


def _image_classes(recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(activity int32, direction class of 5 int8), each (H, W) (FORMAT.md 7.4)."""
    h, w, _ = recon.shape
    act, direction = np.empty((h, w), dtype=np.int32), np.empty((h, w), dtype=np.int8)
    rows = max(1, (1 << 18) // w)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        sums = gradient_sums(recon, y0, y1)
        act[y0:y1] = sums[0] + sums[1]
        direction[y0:y1] = classes(sums, (), 5)
    return act, direction


def _labels(act: np.ndarray, direction: np.ndarray, thresholds: np.ndarray, directions: int) -> np.ndarray:
    """Each pixel's class (int8, the shape of ``act``) from its activity and direction class of 5."""
    out = np.empty(act.shape, dtype=np.int8)
    for y0 in range(0, len(act), 64):
        a = np.searchsorted(thresholds, act[y0 : y0 + 64], side="left") * directions
        out[y0 : y0 + 64] = a + direction[y0 : y0 + 64] if directions > 1 else a
    return out


def _quantised_solutions(g: np.ndarray, rhs: np.ndarray, fraction_bits) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares filter of the normal equations ``g``, ``rhs`` rounded at each precision of
    ``fraction_bits`` (:func:`_round_compensated`): (integers (len(fraction_bits), 3, n), each
    rounding's change of the squared error over the gathered pixels, estimated from the equations)."""
    n = len(g)
    g = g + 1e-6 * np.trace(g) / n * np.eye(n)
    ginv = np.linalg.inv(g)
    sol = (ginv @ rhs).T  # (3, n)
    try:
        u = np.linalg.cholesky(ginv).T
    except np.linalg.LinAlgError:  # not positive definite in floating point: round plainly
        u = np.eye(n)
    steps = 2.0 ** np.asarray(fraction_bits, dtype=np.float64)
    rounded = _round_compensated(np.tile(sol, (len(fraction_bits), 1)) * np.repeat(steps, 3)[:, None], u)
    q = rounded.reshape(len(fraction_bits), 3, n).astype(np.int64)
    q[:, :, :-1] = np.clip(q[:, :, :-1], 1 - MAX_COEF, MAX_COEF - 1)
    q[:, :, -1] = np.clip(q[:, :, -1], 1 - MAX_BIAS, MAX_BIAS - 1)
    c = q / steps[:, None, None]
    dsse = np.einsum("poi,ij,poj->p", c, g, c) - 2.0 * np.einsum("poi,io->p", c, rhs)
    return q, dsse


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


def fit(original: np.ndarray, recon: np.ndarray, lam: float, kernel_sizes=None,
        fraction_bits=ENCODER_FRACTION_BITS, row_step: int = 1,
        exact: int | None = None, classified: bool | None = None) -> tuple[PostFilter | ClassifiedFilter | None, dict]:
    """The filter the encoder keeps for this image, or None when none pays for its bytes.

    ``original`` (H, W, 3) uint8, ``recon`` (H, W, 3) float32 code values before rounding (what the
    decoder reconstructs), ``lam``: the rate-distortion trade-off of the training loss
    ``bpp + lam * 255^2 * MSE``, so a change of the squared error by ``dSSE`` (code values, summed
    over the 3 channels) is worth ``lam * dSSE / 3`` bits.

    The normal equations are gathered once on every ``row_step``-th row, for the whole image and,
    with ``classified`` (default ``CLASSIFIED``), for each class of the finest classification tried
    (``max(ENCODER_ACTIVITY_CLASSES)`` activity classes at the quantiles of the image's activity,
    times 5 direction classes; the coarser ones are sums of these).  Each kernel size of
    ``kernel_sizes`` (default ``ENCODER_KERNEL_SIZES``), and each class of each classification of
    ``ENCODER_ACTIVITY_CLASSES`` x ``ENCODER_DIRECTION_CLASSES`` at each of ``ENCODER_CLASS_KERNELS``, is
    solved by least squares and quantised at each precision of ``fraction_bits``
    (:func:`_round_compensated`); a class keeps its filter where the filter pays for its bytes.
    Every candidate's squared error follows from the normal equations without filtering the image;
    with ``exact`` (default ``EXACT_CANDIDATES``) 0 the best by that estimate, less its block's bytes
    (content, length and CRC32), is kept where its estimated gain is positive, and the report is
    ``{(K, P) or ("classified", A, D, P): (None, bytes)}`` of that one.  Otherwise the ``exact``
    best and the best plain filter are applied as a decoder applies them and judged on the whole
    image, and the report is ``{key: (SSE, bytes)}`` of the candidates applied, and "none": the
    SSE without a filter."""
    h, w, _ = recon.shape
    kernel_sizes = ENCODER_KERNEL_SIZES if kernel_sizes is None else kernel_sizes
    classified = CLASSIFIED if classified is None else classified
    exact = EXACT_CANDIDATES if exact is None else exact
    kmax = max((*kernel_sizes, *ENCODER_CLASS_KERNELS) if classified else kernel_sizes)
    labels, fine, quantiles = None, np.zeros(0, dtype=np.int64), {}
    if classified:  # the finest classification tried: the most activity classes, 5 direction classes
        act, direction = _image_classes(recon)
        used_act = act[::row_step]
        # each count's thresholds: the activity's quantiles (the same pixels' values, so that the
        # coarser ones are among the finest)
        quantiles = {a: np.unique(np.quantile(used_act, np.arange(1, a) / a, method="lower")).astype(np.int64)
                     for a in ENCODER_ACTIVITY_CLASSES}
        fine = quantiles[max(ENCODER_ACTIVITY_CLASSES)]
        del used_act
        labels = _labels(act[::row_step], direction[::row_step], fine, 5).reshape(-1)
    count = 5 * (len(fine) + 1) if classified else 1
    gram, rhs, used, per_class = _normal_equations(original, recon, kmax, row_step, labels, count)
    scale = h * w / max(1, used)  # the gathered rows stand for the whole image
    estimates = []
    for k in kernel_sizes:
        cols = _columns(k, kmax)
        t = len(offsets(k))
        q, dsse = _quantised_solutions(gram[np.ix_(cols, cols)], rhs[cols], fraction_bits)
        for p, qp, d in zip(fraction_bits, q, dsse):
            pf = PostFilter(k, p, qp[:, :-1].reshape(3, 3, t), qp[:, -1])
            nbytes = len(pf.to_bytes()) + 8
            estimates.append((lam * -scale * d / 3.0 - 8 * nbytes, pf, nbytes))
    if classified:
        estimates += _classified_candidates(quantiles, per_class, kmax, lam, scale, fraction_bits)
    estimates.sort(key=lambda e: -e[0])
    if not exact:  # the estimate decides
        best = estimates[0] if estimates and estimates[0][0] > 0 else None
        return (None, {}) if best is None else (best[1], {_key(best[1]): (None, best[2])})
    # the best plain filter is judged exactly too: where rows are skipped, the classes' estimates,
    # from fewer pixels each, are the more optimistic
    plain = [e for e in estimates if isinstance(e[1], PostFilter)][:1]
    estimates = estimates[:exact] + [e for e in plain if not any(e is x for x in estimates[:exact])]
    base = _sse(original, recon, rounded=True)
    report: dict = {"none": base}
    best, best_gain = None, 0.0
    for est, pf, nbytes in estimates:
        if est <= 0:
            continue
        if isinstance(pf, ClassifiedFilter):
            filtered = _apply_classified(recon, pf, _labels(act, direction, pf.thresholds, pf.directions))
        else:
            filtered = apply(recon, pf)
        sse = _sse(original, filtered)
        report[_key(pf)] = (sse, nbytes)
        gain = lam * (base - sse) / 3.0 - 8 * nbytes
        if gain > best_gain:
            best, best_gain = pf, gain
    return best, report


def _key(pf: PostFilter | ClassifiedFilter) -> tuple:
    """The candidate's key in :func:`fit`'s report."""
    if isinstance(pf, PostFilter):
        return (pf.k, pf.fraction_bits)
    return ("classified", len(pf.thresholds) + 1, pf.directions, pf.fraction_bits)


def _classified_candidates(quantiles: dict, per_class, kmax: int, lam: float, scale: float, fraction_bits) -> list:
    """(estimated gain in bits, ClassifiedFilter, bytes) for each kernel size of
    ``ENCODER_CLASS_KERNELS``, each classification the encoder tries and each precision, from the
    normal equations ``per_class`` of the finest one (the most activity classes times 5 direction
    classes, of the ``kmax`` features); ``quantiles``: the thresholds of each number of activity
    classes tried."""
    fine = quantiles[max(quantiles)]
    out, seen = [], set()
    for d in ENCODER_DIRECTION_CLASSES:
        for a in ENCODER_ACTIVITY_CLASSES:
            thresholds = quantiles[a]
            if (len(thresholds), d) == (0, 1) or (tuple(thresholds), d) in seen:
                continue
            seen.add((tuple(thresholds), d))
            n = (len(thresholds) + 1) * d
            merged = np.zeros(len(per_class[0]), dtype=np.int64)  # the class each fine class falls in
            for cf in range(len(merged)):
                af, df = divmod(cf, 5)
                ac = 0 if af == 0 else int(np.count_nonzero(thresholds <= fine[af - 1]))
                merged[cf] = ac * d + (df if d > 1 else 0)
            g_all, r_all = np.zeros((n, *per_class[0].shape[1:])), np.zeros((n, *per_class[1].shape[1:]))
            np.add.at(g_all, merged, per_class[0])
            np.add.at(r_all, merged, per_class[1])
            for k in ENCODER_CLASS_KERNELS:
                out += _class_filters(k, thresholds, d, g_all, r_all, _columns(k, kmax), lam, scale, fraction_bits)
    return out


def _class_filters(k: int, thresholds, d: int, g_all, r_all, cols, lam: float, scale: float, fraction_bits) -> list:
    """:func:`_classified_candidates` for one kernel size and classification: the classes' normal
    equations ``g_all``, ``r_all`` (of the ``kmax`` features, ``cols`` those of K x K)."""
    n, ncoef, t = len(g_all), len(cols), len(offsets(k))
    g, r = g_all[:, cols][:, :, cols], r_all[:, cols]
    gains = np.full((len(fraction_bits), n), -np.inf)
    sizes = np.zeros((len(fraction_bits), n), dtype=np.int64)
    q = np.zeros((len(fraction_bits), n, 3, ncoef), dtype=np.int64)
    for c in range(n):
        if g[c, -1, -1] < MIN_PIXELS_PER_COEF * ncoef:  # the constant feature counts the pixels
            continue
        q[:, c], dsse = _quantised_solutions(g[c], r[c], fraction_bits)
        sizes[:, c] = _zigzag_sizes(q[:, c].reshape(len(fraction_bits), -1))
        gains[:, c] = lam * -scale * dsse / 3.0 - 8 * sizes[:, c]
    # the block's head: K, P, A, D, the thresholds, the class mask; then its length and CRC32
    head = 4 + int(_varint_bytes(np.diff(thresholds, prepend=-1) - 1).sum()) + (n + 7) // 8 + 8
    out = []
    for i, p in enumerate(fraction_bits):
        enabled = gains[i] > 0
        if not enabled.any():
            continue
        qp = q[i] * enabled[:, None, None]
        pf = ClassifiedFilter(k, p, thresholds.copy(), d, qp[:, :, :-1].reshape(n, 3, 3, t), qp[:, :, -1], enabled)
        out.append((float(gains[i][enabled].sum()) - 8 * head, pf, head + int(sizes[i][enabled].sum())))
    return out


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
