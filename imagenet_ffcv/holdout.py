"""A validation split held out of train/ (``--holdout F``, for a data set without val/): which
images each split takes, and the record beside each .beton of the converter's --split and
--holdout, by which the trainer refuses a pair of .beton files that share images."""
import hashlib
import json
import math
from pathlib import Path

from . import ilsvrc
from .errors import ImagenetFfcvError
from .files import beside_beton, write_text_atomic


def held_out(samples: list, fraction: float, split: str) -> list:
    """The part of a train split's ``samples`` (``(path, label)``) that ``split`` takes when a share
    ``fraction`` (0 < fraction < 1) of each class is held out as a validation split: 'val' the
    held-out images, 'train' the others, in the order of ``samples``. Each class of n >= 2
    images holds out ``fraction * n`` of them rounded half up, at least one and at most n - 1 (a
    class of one image stays in train); which ones is fixed by a hash (SHA-1) of their file names
    (``ilsvrc.sample_file_name``), so the two splits never share an image, the same files are
    held out on every machine and in every layout, and adding images to a class moves few of the
    others."""
    by_class = {}
    for i, (path, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    chosen = set()
    for members in by_class.values():
        n = len(members)
        count = min(n - 1, max(1, math.floor(fraction * n + 0.5))) if n > 1 else 0
        ranked = sorted(members, key=lambda i: (hashlib.sha1(ilsvrc.sample_file_name(
            samples[i][0]).encode('utf-8', 'surrogateescape')).digest(), str(samples[i][0])))
        chosen.update(ranked[:count])
    return [s for i, s in enumerate(samples) if (i in chosen) == (split == 'val')]


class HoldoutMismatchError(ImagenetFfcvError, ValueError):
    """A validation .beton written from train/ (a --holdout split with another --holdout than the
    training .beton's, or --split train): the two share images."""


def holdout_record_path(beton_path) -> Path:
    """Where the converter records which share of train/ a .beton holds out
    (:func:`write_holdout_record`): ``val_256.beton`` -> ``val_256.holdout.json``
    (``files.beside_beton``)."""
    return beside_beton(beton_path, '.holdout.json')


def write_holdout_record(beton_path, split: str, fraction: float) -> None:
    """Write ``{"split": split, "holdout": fraction}`` beside a .beton: the converter's --split and
    --holdout (0: the split's own images, no share held out)."""
    write_text_atomic(holdout_record_path(beton_path),
                      json.dumps({'split': split, 'holdout': fraction}) + '\n')


def holdout_record(beton_path):
    """``(split, fraction)``: the converter's --split and --holdout recorded beside a .beton
    (:func:`write_holdout_record`), or None (written by an older version or another tool, or
    unreadable)."""
    try:
        record = json.loads(holdout_record_path(beton_path).read_text())
        return record['split'], float(record['holdout'])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_holdouts(train_beton, val_beton) -> None:
    """HoldoutMismatchError naming the files when the converter's records beside them
    (:func:`write_holdout_record`) show that ``val_beton`` holds training images: it was written
    with --split train, or it holds out a share of train/ (--holdout F) and ``train_beton`` was
    written with a smaller --holdout (0: every image of train/), which inflates top-1; a larger
    one leaves some images of train/ in neither split, and is refused too (give both the same F).
    A ``val_beton`` recorded as --split train is refused whatever ``train_beton``'s record; else
    betons without a record (written by an older version) or with an unreadable one pass."""
    train, val = holdout_record(train_beton), holdout_record(val_beton)
    if val is not None and val[0] != 'val':  # training images, however train_beton was written
        raise HoldoutMismatchError(f'{val_beton} was written with --split {val[0]}: it holds '
                                   f'training images; the validation .beton is written with '
                                   f'--split val')
    if train is None or val is None:
        return
    (train_split, train_f), (_, val_f) = train, val
    if train_split != 'train':
        raise HoldoutMismatchError(f'{train_beton} was written with --split {train_split}: the '
                                   f'training .beton takes --split train, the validation one '
                                   f'--split val')
    if val_f and train_f != val_f:
        effect = ('the two share images and top-1 would be measured on training images'
                  if train_f < val_f else 'some images of train/ are in neither split')
        raise HoldoutMismatchError(
            f'{val_beton} holds out {val_f} of each class of train/ (--holdout {val_f}), but '
            f'{train_beton} was written with {f"--holdout {train_f}" if train_f else "none"}, '
            f'so {effect}: write {train_beton} again with --split train --holdout {val_f} '
            f'--overwrite')
