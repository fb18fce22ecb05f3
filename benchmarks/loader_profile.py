"""Where the loader's time goes, per image: our decoder's two steps timed alone on one thread,
against the whole-image decode that defines the decode limit, and the loader itself.

For every stored JPEG of a set (as ``imagenet-ffcv-write`` stores it by default: shorter side 256,
q90) and the random-resized crops the training decoder draws (``crops``, ``--crops`` per image),
at each resolution, one thread, median of ``--runs`` passes after a warm-up pass:

- ``whole decode``: ffcv's ``imdecode`` of the whole JPEG (TurboJPEG, fast IDCT): the unit of
  ``bench_loader.py``'s decode limit (img/s = cores / this), on the same stored bytes (restart
  markers included);
- ``region decode``: ``jpeg_region.c``'s ``decode_region`` on the crop's window
  (``image_decode.jpeg_window``), and the fraction of the image's pixels in the window; split into
  its steps for JPEGs with restart markers: ``intervals`` (the markers found and the covered
  intervals copied into a small JPEG: ``region_jpeg``), ``entropy`` (that small JPEG's headers
  read, its decompression started and its Huffman data decoded by jpeg_region.c's own decoder,
  alone: ``entropy_decode``) and the rest (IDCT, upsampling, colour conversion: region decode -
  intervals - entropy); and, for comparison, ``no markers``: the same windows decoded
  by libjpeg-turbo's partial decompression (``decode_region_scanlines``, the way of JPEGs without
  markers), which entropy-decodes every row above the window and the window's rows in full
  width;
- ``resample``: the loaders' resample of that region into the batch (``image_decode.resampler``:
  ``resampling.resample``'s taps, applied in C when there are 2 per axis): float32 normalised
  (the CPU path) and uint8 (the CUDA path, normalised on the device);
- ``loader``: ``loaders.train_loader`` at ``--res-loader`` with all cores, in µs per image per
  thread (cores / img/s), and what is left over the two steps (the crop draw, ffcv's batch
  assembly, the threads); also with ffcv 1.0.2's own buffer handling (every epoch's batch
  buffers allocated anew), which ``loaders.Loader`` replaces: epochs of the two kinds alternate
  (``--runs`` + 2 each, medians), so that a noisy machine's slow minutes hit both.

    python benchmarks/loader_profile.py           # make bench runs it; about 1.5 minutes on 2 cores

Data: ../shared/data/imagewoof320 and imagenette (train + val; repeated to --min-samples for the
loader), else the embedded demo sample. Prints a Markdown table; writes
bench-results/loader_profile.csv.
"""
import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (RESULTS, STORAGE, alternate, epoch_of, image_sets, machine_line,
                    markdown_table, our_loader, pooled_samples, stored_beton, stored_jpegs,
                    time_runs, write_csv)
from ffcv.libffcv import imdecode
from ffcv.pipeline.graph import Graph
from imagenet_ffcv import image_decode, jpeg_region
from imagenet_ffcv.constants import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ffcv.crops import random_resized_crop, sample_key

SCALE, RATIO = np.array((0.08, 1.0)), np.array((3 / 4, 4 / 3))  # the training crop's ranges
resample_c = image_decode.resampler()  # the loaders' own resample (C for 2 taps per axis)


def median_us(run, runs: int) -> float:
    """Median µs per image of ``run()`` (returns the images it handled) over ``runs`` timed
    passes after one warm-up pass."""
    return 1e6 / time_runs(run, repeats=runs).rate


def stage_costs(jpegs, res: int, crops: int, runs: int) -> dict:
    """µs per image of each step, one thread, for ``crops`` random-resized crops of each JPEG."""
    buffer = np.empty(max(h * w * 3 for _, h, w in jpegs), np.uint8)
    jobs = []
    for c in range(crops):
        for k, (jpeg, h, w) in enumerate(jpegs):
            i, j, ch, cw = random_resized_crop(h, w, SCALE, RATIO, np.uint64(sample_key(0, c, k)))
            jobs.append((jpeg, h, w, image_decode.jpeg_window(h, w, i, j, ch, cw, res, res, True)))
    regions = []
    for jpeg, _, _, (denom, top, left, rows, cols, y0, x0, ch, cw) in jobs:
        pixels, first = jpeg_region.decode_region(jpeg, top=top, left=left, height=rows,
                                                  width=cols, denom=denom)
        regions.append((pixels.copy(), y0 - top, x0 - first, ch, cw))
    read = jpeg_region.region_decoder()
    scanlines = jpeg_region.c_function('decode_region_scanlines')
    region_jpeg = jpeg_region.c_function('region_jpeg')
    entropy_decode = jpeg_region.c_function('entropy_decode')
    info = np.zeros(2, np.int64)
    small = []  # the small JPEGs of the marker way
    for jpeg, _, _, (denom, top, left, rows, cols, *_) in jobs:
        n = region_jpeg(jpeg.ctypes.data, jpeg.size, buffer.ctypes.data, buffer.size, top, left,
                        rows, cols, denom, info.ctypes.data)
        if n > 0:
            small.append(buffer[:n].copy())

    def whole():
        for jpeg, h, w in jpegs:
            imdecode(jpeg, buffer, h, w, h, w, 0, 0, 1, 1, False, False)
        return len(jpegs)

    def region(fn):
        def run():
            for jpeg, _, _, (denom, top, left, rows, cols, *_) in jobs:
                fn(jpeg.ctypes.data, jpeg.size, buffer.ctypes.data, buffer.size, top, left, rows,
                   cols, denom, info.ctypes.data)
            return len(jobs)
        return run

    def entropy():
        for jpeg in small:
            entropy_decode(jpeg.ctypes.data, jpeg.size)
        return len(jobs)  # per crop (0 µs when no JPEG has markers)

    def resample(dtype):
        out = np.empty((res, res, 3), dtype)
        mean, inv_std = IMAGENET_MEAN.astype(np.float32), (1 / IMAGENET_STD).astype(np.float32)

        def run():
            for r in regions:
                resample_c(*r, out, False, mean, inv_std, dtype == np.float32, False)
            return len(regions)
        return run

    decoded = np.mean([p.shape[0] * p.shape[1] / (-(-h // d[0]) * -(-w // d[0]))
                       for (p, *_), (_, h, w, d) in zip(regions, jobs)])  # of the scaled image
    costs = {'whole_decode_us': median_us(whole, runs),
             'region_decode_us': median_us(region(read), runs),
             'no_markers_us': median_us(region(scanlines), runs),
             'marker_way_fraction': len(small) / len(jobs),
             'intervals_us': median_us(region(region_jpeg), runs),
             'entropy_us': median_us(entropy, runs) if small else 0.0,
             'decoded_fraction': decoded,
            'resample_f32_us': median_us(resample(np.float32), runs),
             'resample_u8_us': median_us(resample(np.uint8), runs)}
    costs['idct_us'] = costs['region_decode_us'] - costs['intervals_us'] - costs['entropy_us']
    return costs


def loader_img_per_s(beton, res: int, runs: int) -> tuple:
    """img/s of the training loader (all cores, batch 256, CPU) in the steady state of a long
    epoch, and with every epoch's buffers allocated anew, as ffcv 1.0.2 does: the same loader
    (compiled once), after a warm-up epoch, the two kinds of epoch alternating ``runs`` times each
    (so that a VM's slower minutes hit both), medians."""
    loader, _ = our_loader(beton, res=res, workers=os.cpu_count(), batch_size=256)
    reuse = loader.graph.allocate_memory
    fresh = functools.partial(Graph.allocate_memory, loader.graph)

    def epoch_with(allocate):
        def run():
            loader.graph.allocate_memory = allocate
            return epoch_of(loader)()
        return run
    epoch_of(loader)()  # warm-up: numba compiles the pipeline
    timings = alternate({'reuse': epoch_with(reuse), 'fresh': epoch_with(fresh)},
                        repeats=runs, warmup=0)
    return timings['reuse'].rate, timings['fresh'].rate


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sets', default='imagewoof320,imagenette')
    p.add_argument('--res', default='160,192,224')
    p.add_argument('--res-loader', type=int, default=160, help='0: no loader rows')
    p.add_argument('--crops', type=int, default=4, help='crops per image and resolution')
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--min-samples', type=int, default=3000, help='images per loader epoch')
    p.add_argument('--out', default=str(RESULTS))
    args = p.parse_args()
    started = time.perf_counter()
    cores = os.cpu_count()
    print(machine_line())
    rows = []
    with tempfile.TemporaryDirectory(prefix='loader_profile_') as tmp:
        for name, root in image_sets(args.sets.split(',')).items():
            folder = Path(tmp) / name
            folder.mkdir()
            (folder / 'pooled').mkdir()
            jpegs = stored_jpegs(stored_beton(pooled_samples(root, 1), folder))
            pooled = stored_beton(pooled_samples(root, args.min_samples), folder / 'pooled')
            for res in [int(r) for r in args.res.split(',')]:
                row = {'data': name, 'images': len(jpegs), 'res': res, 'threads': cores,
                       **STORAGE, **stage_costs(jpegs, res, args.crops, args.runs)}
                row['steps_us'] = row['region_decode_us'] + row['resample_f32_us']
                if res == args.res_loader:
                    rates = loader_img_per_s(pooled, res, args.runs + 2)
                    for key, rate in zip(('loader', 'loader_fresh_buffers'), rates):
                        row[f'{key}_img_per_s'] = rate
                        row[f'{key}_us'] = 1e6 * cores / rate
                    row['other_us'] = row['loader_us'] - row['steps_us']
                    row['pct_of_decode_limit'] = 100 * row['whole_decode_us'] / row['loader_us']
                rows.append(row)
                print(f'  {name} {res} px done ({time.perf_counter() - started:.0f} s)',
                      flush=True)
    write_csv(Path(args.out) / 'loader_profile.csv', rows)
    print(f'\n### Where the loader\'s time goes (µs per image, one thread; loader: {cores} '
          f'threads, batch 256, per thread)\n')
    print(markdown_table(rows, [
        ('data', 'data', ''), ('res', 'res', ''), ('whole_decode_us', 'whole decode', '.0f'),
        ('region_decode_us', 'region decode', '.0f'), ('intervals_us', 'intervals', '.0f'),
        ('entropy_us', 'entropy', '.0f'), ('idct_us', 'IDCT, colour', '.0f'),
        ('no_markers_us', 'no markers', '.0f'), ('decoded_fraction', 'pixels decoded', '.2f'),
        ('resample_f32_us', 'resample f32', '.0f'), ('resample_u8_us', 'resample u8', '.0f'),
        ('steps_us', 'region + f32', '.0f'), ('loader_us', 'loader', '.0f'),
        ('other_us', 'other', '.0f'), ('pct_of_decode_limit', '% of limit', '.0f'),
        ('loader_fresh_buffers_us', 'loader, ffcv buffers', '.0f')]))
    print(f'\nwrote {Path(args.out) / "loader_profile.csv"} in '
          f'{time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    main()
