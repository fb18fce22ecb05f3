"""Writing .beton files: ffcv's writer processes fed the records of the input images
(``records``), the skipped-files report, the disk-space estimate, and the write under a temporary
name renamed into place (``files``)."""
import contextlib
import ctypes
import errno
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.fields import IntField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter

from .beton_out import BetonWriteError, check_out, skipped_report_path
from .commands import progress_bar
from .constants import SHARED_MEMORY
from .cores import usable_cores
from .errors import ImagenetFfcvError, InputError
from .files import (atomic_path, remove_stale_temporaries, shown_path, temporary_path,
                    tsv_cell, write_text_atomic)
from .images import DEFAULT_JPEG_QUALITY, DEFAULT_RESTART_INTERVAL, encode_jpeg, load_image
from .records import IMAGE_FIELD, LABEL_FIELD, MAX_SIDE, ImageFiles, image_field


class UnreadableImagesError(ImagenetFfcvError):
    """Images that could not be decoded or stored, ``failures``, a list of ``(path, reason)``;
    ``every``: they are all of the split's (skipping them would leave nothing to write)."""

    def __init__(self, failures, every: bool = False):
        self.failures = failures
        listed = '\n'.join(f'  {shown_path(p)}: {r}' for p, r in failures[:20])
        more = f'\n  ... and {len(failures) - 20} more' if len(failures) > 20 else ''
        remedy = ('They are all of the split\'s images: check that these are the images you '
                  'meant' if every else 'Remove or replace them and run again (or, without '
                  '--strict, skip and list them)')
        super().__init__(f'{len(failures)} image(s) could not be decoded or stored; nothing was '
                         f'written. {remedy}:\n{listed}{more}')


class InsufficientSpaceError(ImagenetFfcvError, OSError):
    """The target folder has less free space than the estimated size of the .beton."""


class WriterProcessError(ImagenetFfcvError, ChildProcessError):
    """A writer process ended before its work was done (killed, crashed, or an error outside the
    image decoding, such as a full disk); nothing was written."""


class _Writer(DatasetWriter):
    """ffcv's DatasetWriter whose wait for its worker processes ends when one of them dies.

    ffcv 1.0.2 waits for ever for the images of a worker that was killed (the kernel's
    out-of-memory killer), crashed in a decoder or stopped by an exception outside
    :class:`ImageFiles` (a full disk, say): its progress bar stops and the command never ends.
    Here the other workers are stopped and :class:`WriterProcessError` names the one that ended
    and how; the work left in the queue is dropped (its feeder thread would keep the command from
    exiting), and on Linux the workers die with the command (killed, they waited for work). The
    workers are forked, as ffcv's writer expects, whatever Python's default start method; once
    they are, the name of the records' shared table is removed from /dev/shm (they and the
    command keep it mapped), so that killing them all (a job's end) leaves none behind."""

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        # ffcv.writer.DatasetWriter._write_common, the waits watching the workers' exit codes
        self.num_samples = num_samples
        self.prepare()  # makes self.metadata_sm, the records' table the workers fill
        processes, named = [], True
        try:
            fork = multiprocessing.get_context('fork')
            work, allocations, done = fork.Queue(), fork.Queue(), fork.Value(ctypes.c_uint64, 0)
            for todo in [*queue_content, *[None] * self.num_workers]:
                work.put(todo)
            work.cancel_join_thread()  # after an error, the chunks no worker took are dropped
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (work_fn, os.getpid(), work, self.metadata_sm, self.metadata_type,
                    self.fields, allocator, done, allocations, *extra_worker_args)
            processes = [fork.Process(target=_worker, args=args)
                         for _ in range(self.num_workers)]
            stopping = {signal.SIGINT, signal.SIGTERM}  # held until each worker has its own
            held = signal.pthread_sigmask(signal.SIG_BLOCK, stopping)  # handlers (_worker)
            try:
                for p in processes:
                    p.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            self.metadata_sm.unlink()
            named = False
            gathered = _wait_for_workers(processes, allocations, done, num_samples)
            self.finalize([a for allocated in gathered for a in allocated])
        finally:
            for p in processes:
                if p.is_alive():
                    p.terminate()
                if p.pid is not None:
                    p.join()
            self.metadata_sm.close()
            if named:
                self.metadata_sm.unlink()


def _worker(work_fn, command: int, *args) -> None:
    """``work_fn(*args)`` in a writer process that, on Linux, is killed when the command's process
    ``command`` dies (``prctl(PR_SET_PDEATHSIG)``)."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != command:  # it died before that
            os._exit(1)
    # Ctrl-C reaches every process of the terminal's group: the command stops the workers (each
    # would print a traceback); SIGTERM kills a worker, not the command's handler it inherited
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    work_fn(*args)


def _wait_for_workers(processes, allocations, done, total: int) -> list:
    """The allocations each of the writer ``processes`` sends on ``allocations`` as it ends,
    ``done`` (a shared count) shown in a progress bar of ``total`` images. Raises
    WriterProcessError once a process has ended with an error, or with exit code 0 without
    sending its allocations (the others then wait for ever to write their pages after its)."""
    gathered = []
    with progress_bar(total=total) as bar:
        while len(gathered) < len(processes):
            try:
                gathered.append(allocations.get(timeout=0.1))
            except queue.Empty:
                _check_workers(processes, done.value, total)
                ended = sum(p.exitcode == 0 for p in processes)
                with contextlib.suppress(queue.Empty):
                    while len(gathered) < ended:  # sent as they ended, not read yet
                        gathered.append(allocations.get(timeout=1))
                if len(gathered) < ended:
                    raise WriterProcessError(
                        f'{ended - len(gathered)} writer process(es) ended with exit code 0 '
                        f'before their work was done, after {done.value} of {total} images; '
                        'nothing was written')
            bar.update(done.value - bar.n)
    return gathered


def _check_workers(processes, done: int, total: int) -> None:
    """Raises WriterProcessError when one of ``processes`` has ended with an error."""
    for p in processes:
        code = p.exitcode
        if code is None or code == 0:
            continue
        if code < 0:
            how = f'was killed by {signal.Signals(-code).name}'
            if -code == signal.SIGKILL:
                how += (' (often the kernel\'s out-of-memory killer: give it more memory or run '
                        'again with fewer --num-workers)')
            elif -code == signal.SIGBUS:  # the records' table (check_shared_memory) or the file
                how += f' (a mapped file ran out of room: is {SHARED_MEMORY} full?)'
        else:
            how = f'ended with exit code {code} (its error is printed above)'
        raise WriterProcessError(f'a writer process (pid {p.pid}) {how} after {done} of {total} '
                                 f'images; nothing was written')


def read_failures(failures_path, samples: list) -> dict:
    """``{index: (path, reason)}`` from a failures file written by :class:`ImageFiles` for
    ``samples`` (``(path, label)`` pairs)."""
    failures = {}
    if Path(failures_path).exists():
        with open(failures_path, encoding='utf-8') as f:
            for line in f:
                if line.strip():
                    i, reason = line.rstrip('\n').split('\t', 1)
                    failures[int(i)] = (samples[int(i)][0], reason)
    return failures


def estimate_beton_bytes(samples: list, *, max_res: int, write_mode: str = 'jpg',
                         compress_probability: float = 0.5,
                         jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                         restart_interval: int = DEFAULT_RESTART_INTERVAL,
                         sample_size: int = 64) -> int:
    """A generous estimate of the .beton size: up to ``sample_size`` evenly spaced images made
    into records as the writer makes them (raw: ``3 * W * H`` bytes after the resize; JPEG: the
    bytes ``images.encode_jpeg`` gives at ``jpeg_quality`` and ``restart_interval``), their mean
    times the number of samples, plus a quarter for the images not sampled, ffcv's per-sample
    metadata and page padding. A shrunk or re-encoded image can take more bytes per pixel than
    its file did (a q50 photo stored at q90), so the records are made, not guessed from the
    files' sizes (about 10 ms per image)."""
    picks = np.unique(np.linspace(0, len(samples) - 1, min(sample_size, len(samples))).astype(int))
    raw_total = jpg_total = 0.0
    counted = 0
    for i in picks:
        try:
            image = load_image(samples[i][0], max_res)
        except Exception:  # undecodable files are dealt with by the writer
            continue
        if max(image.shape[:2]) > MAX_SIDE:  # and so are images it cannot store
            continue
        raw_total += image.size
        if write_mode != 'raw':
            jpg_total += encode_jpeg(image, quality=jpeg_quality,
                                     restart_interval=restart_interval).size
        counted += 1
    if not counted:
        return 0
    p = {'jpg': 1.0, 'raw': 0.0}.get(write_mode, compress_probability)
    per_image = (p * jpg_total + (1 - p) * raw_total) / counted
    return int(len(samples) * (per_image * 1.25 + 64)) + 8 * 2 ** 20


def check_shared_memory(needed: int) -> None:
    """Raise InsufficientSpaceError, before the images are written, if :data:`SHARED_MEMORY` has
    less than ``needed`` bytes free: ffcv's writer keeps its table of records there (a record of
    24 bytes per image here: 29 MiB for ImageNet's train split), which its processes fill as they
    go; with too little room one of them died by SIGBUS when it was full, late in the conversion.
    Docker gives a container 64 MiB. Nothing is checked where the folder cannot be read (not
    Linux)."""
    try:
        free = shutil.disk_usage(SHARED_MEMORY).free
    except OSError:
        return
    if free < needed:
        raise InsufficientSpaceError(
            f'{SHARED_MEMORY}: {free / 2**20:.1f} MiB free, but the writer processes keep the '
            f'table of the .beton\'s records there, {needed / 2**20:.1f} MiB: give it more room '
            f'(docker run --shm-size=1g; on Kubernetes an emptyDir volume of medium Memory at '
            f'{SHARED_MEMORY})')


def check_free_space(out, needed: int) -> None:
    """Raise InsufficientSpaceError if the folder of ``out`` has less than ``needed`` bytes free."""
    folder = Path(out).parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InsufficientSpaceError(
            f'{folder}: {free / 1e9:.2f} GB free, but the .beton needs about {needed / 1e9:.2f} GB '
            f'(estimated from a sample of the images); free some space or choose another --out')


def _raise_naming(e: OSError, out: Path):
    """Raise ``e`` again, naming ``out`` when it names no file (a full disk, a size limit)."""
    if e.filename is not None or e.errno is None:
        raise e
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    raise BetonWriteError(e.errno, f'writing {out}: {e.strerror}; nothing was written ({out} is '
                                   f'as it was)' + (f': free space in {out.parent}, or write '
                                                    f'elsewhere' if full else '')) from e


def _write_once(samples, tmp, fields, num_workers, chunksize, failures_path, max_res, indices,
                encoding):
    failures_path.unlink(missing_ok=True)
    writer = _Writer(str(tmp), fields, num_workers=max(1, min(num_workers, len(indices))))
    check_shared_memory(len(indices) * writer.metadata_type.itemsize + 2 ** 20)  # + a margin
    dataset = ImageFiles(samples, max_res=max_res, failures_path=failures_path,
                         encoding=encoding, page_size=writer.page_size)
    writer.from_indexed_dataset(dataset, indices=np.asarray(indices), chunksize=chunksize)
    return read_failures(failures_path, samples)


def write_beton(samples: list, out, *, max_res: int, write_mode: str = 'jpg',
                jpeg_quality: int = DEFAULT_JPEG_QUALITY, compress_probability: float = 0.5,
                restart_interval: int = DEFAULT_RESTART_INTERVAL, num_workers: int = 0,
                chunksize: int = 100, skip_unreadable: bool = False,
                check_space: bool = True) -> dict:
    """Write ``(path, label)`` samples to the FFCV file ``out``, shorter side at most ``max_res``.

    Fields: ``image`` (``RGBImageField``, ``write_mode`` 'jpg' | 'raw' | 'proportion', the last
    storing a JPEG with probability ``compress_probability`` and raw pixels otherwise) and
    ``label`` (``IntField``). JPEGs are encoded by ``images.encode_jpeg`` at ``jpeg_quality``
    with a restart marker at most every ``restart_interval`` MCUs (0: none). ``num_workers``
    processes (0: the cores it may use, ``cores.usable_cores``) decode and encode.

    The file is written under a temporary name (``.NAME.partial-HOST-PID``, a dot file) in the
    folder of ``out`` and renamed into place only when complete: a crash or kill leaves no file at
    ``out`` (or the previous complete one). It is made first, so that a conversion of the same
    file started meanwhile, on this machine or another sharing the folder, is refused
    (InputError, ``beton_out.check_not_being_written``).
    Temporaries that killed runs left of the same file are removed by the next run. An OSError
    without a file name (a full disk) is raised again naming ``out``.
    Before writing, that folder's free space against an estimate (``check_space=False`` skips it)
    and the room in /dev/shm (:func:`check_shared_memory`) are checked (InsufficientSpaceError).

    Files that cannot be decoded: with ``skip_unreadable=False`` raise UnreadableImagesError,
    writing nothing; with ``skip_unreadable=True`` they are left out (the other images keep their
    labels), listed as ``path<TAB>reason`` in ``beton_out.skipped_report_path(out)``, and counted in
    ``'skipped'``. Only then is the file written a second time, without them.
    Returns ``{'images', 'skipped', 'skipped_files': [(path, reason)], 'skipped_report', 'bytes',
    'seconds', 'img_per_s'}``.
    """
    if write_mode not in ('jpg', 'raw', 'proportion'):
        raise InputError(f"write_mode={write_mode!r}: expected 'jpg', 'raw' or 'proportion'")
    if not samples:
        raise InputError('no images to write')
    if restart_interval < 0:
        raise InputError(f'restart_interval={restart_interval}: must be >= 0 (0: no markers)')
    out = Path(out)
    check_out(out)
    remove_stale_temporaries(out.parent, out.name)  # not others': another node may write them
    num_workers = num_workers or usable_cores()
    encoding = dict(write_mode=write_mode, jpeg_quality=jpeg_quality,
                    compress_probability=compress_probability, restart_interval=restart_interval)
    failures_path = temporary_path(out, 'failures')
    report = skipped_report_path(out)
    fields = {IMAGE_FIELD: image_field(), LABEL_FIELD: IntField()}
    skipped = {}
    indices = list(range(len(samples)))
    try:
        with atomic_path(out) as tmp:
            tmp.touch()  # the name is claimed: a conversion started now is refused (check_out)
            if check_space:  # + one partly filled 8 MiB ffcv page per worker
                check_free_space(out, estimate_beton_bytes(samples, max_res=max_res, **encoding)
                                 + num_workers * 8 * 2 ** 20)
            start = time.perf_counter()
            for _ in range(3):  # a file may turn unreadable between passes: retry a few times
                failures = _write_once(samples, tmp, fields, num_workers, chunksize,
                                       failures_path, max_res, indices, encoding)
                if not failures:
                    break
                skipped.update(failures)
                indices = [i for i in indices if i not in skipped]
                if not skip_unreadable or not indices:
                    raise UnreadableImagesError(sorted(skipped.values()), every=not indices)
            else:
                raise UnreadableImagesError(sorted(skipped.values()))
        skipped_files = [skipped[i] for i in sorted(skipped)]  # once the .beton is in place:
        if skipped:  # a failed write keeps the previous .beton and its report
            write_text_atomic(report, ''.join(  # the path in the reason as in column 1
                f'{tsv_cell(p)}\t{tsv_cell(r.replace(repr(str(p))[1:-1], str(p)))}\n'
                for p, r in skipped_files))
        else:
            report.unlink(missing_ok=True)  # a stale report of an earlier run would mislead
    except OSError as e:
        _raise_naming(e, out)
    finally:
        failures_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {'images': len(indices), 'skipped': len(skipped), 'skipped_files': skipped_files,
            'skipped_report': str(report) if skipped else None, 'bytes': out.stat().st_size,
            'seconds': seconds, 'img_per_s': len(indices) / seconds}
