"""The FFCV loaders of training and validation, and their pipelines: our fused decoders
(``decoders``) write each batch; on CUDA the uint8 batch is normalised on the device.
``decoder_name`` (``data.decoder``) picks the decoder: 'fused' (ours), 'fused_aa' (ours, antialiased
for every shrink) or 'ffcv' (ffcv 1.0.2's stock decoders, flip and normalisation, as
ffcv-imagenet: whole-image decode and OpenCV INTER_AREA resize).

The last op of each image pipeline leaves (B, 3, H, W) images normalised with the ImageNet
mean/std, in channels_last memory: float32 on CPU (the decoder normalises), ``dtype`` on CUDA.
"""
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
import ffcv.loader
from ffcv.loader import OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA
from ffcv.pipeline.allocation_query import AllocationQuery, allocate_query
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.transforms import (NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor,
                             ToTorchImage)

from .constants import DECODERS, DEFAULT_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from . import memory_readers
from .decoders import ScratchQuery, center_crop_decoder, random_resized_crop_decoder
from .epoch_iterator import EpochIterator
from .errors import InputError
from .records import IMAGE_FIELD, LABEL_FIELD
from .verify import check_beton

ORDERS = {'random': OrderOption.RANDOM, 'quasi_random': OrderOption.QUASI_RANDOM}
# On CUDA, when the loader thread waits for a batch's asynchronous copy out of its pinned host
# buffer before decoding into that buffer again (``epoch_iterator``): 'batch', once the batch's
# work is queued and before the batch is handed on (the decode threads idle meanwhile); 'slot',
# only before decoding into the same slot of ffcv's ring again, when it comes round
# batches_ahead + 2 batches later. A loader keeps the value it was made with.
COPY_WAIT = 'batch'


class Loader(ffcv.loader.Loader):
    """ffcv's ``Loader`` that tells its ``decoder`` (a ``decoders.CropResizeDecoder``) which epoch
    it is about to decode, so that the crops and flips of an epoch are a function of the seed, that
    epoch and the sample (``crops``), like the order ffcv draws from ``seed + epoch``. Setting
    ``next_epoch`` (as a resumed run does) sets both; ``epoch_from`` starts an epoch at one of its
    batches without decoding the batches before it.

    It also keeps the batch buffers from one epoch to the next. ffcv 1.0.2 allocates them anew for
    every epoch (a ring of ``batches_ahead + 2`` batches per pipeline op: 393 MB of float32 at
    batch 256 and 160 px), and the first writes into fresh memory fault in every page: about 20 %
    of the time of an epoch of 3,000-4,000 images on 2 cores (``benchmarks/loader_profile.py``),
    plus pinning on CUDA. They are made by :func:`allocate` (a decoder's scratch memory: a row
    per thread, not per image, unpinned) and reused when the shapes are the same and the last
    epoch's iterator has ended; on CUDA the device is synchronised first, so that no queued
    kernel still reads them. A batch is valid until the next one is fetched or the next epoch
    starts (ffcv: until the next one). On CUDA its epoch iterator waits for each batch's copy out
    of the pinned host buffer before decoding into that buffer again (``COPY_WAIT``).

    On CUDA it keeps the side streams of ffcv's ring too (``ring_streams``, one per slot, made by
    the first epoch on the current device, again only if an epoch starts on another). ffcv 1.0.2
    takes new ones for every epoch from torch's pool (32 per device, handed out in turn), and
    torch's caching allocator reuses the memory a stream freed only for that stream: the batches
    :class:`NormalizeOnDevice` allocates on them would keep up to 32 streams' worth of memory
    reserved, not ``batches_ahead + 2``.
    """

    def __init__(self, *args, decoder=None, **kwargs):
        memory_readers.install()
        if COPY_WAIT not in ('batch', 'slot'):
            raise ValueError(f"loaders.COPY_WAIT={COPY_WAIT!r}: expected 'batch' or 'slot'")
        self.copy_wait = COPY_WAIT
        super().__init__(*args, **kwargs)
        self.decoder = decoder
        self._buffers = None  # (shapes key, ffcv's buffers) of the last epoch
        self._last_epoch = None  # weak reference to the last epoch's iterator (a thread)
        self.ring_streams = None  # on CUDA: the side stream of each slot, for every epoch
        self.graph.allocate_memory = self._epoch_buffers  # what each epoch's iterator calls

    def __iter__(self):
        return self.epoch_from(0)

    def epoch_from(self, first_batch: int):
        """The next epoch from its batch ``first_batch`` on (0 to ``len(self)``): the batches that
        iterating the loader would give after its first ``first_batch``, which are not decoded.
        A run resumed within an epoch starts there (``engine.train_one_epoch``). Raises
        ValueError for a ``first_batch`` out of that range."""
        if not 0 <= first_batch <= len(self):
            raise InputError(f'first_batch={first_batch}: expected 0 to {len(self)}, the batches '
                             f'of an epoch of {self.fname}')
        if first_batch == len(self):  # no batch left (ffcv's process cache fails on none)
            self.next_epoch += 1
            return iter(())
        if self.decoder is not None:
            self.decoder.epoch = self.next_epoch
        if self._buffers is not None and not self._last_epoch_ended():
            self._buffers = None  # still producing into them: this epoch gets its own
        elif self._buffers is not None and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        if IS_CUDA and (self.ring_streams is None or  # made once, on the consumer's device
                        self.ring_streams[0].device != torch.cuda.current_stream().device):
            self.ring_streams = [torch.cuda.Stream() for _ in range(self.batches_ahead + 2)]
        # ffcv 1.0.2's Loader.__iter__, with our epoch iterator (``epoch_iterator``)
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()[first_batch * self.batch_size:
                                             len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        iterator = EpochIterator(self, order)
        self._last_epoch = weakref.ref(iterator)
        return iterator

    def _last_epoch_ended(self) -> bool:
        iterator = self._last_epoch()
        if iterator is None:  # collected: a running thread is never collected
            return True
        # at its end, closed or failed (not a batch left that its consumer may still take), and
        # no longer decoding into them
        return iterator.terminate_event.is_set() and iterator.has_stopped()

    def _epoch_buffers(self, batch_size: int, slots: int):
        """The pipeline's buffers for ``slots`` batches of ``batch_size`` (:func:`allocate`), or
        the last epoch's when the pipeline asks for the same shapes (``output_size`` may have
        changed)."""
        key = (batch_size, slots, repr(self.graph.collect_requirements()[0]))
        if self._buffers is None or self._buffers[0] != key:
            self._buffers = None  # the old ones can be freed before the new ones are made
            self._buffers = (key, allocate(self.graph, batch_size, slots))
        return self._buffers[1]

    def corrupt_record(self):
        """A message naming the sample of this loader's file whose image record did not decode
        (its bytes are corrupt: it came out as zeros), or None when every one decoded."""
        index = self.decoder.corrupt_sample if self.decoder is not None else None
        if index is None:
            return None
        return (f'{self.fname}: sample {index} does not decode (corrupt bytes in its image '
                f'record); imagenet-ffcv-write --verify {self.fname} lists every such record: write '
                f'the .beton again, or copy it again if the copy is to blame')


def allocate(graph, batch_size: int, slots: int) -> dict:
    """ffcv 1.0.2's ``Graph.allocate_memory``: each op's AllocationQuery as ``slots`` x
    ``batch_size`` rows, pinned on a CUDA machine; except a decoder's
    ``decoders.ScratchQuery``, which gets ``slots`` x min(``batch_size``, its rows) rows of
    unpinned memory. That scratch is a whole image's pixels per row (the largest height x the
    largest width of the .beton x 3 bytes: 0.52 MB for imagewoof320 at shorter side 256); one row
    per image would pin 0.67 GB at batch 256 for that small set, and more for sets with more
    extreme aspect ratios, per training process."""
    def one(query):
        if isinstance(query, ScratchQuery):
            return np.empty((slots, min(batch_size, query.rows), *query.shape), query.dtype)
        return allocate_query(query, batch_size, slots)

    buffers = defaultdict(dict)
    for kind, requirements in graph.collect_requirements()[0].items():
        for node_id, query in requirements.items():
            buffers[kind][node_id] = (one(query) if isinstance(query, AllocationQuery) else
                                      tuple(map(one, query)) if isinstance(query, Sequence) else
                                      None)
    return buffers


class NormalizeOnDevice(Operation):
    """ffcv pipeline op for the CUDA pipeline, after ``ToDevice`` and ``ToTorchImage``:
    ``(x - mean) / std`` of a uint8 (B, 3, H, W) torch batch (mean/std in 0-255 units, computed in
    float32) on the batch's device, returned as ``dtype``; the memory format (channels_last) is
    kept. Plain torch: ffcv's own ``NormalizeImage`` needs cupy on CUDA.

    Stream safety: ffcv runs this op on one of its side streams, so the output is allocated on
    that stream, outside ffcv's ring of buffers (which ffcv guards with events). The output is
    marked as used by the default stream (``Tensor.record_stream``), where the training loop
    reads it: the caching allocator then reuses its memory only after the default stream's work
    queued before its release is done, however long the consumer keeps the batch. The pinned
    host buffer the batch was copied from is guarded by :class:`Loader`'s epoch iterator.
    """

    def __init__(self, mean, std, dtype):
        super().__init__()
        self.mean = torch.tensor(np.asarray(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.inv_std = 1 / torch.tensor(np.asarray(std), dtype=torch.float32).view(1, 3, 1, 1)
        self.dtype = dtype

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False, dtype=self.dtype), None

    def constants_on(self, device) -> tuple:
        """``(mean, inv_std)`` on ``device``; copied there once, and complete before any stream
        reads them."""
        if self.mean.device != device:
            self.mean, self.inv_std = self.mean.to(device), self.inv_std.to(device)
            if device.type == 'cuda':
                torch.cuda.current_stream(device).synchronize()
        return self.mean, self.inv_std

    def generate_code(self):
        dtype = self.dtype

        def normalize(images, _):
            mean, inv_std = self.constants_on(images.device)
            out = images.to(torch.float32, copy=True).sub_(mean).mul_(inv_std).to(dtype)
            if out.is_cuda:
                out.record_stream(torch.cuda.default_stream(out.device))
            return out

        return normalize


def image_pipeline(make_decoder, *, device, dtype=torch.float32, **decoder_args) -> tuple:
    """``(decoder, ops)``: the ffcv image pipeline around ``make_decoder(normalize=...,
    mean=..., std=..., **decoder_args)`` (``decoders.random_resized_crop_decoder`` or
    ``center_crop_decoder``). On CPU the decoder writes normalised float32 itself; on CUDA it
    writes uint8 (4x less to copy to the device) and :class:`NormalizeOnDevice` normalises the
    batch there, to ``dtype`` (the mixed-precision dtype, or float32 without it).

    On CPU nothing JIT-compiled may follow a non-JIT op: that hangs ffcv 1.0.2's Loader."""
    if device.type == 'cuda':
        decoder = make_decoder(normalize=False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                               **decoder_args)
        return decoder, [decoder, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                         NormalizeOnDevice(IMAGENET_MEAN, IMAGENET_STD, dtype)]
    if device.type != 'cpu':
        raise InputError(f'device={device}: the loaders run on cpu or cuda')
    decoder = make_decoder(normalize=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, **decoder_args)
    return decoder, [decoder, ToTensor(), ToTorchImage()]


def ffcv_image_pipeline(decoder, *, device, dtype=torch.float32, flip_prob: float = 0.0) -> list:
    """ffcv-imagenet's image pipeline around one of ffcv's own decoders: ``decoder``, a
    left-right flip with probability ``flip_prob`` (ffcv's ``RandomHorizontalFlip``; 0: none), and
    normalisation: ffcv's ``NormalizeImage`` on CPU (float32), :class:`NormalizeOnDevice` on CUDA
    (ffcv's GPU kernel needs cupy). Batches as :func:`image_pipeline`'s. Its random draws are
    ffcv's, not a function of the seed and the epoch: a resumed run sees other crops."""
    ops = [decoder] + ([RandomHorizontalFlip(flip_prob)] if flip_prob else [])
    if device.type == 'cuda':
        return ops + [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                      NormalizeOnDevice(IMAGENET_MEAN, IMAGENET_STD, dtype)]
    return ops + [NormalizeImage(np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD), np.float32),
                  ToTensor(), ToTorchImage()]


def _check_decoder_name(decoder_name: str) -> None:
    if decoder_name not in DECODERS:
        raise InputError(f'decoder_name={decoder_name!r}: expected one of {", ".join(DECODERS)}')


def antialiased(decoder_name: str) -> bool:
    """Whether the decoder ``decoder_name`` (``data.decoder``) resizes with the antialiased
    resample (``resampling.resample(antialias=True)``): 'fused_aa' only. ('ffcv' resizes with
    OpenCV's INTER_AREA, which nothing else reproduces.)"""
    return decoder_name == 'fused_aa'


def label_pipeline(device) -> list:
    """int64 (B,) labels, on ``device``."""
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]  # (B, 1) -> (B,), also for a last batch of 1
    return ops + [ToDevice(device, non_blocking=True)] if device.type == 'cuda' else ops


def train_loader(*, path, batch_size: int, num_workers: int, res: int, os_cache: bool, device,
                 distributed: bool, seed: int, order: str = 'random',
                 min_crop_scale: float = 0.08, flip_prob: float = 0.5,
                 dtype=torch.float32, decoder_name: str = 'fused') -> tuple:
    """The training loader: random-resized crop to ``res`` x ``res`` pixels + horizontal flip +
    normalisation, as ffcv-imagenet, done in one pass by ``decoders.random_resized_crop_decoder``
    (region decode, bilinear resample; ``benchmarks/bench_loader.py`` measures it). Returns
    ``(loader, decoder)``; set ``decoder.output_size = (res, res)`` between epochs to change the
    resolution without rebuilding the loader.

    Batches are ``(images, labels)``: images (B, 3, res, res) in channels_last memory, normalised
    with ImageNet mean/std, float32 on CPU and ``dtype`` on CUDA; labels int64 (B,).
    ``batch_size`` is per process; the last incomplete batch is dropped. ``os_cache``: memory-map
    the file and share the OS page cache (data that fits in RAM), else ffcv's own process cache.
    ``order``: 'random' (full shuffle, the only one ffcv allows with ``distributed``) or
    'quasi_random' (shuffles within pages, for data > RAM).
    ``min_crop_scale``: smallest crop area, as a fraction of the image (Szegedy et al. 2015 and
    torchvision: 0.08); the aspect ratio is drawn from [3/4, 4/3]. 1.0 on square images gives the
    whole image. ``flip_prob``: probability of the left-right flip (0: none). The order, the
    crops and the flips are functions of ``seed`` and the epoch (``seed`` >= 0): runs with the
    same seed see the same batches, also after a resume (not with ``decoder_name='ffcv'``, nor
    with 'quasi_random', which shuffles ffcv 1.0.2's table of pages in place, so that an
    epoch's order depends on the epochs drawn before it in the process).
    ``decoder_name``: 'fused', 'fused_aa' or 'ffcv' (``constants.DECODERS``; see the module's
    docstring).
    The loader's buffers are reused: consume a batch before fetching ``batches_ahead + 2`` more.
    Raises FileNotFoundError for a missing file, ``verify.CorruptBetonError`` for a file that is
    not a complete .beton (``verify.check_beton``), ValueError for a bad ``order`` or
    ``decoder_name`` or for ``num_workers`` < 1.
    """
    _check_decoder_name(decoder_name)
    if order not in ORDERS:
        raise InputError(f"order={order!r}: expected 'random' or 'quasi_random'")
    if distributed and order != 'random':
        raise InputError("ffcv supports only order='random' with distributed=True")
    if num_workers < 1:
        raise InputError(f'num_workers={num_workers}: the loader needs at least 1 thread')
    check_beton(path)
    if decoder_name == 'ffcv':
        ours = None
        image_decoder = RandomResizedCropRGBImageDecoder((res, res), scale=(min_crop_scale, 1.0))
        images = ffcv_image_pipeline(image_decoder, device=device, dtype=dtype,
                                     flip_prob=flip_prob)
    else:
        ours, images = image_pipeline(random_resized_crop_decoder, device=device, dtype=dtype,
                                      output_size=(res, res), scale=(min_crop_scale, 1.0),
                                      flip_prob=flip_prob, seed=seed,
                                      antialias=antialiased(decoder_name))
        image_decoder = ours
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                    order=ORDERS[order], os_cache=bool(os_cache), drop_last=True,
                    distributed=distributed, seed=seed, decoder=ours,
                    pipelines={IMAGE_FIELD: images, LABEL_FIELD: label_pipeline(device)})
    return loader, image_decoder


def val_loader(*, path, batch_size: int, num_workers: int, res: int, device, rank: int = 0,
               world_size: int = 1, crop_ratio: float = DEFAULT_CROP_RATIO,
               dtype=torch.float32, decoder_name: str = 'fused'):
    """The validation loader: centre crop (``crop_ratio`` of the shorter side, 224/256 by default;
    1.0 gives the whole central square, for 10-crop evaluation) resized to ``res`` x ``res``.

    Each of ``world_size`` ranks reads the disjoint slice ``rank::world_size`` of the samples, in
    order, keeping the last partial batch, so across ranks every image is seen exactly once (ffcv's
    own ``distributed=True`` pads with repeated samples). Batches and ``decoder_name`` as in
    :func:`train_loader`.
    """
    _check_decoder_name(decoder_name)
    if num_workers < 1:
        raise InputError(f'num_workers={num_workers}: the loader needs at least 1 thread')
    # uint64 as ffcv's own default: int64 indices meet its uint64 ones and numba sees float64.
    indices = np.arange(rank, check_beton(path), world_size, dtype=np.uint64)
    if decoder_name == 'ffcv':
        ours = None
        images = ffcv_image_pipeline(CenterCropRGBImageDecoder((res, res), ratio=crop_ratio),
                                     device=device, dtype=dtype)
    else:
        ours, images = image_pipeline(center_crop_decoder, device=device, dtype=dtype,
                                      output_size=(res, res), ratio=crop_ratio,
                                      antialias=antialiased(decoder_name))
    return Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                  order=OrderOption.SEQUENTIAL, drop_last=False, indices=indices, decoder=ours,
                  pipelines={IMAGE_FIELD: images, LABEL_FIELD: label_pipeline(device)})
