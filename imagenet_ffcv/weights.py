"""Trained weights: ``final_weights.pt`` and ``final_weights.safetensors`` written atomically, read
back from either or from a checkpoint without running code, and the model rebuilt from them as it
was trained (eval-only, predict); fine-tuning starts from them (``finetune``).

``final_weights.pt`` is a state dict with torchvision's keys (``torch.load(weights_only=True)``
reads it, torchvision's models load it); ``final_weights.safetensors`` holds the same tensors (no
pickle at all). Each holds the run's config and class list as metadata (the .pt in the state
dict's own ``_metadata``, which ``load_state_dict`` passes to the modules and they ignore), so
either file alone rebuilds the model as it was trained.
"""
import errno
import json
import shlex
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch

from .checkpoint import check_format, is_checkpoint, save, weights_in
from .classes import (check_same_classes, class_list_path, ilsvrc_classes, in_ilsvrc_order,
                      read_class_list, read_class_names, some_of)
from .config import saved_model_kwargs
from .config_schema import ARCH_KEY, nested_ffcv_imagenet_params
from .errors import CheckpointError, MissingFileError, first_few
from .files import atomic_path
from .models import ClassSubset, build_model, classifier_keys, meta_model
from .run_dir import RunDir
from .state_dicts import (BLUR_FILTER, fit_advice, mismatch, prefix_note, unwrapped,
                          without_prefix)
from .safetensors_files import is_safetensors, read_safetensors
from .torch_files import safe_torch_load
from .weights_metadata import (METADATA_KEY, SAFETENSORS_FORMAT, checked_classes,
                               checked_config, described, parsed_json)


def save_final_weights(state_dict: dict, path, *, config: dict = None, classes=None) -> Path:
    """Write the final weights twice, atomically: ``path`` with the suffix ``.safetensors``
    (safetensors), then ``path`` (``torch.save`` of the state dict, as torchvision's keys), each
    with the config and class list as JSON metadata (module docstring), so either file alone
    rebuilds the model. ``path`` last: a run whose ``final_weights.pt`` exists has finished
    (``run_dir.RunDir.is_finished``), so a run killed between the two is not finished and resumes
    to write both. Returns the ``.safetensors`` path. Raises OSError (disk full, no permission)
    naming the file."""
    path = Path(path)
    metadata = {'format': SAFETENSORS_FORMAT, 'config': json.dumps(config),
                'classes': json.dumps(classes)}
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    safe_path = path.with_suffix('.safetensors')
    with atomic_path(safe_path) as tmp:
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        except safetensors.SafetensorError as e:  # a full disk: not an OSError
            raise OSError(errno.EIO, f'cannot write the weights ({e})', str(safe_path)) from e
    described = OrderedDict(state_dict)
    described._metadata = OrderedDict({'': {METADATA_KEY: metadata}})  # the root module's
    save(described, path)
    return safe_path


class Weights(NamedTuple):
    """What :func:`load_weights` reads: ``state`` the state dict (torchvision's keys),
    ``config`` the run's resolved config and ``classes`` ``[(wnid, name), ...]`` (each None when
    the file has none), ``blurpool`` whether they were trained with BlurPool: the config's
    ``training.use_blurpool``, else True for ffcv-imagenet's files (their BlurPool filters are
    saved), else None (unknown: torchvision's and timm's weights, trained without, look alike);
    ``note`` a line for the user when EMA weights were left aside (:func:`_ema_note`), else ''."""
    state: dict
    config: dict
    classes: list
    blurpool: bool = None
    note: str = ''


# How weights saved without a config (torchvision's, timm's) are evaluated (predict, eval-only):
# centre crops of 224 px, as torchvision's references evaluate them, with flip TTA, as this tool's
# validation does (config.saved_eval_kwargs' keys).
FOREIGN_WEIGHTS_EVAL = {'res': 224, 'flip_tta': True, 'decoder': 'fused'}
# Where other tools' checkpoints keep EMA weights beside the model's (timm's 'state_dict_ema',
# torchvision's references' 'model_ema'); this tool's checkpoint: 'ema'.
EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema')


def _ema_note(given, path, content) -> str:
    """A line saying the plain weights of ``path`` are used when it (``content``) also holds EMA
    weights (:data:`EMA_KEYS`), or when ``given`` is a run folder with final EMA weights."""
    held = [k for k in EMA_KEYS if isinstance(content, dict) and isinstance(content.get(k), dict)]
    ema_file = RunDir(given).final_weights_ema if Path(given).is_dir() else None
    if ema_file and ema_file.is_file():
        return (f'note: {path} holds the plain weights; the run\'s EMA weights are '
                f'{ema_file}: give that file to use them')
    if held == ['ema']:  # this tool's checkpoint
        written = RunDir(path.parent).final_weights_ema
        return (f'note: {path} also holds EMA weights; the plain weights are used (' + (
            f'the run\'s final EMA weights, after its last epoch, are {written}: give that file '
            'to use them)'
            if written.is_file() else f'the run writes its EMA weights as {written.name} when '
            'it finishes)'))
    save = (f'import argparse, torch; torch.serialization.add_safe_globals([argparse.Namespace]); '
            f'torch.save(torch.load({str(path)!r}, map_location="cpu")[{held[0]!r}], "ema.pt")'
            if held else '')  # (timm's and torchvision's reference scripts save their args)
    return (f'note: {path} also holds EMA weights ({held[0]!r}); the plain weights are used; to '
            f'use the EMA ones, save them alone: python -c {shlex.quote(save)}' if held else '')


def load_weights(path) -> Weights:
    """The model weights in ``path``, the config they were trained with and the class list, for
    evaluation and prediction (:class:`Weights`). ``path`` is a checkpoint (config and classes
    inside), a ``final_weights.pt`` or ``.safetensors`` (both in its metadata when
    :func:`save_final_weights` wrote it; else config from the ``params.json`` and classes from the
    ``classes.tsv`` beside it, each None when absent; ffcv-imagenet's flat params.json is read as
    ``config_schema.nested_ffcv_imagenet_params``; only for a run's own weights files,
    ``RunDir.holds_weights``: another file that lies in a run folder is not that run's), a state
    dict file, or a run folder (``checkpoint.weights_in``). safetensors or torch.save is told by the
    file's first bytes (:func:`is_safetensors`), not its name. ``classes``: ``[(wnid, name),
    ...]``. A state dict saved from a DDP or compiled model has its keys' prefix removed
    (``state_dicts.unwrapped``). Nothing in the file can run code (:func:`safe_torch_load`,
    safetensors). ``note``: EMA weights left aside (:func:`_ema_note`).
    Raises CheckpointError naming the file when it is missing, unsafe or holds no state dict, or
    when its config or class list is not what this tool saves (:func:`checked_config`,
    :func:`checked_classes`)."""
    given, path = path, weights_in(path)  # a run folder: its final weights, else its checkpoint
    if not path.is_file():
        what = 'a folder without a run\'s weights' if path.is_dir() else 'no such weights file'
        raise CheckpointError(f'{path}: {what}; give a run folder, its checkpoint.pt or '
                              f'final_weights.pt/.safetensors, or a torch.save state dict')
    config = classes = content = None
    if is_safetensors(path):
        state, metadata = read_safetensors(path)
        config, classes = described(metadata, path)
    else:
        content = safe_torch_load(path, 'weights file')
        if is_checkpoint(content):
            check_format(content, path)
            return _with_blurpool(_state_dict_in(content.get('model'), path),
                                  checked_config(content.get('config'), path),
                                  checked_classes(content.get('classes'), path),
                                  note=_ema_note(given, path, content))
        state = _state_dict_in(content, path)
        root = getattr(content, '_metadata', {}).get('', {})  # save_final_weights' metadata
        config, classes = described(root.get(METADATA_KEY) if isinstance(root, dict) else None,
                                     path)
    blur_filters = any(k.endswith(BLUR_FILTER) for k in state)
    state = unwrapped(state)
    run = RunDir(path.parent)  # the run folder the file may be in
    params, class_list, own = run.params, run.classes, run.holds_weights(path)
    if own and config is None and params.is_file():
        config = checked_config(nested_ffcv_imagenet_params(
            parsed_json(params.read_text(), str(params))), params)
    if own and classes is None and class_list.is_file():
        classes = read_class_names(class_list)
    return _with_blurpool(state, config, classes, blur_filters or None,
                          note=_ema_note(given, path, content))


def _with_blurpool(state, config, classes, blurpool=None, note: str = '') -> Weights:
    """:class:`Weights`, with ``blurpool`` from ``config`` when there is one."""
    if config:
        blurpool = saved_model_kwargs(config)['use_blurpool']
    return Weights(state, config, classes, blurpool, note)


# Where other tools' checkpoints keep the model's state dict (pytorch/examples' and timm's
# 'state_dict'; others 'model' or 'model_state_dict'), looked for in this order.
STATE_DICT_KEYS = ('state_dict', 'model', 'model_state_dict')


def _state_dict_in(content, path) -> dict:
    """The state dict of tensors that a weights file's ``content`` is, or holds under one of
    :data:`STATE_DICT_KEYS`. CheckpointError naming the file and what it holds otherwise."""
    def tensors(value):
        return isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values())
    if tensors(content):
        return content
    for key in STATE_DICT_KEYS if isinstance(content, dict) else ():
        if tensors(content.get(key)):
            return content[key]
    kind = type(content).__name__
    held = (f'keys {first_few(map(repr, content), 8)}' if content and isinstance(content, dict)
            else f'an empty {kind}' if isinstance(content, (dict, list, tuple)) and not content
            else f'a {kind} of {len(content)}: {first_few((type(v).__name__ for v in content), 3)}'
            if isinstance(content, (list, tuple)) else f'a {kind}')
    raise CheckpointError(f'{path}: holds no state dict of tensors ({held}); save the model\'s '
                          f'state dict alone (torch.save(model.state_dict(), "weights.pt"))')


@dataclass
class SavedModel:
    """A model rebuilt from saved weights: ``model`` (on the CPU, weights loaded, train mode),
    ``config`` the run's resolved config (None when none was saved), ``classes``
    ``[(wnid, name), ...]`` saved with the weights (or None), ``arch`` its name, ``assumed`` a
    line saying which arch and BlurPool setting were taken from the caller because no config is
    saved, for the caller to end with its options ('' when one is: the weights load with
    BlurPool on or off alike, so say it), ``ilsvrc_classes`` True when no class list came with the
    weights and ``classes`` are ILSVRC-2012's, taken for a classifier of 1,000 outputs; ``note``
    lines for the user (EMA weights left aside, :attr:`Weights.note`; a prefix removed from the
    keys; a classifier taken as the .beton's classes without a class list), else '';
    ``use_blurpool`` whether it was built with BlurPool."""
    model: torch.nn.Module
    config: dict
    classes: list
    arch: str
    assumed: str = ''
    ilsvrc_classes: bool = False
    note: str = ''
    use_blurpool: bool = False

    def not_used(self, path, given: dict) -> str:
        """A line for the user naming the options in ``given`` (``{option: value}``: the caller's
        names for the arch and BlurPool, in that order; None: not given) that differ from how the
        config saved with the weights at ``path`` built the model; '' when none do, or without a
        saved config (the options are used then)."""
        differ = [f'{option}={value}' for (option, value), built in zip(
                  given.items(), (self.arch, self.use_blurpool)) if value not in (None, built)]
        if not (self.config and differ):
            return ''
        return (f'note: {" ".join(differ)} not used: the config saved with {path} builds '
                f'{self.arch} with BlurPool {"on" if self.use_blurpool else "off"}')


def load_model(path, *, num_classes: int = None, beton=None, arch: str = None,
               use_blurpool: bool = None, channels_last: bool = True) -> SavedModel:
    """The model saved at ``path`` (a checkpoint or a final_weights.pt, see :func:`load_weights`),
    rebuilt as it was trained: arch, BlurPool and channels_last come from the config saved with the
    weights (``config.saved_model_kwargs``); the keyword values are used only when no config is
    saved (``SavedModel.assumed`` then names them, for the caller to print; ``arch`` None: resnet50;
    ``SavedModel.not_used`` names those that differ from a saved config's). BlurPool then is on
    when its filters are saved (ffcv-imagenet's files), else ``use_blurpool``, None meaning off
    (torchvision's and timm's weights, trained without it, lost about half their top-1 with it).
    ``num_classes``: the class count to build for (e.g. the val .beton's); None takes the length
    of the class list saved with the weights, or, without one, ILSVRC-2012's 1,000 classes
    (sorted wnids: torchvision's order) when the file's classifier has 1,000 outputs. ``beton``:
    the .beton the model is evaluated on; when both it and the weights have a class list, the
    wnids must be the same, in the same order (``classes.check_same_classes``), or the .beton's
    some of the weights' (ImageNet-A, -R: ``models.ClassSubset``, with a note). A prefix that
    every key shares and that keeps them from fitting the arch (a PyTorch Lightning checkpoint's
    ``model.``) is removed (``state_dicts.without_prefix``). Used by
    ``imagenet-ffcv-train`` (eval-only) and ``imagenet-ffcv-predict``.

    Raises CheckpointError naming the file when it is missing or unreadable, when its classes are
    not ``beton``'s, or when the weights do not fit the model (another arch or class count), and
    FileNotFoundError when ``num_classes`` is None, no class list is saved with the weights and
    their classifier has not 1,000 outputs.
    """
    state, saved_config, classes, blurpool, note = load_weights(path)
    if beton is not None:
        check_same_classes(path, classes, beton)
    structure = {'arch': arch or 'resnet50', 'use_blurpool': bool(use_blurpool),
                 'channels_last': channels_last}
    if saved_config:
        structure = saved_model_kwargs(saved_config)
    elif blurpool:  # ffcv-imagenet's BlurPool filters are in the file
        structure['use_blurpool'] = True
    probe = meta_model(arch=structure['arch'], num_classes=1, use_blurpool=False,
                       channels_last=False)
    state, prefix, left_out = without_prefix(state, probe.state_dict(), classifier_keys(probe))
    outputs = _outputs(state, probe) if num_classes is None and not classes else None
    ilsvrc = outputs == 1000
    headless = outputs == 0  # no classifier where arch has one:
    num_classes = 1 if headless else num_classes  # the keys that do not fit, said below
    if num_classes is None and not (classes or ilsvrc):
        raise MissingFileError(f'no class list for {path}: none saved with it and no '
                               'classes.tsv beside it; pass --classes TRAIN.classes.tsv '
                               '(written by imagenet-ffcv-write beside the .beton; for a .beton '
                               'of another tool, write one: a line "index<TAB>wnid" per class, '
                               'in label order)')
    classes = ilsvrc_classes() if ilsvrc else classes
    asked = str(beton) if beton else 'the class list given' if num_classes else None  # errors
    num_classes = num_classes or len(classes)
    model = build_model(arch=structure['arch'], num_classes=num_classes,
                        use_blurpool=bool(structure['use_blurpool']),
                        channels_last=bool(structure['channels_last']))
    problems, head, subset = mismatch(state, model.state_dict()), classifier_keys(model), None
    if problems and head and head <= state.keys() and not mismatch(state, model.state_dict(),
                                                                   ignore=head):
        subset = _class_subset(path, state, structure, beton, classes, num_classes, head, asked)
        model, problems = subset[0], ''  # all the classes trained (else it raised) on some
    if problems:
        raise CheckpointError(f'{path}: the weights do not fit {structure["arch"]}' + (
                              '' if headless else f' with {num_classes} classes') +
                              f': {problems}' + (f' ({prefix_note(prefix, left_out)})' if prefix
                                                 else '') + ('' if saved_config else
                              f' ({structure["arch"]} assumed: no config is saved with the '
                              f'weights; name their arch: predict --arch, eval-only '
                              f'--{ARCH_KEY}' + fit_advice(state, structure['arch']) + ')'))
    model.load_state_dict(state)
    if subset:
        model, classes = ClassSubset(model, subset[1]), read_class_names(class_list_path(beton))
    unchecked = beton and not classes and head and not in_ilsvrc_order(class_list_path(beton))
    note = '\n'.join(filter(None, (
        note, subset and subset[2],
        prefix and f'note: {prefix_note(prefix, left_out, path)}',
        unchecked and (f'note: no class list is saved with {path}: its classifier\'s '
                       f'{num_classes} outputs are taken as the classes of {beton}, in their '
                       f'order'))))
    return SavedModel(model=model, config=saved_config, classes=classes, arch=structure['arch'],
                      assumed='' if saved_config else _assumed(path, structure, blurpool,
                                                               use_blurpool),
                      ilsvrc_classes=ilsvrc, note=note,
                      use_blurpool=bool(structure['use_blurpool']))


def _class_subset(path, state: dict, structure: dict, beton, saved, num_classes, head,
                  asked: str) -> tuple:
    """``(model, indices, note)`` for weights whose classifier alone does not fit the class count
    asked for, evaluated on ``beton``, a .beton of some of the classes they were trained on
    (``classes.some_of``): those of the class list saved with them (``saved``), or, without one
    (None), ILSVRC-2012's 1,000 (the .beton's class list names ILSVRC wnids). Returns the model of
    ``structure`` (``build_model``'s keywords) for all those classes and the indices of the
    .beton's classes among its outputs, in the .beton's order, for ``models.ClassSubset``, and a
    note saying so. Raises CheckpointError naming both class counts (``num_classes``: the one
    asked for, by ``asked``, named in the message: the .beton, 'the class list given', or None
    for the class list that came with the weights; ``head``: the classifier's keys) otherwise,
    saying so when that class list and the classifier differ."""
    listed = class_list_path(beton) if beton else None
    wnids = read_class_list(listed) if listed and listed.is_file() else []
    index = {wnid: i for i, (wnid, _) in enumerate(saved or ilsvrc_classes())}
    outputs = max(state[k].shape[0] for k in head)
    if asked is None:
        raise CheckpointError(f'{path}: its classifier has {outputs} outputs, but the class list '
                              f'that comes with it (saved in it, or the classes.tsv beside it) '
                              f'names {num_classes}: not the classes it was trained on; give '
                              'those (predict --classes)')
    if outputs != len(index) or not some_of(wnids, list(index)):
        raise CheckpointError(
            f'{path}: its classifier has {outputs} outputs, but {num_classes} classes are asked '
            f'for (those of {asked}): use them on the '
            f'classes they were trained on, or fine-tune them on these')
    trained = (f'was trained on {len(saved)} classes' if saved else 'has a classifier of 1,000 '
               'outputs and no class list: taken as ILSVRC-2012\'s classes')
    return (build_model(**{**structure, 'num_classes': len(index)}), [index[w] for w in wnids],
            f'note: {path} {trained}, of which the {len(wnids)} of {beton} are evaluated (their '
            f'logits alone, as ImageNet-A and -R are)')


def _assumed(path, structure: dict, filters_saved: bool, asked) -> str:
    """:attr:`SavedModel.assumed` of weights saved without a config, built as ``structure``
    (``build_model``'s arch and use_blurpool) with BlurPool on where its filters are saved
    (``filters_saved``), else as the caller ``asked`` (None: not asked)."""
    built = f'note: no config saved with {path}: built as {structure["arch"]} with BlurPool '
    if filters_saved:
        return (built + 'on, as the BlurPool filters saved in it say' +
                (' (not off as asked)' if asked is False else '') + '; if it is another arch, '
                'say so')
    return (built + ('on' if structure['use_blurpool'] else 'off') +
            (" (as weights from elsewhere, torchvision's or timm's, are trained)" if asked is None
             else '') + '; if it was trained otherwise, say so')


def _outputs(state: dict, probe: torch.nn.Module):
    """The rows of the classifier weight in ``state`` for a model of ``probe``'s arch: 0 when
    ``state`` lacks it, None when it has no ``nn.Linear`` classifier (SqueezeNet's is a conv)."""
    weight = [k for k in classifier_keys(probe) if k.endswith('weight')]
    return (state[weight[0]].shape[0] if weight[0] in state else 0) if weight else None
