"""torchrun's environment, read once into a record (as timm's ``utils/distributed.py`` does).

Launch lines::

    imagenet-ffcv-train --config ...                                        # one process
    torchrun --nproc_per_node=8 -m imagenet_ffcv.train --config ...         # one node, 8 GPUs
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 \\
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m imagenet_ffcv.train ... # node 0 of 2
"""
import os
import socket
import time
from datetime import timedelta
from dataclasses import dataclass

import numba
import torch
import torch.distributed as dist

from . import cores
from .errors import ImagenetFfcvError, first_few
from .files import boot_id, process_start
from .run_lock import rdzv_id


class LaunchError(ImagenetFfcvError, ValueError):
    """The job was started in a way this process cannot take part in (a launcher's variable that
    is not a number, several srun tasks without torchrun)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    rank: global rank, 0..world_size-1. local_rank: rank on this node (picks the GPU; the global rank
    is never taken for a GPU index). device: ``cuda:<local_rank>`` when CUDA is available, else cpu.
    local_world_size: the processes of the job on this node.
    """
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1

    @property
    def is_primary(self) -> bool:
        """True on the one process (rank 0) that writes logs, weights and tables."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_env(environ=None) -> DistInfo:
    """Read RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as set by torchrun; absent means one
    process.

    Raises LaunchError (a ValueError) naming the variable when one is set but not a non-negative
    integer, when LOCAL_RANK is not below the node's visible GPUs (on a machine with CUDA),
    when srun started several tasks of the command without torchrun
    (SLURM_STEP_NUM_TASKS > 1 and no RANK): each task would train a whole run of its own, all
    writing the same run folder, and when WORLD_SIZE > 1 is set without RANK (a variable left in
    the shell: the process would wait for ranks that never come).
    """
    environ = os.environ if environ is None else environ

    def read(name, default):
        value = environ.get(name, default)
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise LaunchError(f'environment variable {name}={value!r} must be an integer') from None
        if number < 0:
            raise LaunchError(f'environment variable {name}={value!r} must be >= 0')
        return number

    tasks = read('SLURM_STEP_NUM_TASKS', 1)
    if 'RANK' not in environ and tasks > 1:
        raise LaunchError(
            f'srun started {tasks} tasks of this command (SLURM_STEP_NUM_TASKS={tasks}) without '
            f'torchrun: each would train a whole run of its own into the same run folder. Run one '
            f"srun task per node that starts torchrun, as the README's SLURM lines do, or srun "
            f'--ntasks=1 for one process')

    rank, world_size, local_rank = read('RANK', 0), read('WORLD_SIZE', 1), read('LOCAL_RANK', 0)
    if world_size > 1 and 'RANK' not in environ:
        raise LaunchError(f'WORLD_SIZE={world_size} is set but RANK is not: torchrun sets both '
                          f'(and LOCAL_RANK) in each process it starts. Unset WORLD_SIZE to train '
                          f'in one process, or start the job with torchrun')
    if rank >= world_size:
        raise LaunchError(f'RANK={rank} is not below WORLD_SIZE={world_size}')
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and local_rank >= gpus:  # CUDA's own error: 'invalid device ordinal'
        raise LaunchError(f'LOCAL_RANK={local_rank}, but this node has {gpus} GPU(s) visible: '
                          f'start one process per GPU (torchrun --nproc_per_node=gpu)')
    device = torch.device(f'cuda:{local_rank}' if gpus else 'cpu')
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                    local_world_size=max(1, read('LOCAL_WORLD_SIZE', 1)))


def launch_identity(environ=None, agree_on: torch.device = None):
    """What tells the workers of one torchrun job from another job's, the same across torchrun's
    restarts of them (``--max-restarts``): ``{'restart': TORCHELASTIC_RESTART_COUNT (0 at the
    first start), 'rdzv': its --rdzv-id (None for 'none': a static rendezvous), 'agent':
    '<host>:<PID>:<start>' of torchrun's agent, this process's parent}``; None without
    torchrun. ``agree_on`` (the device of a joined process group; a collective, on every rank):
    ``restart`` is the largest of the ranks' (a node restarted for another node's failure keeps
    its count: :func:`restart_store`)."""
    environ = os.environ if environ is None else environ
    if 'TORCHELASTIC_RUN_ID' not in environ:
        return None
    agent = os.getppid()
    restart = int(environ.get('TORCHELASTIC_RESTART_COUNT') or 0)
    if agree_on is not None and _joined():
        restart = all_reduce_max(torch.tensor([restart], device=agree_on))[0]
    return {'restart': restart, 'rdzv': rdzv_id(environ),
            'agent': f'{socket.gethostname()}:{agent}:{process_start(agent)}'}


def loader_threads(num_workers, info: DistInfo) -> int:
    """The loader threads of this process for ``data.num_workers``: an int as it is, but at most
    the threads numba may start on this machine (``NUMBA_NUM_THREADS``, its CPU count; ffcv
    fails beyond it, so a config written for a bigger machine still runs); 'auto': the cores of
    this process's affinity (``cores.affinity_cores``: at most SLURM's --cpus-per-task) divided
    by the processes that share them, and at most a cgroup CPU quota's whole CPUs
    (``cores.cpu_quota``: a container's --cpus) divided by the processes under it
    (:func:`core_sharers`), less one for the training loop itself, and at least 1. Call it on
    every rank: 'auto' takes a collective."""
    if num_workers != 'auto':
        return max(1, min(int(num_workers), numba.config.NUMBA_NUM_THREADS))
    quota = cores.cpu_quota()
    on_cores, under_quota = core_sharers(info, quota)
    share = cores.affinity_cores() // on_cores
    if quota:
        share = min(share, quota.cores // under_quota)
    return max(1, min(share - 1, numba.config.NUMBA_NUM_THREADS))


def core_sharers(info: DistInfo, quota=None) -> tuple:
    """``(on_cores, under_quota)``: the processes of the job that may run on this process's
    cores, itself included (those of this machine whose ``os.sched_getaffinity`` overlaps this
    one's), and those under its CPU ``quota`` (``cores.Quota``: those of this machine whose
    quota is set by the same cgroup), gathered from every rank (``all_gather_object``; every
    rank must call it). A node's processes share one set of cores unless each is bound to cores
    of its own (torchrun's ``--numa-binding``, a numactl wrapper), and one quota when they run in
    one container, not when each runs in its own (a pod per GPU). Without a process group (one
    process, or before ``setup``): ``info.local_world_size`` for both."""
    if not (info.distributed and dist.is_initialized()):
        return info.local_world_size, info.local_world_size
    # the machine: its boot id (shared by its containers, which share its cores), else host name
    mine = (boot_id() or socket.gethostname(), sorted(cores.affinity()), quota and quota.cgroup)
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    here = [(on, cgroup) for machine, on, cgroup in everyone if machine == mine[0]]
    return (sum(not set(on).isdisjoint(mine[1]) for on, _ in here),
            sum(cgroup == mine[2] for _, cgroup in here))


def setup(info: DistInfo, timeout_s: float = 300) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when there is more than one process.

    MASTER_ADDR/MASTER_PORT come from torchrun's rendezvous (``env://``). timeout_s: how long a
    collective waits for the other ranks before raising on this rank, so that a rank that died or
    hangs makes the others fail within that bound instead of waiting for ever (gloo also fails at
    once when a peer's connection closes). Rank 0 says that it waits, and so does every rank
    started without torchrun (RANK and WORLD_SIZE left in the shell: it would wait silently).
    Raises LaunchError when the ranks do not meet within ``timeout_s``.
    """
    if info.device.type == 'cuda':
        torch.cuda.set_device(info.device)
    if info.distributed and not dist.is_initialized():
        backend = 'nccl' if info.device.type == 'cuda' else 'gloo'
        address = '%s:%d' % master_address(os.environ)
        torchrun = launch_identity() is not None
        hint = '' if torchrun else (
            f'; not started by torchrun: RANK={info.rank} and WORLD_SIZE={info.world_size} come '
            'from the environment (unset them to train in one process)')
        if info.is_primary or not torchrun:  # the store waits silently for every rank
            print(f'=> rank {info.rank}: process group of {info.world_size} ranks ({backend}) at '
                  f'{address}: waiting up to {timeout_s:.0f} s for every rank to join{hint}',
                  flush=True)
        kwargs = {'device_id': info.device} if backend == 'nccl' else {}
        timeout = timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(backend=backend, store=restart_store(info, timeout),
                                    rank=info.rank, world_size=info.world_size, timeout=timeout,
                                    **kwargs)
        except (dist.DistStoreError, dist.DistNetworkError, TimeoutError) as e:
            raise LaunchError(
                f'rank {info.rank}: the process group of {info.world_size} ranks at {address} did '
                f'not form within {timeout_s:.0f} s ({type(e).__name__}: '
                f'{str(e).strip().splitlines()[0] if str(e).strip() else "no answer"}){hint}'
            ) from e


# The key, in torchrun's own store, under which rank 0 publishes the address of the store it hosts.
STORE_ADDRESS_KEY = '/imagenet_ffcv/store_address'


def restart_store(info: DistInfo, timeout: timedelta, environ=None):
    """The key-value store the ranks meet in: a new one each time the job's workers start, hosted
    by rank 0.

    Without torchrun's own store, rank 0 hosts it at MASTER_ADDR:MASTER_PORT. With it
    (TORCHELASTIC_USE_AGENT_STORE, torchrun's c10d and static rendezvous), torchrun serves a store
    at that address that outlives its workers: after a restart (``--max-restarts``) the new workers
    would read the addresses their predecessors published there and fail ("Gloo connectFullMesh
    failed ... Connection refused"; NCCL reads an old unique id). A key prefix of
    TORCHELASTIC_RESTART_COUNT does not keep attempts apart across nodes: each node's torchrun
    counts only the failures of its own workers, so a node restarted for another node's failure
    keeps its count (pytorch/pytorch#108158, #135712). So rank 0 hosts a new store on a free port
    and publishes its address in torchrun's store; the other ranks wait until the published address
    answers. An address left by the workers before a restart does not answer: torchrun stops every
    worker of every node before the new workers start. ``tests/test_faults.py`` restarts a killed
    worker on one node and on two.

    Raises torch.distributed.DistStoreError when rank 0 publishes no address within ``timeout``,
    TimeoutError when the address it published does not answer within it.
    """
    environ = os.environ if environ is None else environ
    host, port = master_address(environ)
    if environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        deadline = time.monotonic() + timeout.total_seconds()
        while info.rank != 0 and not _answers(host, port):  # TCPStore logs each failed try
            if time.monotonic() > deadline:
                raise TimeoutError(f'rank 0\'s store at {host}:{port} did not answer: did rank 0 '
                                   f'start?')
            time.sleep(0.2)
        return dist.TCPStore(host, port, info.world_size, is_master=info.rank == 0,
                             timeout=timeout)
    torchrun_store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if info.rank == 0:  # on the node of torchrun's store (the rendezvous's rank 0)
        store = dist.TCPStore(host, 0, info.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        torchrun_store.set(STORE_ADDRESS_KEY, f'{host}:{store.port}')
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        address = torchrun_store.get(STORE_ADDRESS_KEY).decode()
        store_host, store_port = address.rsplit(':', 1)
        try:  # an address left before a restart does not answer: read the store again
            if _answers(store_host, int(store_port)):
                store = dist.TCPStore(store_host, int(store_port), info.world_size,
                                      is_master=False, timeout=timedelta(seconds=10))
                store.set_timeout(timeout)  # (10 s above: not another server's port)
                return store
        except dist.DistError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f'the store rank 0 published at {address} did not answer: did '
                               f'rank 0 fail to start?')
        time.sleep(0.2)


def _answers(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` opens (a plain connection, tried before a
    TCPStore client, which logs every failed try with a stack trace)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def _joined() -> bool:
    """Whether this process is in a process group (:func:`setup` joined one)."""
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if _joined():
        dist.destroy_process_group()


def processes() -> int:
    """The processes of the job (the process group's world size; 1 outside one)."""
    return dist.get_world_size() if _joined() else 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64/int64 tensor over all ranks (identity in a single process). Returns a new tensor."""
    values = values.clone()
    if _joined():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm running mean/var, ...) of ``model`` from rank ``src`` to all
    ranks. DDP broadcasts buffers at the start of each forward, so after the last training step the
    running statistics differ per rank; call this before evaluating or saving. No-op in one process.
    """
    if _joined():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=src)


def all_reduce_min(values: torch.Tensor) -> list:
    """Element-wise minimum of an int64 tensor over all ranks, as a list of ints (the values
    themselves in a single process). Synchronises the device."""
    values = values.clone()
    if _joined():
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.tolist()


def master_address(environ) -> tuple:
    """``(host, port)`` of rank 0's store: MASTER_ADDR and MASTER_PORT in ``environ``, as
    torch.distributed's ``env://`` reads them, else localhost:29500."""
    return environ.get('MASTER_ADDR', 'localhost'), int(environ.get('MASTER_PORT', 29500))


def all_reduce_max(values: torch.Tensor) -> list:
    """Element-wise maximum of an int64 tensor over all ranks, as a list of ints
    (:func:`all_reduce_min` of the negated values)."""
    return [-v for v in all_reduce_min(-values)]


class RankZeroError(ImagenetFfcvError):
    """What rank 0 raised in :func:`on_rank_0`, as the other ranks see it."""


def on_rank_0(fn):
    """``fn()`` on rank 0 (every rank calls this; the others get None). An exception it raises is
    raised on rank 0 and, as :class:`RankZeroError` naming it, on every other rank, which would
    otherwise wait in its next collective until the timeout (or until torchrun stops it)."""
    result, error = None, None
    if not _joined() or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            error = e
    failed = broadcast_object(None if error is None else f'{type(error).__name__}: {error}')
    if error is not None:
        raise error
    if failed is not None:
        raise RankZeroError(f'rank 0 failed: {failed}')
    return result


class NotSharedError(ImagenetFfcvError):
    """A file rank 0 wrote is not found by another rank: the run folder is on a disk of rank 0's
    node only."""


def check_every_rank_sees(path, wait_s: float = 30) -> None:
    """Every rank looks for ``path``, a file rank 0 has just written (given on rank 0, None on the
    others), for up to ``wait_s`` seconds (a network filesystem may show another node's new file
    late): a run folder on one node's own disk trains without a word until a later start (a
    requeue) puts rank 0 on another node, which finds no checkpoint there and starts the run
    over. Raises :class:`NotSharedError` on every rank, naming the ranks and hosts that do not
    find it, when any does not. Nothing is checked in a single process."""
    if not _joined():
        return
    path = broadcast_object(None if path is None else str(path))
    if path is None:
        return
    deadline = time.monotonic() + wait_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = all_gather_object((os.path.exists(path), socket.gethostname()))
    blind = [f'rank {rank} on {host}' for rank, (found, host) in enumerate(seen) if not found]
    if blind:
        raise NotSharedError(f'{path}, written by rank 0 on {seen[0][1]}, is not found by '
                             f'{first_few(blind, 4)}: the run '
                             f'folder must be on a filesystem every node shares (a later start '
                             f'would find no checkpoint on another node and start the run over)')


def all_gather_object(obj) -> list:
    """``obj`` of every rank (any picklable object), in rank order; ``[obj]`` in a single
    process."""
    if _joined():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it (any picklable object), on every rank; ``obj`` itself in a
    single process."""
    if _joined():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
