"""A run folder's lock, ``RUN_DIR/lock``: which job writes the run, so that a second job on the
same run (the same job submitted twice, an explicit ``--resume`` of a running run) stops before it
touches anything, and the lock a killed job left is taken over by the job that continues the run.

The lock holds :func:`lock_identity` (JSON). A job that holds it refreshes the file's time every
``heartbeat_s`` seconds while it runs (:class:`Heartbeat`). A lock is taken over, with a message,
when its job has ended as seen from here (:func:`lock_ended`: a process gone on this host, an
earlier start of a SLURM job, a SLURM job that has ended), or, when that cannot be seen (another
host outside SLURM, another container), once its time has not been refreshed for
``STALE_BEATS`` periods (:func:`heartbeat_stopped`; the wait is measured by the clock of the
folder's filesystem, a shared one's server, so the machines' clocks need not agree).
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from .errors import ImagenetFfcvError
from .files import boot_id, pid_alive, pid_namespace, process_start, temporary_path

HEARTBEAT_S = 30  # a job refreshes its lock's time this often (s)
STALE_BEATS = 5  # a lock not refreshed for this many of its periods has no job left


class RunLockedError(ImagenetFfcvError):
    """Another live job writes the run folder; the message names it (PID and host)."""


def read_lock(lock_file):
    """What ``lock_file`` holds of the job that holds it (:func:`lock_identity`), None when there
    is none, {} when it is empty (what a power cut can leave of one); a lock this tool did not
    write reads as ``{'pid': '?', 'host': '?'}`` (one that is not UTF-8 text too: it raised
    UnicodeDecodeError wherever a lock is read)."""
    try:
        data = Path(lock_file).read_bytes()
    except FileNotFoundError:
        return None
    if not data.strip():
        return {}
    try:
        holder = json.loads(data.decode('utf-8'))
    except ValueError:  # (UnicodeDecodeError is one)
        holder = None
    return holder if isinstance(holder, dict) and holder else {'pid': '?', 'host': '?'}


def acquire(lock_file, run_path) -> 'Heartbeat':
    """Lock the run in ``run_path`` for this process: ``lock_file`` holds :func:`lock_identity`,
    made complete (and on disk) then linked into place (``os.link`` fails when the name exists, so
    of two jobs one only gets the lock). The lock of a job that has ended (:func:`lock_ended`),
    or, where that cannot be seen, whose time has not been refreshed (:func:`heartbeat_stopped`,
    which waits up to ``STALE_BEATS`` periods for a refresh), is taken over, with a message.
    Returns the started :class:`Heartbeat`. Raises RunLockedError naming the holder when it runs:
    alive on this host, its lock refreshed, or not known to have ended (a lock without
    ``heartbeat_s``: delete it if that job has ended). The lock is read again just before it is
    taken over, so that a job that took it over meanwhile keeps it; two jobs taking it over within
    that instant may still both succeed: the job that lost it stops at its next write
    (:func:`check_held`)."""
    lock_file, me = Path(lock_file), lock_identity()
    # its own name: two containers on shared storage may run as the same PID
    tmp = temporary_path(lock_file.with_name(f'{lock_file.name}.{uuid.uuid4().hex[:12]}'),
                         'claim')
    try:
        while True:
            with open(tmp, 'w') as f:  # each try: another job's clean-up may have removed it
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, lock_file)
            except FileNotFoundError:  # the claim deleted by another job's clean-up: made again
                continue
            except FileExistsError:
                holder = read_lock(lock_file)
            else:
                heartbeat = Heartbeat(lock_file, me)
                heartbeat.start()
                return heartbeat
            if holder is not None and holder != me:  # another job's (None: gone; own: made again)
                ended = lock_ended(holder, me) or (
                    None if known_alive(holder, me) else heartbeat_stopped(
                        lock_file, holder, probe=tmp,
                        say=lambda text: print(f'=> {run_path}: {text}', flush=True)))
                if not ended:
                    raise RunLockedError(
                        f'{run_path}: another job writes this run ({_who(holder)}, {lock_file}); '
                        'give this job its own run name, or wait for that one to end' + (
                            '' if holder.get('heartbeat_s') else ' (if it has ended on another '
                            'host or in another container, delete the lock file)'))
                if read_lock(lock_file) != holder:  # another job took it over meanwhile
                    continue
                print(f'=> {run_path}: taking over the lock of {_who(holder)}: {ended}')
            lock_file.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def _who(holder: dict) -> str:
    """'PID <pid> on <host>' of the job a lock names."""
    return f'PID {holder.get("pid")} on {holder.get("host")}'


def check_held(lock_file, heartbeat: 'Heartbeat', run_path) -> None:
    """RunLockedError, naming the job that holds ``lock_file`` now, when the lock this process
    took (``heartbeat``'s; None: it took none) is now another job's: another job took it over
    (two jobs taking over a dead job's lock at the same instant; the lock deleted by hand while
    this job ran and taken by another). A lock gone, and one that cannot be read (a network
    filesystem's error), stop nothing. Called before each write of the run, so that one job
    only writes it."""
    if heartbeat is None:
        return
    try:
        holder = read_lock(lock_file)
    except OSError:  # a network filesystem's hiccup: no other job's lock seen
        return
    if holder is not None and holder != heartbeat.me:
        raise RunLockedError(
            f'{run_path}: this job\'s lock ({lock_file}) is now held by {_who(holder)}; this job '
            'stops without writing the run again, so that one job only writes it. '
            'Resume it (--resume auto) once the other job has ended')


def release(lock_file, heartbeat: 'Heartbeat' = None) -> None:
    """Stop ``heartbeat`` and remove ``lock_file`` if this process holds it. A lock that cannot
    be read or removed (a folder gone read-only, a network filesystem's error) is left with a
    warning: the job that resumes the run takes it over (:func:`acquire`). Raises nothing, so
    that the error that ends a run is the one told (a read-only run folder was told as its
    lock's)."""
    if heartbeat is not None:
        heartbeat.stop()
    try:
        if read_lock(lock_file) == (heartbeat.me if heartbeat is not None else lock_identity()):
            Path(lock_file).unlink(missing_ok=True)
    except OSError as e:
        print(f'=> warning: {lock_file}: cannot remove this job\'s lock ({e.strerror}); the job '
              'that resumes the run takes it over', file=sys.stderr, flush=True)


class Heartbeat(threading.Thread):
    """Refreshes the time of ``lock_file`` every ``me['heartbeat_s']`` seconds while it holds
    ``me`` (this process's lock; another job's, once it took the lock over, is left as it is,
    with a warning: the job stops at its next write, :func:`check_held`), until :meth:`stop` or
    the file is gone. A daemon thread: it ends with the process, so a killed job's lock goes
    stale."""

    def __init__(self, lock_file, me: dict):
        super().__init__(name='run-lock-heartbeat', daemon=True)
        self.lock_file, self.me = Path(lock_file), me
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.me['heartbeat_s']):
            try:
                holder = read_lock(self.lock_file)
                if holder != self.me:
                    print(f'=> warning: {self.lock_file.parent}: ' + (
                        'this job\'s lock was removed: another job may take the run over' if
                        holder is None else f'another job ({_who(holder)}) has taken over '
                        f'this job\'s lock; this job stops at its next write'), flush=True)
                    return
                os.utime(self.lock_file)
            except FileNotFoundError:  # removed between the read and the refresh
                return
            except OSError:  # a network filesystem's hiccup: the next period tries again
                continue

    def stop(self):
        self._stop_event.set()


def _mtime(path) -> float:
    """The time of ``path`` as its filesystem has it now (opening a file on NFS revalidates its
    cached attributes: close-to-open consistency)."""
    with open(path, 'rb') as f:
        return os.fstat(f.fileno()).st_mtime


def heartbeat_stopped(lock_file, holder: dict, *, probe, say=print):
    """Why the job holding ``lock_file`` (``holder``, :func:`read_lock`) has ended, judged by the
    lock's time, or None when it runs (its time was refreshed) or cannot be judged (a lock
    without ``heartbeat_s``). Ended: not refreshed for ``STALE_BEATS`` periods of its job's
    ``heartbeat_s``, measured against the time of ``probe`` (a file of this process's in the same
    folder, touched: the filesystem's clock, a shared one's server on NFS), and not while this
    process watched it for 2 periods of its own clock (filesystems that take the clients' clocks
    could be set apart by more than ``STALE_BEATS`` periods). Waits for that as long as needed
    (``say`` tells what it waits for), or until the time changes."""
    period = holder.get('heartbeat_s')
    if not isinstance(period, (int, float)) or period <= 0:
        return None
    stale, watched, told = STALE_BEATS * period, time.monotonic(), False
    try:
        first = _mtime(lock_file)
    except FileNotFoundError:
        return 'its lock was removed'
    while True:
        Path(probe).touch()  # (made again if another job's clean-up removed it)
        age, watched_s = _mtime(probe) - first, time.monotonic() - watched
        if age >= stale and watched_s >= 2 * period:
            return (f'its lock was last refreshed {age:.0f} s ago (a running job refreshes it '
                    f'every {period:g} s)')
        if not told:
            say(f'the lock of {_who(holder)} cannot be checked '
                f'from here; waiting up to {max(stale - age, 2 * period - watched_s):.0f} s for '
                f'its job to refresh it (it runs) or not (it has ended)')
            told = True
        time.sleep(period / 4)
        try:
            if _mtime(lock_file) != first:
                return None
        except FileNotFoundError:
            return 'its lock was removed'


def known_alive(holder: dict, me: dict) -> bool:
    """Whether the process holding a lock (``holder``) is seen running from the process ``me``:
    on this host, of this boot, in this PID namespace, and not ended (:func:`process_ended`)."""
    return (holder.get('host') == me['host'] and isinstance(holder.get('pid'), int)
            and not _differ(holder, me, 'boot')
            and not _differ(holder, me, 'pid_ns') and process_ended(holder, me) is None)


def _differ(holder: dict, me: dict, key: str) -> bool:
    """Whether ``holder`` and ``me`` both know ``key`` (a boot id, a PID namespace) and differ."""
    return bool(holder.get(key) and me[key] and holder[key] != me[key])


def lock_identity(environ=None) -> dict:
    """What a run's lock holds of this process: ``pid``, ``host``, ``heartbeat_s`` (how often it
    refreshes the lock's time, :data:`HEARTBEAT_S`), ``boot`` (the machine's boot id,
    :func:`boot_id`), ``pid_ns`` (its PID namespace, :func:`pid_namespace`), ``started`` (its start
    in clock ticks since boot, :func:`process_start`), ``job`` (in a SLURM job,
    ``slurm:<SLURM_CLUSTER_NAME>:<SLURM_JOB_ID>``, which a requeued job keeps; else None),
    ``start`` (SLURM_RESTART_COUNT: 0, then 1, 2, ... for each requeue), ``step`` (SLURM_STEP_ID:
    the ``srun`` of the job that started it, else None) and ``rdzv`` (under torchrun, its
    ``--rdzv-id``, TORCHELASTIC_RUN_ID, which its restarts keep; None without it or at torchrun's
    default 'none')."""
    environ = os.environ if environ is None else environ
    job = (f'slurm:{environ.get("SLURM_CLUSTER_NAME", "")}:{environ["SLURM_JOB_ID"]}'
           if environ.get('SLURM_JOB_ID') else None)
    return {'pid': os.getpid(), 'host': socket.gethostname(), 'heartbeat_s': HEARTBEAT_S,
            'boot': boot_id(),
            'pid_ns': pid_namespace(), 'started': process_start(os.getpid()), 'job': job,
            'start': int(environ.get('SLURM_RESTART_COUNT') or 0),
            'step': environ.get('SLURM_STEP_ID') or None,
            'rdzv': rdzv_id(environ)}


def rdzv_id(environ) -> str:
    """torchrun's ``--rdzv-id`` (TORCHELASTIC_RUN_ID in ``environ``), which its restarts keep;
    None without torchrun or at its default 'none' (a static rendezvous)."""
    rdzv = environ.get('TORCHELASTIC_RUN_ID')
    return rdzv if rdzv not in (None, '', 'none') else None


def lock_ended(holder: dict, me: dict):
    """Why the job that holds a lock (``holder``, :func:`read_lock`) has ended, as seen by
    the process ``me`` (:func:`lock_identity`), or None when it may still run. Ended: an empty lock
    (a power cut as it was written: locks are linked into place complete); on this host
    (:func:`process_ended`), a process that no longer runs; on
    another, an earlier start of this SLURM job (the same job, requeued fewer times: SLURM requeues
    a job only once all of its processes have ended), an earlier start of torchrun's workers in the
    same ``srun`` step of this start of the SLURM job (the same ``--rdzv-id``: a run's lock is taken
    by rank 0 only, and torchrun stops every worker of every node before it starts them again, so
    another rank 0 of this rendezvous has ended), or a job of this SLURM cluster that ``squeue``
    says has ended (a job of a chain, ``sbatch --dependency``, killed past its time limit). Not told
    apart, and so refused: a second training in one SLURM job (another step, or no or another
    ``--rdzv-id``), and a torchrun restart outside SLURM whose rank 0 moved to another node (the
    same ``--rdzv-id`` could be a second job started by mistake, and there is no job id to tell them
    apart)."""
    if not holder:
        return 'its lock file is empty (a power cut as it was written)'
    job, start = holder.get('job'), holder.get('start')
    if holder.get('host') == me['host']:
        return process_ended(holder, me)
    if me['job'] and isinstance(job, str):  # both in SLURM: slurm:<cluster>:<job id>
        if job == me['job'] and isinstance(start, int) and start < me['start']:
            return (f'an earlier start of this job ({job}, requeued {start} time(s), now '
                    f'{me["start"]})')
        if job == me['job'] and start == me['start'] and me['step'] and me['rdzv'] and \
                (holder.get('step'), holder.get('rdzv')) == (me['step'], me['rdzv']):
            return (f'an earlier start of torchrun\'s workers in this step of the job ({job}, step '
                    f'{me["step"]}, --rdzv-id {me["rdzv"]}): torchrun stops them all before it '
                    f'starts them again')
        cluster, _, job_id = job.rpartition(':')
        if cluster == me['job'].rpartition(':')[0] and slurm_job_ended(job_id):
            return f'SLURM job {job_id} has ended'
    return None


def process_ended(holder: dict, me: dict):
    """Why the process that holds a lock on this host (``holder``, :func:`read_lock`) has
    ended, as seen by the process ``me`` (:func:`lock_identity`), or None when it may still run.
    Ended: the machine has booted since (another boot id: one for the whole machine, its
    containers included; a lock with ``heartbeat_s`` is judged by it instead, as another machine
    of this host name would read the same); in its PID namespace (``pid_ns``), its PID is this
    process's, runs no process, or runs another one, started at another time (a PID is reused,
    after a reboot often at once). From another PID namespace (a container of this host name: a
    restarted one, as Kubernetes and ``docker restart`` give, or another one running, with the
    host's network) its PID means nothing here: None, and :func:`heartbeat_stopped` judges it; a
    lock without ``heartbeat_s`` (an older version's) is then checked by its PID alone, as if it
    were this namespace's. A lock without ``pid_ns``, ``boot`` and ``started`` (not Linux) is
    checked by its PID alone."""
    pid = holder.get('pid')
    if not isinstance(pid, int):
        return None
    if _differ(holder, me, 'boot'):  # or a machine of the same name
        return None if holder.get('heartbeat_s') else 'this machine has restarted since'
    same_ns = not _differ(holder, me, 'pid_ns')
    if not same_ns and holder.get('heartbeat_s'):
        return None
    if pid == me['pid']:
        return f'PID {pid} is now this process'
    if not pid_alive(pid):
        return 'it no longer runs'
    started = holder.get('started')
    if same_ns and isinstance(started, int) and process_start(pid) not in (None, started):
        return f'PID {pid} is now another process'
    return None


# squeue's states of a job that has ended (it forgets such jobs a few minutes later).
SLURM_ENDED = {'BOOT_FAIL', 'CANCELLED', 'COMPLETED', 'DEADLINE', 'FAILED', 'NODE_FAIL',
               'OUT_OF_MEMORY', 'PREEMPTED', 'TIMEOUT'}


def slurm_job_ended(job_id: str) -> bool:
    """Whether SLURM says the job ``job_id`` has ended: ``squeue -h -t all -j ID -o %T`` gives an
    ended state (without ``-t all`` squeue lists running and pending jobs only), or refuses the id
    of a job it has forgotten (MinJobAge after its end). False when it cannot tell (no squeue,
    no answer within 30 s, another error, no state)."""
    try:
        proc = subprocess.run(['squeue', '-h', '-t', 'all', '-j', job_id, '-o', '%T'],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    if proc.returncode != 0:
        return 'invalid job id' in proc.stderr.lower()
    states = set(proc.stdout.split())
    return bool(states) and states <= SLURM_ENDED
