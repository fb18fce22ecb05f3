"""Decoding any input image to RGB, the shorter-side resize and the JPEG encoding: what the writer
stores, and what ``imagenet-ffcv-predict`` stores the same way before it decodes the image as the
validation loader does (``decoders.center_crop_pixels``)."""
import cv2
import numpy as np
from ffcv.fields.rgb_image import encode_jpeg
from PIL import Image, ImageFile, ImageOps

from .sources import open_image_source


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
    """RGB version of a decoded image. 16-bit and 32-bit integer modes (``I;16*``, ``I``: 16-bit
    PNG/TIFF) are scaled to 8 bits (``>> 8``), not clipped as PIL's ``convert`` does; float (``F``)
    images are clipped to 0-255; everything else (L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...) goes
    through PIL's ``convert('RGB')``."""
    if im.mode == 'RGB':
        return im
    if im.mode.startswith('I'):
        a = np.asarray(im).astype(np.int64)
        if im.mode == 'I' and a.max(initial=0) > 65535:  # genuine 32-bit data: use the top 8 bits
            a = a >> max(0, int(a.max()).bit_length() - 8)
        else:
            a = a >> 8
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), 'L').convert('RGB')
    if im.mode == 'F':
        a = np.asarray(im)
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8),
                               'L').convert('RGB')
    return im.convert('RGB')


def load_image(path, max_res: int) -> np.ndarray:
    """Decode an image file to RGB with its shorter side at most ``max_res`` pixels.

    Grayscale, CMYK, palette and alpha images are converted to RGB by PIL's ``convert('RGB')``;
    16-bit images are scaled to 8 bits (see :func:`_to_rgb`); an EXIF orientation tag is applied
    (``ImageOps.exif_transpose``) before resizing. Large JPEGs are decoded at a reduced DCT scale
    (PIL ``draft``) to no less than the target size, then resized by :func:`resize_rgb`. Images
    smaller than ``max_res`` are kept as they are.
    Returns a (H, W, 3) uint8 array. Raises OSError/ValueError for a file PIL cannot decode
    completely: a truncated file is an error, never a partly grey image.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched it on
    with open_image_source(path) as f, Image.open(f) as im:
        size = shorter_side_size(*im.size, max_res)
        if size != im.size:
            im.draft('RGB', size)
        im.load()  # decodes everything: raises on truncated or corrupt data
        im = ImageOps.exif_transpose(im) or im
        im = _to_rgb(im)
        a = np.asarray(im)
        size = shorter_side_size(*im.size, max_res)
        if size != im.size:
            a = resize_rgb(a, size)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or 0 in a.shape:
            raise ValueError(f'decoded to an unusable array {a.dtype} {a.shape}')
        return a


def stored_jpeg(pixels: np.ndarray, quality: int = 90) -> np.ndarray:
    """The JPEG bytes ``imagenet-ffcv-write`` stores for ``pixels`` ((H, W, 3) uint8 RGB, as
    :func:`load_image` returns them) at ``quality``: ffcv's ``encode_jpeg`` (OpenCV's libjpeg,
    4:2:0), the encoder its ``RGBImageField`` calls. Returns uint8 (N,)."""
    return encode_jpeg(pixels, quality)


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
