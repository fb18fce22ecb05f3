"""FFCV image decoders that do the whole per-image job in one pass: random-resized (or centre) crop,
resize, left-right flip and, on CPU, normalisation to float32.

Where ffcv's ``RandomResizedCropRGBImageDecoder`` decodes the whole JPEG, resizes the crop with
OpenCV's INTER_AREA and leaves flip and normalisation to two more passes over the batch, these
decoders
- decode only the crop's rectangle (``jpeg_region.c``: of a JPEG with restart markers, as the
  converter writes them, only the intervals the rectangle covers; of any other, libjpeg-turbo's
  partial decompression), and when the crop is at least twice the output size, decode it
  DCT-scaled by 1/2, 1/4 or 1/8, so that what is left is a shrink of less than 2 (the idea of
  TensorFlow's ``decode_and_crop_jpeg`` and of DALI's ROI decoding);
- resample bilinearly (pixel centres aligned, as OpenCV's INTER_LINEAR and torchvision's
  ``antialias=False``; an image stored raw and shrunk by k >= 2 is averaged over k x k samples;
  ``antialias``: 2 x 2 samples for the shrinks in (1, 2) too) and write the flipped, normalised
  pixel straight into the batch (``resampling``). ``benchmarks/bench_loader.py`` measures the
  difference.
The C part is built when the package is installed (setup.py) and loaded by ``jpeg_region``; if it is
missing (or older than its source), the whole image is decoded with ffcv's own (DCT-scaled) decoder
instead, with a warning.

Both decoders keep ffcv's interface: ``output_size`` may be changed between epochs. The crop and the
flip of each image are a pure function of (seed, epoch, sample index) (``crops``): ``epoch`` is set
before each epoch (``loaders.Loader`` does it), so runs with the same seed see the same images.
"""
import ctypes
from dataclasses import dataclass, replace

import numba
import numpy as np
from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from numba.core import cgutils
from numba.extending import intrinsic

from . import resampling
from .constants import DEFAULT_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from .crops import center_crop, flipped, random_resized_crop, sample_key
from .jpeg_region import c_function, region_decoder
from .resampling import resample

MARGIN = 2  # decoded rows/columns beyond the sampled ones, where partial decoding may differ
PARALLEL_CHUNK = 1  # images a loader thread takes at a time as it gets free (0: equal shares)


@numba.njit(nogil=True)  # also called by the decoders' compiled code
def dct_scale(shrink: float) -> int:
    """The JPEG DCT scaling denominator (1, 2, 4 or 8) that leaves a shrink below 2."""
    denom = 1
    while denom < 8 and shrink >= 2 * denom:
        denom *= 2
    return denom


@intrinsic
def fetch_add(typingctx, counter, value):
    """``counter[0] += value`` in one atomic step (LLVM's ``atomicrmw add``) in compiled code,
    returning the value before: ``counter`` an int64 array, ``value`` an int64."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        first = cgutils.get_item_pointer(context, builder, array_type, array,
                                         [context.get_constant(numba.types.intp, 0)])
        return builder.atomic_rmw('add', first, args[1], 'monotonic')
    return numba.types.int64(counter, numba.types.int64), codegen


@numba.njit(nogil=True)  # called by the decoders' compiled code
def take_images(counter, chunk, count):
    """The next ``chunk`` images of a batch of ``count`` for the thread that asks: ``(first,
    last)``, the images ``first .. last - 1``; none left when ``first >= last``. ``counter`` (int64
    array of one element, 0 at the batch's start) is shared by the batch's threads, which so take
    images as they get free (OpenMP's ``schedule(dynamic, chunk)``) whatever numba's threading
    layer: numba's own dynamic scheduling (``numba.set_parallel_chunksize``) works with TBB only,
    its OpenMP and workqueue layers split a loop into one equal share per thread
    (docs/performance.md, Threads; tests/test_data.py runs this function under each)."""
    first = fetch_add(counter, chunk)
    return first, min(first + chunk, count)


@numba.njit(nogil=True)  # called by the decoders' compiled code
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


def _image_decoder(read_region, partial: bool, resample_image):
    """``decode_image(data, is_jpeg, height, width, i, j, h, w, buf, info, out, flip, mean,
    inv_std, normalize, antialias) -> code``: one stored image record (JPEG bytes, or raw pixels
    when not ``is_jpeg``) of ``height`` x ``width`` px, its crop (``i``, ``j``, ``h``, ``w``: top,
    left, height, width in px) decoded (``jpeg_window``, ``read_region`` into ``buf``, a uint8
    buffer of at least ``height * width * 3``; ``info``: int64 (2,)) and resampled into ``out``
    ((H, W, 3), float32 when ``normalize`` else uint8; ``resample_image``, from
    :func:`resampler`). Returns 0, or
    the negative code of a JPEG that did not decode (``out`` is then left as it was). Both the
    loaders' decoders and :func:`decode_crop` run it: the one path from stored bytes to pixels."""
    def decode_image(data, is_jpeg, height, width, i, j, h, w, buf, info, out, flip, mean,
                     inv_std, normalize, antialias):
        if not is_jpeg:
            resample_image(data.reshape(height, width, 3), i, j, h, w, out, flip, mean, inv_std,
                           normalize, antialias)
            return 0
        denom, top, left, rows, cols, y0, x0, ch, cw = jpeg_window(
            height, width, i, j, h, w, out.shape[0], out.shape[1], partial)
        code = read_region(data, buf, top, left, rows, cols, denom, info, height, width)
        if code < 0:
            return code
        decoded_w = info[1]
        src = buf[:rows * decoded_w * 3].reshape(rows, decoded_w, 3)
        resample_image(src, y0 - top, x0 - info[0], ch, cw, out, flip, mean, inv_std, normalize,
                       antialias)
        return 0
    return decode_image


_compiled_decoders = {}  # partial (bool: the region reader's kind) -> decode_image, compiled


def compiled_image_decoder():
    """The ``decode_image`` of :func:`_image_decoder` for this process's region reader and
    resampler, compiled with ffcv's Compiler (the loaders' numba options), made once per process
    (per kind of region reader): every loader's decoder and :func:`decode_crop` call this one
    function, so numba compiles it for each argument type at its first call only, not again for
    each loader."""
    partial = region_decoder() is not None  # as _region_reader decides, without making one
    if partial not in _compiled_decoders:
        read_region, partial = _region_reader()
        _compiled_decoders[partial] = Compiler.compile(_image_decoder(
            Compiler.compile(read_region), partial, resampler()))
    return _compiled_decoders[partial]


def normalization(mean, std) -> tuple:
    """``(mean, inv_std)`` as the decoders use them: float32 (3,) arrays, ``inv_std`` = 1 / std
    computed in float64 (0-255 pixel units)."""
    return (np.asarray(mean, np.float32),
            (1 / np.asarray(std, np.float64)).astype(np.float32))


def decode_crop(record: np.ndarray, *, height: int, width: int, crop: tuple, size: tuple,
                flip: bool = False, normalize: bool = True, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, antialias: bool = False, is_jpeg: bool = True) -> np.ndarray:
    """The pixels the loaders' decoders write for one stored image record: ``record`` the JPEG
    bytes (uint8 (N,); raw RGB pixels (height * width * 3,) when not ``is_jpeg``) of a
    ``height`` x ``width`` px image, ``crop`` ``(top, left, h, w)`` in px, resized to ``size``
    ``(H, W)``, flipped left-right when ``flip``, normalised with ``mean``/``std`` (0-255 units)
    when ``normalize``. Returns (H, W, 3) float32 (normalised) or uint8. The loaders' compiled
    function (:func:`compiled_image_decoder`), so the result equals the loader's batch row bit for
    bit. Raises ValueError for a JPEG that does not decode."""
    mean32, inv_std = normalization(mean, std)
    out = np.empty((*size, 3), np.float32 if normalize else np.uint8)
    code = compiled_image_decoder()(
        np.ascontiguousarray(record, np.uint8), is_jpeg, np.int64(height), np.int64(width),
        *(np.int64(v) for v in crop), np.empty(height * width * 3, np.uint8),
        np.zeros(2, np.int64), out, bool(flip), mean32, inv_std, bool(normalize), bool(antialias))
    if code < 0:
        raise ValueError(f'the JPEG record does not decode (code {code})')
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
    key = sample_key(seed, epoch, index)
    crop = random_resized_crop(height, width, np.array(scale, np.float64),
                               np.array(ratio, np.float64), key)
    return decode_crop(record, height=height, width=width, crop=crop, size=(res, res),
                       flip=flipped(key, flip_prob), **options)


@dataclass(frozen=True)
class ScratchQuery(AllocationQuery):
    """ffcv's AllocationQuery for a decoder's scratch memory: host memory that the decoder's
    threads use one ``shape`` row each (``rows``: at most that many are used, the thread pool's
    size) and that never goes to the GPU. ``loaders.allocate`` gives it ``rows`` rows (fewer for a
    smaller batch) of plain, unpinned memory per slot of the loader's ring; ffcv 1.0.2 allocates
    every query as one row per image of the batch, pinned on a CUDA machine."""
    rows: int = 1


# A subclass of ffcv's decoder class for RGBImageField: ffcv takes the first op of a pipeline as
# the field's decoder only if it is one.
class CropResizeDecoder(SimpleRGBImageDecoder):
    """Decode, crop, resize, flip (and normalise) :class:`ffcv.fields.RGBImageField` images.

    center: the crop is ``crops.center_crop`` (``ratio`` a float), else
    ``crops.random_resized_crop`` (``scale`` and ``ratio`` pairs), drawn from the key
    ``crops.sample_key(seed, epoch, sample index)``, which also decides the flip. Output per
    image: float32 (H, W, 3) normalised with ``mean``/``std`` (0-255 units) when ``normalize``,
    else uint8 (H, W, 3).
    """

    def __init__(self, output_size, *, center: bool, scale, ratio, flip_prob: float,
                 normalize: bool, mean, std, seed: int = 0, antialias: bool = False):
        super().__init__()
        self.antialias = bool(antialias)  # see resample
        self.output_size = tuple(output_size)
        self.center = bool(center)
        self.scale = np.array(scale, np.float64)
        self.ratio = np.array(ratio, np.float64).reshape(-1)  # (1,) for the centre crop
        self.flip_prob, self.normalize = float(flip_prob), bool(normalize)
        self.mean, self.inv_std = normalization(mean, std)
        if seed < 0:
            raise ValueError(f'seed={seed} must be >= 0')
        self.seed = int(seed)
        # The epoch, read by the compiled code at each batch from this array's address (numba
        # freezes captured arrays, so it copies the value with ctypes.memmove).
        self._epoch_cell = np.zeros(1, np.int64)
        # Written the same way by the compiled code: the index of a sample whose JPEG record did
        # not decode (-1: none), which comes out as a black image.
        self._corrupt_cell = np.full(1, -1, np.int64)

    @property
    def epoch(self) -> int:
        """The epoch whose crops are drawn (set before iterating the loader for that epoch)."""
        return int(self._epoch_cell[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch_cell[0] = value

    @property
    def corrupt_sample(self):
        """The index (in the .beton) of a sample whose JPEG record did not decode since this
        decoder was made (corrupt bytes: it came out black), or None."""
        index = int(self._corrupt_cell[0])
        return None if index < 0 else index

    def declare_state_and_memory(self, previous_state):
        max_h = np.uint64(self.metadata['height'].max())
        max_w = np.uint64(self.metadata['width'].max())
        dtype = np.dtype(np.float32 if self.normalize else np.uint8)
        shape = (self.output_size[0], self.output_size[1], 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                (AllocationQuery(shape, dtype),
                 ScratchQuery((max_h * max_w * np.uint64(3),), np.dtype('<u1'),
                              rows=numba.config.NUMBA_NUM_THREADS),
                 AllocationQuery((2,), np.dtype('<i8'))))

    def generate_code(self):
        decode_batch = batch_decoder(parallel=Compiler.num_threads > 1)
        mem_read = self.memory_read  # compiled once per process (loaders._reader)
        scale, ratio, flip_prob = self.scale, self.ratio, self.flip_prob
        mean, inv_std, epoch_address = self.mean, self.inv_std, self._epoch_cell.ctypes.data
        normalize, antialias = self.normalize, self.antialias  # compile-time choices
        # The integers as an array's elements: numba types an integer or bool constant as its
        # value (a literal), and would compile decode_batch again for each seed, address or crop
        ints = np.array([self.seed, self.center, PARALLEL_CHUNK, self._corrupt_cell.ctypes.data],
                        np.int64)
        memmove = ctypes.memmove

        # Compiled for each loader (a small function: its constants are this decoder's); the
        # work is decode_batch's, compiled once per process
        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp, info = my_storage
            epoch = np.zeros(1, np.int64)
            memmove(epoch.ctypes.data, epoch_address, 8)
            decode_batch(batch_indices, metadata, storage_state, destination, temp, info, mem_read,
                         ints[1] != 0, scale, ratio, ints[0], epoch[0], flip_prob, mean, inv_std,
                         normalize, antialias, ints[2], ints[3])
            return destination[:len(batch_indices)]

        return decode


_batch_decoders = {}  # (parallel, partial) -> decode_batch, compiled


def batch_decoder(parallel: bool):
    """``decode_batch(batch_indices, metadata, storage_state, destination, temp, info, mem_read,
    center, scale, ratio, seed, epoch, flip_prob, mean, inv_std, normalize, antialias, chunk,
    corrupt_address)``, the work of :class:`CropResizeDecoder`'s compiled code for one batch:
    each image of ``batch_indices`` (uint64 (B,), sample indices) read with ``mem_read`` (ffcv's
    memory manager's reader, from ``metadata`` and ``storage_state``), cropped (``center``: as
    :class:`CropResizeDecoder`), flipped and resampled into ``destination[k]`` by
    :func:`compiled_image_decoder`, with a row of ``temp`` (per thread; per image for a batch
    smaller than numba's thread pool) and of ``info`` as its scratch. A record that does not
    decode comes out as zeros, and its sample index is written to the int64 at
    ``corrupt_address``. With ``parallel``, the images are shared among the loader's threads,
    ``chunk`` at a time as they get free (:func:`take_images`; 0: an equal share each).

    Compiled with ffcv's Compiler's options, once per process for each ``parallel`` (and kind
    of region reader): every loader, train or val, calls it with its own values as arguments, so
    numba compiles the batch loop, the largest piece of a loader's code (4 s on 2 cores), at the
    first loader's first batch, and again only for another memory manager's reader, output
    dtype (``normalize``) or ``antialias``, not for each loader (``tests/test_decoders.py``)."""
    partial = region_decoder() is not None
    if (parallel, partial) in _batch_decoders:
        return _batch_decoders[parallel, partial]
    decode_image = compiled_image_decoder()
    jpg, pool_size, memmove = IMAGE_MODES['jpg'], numba.config.NUMBA_NUM_THREADS, ctypes.memmove
    my_range = numba.prange if parallel else range

    @numba.njit(nogil=True)
    def decode_one(k, batch_indices, metadata, storage_state, destination, temp, info, mem_read,
                   center, scale, ratio, seed, epoch, flip_prob, mean, inv_std, normalize,
                   antialias, corrupt_address):
        field = metadata[batch_indices[k]]
        data = mem_read(field['data_ptr'], storage_state)
        height, width = np.int64(field['height']), np.int64(field['width'])
        key = sample_key(seed, epoch, batch_indices[k])
        if center:
            i, j, h, w = center_crop(height, width, scale, ratio[0], key)
        else:
            i, j, h, w = random_resized_crop(height, width, scale, ratio, key)
        # One decode buffer per thread rather than per image, so that it stays in the CPU
        # cache (thread ids are below the pool size; small batches: per image).
        slot = np.int64(k)
        if len(temp) >= pool_size:
            slot = np.int64(numba.get_thread_id())
        code = decode_image(data, field['mode'] == jpg, height, width, i, j, h, w, temp[slot],
                            info[k], destination[k], flipped(key, flip_prob), mean, inv_std,
                            normalize, antialias)
        if code < 0:  # corrupt record (imagenet-ffcv-write --verify finds it): zeros, noted
            destination[k][:] = 0
            info[k, 0] = batch_indices[k]
            memmove(corrupt_address, info[k].ctypes.data, 8)

    def decode_batch(batch_indices, metadata, storage_state, destination, temp, info, mem_read,
                     center, scale, ratio, seed, epoch, flip_prob, mean, inv_std, normalize,
                     antialias, chunk, corrupt_address):
        # The threads take `chunk` images at a time as they get free, not an equal share each:
        # crops cost 0.1-1x of a whole image to decode, and the batch waits for its last image
        # (benchmarks/loader_scaling.py measures it)
        count = len(batch_indices)
        workers = min(numba.get_num_threads(), count)
        share = chunk if chunk > 0 else -(-count // workers)
        counter = np.zeros(1, np.int64)
        for _ in my_range(workers):
            first, last = take_images(counter, share, count)
            while first < last:
                for k in range(first, last):
                    decode_one(k, batch_indices, metadata, storage_state, destination, temp,
                               info, mem_read, center, scale, ratio, seed, epoch, flip_prob,
                               mean, inv_std, normalize, antialias, corrupt_address)
                first, last = take_images(counter, share, count)

    decode_batch.is_parallel = parallel
    _batch_decoders[parallel, partial] = Compiler.compile(decode_batch)
    return _batch_decoders[parallel, partial]


def random_resized_crop_decoder(output_size, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                flip_prob: float = 0.5, normalize: bool, mean, std,
                                seed: int = 0, antialias: bool = False):
    """Training decoder: random-resized crop (Szegedy et al. 2015, as torchvision's
    ``RandomResizedCrop``: area fraction from ``scale``, aspect ratio log-uniform in ``ratio``,
    the whole image clamped to the ratio range after 10 failed draws; ``crops``) to
    ``output_size`` (H, W) px, then a left-right flip with probability ``flip_prob``, both drawn
    from (``seed``, epoch, sample index). Output as :class:`CropResizeDecoder`."""
    return CropResizeDecoder(output_size, center=False, scale=scale, ratio=ratio,
                             flip_prob=flip_prob, normalize=normalize, mean=mean, std=std,
                             seed=seed, antialias=antialias)


def center_crop_decoder(output_size, *, ratio: float, normalize: bool, mean, std,
                        antialias: bool = False):
    """Validation decoder: the central square of side ``ratio`` x the shorter side (224/256 is
    the classic centre crop), resized to ``output_size`` (H, W) px; ffcv's ``get_center_crop``."""
    return CropResizeDecoder(output_size, center=True, scale=(0.0, 0.0), ratio=ratio,
                             flip_prob=0.0, normalize=normalize, mean=mean, std=std,
                             antialias=antialias)
