"""Writer throughput: our write_beton (shorter side <= 256, draft decode) against ffcv's plain
``DatasetWriter.from_indexed_dataset(ImageFolder(...))`` (longer side <= 256), same images, same
number of processes, JPEG q90. Prints a Markdown table and writes bench-results/writer.csv.

    python benchmarks/bench_writer.py [--data-dir ../shared/data/imagewoof320] [--repeat 10]

Default data: ../shared/data/imagewoof320 (real aspect ratios, shorter side 320) when present,
else the embedded demo sample (224x224). Each run is repeated --runs times; the median is shown.
"""
import argparse
import os
import tempfile
from pathlib import Path

from common import DEMO, RESULTS, SHARED_DATA, STORAGE, machine_line, time_runs, write_csv
from imagenet_ffcv.sources import find_classes, list_samples
from imagenet_ffcv.writer import write_beton


class RepeatedImageFolder:
    """torchvision's ImageFolder (PIL RGB images), its samples repeated ``repeat`` times."""

    def __init__(self, root, repeat):
        from torchvision.datasets import ImageFolder
        self.folder = ImageFolder(root)
        self.repeat = repeat

    def __len__(self):
        return len(self.folder) * self.repeat

    def __getitem__(self, i):
        return self.folder[i % len(self.folder)]


def run_ours(samples, out, workers):
    write_beton(samples, out, num_workers=workers, **STORAGE)


def run_baseline(root, repeat, out, workers):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    image = RGBImageField(write_mode=STORAGE['write_mode'], max_resolution=STORAGE['max_res'],
                          jpeg_quality=STORAGE['jpeg_quality'])
    writer = DatasetWriter(str(out), {'image': image, 'label': IntField()}, num_workers=workers)
    writer.from_indexed_dataset(RepeatedImageFolder(root, repeat), chunksize=100)


def time_writer(write, folder, n_images: int, runs: int) -> dict:
    """``write(out)`` once to warm up (imports, page cache), then ``runs`` times timed, each into
    a new file: the median seconds and img/s, the spread of the seconds, the file's bytes."""
    outs = (Path(folder) / f'{k}.beton' for k in range(runs + 1))

    def run():
        write(next(outs))
        return n_images
    timing = time_runs(run, repeats=runs)
    size = (Path(folder) / f'{runs}.beton').stat().st_size
    for k in range(runs + 1):
        (Path(folder) / f'{k}.beton').unlink()
    return {'seconds': round(timing.median_s, 3), 'img_per_s': round(n_images / timing.median_s, 1),
            'spread_s': round(timing.spread_s, 3), 'bytes': size}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    shared = SHARED_DATA / 'imagewoof320'
    p.add_argument('--data-dir', default=str(shared if shared.is_dir() else DEMO))
    p.add_argument('--split', default='train')
    p.add_argument('--repeat', type=int, default=10, help='pass over the images this many times')
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--csv', default=str(RESULTS / 'writer.csv'))
    args = p.parse_args(argv)

    root = Path(args.data_dir) / args.split
    classes = find_classes(Path(args.data_dir) / 'train')
    samples = list_samples(root, classes) * args.repeat
    writers = {'ours (shorter side 256, draft)':
               lambda out: run_ours(samples, out, args.workers),
               'ffcv ImageFolder (longer side 256)':
               lambda out: run_baseline(root, args.repeat, out, args.workers)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in writers.items():
            rows.append({'data': Path(args.data_dir).name, 'writer': name, 'images': len(samples),
                         'workers': args.workers,
                         **time_writer(write, tmp, len(samples), args.runs)})
    print(f'\n{machine_line()}')
    print(f'data: {root} x {args.repeat} = {len(samples)} images; median of {args.runs} runs\n')
    print('| writer | images | workers | s (median) | spread s | img/s | MB |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["writer"]} | {r["images"]} | {r["workers"]} | {r["seconds"]:.2f} | '
              f'{r["spread_s"]:.2f} | {r["img_per_s"]:.0f} | {r["bytes"] / 1e6:.1f} |')
    print(f'\nratio ours / baseline: {rows[0]["img_per_s"] / rows[1]["img_per_s"]:.2f}')
    write_csv(args.csv, rows)


if __name__ == '__main__':
    main()
