"""ffcv imported without the numba compiling that importing it sets off: the package's modules
import this module before anything of ffcv.

ffcv 1.0.2's ``ffcv/fields/rgb_image.py`` keeps its two image modes ('jpg': 0, 'raw': 1) in a numba
typed ``Dict``, filled when the module is imported. Filling it compiles numba's dictionary code for
those types, in every process that imports ffcv (each converter, training process and rank), and
the first read compiles more (``docs/ffcv-notes.md`` has the times). ffcv reads the modes only in
Python (``IMAGE_MODES[...]`` in its decoders' ``generate_code`` and in ``RGBImageField.encode``),
and so do ``decoders`` and ``writer``, where a ``dict`` gives the same. So ffcv is imported here
with ``numba.typed.Dict`` set to ``dict``, and numba's class is put back as soon as the import
ends. If ffcv was imported before this module, its typed ``Dict`` stays and works as before.
"""
import sys

import numba.typed

if 'ffcv' not in sys.modules:
    _typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        import ffcv  # noqa: F401  (ffcv/__init__.py imports ffcv.fields.rgb_image)
    finally:
        numba.typed.Dict = _typed_dict
