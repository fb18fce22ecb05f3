"""What is checked before a run starts, against this machine: the device, the optional packages
the config asks for, and the memory ffcv's process cache would take. Each check fails before any
work is done or any run folder is made (rules between keys: ``config``)."""
import os
import shutil
import warnings

import psutil
import torch

from . import cgroups, config, models, schedules
from .config import ConfigError
from .constants import NCCL_SHARED_MEMORY, SHARED_MEMORY
from .optional import require
from .verify import check_there


def check_runnable(cfg, device, processes_on_node: int = 1) -> None:
    """Fail now when ``cfg`` asks for what this run cannot do: a .beton that is not there
    (MissingFileError naming its key: a path from a config file, not typed), a key the ``device``
    (``torch.device``) cannot run (``training.sync_bn`` off CUDA: ConfigError), memory the
    training loader's process cache cannot have (:func:`check_process_cache`), or an optional
    package that is missing. Those are imported now (a timm model or LAMB: timm; W&B: wandb;
    TensorBoard), ``optional.MissingPackageError`` naming the key, the package and how to install
    it. ``processes_on_node``: the processes of the job on this machine."""
    for key, path in (('data.train_dataset', cfg.data.train_dataset),
                      ('data.val_dataset', cfg.data.val_dataset)):
        check_there(path, key)
    if cfg.training.sync_bn and device.type != 'cuda':
        raise ConfigError(f'training.sync_bn=1: torch.nn.SyncBatchNorm runs on CUDA GPUs only, and '
                          f'this run is on {device.type}; set training.sync_bn=0 (one process '
                          'gains nothing from it)')
    check_process_cache(cfg, processes_on_node)
    if cfg.model.arch.startswith('timm:'):
        require('timm', f'model.arch={cfg.model.arch!r}')
    if cfg.training.optimizer == 'lamb':
        require('timm.optim', "training.optimizer='lamb'", package='timm')
    if cfg.logging.wandb_project:
        require('wandb', f'logging.wandb_project={cfg.logging.wandb_project!r}')
    if cfg.logging.tensorboard:
        require('torch.utils.tensorboard', 'logging.tensorboard=1', package='tensorboard')
    check_model_takes(cfg)


def warn_of_little_shared_memory(processes_on_node: int) -> None:
    """A warning when :data:`constants.SHARED_MEMORY` holds less than
    :data:`constants.NCCL_SHARED_MEMORY` (its size, not what is free: NCCL's own segments and
    others' take some of the recommended 1 GiB): NCCL keeps the buffers between the
    ``processes_on_node`` processes of a node there and fails to start with too little (NVIDIA's
    NCCL guide, "Troubleshooting: Shared memory": a Docker container's 64 MiB; ``docker run
    --shm-size=1g --ulimit memlock=-1``). Called by one process of each node before NCCL starts
    (``train.main``). Nothing where the folder cannot be read (not Linux)."""
    try:
        size = shutil.disk_usage(SHARED_MEMORY).total
    except OSError:
        return
    if size < NCCL_SHARED_MEMORY:
        warnings.warn(f'{SHARED_MEMORY} holds {size / 2**20:.0f} MiB: NCCL keeps the buffers '
                      f'between the {processes_on_node} processes of this node there and fails to '
                      f'start with too little; NVIDIA\'s NCCL guide gives a container docker run '
                      f'--shm-size=1g --ulimit memlock=-1', stacklevel=2)


def check_model_takes(cfg) -> None:
    """ConfigError when the model cannot take the run's batches: a training batch of
    ``training.batch_size`` images at each side its epochs train at, a validation one at
    ``validation.resolution`` (torchvision's ViTs take 224 px alone; BatchNorm takes no batch of
    one image in training, SyncBatchNorm's of several processes does). Each is a forward pass of
    the model built on the meta device (no memory, no computing), judged only where one of 2
    images at 224 px passes (a RegNet cannot be built so). The run failed at its first batch,
    after its run folder was made."""
    trained = sorted({schedules.resolution_at(epoch, **config.resolution_kwargs(cfg))
                      for epoch in range(cfg.training.epochs)})
    sides = [*(('training', side, True) for side in trained),
             ('validation', cfg.validation.resolution, False)]

    def fails(batch: int, side: int, training: bool):
        try:
            model.train(training)(torch.empty(batch, 3, side, side, device='meta'))
        except Exception as e:  # noqa: BLE001 (what the model's code raises: any type)
            return e
        return None

    try:
        model = models.meta_model(**config.model_kwargs(cfg), num_classes=10)
    except Exception:  # noqa: BLE001 (no conclusion: the check is left to the first batch)
        return
    for kind, side, training in sides:
        batch = max(cfg.training.batch_size, 1 + cfg.training.sync_bn) if training else 2
        e = fails(batch, side, training)
        if e and not fails(2, 224, False):
            raise ConfigError(f'model.arch={cfg.model.arch} cannot take the run\'s {kind} batches '
                              f'of {batch} image(s) at {side} px ({type(e).__name__}: '
                              f'{" ".join(str(e).split())[:200]}): give it sides (resolution.*, '
                              f'validation.resolution) and batches it takes, or another arch'
                              ) from None


def check_process_cache(cfg, processes_on_node: int, available: int = None) -> None:
    """ConfigError when ``data.in_memory=0`` would need more memory than this process may have
    now (``available`` bytes; default :func:`memory_available`).

    ffcv's process cache (``os_cache=False``) keeps each 8 MiB page of the .beton in the
    process's own memory from the first to the last batch that draws an image from it
    (``ffcv.memory_managers.process_cache.schedule.compute_schedule``); in a random order that
    is nearly every page for nearly the whole epoch, so each process holds about the whole file
    (the out-of-memory killer ends the run late in its first epoch). The OS page cache
    (``data.in_memory=1``) holds the file once for all the processes, and gives pages back when
    memory runs short."""
    path = cfg.data.train_dataset
    if cfg.data.in_memory or not path or not os.path.isfile(path):
        return  # a missing file is the loader's error to report
    need = os.path.getsize(path) * processes_on_node
    available = memory_available() if available is None else available
    if need > available:
        raise ConfigError(
            f'data.in_memory=0: ffcv\'s process cache keeps about the whole training .beton in '
            f'the memory of each process (the order is random): {need / 1e9:.1f} GB for '
            f'{processes_on_node} process(es) on this machine, and {available / 1e9:.1f} GB are '
            f'available. Set data.in_memory=1: the OS page cache holds the file once for all '
            f'the processes and gives pages back when memory runs short')


# cgroup v2 and v1: the files of a memory limit and of the memory in use, and the keys of
# memory.stat that count the page cache in it, which the kernel gives back before it kills.
CGROUP_MEMORY_FILES = {'': ('memory.max', 'memory.current', ('active_file', 'inactive_file')),
                       'memory': ('memory.limit_in_bytes', 'memory.usage_in_bytes',
                                  ('total_active_file', 'total_inactive_file'))}


def memory_available(proc_cgroup='/proc/self/cgroup', root='/sys/fs/cgroup') -> int:
    """Bytes of memory this process may still take: psutil's ``virtual_memory().available``, or
    less under a cgroup memory limit (SLURM's ``--mem``, a container's ``--memory``), v2 or v1:
    the limit less the memory in use but its page cache (active or not: a .beton read by several
    processes is active cache, which the kernel still gives back), for this process's cgroup and
    each one above it. ``proc_cgroup``, ``root``: where the kernel says which cgroups this
    process is in, and where they are mounted."""
    available = psutil.virtual_memory().available
    for folder, v2 in cgroups.folders('memory', proc_cgroup, root):
        limit_file, usage_file, cache_keys = CGROUP_MEMORY_FILES['' if v2 else 'memory']
        try:
            limit = int((folder / limit_file).read_text())
            used = int((folder / usage_file).read_text())
            stat = dict(entry.split() for entry in (folder / 'memory.stat').read_text()
                        .splitlines() if entry.count(' ') == 1)
            cache = sum(int(stat.get(key, 0)) for key in cache_keys)
            available = min(available, limit - used + cache)
        except (OSError, ValueError):  # no such file, or 'max': no limit here
            pass
    return max(available, 0)
