"""The cores a process may use: its CPU affinity (taskset, cgroups' cpusets, SLURM's binding),
SLURM's ``--cpus-per-task``, and a cgroup's CPU quota (a container's ``--cpus``, a Kubernetes CPU
limit), which the affinity does not show: a pod limited to 8 CPUs on a 128-core node saw 128, and
its loader threads and writer processes were throttled to 8 cores' time."""
import math
import os
from pathlib import Path

from . import cgroups


def affinity() -> set:
    """The cores this process may run on (``os.sched_getaffinity``; all of them where there is
    none)."""
    return os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else set(
        range(os.cpu_count() or 1))


def usable_cores() -> int:
    """The cores this process may use: its :func:`affinity`, at most its SLURM job step's
    SLURM_CPUS_PER_TASK (``--cpus-per-task``: a cluster that binds no task to its cores leaves
    every core of the node in the affinity) and its cgroups' CPU quota (:func:`cpu_quota`, whole
    CPUs, at least one)."""
    cores = len(affinity())
    asked = os.environ.get('SLURM_CPUS_PER_TASK', '')
    if asked.isdigit() and int(asked) > 0:
        cores = min(cores, int(asked))
    quota = cpu_quota()
    return min(cores, max(1, math.floor(quota))) if quota else cores


def cpu_quota(proc_cgroup='/proc/self/cgroup', root='/sys/fs/cgroup'):
    """The CPUs' time this process's cgroups allow it, in CPUs (quota / period: 4.0 for ``docker
    run --cpus=4``), the least over its cgroup and each one above it; None without a quota.
    cgroup v2's ``cpu.max`` (``max 100000``: none; ``400000 100000``) or v1's
    ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``. ``proc_cgroup``, ``root``: where
    the kernel says which cgroups this process is in, and where they are mounted
    (``cgroups.folders``)."""
    quotas = [q for folder, v2 in cgroups.folders('cpu', proc_cgroup, root)
              if (q := _quota(folder, v2))]
    return min(quotas) if quotas else None


def _quota(folder: Path, v2: bool):
    """The quota the cgroup ``folder`` sets, in CPUs, or None (none set, or not readable)."""
    try:
        if v2:
            quota, period = (folder / 'cpu.max').read_text().split()
        else:
            quota = (folder / 'cpu.cfs_quota_us').read_text().strip()
            period = (folder / 'cpu.cfs_period_us').read_text().strip()
        return int(quota) / int(period) if int(quota) > 0 else None
    except (OSError, ValueError):  # no such file, or 'max': no quota here
        return None
