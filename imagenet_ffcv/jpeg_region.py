"""The region decoder built from ``jpeg_region.c`` at install time (setup.py), seen from Python:
the library found and loaded with ctypes (refused when built from another version of its source),
its functions typed, ``decode_region`` for tests and benchmarks, and the converter's reading of
a source JPEG (``read_source_jpeg``, ``check_source_jpeg``: ``images``). The loaders' decoders
(``decoders``) call its functions from numba."""
import ctypes
import functools
import hashlib
import warnings
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import numpy as np

from .errors import ImagenetFfcvError, InputError

SOURCE = Path(__file__).with_name('jpeg_region.c')
REBUILD = ('reinstall the package to build it (pip install -e . in a checkout, which make setup '
           'does; it needs the libjpeg headers: apt-get install libjpeg-dev pkg-config)')


class JpegLibraryError(ImagenetFfcvError, RuntimeError):
    """The C region decoder is not built or does not match its source; the message says what to
    do."""


def library_path() -> Path:
    """The region decoder built from ``jpeg_region.c`` at install time (setup.py): the
    ``_jpeg_region`` library beside this module, for this Python's extension suffix first, else
    any one (a copy brought to another machine, e.g. by ``make carry``). Raises JpegLibraryError
    when there is none, saying too when this is a checkout's package that Python found first
    because it runs from the checkout's folder (``python -m`` after a ``pip install .``)."""
    here = Path(__file__).parent
    candidates = [here / f'_jpeg_region{suffix}' for suffix in EXTENSION_SUFFIXES]
    candidates += sorted(here.glob('_jpeg_region*.so'))
    for path in candidates:
        if path.is_file():
            return path
    shadowing = Path.cwd().resolve() == here.parent.resolve()  # '' heads sys.path with -m, -c
    raise JpegLibraryError(f'the JPEG region decoder is not built (no _jpeg_region*.so in '
                           f'{here}); {REBUILD}' + (f'; or, to use the package pip installed, run '
                                                    f'from another folder than {here.parent}'
                                                    if shadowing else ''))


def load_library() -> ctypes.CDLL:
    """The region decoder library, loaded; JpegLibraryError when it is missing, cannot be
    loaded, or was built from another version of ``jpeg_region.c`` than the one beside it."""
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
        built_from = lib.jpeg_region_source_sha256
    except (OSError, AttributeError) as e:
        raise JpegLibraryError(f'{path}: cannot be loaded ({e}); {REBUILD}') from None
    built_from.restype = ctypes.c_char_p
    if SOURCE.is_file() and built_from().decode() != hashlib.sha256(
            SOURCE.read_bytes()).hexdigest():
        raise JpegLibraryError(f'{path} was built from another version of {SOURCE}; {REBUILD}')
    return lib


_decode_region_c = None

# The ctypes signature of each function of jpeg_region.c: (argument types, result type)
_REGION = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,  # src, size, dst,
           ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,  # capacity, top,
           ctypes.c_uint32, ctypes.c_void_p]  # left, height, width, denom, info
SIGNATURES = {
    'decode_region': (_REGION, ctypes.c_int),
    'decode_region_scanlines': (_REGION, ctypes.c_int),
    'region_jpeg': (_REGION, ctypes.c_int64),
    'entropy_decode': ([ctypes.c_void_p, ctypes.c_uint64], ctypes.c_int),  # src, size
    # src, size, denom, dst, capacity, info, message
    'read_source_jpeg': ([ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p,
                          ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int),
    'check_source_jpeg': ([ctypes.c_char_p, ctypes.c_uint64, ctypes.c_char_p],  # src, size,
                          ctypes.c_int),  # message
    # src, stride, row_index, row_weight, col_index, col_weight, first, count, dst, out_h, out_w,
    # mean, inv_std, normalize
    'resample_bilinear': ([ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                           ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_int], ctypes.c_int)}


@functools.cache
def c_function(name: str):
    """The function ``name`` of the built library (:func:`load_library`; a key of
    :data:`SIGNATURES`, which says what each takes), typed for ctypes; loaded once per name.
    Raises JpegLibraryError as load_library."""
    fn = getattr(load_library(), name)
    fn.argtypes, fn.restype = SIGNATURES[name]
    return fn


def region_decoder():
    """The ctypes function ``decode_region`` of the built ``jpeg_region.c``, or None with a
    warning if it is not built (see :func:`load_library`)."""
    global _decode_region_c
    if _decode_region_c is None:
        try:
            _decode_region_c = c_function('decode_region')
        except JpegLibraryError as e:
            warnings.warn(f'{e}; falling back to decoding whole JPEGs with ffcv (slower)',
                          stacklevel=2)
            _decode_region_c = False
    return _decode_region_c or None


def decode_region(jpeg: np.ndarray, *, top: int, left: int, height: int, width: int,
                  denom: int = 1, restart_markers: bool = True) -> tuple:
    """Decode rows ``top .. top+height-1`` and columns ``left .. left+width-1`` (coordinates in the
    image scaled by 1/``denom``, ``denom`` in 1, 2, 4, 8) of a JPEG given as a uint8 array.
    ``restart_markers=False``: decode it the way a JPEG without restart markers is decoded
    (libjpeg-turbo's partial decompression), even when it has them, for comparisons.

    Returns ``(pixels, first_column)``: uint8 (height, W', 3) RGB rows holding at least the asked
    columns, and the image column of their first one (libjpeg widens the crop to its block grid).
    Raises ValueError for a corrupt JPEG or a rectangle outside the image, JpegLibraryError if
    the C part is not built. For tests and benchmarks; the decoders call it from numba.
    """
    fn = region_decoder()
    if fn is None:
        raise JpegLibraryError(f'{SOURCE.name} is not built (see the warning above); {REBUILD}')
    if not restart_markers:
        fn = c_function('decode_region_scanlines')
    jpeg = np.ascontiguousarray(jpeg, dtype=np.uint8)
    capacity = height * (left + width + 64) * 3
    out = np.empty(capacity, np.uint8)
    info = np.zeros(2, np.int64)
    code = fn(jpeg.ctypes.data, jpeg.size, out.ctypes.data, capacity, top, left, height, width,
              denom, info.ctypes.data)
    if code != 0:
        raise InputError(f'decode_region failed with code {code} (-1 corrupt JPEG, -2 rectangle '
                         f'outside the image, -3 data ended early, -5 corrupt data)')
    return out[:height * info[1] * 3].reshape(height, int(info[1]), 3), int(info[0])


# What read_source_jpeg's and check_source_jpeg's codes mean (jpeg_region.c says how each is found)
SOURCE_JPEG_STATES = {0: 'intact', 1: 'no EOI', 2: 'damaged', 3: 'truncated', -1: 'refused'}


def check_source_jpeg(data: bytes) -> tuple:
    """libjpeg's verdict on a JPEG file's bytes, which PIL does not pass on: ``(state,
    message)``, ``state`` one of 'intact' (as far as libjpeg can tell); 'no EOI' (whole but for
    its final EOI marker, which PIL refuses as truncated; Huffman-coded); 'damaged'
    (entropy-coded data libjpeg could not read and fills with grey, where PIL says nothing: a
    bad Huffman code, a segment that ends early; ``message`` is libjpeg's first warning, e.g.
    'Corrupt JPEG data: premature end of data segment'); 'truncated' (the data ends before the
    image does, or cannot be told whole: arithmetic-coded; or a sequential JPEG with a component
    in no scan); 'refused' (libjpeg's error, in ``message``). Damage libjpeg does not notice
    (most of a byte in a baseline JPEG's data, about half in a progressive one's, almost any in
    arithmetic-coded data that ends in its EOI marker) leaves a JPEG 'intact', and so does
    its warning of 'extraneous bytes' before a marker, which whole files give too. The whole
    file is decoded at 1/8 scale (every scan's entropy-coded data read as at full size). Raises
    JpegLibraryError when the library is not built.
    """
    message = ctypes.create_string_buffer(200)  # JMSG_LENGTH_MAX
    code = c_function('check_source_jpeg')(data, len(data), message)
    return SOURCE_JPEG_STATES[code], message.value.decode(errors='replace')


def read_source_jpeg(data: bytes, *, height: int, width: int, denom: int) -> tuple:
    """A JPEG file's bytes decoded as PIL decodes them (libjpeg's ISLOW IDCT and fancy
    upsampling; the same pixels where both libraries are libjpeg-turbo, but for the block
    smoothing of a progressive JPEG whose scans stop short), DCT-scaled by 1/``denom`` (1, 2, 4
    or 8) from its ``height`` x ``width`` pixels, with libjpeg's verdict: ``(state, message,
    pixels)``, ``state`` and ``message`` as :func:`check_source_jpeg` gives them, ``pixels`` the
    (ceil(height / denom), ceil(width / denom), 3) uint8 RGB array (a grayscale JPEG's channel
    thrice; grey where 'damaged' or 'truncated') or None when 'refused' (a CMYK JPEG among
    others). Raises JpegLibraryError when the library is not built, ValueError when ``height``
    and ``width`` are not the JPEG's.
    """
    shape = (-(-height // denom), -(-width // denom), 3)
    pixels = np.empty(shape, np.uint8)
    info = np.zeros(2, np.int64)
    message = ctypes.create_string_buffer(200)  # JMSG_LENGTH_MAX
    code = c_function('read_source_jpeg')(data, len(data), denom, pixels.ctypes.data,
                                          pixels.nbytes, info.ctypes.data, message)
    if code == -2 or (code >= 0 and tuple(info) != shape[:2]):
        raise InputError(f'read_source_jpeg: the JPEG is {info[1]} x {info[0]} px at 1/{denom} '
                         f'scale, not the {shape[1]} x {shape[0]} px asked for')
    return (SOURCE_JPEG_STATES[code], message.value.decode(errors='replace'),
            None if code == -1 else pixels)
