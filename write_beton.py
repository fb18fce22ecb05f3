"""Convert ImageNet-style class folders (DATA_DIR/{train,val}/<wnid>/*.JPEG) to an FFCV .beton file.

Each image is resized so its shorter side is at most --max-res pixels (aspect ratio kept, never
upscaled), the role of the classic `convert -resize "256^>"` step. Class i is the i-th wnid folder of
the sorted *train* split, for both splits; the class list is written beside the .beton
(train_256.beton -> train_256.classes.tsv).

    python write_beton.py --data-dir $IMAGENET_DIR --split train --max-res 256
    python write_beton.py --data-dir $IMAGENET_DIR --split val --max-res 256
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

from imagenet_ffcv import data


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-dir', default=os.environ.get('IMAGENET_DIR'),
                   help='folder holding train/ and val/ (default: $IMAGENET_DIR)')
    p.add_argument('--split', required=True, choices=['train', 'val'])
    p.add_argument('--max-res', type=int, default=256, help='shorter side at most this (px)')
    p.add_argument('--out', default=None, help='output file (default betons/{split}_{max_res}.beton)')
    p.add_argument('--write-mode', choices=['jpg', 'raw', 'proportion'], default='jpg',
                   help='jpg: JPEG; raw: pixels; proportion: JPEG with --compress-probability')
    p.add_argument('--jpeg-quality', type=int, default=90)
    p.add_argument('--compress-probability', type=float, default=0.5)
    p.add_argument('--num-workers', type=int, default=0, help='processes (default: all cores)')
    p.add_argument('--subset', type=int, default=0,
                   help='write a random N images (seed 0) instead of all, e.g. for a quick trial')
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error('--data-dir is required when $IMAGENET_DIR is not set')
    if args.max_res < 1:
        p.error(f'--max-res {args.max_res}: must be >= 1')
    args.out = args.out or f'betons/{args.split}_{args.max_res}.beton'
    return args


def main(args) -> dict:
    """Write the .beton and its class list; returns the writer's stats plus 'classes'."""
    root = Path(args.data_dir)
    classes = data.find_classes(root / 'train')
    samples = data.list_samples(root / args.split, classes)
    if args.subset:
        keep = np.random.default_rng(0).choice(len(samples), min(args.subset, len(samples)),
                                               replace=False)
        samples = [samples[i] for i in sorted(keep)]
    stats = data.write_beton(samples, args.out, max_res=args.max_res, write_mode=args.write_mode,
                             jpeg_quality=args.jpeg_quality,
                             compress_probability=args.compress_probability,
                             num_workers=args.num_workers)
    data.write_class_list(data.class_list_path(args.out), classes)
    stats['classes'] = len({label for _, label in samples})
    print(f'{args.out}: {stats["images"]} images, {stats["classes"]} classes, '
          f'{stats["bytes"] / 1e6:.1f} MB, {stats["img_per_s"]:.0f} img/s '
          f'({stats["seconds"]:.1f} s); classes in {data.class_list_path(args.out)}')
    return stats


if __name__ == '__main__':
    try:
        main(parse_args(sys.argv[1:]))
    except (FileNotFoundError, ValueError, data.UnreadableImagesError) as e:
        sys.exit(f'write_beton.py: {e}')
