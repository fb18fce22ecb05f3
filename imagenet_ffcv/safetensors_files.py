"""Reading .safetensors weights files (final_weights.safetensors, and other tools'): no pickle, so
no code can run; a file cut short or that is no safetensors file is told apart, naming it."""
import json
from pathlib import Path

import safetensors
import safetensors.torch

from .errors import CheckpointError
from .torch_files import TORCH_FILE_STARTS, what_it_is


def read_safetensors(path) -> tuple:
    """``(state_dict, metadata)`` of the .safetensors file ``path`` (``metadata``: its header's,
    {} when none), its tensors on the CPU. Raises CheckpointError naming the file when it cannot
    be read: cut short (:func:`cut_short`), not a safetensors file (what it is:
    ``torch_files.what_it_is``) or damaged."""
    try:
        state = safetensors.torch.load_file(str(path), device='cpu')
        with safetensors.safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
    except Exception as e:
        with open(path, 'rb') as f:
            start = f.read(64)
        raise CheckpointError(f'{path}: ' + (
            f'incomplete: its header names more bytes than the file holds ({path.stat().st_size:,}'
            f' bytes; a copy or download cut short?): copy or download it again'
            if cut_short(path) else f'cannot read the weights ({type(e).__name__}: {e})'
            if start[8:9] == b'{' else f'not a safetensors file ({what_it_is(start)}, not a '
            'safetensors header; a failed download? re-download it)')) from e
    return state, metadata


def cut_short(path) -> bool:
    """Whether the safetensors file ``path`` ends before the bytes its header names: its header
    (an 8-byte little-endian length, then JSON) or the data after it, up to the largest end of a
    tensor's ``data_offsets``."""
    size = path.stat().st_size
    with open(path, 'rb') as f:
        length = int.from_bytes(f.read(8), 'little')
        if f.read(1) != b'{':
            return False  # no safetensors header at all
        if 8 + length > size:
            return True
        try:
            header = json.loads(b'{' + f.read(length - 1))
            ends = [v['data_offsets'][1] for k, v in header.items() if k != '__metadata__']
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return False
    return 8 + length + max(ends, default=0) > size


def is_safetensors(path) -> bool:
    """Whether to read the file ``path`` as safetensors: by its first bytes (an 8-byte
    little-endian header length, then the JSON header's '{'; torch.save's files start as
    ``torch_files.TORCH_FILE_STARTS``), whatever its name; one that starts as neither (damaged,
    empty), by its name."""
    try:
        with open(path, 'rb') as f:
            start = f.read(9)
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read the weights file ({e})') from None
    if len(start) == 9 and start[8:9] == b'{' and int.from_bytes(start[:8], 'little') > 1:
        return True
    return Path(path).suffix == '.safetensors' and not start.startswith(TORCH_FILE_STARTS)
