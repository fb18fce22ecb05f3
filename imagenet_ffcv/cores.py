"""The cores a process may use: its CPU affinity (taskset, cgroups' cpusets, SLURM's binding),
SLURM's ``--cpus-per-task``, and a cgroup's CPU quota (a container's ``--cpus``, a Kubernetes CPU
limit), which the affinity does not show: a pod limited to 8 CPUs on a 128-core node saw 128, and
its loader threads and writer processes were throttled to 8 cores' time."""
import math
import os
from typing import NamedTuple

from . import cgroups


class Quota(NamedTuple):
    """A cgroup CPU quota: ``cpus`` the CPUs' time it allows (quota / period: 4.0 for ``docker
    run --cpus=4``), ``cgroup`` the id of the cgroup that sets it (its folder's inode number: the
    same from every container of the machine), which tells the processes that share it."""
    cpus: float
    cgroup: int

    @property
    def cores(self) -> int:
        """Whole CPUs, at least one: rounded down, so that threads never outnumber the time they
        get (a quota of 1.5 leaves half a CPU unused rather than throttle two)."""
        return max(1, math.floor(self.cpus))


def affinity() -> set:
    """The cores this process may run on (``os.sched_getaffinity``; all of them where there is
    none)."""
    return os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else set(
        range(os.cpu_count() or 1))


def affinity_cores() -> int:
    """The cores of this process's :func:`affinity`, at most its SLURM job step's
    SLURM_CPUS_PER_TASK (``--cpus-per-task``: a cluster that binds no task to its cores leaves
    every core of the node in the affinity)."""
    cores = len(affinity())
    asked = os.environ.get('SLURM_CPUS_PER_TASK', '')
    return min(cores, int(asked)) if asked.isdigit() and int(asked) > 0 else cores


def usable_cores() -> int:
    """The cores this process may use alone: :func:`affinity_cores`, at most the whole CPUs of
    its cgroups' CPU quota (:func:`cpu_quota`). (``distributed.loader_threads`` divides each
    among the processes that share it.)"""
    quota = cpu_quota()
    return min(affinity_cores(), quota.cores) if quota else affinity_cores()


def cpu_quota(proc_cgroup='/proc/self/cgroup', root='/sys/fs/cgroup'):
    """The least :class:`Quota` of this process's cgroup and each one above it; None without a
    quota. cgroup v2's ``cpu.max`` (``max 100000``: none; ``400000 100000``) or v1's
    ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``. ``proc_cgroup``, ``root``: where
    the kernel says which cgroups this process is in, and where they are mounted
    (``cgroups.folders``)."""
    quotas = [q for folder, v2 in cgroups.folders('cpu', proc_cgroup, root)
              if (q := _quota(folder, v2))]
    return min(quotas) if quotas else None


def _quota(folder, v2: bool):
    """The :class:`Quota` the cgroup ``folder`` sets, or None (none set, or not readable)."""
    try:
        if v2:
            quota, period = (folder / 'cpu.max').read_text().split()
        else:
            quota = (folder / 'cpu.cfs_quota_us').read_text().strip()
            period = (folder / 'cpu.cfs_period_us').read_text().strip()
        if int(quota) <= 0:
            return None
        return Quota(int(quota) / int(period), folder.stat().st_ino)
    except (OSError, ValueError, ZeroDivisionError):  # no such file, 'max': no quota here
        return None
