"""Reading ``torch.save`` files without running code: checkpoints, final weights and other tools'
weights files all come through :func:`safe_torch_load`, which tells a file that would run code, a
damaged or partial one and one that is no torch file at all apart, naming the file."""
import argparse
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, first_few

# How a torch.save file starts: a zip archive (since torch 1.6), or the legacy format's pickle
# (its PROTO opcode). Anything else (an HTML error page, garbage) is not a torch file at all.
TORCH_FILE_STARTS = (b'PK\x03\x04', b'\x80')
# What a checkpoint written before the numpy RNG state was stored as a tensor needs besides tensors:
# numpy arrays, rebuilt from their bytes (no other code can run through these).
try:  # numpy 2 (numpy 1.26.1-1.26.4 have a numpy._core without multiarray)
    from numpy._core.multiarray import _reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct
NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]
# What other tools' checkpoints hold besides: timm's and torchvision's reference scripts save their
# command line as an argparse.Namespace (rebuilt by setting its attributes: no code runs).
SAFE_GLOBALS = [*NUMPY_ARRAY_GLOBALS, argparse.Namespace]


def safe_torch_load(path, what: str = 'file'):
    """``torch.load`` of ``path`` onto the CPU that builds tensors and plain values only
    (``weights_only=True``, plus numpy arrays for checkpoints of earlier versions and the
    ``argparse.Namespace`` of timm's and torchvision's reference checkpoints). Raises
    CheckpointError naming the file when it holds anything else (a pickle that would run code on
    loading: refused, nothing of it runs) or cannot be read: not a torch file (one that does not
    start as torch.save's files do, :data:`TORCH_FILE_STARTS`: :func:`not_a_torch_file` says
    what it is), a zip archive without its end (cut short in a copy or download), a zip archive
    that torch.save did not write (no ``<folder>/data.pkl`` in it), a record of the archive
    whose bytes do not match their CRC-32 (:func:`damaged_record`: torch.load does not check
    them, and loaded such a file with other weights without a word), or damaged (a file of the
    legacy format cut short, which has no end to look for, among them)."""
    try:
        with open(path, 'rb') as f:
            start = f.read(64)
        zipped = start.startswith(TORCH_FILE_STARTS[0])
        complete = not zipped or zipfile.is_zipfile(path)
        members, damaged = ['t/data.pkl'], None  # a legacy file: no archive to look into
        if zipped and complete:
            with zipfile.ZipFile(path) as archive:
                members, damaged = archive.namelist(), damaged_record(archive)
    except Exception as e:  # noqa: BLE001 (a damaged archive's index: BadZipFile, EOFError,
        # NotImplementedError for an odd compression, RuntimeError for an 'encrypted' record)
        raise CheckpointError(f'{path}: cannot read the {what} ({type(e).__name__}: {e})'
                              ) from None
    if not start.startswith(TORCH_FILE_STARTS):
        raise CheckpointError(not_a_torch_file(path, start))
    if not complete:  # torch said 'OSError: [Errno 22] Invalid argument' of such a file object
        raise CheckpointError(f'{path}: incomplete: the zip archive torch.save writes, without '
                              f'its end ({Path(path).stat().st_size:,} bytes; a copy or download '
                              'cut short?): copy or download it again')
    if damaged:
        raise CheckpointError(f'{path}: damaged: the bytes of its record {damaged} do not match '
                              'the checksum (CRC-32) torch.save wrote for them (a copy, download '
                              'or disk that changed them?): copy or download it again')
    top = members[0].split('/')[0] if members else ''  # torch.save: every record in one folder
    if f'{top}/data.pkl' not in members:  # its pickle
        raise CheckpointError(f'{path}: a zip archive, not one torch.save writes (it holds '
                              f'{first_few(members, 3) or "nothing"}, not a folder of data.pkl '
                              f'and tensors): give a weights file or a run folder')
    convert = ('use weights written by this tool (checkpoint.pt, final_weights.pt or '
               'final_weights.safetensors), or, for a file you trust, save its state dict alone '
               '(torch.save(model.state_dict(), "weights.pt"))')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings('ignore', '.*TorchScript archive')  # refused below
            warnings.filterwarnings('ignore', 'Detected pickle protocol')  # one refused below
            with open(path, 'rb') as f:  # (by name, torch reads a .safetensors as one)
                return torch.load(f, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r'GLOBAL (\S+)', str(e))
        if found and not zipped and _pickles_cut_short(path):  # a global's name cut by the end
            raise CheckpointError(_legacy_damaged(path, f'its pickle ends in {found[0]}')) from None
        held = f'such as {found[0]}' if found else 'not tensors or plain values'
        raise CheckpointError(
            f'{path}: refused: the {what} holds Python objects ({held}); loading it could run '
            f'code, so it was not loaded: {convert}') from None
    except Exception as e:  # damaged or foreign file: torch raises several types
        if 'TorchScript' in str(e):
            raise CheckpointError(f'{path}: refused: a TorchScript archive (torch.jit.save), whose '
                                  f'code would run on loading: {convert}') from None
        if not zipped:
            raise CheckpointError(_legacy_damaged(path, f'{type(e).__name__}: {e}')) from e
        raise CheckpointError(f'{path}: cannot read the {what} ({type(e).__name__}: {e})') from e


def _legacy_damaged(path, detail: str) -> str:
    """The message for the legacy-format file ``path`` that fails to read (``detail``): such a
    file has no end to look for, so one cut short fails in one of many ways."""
    return (f'{path}: damaged or incomplete: a file of torch.save\'s legacy format (before torch '
            f'1.6) that fails to read ({detail}; a copy or download cut short?): copy or '
            'download it again')


def _pickles_cut_short(path) -> bool:
    """Whether the legacy-format file ``path`` ends inside one of its first four pickles (its
    magic number, protocol, system info, then the object: ``torch.serialization``'s legacy
    layout; a plain ``pickle.dump`` file holds one), read opcode by opcode
    (``pickletools.genops``: nothing is built or run). Cut short inside a global's name, a
    file's refusal named a part of it (``collections.Or``) as a global that would run code."""
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        for _ in range(4):
            if f.tell() >= size:  # it ends between two (a plain pickle.dump file: one)
                return False
            try:
                for _ in pickletools.genops(f):
                    pass
            except Exception:  # noqa: BLE001 (ValueError: the data ran out; others alike)
                return True
    return False


def damaged_record(archive: zipfile.ZipFile):
    """The name of the first record of ``archive`` (a torch.save zip file, open) whose bytes do
    not match their CRC-32, or None. Reads the whole file once. A file saved without checksums
    (``torch.serialization.set_crc32_options(False)``: every CRC 0) is not checked."""
    if not any(info.CRC for info in archive.infolist()):
        return None
    return archive.testzip()


def not_a_torch_file(path, start: bytes) -> str:
    """The error's message for ``path``, whose first bytes ``start`` are not a torch.save file's:
    what it is (empty, text, a .beton) and what to do."""
    found = what_it_is(start)
    suffix = Path(path).suffix.lower()
    advice = ('a .beton holds images, not weights: give a run folder or its final_weights.pt'
              if suffix == '.beton' else
              f'a {suffix[1:]} file holds no weights: give a run folder, a checkpoint or a '
              'weights file' if suffix in ('.yaml', '.yml', '.json', '.tsv', '.jsonl') else
              'a failed download? re-download it')
    return f'{path}: not a PyTorch file ({found}, not as torch.save writes; {advice})'


def what_it_is(start: bytes) -> str:
    """What a file whose first bytes are ``start`` is, in words: 'it is empty, 0 bytes', 'it is
    text: ...' (an HTML error page, a YAML file) or 'it starts with ...'."""
    text = _text(start)
    return ('it is empty, 0 bytes' if not start else f'it is text: {text[:40]!r}' if text
            else f'it starts with {start[:4]!r}')


def _text(start: bytes) -> str:
    """``start``, a file's first bytes, as UTF-8 text (its BOM left out, and a character cut at
    the end), or '' when they are not printable text."""
    try:
        text = start.decode('utf-8')
    except UnicodeDecodeError as e:  # a character cut at the end, or not UTF-8
        text = start[:e.start].decode('utf-8') if e.start >= len(start) - 3 else ''
    text = text.removeprefix('\ufeff')
    return text if all(c.isprintable() or c.isspace() for c in text) else ''
