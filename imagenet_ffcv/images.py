"""Decoding any input image to RGB, the shorter-side resize and the JPEG encoding: what the writer
stores, and what ``imagenet-ffcv-predict`` stores the same way before it decodes the image as the
validation loader does (``image_decode.center_crop_pixels``)."""
import functools
import io
import os
import threading
import warnings

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from .errors import InputError
from .ilsvrc import open_image_source
from .jpeg_region import JpegLibraryError, c_function, check_source_jpeg, read_source_jpeg


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


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of a decoded image. Integer modes are scaled to 8 bits, not clipped as PIL's
    ``convert`` does: 16-bit ones (``I;16*``: 16-bit PNG/TIFF) by ``>> 8``; 32-bit ``I`` (TIFF),
    whose depth the file does not say, as 8-bit data when its maximum is at most 255, as 16-bit
    when at most 65535, else by its top 8 bits; negative values become 0. Float (``F``) images
    are clipped to 0-255; everything else (L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...) goes through
    PIL's ``convert('RGB')``."""
    if im.mode == 'RGB':
        return im
    if im.mode.startswith('I'):
        a = np.asarray(im).astype(np.int64)
        bits = 16
        if im.mode == 'I':
            top = int(a.max(initial=0))
            bits = 8 if top <= 255 else 16 if top <= 65535 else top.bit_length()
        a = a >> (bits - 8)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), 'L').convert('RGB')
    if im.mode == 'F':
        a = np.asarray(im)
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8),
                               'L').convert('RGB')
    return im.convert('RGB')


_PIXEL_LIMIT_LOCK = threading.Lock()


def _opened(f, path) -> Image.Image:
    """``Image.open(f)``; PIL's error for data it cannot identify names ``path`` (a tar member's
    reference, not '<_io.BytesIO object at 0x...>'). PIL's size limit against decompression bombs
    is lifted for the open only (no 'DecompressionBombWarning' above 89 MP, no error above 179 MP:
    a 200 MP phone photo is an image like any other): :func:`load_image` applies the limit to
    the pixels it decodes instead (:func:`_check_decoded_size`)."""
    with _PIXEL_LIMIT_LOCK:  # PIL reads its limit from a global at the open
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(f)
        except UnidentifiedImageError:
            empty = f.seek(0, os.SEEK_END) == 0
            raise UnidentifiedImageError(f'cannot identify image file {str(path)!r}'
                                         + (': it is empty (0 bytes)' if empty else '')) from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit


@functools.cache
def jpeg_check_missing():
    """Why JPEGs are decoded by PIL alone, unchecked (the region decoder's JpegLibraryError, as
    text: it is not built, or built from another version of its source), or None."""
    try:
        c_function('read_source_jpeg')
    except JpegLibraryError as e:
        return str(e)
    return None


def _raise_if_damaged(state: str, message: str) -> None:
    """InputError for libjpeg's verdict (``jpeg_region.check_source_jpeg``) on a damaged or
    truncated JPEG."""
    if state == 'damaged':
        raise InputError(f'corrupt JPEG data ({message}): libjpeg fills what it cannot read '
                         'with grey')
    if state == 'truncated':
        raise InputError('the JPEG is truncated: its data ends before its image does'
                         + (f' ({message})' if message else ''))


def draft_scale(size: tuple, target: tuple) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) at which PIL's ``draft`` decodes a JPEG of
    ``size`` (width, height) for ``target``: the largest that keeps both sides at least the
    target's."""
    scale = min(size[0] // target[0], size[1] // target[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def _check_decoded_size(width: int, height: int) -> None:
    """ValueError when decoding an image to ``width`` x ``height`` pixels (a JPEG's after its DCT
    scaling, 1/2, 1/4 or 1/8 of its size) would make more pixels than twice PIL's
    ``Image.MAX_IMAGE_PIXELS`` (179 MP by default; None: no limit), where PIL refuses a file as a
    possible decompression bomb: a PNG or TIFF that large takes over 0.5 GB to decode."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        raise InputError(f'{width} x {height} px ({width * height / 1e6:.0f} MP) to '
                         f'decode, over the {2 * limit / 1e6:.0f} MP limit against '
                         f'decompression bombs (PIL.Image.MAX_IMAGE_PIXELS x 2); shrink it '
                         f'first, or save it as a JPEG (decoded at 1/8 of its size)')


def load_image(path, max_res: int) -> np.ndarray:
    """Decode an image file to RGB with its shorter side at most ``max_res`` pixels.

    Grayscale, CMYK, palette and alpha images are converted to RGB by PIL's ``convert('RGB')``
    (a grayscale JPEG by libjpeg, to the same pixels);
    16-bit images are scaled to 8 bits (see :func:`_to_rgb`); an EXIF orientation tag is applied
    (as ``ImageOps.exif_transpose``) before resizing. Large JPEGs are decoded at a reduced DCT
    scale (as PIL's ``draft``, :func:`draft_scale`) to no less than the target size, then resized
    by :func:`resize_rgb` to the size :func:`shorter_side_size` gives for the file's own size (not
    the decoded one: libjpeg rounds a scaled side up, which moved the longer side by up to 4 px).
    Images smaller than ``max_res`` are kept as they are. Any image size is read, up to PIL's
    limit against decompression bombs applied to the pixels decoded (:func:`_check_decoded_size`).
    Returns a (H, W, 3) uint8 array. Raises OSError/ValueError for a file that cannot be decoded
    completely: a truncated file is an error, and so is a JPEG whose damage libjpeg notices
    (libjpeg's warnings, which PIL drops, are heard, with the built region decoder:
    :func:`_decoded`; most damage of a byte or two is not noticed), while a JPEG that lacks
    only its final EOI marker, which PIL refuses, is read. PIL's warnings (corrupt EXIF data,
    ...) are warned again naming ``path`` (PIL's name no file).
    """
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            return _load_image(path, max_res)
    finally:  # once PIL's are caught no more
        for w in caught:
            warnings.warn(f'{path}: {w.message}', w.category, stacklevel=2)


# EXIF orientation -> the transpose that turns the image upright (PIL's ImageOps.exif_transpose)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _load_image(path, max_res: int) -> np.ndarray:
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched it on
    with open_image_source(path) as f:
        head = f.read(2)
        data = head + f.read() if head == b'\xff\xd8' else None  # a JPEG's, for libjpeg
        f.seek(0)
        with _opened(io.BytesIO(data) if data else f, path) as im:
            stored = im.size
            a, orientation = _decoded(im, data, shorter_side_size(*stored, max_res))
    if orientation in UPRIGHT:
        a = np.asarray(Image.fromarray(a).transpose(UPRIGHT[orientation]))
    turned = orientation in (5, 6, 7, 8)
    size = shorter_side_size(*(stored[::-1] if turned else stored), max_res)
    if size != a.shape[1::-1]:
        a = resize_rgb(a, size)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or 0 in a.shape:
        raise InputError(f'decoded to an unusable array {a.dtype} {a.shape}')
    return a


def _decoded(im: Image.Image, data, target: tuple) -> tuple:
    """``(pixels, orientation)``: the opened image ``im`` (``data``: its file's bytes when they
    start as a JPEG's, else None) decoded
    to RGB ((H, W, 3) uint8) at the DCT scale PIL's ``draft`` takes for ``target`` (width,
    height) when it is a JPEG, and its EXIF orientation (1 when none). A JPEG (or the first
    image of an MPO file, as PIL reads it) PIL reads as RGB or grayscale is decoded by libjpeg
    directly (``jpeg_region.read_source_jpeg``: PIL's pixels, about 10 % sooner), with
    libjpeg's warnings, which PIL drops, heard: damaged data libjpeg notices (which PIL fills
    with grey without a word) or a truncated file raise InputError, and a JPEG whole but for
    its final EOI marker (which PIL refuses as truncated) is read. Any other JPEG (CMYK) is
    checked the same way first (``check_source_jpeg``), then decoded by PIL, as any
    other file is, and converted by :func:`_to_rgb`. Without the built region decoder
    (:func:`jpeg_check_missing`), PIL alone decodes, unchecked."""
    jpeg = (im.format in ('JPEG', 'MPO')  # MPO: a camera's JPEG with more images after it
            and data is not None and not jpeg_check_missing())
    if jpeg and im.mode in ('RGB', 'L'):
        denom = draft_scale(im.size, target)  # 1 where no shrink is asked for
        _check_decoded_size(-(-im.width // denom), -(-im.height // denom))
        state, message, pixels = read_source_jpeg(data, height=im.height, width=im.width,
                                                  denom=denom)
        if pixels is not None:  # else this libjpeg refused it: PIL's may read it, unchecked
            _raise_if_damaged(state, message)
            return pixels, im.getexif().get(ExifTags.Base.Orientation, 1)
    elif jpeg:
        state, message = check_source_jpeg(data)
        _raise_if_damaged(state, message)
        if state == 'no EOI':  # PIL reads it with the marker
            data += b'\xff\xd9'
            with _opened(io.BytesIO(data), 'the JPEG with its EOI marker') as whole:
                return _decoded(whole, data, target)
    if target != im.size:
        im.draft('RGB', target)
    _check_decoded_size(*im.size)
    im.load()  # decodes everything: raises on truncated or corrupt data
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    return np.asarray(_to_rgb(im)), orientation


def resize_rgb(a: np.ndarray, size: tuple) -> np.ndarray:
    """Shrink a (H, W, 3) uint8 array to ``size`` = (width, height) with OpenCV.

    Bilinear (``INTER_LINEAR``) when each side shrinks by a factor >= 0.5: every source pixel then
    still contributes, and after the DCT-scaled JPEG decode (``draft``) this is the common case; it
    is ~5x faster than area averaging and within ~1.2 grey levels (mean) of PIL's antialiased
    bilinear. Area averaging (``INTER_AREA``, as ffcv's own resizer) for larger reductions.
    """
    scale = min(size[0] / a.shape[1], size[1] / a.shape[0])
    interpolation = cv2.INTER_LINEAR if scale >= 0.5 else cv2.INTER_AREA
    return cv2.resize(a, size, interpolation=interpolation)


# The writer's defaults, which predict stores its images with too: --max-res (the shorter side, px),
# --jpeg-quality and --restart-interval (in MCUs, see encode_jpeg).
DEFAULT_MAX_RES = 256
DEFAULT_JPEG_QUALITY = 90
DEFAULT_RESTART_INTERVAL = 4
MCU_WIDTH = 16  # px: OpenCV's JPEGs of colour images are 4:2:0, MCUs of 16 x 16 px


def restart_interval_for(width: int, restart_interval: int) -> int:
    """MCUs per restart interval in the stored JPEG of an image ``width`` px wide: the largest
    divisor of its MCU columns (``MCU_WIDTH`` px each) that is at most ``restart_interval``, so
    that every MCU row starts an interval and the region decoder can leave out columns as well as
    rows (``jpeg_region.c``). 0 for 0 (no restart markers)."""
    if restart_interval < 0:
        raise InputError(f'restart_interval={restart_interval}: must be >= 0 (0: no markers)')
    columns = -(-width // MCU_WIDTH)
    return max((n for n in range(1, min(restart_interval, columns) + 1) if columns % n == 0),
               default=0)


def encode_jpeg(rgb: np.ndarray, *, quality: int, restart_interval: int) -> np.ndarray:
    """The JPEG record the writer stores for (H, W, 3) uint8 RGB pixels, as a 1-D uint8 array:
    OpenCV's ``imencode`` (its libjpeg-turbo; baseline, 4:2:0, standard Huffman tables) at
    ``quality`` (0-100), with a restart marker every ``restart_interval_for(W,
    restart_interval)`` MCUs. ``restart_interval=0``: no markers, the bytes of ffcv's own
    ``encode_jpeg`` (the records of .beton files written before markers were the default).

    Any JPEG decoder reads the result, to the same pixels with or without markers; the markers
    cost bytes (+1.9 % at the default interval on imagewoof320 at shorter side 256, q90; table in
    docs/converting.md). The one function that turns pixels into stored bytes: the writer calls it
    for every JPEG record, and the same OpenCV build reproduces a record byte for byte. Raises
    ValueError if OpenCV cannot encode."""
    interval = restart_interval_for(rgb.shape[1], restart_interval)
    ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(quality),
                                cv2.IMWRITE_JPEG_RST_INTERVAL, interval])
    if not ok:
        raise InputError(f'OpenCV could not encode a {rgb.shape} {rgb.dtype} image as JPEG')
    return encoded.reshape(-1)
