"""Where the images of a split come from: class folders, Kaggle's CLS-LOC tree or the raw
ILSVRC-2012 tars (read in place), as ``(path or tar reference, label)`` samples.

Class index convention (as torchvision's ``ImageFolder`` and the ILSVRC-2012 order): the position
of the wnid folder in the sorted list of the *train* split's folders. The val split is labelled with
the same map, so a val split that lacks a class, or lists its folders in another order, keeps the
train indices. Every layout gives the same classes, labels and order for the same images.
"""
import csv
import io
import os
import re
import tarfile
import warnings
from pathlib import Path

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
LAYOUTS = ('folders', 'kaggle', 'tars')
TRAIN_TAR, VAL_TAR = 'ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'
KAGGLE_DIR = Path('ILSVRC') / 'Data' / 'CLS-LOC'
# A file inside an uncompressed tar: '<tar path>::<member name>@<byte offset>+<size>'.
TAR_REF_SEP = '::'
TAR_REF = re.compile(rf'(?P<tar>.*\.tar){re.escape(TAR_REF_SEP)}(?P<member>.+)'
                     r'@(?P<offset>\d+)\+(?P<size>\d+)', re.DOTALL)
DEVKIT_TAR = 'ILSVRC2012_devkit_t12.tar.gz'


def find_classes(train_dir) -> list:
    """Sorted wnid folder names of a train split: index i of the list is class i. Hidden folders
    (``.ipynb_checkpoints``, a name starting with '.') are not classes.

    Raises FileNotFoundError if ``train_dir`` is missing and ValueError if it has no class folder
    or holds an entry that cannot be read (a broken or looping symbolic link: were it a class
    folder, every class after it would take the index before its own).
    """
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise FileNotFoundError(f'{train_dir}: train split folder not found (expected '
                                f'<data-dir>/train/<wnid>/*.JPEG); set --data-dir')
    broken = sorted(e.name for e in os.scandir(train_dir)
                    if _kind(e) is None and not e.name.startswith('.'))
    if broken:
        raise ValueError(f'{train_dir}: {", ".join(broken[:5])} cannot be read (a broken or '
                         f'looping symbolic link?); were it a class folder, the classes after it '
                         f'would take other indices: fix or remove it')
    classes, _ = _class_folders(train_dir)
    if not classes:
        _raise_if_flat(train_dir)
        raise ValueError(f'{train_dir}: no class folders (expected {train_dir}/<wnid>/*.JPEG)')
    return classes


def _raise_if_flat(split_dir) -> None:
    """ValueError when the images of ``split_dir`` lie in it, not in class folders (ImageNet's
    val tar as extracted), saying how to give them labels."""
    loose = sorted(e.name for e in os.scandir(split_dir)
                   if e.name.lower().endswith(IMAGE_EXTENSIONS) and _kind(e) == 'file')
    if loose:
        how = (f'ImageNet val as extracted from {VAL_TAR}: move them into wnid folders (the '
               f'valprep.sh of PyTorch\'s ImageNet example), or convert' if split_dir.name == 'val'
               else 'Move them into one folder per class, or convert ImageNet')
        raise ValueError(
            f'{split_dir}: {len(loose)} images lie in the folder itself ({", ".join(loose[:3])}'
            f'{" ..." if len(loose) > 3 else ""}), not in class folders <wnid>/, so they have no '
            f'labels. {how} from the raw tars (--layout tars) or from Kaggle\'s tree with '
            f'LOC_val_solution.csv (--layout kaggle)')


def list_samples(split_dir, classes: list) -> list:
    """All images of a split as ``(path, label)`` pairs, ordered by class index then file name.

    ``classes`` is the train split's class list (see :func:`find_classes`); a folder of
    ``split_dir`` that is not in it raises ValueError naming the folder, since its images would
    have no label. The images of a class folder's subfolders are the class's too (as
    torchvision's ImageFolder), each folder listed once (a symbolic link to a folder listed
    already is left out with a warning). Files whose extension is not in IMAGE_EXTENSIONS are
    left out with a warning naming them, and so are entries with an image name that are not
    readable files (broken or looping symbolic links); hidden files and folders (a name
    starting with '.') are left out silently. Two class folders that are the same folder (a
    symbolic link to another class) raise ValueError naming both: their images would carry two
    labels.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f'{split_dir}: split folder not found')
    class_to_idx = {wnid: i for i, wnid in enumerate(classes)}
    folders, hidden = _class_folders(split_dir)
    if hidden:
        warnings.warn(f'{split_dir}: hidden folder(s) {", ".join(hidden[:5])} left out: not '
                      f'classes', stacklevel=2)
    unknown = [f for f in folders if f not in class_to_idx]
    if unknown:
        raise ValueError(f'{split_dir}: class folder(s) {", ".join(unknown[:5])} are not in the '
                         f'train split, so their images have no class index; remove them or add '
                         f'the class to train/')
    _check_distinct_folders(split_dir, folders)
    samples, empty, unreadable, other, repeated = [], [], [], [], []
    listed = {os.path.realpath(split_dir / wnid) for wnid in folders}
    for wnid in sorted(folders, key=class_to_idx.get):
        folder = split_dir / wnid
        files = _images_under(folder, listed, unreadable, other, repeated)
        if not files:
            empty.append(str(folder))
        samples.extend((f, class_to_idx[wnid]) for f in files)
    if repeated:
        warnings.warn(f'{len(repeated)} symbolic link(s) to folders listed already (a class '
                      f'folder, or a folder reached twice), left out so that no image is listed '
                      f'twice: {", ".join(repeated[:5])}{" ..." if len(repeated) > 5 else ""}',
                      stacklevel=2)
    if unreadable:
        warnings.warn(f'{len(unreadable)} entries with an image name are not readable files '
                      f'(broken or looping symbolic links), left out: {", ".join(unreadable[:5])}'
                      f'{" ..." if len(unreadable) > 5 else ""}', stacklevel=2)
    if other:
        warnings.warn(f'{len(other)} files whose extension is not one of '
                      f'{", ".join(IMAGE_EXTENSIONS)} left out: {", ".join(map(str, other[:5]))}'
                      f'{" ..." if len(other) > 5 else ""}; convert them to one of those to '
                      f'keep them', stacklevel=2)
    if samples and empty:
        warnings.warn(f'{len(empty)} class folder(s) with no images (extensions '
                      f'{", ".join(IMAGE_EXTENSIONS)}): {", ".join(empty[:5])}'
                      f'{" ..." if len(empty) > 5 else ""}; their classes keep their index but '
                      f'have no samples in this split', stacklevel=2)
    absent = [w for w in classes if w not in set(folders)]
    if samples and absent:
        warnings.warn(f'{split_dir}: {len(absent)} of the {len(classes)} train classes have no '
                      f'folder here ({", ".join(absent[:5])}{" ..." if len(absent) > 5 else ""}); '
                      f'the other classes keep their train indices', stacklevel=2)
    if not samples:
        _raise_if_flat(split_dir)
        raise ValueError(f'{split_dir}: no images found (extensions {", ".join(IMAGE_EXTENSIONS)})')
    return samples


def _class_folders(split_dir) -> tuple:
    """``(names, hidden)``: the sorted names of the folders in ``split_dir``, and of the hidden
    ones among them (a name starting with '.'), which are not in ``names``."""
    names = sorted(e.name for e in os.scandir(split_dir) if _kind(e) == 'dir')
    return ([n for n in names if not n.startswith('.')],
            [n for n in names if n.startswith('.')])


def _images_under(folder: Path, listed: set, unreadable: list, other: list,
                  repeated: list) -> list:
    """The image files in ``folder`` and its subfolders (depth first, by name), as paths. A
    subfolder whose real path is in ``listed`` (a link to a class folder or to a folder seen
    before, a loop) goes to ``repeated``; the others are added to it. Non-image files go to
    ``other``, image names that are not readable files to ``unreadable``; hidden entries
    nowhere."""
    files = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith('.'):
            continue
        path, kind = folder / entry.name, _kind(entry)
        if kind == 'dir':
            real = os.path.realpath(path)
            if real in listed:
                repeated.append(str(path))
                continue
            listed.add(real)
            files += _images_under(path, listed, unreadable, other, repeated)
        elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            if kind == 'file':
                other.append(path)
        elif kind == 'file':
            files.append(str(path))
        else:
            unreadable.append(str(path))
    return files


def _kind(entry):
    """'file', 'dir' or None (a broken or looping symbolic link: stat fails) of a folder entry."""
    try:
        return 'file' if entry.is_file() else 'dir' if entry.is_dir() else None
    except OSError:  # ELOOP: a symbolic link to itself
        return None


def _check_distinct_folders(split_dir, folders) -> None:
    """ValueError naming two class folders of ``split_dir`` that resolve to the same folder."""
    seen = {}
    for name in folders:
        real = os.path.realpath(split_dir / name)
        if real in seen:
            raise ValueError(f'{split_dir}: class folders {seen[real]} and {name} are the same '
                             f'folder ({real}; a symbolic link?): their images would carry two '
                             f'labels; remove one of them')
        seen[real] = name


def detect_layout(root) -> str:
    """'folders' (root/train/<wnid>/), 'kaggle' (root/ILSVRC/Data/CLS-LOC/ + LOC_val_solution.csv)
    or 'tars' (root/ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar); FileNotFoundError if none
    (saying so when ``root`` does not exist, or is a split folder itself)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'{root}: no such folder; set --data-dir to the folder that holds '
                                f'train/ and val/ (or the ImageNet tars)')
    if (root / 'train').is_dir() or (root / 'val').is_dir():
        return 'folders'
    if (root / KAGGLE_DIR).is_dir():
        return 'kaggle'
    if (root / TRAIN_TAR).is_file() or (root / VAL_TAR).is_file():
        return 'tars'
    if root.name in ('train', 'val') and (root.parent / 'train').is_dir():
        raise FileNotFoundError(f'{root}: this is a split folder; set --data-dir to the folder '
                                f'that holds it ({root.parent}) and --split {root.name}')
    raise FileNotFoundError(
        f'{root}: no known input layout: expected train/<wnid>/*.JPEG (class folders), '
        f'{KAGGLE_DIR}/ with LOC_val_solution.csv (Kaggle) or {TRAIN_TAR} / {VAL_TAR} '
        f'(raw ILSVRC-2012 tars); set --data-dir')


def _val_solution(path) -> dict:
    """ImageId -> wnid from Kaggle's LOC_val_solution.csv (first token of PredictionString)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: val labels not found: put Kaggle\'s LOC_val_solution.csv '
                                f'(ImageId,PredictionString) or the devkit {DEVKIT_TAR} there')
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ['ImageId', 'PredictionString']:
        raise ValueError(f'{path}: expected the header ImageId,PredictionString')
    return {r[0]: r[1].split()[0] for r in rows[1:] if len(r) >= 2 and r[1].split()}


def _devkit_val_solution(path) -> dict:
    """ImageId -> wnid from the ILSVRC-2012 devkit archive, read in place: ``data/meta.mat`` maps
    ILSVRC2012_ID -> WNID for the leaf synsets (``num_children == 0``: the 1,000 classes) and
    ``data/ILSVRC2012_validation_ground_truth.txt`` gives one ILSVRC2012_ID a line, line i for
    ``ILSVRC2012_val_{i:08d}`` (i from 1). As torchvision's ``datasets.imagenet`` parses it."""
    import scipy.io  # heavy, and only this layout needs it

    with tarfile.open(path) as tf:
        def read(suffix):
            member = next((m for m in tf.getmembers() if m.name.endswith(suffix)), None)
            if member is None:
                raise ValueError(f'{path}: no {suffix} inside: not the ILSVRC-2012 devkit')
            return tf.extractfile(member).read()
        synsets = scipy.io.loadmat(io.BytesIO(read('data/meta.mat')), squeeze_me=True)['synsets']
        truth = read('data/ILSVRC2012_validation_ground_truth.txt').decode().split()
    id_to_wnid = {int(s['ILSVRC2012_ID']): str(s['WNID']) for s in synsets
                  if int(s['num_children']) == 0}
    try:
        return {f'ILSVRC2012_val_{i:08d}': id_to_wnid[int(t)] for i, t in enumerate(truth, 1)}
    except KeyError as e:
        raise ValueError(f'{path}: ground truth names ILSVRC2012_ID {e} not in meta.mat') from None


def _val_labels(root) -> dict:
    """ImageId -> wnid for flat val images: LOC_val_solution.csv (Kaggle) when present, else the
    devkit archive ILSVRC2012_devkit_t12.tar.gz. FileNotFoundError naming both when neither is."""
    root = Path(root)
    if (root / 'LOC_val_solution.csv').is_file() or not (root / DEVKIT_TAR).is_file():
        return _val_solution(root / 'LOC_val_solution.csv')
    return _devkit_val_solution(root / DEVKIT_TAR)


def synset_mapping_names(root) -> dict:
    """wnid -> first name from Kaggle's LOC_synset_mapping.txt ('n01440764 tench, Tinca tinca'),
    {} when the file is absent."""
    path = Path(root) / 'LOC_synset_mapping.txt'
    if not path.is_file():
        return {}
    names = {}
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, _, rest = line.partition(' ')
            names[wnid] = rest.split(',')[0].strip()
    return names


def _flat_val_samples(files: list, solution: dict, classes: list, where) -> list:
    """(ref, label) for flat val files named <ImageId>.<ext>, labelled by ``solution``, ordered
    by class index then file name as :func:`list_samples`."""
    class_to_idx = {wnid: i for i, wnid in enumerate(classes)}
    samples, unlabelled = [], []
    for name, ref in files:
        image_id = name.rsplit('/', 1)[-1].rsplit('.', 1)[0]
        wnid = solution.get(image_id)
        if wnid is None:
            unlabelled.append(name)
            continue
        if wnid not in class_to_idx:
            raise ValueError(f'{where}: {name} is labelled {wnid}, a class not in the train split')
        samples.append((class_to_idx[wnid], name.rsplit('/', 1)[-1], ref))
    if unlabelled:
        raise ValueError(f'{where}: {len(unlabelled)} val image(s) have no label in '
                         f'LOC_val_solution.csv: {", ".join(unlabelled[:5])}')
    if not samples:
        raise ValueError(f'{where}: no val images found')
    return [(ref, label) for label, _, ref in sorted(samples)]


def _tar_members(tar_path, fileobj=None, end: int = None):
    """(name, data offset, size) of the regular files of an uncompressed tar: the file
    ``tar_path``, or the one in ``fileobj`` from its current position to byte ``end`` (the offsets
    absolute in that file). ValueError naming the file for one that is not a complete tar (a
    download cut short): a header or a member's data that does not read (tarfile checks the
    last byte of each member's data), or no room before ``end`` for the two zero blocks every
    tar ends with (one cut at a member's end reads as complete). A sparse member's size is its
    expanded size, so members are not checked against ``end``."""
    where = tar_path if fileobj is None else f'{fileobj.name} (the tar at byte {fileobj.tell()})'
    problem = None
    try:
        with tarfile.open(tar_path if fileobj is None else None, mode='r:',
                          fileobj=fileobj) as tf:
            members = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
            last = tf.offset  # where its end-of-archive blocks start
        end = os.path.getsize(tar_path) if end is None else end
        if last + 2 * tarfile.BLOCKSIZE > end:
            problem = f'it ends at byte {end}, before its end-of-archive blocks'
    except tarfile.TarError as e:
        problem = str(e)
    if problem:
        raise ValueError(f'{where}: not a complete tar ({problem}); a download cut short? '
                         'Compare its size and checksum with those ImageNet gives, and download '
                         'it again')
    return members


def _tar_ref(tar_path, name, offset, size) -> str:
    return f'{tar_path}{TAR_REF_SEP}{name}@{offset}+{size}'


def _train_tar_classes(tar_path) -> list:
    wnids = sorted(Path(n).name[:-4] for n, _, _ in _tar_members(tar_path) if n.endswith('.tar'))
    if not wnids:
        raise ValueError(f'{tar_path}: no per-class <wnid>.tar inside')
    return wnids


def load_split(root, split: str, layout: str = 'auto'):
    """``(classes, samples, names)`` of a split in any layout: ``classes`` the sorted train wnids
    (index = class), ``samples`` ``(path or tar reference, label)`` ordered by class then file
    name, ``names`` extra wnid -> name (from LOC_synset_mapping.txt). Every layout gives the same
    classes, labels and order for the same images."""
    root = Path(root)
    layout = detect_layout(root) if layout == 'auto' else layout
    if layout not in LAYOUTS:
        raise ValueError(f'layout={layout!r}: expected auto or one of {", ".join(LAYOUTS)}')
    if layout == 'folders':
        classes = find_classes(root / 'train')
        return classes, list_samples(root / split, classes), {}
    names = synset_mapping_names(root)
    if layout == 'kaggle':
        base = root / KAGGLE_DIR
        classes = find_classes(base / 'train')
        if split == 'train':
            return classes, list_samples(base / 'train', classes), names
        val_dir = base / 'val'
        if not val_dir.is_dir():
            raise FileNotFoundError(f'{val_dir}: split folder not found')
        files = [(e.name, str(val_dir / e.name)) for e in os.scandir(val_dir)
                 if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        return classes, _flat_val_samples(files, _val_labels(root),
                                          classes, val_dir), names
    # raw tars, read in place: the outer train tar holds one uncompressed <wnid>.tar per class
    train_tar = root / TRAIN_TAR
    if not train_tar.is_file():
        raise FileNotFoundError(f'{train_tar}: needed for the class list (class i = i-th sorted '
                                f'wnid of the train split)')
    classes = _train_tar_classes(train_tar)
    if split == 'train':
        samples = []
        with open(train_tar, 'rb') as f:
            for inner, offset, size in sorted(_tar_members(train_tar)):
                if not inner.endswith('.tar'):
                    continue
                label = classes.index(Path(inner).name[:-4])
                f.seek(offset)  # tarfile reads headers only, offsets absolute in the file
                files = sorted((Path(n).name, o, s)
                               for n, o, s in _tar_members(None, f, end=offset + size)
                               if n.lower().endswith(IMAGE_EXTENSIONS))
                samples.extend((_tar_ref(train_tar, n, o, s), label) for n, o, s in files)
        if not samples:
            raise ValueError(f'{train_tar}: no images found')
        return classes, samples, names
    val_tar = root / VAL_TAR
    if not val_tar.is_file():
        raise FileNotFoundError(f'{val_tar}: val split archive not found')
    files = [(n, _tar_ref(val_tar, n, o, s)) for n, o, s in _tar_members(val_tar)
             if n.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, _flat_val_samples(files, _val_labels(root),
                                      classes, val_tar), names


def open_image_source(path):
    """A file object for a sample: the file itself, or the bytes of a tar member reference
    (``_tar_ref``'s form: a ``.tar`` path, ``::``, the member, ``@offset+size``; a folder whose
    name holds ``::`` is no tar)."""
    path = str(path)
    ref = TAR_REF.fullmatch(path)
    if ref:
        with open(ref['tar'], 'rb') as f:
            f.seek(int(ref['offset']))
            return io.BytesIO(f.read(int(ref['size'])))
    return open(path, 'rb')
