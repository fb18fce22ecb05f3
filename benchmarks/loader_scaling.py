"""How the training loader scales with threads: its serial part per batch (Amdahl's law) and the
cost of ffcv's per-batch barrier (load imbalance), measured on the CPUs at hand and extrapolated
to ``--predict-threads`` (16: the lent GPU machine's cores).

1. Loader epochs (``loaders.train_loader``, random-resized crop + flip + normalise, float32 on the
   CPU) at ``--res`` px with 1 and 2 threads, batch 256 and 1,024, on long epochs (``--min-samples``
   images: ../shared/data/imagewoof320 and imagenette, train + val, pooled and repeated; else the
   embedded demo sample, with a note). The loaders alternate epoch by epoch (one untimed
   warm-up epoch each, then ``--epochs`` timed rounds, order reversed every other round); img/s
   is the median of a loader's epochs, ``spread`` their max - min. Beside them, in the same
   alternation, the most threads at the smallest batch with each schedule of ``--chunks``
   (``decoders.PARALLEL_CHUNK``: images a thread takes at a time as it gets free; 0: one equal
   share per thread), against the loader's own. Each epoch also
   times the pipeline's stages in ffcv's iterator thread: per batch, the parallel decode stage
   (``decode ms``) and the time from its end to the next batch's (``serial ms``: labels,
   ToTensor, ToTorchImage and ffcv's per-batch Python, on one thread while the decode threads
   wait), medians over the batches.
2. Amdahl fit per batch size: with t1, t2 the seconds per image at 1 and 2 threads, the serial
   fraction is ``s = 2 t2 / t1 - 1`` (t_n = t1 (s + (1 - s) / n)), the serial time per batch
   ``s * t1 * batch`` (ms), the predicted speedup at n threads ``1 / (s + (1 - s) / n)`` and the
   per-core efficiency that speedup / n. The 2-thread epochs share the machine's 2 cores with the
   main thread that consumes the batches, so on a 2-core machine s is an upper bound; each row's
   ``cores_used`` (process CPU seconds / wall seconds) shows whether other processes took cores,
   and a WARNING line says so. The CPU per batch that does not grow with the batch (1 thread,
   batch 256 against 1,024, in CPU time) is printed beside the fit.
3. Imbalance: each of ``--sim-images`` stored JPEGs decoded once into a random-resized crop at
   ``--res`` px on one thread (``image_decode.decode_crop``, the loader's compiled per-image code;
   the least of 3 timings per image, µs, Python's call overhead included), then batches drawn from
   that cost distribution and scheduled on ``--predict-threads`` threads: one equal share per
   thread (the batch ends when the slowest share does) against chunks of the loader's and
   ``--chunks``' sizes taken as threads get free (``decoders.take_images``). Efficiency = (total
   work / threads) / the batch's time.
4. Prediction from the measured parts: the 1-thread decode stage D shared by n threads at the
   simulated efficiency e of the loader's schedule, then the serial ms g:
   ``(D / n) / (D / (n e) + g)`` per core, which the noise of 1- against 2-thread wall times (the
   fit of 2) does not blur.

    python benchmarks/loader_scaling.py        # about 2.5 minutes on 2 idle cores

Prints Markdown tables and numba's threading layer; writes bench-results/loader_scaling.csv.
"""
import argparse
import heapq
import os
import statistics
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from common import (DEMO, RESULTS, SHARED_DATA, alternate, epoch_of, machine_line,
                    markdown_table, median_parts, our_loader, pooled_samples, schedule_name,
                    stored_beton, stored_jpegs, with_batch_parts, write_csv)
from imagenet_ffcv import decoders, image_decode
from imagenet_ffcv.crops import random_resized_crop, sample_key

SCALE, RATIO = np.array((0.08, 1.0)), np.array((3 / 4, 4 / 3))  # the training crop's ranges


def pooled_sets(min_samples: int) -> tuple:
    """``(name, samples)``: imagewoof320 and imagenette (train + val) of ../shared/data pooled,
    repeated to at least ``min_samples``; else the embedded demo sample, with a note."""
    roots = [SHARED_DATA / n for n in ('imagewoof320', 'imagenette')
             if (SHARED_DATA / n / 'train').is_dir()]
    if not roots:
        print(f'note: no imagewoof320 or imagenette under {SHARED_DATA}; measuring the embedded '
              f'demo sample ({DEMO}) repeated')
        roots = [DEMO]
    pool = [s for root in roots for s in pooled_samples(root, 1)]
    name = '+'.join(r.name for r in roots)
    return name, pool * -(-min_samples // len(pool))


def thread_cpu_seconds() -> dict:
    """Thread id -> CPU seconds (user + system) of each thread of this process, from
    /proc/self/task (empty where there is no /proc)."""
    tick, seconds = os.sysconf('SC_CLK_TCK'), {}
    try:
        tasks = os.listdir('/proc/self/task')
    except OSError:
        return seconds
    for task in tasks:
        try:
            fields = Path(f'/proc/self/task/{task}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue  # the thread ended
        seconds[task] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def with_cpu_time(run, cpu: list):
    """``run`` that also appends to ``cpu`` the process's CPU seconds (user + system, all threads)
    of each call and the CPU seconds of each thread that worked in it (above 2 % of the total),
    largest first."""
    def call():
        before, threads_before = os.times(), thread_cpu_seconds()
        images = run()
        after, threads_after = os.times(), thread_cpu_seconds()
        total = after.user - before.user + after.system - before.system
        per_thread = sorted((t - threads_before.get(k, 0.0) for k, t in threads_after.items()),
                            reverse=True)
        cpu.append((total, [round(t, 2) for t in per_thread if t > 0.02 * total]))
        return images
    return call


def loader_epochs(beton, *, res, configs, epochs) -> list:
    """One row per (threads, batch, chunk) of ``configs`` (chunk: ``decoders.PARALLEL_CHUNK`` for
    that loader): img/s (median of ``epochs`` alternating timed epochs after one warm-up epoch
    each), spread (img/s), seconds per epoch, images per epoch, CPU µs per image, ``cores_used``
    (the process's CPU seconds over wall seconds: below the threads asked for when other
    processes shared the cores), ``decode_ms`` and ``serial_ms`` (per batch, the medians of the
    timed epochs' ``common.batch_parts``) and ``thread_cpu_s`` (the CPU seconds of each thread
    that worked in the median epoch: with 2 threads, one number when one thread did all the
    decoding)."""
    runs, cpu, parts = {}, {}, {}
    for config in configs:
        loader, _ = our_loader(beton, res=res, workers=config[0], batch_size=config[1],
                               chunk=config[2])
        cpu[config], parts[config] = [], []
        runs[config] = with_cpu_time(with_batch_parts(epoch_of(loader), loader, parts[config]),
                                     cpu[config])
    timings = alternate(runs, repeats=epochs, warmup=1)
    rows = []
    for (n, b, chunk), t in timings.items():
        cpu_s = [c for c, _ in cpu[(n, b, chunk)][1:]]  # the timed epochs (the first: warm-up)
        median = sorted(range(len(t.seconds)), key=t.seconds.__getitem__)[len(t.seconds) // 2]
        decode_ms, serial_ms = median_parts(parts[(n, b, chunk)])
        rows.append({'threads': n, 'batch': b, 'chunk': chunk, 'schedule': loaders_schedule(chunk),
                     'img_per_s': round(t.rate, 1),
                     'spread': round(t.rate_spread, 1), 'epoch_s': round(t.median_s, 2),
                     'images': t.units[0], 'epochs': len(t.units),
                     'cpu_us_per_image': round(1e6 * statistics.median(cpu_s) / t.units[0], 1),
                     'cores_used': round(statistics.median(
                         c / w for c, w in zip(cpu_s, t.seconds)), 2),
                     'decode_ms': round(decode_ms, 3), 'serial_ms': round(serial_ms, 3),
                     'thread_cpu_s': ' '.join(map(str, cpu[(n, b, chunk)][1 + median][1]))})
    return rows


def fixed_cost_per_batch(rows) -> float:
    """ms of CPU per batch that does not grow with the batch, from the 1-thread rows of the
    smallest and largest batch: (c_small - c_large) / (1 / small - 1 / large), c in µs of CPU per
    image (CPU time, so other processes on the machine do not inflate it); None without them."""
    ones = sorted((r['batch'], r['cpu_us_per_image']) for r in rows if r['threads'] == 1)
    if len(ones) < 2:
        return None
    (small, c_small), (large, c_large) = ones[0], ones[-1]
    return round((c_small - c_large) / (1 / small - 1 / large) / 1e3, 2)


def amdahl(rows, predict_threads: int) -> list:
    """Per batch size, from the 1- and 2-thread rows: serial fraction s from wall time, serial ms
    per batch, the predicted img/s and per-core efficiency at ``predict_threads`` threads; and
    ``*_cpu``: the same prediction with s from CPU time (the fixed CPU per batch of
    :func:`fixed_cost_per_batch` over a 1-thread batch's CPU), which other processes on the
    machine do not inflate."""
    def efficiency(s):
        s = min(max(s, 0.0), 1.0)
        return 1 / (s + (1 - s) / predict_threads) / predict_threads
    fixed = fixed_cost_per_batch(rows)
    fits = []
    for b in sorted({r['batch'] for r in rows}):
        by_threads = {r['threads']: r for r in rows if r['batch'] == b}
        if 1 not in by_threads or 2 not in by_threads:
            continue
        one, two = by_threads[1], by_threads[2]
        t1, t2 = 1 / one['img_per_s'], 1 / two['img_per_s']
        s = 2 * t2 / t1 - 1
        s_cpu = None if fixed is None else 1e3 * fixed / (one['cpu_us_per_image'] * b)
        fits.append({'batch': b, 'rate_1': one['img_per_s'], 'rate_2': two['img_per_s'],
                     'per_core_2': round(two['img_per_s'] / 2, 1),
                     'cores_used_2': two['cores_used'], 'serial_fraction': round(s, 4),
                     'serial_ms_per_batch': round(1e3 * s * t1 * b, 2),
                     'predict_threads': predict_threads,
                     'predicted_img_per_s': round(one['img_per_s'] * predict_threads
                                                  * efficiency(s), 0),
                     'predicted_efficiency': round(efficiency(s), 3),
                     'serial_fraction_cpu': None if s_cpu is None else round(s_cpu, 4),
                     'predicted_efficiency_cpu': None if s_cpu is None
                     else round(efficiency(s_cpu), 3)})
    return fits


def predict(rows, sim, threads: int) -> list:
    """Per batch size, the per-core efficiency at ``threads`` threads from the measured parts of a
    batch: the 1-thread decode stage D (ms) shared by the threads at the simulated efficiency e of
    the loader's schedule (``sim``), then the serial ms g measured with the most threads:
    (D / n) / (D / (n e) + g); and the img/s it gives (n x the 1-thread img/s x that)."""
    own = decoders.PARALLEL_CHUNK
    fits = []
    for b in sorted({r['batch'] for r in rows}):
        by_threads = {r['threads']: r for r in rows if r['batch'] == b and r['chunk'] == own}
        e = next((x['efficiency'] for x in sim if x['batch'] == b and x['chunk'] == own), None)
        if 1 not in by_threads or e is None:
            continue
        most = by_threads[max(by_threads)]
        d, g = by_threads[1]['decode_ms'], most['serial_ms']
        efficiency = (d / threads) / (d / (threads * e) + g)
        fits.append({'batch': b, 'decode_ms_1': d, 'serial_ms': g,
                     'serial_ms_threads': most['threads'], 'imbalance_efficiency': e,
                     'threads': threads, 'predicted_efficiency': round(efficiency, 3),
                     'predicted_img_per_s': round(threads * by_threads[1]['img_per_s']
                                                  * efficiency)})
    return fits


def image_costs(beton, *, res: int, images: int) -> np.ndarray:
    """µs to decode each of the first ``images`` JPEG records of ``beton`` into a random-resized
    crop at ``res`` px (float32 normalised, as the CPU loader), one thread: median of 3 timings."""
    jpegs = stored_jpegs(beton)[:images]
    crops = [random_resized_crop(h, w, SCALE, RATIO, np.uint64(sample_key(0, 0, k)))
             for k, (_, h, w) in enumerate(jpegs)]
    jpeg, h, w = jpegs[0]
    image_decode.decode_crop(jpeg, height=h, width=w, crop=crops[0], size=(res, res))  # compiles
    times = np.empty((3, len(jpegs)))
    for r in range(3):
        for k, ((jpeg, h, w), crop) in enumerate(zip(jpegs, crops)):
            start = time.perf_counter()
            image_decode.decode_crop(jpeg, height=h, width=w, crop=crop, size=(res, res))
            times[r, k] = time.perf_counter() - start
    return 1e6 * times.min(axis=0)


def makespan(costs, threads: int, chunk: int) -> float:
    """When the last of ``threads`` threads ends a batch of images costing ``costs``, as
    ``decoders.take_images`` shares it: chunks of ``chunk`` images (0: one equal share per
    thread) taken in order by whichever thread is free first."""
    chunk = chunk or -(-len(costs) // threads)
    free = [0.0] * threads
    for start in range(0, len(costs), chunk):
        heapq.heappush(free, heapq.heappop(free) + float(costs[start:start + chunk].sum()))
    return max(free)


def loaders_schedule(chunk: int) -> str:
    """:func:`common.schedule_name`, marked when it is the loader's."""
    return schedule_name(chunk) + (" (the loader's)" if chunk == decoders.PARALLEL_CHUNK else '')


def imbalance(costs, *, threads: int, batch_sizes, chunks=(0, 1, 4), batches: int = 400) -> list:
    """Per batch size and schedule (``chunks``, as :func:`makespan`): the mean efficiency of
    ``batches`` batches drawn (with replacement, seed 0) from ``costs`` on ``threads`` threads."""
    rng = np.random.default_rng(0)
    rows = []
    for b in batch_sizes:
        draws = [rng.choice(costs, b) for _ in range(batches)]
        for chunk in chunks:
            eff = [d.sum() / threads / makespan(d, threads, chunk) for d in draws]
            rows.append({'batch': b, 'threads': threads, 'chunk': chunk,
                         'schedule': loaders_schedule(chunk),
                         'efficiency': round(statistics.mean(eff), 3),
                         'worst_batch': round(min(eff), 3)})
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--res', type=int, default=160, help='output side (px)')
    p.add_argument('--threads', default='1,2', help='comma-separated loader threads')
    p.add_argument('--batch-sizes', default='256,1024', help='comma-separated')
    p.add_argument('--min-samples', type=int, default=20480, help='images per epoch (at least)')
    p.add_argument('--epochs', type=int, default=3, help='timed epochs per loader')
    p.add_argument('--chunks', default='0,4',
                   help="comma-separated schedules besides the loader's (decoders.PARALLEL_CHUNK): "
                        "images a thread takes at a time, 0 one equal share per thread")
    p.add_argument('--predict-threads', type=int, default=16)
    p.add_argument('--sim-images', type=int, default=2000,
                   help='JPEGs timed one by one for the imbalance simulation')
    p.add_argument('--work', help='folder for the .beton (kept; default: a temporary folder)')
    p.add_argument('--out', default=str(RESULTS))
    args = p.parse_args(argv)
    args.threads = [int(n) for n in args.threads.split(',')]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
    args.chunks = [int(c) for c in args.chunks.split(',') if c != ''
                   and int(c) != decoders.PARALLEL_CHUNK]
    return args


def report(name, rows, fits, costs, sim, parts, layer) -> None:
    """The four Markdown tables and the lines around them."""
    print(f'\n### Loader epochs: {name}, {rows[0]["images"]:,} images, median of '
          f'{rows[0]["epochs"]} alternating epochs\n')
    print(markdown_table(rows, [('threads', 'threads', ''), ('batch', 'batch', ''),
                                ('schedule', 'schedule', ''),
                                ('img_per_s', 'img/s', ',.0f'), ('spread', 'spread', ',.0f'),
                                ('epoch_s', 'epoch s', '.2f'),
                                ('cpu_us_per_image', 'CPU µs/image', '.0f'),
                                ('cores_used', 'cores used', '.2f'),
                                ('decode_ms', 'decode ms/batch', '.2f'),
                                ('serial_ms', 'serial ms/batch', '.3f'),
                                ('thread_cpu_s', 'CPU s per busy thread', '')]))
    rows = [r for r in rows if r['chunk'] == decoders.PARALLEL_CHUNK]
    fixed = fixed_cost_per_batch(rows)
    if fixed is not None:
        print(f'\nCPU per batch that does not grow with the batch (1 thread, batch '
              f'{min(r["batch"] for r in rows)} against {max(r["batch"] for r in rows)}): '
              f'{fixed:.1f} ms')
    print('\n### Amdahl fit (s = 2 t2 / t1 - 1)\n')
    print(markdown_table(fits, [
        ('batch', 'batch', ''), ('rate_1', '1 thread img/s', ',.0f'),
        ('rate_2', '2 threads img/s', ',.0f'), ('per_core_2', 'per core at 2', ',.0f'),
        ('cores_used_2', 'cores used at 2', '.2f'),
        ('serial_fraction', 'serial fraction s', '.3f'),
        ('serial_ms_per_batch', 'serial ms/batch', '.1f'),
        ('predicted_img_per_s', f'predicted img/s at {fits[0]["predict_threads"]}', ',.0f'),
        ('predicted_efficiency', 'per-core efficiency', '.2f'),
        ('serial_fraction_cpu', 's from CPU time', '.3f'),
        ('predicted_efficiency_cpu', 'per-core efficiency from it', '.2f')]) if fits else '(no 1 and 2-thread '
          'pair)')
    busy = [f for f in fits if f['cores_used_2'] < 1.8]
    if busy:
        print(f'\nWARNING: the 2-thread epochs got {", ".join(str(f["cores_used_2"]) for f in busy)} '
              f'cores, not 2: other processes shared the cores, so s above is an upper bound '
              f'and the prediction a lower bound; rerun on an idle machine.')
    print(f'\n### Imbalance at the per-batch barrier: {len(costs)} images, decode µs per image '
          f'median {np.median(costs):.0f}, p10 {np.percentile(costs, 10):.0f}, p90 '
          f'{np.percentile(costs, 90):.0f}, max {costs.max():.0f} (CV '
          f'{costs.std() / costs.mean():.2f})\n')
    print(markdown_table(sim, [('batch', 'batch', ''), ('threads', 'threads', ''),
                               ('schedule', 'schedule', ''), ('efficiency', 'efficiency', '.3f'),
                               ('worst_batch', 'worst batch', '.3f')]))
    if parts:
        print(f'\n### Prediction for {parts[0]["threads"]} threads from the measured parts of a '
              f'batch: (D / n) / (D / (n e) + g)\n')
        print(markdown_table(parts, [
            ('batch', 'batch', ''), ('decode_ms_1', 'D: decode ms at 1 thread', '.2f'),
            ('serial_ms', 'g: serial ms', '.3f'),
            ('serial_ms_threads', 'g measured at threads', ''),
            ('imbalance_efficiency', "e: imbalance, the loader's schedule", '.3f'),
            ('predicted_efficiency', 'per-core efficiency', '.2f'),
            ('predicted_img_per_s', 'img/s', ',.0f')]))
    print(f'\nnumba threading layer after the loader epochs: {layer}')


def main(argv=None):
    args = parse_args(argv)
    print(machine_line())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='loader_scaling_') as tmp:
        folder = Path(args.work or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        name, samples = pooled_sets(args.min_samples)
        (folder / f'{name}-{len(samples)}').mkdir(exist_ok=True)
        beton = stored_beton(samples, folder / f'{name}-{len(samples)}')
        default = decoders.PARALLEL_CHUNK
        configs = ([(n, b, default) for n in args.threads for b in args.batch_sizes]
                   + [(max(args.threads), min(args.batch_sizes), c) for c in args.chunks])
        rows = loader_epochs(beton, res=args.res, configs=configs, epochs=args.epochs)
        layer = numba.threading_layer()
        costs = image_costs(beton, res=args.res, images=args.sim_images)
    own = [r for r in rows if r['chunk'] == default]  # the fit: the loader's own schedule
    fits = amdahl(own, args.predict_threads)
    sim = imbalance(costs, threads=args.predict_threads, batch_sizes=args.batch_sizes,
                    chunks=sorted({0, default, *args.chunks}))
    parts = predict(rows, sim, args.predict_threads)
    report(name, rows, fits, costs, sim, parts, layer)
    write_csv(Path(args.out) / 'loader_scaling.csv',
              [{'table': 'epochs', 'data': name, 'res': args.res, **r} for r in rows]
              + [{'table': 'amdahl', 'data': name, 'res': args.res,
                  'fixed_ms_per_batch': fixed_cost_per_batch(own), **r} for r in fits]
              + [{'table': 'imbalance', 'data': name, 'res': args.res, **r} for r in sim]
              + [{'table': 'prediction', 'data': name, 'res': args.res, **r} for r in parts])
    print(f'\nwrote {Path(args.out) / "loader_scaling.csv"} ({time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
    main()
