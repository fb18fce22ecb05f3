"""Checkpoints: written atomically, found again for ``--resume``, checked against the config, and
written on pre-emption (SIGTERM) or Ctrl-C.

A checkpoint is one ``torch.save`` file, ``RUN_DIR/checkpoint.pt``, holding::

    {'format': 1, 'model': state dict (no DDP prefix), 'optimizer': the optimizer's state dict,
     'scaler': torch.amp.GradScaler state (only with fp16 mixed precision), 'epoch': epoch to continue,
     'iteration': first iteration of that epoch not yet trained (0: the epoch starts afresh),
     'rng': {'torch', 'cuda', 'numpy', 'python'}, 'config': the resolved config (params.json),
     'best_top1': best validation top-1 so far (fraction) or None, 'classes': class wnids,
     'progress': {'images', 'train_seconds', 'wall_time_s'} accumulated so far}

Like nanoGPT's ``ckpt.pt``, the config travels inside the checkpoint, so a checkpoint alone is
enough to rebuild and evaluate its model.
"""
import json
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .classes import read_class_names
from .config import flatten
from .files import atomic_write
from .models import build_model
from .run_dir import CHECKPOINT_NAME, latest_unfinished_checkpoint

FORMAT = 1

# Config keys that may change between a run and its resumption: how data is read, what is logged
# and how validation is done. Any other difference (epochs, LR, resolution schedule, batch, model,
# seed, ...) changes the schedule the run is half-way through and is refused unless forced.
# The mixed precision (a device property) and the code version may change as well.
RESUMABLE_CHANGES = ('data.', 'logging.', 'validation.', 'checkpoint.', 'dist.', 'code.',
                     'training.eval_only', 'training.target_top1', 'training.amp',
                     'derived.device', 'derived.amp')


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or resumed with this config; the message says why
    and what to do."""


def save(state: dict, path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to disk,
    then renamed over ``path``. A crash or kill at any moment leaves either the previous complete
    file or the new complete file at ``path``, never a partial one."""
    with atomic_write(path, 'wb') as f:
        torch.save(state, f)


def load(path) -> dict:
    """Read a checkpoint written by :func:`save` onto the CPU. Raises CheckpointError naming the
    file when it is missing, unreadable or not one of ours (e.g. a bare ``final_weights.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: checkpoint not found')
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # truncated or foreign file: torch raises several types
        raise CheckpointError(f'{path}: cannot read the checkpoint ({type(e).__name__}: {e})') from e
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise CheckpointError(f'{path}: not a checkpoint of this tool (no format={FORMAT} record); '
                              'final_weights.pt holds weights only and cannot be resumed')
    return state


def resolve_resume(resume: str, folder):
    """The checkpoint ``--resume`` names: '' -> None (a new run); 'auto' -> :func:`find_latest` of
    the logging folder (None when there is none, so the same command line starts a run and resumes
    it after a pre-emption; see ``run_dir.latest_unfinished_checkpoint``); anything else is a path, which must exist (CheckpointError)."""
    if not resume:
        return None
    if resume == 'auto':
        return latest_unfinished_checkpoint(folder)
    if not Path(resume).is_file():
        raise CheckpointError(f'checkpoint.resume={resume}: no such file; give a checkpoint.pt '
                              f'path or "auto" (the latest unfinished run under {folder})')
    return Path(resume)


def schedule_changes(saved: dict, current: dict) -> list:
    """``['key: saved -> current', ...]`` for each config key (``{'section': {'key': value}}``
    dicts, ``derived`` included) that differs and is not in :data:`RESUMABLE_CHANGES`."""
    old, new = flatten(saved), flatten(current)
    return [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def rng_state() -> dict:
    """The random states of torch (CPU and CUDA), numpy's global generator and Python's random."""
    return {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(),
            'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned. (ffcv's random crops draw from numba's own
    generator, which cannot be saved: crops after a resume differ from an uninterrupted run.)"""
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if state.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class StopRequest:
    """Turns SIGTERM (cluster pre-emption, ``kill``) and the first Ctrl-C (SIGINT) into a flag the
    training loop polls, so it can finish the current step, write a checkpoint and exit. A second
    Ctrl-C raises KeyboardInterrupt at once (abandon the step, no checkpoint).

    Use as a context manager around the training loop; the previous handlers are restored on exit.
    ``signum`` is the signal received (None while none), ``exit_code`` the conventional 128 + signum.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f'\n=> {signal.Signals(signum).name} received: finishing this step, then writing a '
              'checkpoint (Ctrl-C again to abandon)', flush=True)

    def __bool__(self):
        return self.signum is not None

    @property
    def name(self) -> str:
        """'SIGTERM', 'SIGINT', or 'a signal on another rank' when this rank received none."""
        return signal.Signals(self.signum).name if self.signum else 'a signal on another rank'

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


def load_weights(path):
    """The model weights in ``path``, the config they were trained with and the class list, for
    evaluation and prediction: ``(state_dict, config, classes)``. ``path`` is a checkpoint (config
    and classes inside) or a ``final_weights.pt`` (config from the ``params.json`` and classes from
    the ``classes.tsv`` beside it, each None when absent). ``classes``: ``[(wnid, name), ...]``.
    Raises CheckpointError naming the file when it is missing or holds no state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such weights file; give a run\'s checkpoint.pt or '
                              'final_weights.pt')
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise CheckpointError(f'{path}: cannot read the weights ({type(e).__name__}: {e})') from e
    if isinstance(state, dict) and state.get('format') == FORMAT:
        classes = [tuple(c) for c in state['classes']] if state.get('classes') else None
        return state['model'], state['config'], classes
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        raise CheckpointError(f'{path}: neither a checkpoint nor a state dict of tensors')
    params, classes = path.with_name('params.json'), path.with_name('classes.tsv')
    return (state, json.loads(params.read_text()) if params.is_file() else None,
            read_class_names(classes) if classes.is_file() else None)


# The config keys that define a trained model's structure, (section, key) -> build_model's argument
# (as nanoGPT's list of model_args): the one place a saved run is turned back into a model.
MODEL_KEYS = {('model', 'arch'): 'arch', ('training', 'use_blurpool'): 'use_blurpool',
              ('training', 'channels_last'): 'channels_last'}


@dataclass
class SavedModel:
    """A model rebuilt from saved weights: ``model`` (on the CPU, weights loaded, train mode),
    ``config`` the run's resolved config (None when none was saved), ``classes``
    ``[(wnid, name), ...]`` saved with the weights (or None), ``arch`` its name."""
    model: torch.nn.Module
    config: dict
    classes: list
    arch: str


def load_model(path, *, num_classes: int = None, arch: str = 'resnet50', use_blurpool: bool = True,
               channels_last: bool = True) -> SavedModel:
    """The model saved at ``path`` (a checkpoint or a final_weights.pt, see :func:`load_weights`),
    rebuilt as it was trained: arch, BlurPool and channels_last come from the config saved with the
    weights (:data:`MODEL_KEYS`); the keyword values are used only when no config is saved.
    ``num_classes``: the class count to build for (e.g. the val .beton's); None takes the length
    of the class list saved with the weights. Used by ``train_imagenet.py`` (eval-only) and
    ``predict.py``.

    Raises CheckpointError naming the file when it is missing or unreadable, or when the weights
    do not fit the model (another arch or class count), and FileNotFoundError when
    ``num_classes`` is None and no class list is saved with the weights.
    """
    state, saved_config, classes = load_weights(path)
    structure = {'arch': arch, 'use_blurpool': use_blurpool, 'channels_last': channels_last}
    if saved_config:
        structure = {name: saved_config[section][key]
                     for (section, key), name in MODEL_KEYS.items()}
    if num_classes is None:
        if not classes:
            raise FileNotFoundError(f'no class list for {path}: none saved with it and no '
                                    'classes.tsv beside it; pass --classes TRAIN.classes.tsv '
                                    '(written by write_beton.py beside the .beton)')
        num_classes = len(classes)
    model = build_model(arch=structure['arch'], num_classes=num_classes,
                        use_blurpool=bool(structure['use_blurpool']),
                        channels_last=bool(structure['channels_last']))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f'{path}: the weights do not fit {structure["arch"]} with '
                              f'{num_classes} classes: {str(e).splitlines()[0]}') from None
    return SavedModel(model=model, config=saved_config, classes=classes, arch=structure['arch'])
