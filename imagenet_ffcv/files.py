"""Files written so that a crash never leaves half of one: the one atomic-write helper, and the
one clean-up of the temporaries a killed process leaves behind.

Every file of the tool that must never be seen half-written (a .beton, a checkpoint, the final
weights, a class list, the skipped-files report, params.json) is first written to the hidden
temporary ``.NAME.partial-HOST-PID`` in the same folder, flushed to disk and renamed over
``NAME`` (``os.replace`` is atomic within a filesystem). A crash or ``kill -9`` at any moment leaves
either the previous complete file or the new complete one at ``NAME``, plus possibly a temporary,
which :func:`remove_stale_temporaries` deletes once its process no longer runs (another machine's:
once it has not been written for ``OTHER_MACHINE_STALE_S``).
"""
import contextlib
import glob
import os
import re
import socket
import stat
import time
from pathlib import Path

from .errors import InputError

# .NAME.partial-HOST-PID (atomic writes), .NAME.failures-HOST-PID (the writer's skipped images),
# .NAME.claim-HOST-PID (a job's claim of a run folder's lock: run_lock)
TEMPORARY_KINDS = ('partial', 'failures', 'claim')
# A temporary of another machine (a node sharing the folder, a container with a host name of its
# own), whose process cannot be looked up from here, is taken for a live writer's until it has not
# been written for this long (seconds); a writer's grows by each 8 MiB page its processes fill
# (docs/converting.md: at least every 0.3 s on photos with one process).
OTHER_MACHINE_STALE_S = 600


def temporary_path(path, kind: str = 'partial') -> Path:
    """``DIR/.NAME.<kind>-HOST-PID`` for ``DIR/NAME``: a hidden temporary of this process, HOST
    being :func:`host_name`."""
    path = Path(path)
    return path.with_name(f'.{path.name}.{kind}-{host_name()}-{os.getpid()}')


# What a .beton file's name ends in: ours, and ffcv-imagenet's (train_500_0.50_90.ffcv)
BETON_SUFFIXES = ('.beton', '.ffcv')


def beton_stem(name: str) -> str:
    """A .beton's file ``name`` less its suffix (:data:`BETON_SUFFIXES`, any case), or whole
    when it has none of them: the name the files beside it take (:func:`beside_beton`)."""
    for suffix in BETON_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return name


def beside_beton(beton_path, suffix: str) -> Path:
    """A file written beside a .beton, named by ``suffix`` (``.classes.tsv``, ``.skipped.tsv``,
    ``.holdout.json``) after :func:`beton_stem`: ``train_256.beton`` ->
    ``train_256.classes.tsv``; ``imagenet-1.0-train`` -> ``imagenet-1.0-train.classes.tsv``
    (cut at its last dot, as ``Path.stem`` cuts, it gave ``imagenet-1.0-val`` the same files).
    Names of one stem share them: :func:`beton_twins`."""
    beton_path = Path(beton_path)
    return beton_path.with_name(beton_stem(beton_path.name) + suffix)


def beton_twins(beton_path) -> list:
    """The other files in the folder of ``beton_path`` whose files beside them would be its own
    (of the same :func:`beton_stem`: ``X``, ``X.beton``, ``X.BETON``, ``X.ffcv``)."""
    beton_path = Path(beton_path)
    stem = beton_stem(beton_path.name)
    try:
        entries = list(os.scandir(beton_path.parent))
    except OSError:  # no folder yet
        return []
    return sorted(beton_path.with_name(e.name) for e in entries
                  if e.name != beton_path.name and beton_stem(e.name) == stem and e.is_file())


def check_replaceable(path) -> None:
    """InputError when ``path`` is something a new file must never be renamed over: a device, a
    FIFO or a socket (``--out /dev/null`` for a trial run, as root, replaced the system's
    /dev/null with a .beton). A regular file, a link and a missing path pass."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        raise InputError(f'{path} is not a regular file (a device, a FIFO or a socket): give the '
                         'path of a file to write')


def host_name() -> str:
    """This machine's host name (``socket.gethostname()``; a container has its own unless it
    shares the host's) as temporaries carry it: characters other than letters, digits, ``.``
    and ``-`` made ``_``."""
    return re.sub(r'[^A-Za-z0-9.-]', '_', socket.gethostname()) or '_'


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path for the caller to write ``path`` through (e.g. a library that takes
    a file name); when the block ends without an exception the file is flushed to disk (fsync:
    else a power cut after the rename may leave a short file at ``path`` on some filesystems,
    XFS for one), given the permissions ``open`` gives a new file (a library may create it
    private: safetensors writes mode 0600, which colleagues sharing a run folder cannot read;
    where the filesystem refuses a chmod the file keeps its mode) and renamed over ``path``. The
    temporary is removed in every case. Raises what the block or the filesystem raises (OSError:
    disk full, no permission...); InputError, before the block, when ``path`` is a device, a
    FIFO or a socket (:func:`check_replaceable`)."""
    path = Path(path)
    check_replaceable(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # best effort: some mounts refuse it (CIFS, FUSE)
            os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """This process's umask (from /proc/self/status; else set and set back, which another
    thread creating a file at that instant would see)."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = 'w'):
    """Yield a file open for writing (``mode`` 'w', UTF-8 whatever the locale, or 'wb'), written
    to ``path`` by :func:`atomic_path` when the block ends without an exception, else ``path`` is
    left as it was. Raises what the block or the filesystem raises."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            yield f


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` with :func:`atomic_write`."""
    with atomic_write(path) as f:
        f.write(text)


def check_writable_file(path, suffix: str, given: str, hint: str = '') -> None:
    """InputError, before any work, when ``path`` (``given`` names it in the message: the option
    or key and its value) is not a file named ``*<suffix>`` that can be written: another name
    (``hint`` may say whose), a folder, a device, FIFO or socket (:func:`check_replaceable`), or in
    a folder that is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not str(path).lower().endswith(suffix) or os.path.isdir(path):
        raise InputError(f'{given}: give the path of a {suffix} file to write{hint}')
    if not os.path.isdir(folder):
        raise InputError(f'{given}: the folder {folder} does not exist; create it first')
    if not os.access(folder, os.W_OK):
        raise InputError(f'{given}: the folder {folder} is not writable')
    check_replaceable(path)


def shown_path(path) -> str:
    """``path`` (or a message naming one) as text any file or terminal can hold: the bytes of a
    name that is not UTF-8 as escapes (``caf\\xe9.jpg``)."""
    return os.fsencode(path).decode('utf-8', 'backslashreplace')


def tsv_cell(text) -> str:
    """``text`` (a path, or a message naming one) as a cell of a tab-separated line: as
    :func:`shown_path` shows it, with a tab, newline or carriage return (which a file name may
    hold) as ``\\t``, ``\\n``, ``\\r``, so that each line has its cells."""
    return shown_path(text).translate({9: '\\t', 10: '\\n', 13: '\\r'})


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this machine (signal 0: nothing is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def process_start(pid: int):
    """When the process ``pid`` started, in clock ticks since this machine booted (field 22 of
    Linux's ``/proc/PID/stat``, proc(5)), or None where that cannot be read (no such process in
    this PID namespace, not Linux). Unlike a start time on the wall clock, it does not move when
    the clock is set; with :func:`boot_id` it tells a process from a later one given its PID."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    return int(fields.rpartition(')')[2].split()[19])  # after the command name, which may hold ')'


def boot_id():
    """This machine's boot id (Linux's ``/proc/sys/kernel/random/boot_id``: a random UUID drawn at
    each boot, the same in every container of the machine), or None where it cannot be read."""
    try:
        return Path('/proc/sys/kernel/random/boot_id').read_text().strip() or None
    except OSError:
        return None


def pid_namespace():
    """This process's PID namespace (Linux's ``pid:[<inode>]``; each container has its own), or
    None where it cannot be read. A PID means a process only within its namespace."""
    try:
        return os.readlink('/proc/self/ns/pid')
    except OSError:
        return None


def remove_stale_temporaries(folder, name: str = '*',
                             others_stale_s: float = OTHER_MACHINE_STALE_S,
                             kinds: tuple = TEMPORARY_KINDS) -> list:
    """Delete the temporaries ``.NAME.<kind>-HOST-PID`` (``kinds`` of :data:`TEMPORARY_KINDS`) in
    ``folder`` (of the file ``name``, or of any file for ``'*'``) that no process writes: this
    machine's whose process no longer runs, another machine's (a folder shared by nodes) not
    written for ``others_stale_s`` seconds by the folder's clock (:func:`unwritten_for`; None:
    every one, where no other machine may write: a run folder whose lock this process holds).
    Those of running processes (another writer, another rank, or a later process given a killed
    one's PID: no clock tells them apart in every container) are kept. Returns the removed
    paths."""
    removed = []
    for tmp, pid, host in _others_temporaries(folder, name, kinds):
        if host is None:  # this machine's
            stale = not pid_alive(pid)
        elif others_stale_s is None:
            stale = True
        else:
            age = unwritten_for(tmp)
            stale = age is not None and age > others_stale_s
        if stale:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def live_temporaries(folder, name: str) -> list:
    """``[(path, pid, host)]``: the temporaries of the file ``name`` in ``folder`` that another
    writer of the same file may be writing. On this machine (``host`` None) their process runs
    and did not start over a minute after the temporary was last written
    (:func:`_started_after`: then a later process has a killed writer's PID); of another machine
    (``host`` its name), whose processes cannot be looked up, they were written within
    ``OTHER_MACHINE_STALE_S`` by the folder's clock (:func:`unwritten_for`). Where the clocks
    disagree (a container's own uptime) a writer may be missed; one in another container with
    this host name and the same PID may be taken for it."""
    live = []
    for tmp, pid, host in _others_temporaries(folder, name):
        if host is None:  # this machine's
            if pid_alive(pid) and not _started_after(pid, tmp):
                live.append((tmp, pid, host))
        elif (age := unwritten_for(tmp)) is not None and age <= OTHER_MACHINE_STALE_S:
            live.append((tmp, pid, host))
    return live


def unwritten_for(path):
    """Seconds since ``path`` was last modified, measured by the clock that stamps its folder's
    files (a file server's, on NFS: the modification time of a file this process touches there,
    so that machines whose clocks disagree agree on the age; this machine's clock where the folder
    cannot be written); 0 for a time in the future, None when ``path`` is gone."""
    path = Path(path)
    try:
        modified = path.stat().st_mtime
    except OSError:
        return None
    probe = temporary_path(path.parent / 'clock')  # a killed process's: deleted as a temporary
    try:
        probe.touch()
        now = probe.stat().st_mtime
    except OSError:
        now = time.time()
    finally:
        probe.unlink(missing_ok=True)
    return max(0.0, now - modified)


def _started_after(pid: int, path) -> bool:
    """Whether the process ``pid`` started over a minute after ``path`` was last modified (False
    where either cannot be read; the minute allows for the wall clock being set meanwhile). The
    start is the kernel's (``process_start``, ticks since boot) on the wall clock by way of
    CLOCK_BOOTTIME."""
    start = process_start(pid)
    try:
        modified = Path(path).stat().st_mtime
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, AttributeError):  # AttributeError: no CLOCK_BOOTTIME (not Linux)
        return False
    if start is None:
        return False
    return time.time() - since_boot + start / os.sysconf('SC_CLK_TCK') > modified + 60


def _others_temporaries(folder, name: str, kinds: tuple = TEMPORARY_KINDS):
    """Yield ``(path, pid, host)`` for each temporary (of ``kinds``) in ``folder`` of the file
    ``name`` (``'*'``: any) that names another process than this one: ``host`` None for this
    machine's (and for the ``.NAME.partial-PID`` of earlier versions of this tool), else the other
    machine's name."""
    folder, here = Path(folder), host_name()
    if not folder.is_dir():
        return
    pattern = '*' if name == '*' else glob.escape(name)  # a name may hold [ ] * ?
    for kind in kinds:
        for tmp in folder.glob(f'.{pattern}.{kind}-*'):
            host, _, pid = tmp.name.rpartition(f'.{kind}-')[2].rpartition('-')
            host = None if host in ('', here) else host
            if pid.isdigit() and (host, int(pid)) != (None, os.getpid()):
                yield tmp, int(pid), host
