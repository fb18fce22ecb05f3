"""Classify image files with trained weights: the top-5 classes with names and probabilities; the
``imagenet-ffcv-predict`` command (also ``python -m imagenet_ffcv.predict``, ``predict.py``).

    imagenet-ffcv-predict photo.jpg more/*.JPEG --weights runs/<run id>/final_weights.pt
    imagenet-ffcv-predict photo.jpg --weights runs/<run id>/checkpoint.pt --top 3
    imagenet-ffcv-predict new_photos/ --weights runs/<run id> --csv predictions.csv

A folder stands for the images in it and its subfolders (``sources.images_in``).

Prints, for each image, as TensorFlow's classify_image.py does (with ``--csv``, writes a row per
image instead: :func:`write_csv`)::

    photo.jpg
    giant panda (score = 0.88493)
    lesser panda (score = 0.00878)
    ...

The model is rebuilt as it was trained (arch, BlurPool, channels_last) from the config saved with the
weights (inside the file, or in params.json beside an older final_weights.pt; --weights may name the
run folder). Each image goes the way a val
image goes: stored as ``imagenet-ffcv-write`` stores it (RGB, shorter side at most --max-res: by
default the largest in the run's val .beton; JPEG at --jpeg-quality with a restart marker every
--restart-interval MCUs: the converter's defaults),
then decoded by the val loader's own code (the centre crop of 224/256 of the shorter side at the
run's validation resolution, resized as its data.decoder resizes; the fused decoder's resize for
'ffcv'), with flip TTA when the run used it. Class names come from the
checkpoint or the run folder's classes.tsv (the class list written beside the training .beton), or
--classes.
"""
import argparse
import csv
import io
import os
import sys
import warnings
from pathlib import Path

import torch

from . import config, engine
from .classes import ILSVRC_CLASSES, class_list_of
from .commands import (STORAGE_OPTION_RANGES, add_version_option, check_ranges, command_name,
                       one_line_errors, one_line_warnings, progress_bar)
from .constants import IMAGE_EXTENSIONS
from .errors import InputError, MissingFileError, first_few
from .files import check_writable_file, shown_path, write_text_atomic
from .image_decode import center_crop_pixels
from .images import (DEFAULT_JPEG_QUALITY, DEFAULT_MAX_RES, DEFAULT_RESTART_INTERVAL, encode_jpeg,
                     load_image)
from .loaders import antialiased
from .sources import images_in
from .weights import FOREIGN_WEIGHTS_EVAL, load_model


def predict(paths: list, *, weights, top: int = 5, classes_path=None, res=None,
            arch: str = None, blurpool: bool = None, max_res: int = None,
            jpeg_quality: int = DEFAULT_JPEG_QUALITY,
            restart_interval: int = DEFAULT_RESTART_INTERVAL, batch_size: int = 64,
            device=None) -> list:
    """Top-``top`` predictions for each image file.

    Returns one list per image of ``(wnid, name, probability)`` tuples, most probable first:
    probabilities from the softmax of the logits, which are averaged over the image and its flip
    when the run evaluated with flip TTA (``engine.flip_tta_logits``, the rule validation uses, so
    the top-1 class is the one eval-only counts). Each image is :func:`image_record` then
    :func:`model_input`, resized as the run's ``data.decoder`` resizes (the fused decoder's resize
    for 'ffcv', with a note on stderr). ``res`` defaults to the run's ``validation.resolution``
    (``weights.FOREIGN_WEIGHTS_EVAL`` for weights saved without a config), ``max_res`` to the
    largest shorter side stored in its val .beton (else 256, the converter's default);
    ``arch`` (None: resnet50) and ``blurpool`` are used only when no config is saved with the
    weights (``weights.load_model``; a note on stderr names those given otherwise).
    Class names come from ``classes_path`` (a .classes.tsv, a run folder, a .beton or
    'ilsvrc2012': ``classes.class_list_of``; a warning on stderr when its wnids
    are not those saved with the weights), else those saved with the weights.
    An image that cannot be read or decoded (or a folder) gives, in its place, its error
    (OSError or ValueError naming the file); the other images are classified.
    Without a class list, the 1,000 outputs of an ImageNet model from elsewhere are named as
    ILSVRC-2012's classes (with a note on stderr; ``weights.load_model``).
    A progress bar runs on stderr when it is a terminal.
    Raises CheckpointError for unusable weights, FileNotFoundError for a missing class list.
    """
    classes = class_list_of(str(classes_path)) if classes_path else None
    saved = load_model(Path(weights), num_classes=len(classes) if classes else None,
                        arch=arch, use_blurpool=blurpool)
    if classes and saved.classes and [w for w, _ in classes] != [w for w, _ in saved.classes]:
        print(f'warning: {classes_path} names other classes than those saved with {weights}; '
              f'its names are shown, which may not be what the model predicts', file=sys.stderr)
    classes = classes or saved.classes
    if saved.assumed:
        print(f'{saved.assumed} (--arch, --blurpool)', file=sys.stderr)
    for line in (saved.note, saved.not_used(weights, {'--arch': arch, '--blurpool': blurpool})):
        if line:
            print(line, file=sys.stderr)
    if saved.ilsvrc_classes:
        print(f'note: no class list with {weights}: its 1,000 outputs are named as ILSVRC-2012\'s '
              'classes in their usual order (sorted wnids); if it was trained on others, pass '
              '--classes', file=sys.stderr)
    evaluated = (config.saved_eval_kwargs(saved.config) if saved.config
                 else FOREIGN_WEIGHTS_EVAL)
    res, antialias = res or evaluated['res'], antialiased(evaluated['decoder'])
    max_res = (max_res or (saved.config or {}).get('derived', {}).get('val_image_side')
               or DEFAULT_MAX_RES)
    if evaluated['decoder'] == 'ffcv':
        print(f'note: {weights} validated with ffcv\'s decoder (OpenCV INTER_AREA resize); '
              'predict resizes as the fused decoder does, so its inputs differ slightly from '
              'those validation saw', file=sys.stderr)
    device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = saved.model.to(device).eval()
    results, batch = [None] * len(paths), {}  # batch: {index in paths: model input}
    with progress_bar(paths, unit='img', leave=False, disable=None) as bar:  # if a terminal
        for i, path in enumerate(bar):
            try:
                batch[i] = model_input(*image_record(path, max_res=max_res,
                                                     jpeg_quality=jpeg_quality,
                                                     restart_interval=restart_interval),
                                       res=res, antialias=antialias)
            except (OSError, ValueError) as e:
                results[i] = e
            if batch and (len(batch) == batch_size or i == len(paths) - 1):
                x = torch.stack(list(batch.values())).to(device,
                                                         memory_format=torch.channels_last)
                tops = classify(model, x, classes=classes, top=top,
                                flip_tta=evaluated['flip_tta'])
                for j, top_j in zip(batch, tops):
                    results[j] = top_j
                batch = {}
    return results


def image_record(path, *, max_res: int = DEFAULT_MAX_RES,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                 restart_interval: int = DEFAULT_RESTART_INTERVAL) -> tuple:
    """The image file at ``path`` as ``imagenet-ffcv-write --max-res MAX_RES --jpeg-quality Q
    --restart-interval N`` stores it: ``(JPEG bytes uint8 (N,), height, width)``
    (``images.load_image``, ``images.encode_jpeg``). Raises MissingFileError naming the file
    when it is missing, InputError when it is a folder or cannot be decoded (whatever PIL
    raised, named: its plugins also raise SyntaxError, EOFError, struct.error ...)."""
    try:
        pixels = load_image(path, max_res)
    except FileNotFoundError:
        raise MissingFileError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise InputError(f'{path}: a folder, not an image; give the images in it '
                         f'({Path(path) / "*"})') from None
    except Exception as e:  # any decoder error: named, and the other images still classified
        raise InputError(f'{path}: cannot decode the image ({e})') from e
    record = encode_jpeg(pixels, quality=jpeg_quality, restart_interval=restart_interval)
    return record, pixels.shape[0], pixels.shape[1]


def model_input(record, height: int, width: int, *, res: int,
                antialias: bool = False) -> torch.Tensor:
    """A stored JPEG record as the CPU val loader feeds it to the model: float32 (3, res, res),
    the centre crop decoded, resized (antialiased for every shrink when ``antialias``, as
    ``data.decoder=fused_aa``: ``loaders.antialiased``) and normalised by the loader's own code
    (``image_decode.center_crop_pixels``), equal to the loader's batch row."""
    pixels = center_crop_pixels(record, height=height, width=width, res=res, antialias=antialias)
    return torch.from_numpy(pixels).permute(2, 0, 1)


@torch.no_grad()
def classify(model, x: torch.Tensor, *, classes: list, top: int, flip_tta: bool) -> list:
    """The ``top`` most probable classes of each image of ``x`` (float (N, 3, H, W), prepared as
    the val loader prepares it): per image a list of ``(wnid, name, probability)``, the softmax of
    ``engine.flip_tta_logits`` (validation's rule, so the first class is the one eval-only counts
    as the prediction). ``classes``: ``[(wnid, name), ...]`` in index order."""
    probs = engine.flip_tta_logits(model, x, flip_tta).float().softmax(dim=1)
    p, idx = probs.topk(min(top, len(classes)), dim=1)
    return [[(*classes[i], pi) for pi, i in zip(row_p, row_idx)]
            for row_p, row_idx in zip(p.tolist(), idx.tolist())]


def image_files(args: list) -> tuple:
    """``(files, empty)``: the command line's image arguments with each folder replaced by the
    image files in it and its subfolders (``sources.images_in``), each file once (a file given
    again, by itself or in a folder, or through a link, is left out with a warning naming it),
    and the folders among them that hold none."""
    files, empty, seen, again = [], [], set(), []
    for arg in args:
        found = images_in(arg) if os.path.isdir(arg) else [arg]
        empty += [] if found else [arg]
        for file in found:
            real = os.path.realpath(file)
            if real in seen:
                again.append(file)
            else:
                seen.add(real)
                files.append(file)
    if again:
        warnings.warn(f'{len(again)} file(s) given more than once, taken once: '
                      f'{first_few(map(shown_path, again))}',
                      stacklevel=2)
    return files, empty


def write_csv(path, files: list, results: list, top: int) -> None:
    """Write :func:`predict`'s ``results`` for ``files`` to the CSV file ``path`` (written whole or
    not at all, UTF-8, a header line): a row per image, in order: ``path``, then ``wnid_k``,
    ``name_k``, ``score_k`` (a probability, 6 decimals) for k = 1 .. ``top``, most probable first
    (empty past the model's class count), then ``error``: empty, or why the image could not be
    classified (its other cells empty). A path that is not UTF-8 has its bytes as escapes."""
    text = io.StringIO()
    rows = csv.writer(text, lineterminator='\n')
    rows.writerow(['path', *(f'{col}_{k}' for k in range(1, top + 1)
                             for col in ('wnid', 'name', 'score')), 'error'])
    for file, result in zip(files, results):
        failed = isinstance(result, Exception)
        cells = [] if failed else [cell for wnid, name, p in result for cell in (wnid, name,
                                                                                 f'{p:.6f}')]
        cells += [''] * (3 * top - len(cells))
        rows.writerow([shown_path(file), *cells, shown_path(str(result)) if failed else ''])
    write_text_atomic(path, text.getvalue())


def build_parser() -> argparse.ArgumentParser:
    """The options of ``imagenet-ffcv-predict``."""
    parser = argparse.ArgumentParser(prog=command_name('predict'),
                                     description=__doc__.split('\n\n')[0].replace('``', ''))
    parser.add_argument('images', nargs='+',
                        help='image files (JPEG, PNG, ...), or folders: the image files in them '
                             'and their subfolders')
    parser.add_argument('--weights', required=True,
                        help='a run folder (its final weights, else its checkpoint), '
                             'checkpoint.pt, final_weights.pt or final_weights.safetensors')
    parser.add_argument('--top', type=int, default=5,
                        help='classes shown per image (default 5)')
    parser.add_argument('--classes', help="class list (a .classes.tsv, a run folder's, a .beton's; "
                                          f"{ILSVRC_CLASSES}: ILSVRC-2012's 1,000) for the "
                                          "weights' classes, in place of those saved with them "
                                          '(a warning when they differ)')
    parser.add_argument('--res', type=int, help="input side in px (default: the run's "
                                                "validation resolution; for weights without a "
                                                f"saved config, {FOREIGN_WEIGHTS_EVAL['res']})")
    parser.add_argument('--arch', help='model when no config is saved (default resnet50)')
    parser.add_argument('--blurpool', type=int, choices=(0, 1),
                        help='1: the weights were trained with BlurPool, 0: without (when no '
                             'config is saved; default: on when its filters are saved in the '
                             "file, as ffcv-imagenet's are, else off, as torchvision's and "
                             "timm's weights)")
    parser.add_argument('--max-res', type=int,
                        help='shorter side (px) images are stored at first, as the .beton the '
                             "run validated on (imagenet-ffcv-write's --max-res; default: the "
                             "largest shorter side in that .beton, saved with the run's config, "
                             f'else {DEFAULT_MAX_RES})')
    parser.add_argument('--jpeg-quality', type=int, default=DEFAULT_JPEG_QUALITY,
                        help="JPEG quality they are stored at (imagenet-ffcv-write's; "
                             f'default {DEFAULT_JPEG_QUALITY})')
    parser.add_argument('--restart-interval', type=int, default=DEFAULT_RESTART_INTERVAL,
                        help="MCUs between restart markers (imagenet-ffcv-write's; default "
                             f'{DEFAULT_RESTART_INTERVAL})')
    parser.add_argument('--csv', metavar='FILE',
                        help='write the predictions to FILE (a .csv), a row per image (path; '
                             'wnid, name and score of each of the top classes; error), rather '
                             'than printing them')
    add_version_option(parser)
    return parser


@one_line_warnings('predict')
@one_line_errors('predict')
def cli(argv=None) -> int:
    """The command line (``argv``, default ``sys.argv[1:]``): prints each image's top classes, or
    writes them to ``--csv`` (:func:`write_csv`) and prints a line saying so; returns the exit
    status: 1, with a one-line message, for unusable weights or class list, and when an image
    cannot be read or a folder holds none (each named on stderr, the other images' classes
    printed or written). A reader that stops early (``| head``) ends the printing without an
    error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_ranges(parser, args, {**STORAGE_OPTION_RANGES, '--top': (1, None, ''),
                                '--res': (1, None, '')})
    if args.csv:
        check_writable_file(args.csv, '.csv', f'--csv {args.csv}', hint=' (is it one of the '
                            'images? --csv takes the file name first)')
    files, empty = image_files(args.images)
    for folder in empty:
        print(f'{command_name("predict")}: {folder}: no image files in this folder or its '
              f'subfolders (extensions {", ".join(IMAGE_EXTENSIONS)})', file=sys.stderr)
    if not files:
        return 1
    results = predict(files, weights=args.weights, top=args.top,
                      classes_path=args.classes, res=args.res, arch=args.arch,
                      blurpool=args.blurpool, max_res=args.max_res,
                      jpeg_quality=args.jpeg_quality, restart_interval=args.restart_interval)
    failed = [top for top in results if isinstance(top, Exception)]
    for error in failed:
        print(f'{command_name("predict")}: {error}', file=sys.stderr)
    if args.csv:
        write_csv(args.csv, files, results, args.top)
        print(f'=> {len(files) - len(failed)} image(s) classified' + (
            f', {len(failed)} not (their error column says why)' if failed else '')
            + f': {args.csv}')
        return int(bool(failed or empty))
    for path, top in zip(files, results):
        if isinstance(top, Exception):
            continue
        try:
            print(shown_path(path))
            for wnid, name, p in top:
                print(f'{name or wnid} (score = {p:.5f})')
            sys.stdout.flush()
        except BrokenPipeError:  # the reader has what it wanted: the rest goes to /dev/null (the
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # bad images to stderr)
    return int(bool(failed or empty))


if __name__ == '__main__':
    sys.exit(cli())
