"""Convert ImageNet-style class folders (DATA_DIR/{train,val}/<wnid>/*.JPEG) to an FFCV .beton file:
the ``imagenet-ffcv-write`` command (also ``python -m imagenet_ffcv.write``, ``write_beton.py``).

Also reads Kaggle's ImageNet tree (DATA_DIR/ILSVRC/Data/CLS-LOC/{train,val} with flat val images
labelled by DATA_DIR/LOC_val_solution.csv) and the raw ILSVRC-2012 tars without extracting them
(DATA_DIR/ILSVRC2012_img_train.tar of per-class <wnid>.tar, ILSVRC2012_img_val.tar, labelled by
DATA_DIR/LOC_val_solution.csv or the devkit ILSVRC2012_devkit_t12.tar.gz); --layout picks one, by
default it is detected.

Each image is resized so its shorter side is at most --max-res pixels (aspect ratio kept, never
upscaled), the role of the classic `convert -resize "256^>"` step. Class i is the i-th wnid folder of
the sorted *train* split, for both splits (unless --classes, below); the class list is written
beside the .beton (train_256.beton -> train_256.classes.tsv). A data set without val/ can hold out
a share of each class of train/ as its val split (--holdout 0.1, given for both splits;
NAME.holdout.json beside each .beton records its --split and --holdout, and the trainer refuses a
pair that differ).
--classes FILE labels the class folders by a model's class list instead (a test set of its
classes: ImageNet-V2, -Sketch, -R, -A, whose folders DATA_DIR/<wnid or index>/ may be given whole).

Files that cannot be decoded (truncated, empty, not an image, unreadable) are skipped and listed
with the reason in NAME.skipped.tsv beside the .beton; --strict makes any of them an error (nothing
written). The free space of the target folder is checked first. The file is written as the dot
file .NAME.partial-HOST-PID and renamed when complete; temporaries of killed runs are removed by
the next run into the same folder.

    imagenet-ffcv-write --data-dir $IMAGENET_DIR --split train --max-res 256
    imagenet-ffcv-write --data-dir $IMAGENET_DIR --split val --max-res 256
    imagenet-ffcv-write --verify betons/val_256.beton    # read back and decode every record
"""
import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np

from .classes import (ILSVRC_CLASSES, class_list_of, class_list_path, folders_by_class_list,
                      read_class_list, write_class_list)
from .beton_out import check_not_being_written, check_out_is_new
from .commands import (STORAGE_OPTION_RANGES, add_version_option, check_ranges, command_name,
                       one_line_errors, one_line_warnings, stopped_by_ctrl_c)
from .errors import InputError, MissingFileError, first_few
from .images import (DEFAULT_JPEG_QUALITY, DEFAULT_MAX_RES, DEFAULT_RESTART_INTERVAL,
                     jpeg_check_missing)
from .ilsvrc import KAGGLE_DIR
from .signals import Terminated, sigterm_raises
from .holdout import held_out, write_holdout_record
from .sources import LAYOUTS, class_folders, list_samples, load_split
from .verify import verify_beton
from .writer import write_beton


def build_parser() -> argparse.ArgumentParser:
    """The converter's options."""
    p = argparse.ArgumentParser(prog=command_name('write'),
                                description=__doc__.split('\n\n')[0].replace('``', ''))
    p.add_argument('--data-dir', default=os.environ.get('IMAGENET_DIR'),
                   help='folder holding train/ and val/, or, with --classes, the class folders '
                        'of a test set (default: $IMAGENET_DIR)')
    p.add_argument('--split', choices=['train', 'val'],
                   help='which split to convert (the class list comes from train, or from '
                        '--classes)')
    p.add_argument('--layout', choices=('auto',) + LAYOUTS, default='auto',
                   help='input layout: folders (train/<wnid>/, val/<wnid>/), kaggle '
                        '(ILSVRC/Data/CLS-LOC/ + LOC_val_solution.csv), tars '
                        '(ILSVRC2012_img_{train,val}.tar read in place + LOC_val_solution.csv or '
                        'the devkit ILSVRC2012_devkit_t12.tar.gz); '
                        'auto: detected from --data-dir')
    p.add_argument('--max-res', type=int, default=DEFAULT_MAX_RES,
                   help=f'shorter side at most this (px; default {DEFAULT_MAX_RES})')
    p.add_argument('--out', default=None,
                   help='output file (default betons/{split}_{max_res}.beton; an existing '
                        'folder, or a path ending in /: that name in it)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace --out if it exists (without it, an existing --out is refused '
                        'before any work)')
    p.add_argument('--write-mode', choices=['jpg', 'raw', 'proportion'], default='jpg',
                   help='jpg: JPEG; raw: pixels; proportion: JPEG with --compress-probability')
    p.add_argument('--jpeg-quality', type=int, default=DEFAULT_JPEG_QUALITY,
                   help=f'quality of the stored JPEGs, 1-100 (default {DEFAULT_JPEG_QUALITY})')
    p.add_argument('--restart-interval', type=int, default=DEFAULT_RESTART_INTERVAL, metavar='N',
                   help='a restart marker in each stored JPEG at most every N MCUs (16 x 16 px '
                        'blocks; per image the largest divisor of its MCU columns up to N), so '
                        'that the training and validation loaders decode only the blocks a crop '
                        'covers; the records stay standard JPEGs. Smaller N: faster crops, more '
                        'bytes. 0: no markers (as ffcv\'s own writer stores JPEGs). '
                        f'Default: {DEFAULT_RESTART_INTERVAL}')
    p.add_argument('--compress-probability', type=float, default=0.5,
                   help='with --write-mode proportion: the share of images stored as JPEG '
                        '(default 0.5)')
    p.add_argument('--num-workers', type=int, default=0,
                   help='processes (default: the cores this process may use)')
    p.add_argument('--holdout', type=float, default=0, metavar='F',
                   help='for a data set without val/: hold out a share F of each class\'s train '
                        'images as the val split (--split val writes them, --split train the '
                        'others; give the same F to both). The same images every time (by a '
                        'hash of their file names). 0: off (default)')
    p.add_argument('--subset', type=int, default=0,
                   help='write a random N images (seed 0) instead of all, e.g. for a quick trial '
                        '(0: all)')
    p.add_argument('--strict', action='store_true',
                   help='fail (writing nothing) if any image cannot be decoded or stored, '
                        'instead of skipping it and listing it in NAME.skipped.tsv')
    p.add_argument('--classes', metavar='FILE', default=None,
                   help="label the class folders by this class list (a run folder's, a "
                        f".beton's, a class list file; {ILSVRC_CLASSES}: ILSVRC-2012's 1,000) "
                        "instead of train/'s folders: each folder named by a wnid of it or by "
                        "its ILSVRC-2012 class index (ImageNet-V2's 0 .. 999); the split's folder "
                        'is DATA_DIR/SPLIT, or DATA_DIR itself when it has no train/ or val/ (a '
                        "test set); the .beton's class list: the list's classes that have a "
                        'folder, in its order')
    p.add_argument('--verify', metavar='FILE', default=None,
                   help='only read FILE back: counts, images per class, sizes, decode every '
                        'record; exit 1 on any problem')
    add_version_option(p)
    return p


def parse_args(argv):
    """The converter's options from ``argv``, checked (argparse exits with status 2 on errors)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.verify:
        return args
    if not args.split:
        p.error('--split is required (unless --verify FILE)')
    if not args.data_dir:
        p.error('--data-dir is required when $IMAGENET_DIR is not set')
    check_ranges(p, args, {**STORAGE_OPTION_RANGES,
                           '--num-workers': (0, None, ' (0: one per core this process may use)')})
    if not 0 <= args.holdout < 1:
        p.error(f'--holdout {args.holdout}: must lie in [0, 1) (0: off; 0.1: a tenth of each '
                'class)')
    if args.subset < 0:
        p.error(f'--subset {args.subset}: must be >= 1 (or 0: all the images)')
    if not 0 <= args.compress_probability <= 1:
        p.error(f'--compress-probability {args.compress_probability}: must lie in [0, 1]')
    if args.classes and args.layout not in ('auto', 'folders'):
        p.error(f'--classes labels class folders: not --layout {args.layout}')
    name = f'{args.split}_{args.max_res}.beton'
    args.out = args.out or f'betons/{name}'
    if Path(args.out).is_dir() or args.out.endswith(('/', os.sep)):  # a folder: that name in it
        args.out = str(Path(args.out) / name)
    return args


def check_out_outside_inputs(out, data_dir, split_dir=None) -> None:
    """ValueError when ``out`` lies inside a split folder of ``data_dir`` (train/, val/ or Kaggle's
    CLS-LOC tree; or ``split_dir``, a test set's folder of class folders): the next run would take
    its folder for a class, or its files for images."""
    out = Path(out).resolve()
    for inputs in (Path(data_dir) / 'train', Path(data_dir) / 'val', Path(data_dir) / KAGGLE_DIR,
                   *([split_dir] if split_dir else [])):
        if inputs.resolve() in out.parents:
            raise InputError(f'--out {out} is inside the input folder {inputs}: write the .beton '
                             f'outside it (e.g. {Path(data_dir).resolve().parent / "betons"})')


def test_set_folder(root, split: str) -> Path:
    """The folder of a split labelled by ``--classes``: ``root/split``, or ``root`` itself when it
    has neither train/ nor val/ (a test set unpacked as ``root/<class>/``: ImageNet-V2, -Sketch,
    -R, -A). MissingFileError when there is none."""
    root = Path(root)
    if (root / split).is_dir():
        return root / split
    if not root.is_dir():
        raise MissingFileError(f'{root}: no such folder; set --data-dir')
    if any((root / name).is_dir() for name in ('train', 'val')):
        raise MissingFileError(f'{root / split}: {split} split folder not found (set --split, or '
                               f'--data-dir to the folder of class folders itself)')
    return root


def load_by_class_list(split_dir, given: str) -> tuple:
    """``(classes, samples, names)`` (as ``sources.load_split``) of the split in ``split_dir``
    (:func:`test_set_folder`) labelled by the class list ``given`` (``--classes``:
    ``classes.class_list_of``) rather than by train/'s folders. ``classes``: the list's wnids
    that have a folder there, in the list's order (``classes.folders_by_class_list``), labels
    their positions."""
    class_list = class_list_of(given)
    folders, _ = class_folders(list(os.scandir(split_dir)))  # (hidden ones: list_samples names)
    labelled = folders_by_class_list(folders, class_list, split_dir)
    samples = list_samples(split_dir, [folder for folder, _ in labelled])
    if len(labelled) < len(class_list):
        print(f'=> {len(class_list) - len(labelled)} of the {len(class_list)} classes of '
              f'{given} have no folder in {split_dir}: the .beton\'s class list holds the other '
              f'{len(labelled)}, and eval-only scores their logits alone (as ImageNet-A and -R '
              f'are evaluated)', flush=True)
    return [wnid for _, wnid in labelled], samples, dict(class_list)


def main(args) -> dict:
    """Write the .beton and its class list; returns the writer's stats plus 'classes'."""
    read = 'train' if args.holdout else args.split  # --holdout: both splits come from train/
    split_dir = test_set_folder(args.data_dir, read) if args.classes else None
    check_out_outside_inputs(args.out, args.data_dir, split_dir)
    check_out_is_new(args.out, args.overwrite)
    check_not_being_written(args.out)  # and again as it starts writing: listing takes minutes
    classes, samples, names = (load_by_class_list(split_dir, args.classes) if args.classes else
                               load_split(Path(args.data_dir), read, args.layout))
    if args.holdout:
        samples = held_out(samples, args.holdout, args.split)
    if args.subset:
        keep = np.random.default_rng(0).choice(len(samples), min(args.subset, len(samples)),
                                               replace=False)
        samples = [samples[i] for i in sorted(keep)]
    if unchecked := jpeg_check_missing():
        warnings.warn(f'{unchecked}; until then, JPEG files are not checked: one with '
                      'damaged data is stored with the grey libjpeg fills in, one missing only '
                      'its final EOI marker is skipped as truncated', stacklevel=2)
    stats = write_beton(samples, args.out, max_res=args.max_res, write_mode=args.write_mode,
                        jpeg_quality=args.jpeg_quality,
                        compress_probability=args.compress_probability,
                        restart_interval=args.restart_interval,
                        num_workers=args.num_workers, skip_unreadable=not args.strict)
    write_class_list(class_list_path(args.out), classes, names)
    write_holdout_record(args.out, args.split, args.holdout)
    skipped = {path for path, _ in stats['skipped_files']}
    kept = {label for path, label in samples if path not in skipped}
    stats['classes'] = len(kept)
    emptied = [classes[label] for label in sorted({label for _, label in samples} - kept)]
    skipped_note = (f', {stats["skipped"]} skipped (listed in {stats["skipped_report"]})'
                    if stats['skipped'] else ', 0 skipped')
    of_all = f' of {len(classes)}' if stats['classes'] != len(classes) else ''
    print(f'{args.out}: {stats["images"]} images, {stats["classes"]}{of_all} '
          f'class{"es" if of_all or stats["classes"] != 1 else ""}'
          f'{skipped_note}, {stats["bytes"] / 1e6:.1f} MB, {stats["img_per_s"]:.0f} img/s '
          f'({stats["seconds"]:.1f} s); classes in {class_list_path(args.out)}')
    if stats['skipped']:
        print(f'{command_name("write")}: warning: {stats["skipped"]} file(s) could not be decoded '
              f'and were skipped; see {stats["skipped_report"]}' + (
                  f'; class(es) left with no image by them: {first_few(emptied)}'
                  if emptied else ''), file=sys.stderr)
    return stats


def verify(path) -> int:
    """Print a summary of the .beton at ``path``; 0 if every record reads back, else 1."""
    report = verify_beton(path)
    names = {}
    if class_list_path(path).exists():
        names = dict(enumerate(read_class_list(class_list_path(path))))
    print(f'{path}: {report["images"]} images, {len(report["per_class"])} classes, '
          f'{report["bytes"] / 1e6:.1f} MB ({report["modes"]["jpg"]} JPEG, '
          f'{report["modes"]["raw"]} raw)')
    print('images per class: ' + ', '.join(f'{k}{"/" + names[k] if k in names else ""}: {v}'
                                            for k, v in report['per_class'].items()))
    print('shorter side (px): ' + ', '.join(f'{k}: {v}' for k, v in report['short_side'].items()))
    if report['problems']:
        for line in report['problems'][:20]:
            print(f'  {line}', file=sys.stderr)
        more = len(report['problems']) - 20
        print(f'{command_name("write")}: {path}: {len(report["problems"])} problem(s)'
              f'{f" ({more} not shown)" if more > 0 else ""}', file=sys.stderr)
        return 1
    print(f'{path}: OK, every record decodes')
    return 0


@one_line_warnings('write')
@one_line_errors('write')
def cli(argv=None) -> int:
    """The command line (``argv``, default ``sys.argv[1:]``): returns the exit status, with a
    one-line message instead of a traceback for expected failures (missing folders, bad images
    with --strict, no space, bad .beton) and for SIGTERM (143) and Ctrl-C (after which the process
    ends by SIGINT, so that a shell's loop stops too), both leaving the output as it was and no
    temporary. Off the main thread (no signal reaches it) nothing is installed."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with sigterm_raises():
            if args.verify:
                return verify(args.verify)
            main(args)
            return 0
    except (KeyboardInterrupt, Terminated) as e:
        kept = '' if args.verify else f': nothing written, {args.out} is as it was'
        if isinstance(e, KeyboardInterrupt):
            return stopped_by_ctrl_c('write', kept)
        print(f'{command_name("write")}: stopped by SIGTERM{kept}', file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == '__main__':
    sys.exit(cli())
