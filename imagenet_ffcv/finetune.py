"""Fine-tuning: a model built for the dataset's classes started from a weights file
(``model.weights``; timm's ``--initial-checkpoint``), its classifier new where the weights' cannot
serve, with a note when the weights' BlurPool differs from the model's.
"""
from pathlib import Path

import torch

from .classes import in_ilsvrc_order, read_class_list
from .config_schema import ARCH_KEY, BLURPOOL_KEY, RESET_HEAD_KEY
from .errors import CheckpointError
from .models import BlurPoolConv2d, classifier_keys, takes_blurpool
from .state_dicts import fit_advice, mismatch, prefix_note, without_prefix
from .weights import load_weights


def init_from(model: torch.nn.Module, path, *, reset_head: bool, class_list=None,
              arch: str = '') -> str:
    """Start ``model`` (built for the dataset's classes) from the weights in ``path`` (a
    checkpoint, ``final_weights.pt`` / ``.safetensors``, or a plain torchvision state dict saved
    with ``torch.save``; read by ``weights.load_weights``, nothing in it runs), as fine-tuning
    does (timm's ``--initial-checkpoint``; the weights are never fetched from the network). The
    classifier (``models.classifier_keys``) keeps its fresh initialisation when ``reset_head``,
    when the file has none (a backbone), when its shape in the file differs (another class
    count), or when the class list saved with the weights names other wnids than ``class_list``
    (the dataset's classes.tsv; not compared when either is missing). Returns a line saying what
    was loaded, with a note when ``model`` has BlurPool (``models.BlurPoolConv2d``) and the
    weights were not or may not have been trained with it (torchvision's and timm's are not:
    BlurPool then changes what every strided conv sees), or the other way round, and one when
    EMA weights were left aside (``weights.Weights.note``), and one when the classifier is loaded
    without class lists to check it by. A prefix that every key shares and that keeps them from
    fitting (a PyTorch Lightning checkpoint's ``model.``) is removed
    (``state_dicts.without_prefix``). Raises CheckpointError naming the file and the keys, and
    the torchvision archs they fit when ``arch`` (the model's name) is not one, when any other
    weight is missing, extra or of another shape (another architecture)."""
    state, _, saved, trained_blurred, note = load_weights(path)
    own, head = model.state_dict(), classifier_keys(model)
    state, prefix, left_out = without_prefix(state, own, ignore=head)  # Lightning's 'model.'
    ours = read_class_list(class_list) if class_list and Path(class_list).is_file() else None
    why = ('as asked' if reset_head else
           'the file has none' if head and not head & state.keys() else
           'the class count differs' if any(k in state and state[k].shape != own[k].shape
                                            for k in head) else
           'trained on other classes' if saved and ours and [w for w, _ in saved] != ours else '')
    reset = head if why else set()
    problems = mismatch(state, own, ignore=reset)
    if problems:
        raise CheckpointError(
            f'{path}: the weights do not fit this model (another architecture? set --{ARCH_KEY}'
            f'{fit_advice(state, arch)}): {problems}')
    model.load_state_dict({k: v for k, v in state.items() if k not in reset}, strict=False)
    kept = (head and not reset and not (saved and ours)  # its outputs: whose classes? (not
            and not in_ilsvrc_order(class_list))  # torchvision's ImageNet weights on ImageNet)
    return (f"=> started from {path} ({len(state.keys() - reset)} tensors)" +
            (f'; classifier {", ".join(sorted(reset))} newly initialised ({why})' if reset else '')
            + (f'; {prefix_note(prefix, left_out)}' if prefix else '')
            + (f'\nnote: the classifier of {path} is loaded, its outputs taken as the dataset\'s '
               f'classes in their order: no class list came with the '
               f'{"dataset" if saved else "weights"} to check them by (--{RESET_HEAD_KEY}=1 '
               f'starts it anew)' if kept else '')
            + _blurpool_note(model, trained_blurred) + (f'\n{note}' if note else ''))


def _blurpool_note(model: torch.nn.Module, trained_blurred) -> str:
    """A line for :func:`init_from` when ``model``'s BlurPool differs from the weights'
    (``trained_blurred``, ``weights.Weights.blurpool``), or may (unknown, and the model has it); ''
    otherwise, and for an arch BlurPool changes nothing of (no conv ``models.takes_blurpool``:
    SqueezeNet, ViTs)."""
    convs = [m for m in model.modules() if takes_blurpool(m)]
    if not convs:
        return ''
    blurred = any(isinstance(m, BlurPoolConv2d) for m in convs)
    if trained_blurred is None and blurred:
        return (f'\nnote: this model has BlurPool ({BLURPOOL_KEY}=1) and the weights file saves '
                f'no config (torchvision\'s and timm\'s weights were trained without it): to '
                f'fine-tune such weights as they were trained, set --{BLURPOOL_KEY}=0')
    if trained_blurred is not None and trained_blurred != blurred:
        was = 'on' if trained_blurred else 'off'
        return (f'\nnote: the weights were trained with BlurPool {was} and this model has it '
                f'{"on" if blurred else "off"}: to fine-tune them as they were trained, set '
                f'--{BLURPOOL_KEY}={int(trained_blurred)}')
    return ''
