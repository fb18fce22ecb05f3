"""What a .beton holds, read from its header and metadata (no image is decoded): its sample count,
its classes (the class list beside it, else its labels) checked against its val split's, and the
largest shorter side of its images."""
import os
import warnings
from pathlib import Path

import numpy as np

from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.reader import Reader

from .classes import ClassListError, class_list_path, read_class_list, some_of
from .records import IMAGE_METADATA, LABEL_METADATA
from .holdout import check_holdouts
from .verify import check_beton


def num_samples(beton_path) -> int:
    """Number of samples stored in a .beton file (reads only its header)."""
    return int(Reader(str(beton_path)).num_samples)


def largest_shorter_side(beton_path) -> int:
    """The largest shorter side (px) of the images stored in a .beton (reads its metadata only):
    the converter's ``--max-res`` when any image reached it, as in ImageNet."""
    images = Reader(str(beton_path)).metadata[IMAGE_METADATA]
    return int(np.minimum(images['height'], images['width']).max())


def _no_class_list(path) -> str:
    """The warning for the .beton ``path`` without its class list beside it; it names the file
    an older converter wrote for it when that is there (named by ``Path.stem``, which another
    .beton's name could share: not read in its place)."""
    older = Path(path).with_name(Path(path).stem + '.classes.tsv')
    return (f'{path}: no class list beside it ({class_list_path(path).name}, written with it by '
            f'imagenet-ffcv-write): its classes are labels 0..N-1 alone, checked against no other '
            f'.beton or weights and named nowhere; copy it with the .beton' + (
                f' ({older.name}, there, is the name an older imagenet-ffcv-write gave it: '
                f'rename it if it is this .beton\'s)' if older.is_file() else ''))


def num_classes(beton_path, val_path=None, warn: bool = True) -> int:
    """Classes of a dataset: the length of the class list beside the .beton when there is one,
    else 1 + the largest stored label.

    With ``val_path``, the class lists beside the two files must be the same (both written from the
    same train split), and the val labels below the class count (a val .beton of more classes,
    written without class lists, would fail at the first validation, after an epoch or the run);
    otherwise ClassListError (a ValueError) names both files, since labels would not match. A
    validation split held out of train/ must be held out of the training split alike
    (``holdout.check_holdouts``: HoldoutMismatchError); the same file as both splits gives a
    warning, and so does a .beton without its class list (copied without it: a run keeps no
    classes.tsv, predict names no class, eval-only checks none), unless not ``warn`` (every rank
    checks, one warns).
    """
    classes = class_list_path(beton_path)
    same = val_path is not None and os.path.exists(val_path) and os.path.exists(beton_path) \
        and os.path.samefile(val_path, beton_path)
    if val_path is not None:
        check_holdouts(beton_path, val_path)
        if warn and same:
            warnings.warn(f'{val_path} is the training .beton too: top-1 is measured on the '
                          f'training images')
    if val_path is not None and classes.exists() and class_list_path(val_path).exists():
        trained, validated = read_class_list(classes), read_class_list(class_list_path(val_path))
        if validated != trained and some_of(validated, trained):
            raise ClassListError(f'{val_path} holds {len(validated)} of the {len(trained)} classes '
                                 f'of {beton_path} (a test set written with --classes): validate '
                                 f'on a .beton of all of them, and evaluate the weights on this '
                                 f'one alone, in an eval-only run')
        if validated != trained:
            raise ClassListError(f'{classes} and {class_list_path(val_path)} differ: the two '
                                 f'.beton files were written from different train splits, so '
                                 f'their class indices do not match; write both from the same '
                                 f'--data-dir')
    if classes.exists():
        count = len(read_class_list(classes))
    else:
        check_beton(beton_path)  # a missing file or a folder named as such, not by ffcv's Reader
        if warn:
            warnings.warn(_no_class_list(beton_path))
        count = _largest_label(beton_path) + 1
    if val_path is not None and os.path.isfile(val_path):
        check_beton(val_path)  # an empty or damaged file named, as its loader names it
        if warn and not same and not class_list_path(val_path).exists():  # (another data set's?)
            warnings.warn(_no_class_list(val_path))
        if (largest := _largest_label(val_path)) >= count:
            raise ClassListError(f'{val_path} holds labels up to {largest}, and {beton_path} has '
                                 f'{count} classes (0..{count - 1}): the val images of the others '
                                 f'could never be predicted right; write both from the same train '
                                 f'split (all of its classes)')
    return count


def _largest_label(beton_path) -> int:
    """The largest label stored in a .beton (its metadata's label field)."""
    return int(Reader(str(beton_path)).metadata[LABEL_METADATA].max())
