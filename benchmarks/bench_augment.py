"""What per-image augmentation costs: ``augment.batch_augmenter`` (RandAugment, TrivialAugmentWide,
Random Erasing, torchvision v2; ``training.auto_augment``, ``training.random_erase``) on batches of
the trainer's loader, in img/s of the augmentation alone, on the CPU (or ``--device cuda``).

    python benchmarks/bench_augment.py            # CPU, 160 and 224 px, batch 64 (make bench)
    python benchmarks/bench_augment.py --device cuda --batch-size 256

Method: for each resolution, ``--batches`` batches are read once from our loader (random-resized
crops of the main set of bench_loader: ../shared/data/imagewoof320, or the embedded sample), moved
to the device; then each augmentation runs once over them untimed, and ``--repeats`` rounds time
each over all of them in turn (``common.alternate``: the order reversed every other round). A row's
img/s is the median of its rounds, ``spread`` their max - min; ``us_per_image`` is 1e6 / img/s, to
set beside the loader's per-image time (bench_loader, loader_profile). The augmentation runs in the
training process, after the loader, so on the CPU its time adds to each step's.
Prints a Markdown table; writes bench-results/augment.csv.
"""
import argparse
import tempfile
from pathlib import Path

import torch

from common import (RESULTS, alternate, image_sets, machine_line, markdown_table, our_loader,
                    pooled_samples, stored_beton, write_csv)
from imagenet_ffcv.augment import batch_augmenter

AUGMENTS = {'RandAugment (ra, magnitude 9)': {'auto_augment': 'ra'},
            'TrivialAugmentWide (ta_wide)': {'auto_augment': 'ta_wide'},
            'Random Erasing p=0.25': {'random_erase': 0.25},
            'ta_wide + Random Erasing p=0.25': {'auto_augment': 'ta_wide', 'random_erase': 0.25}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--res', dest='res_list', default='160,224',
                   type=lambda s: [int(r) for r in s.split(',')])
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--batches', type=int, default=4)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--out', default=str(RESULTS))
    return p.parse_args(argv)


def loader_batches(beton, *, res: int, batch_size: int, batches: int, device) -> list:
    """The first ``batches`` training batches at ``res`` (float32 (B, 3, res, res), normalised)."""
    loader, _ = our_loader(beton, res=res, workers=2, batch_size=batch_size)
    out = []
    for x, _ in loader:
        out.append(x.to(device))
        if len(out) == batches:
            return out
    raise ValueError(f'{beton}: fewer than {batches} batches of {batch_size}')


def measure(beton, *, res_list, batch_size: int, batches: int, repeats: int, device) -> list:
    """One row per (resolution, augmentation): img/s of the augmentation over the batches."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    rows = []
    for res in res_list:
        xs = loader_batches(beton, res=res, batch_size=batch_size, batches=batches, device=device)
        torch.manual_seed(0)
        runs = {}
        for name, kwargs in AUGMENTS.items():
            augment = batch_augmenter(**kwargs)
            runs[name] = lambda augment=augment: sum(augment(x).shape[0] for x in xs)
        timings = alternate(runs, repeats=repeats, warmup=1, sync=sync)
        rows += [{'augment': name, 'device': device.type, 'res': res, 'batch_size': batch_size,
                  'img_per_s': t.rate, 'spread': t.rate_spread, 'us_per_image': 1e6 / t.rate}
                 for name, t in timings.items()]
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix='bench_augment_') as tmp:
        name, root = next(iter(image_sets(['imagewoof320']).items()))
        beton = stored_beton(pooled_samples(root, args.batch_size * args.batches), tmp)
        rows = measure(beton, res_list=args.res_list, batch_size=args.batch_size,
                       batches=args.batches, repeats=args.repeats, device=device)
    rows = [{'data': name, **r} for r in rows]
    print(f'\n### Per-image augmentation on {device}, batches of {args.batch_size}: img/s of the '
          f'augmentation alone, median of {args.repeats} rounds over {args.batches} batches\n')
    print(markdown_table(rows, [('augment', 'augmentation', ''), ('res', 'res', 'd'),
                                ('img_per_s', 'img/s', ',.0f'), ('spread', 'spread', ',.0f'),
                                ('us_per_image', 'µs/image', ',.0f')]))
    write_csv(Path(args.out) / 'augment.csv', rows)
    print(f'\nwrote {Path(args.out) / "augment.csv"}')


if __name__ == '__main__':
    main()
