"""Builds the JPEG region decoder (imagenet_ffcv/jpeg_region.c) at install time, against libjpeg
found with pkg-config, so that an installed package needs no compiler at run time. The package
itself is described in pyproject.toml.

The library is loaded with ctypes (imagenet_ffcv/jpeg_region.py), not imported: it defines no Python
module, only ``decode_region``, ``decode_region_scanlines``, ``resample_bilinear``, the profiling
steps ``region_jpeg`` and ``entropy_decode``, the converter's ``read_source_jpeg`` and
``check_source_jpeg``, and ``jpeg_region_source_sha256`` (the SHA-256 of the source it was built
from, so that a library older than its source is noticed).
"""
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = Path('imagenet_ffcv') / 'jpeg_region.c'
MISSING = ('imagenet-ffcv: libjpeg\'s headers (jpeglib.h) were not found, so the JPEG region '
           'decoder cannot be built. Install them, then run pip again:\n'
           '  Debian/Ubuntu: sudo apt-get install libjpeg-dev pkg-config\n'
           '  Fedora/RHEL:   sudo dnf install libjpeg-turbo-devel pkgconf\n'
           '  conda:         conda install -c conda-forge libjpeg-turbo pkg-config\n'
           '(ffcv 1.0.2 also needs libopencv-dev and libturbojpeg0-dev to build.)')


def libjpeg_flags() -> tuple:
    """``(include_dirs, library_dirs, libraries)`` for libjpeg: from ``pkg-config libjpeg``, else
    the default search path when jpeglib.h is found there; SystemExit with what to install
    otherwise."""
    if shutil.which('pkg-config'):
        found = subprocess.run(['pkg-config', '--cflags', '--libs', 'libjpeg'],
                               capture_output=True, text=True)
        if found.returncode == 0:
            flags = shlex.split(found.stdout)
            return ([f[2:] for f in flags if f.startswith('-I')],
                    [f[2:] for f in flags if f.startswith('-L')],
                    [f[2:] for f in flags if f.startswith('-l')] or ['jpeg'])
    prefixes = [sys.prefix, os.environ.get('CONDA_PREFIX', ''), '/usr', '/usr/local']
    if any((Path(p) / 'include' / 'jpeglib.h').is_file() for p in prefixes if p):
        return [str(Path(p) / 'include') for p in prefixes if p], [], ['jpeg']
    sys.stderr.write(MISSING + '\n')
    raise SystemExit(MISSING)


class BuildRegionDecoder(build_ext):
    """build_ext with libjpeg's flags found first (only when building, not for sdists)."""

    def run(self):
        include_dirs, library_dirs, libraries = libjpeg_flags()
        for ext in self.extensions:
            ext.include_dirs += include_dirs
            ext.library_dirs += library_dirs
            ext.libraries += libraries
        super().run()

    def get_export_symbols(self, ext):
        return []  # a plain C library: no PyInit_ function to export


digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
setup(ext_modules=[Extension('imagenet_ffcv._jpeg_region', sources=[str(SOURCE)],
                             define_macros=[('JPEG_REGION_SOURCE_SHA256', f'"{digest}"')],
                             extra_compile_args=['-O3'], libraries=['pthread'])],
      cmdclass={'build_ext': BuildRegionDecoder})
