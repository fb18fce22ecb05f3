"""The cgroups this process is in, v2 or v1, and the folders where their limits are: SLURM's
``--mem`` and ``--cpus-per-task`` as it enforces them, a container's ``--memory`` and ``--cpus``,
a Kubernetes pod's limits. A limit may be set on the process's cgroup or on any one above it."""
from pathlib import Path


def folders(controller: str, proc_cgroup='/proc/self/cgroup', root='/sys/fs/cgroup'):
    """Yield ``(folder, v2)`` for the cgroup this process is in for ``controller`` ('memory',
    'cpu'; v2's single hierarchy holds every controller) and each one above it, up to where the
    hierarchy is mounted: the folders whose files set its limits (v2: ``memory.max``,
    ``cpu.max``; v1: ``memory.limit_in_bytes``, ``cpu.cfs_quota_us``, ...). Nothing where the
    kernel's list cannot be read (not Linux). ``proc_cgroup``, ``root``: where the kernel says
    which cgroups this process is in, and where they are mounted."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(':', 2)
        if len(fields) != 3 or fields[1] and controller not in fields[1].split(','):
            continue  # v2: '' (one hierarchy); v1: 'memory', 'cpu,cpuacct', ...
        _, controllers, path = fields
        top = Path(root, controllers)
        if controllers and not top.is_dir():  # mounted as 'cpuacct,cpu', or only a 'cpu' link
            top = Path(root, controller)
        folder = top / path.lstrip('/')
        while True:
            yield folder, not controllers
            if folder == top or top not in folder.parents:
                break
            folder = folder.parent
