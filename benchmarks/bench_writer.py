"""Writer throughput: our write_beton (shorter side <= 256, draft decode) against ffcv's plain
``DatasetWriter.from_indexed_dataset(ImageFolder(...))`` (longer side <= 256), same images, same
number of processes, JPEG q90. Prints a Markdown table and writes bench-results/writer.csv.

    python benchmarks/bench_writer.py [--data-dir ../shared/data/imagewoof320] [--repeat 10]

Default data: ../shared/data/imagewoof320 (real aspect ratios, shorter side 320) when present,
else the embedded demo sample (224x224). Each run is repeated --runs times; the median is shown.
"""
import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import machine_line  # noqa: E402
from imagenet_ffcv.sources import find_classes, list_samples  # noqa: E402
from imagenet_ffcv.writer import write_beton  # noqa: E402


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
    write_beton(samples, out, max_res=256, write_mode='jpg', jpeg_quality=90, num_workers=workers)


def run_baseline(root, repeat, out, workers):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    writer = DatasetWriter(str(out), {'image': RGBImageField(write_mode='jpg', max_resolution=256,
                                                             jpeg_quality=90),
                                      'label': IntField()}, num_workers=workers)
    writer.from_indexed_dataset(RepeatedImageFolder(root, repeat), chunksize=100)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    shared = REPO.parent / 'shared' / 'data' / 'imagewoof320'
    p.add_argument('--data-dir', default=str(shared if shared.is_dir() else
                                             REPO / 'demo' / 'imagenette_sample'))
    p.add_argument('--split', default='train')
    p.add_argument('--repeat', type=int, default=10, help='pass over the images this many times')
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--csv', default=str(REPO / 'bench-results' / 'writer.csv'))
    args = p.parse_args()

    root = Path(args.data_dir) / args.split
    classes = find_classes(Path(args.data_dir) / 'train')
    samples = list_samples(root, classes) * args.repeat
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (('ours (shorter side 256, draft)',
                          lambda out: run_ours(samples, out, args.workers)),
                         ('ffcv ImageFolder (longer side 256)',
                          lambda out: run_baseline(root, args.repeat, out, args.workers))):
            fn(Path(tmp) / 'warmup.beton')  # imports, page cache
            times = []
            for r in range(args.runs):
                out = Path(tmp) / f'{r}.beton'
                start = time.perf_counter()
                fn(out)
                times.append(time.perf_counter() - start)
                size = out.stat().st_size
                out.unlink()
            median = statistics.median(times)
            rows.append({'data': Path(args.data_dir).name, 'writer': name, 'images': len(samples),
                         'workers': args.workers, 'seconds': round(median, 3),
                         'img_per_s': round(len(samples) / median, 1),
                         'spread_s': round(max(times) - min(times), 3), 'bytes': size})
    print(f'\n{machine_line()}')
    print(f'data: {root} x {args.repeat} = {len(samples)} images; median of {args.runs} runs\n')
    print('| writer | images | workers | s (median) | spread s | img/s | MB |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["writer"]} | {r["images"]} | {r["workers"]} | {r["seconds"]:.2f} | '
              f'{r["spread_s"]:.2f} | {r["img_per_s"]:.0f} | {r["bytes"] / 1e6:.1f} |')
    print(f'\nratio ours / baseline: {rows[0]["img_per_s"] / rows[1]["img_per_s"]:.2f}')
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == '__main__':
    main()
