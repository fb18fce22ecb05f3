"""FFCV image decoders that do the whole per-image job in one pass: random-resized (or centre) crop,
resize, left-right flip and, on CPU, normalisation to float32.

Where ffcv's ``RandomResizedCropRGBImageDecoder`` decodes the whole JPEG, resizes the crop with
OpenCV's INTER_AREA and leaves flip and normalisation to two more passes over the batch, these
decoders decode only the crop's rectangle, DCT-scaled where the crop is at least twice the output
size, and resample it, flipped and normalised, straight into the batch (``image_decode``: the
per-image path; ``benchmarks/bench_loader.py`` measures the difference). The loader's threads take
a batch's images as they get free (:func:`take_images`), in one batch loop compiled once per
process (:func:`batch_decoder`).

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
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from numba.core import cgutils
from numba.extending import intrinsic

from .crops import center_crop, flipped, random_resized_crop, sample_key
from .errors import InputError
from .image_decode import DECODED, compiled_image_decoder, normalization, output_dtype

PARALLEL_CHUNK = 1  # images a loader thread takes at a time as it gets free (0: equal shares)


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
    else uint8 (H, W, 3). Raises ValueError for a ``ratio`` of the other crop's form or a
    ``seed`` outside [0, 2^63).
    """

    def __init__(self, output_size, *, center: bool, scale, ratio, flip_prob: float,
                 normalize: bool, mean, std, seed: int = 0, antialias: bool = False):
        super().__init__()
        self.antialias = bool(antialias)  # see resample
        self.output_size = tuple(output_size)
        self.center = bool(center)
        self.scale = np.array(scale, np.float64)
        self.ratio = np.array(ratio, np.float64).reshape(-1)  # (1,) for the centre crop
        if self.ratio.shape != ((1,) if self.center else (2,)):
            raise InputError(f'ratio={ratio!r}: expected ' + (
                'a float for the centre crop' if self.center else '(low, high) aspect ratios'))
        self.flip_prob, self.normalize = float(flip_prob), bool(normalize)
        self.mean, self.inv_std = normalization(mean, std)
        if not 0 <= seed < 2 ** 63:
            raise InputError(f'seed={seed} must be >= 0 and < 2**63')
        self.seed = int(seed)
        # The epoch, read by the compiled code at each batch from this array's address (numba
        # freezes captured arrays, so it copies the value with ctypes.memmove).
        self._epoch_cell = np.zeros(1, np.int64)
        # Written the same way by the compiled code: the index of a sample whose image record did
        # not decode (-1: none), which comes out as zeros (black in uint8; the mean colour once
        # normalised).
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
        """The index (in the .beton) of a sample whose image record did not decode since this
        decoder was made (corrupt bytes: it came out as zeros), or None."""
        index = int(self._corrupt_cell[0])
        return None if index < 0 else index

    def declare_state_and_memory(self, previous_state):
        max_h = np.uint64(self.metadata['height'].max())
        max_w = np.uint64(self.metadata['width'].max())
        dtype = output_dtype(self.normalize)
        shape = (self.output_size[0], self.output_size[1], 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                (AllocationQuery(shape, dtype),
                 ScratchQuery((max_h * max_w * np.uint64(3),), np.dtype('<u1'),
                              rows=numba.config.NUMBA_NUM_THREADS),
                 AllocationQuery((2,), np.dtype('<i8'))))

    def generate_code(self):
        decode_batch = batch_decoder(parallel=Compiler.num_threads > 1, normalize=self.normalize)
        mem_read = self.memory_read  # compiled once per process (memory_readers)
        scale, ratio, flip_prob = self.scale, self.ratio, self.flip_prob
        mean, inv_std, epoch_address = self.mean, self.inv_std, self._epoch_cell.ctypes.data
        # As numpy scalars: numba types a Python int or bool constant as its value (a literal),
        # and would compile decode_batch again for each seed, chunk, address, crop or antialias
        seed, chunk, center = np.int64(self.seed), np.int64(PARALLEL_CHUNK), np.bool_(self.center)
        antialias = np.bool_(self.antialias)
        corrupt_address = np.int64(self._corrupt_cell.ctypes.data)
        memmove = ctypes.memmove

        # Compiled for each loader (a small function: its constants are this decoder's); the
        # work is decode_batch's, compiled once per process
        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp, info = my_storage
            epoch = np.zeros(1, np.int64)
            memmove(epoch.ctypes.data, epoch_address, 8)
            decode_batch(batch_indices, metadata, storage_state, destination, temp, info, mem_read,
                         center, scale, ratio, seed, epoch[0], flip_prob, mean, inv_std,
                         antialias, chunk, corrupt_address)
            return destination[:len(batch_indices)]

        return decode


_batch_decoders = {}  # (parallel, the decode_image it calls) -> decode_batch, compiled


def batch_decoder(parallel: bool, normalize: bool):
    """``decode_batch(batch_indices, metadata, storage_state, destination, temp, info, mem_read,
    center, scale, ratio, seed, epoch, flip_prob, mean, inv_std, antialias, chunk,
    corrupt_address)``, the work of :class:`CropResizeDecoder`'s compiled code for one batch:
    each image of ``batch_indices`` (uint64 (B,), sample indices) read with ``mem_read`` (ffcv's
    memory manager's reader, from ``metadata`` and ``storage_state``), cropped (``center``: as
    :class:`CropResizeDecoder`), flipped and resampled into ``destination[k]`` (C-contiguous
    (B, H, W, 3), float32 normalised when ``normalize``, else uint8) by
    :func:`compiled_image_decoder`, with a row of ``temp`` (per thread; per image when the
    loader's batch size is below numba's thread pool) and of ``info`` as its scratch. A record
    that does not decode comes out as zeros, and its sample index is written to the int64 at
    ``corrupt_address``. With ``parallel``, the images are shared among the loader's threads,
    ``chunk`` at a time as they get free (:func:`take_images`; 0: an equal share each).

    Compiled with ffcv's Compiler's options, once per process for each ``parallel`` and
    ``normalize`` (and kind of region reader): every loader, train or val, calls it with its own
    values as arguments, so numba compiles the batch loop at the first loader's first batch and
    again only for another memory manager's reader, not for each loader
    (``tests/test_decoders.py``). It calls the per-image C function by its address: linked in,
    its code would be optimised again by LLVM in the batch loop, its parallel body, each
    loader's wrapper and ffcv's pipeline (docs/ffcv-notes.md)."""
    image_decoder = compiled_image_decoder(normalize)  # one per process, region reader, dtype
    if (parallel, image_decoder) in _batch_decoders:
        return _batch_decoders[parallel, image_decoder]
    decode_image = image_decoder.ctypes  # called by its address, not linked
    jpg, pool_size, memmove = IMAGE_MODES['jpg'], numba.config.NUMBA_NUM_THREADS, ctypes.memmove
    my_range = numba.prange if parallel else range

    @numba.njit(nogil=True)
    def decode_one(k, batch_indices, metadata, storage_state, destination, temp, info, mem_read,
                   center, scale, ratio, seed, epoch, flip_prob, mean, inv_std, antialias,
                   corrupt_address):
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
        # Passed by address: every array is a view of an argument (mem_read's record too, a view
        # of storage_state), so it outlives the call whenever numba frees the view itself
        out = destination[k]
        code = decode_image(data.ctypes.data, data.size, field['mode'] == jpg, height, width,
                            i, j, h, w, temp[slot].ctypes.data, temp.shape[1],
                            info[k].ctypes.data, out.ctypes.data, out.shape[0], out.shape[1],
                            flipped(key, flip_prob), mean.ctypes.data, inv_std.ctypes.data,
                            antialias)
        if code != DECODED:  # corrupt record (imagenet-ffcv-write --verify finds it): zeros, noted
            out[:] = 0
            info[k, 0] = batch_indices[k]
            memmove(corrupt_address, info[k].ctypes.data, 8)

    def decode_batch(batch_indices, metadata, storage_state, destination, temp, info, mem_read,
                     center, scale, ratio, seed, epoch, flip_prob, mean, inv_std, antialias,
                     chunk, corrupt_address):
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
                               mean, inv_std, antialias, corrupt_address)
                first, last = take_images(counter, share, count)

    decode_batch.is_parallel = parallel
    _batch_decoders[parallel, image_decoder] = Compiler.compile(decode_batch)
    return _batch_decoders[parallel, image_decoder]


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
