"""The records of a .beton's images: each input file decoded (``images``), resized and encoded
into the record ffcv stores, in the converter's writer processes, and what ffcv cannot store
(a record larger than a page of the file, a side over 65,500 px), reported as a bad file is."""
from typing import NamedTuple

import numpy as np
from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.fields import RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES

from .images import encode_jpeg, load_image

# libjpeg's largest side (JPEG_MAX_DIMENSION), below the 65,535 of ffcv's records (uint16 sides)
MAX_SIDE = 65_500
# A .beton's fields, in order (writer.write_beton's), and their columns of ffcv's metadata table,
# which ffcv names f<field index>.
IMAGE_FIELD, LABEL_FIELD = 'image', 'label'
IMAGE_METADATA, LABEL_METADATA = 'f0', 'f1'


class Record(NamedTuple):
    """One stored image: ``mode`` 'jpg' or 'raw', its side in px, and its bytes (uint8, 1-D)."""
    mode: str
    height: int
    width: int
    data: np.ndarray


class ImageFiles:
    """An indexable dataset for ``ffcv``'s ``DatasetWriter.from_indexed_dataset``.

    ``self[i]`` returns ``(Record, label)``: the i-th image decoded, resized (``max_res``) and
    encoded as ``encoding`` (:func:`make_record`'s keywords) says. It never raises for a file, so
    that one bad file does not end the write (``writer._Writer`` stops at a worker's error). A file
    that cannot be decoded, or whose record ffcv cannot store (:func:`record_or_problem`), is
    appended to ``failures_path`` as ``index<TAB>reason`` (any file name: the reason's characters
    that UTF-8 cannot hold, as in a name that is not UTF-8, are written as escapes) and stands in
    as a 1x1 black image; the caller checks that file (``writer.read_failures``).
    """

    def __init__(self, samples: list, *, max_res: int, failures_path, encoding: dict,
                 page_size: int):
        self.samples, self.max_res, self.failures_path = samples, max_res, str(failures_path)
        self.encoding, self.page_size = encoding, page_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            image = load_image(path, self.max_res)
        except Exception as e:  # any decoder error: reported, never a hang of the writer
            return self._failed(i, f'{type(e).__name__}: {e}'), label
        record, problem = record_or_problem(image, self.page_size, **self.encoding)
        return (record if problem is None else self._failed(i, problem)), label

    def _failed(self, i: int, reason: str) -> Record:
        """Append ``i`` and ``reason`` to the failures file; the stand-in's record."""
        reason = reason.replace('\n', ' ').replace('\t', ' ')
        # O_APPEND: whole lines from each process
        with open(self.failures_path, 'a', encoding='utf-8', errors='backslashreplace') as f:
            f.write(f'{i}\t{reason}\n')
        return make_record(np.zeros((1, 1, 3), np.uint8), **self.encoding)


def make_record(image: np.ndarray, *, write_mode: str, jpeg_quality: int,
                compress_probability: float, restart_interval: int) -> Record:
    """The record of ``image`` ((H, W, 3) uint8 RGB): ``write_mode`` 'jpg' stores the JPEG of
    ``images.encode_jpeg`` at ``jpeg_quality`` with restart markers every ``restart_interval``
    MCUs, 'raw' the pixels, 'proportion' a JPEG with probability ``compress_probability`` (drawn
    from numpy's global generator, as ffcv's ``RGBImageField`` does) and the pixels otherwise."""
    as_jpeg = write_mode == 'jpg' or (write_mode == 'proportion'
                                      and np.random.rand() < compress_probability)
    if as_jpeg:
        data = encode_jpeg(image, quality=jpeg_quality, restart_interval=restart_interval)
    else:
        data = np.ascontiguousarray(image).reshape(-1)
    return Record('jpg' if as_jpeg else 'raw', *image.shape[:2], data)


def record_or_problem(image: np.ndarray, page_size: int, **encoding) -> tuple:
    """``(record, None)``: the record of ``image`` (:func:`make_record` with ``encoding``), or
    ``(None, why)`` when ffcv cannot store it, ``why`` naming what to do: a side over
    :data:`MAX_SIDE` px, or a record larger than one page of the file (``page_size`` bytes; with
    ``write_mode`` 'proportion' such an image is stored as JPEG instead of raw). Either ended
    the whole write in a writer process (OpenCV's and ffcv's errors), naming no file."""
    size = f'{image.shape[1]} x {image.shape[0]} px after the resize'
    if max(image.shape[:2]) > MAX_SIDE:
        return None, f'{size}: a side over {MAX_SIDE:,} px, more than a record holds; crop it'
    record = make_record(image, **encoding)  # an error here is not the file's: it ends the write
    if record.data.nbytes > page_size and encoding['write_mode'] == 'proportion':
        record = make_record(image, **{**encoding, 'write_mode': 'jpg'})  # stored, not skipped
    if record.data.nbytes > page_size:
        return None, (f'{size}: its record ({record.mode}, {record.data.nbytes / 2 ** 20:.1f} MiB) '
                      f'is larger than a page of the .beton ({page_size / 2 ** 20:g} MiB); crop it'
                      + (', or write with --write-mode jpg' if record.mode == 'raw' else ''))
    return record, None


def encode_image(destination, record: Record, malloc) -> None:
    """Store ``record`` as ffcv's ``RGBImageField.encode`` stores an image: ``destination`` (the
    record's metadata row) gets ``mode``, ``height``, ``width`` and ``data_ptr``; the bytes go to
    the storage that ``malloc(nbytes)`` returns."""
    destination['mode'] = IMAGE_MODES[record.mode]
    destination['height'], destination['width'] = record.height, record.width
    destination['data_ptr'], storage = malloc(record.data.nbytes)
    storage[:] = record.data


def image_field() -> RGBImageField:
    """The ``image`` field of our .beton files: an ffcv ``RGBImageField`` (ffcv records the
    field's class in the file, not its arguments, and its readers know only its own classes)
    that stores the records :class:`ImageFiles` makes (:func:`encode_image`: an attribute of this
    instance, so it travels with the field to ffcv's writer processes however they start)."""
    field = RGBImageField()
    field.encode = encode_image
    return field
