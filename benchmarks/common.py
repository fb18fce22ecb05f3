"""What the benchmarks share: the image sets, the machine line, timing, peak memory and tables.

Not a framework: plain functions, each used by at least two of the benchmark scripts.
"""
import csv
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / 'shared' / 'data'
DEMO = REPO / 'demo' / 'imagenette_sample'
RESULTS = REPO / 'bench-results'


def image_sets(names) -> dict:
    """name -> folder of the sets to measure: ../shared/data/<name> where present, else the
    embedded demo sample (real Imagenette JPEGs, 224 x 224) once, with a line saying so."""
    found = {name: SHARED_DATA / name for name in names if (SHARED_DATA / name / 'train').is_dir()}
    missing = [n for n in names if n not in found]
    if missing:
        print(f'note: {", ".join(missing)} not found under {SHARED_DATA}; '
              f'{"measuring the embedded demo sample instead" if not found else "skipped"}')
    return found or {'demo_sample': DEMO}


def pooled_samples(root, min_samples: int) -> list:
    """All (path, label) pairs of root/train and root/val, repeated until there are at least
    ``min_samples`` (the sets are small; the loader cannot tell repeats apart)."""
    from imagenet_ffcv.sources import find_classes, list_samples
    classes = find_classes(Path(root) / 'train')
    pool = []
    for split in ('train', 'val'):
        if (Path(root) / split).is_dir():
            pool += list_samples(Path(root) / split, classes)
    return pool * -(-min_samples // len(pool))


def machine_line() -> str:
    """One line naming the machine and the versions the numbers depend on."""
    import numba
    import torch
    try:
        from importlib.metadata import version
        ffcv_version = version('ffcv')
    except Exception:  # noqa: BLE001 - only for the printout
        ffcv_version = '?'
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f', GPU {torch.cuda.get_device_name(0)}' if torch.cuda.is_available() else ''
    return (f'{platform.node()}: {os.cpu_count()} cores ({cpu}){gpu}, Python '
            f'{platform.python_version()}, torch {torch.__version__}, ffcv {ffcv_version}, '
            f'numba {numba.__version__}, {time.strftime("%Y-%m-%d")}')


class PeakRSS:
    """Peak resident memory (MB) of this process and its children (DataLoader workers), sampled
    every 20 ms while the ``with`` block runs; pages shared by several processes count once per
    process, as ``ps`` shows them."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self):
        import psutil
        me = psutil.Process()
        while True:
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            if self._stop.wait(0.02):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def time_epochs(run_epoch, runs: int) -> dict:
    """Call ``run_epoch()`` (returns the images it produced) once to warm up (compilation, page
    cache, worker start), then ``runs`` times timed. Returns the median img/s, the spread
    (max - min img/s) and the peak RSS of the timed runs."""
    run_epoch()
    rates = []
    with PeakRSS() as rss:
        for _ in range(runs):
            start = time.perf_counter()
            images = run_epoch()
            rates.append(images / (time.perf_counter() - start))
    return {'img_per_s': round(statistics.median(rates), 1),
            'spread': round(max(rates) - min(rates), 1), 'peak_rss_mb': round(rss.peak_mb)}


def markdown_table(rows: list, columns: list) -> str:
    """A Markdown table (``metrics.format_table``) of ``rows`` (dicts) with ``columns``:
    (key, header, format) triples; a missing or empty value gives an empty cell."""
    from imagenet_ffcv.metrics import format_table
    cells = [['' if r.get(key) in (None, '') else format(r[key], fmt) if fmt else str(r[key])
              for key, _, fmt in columns] for r in rows]
    return format_table(cells, [header for _, header, _ in columns])


def write_csv(path, rows: list) -> None:
    """Rows (dicts) to CSV; the columns are the union of their keys, in first-seen order."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
