"""Checkpoints: the format (written and read here only), written atomically, found again for
``--resume`` and checked against the config; the final weights (.pt and .safetensors).

A checkpoint is one ``torch.save`` file, ``RUN_DIR/checkpoint.pt``, holding::

    {'format': 1, 'model': state dict (no DDP prefix), 'optimizer': the optimizer's state dict,
     'scaler': torch.amp.GradScaler state (only with fp16 mixed precision),
     'ema': the EMA's state dict (AveragedModel: weights, buffers, n_averaged; only with EMA),
     'epoch': epoch to continue,
     'iteration': first iteration of that epoch not yet trained (0: the epoch starts afresh),
     'rng': {'torch', 'cuda', 'numpy', 'python'}, 'config': the resolved config (params.json),
     'best_top1': best validation top-1 so far (fraction) or None,
     'classes': [(wnid, name), ...] of the training .beton, or None,
     'progress': {'images', 'train_seconds', 'best_epoch', 'wall_time_s'} accumulated so far}

Like nanoGPT's ``ckpt.pt``, the config travels inside the checkpoint, so a checkpoint alone is
enough to rebuild and evaluate its model.

Loading never runs code: every file is read with ``torch.load(weights_only=True)``, which builds
tensors and plain values only (a pickle that would call a function is refused with CheckpointError).
Checkpoints hold nothing else (the numpy RNG state is stored as a tensor). The final weights are also
written as ``final_weights.safetensors`` (safetensors: tensors only, no pickle at all), which
eval-only and ``imagenet-ffcv-predict`` read as well.
"""
import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from .classes import read_class_names
from .config import flatten
from .files import atomic_path, atomic_write
from .models import build_model
from .run_dir import CHECKPOINT_NAME, latest_unfinished_checkpoint

FORMAT = 1
# What a checkpoint written before the numpy RNG state was stored as a tensor needs besides tensors:
# numpy arrays, rebuilt from their bytes (no other code can run through these).
NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                       getattr(np, '_core', None) and np._core.multiarray._reconstruct
                       or np.core.multiarray._reconstruct]
SAFETENSORS_FORMAT = 'imagenet_ffcv final weights'

# Config keys that may change between a run and its resumption: how data is read, what is logged
# and how validation is done. Any other difference (epochs, LR, resolution schedule, batch, model,
# seed, ...) changes the schedule the run is half-way through and is refused unless forced.
# The mixed precision (a device property), torch.compile and the code version may change as well.
RESUMABLE_CHANGES = ('data.', 'logging.', 'validation.', 'checkpoint.', 'dist.', 'code.',
                     'training.eval_only', 'training.target_top1', 'training.amp',
                     'training.compile', 'derived.device', 'derived.amp')


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or resumed with this config; the message says why
    and what to do."""


def save(state: dict, path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to disk,
    then renamed over ``path``. A crash or kill at any moment leaves either the previous complete
    file or the new complete file at ``path``, never a partial one. Raises CheckpointError naming
    the file and the cause when it cannot be written (disk full, no permission): the previous
    file is then intact."""
    try:
        with atomic_write(path, 'wb') as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer reports a failed write as a RuntimeError raised while it
        # handles the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(f'{path}: could not be written ({cause.strerror or cause}); the '
                              f'previous {Path(path).name} is intact: free some space or fix the '
                              f'folder, then resume') from e


def safe_torch_load(path, what: str = 'file'):
    """``torch.load`` of ``path`` onto the CPU that builds tensors and plain values only
    (``weights_only=True``, plus numpy arrays for checkpoints of earlier versions). Raises
    CheckpointError naming the file when it holds anything else (a pickle that would run code on
    loading: refused, nothing of it runs) or cannot be read (truncated, not a torch file)."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if 'global' in line.lower()
                 or 'but got' in line] or str(e).strip().splitlines()[-1:]
        first = lines[0].strip()[:300]
        raise CheckpointError(
            f'{path}: refused: the {what} holds Python objects other than tensors and plain values '
            f'({first}); loading it could run code, so it was not loaded. Use weights written by '
            f'this tool (checkpoint.pt, final_weights.pt or final_weights.safetensors), or convert '
            f'a trusted file to a plain state dict of tensors') from None
    except Exception as e:  # truncated or foreign file: torch raises several types
        raise CheckpointError(f'{path}: cannot read the {what} ({type(e).__name__}: {e})') from e


def load(path) -> dict:
    """Read a checkpoint written by :func:`save` onto the CPU, without running code
    (:func:`safe_torch_load`). Raises CheckpointError naming the file when it is missing,
    unreadable, unsafe or not one of ours (e.g. a bare ``final_weights.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: checkpoint not found')
    state = safe_torch_load(path, 'checkpoint')
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


def check_schedule(saved: dict, current: dict, *, force: bool, path) -> None:
    """Raise CheckpointError listing :func:`schedule_changes` between the checkpoint ``saved``
    (read from ``path``) and the resolved config ``current``, unless there are none or ``force``
    (``checkpoint.force=1``)."""
    changes = schedule_changes(saved['config'], current)
    if changes and not force:
        raise CheckpointError(f'{path}: this config changes the schedule of the run being '
                              f'resumed:\n  ' + '\n  '.join(changes) + '\nresume with the config '
                              'of the run, or set checkpoint.force=1 to continue anyway')


def rng_state() -> dict:
    """The random states of torch (CPU and CUDA), numpy's global generator (its key as an int64
    tensor, so the checkpoint holds no numpy object) and Python's random."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'numpy': (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                      cached_gaussian),
            'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (also the numpy array of earlier checkpoints).
    The training crops do not depend on these: they are a function of the seed, the epoch and the
    sample (``decoders``)."""
    torch.set_rng_state(state['torch'])
    name, key, pos, has_gauss, cached_gaussian = state['numpy']
    np.random.set_state((name, np.asarray(key).astype(np.uint32), pos, has_gauss,
                         cached_gaussian))
    random.setstate(state['python'])
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # earlier checkpoints: every visible GPU's state
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)  # this process's GPU (the run may have fewer now)


def training_state(*, model_state: dict, optimizer, epoch: int, iteration: int, config: dict,
                   classes, best_top1, progress: dict, scaler=None, ema=None) -> dict:
    """The checkpoint of a run that has trained ``iteration`` iterations of ``epoch`` (the keys of
    the module docstring): ``model_state`` (the unwrapped model's state dict), the optimizer's,
    the loss scaler's and the EMA's states (``scaler``, ``ema``: None when the run has none), the
    random states (:func:`rng_state`), the resolved ``config`` and ``classes``, the best top-1
    so far and ``progress`` (``{'images', 'train_seconds', 'best_epoch', 'wall_time_s'}``)."""
    state = {'format': FORMAT, 'model': model_state, 'optimizer': optimizer.state_dict(),
             'epoch': epoch, 'iteration': iteration, 'rng': rng_state(), 'config': config,
             'best_top1': best_top1, 'classes': classes, 'progress': progress}
    if scaler is not None:
        state['scaler'] = scaler.state_dict()
    if ema is not None:
        state['ema'] = ema.state_dict()
    return state


def restore_training_state(saved: dict, *, model, optimizer, scaler=None, ema=None) -> bool:
    """Load a checkpoint written from :func:`training_state` into ``model`` (unwrapped),
    ``optimizer``, ``scaler`` and ``ema`` (each when the run has one and the checkpoint holds it)
    and set the random states. Returns False when the run has an EMA that the checkpoint lacks
    (it then starts from the weights at its next update), else True."""
    model.load_state_dict(saved['model'])
    optimizer.load_state_dict(saved['optimizer'])
    if scaler is not None and saved.get('scaler'):
        scaler.load_state_dict(saved['scaler'])
    if ema is not None and saved.get('ema'):
        ema.load_state_dict(saved['ema'])
    set_rng_state(saved['rng'])
    return ema is None or bool(saved.get('ema'))


def save_final_weights(state_dict: dict, path, *, config: dict = None, classes=None) -> Path:
    """Write the final weights twice, atomically: ``path`` (``torch.save`` of the state dict, as
    torchvision's keys) and ``path`` with the suffix ``.safetensors`` (safetensors; the config and
    class list in its metadata as JSON, so the file alone rebuilds the model). Returns the second
    path. Raises OSError (disk full, no permission) naming the file."""
    path = Path(path)
    save(state_dict, path)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    metadata = {'format': SAFETENSORS_FORMAT, 'config': json.dumps(config),
                'classes': json.dumps(classes)}
    safe_path = path.with_suffix('.safetensors')
    with atomic_path(safe_path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    return safe_path


def _load_safetensors(path) -> tuple:
    """``(state_dict, config or None, classes or None)`` of a .safetensors weights file."""
    try:
        state = safetensors.torch.load_file(str(path), device='cpu')
        with safetensors.safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f'{path}: cannot read the weights ({type(e).__name__}: {e})') from e
    config = json.loads(metadata['config']) if metadata.get('config') else None
    classes = json.loads(metadata['classes']) if metadata.get('classes') else None
    return state, config, [tuple(c) for c in classes] if classes else None


def load_weights(path):
    """The model weights in ``path``, the config they were trained with and the class list, for
    evaluation and prediction: ``(state_dict, config, classes)``. ``path`` is a checkpoint (config
    and classes inside), a ``final_weights.pt`` (config from the ``params.json`` and classes from
    the ``classes.tsv`` beside it, each None when absent) or a ``final_weights.safetensors``
    (both in its metadata, else beside it). ``classes``: ``[(wnid, name), ...]``. Nothing in the
    file can run code (:func:`safe_torch_load`, safetensors).
    Raises CheckpointError naming the file when it is missing, unsafe or holds no state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such weights file; give a run\'s checkpoint.pt, '
                              'final_weights.pt or final_weights.safetensors')
    config = classes = None
    if path.suffix == '.safetensors':
        state, config, classes = _load_safetensors(path)
    else:
        state = safe_torch_load(path, 'weights file')
        if isinstance(state, dict) and state.get('format') == FORMAT:
            classes = [tuple(c) for c in state['classes']] if state.get('classes') else None
            return state['model'], state['config'], classes
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        raise CheckpointError(f'{path}: neither a checkpoint nor a state dict of tensors')
    params, class_list = path.with_name('params.json'), path.with_name('classes.tsv')
    if config is None and params.is_file():
        config = json.loads(params.read_text())
    if classes is None and class_list.is_file():
        classes = read_class_names(class_list)
    return state, config, classes


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
    of the class list saved with the weights. Used by ``imagenet-ffcv-train`` (eval-only) and
    ``imagenet-ffcv-predict``.

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
                                    '(written by imagenet-ffcv-write beside the .beton)')
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
