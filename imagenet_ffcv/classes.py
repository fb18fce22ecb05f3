"""Class lists: the ``index<TAB>wnid<TAB>name`` file written beside every .beton (and copied into
every run folder as ``classes.tsv``), and the names of the 1,000 ILSVRC-2012 wnids.

Class ``i`` is the ``i``-th wnid of the sorted train split (see ``sources``).
"""
import re
from pathlib import Path

from .errors import CheckpointError, ImagenetFfcvError, InputError, MissingFileError, first_few
from .files import beside_beton, beton_stem, write_text_atomic

WNID_NAMES_FILE = Path(__file__).with_name('imagenet_wnids.tsv')
ILSVRC_CLASSES = 'ilsvrc2012'  # the converter's --classes value for ILSVRC-2012's 1,000 classes


def wnid_names() -> dict:
    """wnid -> short human-readable name for the 1,000 ILSVRC-2012 classes."""
    with open(WNID_NAMES_FILE, encoding='utf-8') as f:
        return dict(line.rstrip('\n').split('\t', 1) for line in f if line.strip())


def ilsvrc_classes() -> list:
    """ILSVRC-2012's class list, ``[(wnid, name), ...]`` in sorted-wnid order: the order of the
    1,000 class folders of its train split (torchvision's class indices)."""
    return sorted(wnid_names().items())


def class_list_of(given: str) -> list:
    """``[(wnid, name), ...]`` of the converter's ``--classes``: ILSVRC-2012's classes for
    :data:`ILSVRC_CLASSES`, else those of the class list file ``given`` (:func:`read_class_names`:
    ClassListError for another format, MissingFileError when it is not there), of a run folder
    (its ``classes.tsv``) or of a .beton (the class list beside it)."""
    if given == ILSVRC_CLASSES:
        return ilsvrc_classes()
    path = (Path(given) / 'classes.tsv' if Path(given).is_dir() else
            class_list_path(given) if beton_stem(Path(given).name) != Path(given).name
            else Path(given))
    if not path.is_file() and path != Path(given):
        raise MissingFileError(f'--classes {given}: no class list there ({path})')
    if not path.is_file():
        raise MissingFileError(f'--classes {given}: no such file; give a class list (the '
                               f'.classes.tsv beside a .beton, a run folder\'s classes.tsv) or '
                               f'{ILSVRC_CLASSES} for ILSVRC-2012\'s 1,000 classes')
    return read_class_names(path)


def folders_by_class_list(folders: list, class_list: list, split_dir) -> list:
    """``[(folder, wnid), ...]``: the class ``folders`` of ``split_dir`` labelled by ``class_list``
    (``[(wnid, name), ...]``, index = class) rather than by their sorted names, in the list's
    order. A folder is named by a wnid of the list, or by an ILSVRC-2012 class index (``0`` ..
    ``999``, :func:`ilsvrc_classes`: ImageNet-V2's folders) whose wnid is in the list. Raises
    InputError naming the folders that are neither (their images would have no label), and two
    folders of one class."""
    index, ilsvrc = {wnid: i for i, (wnid, _) in enumerate(class_list)}, ilsvrc_classes()

    def position(name):
        if name not in index and re.fullmatch(r'0|[1-9][0-9]{0,2}', name):
            name = ilsvrc[int(name)][0]  # ImageNet-V2's folder of ILSVRC-2012's class int(name)
        return index.get(name)
    unknown = [f for f in folders if position(f) is None]
    if unknown:
        raise InputError(f'{split_dir}: {first_few(unknown)}: not a class of the list '
                         f'given (--classes): neither one of its wnids nor an ILSVRC-2012 class '
                         f'index (0 .. 999) of one; move such folders out, or give the class '
                         f'list they belong to')
    by_class = {}
    for folder in folders:
        by_class.setdefault(position(folder), []).append(folder)
    for i, same in sorted(by_class.items()):
        if len(same) > 1:
            raise InputError(f'{split_dir}: {" and ".join(same)} are both class {i} '
                             f'({class_list[i][0]}) of the list given (--classes): keep one')
    return [(by_class[i][0], class_list[i][0]) for i in sorted(by_class)]


def class_list_path(beton_path) -> Path:
    """Where the class list of a .beton lives: ``train_256.beton`` -> ``train_256.classes.tsv``
    (``files.beside_beton``)."""
    return beside_beton(beton_path, '.classes.tsv')


def write_class_list(path, classes: list, extra_names: dict = None) -> None:
    """Write ``index<TAB>wnid<TAB>name`` lines: names from imagenet_wnids.tsv, else from
    ``extra_names`` (e.g. LOC_synset_mapping.txt), else empty."""
    names = {**(extra_names or {}), **wnid_names()}
    lines = [f'{i}\t{wnid}\t{names.get(wnid, "")}\n' for i, wnid in enumerate(classes)]
    write_text_atomic(path, ''.join(lines))


class ClassListError(ImagenetFfcvError, ValueError):
    """A class list that is not ``index<TAB>wnid<TAB>name`` lines (the message names the file and
    the line), or two that should be the same and are not (naming both)."""


def read_class_list(path) -> list:
    """The wnids of a class list written by :func:`write_class_list`, index order. Raises
    ClassListError naming the file, the line and the expected format for any other file (e.g.
    ILSVRC's ``synset_words.txt``, ``wnid name`` lines, or not UTF-8 text), for an empty one,
    and for a wnid listed twice; OSError when it cannot be read."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = [(n, line.rstrip('\n')) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise ClassListError(f'{path}: not UTF-8 text (byte {e.start}), so not a class list: give '
                             'the .classes.tsv that imagenet-ffcv-write writes beside the .beton'
                             ) from None
    if not lines:
        raise ClassListError(f'{path}: holds no class (empty); give the .classes.tsv that '
                             'imagenet-ffcv-write writes beside the .beton')
    wnids, line_of = [], {}
    for i, (n, line) in enumerate(lines):
        row = line.split('\t')
        if len(row) < 2 or not (row[0].strip().isdigit() and int(row[0]) == i):
            raise ClassListError(
                f'{path}: line {n} is {line[:80]!r}, expected "{i}<TAB>wnid<TAB>name" (index, '
                'wnid, name: the .classes.tsv that imagenet-ffcv-write writes beside the .beton)')
        if row[1] in line_of:
            raise ClassListError(f'{path}: line {n} names {row[1]} again (line {line_of[row[1]]}):'
                                 ' two labels of one class; give each class once')
        line_of[row[1]] = n
        wnids.append(row[1])
    return wnids


def read_class_names(path) -> list:
    """``[(wnid, name), ...]`` in index order from a class list; a class without a name gets its
    ILSVRC-2012 name when its wnid is one (a list written by another tool, ``index<TAB>wnid``),
    else ''."""
    wnids, known = read_class_list(path), wnid_names()
    with open(path, encoding='utf-8') as f:
        names = [(line.rstrip('\n').split('\t') + [''])[2] for line in f if line.strip()]
    return [(wnid, name or known.get(wnid, '')) for wnid, name in zip(wnids, names)]


def in_ilsvrc_order(class_list) -> bool:
    """Whether the class list file ``class_list`` names ILSVRC-2012's 1,000 wnids in sorted order
    (:func:`ilsvrc_classes`: torchvision's class indices, which weights saved without a class list
    of 1,000 outputs are taken to have). False when there is no such file."""
    return (class_list is not None and Path(class_list).is_file()
            and read_class_list(class_list) == [wnid for wnid, _ in ilsvrc_classes()])


def some_of(wnids: list, classes: list) -> bool:
    """Whether ``wnids`` are some of ``classes`` (wnids), fewer and each once: a data set of some
    of a model's classes, such as ImageNet-A and -R (200 of ILSVRC-2012's), which is evaluated on
    those classes' logits alone (``models.ClassSubset``)."""
    return 0 < len(set(wnids)) == len(wnids) < len(classes) and set(wnids) <= set(classes)


def check_same_classes(path, classes, beton) -> None:
    """Raise CheckpointError naming both files when ``classes`` (``[(wnid, name), ...]`` saved
    with the weights at ``path``) and the class list beside ``beton`` (:func:`class_list_path`)
    name other wnids or another order: class ``i`` of the model would not be label ``i`` of the
    .beton. Nothing is checked when either list is missing (None, or no file); a .beton of some
    of the classes (:func:`some_of`) passes: their logits alone are evaluated."""
    beton_list = class_list_path(beton)
    if not classes or not beton_list.is_file():
        return
    theirs, ours = read_class_list(beton_list), [wnid for wnid, _ in classes]
    if theirs != ours and not some_of(theirs, ours):
        at = next((i for i, pair in enumerate(zip(ours, theirs)) if pair[0] != pair[1]),
                  min(len(ours), len(theirs)))
        raise CheckpointError(
            f'{path} was trained on other classes than {beton} has ({beton_list}): '
            f'{len(ours)} and {len(theirs)} classes, first difference at index {at}; its labels '
            'would not match the predictions. Evaluate on a .beton written from the same train '
            'split as the run (the class list in the run folder is classes.tsv)')
