"""The data path: class lists, the shorter-side resize, writing .beton files, and FFCV loaders.

Class index convention (as torchvision's ``ImageFolder`` and the ILSVRC-2012 order): the position
of the wnid folder in the sorted list of the *train* split's folders. The val split is labelled with
the same map, so a val split that lacks a class, or lists its folders in another order, keeps the
train indices.
"""
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

# ImageNet channel statistics in 0-255 pixel units (RGB order).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
# Validation centre crop: the crop is 224/256 of the shorter side, then resized to the resolution.
DEFAULT_CROP_RATIO = 224 / 256

WNID_NAMES_FILE = Path(__file__).with_name('imagenet_wnids.tsv')


# ----------------------------------------------------------------------------------------------
# Class lists and samples
# ----------------------------------------------------------------------------------------------

def find_classes(train_dir) -> list:
    """Sorted wnid folder names of a train split: index i of the list is class i.

    Raises FileNotFoundError if ``train_dir`` is missing and ValueError if it has no class folder.
    """
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise FileNotFoundError(f'{train_dir}: train split folder not found (expected '
                                f'<data-dir>/train/<wnid>/*.JPEG); set --data-dir')
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise ValueError(f'{train_dir}: no class folders (expected {train_dir}/<wnid>/*.JPEG)')
    return classes


def list_samples(split_dir, classes: list) -> list:
    """All images of a split as ``(path, label)`` pairs, ordered by class index then file name.

    ``classes`` is the train split's class list (see :func:`find_classes`); a folder of
    ``split_dir`` that is not in it raises ValueError naming the folder, since its images would
    have no label. Files whose extension is not in IMAGE_EXTENSIONS are ignored.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f'{split_dir}: split folder not found')
    class_to_idx = {wnid: i for i, wnid in enumerate(classes)}
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    unknown = [f for f in folders if f not in class_to_idx]
    if unknown:
        raise ValueError(f'{split_dir}: class folder(s) {", ".join(unknown[:5])} are not in the '
                         f'train split, so their images have no class index; remove them or add '
                         f'the class to train/')
    samples = []
    for wnid in sorted(folders, key=class_to_idx.get):
        folder = split_dir / wnid
        files = sorted(e.name for e in os.scandir(folder)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        samples.extend((str(folder / f), class_to_idx[wnid]) for f in files)
    if not samples:
        raise ValueError(f'{split_dir}: no images found (extensions {", ".join(IMAGE_EXTENSIONS)})')
    return samples


def wnid_names() -> dict:
    """wnid -> short human-readable name for the 1,000 ILSVRC-2012 classes."""
    with open(WNID_NAMES_FILE) as f:
        return dict(line.rstrip('\n').split('\t', 1) for line in f if line.strip())


def class_list_path(beton_path) -> Path:
    """Where the class list of a .beton lives: ``train_256.beton`` -> ``train_256.classes.tsv``."""
    beton_path = Path(beton_path)
    return beton_path.with_name(beton_path.stem + '.classes.tsv')


def write_class_list(path, classes: list) -> None:
    """Write ``index<TAB>wnid<TAB>name`` lines (name empty for a wnid outside ILSVRC-2012)."""
    names = wnid_names()
    lines = [f'{i}\t{wnid}\t{names.get(wnid, "")}\n' for i, wnid in enumerate(classes)]
    _atomic_write_text(Path(path), ''.join(lines))


def read_class_list(path) -> list:
    """The wnids of a class list written by :func:`write_class_list`, index order."""
    with open(path) as f:
        rows = [line.rstrip('\n').split('\t') for line in f if line.strip()]
    for i, row in enumerate(rows):
        if int(row[0]) != i:
            raise ValueError(f'{path}: line {i + 1} has index {row[0]}, expected {i}')
    return [row[1] for row in rows]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.partial-{os.getpid()}')
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Images for the writer
# ----------------------------------------------------------------------------------------------

def shorter_side_size(width: int, height: int, max_res: int) -> tuple:
    """(width, height) after scaling so the shorter side is at most ``max_res``, keeping the
    aspect ratio (rounded to the nearest pixel, at least 1) and never upscaling."""
    short = min(width, height)
    if short <= max_res:
        return width, height
    scale = max_res / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_image(path, max_res: int) -> np.ndarray:
    """Decode an image file to RGB with its shorter side at most ``max_res`` pixels.

    Grayscale, CMYK, palette and alpha images are converted to RGB by PIL's ``convert('RGB')``.
    Large JPEGs are decoded at a reduced DCT scale (PIL ``draft``) to no less than the target size,
    then resized with PIL's antialiased bilinear filter (as torchvision's ``Resize``).
    Returns a (H, W, 3) uint8 array. Raises OSError/ValueError for a file PIL cannot decode.
    """
    with Image.open(path) as im:
        size = shorter_side_size(*im.size, max_res)
        if size != im.size:
            im.draft('RGB', size)
        im = im.convert('RGB')
        size = shorter_side_size(*im.size, max_res)
        if size != im.size:
            im = im.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(im)


class ImageFiles:
    """An indexable dataset for ``ffcv``'s ``DatasetWriter.from_indexed_dataset``.

    ``self[i]`` returns ``((H, W, 3) uint8 array, label)``. It never raises: ffcv's writer waits
    forever for a worker that died. A file that cannot be decoded is appended to ``failures_path``
    as ``path<TAB>reason`` and stands in as a 1x1 black image; the caller checks that file.
    """

    def __init__(self, samples: list, *, max_res: int, failures_path):
        self.samples = samples
        self.max_res = max_res
        self.failures_path = str(failures_path)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return load_image(path, self.max_res), label
        except Exception as e:  # any decoder error: reported, never a hang of the writer
            reason = f'{type(e).__name__}: {e}'.replace('\n', ' ').replace('\t', ' ')
            with open(self.failures_path, 'a') as f:  # O_APPEND: whole lines from each process
                f.write(f'{path}\t{reason}\n')
            return np.zeros((1, 1, 3), np.uint8), label


class UnreadableImagesError(Exception):
    """Images that could not be decoded; ``failures`` is a list of ``(path, reason)``."""

    def __init__(self, failures):
        self.failures = failures
        listed = '\n'.join(f'  {p}: {r}' for p, r in failures[:20])
        more = f'\n  ... and {len(failures) - 20} more' if len(failures) > 20 else ''
        super().__init__(f'{len(failures)} image(s) could not be decoded; nothing was written. '
                         f'Remove or replace them and run again:\n{listed}{more}')


def write_beton(samples: list, out, *, max_res: int, write_mode: str = 'jpg',
                jpeg_quality: int = 90, compress_probability: float = 0.5,
                num_workers: int = 0, chunksize: int = 100) -> dict:
    """Write ``(path, label)`` samples to the FFCV file ``out``, shorter side at most ``max_res``.

    Fields: ``image`` (``RGBImageField``, ``write_mode`` 'jpg' | 'raw' | 'proportion', the last
    storing a JPEG with probability ``compress_probability`` and raw pixels otherwise) and
    ``label`` (``IntField``). ``num_workers`` processes (0: all cores) decode and encode.

    The file is written under a temporary name in the folder of ``out`` and renamed into place
    only when complete: a crash or kill leaves no file at ``out`` (or the previous complete one).
    Raises UnreadableImagesError, writing nothing, if any image cannot be decoded.
    Returns ``{'images', 'bytes', 'seconds', 'img_per_s'}``.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in ('jpg', 'raw', 'proportion'):
        raise ValueError(f"write_mode={write_mode!r}: expected 'jpg', 'raw' or 'proportion'")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f'.{out.name}.partial-{os.getpid()}')
    failures_path = out.with_name(f'.{out.name}.failures-{os.getpid()}')
    failures_path.unlink(missing_ok=True)
    num_workers = num_workers or os.cpu_count()
    fields = {
        'image': RGBImageField(write_mode=write_mode, max_resolution=None,
                               jpeg_quality=jpeg_quality, compress_probability=compress_probability),
        'label': IntField(),
    }
    start = time.perf_counter()
    try:
        writer = DatasetWriter(str(tmp), fields, num_workers=min(num_workers, len(samples)))
        dataset = ImageFiles(samples, max_res=max_res, failures_path=failures_path)
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
        if failures_path.exists():
            with open(failures_path) as f:
                failures = [tuple(line.rstrip('\n').split('\t', 1)) for line in f if line.strip()]
            raise UnreadableImagesError(sorted(failures))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        failures_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {'images': len(samples), 'bytes': out.stat().st_size, 'seconds': seconds,
            'img_per_s': len(samples) / seconds}


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------

def num_samples(beton_path) -> int:
    """Number of samples stored in a .beton file (reads only its header)."""
    from ffcv.reader import Reader
    return Reader(str(beton_path)).num_samples


def num_classes(beton_path) -> int:
    """Classes of a dataset: the length of the class list beside the .beton when there is one,
    else 1 + the largest stored label."""
    classes = class_list_path(beton_path)
    if classes.exists():
        return len(read_class_list(classes))
    from ffcv.reader import Reader
    return int(Reader(str(beton_path)).metadata['f1'].max()) + 1


def _check_beton(path) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f'{path}: .beton file not found; write it with write_beton.py')
    return str(path)


def _image_tail(device):
    """The ops after the decoder (and flip). On CPU ``NormalizeImage`` is a numba (JIT) op and must
    come before the non-JIT ``ToTensor``: ffcv 1.0.2 loops forever on a JIT op after a non-JIT one
    (ffcv issue #396). On CUDA it runs on the device, after ``ToDevice``/``ToTorchImage``.
    Either way the images come out as float (N, 3, H, W) tensors in channels_last memory."""
    import torch
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage
    if device.type == 'cuda':
        return [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float16)]
    assert device == torch.device('cpu'), device
    return [NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32), ToTensor(), ToTorchImage()]


def _label_pipeline(device):
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]  # (B, 1) -> (B,), also for a last batch of 1
    return ops + [ToDevice(device, non_blocking=True)] if device.type == 'cuda' else ops


def train_loader(*, path, batch_size: int, num_workers: int, res: int, in_memory: bool, device,
                 distributed: bool, seed: int, order: str = 'random'):
    """The training loader: random-resized crop to ``res`` x ``res`` pixels + horizontal flip +
    normalisation, as ffcv-imagenet. Returns ``(loader, decoder)``; set ``decoder.output_size =
    (res, res)`` between epochs to change the resolution without rebuilding the loader.

    Batches are ``(images, labels)``: images float32 on CPU / float16 on CUDA, (B, 3, res, res) in
    channels_last memory, normalised with ImageNet mean/std; labels int64 (B,). ``batch_size`` is per
    process; the last incomplete batch is dropped. ``order``: 'random' (full shuffle, the only one
    ffcv allows with ``distributed``) or 'quasi_random' (shuffles within pages, for data > RAM).
    The loader's buffers are reused: consume a batch before fetching ``batches_ahead + 2`` more.
    """
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip

    orders = {'random': OrderOption.RANDOM, 'quasi_random': OrderOption.QUASI_RANDOM}
    if order not in orders:
        raise ValueError(f"order={order!r}: expected 'random' or 'quasi_random'")
    if distributed and order != 'random':
        raise ValueError("ffcv supports only order='random' with distributed=True")
    decoder = RandomResizedCropRGBImageDecoder((res, res))
    loader = Loader(_check_beton(path), batch_size=batch_size, num_workers=num_workers,
                    order=orders[order], os_cache=bool(in_memory), drop_last=True,
                    distributed=distributed, seed=seed,
                    pipelines={'image': [decoder, RandomHorizontalFlip()] + _image_tail(device),
                               'label': _label_pipeline(device)})
    return loader, decoder


def val_loader(*, path, batch_size: int, num_workers: int, res: int, device, rank: int = 0,
               world_size: int = 1, crop_ratio: float = DEFAULT_CROP_RATIO):
    """The validation loader: centre crop (``crop_ratio`` of the shorter side, 224/256 by default;
    1.0 gives the whole central square, for 10-crop evaluation) resized to ``res`` x ``res``.

    Each of ``world_size`` ranks reads the disjoint slice ``rank::world_size`` of the samples, in
    order, keeping the last partial batch, so across ranks every image is seen exactly once (ffcv's
    own ``distributed=True`` pads with repeated samples). Batches as in :func:`train_loader`.
    """
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    path = _check_beton(path)
    # uint64 as ffcv's own default: int64 indices meet its uint64 ones and numba sees float64.
    indices = np.arange(rank, num_samples(path), world_size, dtype=np.uint64)
    decoder = CenterCropRGBImageDecoder((res, res), ratio=crop_ratio)
    return Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                  drop_last=False, indices=indices,
                  pipelines={'image': [decoder] + _image_tail(device),
                             'label': _label_pipeline(device)})
