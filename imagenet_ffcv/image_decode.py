"""One stored image record to the pixels of its crop: what the loaders' decoders (``decoders``)
do for each image, and what :func:`decode_crop` does for one record outside a loader (prediction,
benchmarks), with the same compiled function, so that both give the same pixels bit for bit.

- Only the crop's rectangle of the JPEG is decoded (``jpeg_region.c``: of a JPEG with restart
  markers, as the converter writes them, only the intervals the rectangle covers; of any other,
  libjpeg-turbo's partial decompression), and when the crop is at least twice the output size,
  DCT-scaled by 1/2, 1/4 or 1/8, so that what is left is a shrink of less than 2 (the idea of
  TensorFlow's ``decode_and_crop_jpeg`` and of DALI's ROI decoding).
- It is resampled bilinearly (pixel centres aligned, as OpenCV's INTER_LINEAR and torchvision's
  ``antialias=False``; an image stored raw and shrunk by k >= 2 is averaged over k x k samples;
  ``antialias``: 2 x 2 samples for the shrinks in (1, 2) too), flipped and normalised straight
  into the output (``resampling``).
The C part is built when the package is installed (setup.py) and loaded by ``jpeg_region``; if it
is missing (or older than its source), the whole image is decoded with ffcv's own (DCT-scaled)
decoder instead, with a warning.
"""
import numba
import numpy as np
from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.libffcv import imdecode
from ffcv.pipeline.compiler import Compiler

from . import resampling
from .constants import DEFAULT_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from .crops import center_crop, flipped, random_resized_crop, sample_key
from .errors import InputError
from .jpeg_region import c_function, region_decoder
from .resampling import resample

MARGIN = 2  # decoded rows/columns beyond the sampled ones, where partial decoding may differ


@numba.njit(nogil=True)  # also called by decode_image's compiled code
def dct_scale(shrink: float) -> int:
    """The JPEG DCT scaling denominator (1, 2, 4 or 8) that leaves a shrink below 2."""
    denom = 1
    while denom < 8 and shrink >= 2 * denom:
        denom *= 2
    return denom


@numba.njit(nogil=True)  # called by decode_image's compiled code
def jpeg_window(height, width, i, j, h, w, out_h, out_w, partial):
    """What to decode of a ``height`` x ``width`` JPEG for the crop (``i``, ``j``, ``h``, ``w``)
    (top, left, height, width in px) resized to ``out_h`` x ``out_w``: the DCT scale ``denom``, the
    rows ``top .. top + rows`` and columns ``left .. left + cols`` of the image scaled by
    1/``denom`` (the crop plus MARGIN, or the whole scaled image when not ``partial``), and the crop
    in scaled units ``(y0, x0, ch, cw)``. Returns the tuple (denom, top, left, rows, cols, y0, x0,
    ch, cw)."""
    denom = dct_scale(min(h / out_h, w / out_w))
    scaled_h, scaled_w = (height + denom - 1) // denom, (width + denom - 1) // denom
    y0, x0, ch, cw = i / denom, j / denom, h / denom, w / denom
    if partial:
        top = max(0, int(y0) - MARGIN)
        bottom = min(scaled_h, int(np.ceil(y0 + ch)) + MARGIN)
        left = max(0, int(x0) - MARGIN)
        right = min(scaled_w, int(np.ceil(x0 + cw)) + MARGIN)
    else:
        top, bottom, left, right = 0, scaled_h, 0, scaled_w
    return denom, top, left, bottom - top, right - left, y0, x0, ch, cw


def _region_reader():
    """``read_region(data, buf, top, left, rows, cols, denom, info, height, width) -> code`` for
    the decoders' compiled code: ``jpeg_region.c``'s partial decode, or (when it cannot be built)
    ffcv's whole-image decode at the DCT scale. Returns ``(read_region, partial)``."""
    region_c = region_decoder()
    if region_c is not None:
        def read_region(data, buf, top, left, rows, cols, denom, info, height, width):
            return region_c(data.ctypes.data, data.size, buf.ctypes.data, buf.size, top,
                            left, rows, cols, denom, info.ctypes.data)
        return read_region, True
    imdecode_c = Compiler.compile(imdecode)

    def read_whole(data, buf, top, left, rows, cols, denom, info, height, width):
        info[0] = 0
        info[1] = cols
        return imdecode_c(data, buf, height, width, height, width, 0, 0, 1, denom, False, False)
    return read_whole, False


def resampler():
    """``resample_image(src, y0, x0, crop_h, crop_w, out, flip, mean, inv_std, normalize,
    antialias)``, compiled, for the decoders' compiled code, as ``resampling.resample``: its taps
    (``resampling.taps``), applied by ``jpeg_region.c``'s ``resample_bilinear`` where there are 2
    per axis (the common case: a shrink below 2 without antialias; 1.4-1.5x faster), else, and
    where the C part is not built, by ``resampling.resample`` itself. Returns the number of taps."""
    if region_decoder() is None:
        return resample
    kernel, taps = c_function('resample_bilinear'), resampling.taps

    def resample_image(src, y0, x0, crop_h, crop_w, out, flip, mean, inv_std, normalize,
                       antialias):
        row_index, row_weight, col_index, col_weight = taps(
            src.shape[0], src.shape[1], y0, x0, crop_h, crop_w, out.shape[0], out.shape[1], flip,
            antialias)
        code = -1
        if row_index.shape[1] == 2 and col_index.shape[1] == 2:
            first, last = col_index.min(), col_index.max()
            code = kernel(src.ctypes.data, src.shape[1] * 3, row_index.ctypes.data,
                          row_weight.ctypes.data, col_index.ctypes.data, col_weight.ctypes.data,
                          first, last + 3 - first, out.ctypes.data, out.shape[0], out.shape[1],
                          mean.ctypes.data, inv_std.ctypes.data, np.int32(normalize))
        if code != 0:
            resample(src, y0, x0, crop_h, crop_w, out, flip, mean, inv_std, normalize, antialias)
        # numba frees an array after its last use and .ctypes.data is only an address: the taps
        # are used once more after the C call, so that they outlive it
        return row_index.size + row_weight.size + col_index.size + col_weight.size
    return Compiler.compile(resample_image)


# What decode_image takes, its arrays by address (a C function's signature): compiled as a C
# function, it is called by its address from the loaders' compiled code. Linked into that code
# instead, it would be optimised again by LLVM in each function that calls it (the batch loop, its
# parallel body, each loader's wrapper, ffcv's pipeline): about 7 s more at a process's first
# loader and 1 s at each later one (2-core VM; docs/ffcv-notes.md).
_pointer, _int, _bool = numba.types.voidptr, numba.types.int64, numba.types.boolean
DECODE_SIGNATURE = _int(_pointer, _int, _bool, _int, _int, _int, _int, _int, _int, _pointer, _int,
                        _pointer, _pointer, _int, _int, _bool, _pointer, _pointer, _bool)
# decode_image's code for success; not 0, which a C function returns when code in it raised
# (numba prints the exception and returns a zeroed value)
DECODED = 1
BAD_RECORD = -100  # decode_image's code for a raw record too short for its image


def output_dtype(normalize: bool) -> np.dtype:
    """The dtype of the decoders' pixels: float32 normalised when ``normalize``, else uint8."""
    return np.dtype(np.float32 if normalize else np.uint8)


def _image_decoder(read_region, partial: bool, resample_image, normalize: bool):
    """``decode_image(data, size, is_jpeg, height, width, i, j, h, w, buf, buf_size, info, out,
    out_h, out_w, flip, mean, inv_std, antialias) -> code``, the arrays given by their addresses
    (:data:`DECODE_SIGNATURE`): one stored image record (``size`` bytes: JPEG, or raw pixels when
    not ``is_jpeg``) of ``height`` x ``width`` px, its crop (``i``, ``j``, ``h``, ``w``: top, left,
    height, width in px) decoded (``jpeg_window``, ``read_region`` into ``buf``, a uint8 buffer of
    ``buf_size`` bytes, at least ``height * width * 3``; ``info``: int64 (2,)) and resampled into
    ``out`` (:func:`output_dtype` (out_h, out_w, 3): float32 normalised with ``mean`` and
    ``inv_std`` (float32 (3,)) when ``normalize``, else uint8; ``resample_image``, from
    :func:`resampler`). Returns :data:`DECODED`, or a negative code for a record that did not
    decode (``out`` is then left as it was): the JPEG decoder's, or :data:`BAD_RECORD` for a raw
    record shorter than its pixels; 0 where code in it raised (numba prints the exception: a C
    function cannot raise).

    Both the loaders' decoders and :func:`decode_crop` run it: the one path from stored bytes to
    pixels. Raw pixels are resampled where they are stored, not copied into ``buf`` first (the
    copy cost raw records about 10 % of the loader's rate), with the crop given as floats, as
    the JPEG path gives it, so that ``resample_image`` (and the ``resampling`` functions it calls)
    is compiled once for both kinds."""
    out_dtype = output_dtype(normalize).type  # the scalar type, as numba.carray takes it

    def decode_image(data_p, size, is_jpeg, height, width, i, j, h, w, buf_p, buf_size, info_p,
                     out_p, out_h, out_w, flip, mean_p, inv_std_p, antialias):
        data = numba.carray(data_p, (size,), np.uint8)
        buf = numba.carray(buf_p, (buf_size,), np.uint8)
        info = numba.carray(info_p, (2,), np.int64)
        out = numba.carray(out_p, (out_h, out_w, 3), out_dtype)
        mean = numba.carray(mean_p, (3,), np.float32)
        inv_std = numba.carray(inv_std_p, (3,), np.float32)
        if not is_jpeg:
            if size < height * width * 3:
                return BAD_RECORD
            # the crop as floats, as for a JPEG below: one compile of resample_image serves both
            resample_image(data[:height * width * 3].reshape(height, width, 3), float(i),
                           float(j), float(h), float(w), out, flip, mean, inv_std, normalize,
                           antialias)
            return DECODED
        denom, top, left, rows, cols, y0, x0, ch, cw = jpeg_window(
            height, width, i, j, h, w, out_h, out_w, partial)
        code = read_region(data, buf, top, left, rows, cols, denom, info, height, width)
        if code < 0:
            return code
        decoded_w = info[1]
        src = buf[:rows * decoded_w * 3].reshape(rows, decoded_w, 3)
        resample_image(src, y0 - top, x0 - info[0], ch, cw, out, flip, mean, inv_std, normalize,
                       antialias)
        return DECODED
    return decode_image


_compiled_decoders = {}  # (partial: the region reader's kind, normalize) -> decode_image


def compiled_image_decoder(normalize: bool):
    """The ``decode_image`` of :func:`_image_decoder` for this process's region reader and
    resampler, writing float32 normalised pixels when ``normalize``, else uint8: a numba
    ``cfunc`` (C function; call its ``.ctypes``) compiled with ffcv's numba options, made once per
    process (per kind of region reader and output dtype): every loader's decoder and
    :func:`decode_crop` call this one function, compiled once."""
    key = (region_decoder() is not None, bool(normalize))  # as _region_reader decides
    if key not in _compiled_decoders:
        read_region, partial = _region_reader()
        decode_image = _image_decoder(Compiler.compile(read_region), partial, resampler(),
                                      bool(normalize))
        _compiled_decoders[key] = numba.cfunc(DECODE_SIGNATURE, fastmath=True,
                                              error_model='numpy')(decode_image)
    return _compiled_decoders[key]


def normalization(mean, std) -> tuple:
    """``(mean, inv_std)`` as the decoders use them: C-contiguous float32 (3,) arrays (the
    per-image C function reads 3 values at their address), ``inv_std`` = 1 / std computed in
    float64 (0-255 pixel units). Raises ValueError unless ``mean`` and ``std`` hold 3 values, one
    per RGB channel."""
    for name, value in (('mean', mean), ('std', std)):
        if np.shape(value) != (3,):
            raise InputError(f'{name}={value!r}: expected 3 values, one per RGB channel')
    return (np.ascontiguousarray(mean, np.float32),
            np.ascontiguousarray(1 / np.asarray(std, np.float64), np.float32))


def decode_crop(record: np.ndarray, *, height: int, width: int, crop: tuple, size: tuple,
                flip: bool = False, normalize: bool = True, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, antialias: bool = False, is_jpeg: bool = True) -> np.ndarray:
    """The pixels the loaders' decoders write for one stored image record: ``record`` the JPEG
    bytes (uint8 (N,); raw RGB pixels (height * width * 3,) when not ``is_jpeg``) of a
    ``height`` x ``width`` px image, ``crop`` ``(top, left, h, w)`` in px, resized to ``size``
    ``(H, W)``, flipped left-right when ``flip``, normalised with ``mean``/``std`` (0-255 units)
    when ``normalize``. Returns (H, W, 3) float32 (normalised) or uint8. The loaders' compiled
    function (:func:`compiled_image_decoder`), so the result equals the loader's batch row bit for
    bit. Raises ValueError for a record that does not decode (a corrupt JPEG, or raw pixels too
    short for the image) and for a ``size`` without 2 sides of at least 1 px."""
    if len(size) != 2 or min(size) < 1:
        raise InputError(f'size={size!r}: expected (H, W), each at least 1 px')
    mean32, inv_std = normalization(mean, std)
    out = np.empty((*size, 3), output_dtype(normalize))
    record = np.ascontiguousarray(record, np.uint8)
    buf, info = np.empty(height * width * 3, np.uint8), np.zeros(2, np.int64)
    code = compiled_image_decoder(normalize).ctypes(
        record.ctypes.data, record.size, bool(is_jpeg), int(height), int(width),
        *(int(v) for v in crop), buf.ctypes.data, buf.size, info.ctypes.data, out.ctypes.data,
        int(size[0]), int(size[1]), bool(flip), mean32.ctypes.data, inv_std.ctypes.data,
        bool(antialias))
    if code != DECODED:
        problem = ('an error in the compiled code, printed above' if code == 0 else
                   'a corrupt JPEG' if is_jpeg else 'raw pixels too short for the image')
        raise InputError(f'the record does not decode (code {code}: {problem})')
    return out


def center_crop_pixels(record: np.ndarray, *, height: int, width: int, res: int,
                       ratio: float = DEFAULT_CROP_RATIO, **options) -> np.ndarray:
    """:func:`decode_crop` of the validation crop (``crops.center_crop``: the central square of
    ``ratio`` x the shorter side) resized to ``res`` x ``res``: what the val loader (and
    :func:`center_crop_decoder`) gives for this record. ``options``: those of decode_crop."""
    crop = center_crop(height, width, np.zeros(2), float(ratio), np.uint64(0))
    return decode_crop(record, height=height, width=width, crop=crop, size=(res, res), **options)


def random_crop_pixels(record: np.ndarray, *, height: int, width: int, res: int, seed: int,
                       epoch: int, index: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                       flip_prob: float = 0.5, **options) -> np.ndarray:
    """:func:`decode_crop` of the training crop and flip of sample ``index`` in ``epoch`` for
    ``seed`` (``crops.random_resized_crop``, ``crops.flipped``) resized to ``res`` x ``res``: what
    the train loader (and :func:`random_resized_crop_decoder`) gives for this record."""
    key = np.uint64(sample_key(seed, epoch, index))  # numba returns it as a Python int
    crop = random_resized_crop(height, width, np.array(scale, np.float64),
                               np.array(ratio, np.float64), key)
    return decode_crop(record, height=height, width=width, crop=crop, size=(res, res),
                       flip=flipped(key, flip_prob), **options)
