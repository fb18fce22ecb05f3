"""Where the images of a split come from: class folders (read here), Kaggle's CLS-LOC tree or the
raw ILSVRC-2012 tars (read in place; ``ilsvrc``), as ``(path or tar reference, label)`` samples.

Class index convention (as torchvision's ``ImageFolder`` and the ILSVRC-2012 order): the position
of the wnid folder in the sorted list of the *train* split's folders. The val split is labelled with
the same map, so a val split that lacks a class, or lists its folders in another order, keeps the
train indices. Every layout gives the same classes, labels and order for the same images.
"""
import os
import re
import unicodedata
import warnings
from pathlib import Path

from . import ilsvrc
from .constants import IMAGE_EXTENSIONS
from .errors import InputError, MissingFileError, first_few
from .ilsvrc import KAGGLE_DIR, TRAIN_TAR, VAL_TAR

LAYOUTS = ('folders', 'kaggle', 'tars')
WNID_TAR = re.compile(r'n\d{8}\.tar')  # a class's tar inside ImageNet's train tar


def find_classes(train_dir) -> list:
    """Sorted wnid folder names of a train split: index i of the list is class i. Hidden folders
    (``.ipynb_checkpoints``, a name starting with '.') are not classes.

    Raises FileNotFoundError if ``train_dir`` is missing and ValueError if it has no class folder,
    holds an entry that cannot be read (a broken or looping symbolic link) or a file
    ``<wnid>.tar`` without a folder ``<wnid>`` (a class of ImageNet's train tar not extracted):
    were it a class folder, every class after it would take the index before its own. (Other
    files beside the class folders are named in :func:`list_samples`'s warning.) ValueError also
    for a class folder whose name the class list cannot hold (:func:`_check_class_names`); a
    warning for a single class folder, and for class folders whose names look alike
    (:func:`_warn_alike`).
    """
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise MissingFileError(f'{train_dir}: train split folder not found (expected '
                               f'<data-dir>/train/<wnid>/*.JPEG); set --data-dir')
    entries = list(os.scandir(train_dir))
    broken = sorted(e.name for e in entries if _kind(e) is None and not e.name.startswith('.'))
    if broken:
        raise InputError(f'{train_dir}: {first_few(broken)} cannot be read (a broken or '
                         f'looping symbolic link?); were it a class folder, the classes after it '
                         f'would take other indices: fix or remove it')
    classes, _ = class_folders(entries)
    packed = sorted(e.name for e in entries if WNID_TAR.fullmatch(e.name)
                    and e.name[:-4] not in classes and _kind(e) == 'file')
    if packed:  # a class not extracted yet (ImageNet's train tar holds one tar per class)
        raise InputError(f'{train_dir}: {first_few(packed)} '
                         f'not extracted: the class would be missing and the classes after it '
                         f'would take other indices; extract each into a folder of its name '
                         f'(mkdir {packed[0][:-4]} && tar xf {packed[0]} -C {packed[0][:-4]}) '
                         f'and remove the tar, or move it out of {train_dir}')
    if not classes:
        _raise_if_flat(train_dir, entries)
        raise InputError(f'{train_dir}: no class folders (expected {train_dir}/<wnid>/*.JPEG)')
    _check_class_names(train_dir, classes)
    _warn_alike(train_dir, classes)
    if len(classes) == 1:
        warnings.warn(f'{train_dir}: one class folder ({classes[0]}): a classifier of one class '
                      f'learns nothing (every prediction is right); put each class in a folder of '
                      f'its own', stacklevel=2)
    return classes


def _check_class_names(train_dir, classes: list) -> None:
    """ValueError naming the class folders of ``train_dir`` whose names the class list
    (``classes.tsv``: UTF-8, a line per class, tab-separated) cannot hold, before anything is
    written: names that are not valid UTF-8 (Python reads their bytes as surrogates: a zip made
    on Windows, say) and names with a tab or a line break."""
    def utf8(name):
        try:
            name.encode('utf-8')
        except UnicodeEncodeError:  # surrogates: bytes that are not UTF-8
            return False
        return True
    bad = [repr(name) if utf8(name) else repr(os.fsencode(name)) for name in classes
           if not utf8(name) or any(c in name for c in '\t\n\r')]
    if bad:
        raise InputError(f'{train_dir}: class folder name(s) {first_few(bad)} '
                         f'{"are" if len(bad) > 1 else "is"} not valid UTF-8 or hold a tab or '
                         f'line break, which the class list (classes.tsv: UTF-8, a line per '
                         f'class, tab-separated) cannot hold: rename the folder(s) (for names '
                         f'in another encoding: convmv -f ENCODING -t utf-8 --notest)')


def _warn_alike(train_dir, classes: list) -> None:
    """A warning naming class folders of ``train_dir`` whose names differ only in case, in spaces
    at their ends or in how Unicode writes their accents (NFC or NFD: they print alike): each is
    a class of its own."""
    alike = {}
    for name in classes:
        alike.setdefault(unicodedata.normalize('NFC', name).strip().casefold(), []).append(name)
    groups = [' and '.join(map(ascii, names)) for names in alike.values() if len(names) > 1]
    if groups:
        warnings.warn(f'{train_dir}: class folders {first_few(groups, sep="; ")} differ only in '
                      f'case, spaces at their '
                      f'ends or how Unicode writes their accents (NFC or NFD: they print alike): '
                      f'each is a class of its own; rename or merge them if they are one class',
                      stacklevel=3)


def _raise_if_flat(split_dir, entries: list) -> None:
    """ValueError when the images of ``split_dir`` (whose ``os.scandir`` entries are ``entries``)
    lie in it, not in class folders (ImageNet's val tar as extracted), saying how to give them
    labels."""
    loose = sorted(e.name for e in entries
                   if e.name.lower().endswith(IMAGE_EXTENSIONS) and _kind(e) == 'file')
    if loose:
        how = (f'ImageNet val as extracted from {VAL_TAR}: move them into wnid folders (the '
               f'valprep.sh of PyTorch\'s ImageNet example), or convert' if split_dir.name == 'val'
               else 'Move them into one folder per class, or convert ImageNet')
        inside = split_dir.resolve().parent  # <root>/ILSVRC/Data/CLS-LOC in Kaggle's tree
        kaggle = '--layout kaggle'
        if inside.parts[-len(KAGGLE_DIR.parts):] == KAGGLE_DIR.parts:
            kaggle = f'--data-dir {inside.parents[len(KAGGLE_DIR.parts) - 1]} {kaggle}'
        raise InputError(
            f'{split_dir}: {len(loose)} images lie in the folder itself ({first_few(loose, 3)}), '
            f'not in class folders <wnid>/, so they have no '
            f'labels. {how} from the raw tars (--layout tars) or from Kaggle\'s tree with '
            f'LOC_val_solution.csv ({kaggle})')


def list_samples(split_dir, classes: list) -> list:
    """All images of a split as ``(path, label)`` pairs, ordered by class index then file name.
    ``classes`` is the train split's class list (see :func:`find_classes`); a folder of
    ``split_dir`` that is not in it raises InputError naming the folder (its images would have
    no label), and so do two class folders that are the same folder (a symbolic link to another
    class: its images would carry two labels). The images of a class folder's subfolders are the
    class's too (as torchvision's ImageFolder), each folder and image listed once: a symbolic
    link to a folder listed already, or to a folder or image file of the split listed at its own
    place (in another class, it would carry that class's label too), is left out with a warning.
    A link to a folder that holds the class folders (the split's folder, one above it, the other
    split's: the val split's images would take this class) is left out with a warning too.
    Files whose extension is not in IMAGE_EXTENSIONS are left out with a warning naming them,
    and so are broken or looping symbolic links (to an image or a folder of them), other
    entries with an image name that are not files, and files in ``split_dir`` itself, outside
    the class folders; hidden files and folders (a name starting with '.') are left out
    silently."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise MissingFileError(f'{split_dir}: split folder not found')
    class_to_idx = {wnid: i for i, wnid in enumerate(classes)}
    entries = list(os.scandir(split_dir))
    folders, hidden = class_folders(entries)
    if hidden:
        warnings.warn(f'{split_dir}: hidden folder(s) {first_few(hidden)} left out: not '
                      f'classes', stacklevel=2)
    _raise_if_unknown(split_dir, folders, classes)
    listed = _check_distinct_folders(split_dir, folders)  # real paths: links to them are repeats
    own = frozenset(listed)  # the class folders' real paths: what is under them is listed there
    around = split_dir.absolute()  # the split's folder, those above it and the other split's:
    listed |= {os.path.realpath(p) for p in (around, *around.parents, around.parent / 'train',
                                             around.parent / 'val')}  # links to them: repeats
    broken = [e.name for e in entries if _kind(e) is None and not e.name.startswith('.')]
    samples, empty, other, repeated = [], [], [], []
    unreadable = [str(split_dir / name) for name in broken]  # a class folder's link, say
    for wnid in sorted(folders, key=class_to_idx.get):
        folder = split_dir / wnid
        files = _images_under(folder, listed, own, (unreadable, other, repeated))
        if not files:
            empty.append(str(folder))
        samples.extend((f, class_to_idx[wnid]) for f in files)
    if repeated:
        warnings.warn(f'{len(repeated)} symbolic link(s) to folders or images listed already or '
                      f'at their own place in the split (a class folder, a folder reached twice, '
                      f'an image of another class, a folder holding class folders), left out so '
                      f'that no image is listed twice or with another label: '
                      f'{first_few(repeated)}',
                      stacklevel=2)
    _warn_of_unreadable(unreadable)
    ilsvrc.warn_not_images(other)
    if samples and empty:
        warnings.warn(f'{len(empty)} class folder(s) with no images (extensions '
                      f'{", ".join(IMAGE_EXTENSIONS)}): {first_few(empty)}; their classes keep '
                      f'their index but '
                      f'have no samples in this split', stacklevel=2)
    loose = sorted(e.name for e in entries if not e.name.startswith('.') and _kind(e) == 'file')
    if samples and loose:  # (ImageNet-A's and -R's README.txt is no image: no advice then)
        images = any(name.lower().endswith(IMAGE_EXTENSIONS + ('.tar',)) for name in loose)
        warnings.warn(f'{split_dir}: {len(loose)} file(s) in the split folder itself, outside the '
                      f'class folders, left out (no class): {first_few(loose)}' + (
                          '; move images into their class folder (an interrupted valprep.sh?) '
                          'and extract tars into theirs' if images else ''), stacklevel=2)
    present = {*folders, *broken}  # broken: named above
    absent = [w for w in classes if w not in present]
    if samples and absent:
        warnings.warn(f'{split_dir}: {len(absent)} of the {len(classes)} train classes have no '
                      f'folder here ({first_few(absent)}); '
                      f'the other classes keep their train indices', stacklevel=2)
    if not samples:
        _raise_if_flat(split_dir, entries)
        raise InputError(f'{split_dir}: no images found (extensions {", ".join(IMAGE_EXTENSIONS)})')
    return samples


def images_in(folder) -> list:
    """The image files (IMAGE_EXTENSIONS) in ``folder`` and its subfolders, as paths (str), in the
    order :func:`list_samples` lists a class folder's: depth first, by name, each folder and
    image once (a symbolic link to one listed already is left out), hidden entries left out.
    Other files, broken or looping symbolic links, and links to images or folders listed already
    are left out with a warning naming them. Raises InputError naming a folder that cannot be
    listed."""
    real = os.path.realpath(folder)
    unreadable, other, repeated = [], [], []
    files = _images_under(Path(folder), {real}, frozenset({real}), (unreadable, other, repeated))
    ilsvrc.warn_not_images(other)
    _warn_of_unreadable(unreadable)
    if repeated:
        warnings.warn(f'{len(repeated)} symbolic link(s) to images or folders listed already left '
                      f'out: {first_few(repeated)}',
                      stacklevel=2)
    return files


def _warn_of_unreadable(unreadable: list) -> None:
    """The warning (to the caller of the caller) naming the ``unreadable`` entries of the
    folders listed, left out: neither readable files nor folders (broken or looping symbolic
    links)."""
    if unreadable:
        warnings.warn(('1 entry is neither a readable file nor a folder (a broken or looping '
                       'symbolic link: to a disk not mounted?), so the images it leads to are'
                       if len(unreadable) == 1 else
                       f'{len(unreadable)} entries are neither readable files nor folders (broken '
                       f'or looping symbolic links: to a disk not mounted?), so the images they '
                       f'lead to are') + f' left out: {first_few(unreadable)}', stacklevel=3)


def _raise_if_unknown(split_dir, folders: list, classes: list) -> None:
    """InputError naming the class ``folders`` of ``split_dir`` that are not among the train
    split's ``classes`` (their images would have no label), with those that differ from one only
    in case or in NFC/NFD (they print alike)."""
    known = set(classes)
    unknown = [f for f in folders if f not in known]
    if unknown:
        nfc = {unicodedata.normalize('NFC', wnid) for wnid in classes}
        alike = [f for f in unknown if unicodedata.normalize('NFC', f) in nfc]
        cased = [f'{f} and train/{c}' for f in unknown for c in classes if f.casefold() ==
                 c.casefold()]
        raise InputError(f'{split_dir}: class folder(s) {first_few(unknown)} are not in the '
                         f'train split, so their images have no class index; remove them or add '
                         f'the class to train/' + (
                             f' ({first_few(map(ascii, alike))} differ from a train folder '
                             f'only in how Unicode writes their accents (NFC or NFD; macOS '
                             f'writes NFD): rename one of them)' if alike else '') + (
                             f' ({first_few(cased)} differ in case only: rename one)'
                             if cased else ''))


def class_folders(entries: list) -> tuple:  # (write.py's --classes too)
    """``(names, hidden)``: the sorted names of the folders among a split folder's ``entries``
    (``os.scandir``'s), and of the hidden ones among them (a name starting with '.'), which are
    not in ``names``."""
    names = sorted(e.name for e in entries if _kind(e) == 'dir')
    return ([n for n in names if not n.startswith('.')],
            [n for n in names if n.startswith('.')])


def _listed_in_place(real: str, own: frozenset, is_dir: bool) -> bool:
    """Whether the folder or file whose real path is ``real`` is listed at its own place: under
    one of the class folders whose real paths are ``own``, with no hidden part, and, a file, with
    an image's extension."""
    parts = real.split(os.sep)
    for k in range(len(parts) - 1, 0, -1):
        if os.sep.join(parts[:k]) in own:
            return not any(p.startswith('.') for p in parts[k:]) and (
                is_dir or parts[-1].lower().endswith(IMAGE_EXTENSIONS))
    return False


def _images_under(folder: Path, listed: set, own: frozenset, left_out: tuple) -> list:
    """The image files in ``folder`` and its subfolders (depth first, by name), as paths.
    ``left_out``: the lists ``(unreadable, other, repeated)``. A subfolder whose real path is in
    ``listed`` (a link to a class folder, to a folder seen before or to one that holds the class
    folders (:func:`list_samples`), a loop), a symbolic link to a folder or image listed at its
    own place (:func:`_listed_in_place`; ``own``: the class folders' real paths), and one to a
    folder above a class folder go to ``repeated``; other subfolders are added to ``listed``.
    Non-image files go to ``other``; broken or looping symbolic links (whatever their name: one
    to a folder of images on a disk not mounted) and other entries with an image name that are
    not files to ``unreadable``; hidden entries nowhere. A folder that cannot be listed (no
    permission) is an InputError naming it, before any work: its images would be missing
    without a trace."""
    files, (unreadable, other, repeated) = [], left_out
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise InputError(f'{folder}: this folder cannot be listed ({e.strerror}), so its images '
                         f'would be left out; make it readable (chmod -R a+rX) or move it '
                         f'out, then run again') from e
    for entry in entries:
        if entry.name.startswith('.'):
            continue
        path, kind, link = folder / entry.name, _kind(entry), entry.is_symlink()
        real = os.path.realpath(path) if kind == 'dir' or link else None
        encloses = kind == 'dir' and link and any(  # a folder above a class folder
            o.startswith(real.rstrip(os.sep) + os.sep) for o in own)
        if kind == 'dir' and real in listed or encloses or kind and link and \
                _listed_in_place(real, own, kind == 'dir'):
            repeated.append(str(path))
        elif kind == 'dir':
            listed.add(real)
            files += _images_under(path, listed, own, left_out)
        elif kind is None:  # a broken or looping link (to an image, or a folder of them)
            if link or entry.name.lower().endswith(IMAGE_EXTENSIONS):
                unreadable.append(str(path))
        elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            other.append(path)
        else:
            files.append(str(path))
    return files


def _kind(entry):
    """'file', 'dir' or None (a broken or looping symbolic link: stat fails) of a folder entry."""
    try:
        return 'file' if entry.is_file() else 'dir' if entry.is_dir() else None
    except OSError:  # ELOOP: a symbolic link to itself
        return None


def _check_distinct_folders(split_dir, folders) -> set:
    """The real paths of the class ``folders`` of ``split_dir``; ValueError naming two that resolve
    to the same folder."""
    seen = {}
    for name in folders:
        real = os.path.realpath(split_dir / name)
        if real in seen:
            raise InputError(f'{split_dir}: class folders {seen[real]} and {name} are the same '
                             f'folder ({real}; a symbolic link?): their images would carry two '
                             f'labels; remove one of them')
        seen[real] = name
    return set(seen)


def detect_layout(root) -> str:
    """'folders' (root/train/<wnid>/), 'kaggle' (root/ILSVRC/Data/CLS-LOC/ + LOC_val_solution.csv)
    or 'tars' (root/ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar); FileNotFoundError if none
    (saying so when ``root`` does not exist, or is a split folder itself)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f'{root}: no such folder; set --data-dir to the folder that holds '
                               f'train/ and val/ (or the ImageNet tars)')
    if (root / 'train').is_dir() or (root / 'val').is_dir():
        return 'folders'
    if (root / KAGGLE_DIR).is_dir():
        return 'kaggle'
    if (root / TRAIN_TAR).is_file() or (root / VAL_TAR).is_file():
        return 'tars'
    if root.name in ('train', 'val') and (root.parent / 'train').is_dir():
        raise MissingFileError(f'{root}: this is a split folder; set --data-dir to the folder '
                               f'that holds it ({root.parent}) and --split {root.name}')
    raise MissingFileError(
        f'{root}: no known input layout: expected train/<wnid>/*.JPEG (class folders), '
        f'{KAGGLE_DIR}/ with LOC_val_solution.csv (Kaggle) or {TRAIN_TAR} / {VAL_TAR} '
        f'(raw ILSVRC-2012 tars); set --data-dir')


def load_split(root, split: str, layout: str = 'auto'):
    """``(classes, samples, names)`` of a split in any layout: ``classes`` the sorted train wnids
    (index = class), ``samples`` ``(path or tar reference, label)`` ordered by class then file
    name, ``names`` extra wnid -> name (from LOC_synset_mapping.txt). Every layout gives the same
    classes, labels and order for the same images."""
    root = Path(root)
    layout = detect_layout(root) if layout == 'auto' else layout
    if layout not in LAYOUTS:
        raise InputError(f'layout={layout!r}: expected auto or one of {", ".join(LAYOUTS)}')
    if layout == 'folders':
        if not (root / 'train').is_dir() and (root / TRAIN_TAR).is_file():
            raise MissingFileError(f'{root / "train"}: train split folder not found (the class '
                                   f'list comes from it), but {TRAIN_TAR} is here: --layout '
                                   f'tars reads the tars in place')
        classes = find_classes(root / 'train')
        if split == 'val' and not (root / 'val').is_dir():
            other = [name for name in ('valid', 'validation', 'test') if (root / name).is_dir()]
            raise MissingFileError(
                f'{root / "val"}: val split folder not found; ' +
                (f'rename {root / other[0]} to val, or ' if other else '') +
                'hold out part of train/ as the val split: --holdout 0.1 with --split val and '
                'the same --holdout with --split train')
        return classes, list_samples(root / split, classes), {}
    names = ilsvrc.synset_mapping_names(root)
    if layout == 'kaggle':
        train_dir = root / KAGGLE_DIR / 'train'
        classes = find_classes(train_dir)
        samples = (list_samples(train_dir, classes) if split == 'train' else
                   ilsvrc.kaggle_val_samples(root, classes))
        return classes, samples, names
    classes = ilsvrc.train_tar_classes(root, split)
    samples = (ilsvrc.tar_train_samples(root, classes) if split == 'train' else
               ilsvrc.tar_val_samples(root, classes))
    return classes, samples, names
