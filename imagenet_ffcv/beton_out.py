"""The .beton a conversion writes, before any image is read: the checks of its path (a new
file, or replaced only when asked; never a folder, a link, a device or another conversion's file;
a name the folder can hold) and the names of the files written beside it."""
import os
import time
from pathlib import Path

from .classes import class_list_path
from .errors import ImagenetFfcvError, InputError, first_few
from .files import (beside_beton, beton_twins, check_replaceable, live_temporaries,
                    temporary_path, unwritten_for)
from .holdout import holdout_record_path


class BetonWriteError(ImagenetFfcvError, OSError):
    """The .beton cannot be written where it goes (no permission, a full disk, a size limit);
    ``errno`` is the system's, the message names the file or folder and what to do."""


def skipped_report_path(beton_path) -> Path:
    """Where skipped files are listed: ``train_256.beton`` -> ``train_256.skipped.tsv``
    (``files.beside_beton``)."""
    return beside_beton(beton_path, '.skipped.tsv')


def check_out_is_new(out, overwrite: bool) -> None:
    """InputError when the file ``out`` exists and ``overwrite`` is off: a wrong --out (the other
    split's .beton, a class list, the default name of another data set's) was replaced, after
    hours of converting, without a word. (A symbolic link or a folder at ``out`` is refused by
    the writer, overwrite or not.)"""
    if os.path.isfile(out) and not os.path.islink(out) and not overwrite:
        info = os.stat(out)
        when = time.strftime('%Y-%m-%d %H:%M', time.localtime(info.st_mtime))
        raise InputError(f'--out {out} exists ({info.st_size / 1e6:.1f} MB, modified {when}): '
                         'give --overwrite to replace it, or another --out')


def check_out(out: Path) -> None:
    """Before any image is read: InputError when ``out`` is named so long that the converter's
    files (:func:`longest_name`) cannot be created, is a folder, a symbolic link (the new file
    would replace the link, its target keeping the old data), a device, FIFO or socket
    (``files.check_replaceable``; the files beside it too), in a "folder" that is a file, named
    so that the files beside it would be another .beton's (``files.beton_twins``), or is being
    written (:func:`check_not_being_written`); OSError naming the folder of ``out`` (created if
    missing) when no file can be created there (no permission, a read-only or immutable
    folder)."""
    folder = next((p for p in out.parents if p.exists()), Path('.'))
    name, limit = longest_name(out), _name_max(folder)
    if len(os.fsencode(name)) > limit:
        raise InputError(f'{out}: the name is too long: the converter writes {name} beside it, '
                         f'{len(os.fsencode(name))} bytes, and this folder takes names of at most '
                         f'{limit}; give a name at least {len(os.fsencode(name)) - limit} bytes '
                         f'shorter')
    if not folder.is_dir():
        raise InputError(f'{out}: {folder} is a file, not a folder; give another --out')
    if out.is_dir():
        raise InputError(f'{out} is a folder: give the path of the .beton file to write, '
                         f'e.g. {out / "train_256.beton"}')
    if out.is_symlink():
        raise InputError(f'{out} is a symbolic link (to {os.readlink(out)}): give the path of '
                         f'the file itself, {out.resolve()}, or remove the link')
    for path in (out, *written_beside(out)):
        check_replaceable(path)
    if twins := beton_twins(out):
        raise InputError(f'{out}: {first_few(twins)} is there, and the files written beside a '
                         f'.beton ({class_list_path(out).name}, ...) would be both\'s; give '
                         'another --out')
    check_not_being_written(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    probe = temporary_path(out)
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise BetonWriteError(e.errno, f'{out.parent}: cannot write the .beton there '
                                       f'({e.strerror}); choose another --out or make the folder '
                                       f'writable') from None


def longest_name(out: Path) -> str:
    """The longest name of the files the converter writes for ``out``: the temporaries
    (``files.temporary_path``) of the .beton, its list of skipped images and of the files beside
    it (``files.beside_beton``)."""
    return max((temporary_path(path, kind).name for path, kind in (
        (out, 'failures'), *((path, 'partial') for path in written_beside(out)))),
        key=lambda n: len(os.fsencode(n)))


def written_beside(out: Path) -> tuple:
    """The files the converter writes beside the .beton ``out`` (``files.beside_beton``): its
    class list, its list of skipped images, its holdout record."""
    return class_list_path(out), skipped_report_path(out), holdout_record_path(out)


def _name_max(folder) -> int:
    """The longest file name (bytes) ``folder``'s filesystem takes (255 where it cannot say)."""
    try:
        return os.pathconf(folder, 'PC_NAME_MAX')
    except (OSError, ValueError):
        return 255


def check_not_being_written(out) -> None:
    """InputError when another process is writing the .beton ``out``: its temporary is there
    (``files.live_temporaries``: of a running process of this machine, or written within the last
    ``files.OTHER_MACHINE_STALE_S`` by another machine sharing the folder; ``writer.write_beton``
    makes its own as it starts). The later of two conversions to one file replaced the other's
    file unseen, after doubling the work; on another node it deleted the other's temporary."""
    out = Path(out)
    for tmp, pid, host in live_temporaries(out.parent, out.name):
        writing = (f', writing {tmp}' if host is None else
                   f' on {host}, which wrote {tmp} {unwritten_for(tmp) or 0:.0f} s ago')
        raise InputError(f'{out}: another conversion to this file is running (process {pid}'
                         f'{writing}): wait for it to end or choose another --out (if no '
                         f'conversion runs, delete {tmp})')
