"""The ILSVRC-2012 distributions that are not class folders, as ``(path or tar reference, label)``
samples: Kaggle's tree (ILSVRC/Data/CLS-LOC/, its val images flat, labelled by
LOC_val_solution.csv) and the raw tars, read in place (ILSVRC2012_img_train.tar of per-class
<wnid>.tar, ILSVRC2012_img_val.tar flat), their val labels from LOC_val_solution.csv or the devkit
archive. ``sources`` picks the layout; class i is the i-th sorted wnid of the train split.
"""
import csv
import io
import os
import re
import tarfile
import warnings
import zlib
from pathlib import Path

from .classes import ilsvrc_classes
from .constants import IMAGE_EXTENSIONS
from .errors import InputError, MissingFileError, first_few

TRAIN_TAR, VAL_TAR = 'ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'
KAGGLE_DIR = Path('ILSVRC') / 'Data' / 'CLS-LOC'
KAGGLE_LABELS = 'LOC_val_solution.csv'
DEVKIT_TAR = 'ILSVRC2012_devkit_t12.tar.gz'
# A file inside an uncompressed tar: '<tar path>::<member name>@<byte offset>+<size>'.
TAR_REF_SEP = '::'
TAR_REF = re.compile(rf'(?P<tar>.*\.tar){re.escape(TAR_REF_SEP)}(?P<member>.+)'
                     r'@(?P<offset>\d+)\+(?P<size>\d+)', re.DOTALL)


def val_solution(path) -> dict:
    """ImageId -> wnid from Kaggle's LOC_val_solution.csv (first token of PredictionString)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f'{path}: val labels not found: put Kaggle\'s {KAGGLE_LABELS} '
                               f'(ImageId,PredictionString) or the devkit {DEVKIT_TAR} there')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: Excel's byte order mark
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise InputError(f'{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 CSV, as '
                         'Kaggle gives it') from None
    if not rows or rows[0][:2] != ['ImageId', 'PredictionString']:
        raise InputError(f'{path}: expected the header ImageId,PredictionString')
    return {r[0]: r[1].split()[0] for r in rows[1:] if len(r) >= 2 and r[1].split()}


def devkit_val_solution(path) -> dict:
    """ImageId -> wnid from the ILSVRC-2012 devkit archive, read in place: ``data/meta.mat`` maps
    ILSVRC2012_ID -> WNID for the leaf synsets (``num_children == 0``: the 1,000 classes) and
    ``data/ILSVRC2012_validation_ground_truth.txt`` gives one ILSVRC2012_ID a line, line i for
    ``ILSVRC2012_val_{i:08d}`` (i from 1). As torchvision's ``datasets.imagenet`` parses it.
    ValueError naming the file when it does not read as the devkit (cut short, another file)."""
    import scipy.io  # heavy, and only this layout needs it

    def read(tf, suffix):
        member = next((m for m in tf.getmembers() if m.name.endswith(suffix)), None)
        if member is None:
            raise InputError(f'{path}: no {suffix} inside: not the ILSVRC-2012 devkit')
        return tf.extractfile(member).read()

    try:
        with tarfile.open(path) as tf:
            meta = read(tf, 'data/meta.mat')
            truth = read(tf, 'data/ILSVRC2012_validation_ground_truth.txt')
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # cut short, an HTML page
        raise InputError(f'{path}: does not read as the ILSVRC-2012 devkit archive '
                         f'({" ".join(str(e).split())}); a download cut short? Download it '
                         f'again') from None
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)['synsets']
        id_to_wnid = {int(s['ILSVRC2012_ID']): str(s['WNID']) for s in synsets
                      if int(s['num_children']) == 0}
        ids = [int(t) for t in truth.decode().split()]
    except Exception as e:  # noqa: BLE001 - scipy raises many kinds for a damaged .mat
        raise InputError(f'{path}: its data/meta.mat or ground truth does not read ({e!r}); '
                         f'download it again') from None
    try:
        return {f'ILSVRC2012_val_{i:08d}': id_to_wnid[t] for i, t in enumerate(ids, 1)}
    except KeyError as e:
        raise InputError(f'{path}: ground truth names ILSVRC2012_ID {e} not in meta.mat') from None


def val_labels(root) -> tuple:
    """``(ImageId -> wnid, the file it came from)`` for flat val images: LOC_val_solution.csv
    (Kaggle) when present, else the devkit archive ILSVRC2012_devkit_t12.tar.gz.
    FileNotFoundError naming both when neither is."""
    root = Path(root)
    if (root / KAGGLE_LABELS).is_file() or not (root / DEVKIT_TAR).is_file():
        return val_solution(root / KAGGLE_LABELS), root / KAGGLE_LABELS
    return devkit_val_solution(root / DEVKIT_TAR), root / DEVKIT_TAR


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


def warn_not_images(other: list, stacklevel: int = 3) -> None:
    """Warn that the files ``other`` (paths or names), whose extension is not one of
    IMAGE_EXTENSIONS, are left out, naming the first five."""
    if other:
        files = '1 file' if len(other) == 1 else f'{len(other)} files'
        warnings.warn(f'{files} whose extension is not one of {", ".join(IMAGE_EXTENSIONS)} '
                      f'left out: {first_few(other)}; convert them to one of those to '
                      f'keep them', stacklevel=stacklevel)


def flat_val_samples(files: list, root, classes: list, where) -> list:
    """(ref, label) for the flat val files ``files`` (``(name, ref)``, named <ImageId>.<ext>),
    labelled by :func:`val_labels` of ``root``, ordered by class index then file name as
    ``sources.list_samples``. Hidden files (a name starting with '.', such as macOS's ``._``
    copies) are left out; so are files whose extension is not an image's, with a warning naming
    them (:func:`warn_not_images`). ValueError for an image without a label or labelled with a
    class that the train split lacks, naming the label file; a warning when images the label
    file lists in the train split's classes are not there (an archive unpacked in part)."""
    class_to_idx = {wnid: i for i, wnid in enumerate(classes)}
    files = [(name, ref) for name, ref in files if not name.rsplit('/', 1)[-1].startswith('.')]
    present = {name.rsplit('/', 1)[-1].rsplit('.', 1)[0] for name, _ in files}
    warn_not_images([name for name, _ in files if not name.lower().endswith(IMAGE_EXTENSIONS)])
    files = [(name, ref) for name, ref in files if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise InputError(f'{where}: no val images found')
    solution, labels = val_labels(root)
    samples, unlabelled = [], []
    for name, ref in files:
        image_id = name.rsplit('/', 1)[-1].rsplit('.', 1)[0]
        wnid = solution.get(image_id)
        if wnid is None:
            unlabelled.append(name)
            continue
        if wnid not in class_to_idx:
            raise InputError(f'{where}: {name} is labelled {wnid} in {labels}, a class not in the '
                             f'train split')
        samples.append((class_to_idx[wnid], name.rsplit('/', 1)[-1], ref))
    if unlabelled:
        raise InputError(f'{where}: {len(unlabelled)} val image(s) have no label in {labels}: '
                         f'{first_few(unlabelled)}')
    listed = {image_id for image_id, wnid in solution.items() if wnid in class_to_idx}
    absent = sorted(listed - present)
    if absent:  # of the train split's classes: a subset of ImageNet's classes is no gap
        warnings.warn(f'{where}: {len(absent)} of the {len(listed)} images {labels.name} labels '
                      f'are not there ({first_few(absent, 3)})'
                      f': the val split is incomplete (an archive unpacked in part?)',
                      stacklevel=2)
    return [(ref, label) for label, _, ref in sorted(samples)]


def kaggle_val_samples(root, classes: list) -> list:
    """The val samples of Kaggle's tree under ``root``: the flat images of CLS-LOC/val. A val
    folder already sorted into class folders is the class-folder layout: FileNotFoundError or
    ValueError saying which --data-dir reads it."""
    val_dir = Path(root) / KAGGLE_DIR / 'val'
    if not val_dir.is_dir():
        raise MissingFileError(f'{val_dir}: split folder not found')
    entries = list(os.scandir(val_dir))
    files = [(e.name, str(val_dir / e.name)) for e in entries if e.is_file()]
    images = any(n.lower().endswith(IMAGE_EXTENSIONS) for n, _ in files)
    if not images and any(e.is_dir() and not e.name.startswith('.') for e in entries):
        raise InputError(f'{val_dir}: holds class folders, not the flat val images: set '
                         f'--data-dir {Path(root) / KAGGLE_DIR} (read as class folders)')
    return flat_val_samples(files, root, classes, val_dir)


def tar_members(tar_path, fileobj=None, end: int = None):
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
        raise InputError(f'{where}: not a complete tar ({problem}); a download cut short? '
                         'Compare its size and checksum with those ImageNet gives, and download '
                         'it again')
    return members


def tar_ref(tar_path, name, offset, size) -> str:
    """The reference of a tar member that :func:`open_image_source` opens."""
    return f'{tar_path}{TAR_REF_SEP}{name}@{offset}+{size}'


def sample_file_name(path) -> str:
    """The file name of a sample: a tar member's own (``n01440764_10026.JPEG`` of
    :func:`tar_ref`'s reference), else the file's: the same for the same image in every layout."""
    ref = TAR_REF.fullmatch(str(path))
    return os.path.basename(ref['member'] if ref else str(path))


def train_tar_classes(root, split: str = 'train') -> list:
    """The sorted wnids of the per-class tars in ``root``'s ILSVRC2012_img_train.tar (the class
    list of both splits). For the val split without that file (138 GB, not needed to evaluate):
    the 1,000 ILSVRC-2012 wnids sorted (imagenet_wnids.tsv), the list the whole train tar gives,
    with a warning. FileNotFoundError without that file for train, ValueError when it holds
    none."""
    train_tar = Path(root) / TRAIN_TAR
    if not train_tar.is_file() and split == 'val':
        warnings.warn(f'{train_tar} not found: val labelled with the 1,000 ILSVRC-2012 classes in '
                      f'sorted wnid order, the class list of the whole train split', stacklevel=2)
        return [wnid for wnid, _ in ilsvrc_classes()]
    if not train_tar.is_file():
        raise MissingFileError(f'{train_tar}: needed for the class list (class i = i-th sorted '
                               f'wnid of the train split)')
    wnids = sorted(Path(n).name[:-4] for n, _, _ in tar_members(train_tar) if is_class_tar(n))
    if not wnids:
        raise InputError(f'{train_tar}: no per-class <wnid>.tar inside')
    return wnids


def is_class_tar(member: str) -> bool:
    """Whether a member of ILSVRC2012_img_train.tar is a class's tar (``n01440764.tar``): hidden
    members (macOS's ``._n01440764.tar``, which took a class index and shifted every later one)
    are not, as hidden folders are not classes in the folders layout."""
    name = Path(member).name
    return name.endswith('.tar') and not name.startswith('.')


def tar_train_samples(root, classes: list) -> list:
    """The images of the per-class tars inside ILSVRC2012_img_train.tar, as tar references,
    labelled by their tar's wnid in ``classes``; hidden members are left out, and so are
    members whose extension is not an image's, with a warning (:func:`warn_not_images`)."""
    train_tar, samples, other = Path(root) / TRAIN_TAR, [], []
    with open(train_tar, 'rb') as f:
        for inner, offset, size in sorted(tar_members(train_tar)):
            if not is_class_tar(inner):
                continue
            label = classes.index(Path(inner).name[:-4])
            f.seek(offset)  # tarfile reads headers only, offsets absolute in the file
            files = sorted((Path(n).name, o, s)
                           for n, o, s in tar_members(None, f, end=offset + size)
                           if not Path(n).name.startswith('.'))
            samples.extend((tar_ref(train_tar, f'{Path(inner).name}/{n}', o, s), label)
                           for n, o, s in files if n.lower().endswith(IMAGE_EXTENSIONS))
            other += [f'{Path(inner).name}/{n}' for n, _, _ in files
                      if not n.lower().endswith(IMAGE_EXTENSIONS)]
    warn_not_images(other)
    if not samples:
        raise InputError(f'{train_tar}: no images found')
    return samples


def tar_val_samples(root, classes: list) -> list:
    """The images of ILSVRC2012_img_val.tar, as tar references labelled by :func:`val_labels`."""
    val_tar = Path(root) / VAL_TAR
    if not val_tar.is_file():
        raise MissingFileError(f'{val_tar}: val split archive not found')
    files = [(n, tar_ref(val_tar, n, o, s)) for n, o, s in tar_members(val_tar)]
    return flat_val_samples(files, root, classes, val_tar)


def open_image_source(path):
    """A file object for a sample: the file itself, or the bytes of a tar member reference
    (:func:`tar_ref`'s form: a ``.tar`` path, ``::``, the member, ``@offset+size``; a folder whose
    name holds ``::`` is no tar)."""
    path = str(path)
    ref = TAR_REF.fullmatch(path)
    if ref:
        with open(ref['tar'], 'rb') as f:
            f.seek(int(ref['offset']))
            return io.BytesIO(f.read(int(ref['size'])))
    return open(path, 'rb')
