"""What the benchmarks share: the image sets and how they are stored, the loaders measured, the
machine line, timing, peak memory, tables, and the ResNet-18 learning run's command line.

Not a framework: plain functions, each used by at least two of the benchmark scripts. The
benchmarks import this module and the package, never each other. Nothing heavy (torch, ffcv, the
package) is imported here at import time: gpu_check.py's parent process imports this module.
"""
import csv
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / 'shared' / 'data'
DEMO = REPO / 'demo' / 'imagenette_sample'
RESULTS = REPO / 'bench-results'
CARRY = REPO / '.carry'  # make carry: what an offline GPU machine needs (make_carry.sh)
# How imagenet-ffcv-write stores images by default
STORAGE = {'write_mode': 'jpg', 'max_res': 256, 'jpeg_quality': 90}
# ffcv-imagenet's ResNet-18 recipe, shipped in imagenet_ffcv/configs
RN18_RECIPE = 'rn18_configs/rn18_16_epochs.yaml'


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
            f'numba {numba.__version__}, {time.strftime("%Y-%m-%d")}, commit {commit()}')


def commit() -> str:
    """The git commit of the code (``run_dir.code_version``, with '+ uncommitted changes' when
    tracked files differ), or, where the tree travelled without .git, the one make_carry.sh
    recorded in .carry/COMMIT."""
    from imagenet_ffcv.run_dir import code_version
    version = code_version()
    if version['git_commit']:
        return version['git_commit'][:7] + (' (+ uncommitted changes)' if version['git_dirty']
                                            else '')
    if (CARRY / 'COMMIT').exists():
        head, *changed = (CARRY / 'COMMIT').read_text().splitlines()
        return head + (f' (+ {len(changed)} changed files)' if changed else '') + \
            ' (as recorded by make carry)'
    return 'unknown (no git, no .carry/COMMIT)'


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


@dataclass
class Timing:
    """The timed calls of one function: the ``seconds`` each took and the ``units`` of work (images)
    each returned."""
    seconds: list = field(default_factory=list)
    units: list = field(default_factory=list)

    @property
    def rates(self) -> list:
        """units/s of each call."""
        return [u / s for u, s in zip(self.units, self.seconds)]

    @property
    def rate(self) -> float:
        """The median units/s (img/s) of the calls."""
        return statistics.median(self.rates)

    @property
    def rate_spread(self) -> float:
        """max - min of the calls' units/s."""
        return max(self.rates) - min(self.rates)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread_s(self) -> float:
        """max - min of the calls' seconds."""
        return max(self.seconds) - min(self.seconds)


def alternate(runs: dict, *, repeats: int, warmup: int = 1, sync=None, settle=None) -> dict:
    """Time several functions in turn, so that a noisy machine's slow minutes fall on all of them.

    ``runs``: name -> function doing one unit of measurement (an epoch, a window of training
    steps) and returning the work it did (images). Each is called ``warmup`` times, untimed, in
    the order of ``runs``; then ``repeats`` rounds call each once, timed: in the order of
    ``runs`` in even rounds and in reverse in odd ones (A B, B A, A B, ...), so that a steady
    drift and the cost of going first fall on all alike. ``settle``: name -> function called
    untimed just before each timed call of that name, before the ``sync`` that opens the timed
    region (e.g. training steps using up the batches a loader made ready while another run was
    timed, so that the timed window measures the loader). ``sync`` (e.g. the device's
    ``synchronize``) is called before each timed call and, inside the timed region, after it.
    Returns name -> :class:`Timing`, every one with ``repeats`` calls.
    """
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    timings = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if settle and name in settle:
                settle[name]()
            if sync:
                sync()
            start = time.perf_counter()
            units = runs[name]()
            if sync:
                sync()
            timings[name].seconds.append(time.perf_counter() - start)
            timings[name].units.append(units)
    return timings


def time_runs(run, *, repeats: int, warmup: int = 1, sync=None) -> Timing:
    """``run()`` (returns the work it did, e.g. images) called ``warmup`` times untimed, then
    ``repeats`` times timed (see :func:`alternate`)."""
    return alternate({'run': run}, repeats=repeats, warmup=warmup, sync=sync)['run']


def error_text(e: Exception) -> str:
    """An exception as one short line for a table row."""
    return f'{type(e).__name__}: {e}'.splitlines()[0][:200]


def measure_feeds(step, streams, *, steps, warmup, windows, sync=None, settle=None) -> dict:
    """The training step fed by each feed, alternately (the real-against-synthetic measurement
    of bench_train and gpu_speed). ``streams``: feed -> a batch iterator, or the exception that
    made it fail; ``step(batches, n)`` trains on the next ``n`` batches and returns the images.
    Each feed's first step is timed alone (``first_step_s``) and ``warmup - 1`` more run
    untimed; then ``windows`` alternating windows of ``steps`` steps per feed, each after
    ``settle[feed]`` untimed steps of its feed (none for a feed not in ``settle``): a loader
    makes batches ready while another feed's window is timed, up to 4 in ffcv 1.0.2 (its
    ``batches_ahead``, 3, and the one being copied), and at a fraction r of the step's rate it
    takes about 4 / (1 - r) steps to use them up (40 at r = 0.9); a window taking them at the
    step's speed reads such a loader up to about 4 / ``steps`` fast, and as keeping up when
    those 4 / (1 - r) steps are as many as the window's.
    Returns feed -> ``{'img_per_s', 'spread', 'windows', 'first_step_s'}`` (median img/s of the
    windows, max - min) or ``{'error'}``: one failing feed does not stop the others."""
    results = {feed: {'error': error_text(s)} for feed, s in streams.items()
               if isinstance(s, Exception)}
    for feed, batches in streams.items():
        if feed in results:
            continue
        try:
            first = time_runs(lambda: step(batches, 1), repeats=1, warmup=0, sync=sync)
            results[feed] = {'first_step_s': round(first.median_s, 2)}
            if warmup > 1:
                step(batches, warmup - 1)
        except Exception as e:  # noqa: BLE001 - one failing feed must not hide the others
            results[feed] = {'error': error_text(e)}

    def guarded(feed, n):
        def run():
            if 'error' in results[feed]:
                return 0
            try:
                return step(streams[feed], n)
            except Exception as e:  # noqa: BLE001 - as above
                results[feed] = {'error': error_text(e)}
                return 0
        return run
    timed = [feed for feed in streams if 'error' not in results[feed]]
    timings = alternate({feed: guarded(feed, steps) for feed in timed}, repeats=windows,
                        warmup=0, sync=sync,
                        settle={feed: guarded(feed, n) for feed, n in (settle or {}).items()
                                if feed in timed and n > 0})
    for feed, timing in timings.items():
        if 'error' not in results[feed]:
            results[feed] = {'img_per_s': round(timing.rate, 1),
                             'spread': round(timing.rate_spread, 1),
                             'windows': len(timing.rates), **results[feed]}
    return results


def time_epochs(run_epoch, runs: int) -> dict:
    """Call ``run_epoch()`` (returns the images it produced) once to warm up (compilation, page
    cache, worker start), then ``runs`` times timed. Returns the median img/s, the spread
    (max - min img/s) and the peak RSS of the timed runs."""
    run_epoch()
    with PeakRSS() as rss:
        timing = time_runs(run_epoch, repeats=runs, warmup=0)
    return {'img_per_s': round(timing.rate, 1), 'spread': round(timing.rate_spread, 1),
            'peak_rss_mb': round(rss.peak_mb)}


def epoch_of(loader):
    """A function running one epoch of ``loader`` (batches of (images, labels)) and returning
    the number of images it gave."""
    def run():
        n = 0
        for _, y in loader:
            n += len(y)
        return n
    return run


def timed_stages(loader, log: list) -> None:
    """Wrap each stage of ``loader``'s compiled pipeline (ffcv 1.0.2: ``loader.code`` is
    ``([(stage, outputs), ...], outputs)``, generated when the loader is made) so that every call
    appends ``(stage index, start s, end s)`` to ``log``. ffcv's iterator thread runs a batch's
    stages one after another; the images' decode is the parallel one."""
    stages, outputs = loader.code

    def timed(index, stage):
        def call(**kwargs):
            start = time.perf_counter()
            result = stage(**kwargs)
            log.append((index, start, time.perf_counter()))
            return result
        return call
    loader.code = ([(timed(i, stage), out) for i, (stage, out) in enumerate(stages)], outputs)


def batch_parts(log) -> tuple:
    """From one epoch's :func:`timed_stages` log: ``(decode ms, serial ms)``, medians over its
    batches of the longest stage (the parallel decode) and of the time from its end to its next
    start (the rest of the pipeline and ffcv's per-batch Python, on one thread while the decode
    threads wait: the serial part per batch)."""
    decode = max({i for i, _, _ in log}, key=lambda i: sum(e - s for j, s, e in log if j == i))
    calls = [(s, e) for i, s, e in log if i == decode]
    return (1e3 * statistics.median(e - s for s, e in calls),
            1e3 * statistics.median(s2 - e1 for (_, e1), (s2, _) in zip(calls, calls[1:])))


def median_parts(parts) -> tuple:
    """``(decode ms, serial ms)``: the medians of the timed epochs' :func:`batch_parts` (all but
    the first of ``parts``, the warm-up epoch)."""
    return tuple(statistics.median(p[k] for p in parts[1:]) for k in (0, 1))


def with_batch_parts(run, loader, parts: list):
    """``run`` (an epoch of ``loader``) that also appends the epoch's :func:`batch_parts`."""
    log = []
    timed_stages(loader, log)

    def call():
        log.clear()
        images = run()
        parts.append(batch_parts(log))
        return images
    return call


# ---------------------------------------------------------------------------------------------
# The stored sets, the loaders measured on them, the learning run.

def stored_beton(samples, folder, **storage) -> Path:
    """The samples written as a beton with STORAGE, changed by ``storage`` (write_mode, max_res,
    jpeg_quality), under ``folder``; written once, named by its settings."""
    from imagenet_ffcv.writer import write_beton
    storage = {**STORAGE, **storage}
    out = Path(folder) / ('_'.join(f'{k}-{v}' for k, v in storage.items()) + '.beton')
    if not out.exists():
        write_beton(samples, out, num_workers=os.cpu_count(), **storage)
    return out


def stored_jpegs(path) -> list:
    """The JPEG records of a beton as ``(uint8 array, height, width)``, read with
    ``verify.records``."""
    from imagenet_ffcv import verify
    data = verify.file_bytes(path)
    return [(verify.record_bytes(data, r), int(r['height']), int(r['width']))
            for r in verify.records(path) if r['mode'] == verify.JPEG_MODE]


def our_loader(path, *, res, workers, batch_size, in_memory=1, order='random', device=None,
               dtype=None, chunk=None, copy_wait=None):
    """The trainer's training loader (``loaders.train_loader``: random-resized crop, flip,
    normalise) on the CPU, or on ``device`` with ``dtype`` images: ``(loader, decoder)``.
    ``chunk`` / ``copy_wait``: ``decoders.PARALLEL_CHUNK`` / ``loaders.COPY_WAIT`` for this loader
    (both are read when a loader is made; set meanwhile, then restored); None: the defaults."""
    import torch

    from imagenet_ffcv import decoders, loaders
    defaults = decoders.PARALLEL_CHUNK, loaders.COPY_WAIT
    try:
        decoders.PARALLEL_CHUNK = defaults[0] if chunk is None else chunk
        loaders.COPY_WAIT = copy_wait or defaults[1]
        return loaders.train_loader(path=path, batch_size=batch_size, num_workers=workers,
                                    res=res, os_cache=in_memory,
                                    device=device or torch.device('cpu'), distributed=False,
                                    seed=0, order=order, dtype=dtype or torch.float32)
    finally:
        decoders.PARALLEL_CHUNK, loaders.COPY_WAIT = defaults


def schedule_name(chunk: int) -> str:
    """How the loader's threads share a batch with ``decoders.PARALLEL_CHUNK`` = ``chunk``."""
    return 'equal shares' if chunk == 0 else f'{chunk} image(s) at a time'


def ffcv_stock_loader(path, *, res, workers, batch_size, device=None):
    """ffcv 1.0.2's own decoder, flip and NormalizeImage, as ffcv-imagenet's training pipeline:
    ``(loader, decoder)``, in ``loaders.Loader`` (ffcv's, keeping the batch buffers between
    epochs, as ours does: both are measured in the steady state of a long epoch). On CPU
    ``loaders.ffcv_image_pipeline`` (the ``data.decoder=ffcv`` pipeline); on CUDA ffcv-imagenet's
    GPU order (``..., ToTensor(), ToDevice(device), ToTorchImage(), NormalizeImage(mean, std,
    np.float16)``, whose kernel needs cupy), giving float16 (B, 3, res, res) channels_last batches
    and int64 (B,) labels on the device."""
    import numpy as np
    import torch
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import OrderOption
    from ffcv.transforms import (NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor,
                                 ToTorchImage)

    from imagenet_ffcv import loaders
    from imagenet_ffcv.constants import IMAGENET_MEAN, IMAGENET_STD
    device = device or torch.device('cpu')
    decoder = RandomResizedCropRGBImageDecoder((res, res))
    if device.type == 'cuda':
        image = [decoder, RandomHorizontalFlip(), ToTensor(), ToDevice(device, non_blocking=True),
                 ToTorchImage(), NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float16)]
    else:
        image = loaders.ffcv_image_pipeline(decoder, device=device, flip_prob=0.5)
    loader = loaders.Loader(str(path), batch_size=batch_size, num_workers=workers, seed=0,
                            order=OrderOption.RANDOM, os_cache=True, drop_last=True,
                            pipelines={'image': image, 'label': loaders.label_pipeline(device)})
    return loader, decoder


def learn_run_samples(nette, *, train_images: int, val_images: int) -> dict:
    """The learning run's samples: ``{'imagenette_train.beton': [(path, label)],
    'imagenette_val.beton': [...]}`` from the imagenette folder ``nette``, each split a random subset (seed 0) of
    ``train_images`` / ``val_images`` (0: all), in file order."""
    import numpy as np

    from imagenet_ffcv import sources
    classes = sources.find_classes(Path(nette) / 'train')
    rng = np.random.default_rng(0)
    jobs = {}
    for split, n in (('train', train_images), ('val', val_images)):
        samples = sources.list_samples(Path(nette) / split, classes)
        if n and n < len(samples):
            samples = [samples[i] for i in sorted(rng.choice(len(samples), n, replace=False))]
        jobs[f'imagenette_{split}.beton'] = samples
    return jobs


def resnet18_run_args(*, train, val, folder, epochs: int, batch_size: int, res: tuple,
                      val_res: int, val_batch_size: int, lr_per_256: float = 0.2,
                      workers: int = None) -> list:
    """imagenet-ffcv-train's options for a short ResNet-18 learning run on imagenette's betons
    (``train``, ``val``; runs under ``folder``): ffcv-imagenet's 16-epoch ResNet-18 recipe
    (RN18_RECIPE: BlurPool, label smoothing 0.1, SGD, cyclic LR, flip TTA) for ``epochs``
    epochs of ``batch_size`` images, the LR ``lr_per_256`` per 256 images peaking at epoch 2, the
    side ramping from ``res[0]`` to ``res[1]`` px over the 3 epochs that end 3 epochs before the
    last, validation at ``val_res`` px in batches of ``val_batch_size``, ``workers`` loader
    threads (default: every core)."""
    low, high = res
    ramp_end = max(1, epochs - 3)
    return ['--config', RN18_RECIPE, f'--data.train_dataset={train}',
            f'--data.val_dataset={val}', f'--data.num_workers={workers or os.cpu_count()}',
            f'--logging.folder={folder}', f'--training.epochs={epochs}',
            f'--training.batch_size={batch_size}', f'--lr.lr={lr_per_256}',
            '--lr.ref_batch_size=256', f'--lr.lr_peak_epoch={min(2, epochs)}',
            f'--resolution.min_res={low}', f'--resolution.max_res={high}',
            f'--resolution.start_ramp={max(0, ramp_end - 3)}', f'--resolution.end_ramp={ramp_end}',
            f'--validation.resolution={val_res}', f'--validation.batch_size={val_batch_size}']


# ---------------------------------------------------------------------------------------------
# Output.

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
