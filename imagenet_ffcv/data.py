"""The data path: class lists, the shorter-side resize, writing .beton files, and FFCV loaders.

Class index convention (as torchvision's ``ImageFolder`` and the ILSVRC-2012 order): the position
of the wnid folder in the sorted list of the *train* split's folders. The val split is labelled with
the same map, so a val split that lacks a class, or lists its folders in another order, keeps the
train indices.
"""
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

# ImageNet channel statistics in 0-255 pixel units (RGB order).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
# Validation centre crop: the crop is 224/256 of the shorter side, then resized to the resolution.
DEFAULT_CROP_RATIO = 224 / 256

WNID_NAMES_FILE = Path(__file__).with_name('imagenet_wnids.tsv')


# ----------------------------------------------------------------------------------------------
# Class lists and samples
# ----------------------------------------------------------------------------------------------

def find_classes(train_dir) -> list:
    """Sorted wnid folder names of a train split: index i of the list is class i.

    Raises FileNotFoundError if ``train_dir`` is missing and ValueError if it has no class folder.
    """
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise FileNotFoundError(f'{train_dir}: train split folder not found (expected '
                                f'<data-dir>/train/<wnid>/*.JPEG); set --data-dir')
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise ValueError(f'{train_dir}: no class folders (expected {train_dir}/<wnid>/*.JPEG)')
    return classes


def list_samples(split_dir, classes: list) -> list:
    """All images of a split as ``(path, label)`` pairs, ordered by class index then file name.

    ``classes`` is the train split's class list (see :func:`find_classes`); a folder of
    ``split_dir`` that is not in it raises ValueError naming the folder, since its images would
    have no label. Files whose extension is not in IMAGE_EXTENSIONS are ignored.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f'{split_dir}: split folder not found')
    class_to_idx = {wnid: i for i, wnid in enumerate(classes)}
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    unknown = [f for f in folders if f not in class_to_idx]
    if unknown:
        raise ValueError(f'{split_dir}: class folder(s) {", ".join(unknown[:5])} are not in the '
                         f'train split, so their images have no class index; remove them or add '
                         f'the class to train/')
    samples, empty = [], []
    for wnid in sorted(folders, key=class_to_idx.get):
        folder = split_dir / wnid
        files = sorted(e.name for e in os.scandir(folder)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            empty.append(str(folder))
        samples.extend((str(folder / f), class_to_idx[wnid]) for f in files)
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
        raise ValueError(f'{split_dir}: no images found (extensions {", ".join(IMAGE_EXTENSIONS)})')
    return samples


# ----------------------------------------------------------------------------------------------
# Input layouts: class folders, Kaggle's CLS-LOC tree, the raw ILSVRC-2012 tars
# ----------------------------------------------------------------------------------------------

LAYOUTS = ('folders', 'kaggle', 'tars')
TRAIN_TAR, VAL_TAR = 'ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'
KAGGLE_DIR = Path('ILSVRC') / 'Data' / 'CLS-LOC'
# A file inside an uncompressed tar: '<tar path>::<member name>@<byte offset>+<size>'.
TAR_REF_SEP = '::'


def detect_layout(root) -> str:
    """'folders' (root/train/<wnid>/), 'kaggle' (root/ILSVRC/Data/CLS-LOC/ + LOC_val_solution.csv)
    or 'tars' (root/ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar); FileNotFoundError if none."""
    root = Path(root)
    if (root / 'train').is_dir() or (root / 'val').is_dir():
        return 'folders'
    if (root / KAGGLE_DIR).is_dir():
        return 'kaggle'
    if (root / TRAIN_TAR).is_file() or (root / VAL_TAR).is_file():
        return 'tars'
    raise FileNotFoundError(
        f'{root}: no known input layout: expected train/<wnid>/*.JPEG (class folders), '
        f'{KAGGLE_DIR}/ with LOC_val_solution.csv (Kaggle) or {TRAIN_TAR} / {VAL_TAR} '
        f'(raw ILSVRC-2012 tars); set --data-dir')


def _val_solution(path) -> dict:
    """ImageId -> wnid from Kaggle's LOC_val_solution.csv (first token of PredictionString)."""
    import csv
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: val labels not found: put Kaggle\'s LOC_val_solution.csv '
                                f'(ImageId,PredictionString) or the devkit {DEVKIT_TAR} there')
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ['ImageId', 'PredictionString']:
        raise ValueError(f'{path}: expected the header ImageId,PredictionString')
    return {r[0]: r[1].split()[0] for r in rows[1:] if len(r) >= 2 and r[1].split()}


DEVKIT_TAR = 'ILSVRC2012_devkit_t12.tar.gz'


def _devkit_val_solution(path) -> dict:
    """ImageId -> wnid from the ILSVRC-2012 devkit archive, read in place: ``data/meta.mat`` maps
    ILSVRC2012_ID -> WNID for the leaf synsets (``num_children == 0``: the 1,000 classes) and
    ``data/ILSVRC2012_validation_ground_truth.txt`` gives one ILSVRC2012_ID a line, line i for
    ``ILSVRC2012_val_{i:08d}`` (i from 1). As torchvision's ``datasets.imagenet`` parses it."""
    import io
    import tarfile

    import scipy.io

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


def _tar_members(tar_path, fileobj=None):
    """(name, data offset, size) of the regular files of an uncompressed tar (of ``fileobj``
    from its current position on, the offsets absolute in that file)."""
    import tarfile
    with tarfile.open(tar_path if fileobj is None else None, mode='r:', fileobj=fileobj) as tf:
        return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]


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
                files = sorted((Path(n).name, o, s) for n, o, s in _tar_members(None, f)
                               if n.lower().endswith(IMAGE_EXTENSIONS)
                               and o + s <= offset + size)
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
    """A file object for a sample: the file itself, or the bytes of a tar member reference."""
    path = str(path)
    if TAR_REF_SEP in path:
        import io
        tar_path, rest = path.split(TAR_REF_SEP, 1)
        offset, size = rest.rsplit('@', 1)[1].split('+')
        with open(tar_path, 'rb') as f:
            f.seek(int(offset))
            return io.BytesIO(f.read(int(size)))
    return open(path, 'rb')


def source_size(path) -> int:
    path = str(path)
    if TAR_REF_SEP in path:
        return int(path.rsplit('+', 1)[1])
    return os.path.getsize(path)


def wnid_names() -> dict:
    """wnid -> short human-readable name for the 1,000 ILSVRC-2012 classes."""
    with open(WNID_NAMES_FILE) as f:
        return dict(line.rstrip('\n').split('\t', 1) for line in f if line.strip())


def class_list_path(beton_path) -> Path:
    """Where the class list of a .beton lives: ``train_256.beton`` -> ``train_256.classes.tsv``."""
    beton_path = Path(beton_path)
    return beton_path.with_name(beton_path.stem + '.classes.tsv')


def write_class_list(path, classes: list, extra_names: dict = None) -> None:
    """Write ``index<TAB>wnid<TAB>name`` lines: names from imagenet_wnids.tsv, else from
    ``extra_names`` (e.g. LOC_synset_mapping.txt), else empty."""
    names = {**(extra_names or {}), **wnid_names()}
    lines = [f'{i}\t{wnid}\t{names.get(wnid, "")}\n' for i, wnid in enumerate(classes)]
    _atomic_write_text(Path(path), ''.join(lines))


def read_class_list(path) -> list:
    """The wnids of a class list written by :func:`write_class_list`, index order."""
    with open(path) as f:
        rows = [line.rstrip('\n').split('\t') for line in f if line.strip()]
    for i, row in enumerate(rows):
        if int(row[0]) != i:
            raise ValueError(f'{path}: line {i + 1} has index {row[0]}, expected {i}')
    return [row[1] for row in rows]


def read_class_names(path) -> list:
    """``[(wnid, name), ...]`` in index order from a class list (name '' when it has none)."""
    wnids = read_class_list(path)
    with open(path) as f:
        names = [(line.rstrip('\n').split('\t') + [''])[2] for line in f if line.strip()]
    return list(zip(wnids, names))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.partial-{os.getpid()}')
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Images for the writer
# ----------------------------------------------------------------------------------------------

def shorter_side_size(width: int, height: int, max_res: int) -> tuple:
    """(width, height) after scaling so the shorter side is at most ``max_res``, keeping the
    aspect ratio (rounded to the nearest pixel, at least 1) and never upscaling."""
    short = min(width, height)
    if short <= max_res:
        return width, height
    scale = max_res / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of a decoded image. 16-bit and 32-bit integer modes (``I;16*``, ``I``: 16-bit
    PNG/TIFF) are scaled to 8 bits (``>> 8``), not clipped as PIL's ``convert`` does; float (``F``)
    images are clipped to 0-255; everything else (L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...) goes
    through PIL's ``convert('RGB')``."""
    if im.mode == 'RGB':
        return im
    if im.mode.startswith('I'):
        a = np.asarray(im).astype(np.int64)
        if im.mode == 'I' and a.max(initial=0) > 65535:  # genuine 32-bit data: use the top 8 bits
            a = a >> max(0, int(a.max()).bit_length() - 8)
        else:
            a = a >> 8
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), 'L').convert('RGB')
    if im.mode == 'F':
        a = np.asarray(im)
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8),
                               'L').convert('RGB')
    return im.convert('RGB')


def load_image(path, max_res: int) -> np.ndarray:
    """Decode an image file to RGB with its shorter side at most ``max_res`` pixels.

    Grayscale, CMYK, palette and alpha images are converted to RGB by PIL's ``convert('RGB')``;
    16-bit images are scaled to 8 bits (see :func:`_to_rgb`); an EXIF orientation tag is applied
    (``ImageOps.exif_transpose``) before resizing. Large JPEGs are decoded at a reduced DCT scale
    (PIL ``draft``) to no less than the target size, then resized by :func:`resize_rgb`. Images
    smaller than ``max_res`` are kept as they are.
    Returns a (H, W, 3) uint8 array. Raises OSError/ValueError for a file PIL cannot decode
    completely: a truncated file is an error, never a partly grey image.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched it on
    with open_image_source(path) as f, Image.open(f) as im:
        size = shorter_side_size(*im.size, max_res)
        if size != im.size:
            im.draft('RGB', size)
        im.load()  # decodes everything: raises on truncated or corrupt data
        im = ImageOps.exif_transpose(im) or im
        im = _to_rgb(im)
        a = np.asarray(im)
        size = shorter_side_size(*im.size, max_res)
        if size != im.size:
            a = resize_rgb(a, size)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or 0 in a.shape:
            raise ValueError(f'decoded to an unusable array {a.dtype} {a.shape}')
        return a


def load_eval_image(path, *, res: int, max_res: int = 256,
                    crop_ratio: float = DEFAULT_CROP_RATIO):
    """One image file as the validation loader feeds it to the model, for prediction: decoded as
    the converter stores it (shorter side at most ``max_res``, :func:`load_image`), the central
    square of side ``int(crop_ratio * shorter side)`` (ffcv's ``get_center_crop``), resized to
    ``res`` x ``res`` bilinearly (area interpolation for a shrink of 2 or more, where the loader
    decodes DCT-scaled; see ``decoders``), normalised with the ImageNet mean/std.
    Returns a float32 tensor (3, res, res). Raises as :func:`load_image`."""
    import cv2
    import torch
    a = load_image(path, max_res)
    height, width = a.shape[:2]
    side = int(crop_ratio * min(height, width))
    top, left = (height - side) // 2, (width - side) // 2
    a = cv2.resize(a[top:top + side, left:left + side], (res, res),
                   interpolation=cv2.INTER_LINEAR if side < 2 * res else cv2.INTER_AREA)
    a = (a.astype(np.float32) - IMAGENET_MEAN.astype(np.float32)) / IMAGENET_STD.astype(np.float32)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def resize_rgb(a: np.ndarray, size: tuple) -> np.ndarray:
    """Shrink a (H, W, 3) uint8 array to ``size`` = (width, height) with OpenCV.

    Bilinear (``INTER_LINEAR``) when each side shrinks by a factor >= 0.5: every source pixel then
    still contributes, and after the DCT-scaled JPEG decode (``draft``) this is the common case; it
    is ~5x faster than area averaging and within ~1.2 grey levels (mean) of PIL's antialiased
    bilinear. Area averaging (``INTER_AREA``, as ffcv's own resizer) for larger reductions.
    """
    import cv2
    scale = min(size[0] / a.shape[1], size[1] / a.shape[0])
    interpolation = cv2.INTER_LINEAR if scale >= 0.5 else cv2.INTER_AREA
    return cv2.resize(a, size, interpolation=interpolation)


class ImageFiles:
    """An indexable dataset for ``ffcv``'s ``DatasetWriter.from_indexed_dataset``.

    ``self[i]`` returns ``((H, W, 3) uint8 array, label)``. It never raises: ffcv's writer waits
    forever for a worker that died. A file that cannot be decoded is appended to ``failures_path``
    as ``index<TAB>path<TAB>reason`` and stands in as a 1x1 black image; the caller checks that
    file (see :func:`read_failures`).
    """

    def __init__(self, samples: list, *, max_res: int, failures_path):
        self.samples = samples
        self.max_res = max_res
        self.failures_path = str(failures_path)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return load_image(path, self.max_res), label
        except Exception as e:  # any decoder error: reported, never a hang of the writer
            reason = f'{type(e).__name__}: {e}'.replace('\n', ' ').replace('\t', ' ')
            with open(self.failures_path, 'a') as f:  # O_APPEND: whole lines from each process
                f.write(f'{i}\t{path}\t{reason}\n')
            return np.zeros((1, 1, 3), np.uint8), label


class UnreadableImagesError(Exception):
    """Images that could not be decoded; ``failures`` is a list of ``(path, reason)``."""

    def __init__(self, failures):
        self.failures = failures
        listed = '\n'.join(f'  {p}: {r}' for p, r in failures[:20])
        more = f'\n  ... and {len(failures) - 20} more' if len(failures) > 20 else ''
        super().__init__(f'{len(failures)} image(s) could not be decoded; nothing was written. '
                         f'Remove or replace them and run again:\n{listed}{more}')


class InsufficientSpaceError(OSError):
    """The target folder has less free space than the estimated size of the .beton."""


def read_failures(failures_path) -> dict:
    """``{index: (path, reason)}`` from a failures file written by :class:`ImageFiles`."""
    failures = {}
    if Path(failures_path).exists():
        with open(failures_path) as f:
            for line in f:
                if line.strip():
                    i, path, reason = line.rstrip('\n').split('\t', 2)
                    failures[int(i)] = (path, reason)
    return failures


def skipped_report_path(beton_path) -> Path:
    """Where skipped files are listed: ``train_256.beton`` -> ``train_256.skipped.tsv``."""
    beton_path = Path(beton_path)
    return beton_path.with_name(beton_path.stem + '.skipped.tsv')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out) -> list:
    """Remove ``.NAME.partial-PID`` / ``.NAME.failures-PID`` files left beside ``out`` by a
    writer that was killed (its PID no longer runs on this machine). Returns the removed paths."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ('partial', 'failures'):
        for tmp in out.parent.glob(f'.{out.name}.{kind}-*'):
            pid = tmp.name.rsplit('-', 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def estimate_beton_bytes(samples: list, *, max_res: int, write_mode: str = 'jpg',
                         compress_probability: float = 0.5, sample_size: int = 64) -> int:
    """A generous estimate of the .beton size, from the headers of up to ``sample_size`` evenly
    spaced files: raw images take ``3 * W * H`` bytes after the resize; JPEGs at most the input
    file's bytes per pixel (times 1.5 for re-encoding at another quality) times the output pixels,
    capped at the raw size. Plus ffcv's per-sample metadata and page padding."""
    if not samples:
        return 0
    picks = np.unique(np.linspace(0, len(samples) - 1, min(sample_size, len(samples))).astype(int))
    raw_total = jpg_total = 0.0
    counted = 0
    for i in picks:
        path = samples[i][0]
        try:
            with open_image_source(path) as f, Image.open(f) as im:
                w, h = shorter_side_size(*im.size, max_res)
                in_pixels = im.size[0] * im.size[1]
            file_bytes = source_size(path)
        except Exception:  # undecodable files are dealt with by the writer
            continue
        raw = 3 * w * h
        raw_total += raw
        jpg_total += min(raw, 1.5 * file_bytes * (w * h) / max(1, in_pixels) + 1024)
        counted += 1
    if not counted:
        return 0
    p = {'jpg': 1.0, 'raw': 0.0}.get(write_mode, compress_probability)
    per_image = (p * jpg_total + (1 - p) * raw_total) / counted
    return int(len(samples) * (per_image + 64) * 1.1) + 8 * 2 ** 20


def check_free_space(out, needed: int) -> None:
    """Raise InsufficientSpaceError if the folder of ``out`` has less than ``needed`` bytes free."""
    folder = Path(out).parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InsufficientSpaceError(
            f'{folder}: {free / 1e9:.2f} GB free, but the .beton needs about {needed / 1e9:.2f} GB '
            f'(estimated from a sample of the images); free some space or choose another --out')


def _write_once(samples, tmp, fields, num_workers, chunksize, failures_path, max_res, indices):
    from ffcv.writer import DatasetWriter
    failures_path.unlink(missing_ok=True)
    writer = DatasetWriter(str(tmp), fields, num_workers=max(1, min(num_workers, len(indices))))
    dataset = ImageFiles(samples, max_res=max_res, failures_path=failures_path)
    writer.from_indexed_dataset(dataset, indices=np.asarray(indices), chunksize=chunksize)
    return read_failures(failures_path)


def write_beton(samples: list, out, *, max_res: int, write_mode: str = 'jpg',
                jpeg_quality: int = 90, compress_probability: float = 0.5,
                num_workers: int = 0, chunksize: int = 100, skip_unreadable: bool = False,
                check_space: bool = True) -> dict:
    """Write ``(path, label)`` samples to the FFCV file ``out``, shorter side at most ``max_res``.

    Fields: ``image`` (``RGBImageField``, ``write_mode`` 'jpg' | 'raw' | 'proportion', the last
    storing a JPEG with probability ``compress_probability`` and raw pixels otherwise) and
    ``label`` (``IntField``). ``num_workers`` processes (0: all cores) decode and encode.

    The file is written under a temporary name (``.NAME.partial-PID``, a dot file) in the folder
    of ``out`` and renamed into place only when complete: a crash or kill leaves no file at ``out``
    (or the previous complete one). Temporaries of killed runs are removed by the next run.
    Before writing, the free space of that folder is checked against an estimate
    (InsufficientSpaceError; ``check_space=False`` skips it).

    Files that cannot be decoded: with ``skip_unreadable=False`` raise UnreadableImagesError,
    writing nothing; with ``skip_unreadable=True`` they are left out (the other images keep their
    labels), listed as ``path<TAB>reason`` in ``skipped_report_path(out)``, and counted in
    ``'skipped'``. Only then is the file written a second time, without them.
    Returns ``{'images', 'skipped', 'skipped_files': [(path, reason)], 'skipped_report', 'bytes',
    'seconds', 'img_per_s'}``.
    """
    from ffcv.fields import IntField, RGBImageField

    if write_mode not in ('jpg', 'raw', 'proportion'):
        raise ValueError(f"write_mode={write_mode!r}: expected 'jpg', 'raw' or 'proportion'")
    if not samples:
        raise ValueError('no images to write')
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    num_workers = num_workers or os.cpu_count()
    if check_space:  # + one partly filled 8 MiB ffcv page per worker
        check_free_space(out, estimate_beton_bytes(samples, max_res=max_res, write_mode=write_mode,
                                                   compress_probability=compress_probability)
                         + num_workers * 8 * 2 ** 20)
    tmp = out.with_name(f'.{out.name}.partial-{os.getpid()}')
    failures_path = out.with_name(f'.{out.name}.failures-{os.getpid()}')
    report = skipped_report_path(out)
    fields = {
        'image': RGBImageField(write_mode=write_mode, max_resolution=None,
                               jpeg_quality=jpeg_quality, compress_probability=compress_probability),
        'label': IntField(),
    }
    start = time.perf_counter()
    skipped = {}
    indices = list(range(len(samples)))
    try:
        for _ in range(3):  # a file may turn unreadable between passes: retry a few times
            failures = _write_once(samples, tmp, fields, num_workers, chunksize, failures_path,
                                   max_res, indices)
            if not failures:
                break
            skipped.update(failures)
            if not skip_unreadable:
                raise UnreadableImagesError(sorted(skipped.values()))
            indices = [i for i in indices if i not in skipped]
            if not indices:
                raise UnreadableImagesError(sorted(skipped.values()))
        else:
            raise UnreadableImagesError(sorted(skipped.values()))
        skipped_files = [skipped[i] for i in sorted(skipped)]
        if skipped:
            _atomic_write_text(report, ''.join(f'{p}\t{r}\n' for p, r in skipped_files))
        else:
            report.unlink(missing_ok=True)  # a stale report of an earlier run would mislead
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        failures_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {'images': len(indices), 'skipped': len(skipped), 'skipped_files': skipped_files,
            'skipped_report': str(report) if skipped else None, 'bytes': out.stat().st_size,
            'seconds': seconds, 'img_per_s': len(indices) / seconds}


class CorruptBetonError(Exception):
    """A .beton file that cannot be read back completely."""


def verify_beton(path, *, decode: bool = True) -> dict:
    """Read a .beton back without ffcv's (JIT-compiled) loader: header, metadata, allocation
    table, every record's bounds, and (``decode``) every image decoded with PIL (JPEG) or
    checked for size (raw). Labels are checked against the class list beside the file, if any.

    Returns ``{'images', 'bytes', 'per_class': {label: n}, 'short_side': {bucket: n},
    'modes': {'jpg': n, 'raw': n}, 'problems': [str]}``; raises CorruptBetonError when the file
    cannot be parsed at all.
    """
    import io
    from ffcv.reader import Reader
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such .beton file')
    size = path.stat().st_size
    try:
        reader = Reader(str(path))
        md = reader.metadata
        names = reader.field_names
        if len(md) != reader.num_samples:
            raise CorruptBetonError(f'{path}: header says {reader.num_samples} samples, metadata '
                                    f'holds {len(md)} (file truncated?)')
        if names[:2] != ['image', 'label']:
            raise CorruptBetonError(f'{path}: fields {names}, expected image and label')
        images, labels = md['f0'], md['f1'].astype(np.int64)
    except CorruptBetonError:
        raise
    except Exception as e:
        raise CorruptBetonError(f'{path}: not a readable .beton file ({type(e).__name__}: {e})')
    problems = []
    alloc = reader.alloc_table
    sizes = dict(zip(alloc['ptr'].tolist(), alloc['size'].tolist()))
    if alloc.size == 0 or reader.header['alloc_table_ptr'] > size:
        problems.append('allocation table missing (file truncated?)')
    data = np.memmap(path, dtype=np.uint8, mode='r') if size else np.zeros(0, np.uint8)
    n_classes = None
    if class_list_path(path).exists():
        n_classes = len(read_class_list(class_list_path(path)))
    modes = {'jpg': 0, 'raw': 0}
    for i in range(len(images)):
        w, h, mode = int(images['width'][i]), int(images['height'][i]), int(images['mode'][i])
        ptr = int(images['data_ptr'][i])
        if labels[i] < 0 or (n_classes is not None and labels[i] >= n_classes):
            problems.append(f'record {i}: label {labels[i]} outside 0..{(n_classes or 1) - 1}')
        if w < 1 or h < 1:
            problems.append(f'record {i}: image size {w}x{h}')
            continue
        if ptr not in sizes:
            problems.append(f'record {i}: data pointer {ptr} not in the allocation table')
            continue
        nbytes = int(sizes[ptr])
        if ptr + nbytes > size:
            problems.append(f'record {i}: data at {ptr}+{nbytes} beyond the end of the file '
                            f'({size} bytes; truncated?)')
            continue
        if mode == 1:
            modes['raw'] += 1
            if nbytes < 3 * w * h:
                problems.append(f'record {i}: raw image {w}x{h} needs {3 * w * h} bytes, has '
                                f'{nbytes}')
        elif mode == 0:
            modes['jpg'] += 1
            if decode:
                try:
                    with Image.open(io.BytesIO(bytes(data[ptr:ptr + nbytes]))) as im:
                        im.load()
                        if im.size != (w, h):
                            problems.append(f'record {i}: JPEG is {im.size[0]}x{im.size[1]}, '
                                            f'metadata says {w}x{h}')
                except Exception as e:
                    problems.append(f'record {i}: JPEG does not decode ({type(e).__name__}: {e})')
        else:
            problems.append(f'record {i}: unknown image mode {mode}')
    short = np.minimum(images['width'].astype(int), images['height'].astype(int))
    edges = [0, 32, 64, 128, 160, 192, 224, 256, 320, 384, 512, 10 ** 9]
    hist = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = int(((short >= lo) & (short < hi)).sum())
        if n:
            hist[f'{lo}-{hi - 1}' if hi < 10 ** 9 else f'>={lo}'] = n
    per_class = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    return {'images': len(images), 'bytes': size, 'per_class': per_class, 'short_side': hist,
            'modes': modes, 'problems': problems}


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------

def num_samples(beton_path) -> int:
    """Number of samples stored in a .beton file (reads only its header)."""
    from ffcv.reader import Reader
    return Reader(str(beton_path)).num_samples


def num_classes(beton_path, val_path=None) -> int:
    """Classes of a dataset: the length of the class list beside the .beton when there is one,
    else 1 + the largest stored label.

    With ``val_path``, the class lists beside the two files must be the same (both written from the
    same train split); otherwise ValueError names both files, since labels would not match.
    """
    classes = class_list_path(beton_path)
    if val_path is not None and classes.exists() and class_list_path(val_path).exists():
        if read_class_list(classes) != read_class_list(class_list_path(val_path)):
            raise ValueError(f'{classes} and {class_list_path(val_path)} differ: the two .beton '
                             f'files were written from different train splits, so their class '
                             f'indices do not match; write both from the same --data-dir')
    if classes.exists():
        return len(read_class_list(classes))
    from ffcv.reader import Reader
    return int(Reader(str(beton_path)).metadata['f1'].max()) + 1


def _check_beton(path) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f'{path}: .beton file not found; write it with write_beton.py')
    return str(path)


def _image_pipeline(device, decoder_for):
    """``[decoder, ...]`` producing float (N, 3, H, W) batches normalised with ImageNet mean/std, in
    channels_last memory. ``decoder_for(normalize)`` makes the decoder (see ``decoders``): on CPU
    it writes normalised float32 itself; on CUDA it writes uint8 (4x less to copy to the device)
    and the batch is normalised there, to float16."""
    import torch
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    from .decoders import normalize_on_device
    if device.type == 'cuda':
        decoder = decoder_for(False)
        return decoder, [decoder, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                         normalize_on_device(mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                             dtype=torch.float16)]
    assert device == torch.device('cpu'), device
    decoder = decoder_for(True)
    return decoder, [decoder, ToTensor(), ToTorchImage()]


def _label_pipeline(device):
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]  # (B, 1) -> (B,), also for a last batch of 1
    return ops + [ToDevice(device, non_blocking=True)] if device.type == 'cuda' else ops


def train_loader(*, path, batch_size: int, num_workers: int, res: int, in_memory: bool, device,
                 distributed: bool, seed: int, order: str = 'random',
                 min_crop_scale: float = 0.08, flip_prob: float = 0.5):
    """The training loader: random-resized crop to ``res`` x ``res`` pixels + horizontal flip +
    normalisation, as ffcv-imagenet, done in one pass by ``decoders.random_resized_crop_decoder``
    (region decode, bilinear resample; ``benchmarks/bench_loader.py`` measures it). Returns ``(loader, decoder)``; set ``decoder.output_size =
    (res, res)`` between epochs to change the resolution without rebuilding the loader.

    Batches are ``(images, labels)``: images float32 on CPU / float16 on CUDA, (B, 3, res, res) in
    channels_last memory, normalised with ImageNet mean/std; labels int64 (B,). ``batch_size`` is per
    process; the last incomplete batch is dropped. ``order``: 'random' (full shuffle, the only one
    ffcv allows with ``distributed``) or 'quasi_random' (shuffles within pages, for data > RAM).
    ``min_crop_scale``: smallest crop area, as a fraction of the image (Szegedy et al. 2015 and
    torchvision: 0.08); the aspect ratio is drawn from [3/4, 4/3]. 1.0 on square images gives the
    whole image. ``flip_prob``: probability of the left-right flip (0: none). With both at
    1.0 and 0 on square images, batches are fixed by ``seed`` and the epoch alone: runs repeat.
    The loader's buffers are reused: consume a batch before fetching ``batches_ahead + 2`` more.
    """
    from ffcv.loader import Loader, OrderOption

    from .decoders import random_resized_crop_decoder

    orders = {'random': OrderOption.RANDOM, 'quasi_random': OrderOption.QUASI_RANDOM}
    if order not in orders:
        raise ValueError(f"order={order!r}: expected 'random' or 'quasi_random'")
    if distributed and order != 'random':
        raise ValueError("ffcv supports only order='random' with distributed=True")
    decoder, image_pipeline = _image_pipeline(device, lambda normalize: random_resized_crop_decoder(
        (res, res), scale=(min_crop_scale, 1.0), flip_prob=flip_prob, normalize=normalize,
        mean=IMAGENET_MEAN, std=IMAGENET_STD))
    loader = Loader(_check_beton(path), batch_size=batch_size, num_workers=num_workers,
                    order=orders[order], os_cache=bool(in_memory), drop_last=True,
                    distributed=distributed, seed=seed,
                    pipelines={'image': image_pipeline, 'label': _label_pipeline(device)})
    return loader, decoder


def val_loader(*, path, batch_size: int, num_workers: int, res: int, device, rank: int = 0,
               world_size: int = 1, crop_ratio: float = DEFAULT_CROP_RATIO):
    """The validation loader: centre crop (``crop_ratio`` of the shorter side, 224/256 by default;
    1.0 gives the whole central square, for 10-crop evaluation) resized to ``res`` x ``res``.

    Each of ``world_size`` ranks reads the disjoint slice ``rank::world_size`` of the samples, in
    order, keeping the last partial batch, so across ranks every image is seen exactly once (ffcv's
    own ``distributed=True`` pads with repeated samples). Batches as in :func:`train_loader`.
    """
    from ffcv.loader import Loader, OrderOption

    from .decoders import center_crop_decoder

    path = _check_beton(path)
    # uint64 as ffcv's own default: int64 indices meet its uint64 ones and numba sees float64.
    indices = np.arange(rank, num_samples(path), world_size, dtype=np.uint64)
    _, image_pipeline = _image_pipeline(device, lambda normalize: center_crop_decoder(
        (res, res), ratio=crop_ratio, normalize=normalize, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                  drop_last=False, indices=indices,
                  pipelines={'image': image_pipeline, 'label': _label_pipeline(device)})
