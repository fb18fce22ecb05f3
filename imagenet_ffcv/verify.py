"""Reading a .beton back without ffcv's JIT-compiled loader: its records (:func:`records`,
:func:`record_bytes`), every record's bounds, and every image decoded (``imagenet-ffcv-write
--verify``)."""
import io
from pathlib import Path

import numpy as np
from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.reader import Reader
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType
from PIL import Image

from .classes import class_list_path, read_class_list
from .jpeg_region import decode_region, region_decoder
from .errors import ImagenetFfcvError, InputError, MissingFileError
from .records import IMAGE_FIELD, IMAGE_METADATA, LABEL_FIELD, LABEL_METADATA

SHORT_SIDE_EDGES = [0, 32, 64, 128, 160, 192, 224, 256, 320, 384, 512, 10 ** 9]  # px buckets
JPEG_MODE, RAW_MODE = 0, 1  # a record's 'mode': how ffcv's RGBImageField stored the image
RECORD_TYPE = np.dtype([('mode', np.uint8), ('height', np.int64), ('width', np.int64),
                        ('data_ptr', np.int64), ('size', np.int64), ('label', np.int64)])


class CorruptBetonError(ImagenetFfcvError):
    """A .beton file that cannot be read back completely."""


def records(path) -> np.ndarray:
    """The samples of a .beton, read from its header, metadata and allocation table (no image
    decoded): a structured array of RECORD_TYPE, one element per sample, in sample order:

    - ``mode`` (uint8): JPEG_MODE (0) for a JPEG, RAW_MODE (1) for raw RGB pixels (uint8,
      height x width x 3, row-major);
    - ``height``, ``width`` (int64): the stored image's size in pixels;
    - ``data_ptr`` (int64): the byte offset of the image's record in the file;
    - ``size`` (int64): the record's length in bytes, from ffcv's allocation table; -1 when the
      table has no entry at ``data_ptr`` (a damaged file);
    - ``label`` (int64): the class index.

    A record's bytes: ``record_bytes(file_bytes(path), r)``. Raises FileNotFoundError for a
    missing file and CorruptBetonError for one that is not a readable .beton (truncated: its
    allocation table lies past its end; metadata missing; not ffcv's image and label fields).
    Records are not checked against the file's length: :func:`record_bytes` does that.
    """
    return _read(path)[1]


def file_bytes(path) -> np.ndarray:
    """The whole file as a read-only uint8 array (memory-mapped), for :func:`record_bytes`."""
    if Path(path).stat().st_size == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode='r')


def record_bytes(data, record) -> np.ndarray:
    """The stored bytes of one record (an element of :func:`records`) as a uint8 array: a view of
    ``data``, the whole file (:func:`file_bytes`). A JPEG's bytes, or raw pixels (reshape to
    (height, width, 3)). Raises CorruptBetonError when the allocation table has no entry for the
    record or its bytes run past the end of ``data`` (a truncated copy)."""
    ptr, size = int(record['data_ptr']), int(record['size'])
    if size < 0:
        raise CorruptBetonError(f'data pointer {ptr} not in the allocation table')
    if ptr + size > len(data):
        raise CorruptBetonError(f'data at {ptr}+{size} beyond the end of the file ({len(data)} '
                                f'bytes; truncated?)')
    return np.asarray(data[ptr:ptr + size])


def verify_beton(path, *, decode: bool = True) -> dict:
    """Read a .beton back without ffcv's (JIT-compiled) loader: header, metadata, allocation
    table, every record's bounds, and (``decode``) every image decoded with PIL and with the
    loaders' region decoder (JPEG: a record whose restart markers are damaged or missing is a
    problem) or checked for size (raw). Labels are checked against the class list beside the
    file, if any.

    Returns ``{'images', 'bytes', 'per_class': {label: n}, 'short_side': {bucket: n},
    'modes': {'jpg': n, 'raw': n}, 'problems': [str]}``; raises FileNotFoundError for a missing
    file and CorruptBetonError when the file cannot be parsed at all.
    """
    path = Path(path)
    reader, recs = _read(path)
    size = path.stat().st_size
    labels = recs['label']
    problems = []
    if reader.alloc_table.size == 0 or reader.header['alloc_table_ptr'] > size:
        problems.append('allocation table missing (file truncated?)')
    data = file_bytes(path)
    n_classes = None
    if class_list_path(path).exists():
        n_classes = len(read_class_list(class_list_path(path)))
    modes = {'jpg': 0, 'raw': 0}
    for i, record in enumerate(recs):
        if labels[i] < 0 or (n_classes is not None and labels[i] >= n_classes):
            problems.append(f'record {i}: label {labels[i]} outside 0..{(n_classes or 1) - 1}')
        problem = _check_record(i, record, data, modes, decode)
        if problem:
            problems.append(problem)
    per_class = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    return {'images': len(recs), 'bytes': size, 'per_class': per_class,
            'short_side': _short_side_histogram(recs), 'modes': modes, 'problems': problems}


def check_beton(path) -> int:
    """The checks a loader makes before it opens ``path`` (cheap: header, metadata and allocation
    table, no image decoded): it exists, is a .beton, is not truncated (every record's data lies
    inside the file and is in the allocation table) and holds samples. Returns the number of
    samples. Raises FileNotFoundError, or CorruptBetonError saying what is wrong and what to do."""
    path = Path(path)
    reader, recs = _read(path)
    if len(recs) == 0:
        raise CorruptBetonError(f'{path}: holds no samples; write it again with imagenet-ffcv-write')
    alloc = reader.alloc_table
    table_ptr = int(reader.header['alloc_table_ptr'])
    table_bytes = path.stat().st_size - table_ptr
    if table_bytes % ALLOC_TABLE_TYPE.itemsize or (recs['size'] < 0).any() or (
            len(alloc) and int((alloc['ptr'] + alloc['size']).max()) > table_ptr):
        raise CorruptBetonError(f'{path}: truncated or damaged (its allocation table does not '
                                f'cover its {len(recs)} records); copy it again or write it '
                                f'again with imagenet-ffcv-write (--verify FILE checks a copy)')
    return len(recs)


def check_there(path, key: str = '') -> None:
    """MissingFileError unless the .beton ``path`` is a file: a folder given for it (the
    converter's input, most likely: the error gives the command that writes one from it), or
    nothing there (a relative path: the folder it was looked for in). ``key``: the config key that
    gave the path (a path from a config file is not one the user typed), named with it. InputError
    for a path this user may not look at."""
    path = Path(path)
    named = f'{key}={path}' if key else str(path)
    try:
        path.stat()
    except PermissionError as e:
        raise InputError(f'{named}: {e.strerror} (this user may not look into a folder on its '
                         'path): let it (chmod a+rX), or give another path') from None
    except OSError:  # not there: said below
        pass
    if path.is_dir():
        split = (f'--data-dir {path.parent} --split {path.name}' if path.name in ('train', 'val')
                 else '--data-dir DIR --split SPLIT')
        raise MissingFileError(f'{named}: a folder, not a .beton file; write one from its images '
                               f'with imagenet-ffcv-write {split} --out FILE.beton')
    if path.exists() and not path.is_file():
        raise MissingFileError(f'{named}: not a regular file (a device, a FIFO or a socket), so '
                               'not a .beton file; give the path of one')
    if not path.is_file():
        where = '' if path.is_absolute() else f', looked for in {Path.cwd()}'
        raise MissingFileError(f'{named}: .beton file not found{where}; write it with '
                               f'imagenet-ffcv-write, or give its path')


def _read(path) -> tuple:
    """``(reader, records)`` (see :func:`records`); FileNotFoundError (naming a folder given for
    a .beton as one: the converter's input, most likely), CorruptBetonError."""
    path = Path(path)
    check_there(path)
    reader, images, labels = _open(path)
    alloc = reader.alloc_table
    ptrs = images['data_ptr'].astype(np.int64)
    sizes = np.full(len(ptrs), -1, np.int64)  # -1: no entry in the allocation table
    if len(alloc):
        order = np.argsort(alloc['ptr'])
        table_ptrs = alloc['ptr'][order].astype(np.int64)
        at = np.minimum(np.searchsorted(table_ptrs, ptrs), len(table_ptrs) - 1)
        found = table_ptrs[at] == ptrs
        sizes[found] = alloc['size'][order][at[found]].astype(np.int64)
    recs = np.zeros(len(images), RECORD_TYPE)
    recs['mode'], recs['height'], recs['width'] = images['mode'], images['height'], images['width']
    recs['data_ptr'], recs['size'], recs['label'] = ptrs, sizes, labels
    return reader, recs


def _open(path):
    """``(reader, image metadata, int64 labels)``; CorruptBetonError when unreadable."""
    size = Path(path).stat().st_size
    if size < HeaderType.itemsize:
        raise CorruptBetonError(f'{path}: truncated or not a .beton file: {size} bytes, fewer '
                                f'than the {HeaderType.itemsize} of ffcv\'s header; copy it again '
                                'or write it again with imagenet-ffcv-write')
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header['version'] != CURRENT_VERSION:
        raise CorruptBetonError(
            f'{path}: not a .beton file (it does not start with the header of ffcv\'s format '
            f'version {CURRENT_VERSION}: {header.tobytes()[:8].hex(" ")}); pass the '
            f'file imagenet-ffcv-write wrote')
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
        fields = [(name, type(handler).__name__) for name, handler in reader.handlers.items()]
        if fields[:2] != [(IMAGE_FIELD, 'RGBImageField'), (LABEL_FIELD, 'IntField')]:
            raise CorruptBetonError(
                f'{path}: its fields are {", ".join(f"{n} ({t})" for n, t in fields)}; this tool '
                'reads .beton files whose first fields are image (RGBImageField) and label '
                "(IntField), as imagenet-ffcv-write and ffcv-imagenet's write_imagenet.py write "
                'them: write this one again from its images with imagenet-ffcv-write')
        return reader, md[IMAGE_METADATA], md[LABEL_METADATA].astype(np.int64)
    except CorruptBetonError:
        raise
    except Exception as e:
        raise CorruptBetonError(f'{path}: not a readable .beton file ({type(e).__name__}: {e})')


def _check_record(i, record, data, modes: dict, decode: bool):
    """The problem of record ``i`` (a str), or None; counts its mode in ``modes``."""
    w, h, mode = int(record['width']), int(record['height']), int(record['mode'])
    if w < 1 or h < 1:
        return f'record {i}: image size {w}x{h}'
    try:
        blob = record_bytes(data, record)
    except CorruptBetonError as e:
        return f'record {i}: {e}'
    if mode == RAW_MODE:
        modes['raw'] += 1
        if blob.size < 3 * w * h:
            return f'record {i}: raw image {w}x{h} needs {3 * w * h} bytes, has {blob.size}'
    elif mode == JPEG_MODE:
        modes['jpg'] += 1
        if decode:
            try:
                with Image.open(io.BytesIO(blob.tobytes())) as im:
                    im.load()  # PIL only warns about corrupt data: the region decoder counts it
                    if im.size != (w, h):
                        return (f'record {i}: JPEG is {im.size[0]}x{im.size[1]}, metadata says '
                                f'{w}x{h}')
                if region_decoder() is not None:  # as the loaders read it: through its markers
                    decode_region(blob, top=0, left=0, height=h, width=w)
            except Exception as e:
                return f'record {i}: JPEG does not decode ({type(e).__name__}: {e})'
    else:
        return f'record {i}: unknown image mode {mode}'
    return None


def _short_side_histogram(recs) -> dict:
    """``{'lo-hi': n}`` of the stored images' shorter sides (px), over SHORT_SIDE_EDGES."""
    short = np.minimum(recs['width'], recs['height'])
    hist = {}
    for lo, hi in zip(SHORT_SIDE_EDGES[:-1], SHORT_SIDE_EDGES[1:]):
        n = int(((short >= lo) & (short < hi)).sum())
        if n:
            hist[f'{lo}-{hi - 1}' if hi < 10 ** 9 else f'>={lo}'] = n
    return hist
