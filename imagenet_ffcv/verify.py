"""Reading a .beton back without ffcv's JIT-compiled loader: every record's bounds, and every
image decoded (``imagenet-ffcv-write --verify``)."""
import io
from pathlib import Path

import numpy as np
from ffcv.reader import Reader
from ffcv.types import ALLOC_TABLE_TYPE, HeaderType
from PIL import Image

from .classes import class_list_path, read_class_list
from .decoders import decode_region, region_decoder
from .errors import ImagenetFfcvError

SHORT_SIDE_EDGES = [0, 32, 64, 128, 160, 192, 224, 256, 320, 384, 512, 10 ** 9]  # px buckets


class CorruptBetonError(ImagenetFfcvError):
    """A .beton file that cannot be read back completely."""


def verify_beton(path, *, decode: bool = True) -> dict:
    """Read a .beton back without ffcv's (JIT-compiled) loader: header, metadata, allocation
    table, every record's bounds, and (``decode``) every image decoded with PIL (JPEG) or
    checked for size (raw). Labels are checked against the class list beside the file, if any.

    Returns ``{'images', 'bytes', 'per_class': {label: n}, 'short_side': {bucket: n},
    'modes': {'jpg': n, 'raw': n}, 'problems': [str]}``; raises FileNotFoundError for a missing
    file and CorruptBetonError when the file cannot be parsed at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such .beton file')
    size = path.stat().st_size
    reader, images, labels = _open(path)
    problems = []
    alloc = reader.alloc_table
    sizes = dict(zip(alloc['ptr'].tolist(), alloc['size'].tolist()))
    if alloc.size == 0 or reader.header['alloc_table_ptr'] > size:
        problems.append('allocation table missing (file truncated?)')
    data = np.memmap(path, dtype=np.uint8, mode='r') if size else np.zeros(0, np.uint8)
    n_classes = None
    if class_list_path(path).exists():
        n_classes = len(read_class_list(class_list_path(path)))
    modes = {'jpg': 0, 'raw': 0}
    for i in range(len(images)):
        if labels[i] < 0 or (n_classes is not None and labels[i] >= n_classes):
            problems.append(f'record {i}: label {labels[i]} outside 0..{(n_classes or 1) - 1}')
        problem = _check_record(i, images[i], sizes, data, modes, decode)
        if problem:
            problems.append(problem)
    per_class = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    return {'images': len(images), 'bytes': size, 'per_class': per_class,
            'short_side': _short_side_histogram(images), 'modes': modes, 'problems': problems}


def check_beton(path) -> int:
    """The checks a loader makes before it opens ``path`` (cheap: header, metadata and allocation
    table, no image decoded): it exists, is a .beton, is not truncated (every record's data lies
    inside the file and is in the allocation table) and holds samples. Returns the number of
    samples. Raises FileNotFoundError, or CorruptBetonError saying what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: .beton file not found; write it with imagenet-ffcv-write')
    reader, images, _ = _open(path)
    if len(images) == 0:
        raise CorruptBetonError(f'{path}: holds no samples; write it again with imagenet-ffcv-write')
    alloc = reader.alloc_table
    table_ptr = int(reader.header['alloc_table_ptr'])
    table_bytes = path.stat().st_size - table_ptr
    missing = np.setdiff1d(images['data_ptr'], alloc['ptr'])
    if table_bytes % ALLOC_TABLE_TYPE.itemsize or len(missing) or (
            len(alloc) and int((alloc['ptr'] + alloc['size']).max()) > table_ptr):
        raise CorruptBetonError(f'{path}: truncated or damaged (its allocation table does not '
                                f'cover its {len(images)} records); copy it again or write it '
                                f'again with imagenet-ffcv-write (--verify FILE checks a copy)')
    return len(images)


def _open(path):
    """``(reader, image metadata, int64 labels)``; CorruptBetonError when unreadable."""
    size = Path(path).stat().st_size
    if size >= HeaderType.itemsize:
        header = np.fromfile(path, dtype=HeaderType, count=1)[0]
        if header['alloc_table_ptr'] > size:
            raise CorruptBetonError(
                f'{path}: truncated: {size} bytes, but its header places the allocation table at '
                f'byte {header["alloc_table_ptr"]}; copy it again or write it again with '
                f'imagenet-ffcv-write')
    try:
        reader = Reader(str(path))
        md = reader.metadata
        if len(md) != reader.num_samples:
            raise CorruptBetonError(f'{path}: header says {reader.num_samples} samples, metadata '
                                    f'holds {len(md)} (file truncated?)')
        if reader.field_names[:2] != ['image', 'label']:
            raise CorruptBetonError(f'{path}: fields {reader.field_names}, expected image and '
                                    f'label')
        return reader, md['f0'], md['f1'].astype(np.int64)
    except CorruptBetonError:
        raise
    except Exception as e:
        raise CorruptBetonError(f'{path}: not a readable .beton file ({type(e).__name__}: {e})')


def _check_record(i, image, sizes: dict, data, modes: dict, decode: bool):
    """The problem of record ``i`` (a str), or None; counts its mode in ``modes``."""
    w, h, mode = int(image['width']), int(image['height']), int(image['mode'])
    ptr = int(image['data_ptr'])
    if w < 1 or h < 1:
        return f'record {i}: image size {w}x{h}'
    if ptr not in sizes:
        return f'record {i}: data pointer {ptr} not in the allocation table'
    nbytes = int(sizes[ptr])
    if ptr + nbytes > len(data):
        return (f'record {i}: data at {ptr}+{nbytes} beyond the end of the file ({len(data)} '
                f'bytes; truncated?)')
    if mode == 1:
        modes['raw'] += 1
        if nbytes < 3 * w * h:
            return f'record {i}: raw image {w}x{h} needs {3 * w * h} bytes, has {nbytes}'
    elif mode == 0:
        modes['jpg'] += 1
        if decode:
            try:
                with Image.open(io.BytesIO(bytes(data[ptr:ptr + nbytes]))) as im:
                    im.load()  # PIL only warns about corrupt data: the region decoder counts it
                    if im.size != (w, h):
                        return (f'record {i}: JPEG is {im.size[0]}x{im.size[1]}, metadata says '
                                f'{w}x{h}')
                if region_decoder() is not None:
                    decode_region(np.asarray(data[ptr:ptr + nbytes]), top=0, left=0, height=h,
                                  width=w)
            except Exception as e:
                return f'record {i}: JPEG does not decode ({type(e).__name__}: {e})'
    else:
        return f'record {i}: unknown image mode {mode}'
    return None


def _short_side_histogram(images) -> dict:
    """``{'lo-hi': n}`` of the stored images' shorter sides (px), over SHORT_SIDE_EDGES."""
    short = np.minimum(images['width'].astype(int), images['height'].astype(int))
    hist = {}
    for lo, hi in zip(SHORT_SIDE_EDGES[:-1], SHORT_SIDE_EDGES[1:]):
        n = int(((short >= lo) & (short < hi)).sum())
        if n:
            hist[f'{lo}-{hi - 1}' if hi < 10 ** 9 else f'>={lo}'] = n
    return hist
