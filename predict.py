"""Classify image files with trained weights: the top-5 classes with names and probabilities.

    python predict.py photo.jpg more/*.JPEG --weights runs/<run id>/final_weights.pt
    python predict.py photo.jpg --weights runs/<run id>/checkpoint.pt --top 3

Prints, for each image, as TensorFlow's classify_image.py does::

    photo.jpg
    giant panda (score = 0.88493)
    lesser panda (score = 0.00878)
    ...

The model is rebuilt as it was trained (arch, BlurPool, channels_last) from the config saved with the
weights (inside a checkpoint, or params.json beside final_weights.pt), and each image is prepared as
the validation loader prepares it (centre crop of 224/256 of the shorter side, resized to the run's
validation resolution, flip TTA when the run used it). Class names come from the checkpoint or the
run folder's classes.tsv (the class list written beside the training .beton), or --classes.
"""
import argparse
import sys
from pathlib import Path

import torch

from imagenet_ffcv import checkpoint, data, models


def predict(paths: list, *, weights, top: int = 5, classes_path=None, res=None, arch='resnet50',
            blurpool: bool = True, max_res: int = 256, batch_size: int = 64, device=None) -> list:
    """Top-``top`` predictions for each image file.

    Returns one list per image of ``(wnid, name, probability)`` tuples, most probable first
    (probabilities from the softmax of the logits, averaged over the image and its flip when the
    run evaluated with flip TTA). ``res`` defaults to the run's ``validation.resolution``; ``arch``
    and ``blurpool`` are used only when no config is saved with the weights. Class names come from
    ``classes_path`` (a .classes.tsv), else those saved with the weights. Raises checkpoint.CheckpointError for
    unusable weights, FileNotFoundError for a missing class list, OSError/ValueError naming an
    image that cannot be decoded.
    """
    weights = Path(weights)
    state, trained, classes = checkpoint.load_weights(weights)
    if classes_path:
        classes = data.read_class_names(classes_path)
    if not classes:
        raise FileNotFoundError(f'no class list for {weights}: none saved with it and no '
                                'classes.tsv beside it; pass --classes TRAIN.classes.tsv '
                                '(written by write_beton.py beside the .beton)')
    if trained:
        arch = trained['model']['arch']
        blurpool, channels_last = trained['training']['use_blurpool'], trained['training']['channels_last']
        res = res or trained['validation']['resolution']
        flip_tta = bool(trained['validation']['lr_tta'])
    else:
        channels_last, flip_tta, res = True, True, res or 224
    device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = models.build_model(arch=arch, num_classes=len(classes), use_blurpool=bool(blurpool),
                               channels_last=bool(channels_last))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f'{weights}: the weights do not fit {arch} with '
                                         f'{len(classes)} classes: {str(e).splitlines()[0]}') from None
    model = model.to(device).eval()
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = []
        for path in chunk:
            try:
                images.append(data.load_eval_image(path, res=res, max_res=max_res))
            except (OSError, ValueError) as e:
                raise type(e)(f'{path}: cannot decode the image ({e})') from e
        x = torch.stack(images).to(device, memory_format=torch.channels_last)
        with torch.no_grad():
            probs = model(x).float().softmax(dim=1)
            if flip_tta:
                probs = (probs + model(torch.flip(x, dims=[3])).float().softmax(dim=1)) / 2
        p, idx = probs.topk(min(top, len(classes)), dim=1)
        for row_p, row_idx in zip(p.tolist(), idx.tolist()):
            results.append([(*classes[i], pi) for pi, i in zip(row_p, row_idx)])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('images', nargs='+', help='image files (JPEG, PNG, ...)')
    parser.add_argument('--weights', required=True, help='checkpoint.pt or final_weights.pt')
    parser.add_argument('--top', type=int, default=5, help='classes shown per image')
    parser.add_argument('--classes', help='class list (.classes.tsv) when the run has none')
    parser.add_argument('--res', type=int, help="input side in px (default: the run's "
                                                "validation resolution)")
    parser.add_argument('--arch', default='resnet50', help='model when no config is saved')
    parser.add_argument('--blurpool', type=int, default=1, choices=(0, 1),
                        help='1: the weights were trained with BlurPool (when no config is saved)')
    args = parser.parse_args(argv)
    try:
        results = predict(args.images, weights=args.weights, top=args.top,
                          classes_path=args.classes, res=args.res, arch=args.arch,
                          blurpool=bool(args.blurpool))
    except (checkpoint.CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        print(f'predict.py: {e}', file=sys.stderr)
        return 1
    for path, top in zip(args.images, results):
        print(path)
        for wnid, name, p in top:
            print(f'{name or wnid} (score = {p:.5f})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
