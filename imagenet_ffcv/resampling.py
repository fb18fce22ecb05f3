"""Bilinear resampling of a decoded crop into the batch, fused with the flip and the normalisation:
the last step of the decoders (``decoders``), in numba. Its common case (2 taps per axis) also runs
in C (``jpeg_region.c``'s ``resample_bilinear``, with the taps of :func:`taps`), which the decoders
use where the C part is built (``image_decode.resampler``).

Pixel centres aligned, as OpenCV's INTER_LINEAR and torchvision's ``antialias=False``; a shrink by
k >= 2 along an axis averages k x k samples (``antialias``: also 2 x 2 for the shrinks in (1, 2)).
``benchmarks/decoder_quality.py`` compares it with PIL's LANCZOS; ``bench_loader.py`` times it.
"""
import numba
import numpy as np


def _compiled(**options):
    """``numba.njit(**options)`` with numba's on-disk cache (``cache=True``): compiled once per
    machine, not in every process. The cache lives in ``__pycache__`` beside this file, or where that
    is read-only in ``NUMBA_CACHE_DIR`` or the user's cache folder, keyed by CPU and source. Where no
    folder can be written, numba raises RuntimeError at decoration: then no cache, compiled per
    process."""
    def decorate(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:
            return numba.njit(**options)(function)
    return decorate


@_compiled(nogil=True, fastmath=True, error_model='numpy')
def _taps(start, step, k, out_n, src_n):
    """Source indices and weights, 2 per sample and k samples per output pixel, of a bilinear
    resampling of pixels ``start .. start + out_n * step`` (pixel-centre aligned, clamped to the
    edge). Returns int64 and float32 arrays (out_n, 2 k); each row's weights sum to 1."""
    index = np.empty((out_n, 2 * k), np.int64)
    weight = np.empty((out_n, 2 * k), np.float32)
    for o in range(out_n):
        for s in range(k):
            f = start + (o + (s + 0.5) / k) * step - 0.5
            f = min(max(f, 0.0), src_n - 1.0)
            i = min(int(f), src_n - 2) if src_n > 1 else 0
            w = f - i
            index[o, 2 * s], index[o, 2 * s + 1] = i, min(i + 1, src_n - 1)
            weight[o, 2 * s], weight[o, 2 * s + 1] = (1 - w) / k, w / k
    return index, weight


@_compiled(nogil=True, fastmath=True, error_model='numpy')
def taps(src_h, src_w, y0, x0, crop_h, crop_w, out_h, out_w, flip, antialias):
    """The taps of :func:`resample` for the rectangle (``y0``, ``x0``, ``crop_h``, ``crop_w``:
    floats, pixel units) of a ``src_h`` x ``src_w`` image resampled to ``out_h`` x ``out_w``:
    ``(row_index, row_weight, col_index, col_weight)``, int64 and float32 arrays (out_h, 2 ky)
    and (out_w, 2 kx), ``col_index`` in elements of a source row (3 per pixel), the columns in
    flipped order if ``flip``. A shrink by k >= 2 along an axis averages k samples along it;
    ``antialias``: ceil(shrink) samples, so 2 in (1, 2) too; else 1 sample (2 taps)."""
    sy, sx = crop_h / out_h, crop_w / out_w
    ky = max(1, int(np.ceil(sy - 1e-6)) if antialias else int(sy))
    kx = max(1, int(np.ceil(sx - 1e-6)) if antialias else int(sx))
    row_index, row_weight = _taps(y0, sy, ky, out_h, src_h)
    col_index, col_weight = _taps(x0, sx, kx, out_w, src_w)
    if flip:  # output column ox takes the taps of column out_w - 1 - ox
        col_index, col_weight = col_index[::-1].copy(), col_weight[::-1].copy()
    col_index *= 3
    return row_index, row_weight, col_index, col_weight


@_compiled(nogil=True, fastmath=True, error_model='numpy')
def resample(src, y0, x0, crop_h, crop_w, dst, flip, mean, inv_std, normalize, antialias=False):
    """Resample the rectangle of ``src`` (uint8 (H, W, 3)) with top-left corner (``y0``, ``x0``)
    and size ``crop_h`` x ``crop_w`` (floats, pixel units) bilinearly into ``dst`` (out_h, out_w, 3),
    pixel centres aligned (as OpenCV's INTER_LINEAR); left-right flipped if ``flip``. A shrink by
    k >= 2 along an axis averages k samples along it (JPEGs arrive DCT-scaled to a shrink below 2);
    ``antialias``: ceil(shrink) samples, so 2 in (1, 2) too (:func:`taps`). ``normalize``: write
    ``(v - mean) * inv_std`` (dst float32), else the rounded value (dst uint8). Compiled by numba
    at its first call with each argument type, and cached on disk. The loaders' decoders run the
    common case (2 taps per axis) in C with the same taps (``image_decode.resampler``).

    Per output row: blend the source rows (contiguous, vectorised; normalised there, since the
    column weights sum to 1), then gather the columns (the flip is folded into their order). One
    loop for any number of taps: the common case of 2 per axis, where speed counts, runs in C.
    """
    out_h, out_w = dst.shape[0], dst.shape[1]
    row_index, row_weight, col_index, col_weight = taps(
        src.shape[0], src.shape[1], y0, x0, crop_h, crop_w, out_h, out_w, flip, antialias)
    lo, hi = col_index.min() // 3, col_index.max() // 3 + 1  # the source columns used
    col_index -= lo * 3
    n = (hi - lo) * 3
    gain = np.ones(n, np.float32)  # per element of a row: v * gain - offset normalises
    offset = np.zeros(n, np.float32)
    if normalize:
        for e in range(n):
            gain[e] = inv_std[e % 3]
            offset[e] = mean[e % 3] * inv_std[e % 3]
    row = np.empty(n, np.float32)
    for oy in range(out_h):
        row[:] = 0
        for t in range(row_index.shape[1]):
            w = row_weight[oy, t]
            source = src[row_index[oy, t]].reshape(-1)[lo * 3:hi * 3]
            for e in range(n):
                row[e] += w * source[e]
        for e in range(n):
            row[e] = row[e] * gain[e] - offset[e]
        out = dst[oy].reshape(-1)
        for ox in range(out_w):
            a0 = a1 = a2 = np.float32(0.0)
            for t in range(col_index.shape[1]):
                c, w = col_index[ox, t], col_weight[ox, t]
                a0 += w * row[c]
                a1 += w * row[c + 1]
                a2 += w * row[c + 2]
            if normalize:
                out[3 * ox], out[3 * ox + 1], out[3 * ox + 2] = a0, a1, a2
            else:
                out[3 * ox] = min(a0 + 0.5, 255.0)
                out[3 * ox + 1] = min(a1 + 0.5, 255.0)
                out[3 * ox + 2] = min(a2 + 0.5, 255.0)
