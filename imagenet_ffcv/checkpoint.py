"""Checkpoints: the format (written and read here only), written atomically, read without running
code, and found again for ``--resume``. (Final weights, and models rebuilt from them: ``weights``.)

A checkpoint is one ``torch.save`` file, ``RUN_DIR/checkpoint.pt``, holding::

    {'format': 1, 'model': state dict (no DDP prefix), 'optimizer': the optimizer's state dict,
     'optimizer_class': the optimizer's class name ('SGD', 'AdamW'; absent in older checkpoints),
     'scaler': torch.amp.GradScaler state (only with fp16 mixed precision),
     'ema': the EMA's state dict (AveragedModel: weights, buffers, n_averaged; only with EMA),
     'epoch': epoch to continue,
     'iteration': first iteration of that epoch not yet trained (0: the epoch starts afresh),
     'rng': rank 0's random states {'torch', 'cuda', 'numpy', 'python'},
     'rng_other_ranks': [the same of rank 1, rank 2, ...] (only when the run had several),
     'config': the resolved config (params.json),
     'best_top1': best validation top-1 so far (fraction) or None,
     'classes': [(wnid, name), ...] of the training .beton, or None,
     'progress': {'images', 'train_seconds', 'best_epoch', 'wall_time_s': accumulated so far,
                  'epoch_so_far': within an epoch, rank 0's {'loss_sum', 'images', 'seconds'} of
                  it up to 'iteration', for its log line; else None,
                  'reached': {'epoch', 'time_to_target_s'} once training.target_top1 was
                  reached, else None,
                  'val_pending': the validation of the epoch before 'epoch' was stopped by a
                  signal (absent, as False, in older checkpoints)}}

With ``checkpoint.keep_last=N`` the checkpoints written at the ends of the last N epochs stay
beside it as ``RUN_DIR/checkpoint_epoch_<epochs done>.pt`` (:func:`keep_history`, timm's
``--checkpoint-hist``); each is a complete checkpoint that ``--resume`` takes.

Like nanoGPT's ``ckpt.pt``, the config travels inside the checkpoint, so a checkpoint alone is
enough to rebuild and evaluate its model. Whether a config may resume it: ``config.check_resumable``.

Loading never runs code: every file is read with ``torch.load(weights_only=True)``, which builds
tensors and plain values only, and the ``argparse.Namespace`` of other tools' checkpoints (a pickle
that would call a function is refused with CheckpointError: ``torch_files.safe_torch_load``).
Checkpoints hold nothing else (the numpy RNG state is stored as a tensor).
"""
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config_schema import ARCH_KEY, FORCE_KEY, TARGET_KEY
from .errors import CheckpointError
from .files import atomic_path, atomic_write
from .run_dir import RunDir, latest_checkpoint, restarted_run, unfinished_run_names
from .torch_files import safe_torch_load


@dataclass
class Progress:
    """Where a run stands (in its checkpoint): ``epoch``/``iteration`` the next step to train,
    ``epoch_so_far`` rank 0's figures of that epoch before it (train_one_epoch's ``so_far``);
    ``best_top1``/``best_epoch`` the best val top-1 (fraction) and its epoch; ``images`` and
    ``train_seconds`` of the epochs done, all ranks; ``wall_time_s`` of earlier processes;
    ``val_pending``: the epoch before ``epoch`` is trained but its validation was stopped by a
    signal, so the resumed run validates it first (``evaluate.validate_pending``)."""
    epoch: int = 0
    iteration: int = 0
    best_top1: float = None
    best_epoch: int = None
    images: int = 0
    train_seconds: float = 0.0
    wall_time_s: float = 0.0
    epoch_so_far: dict = None
    reached: dict = None  # {'epoch', 'time_to_target_s'} once validation top-1 reached the target
    val_pending: bool = False

    def saved(self, epoch_so_far: dict, wall_time_s: float) -> dict:
        """The checkpoint's ``progress`` (:func:`training_state`), with ``epoch_so_far`` and
        ``wall_time_s`` (s) as they stand now: ``Progress(epoch=, iteration=, best_top1=,
        **progress)`` reads it back."""
        return {'images': self.images, 'train_seconds': self.train_seconds,
                'best_epoch': self.best_epoch, 'epoch_so_far': epoch_so_far,
                'wall_time_s': wall_time_s, 'reached': self.reached,
                'val_pending': self.val_pending}

    def rebatched(self, was: tuple, now: tuple) -> None:
        """Move a position saved at ``was = (batch size, processes)`` to ``now``'s (a resume forced
        past a change of either): the iteration after as many images, rounded down (the images
        after it are trained again), and rank 0's figures so far as one process's share of the
        images before it, at the same mean loss."""
        if was == now:
            return
        self.iteration = self.iteration * was[0] * was[1] // (now[0] * now[1])
        so_far = self.epoch_so_far
        if so_far and so_far['images']:
            images = self.iteration * now[0]
            self.epoch_so_far = {**so_far, 'images': images,
                                 'loss_sum': so_far['loss_sum'] * images / so_far['images']}

    def epochs_left(self, epochs: int) -> bool:
        """Whether a run of ``epochs`` epochs standing here has an epoch left to train."""
        return self.epoch < epochs and not self.reached


FORMAT = 1
HISTORY = re.compile(r'checkpoint_epoch_(\d+)\.pt')  # keep_history's files

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


def keep_history(latest, *, epochs_done: int, keep_last: int) -> Path:
    """Keep the complete checkpoint ``latest`` (just written by :func:`save`) also as
    ``checkpoint_epoch_<epochs_done>.pt`` beside it (a hard link, as the next :func:`save` renames
    a new file over ``latest``; an atomic copy where the filesystem has no hard links), then delete
    the oldest such files (by time written) beyond ``keep_last`` (>= 1): a file is deleted only
    once the new one is in place. Returns the new file's path. Raises OSError when it cannot be
    made; nothing is deleted then."""
    latest = Path(latest)
    path = latest.with_name(f'checkpoint_epoch_{epochs_done}.pt')
    with atomic_path(path) as tmp:
        try:
            os.link(latest, tmp)
        except OSError:
            shutil.copyfile(latest, tmp)
    history = sorted((p for p in latest.parent.iterdir() if HISTORY.fullmatch(p.name)),
                     key=lambda p: (p.stat().st_mtime, int(HISTORY.fullmatch(p.name)[1])))
    for old in history[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load(path) -> dict:
    """Read a checkpoint written by :func:`save` onto the CPU, without running code
    (:func:`safe_torch_load`). Raises CheckpointError naming the file when it is missing,
    unreadable or unsafe (naming the run's ``checkpoint_epoch_<N>.pt`` beside it, to resume from
    instead), or not one of ours (e.g. a bare ``final_weights.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: checkpoint not found')
    try:
        state = safe_torch_load(path, 'checkpoint')
    except CheckpointError as e:  # damaged, or replaced by another file: either way unusable
        earlier = sorted((p for p in path.parent.iterdir() if HISTORY.fullmatch(p.name)
                          and not p.samefile(path)),  # the newest is a link to the same file
                         key=lambda p: -int(HISTORY.fullmatch(p.name)[1]))
        if not earlier:
            raise
        raise CheckpointError(f'{e}; the run keeps earlier checkpoints: '
                              f'{", ".join(p.name for p in earlier)} (--resume PATH continues '
                              f'from one)') from None
    if not (isinstance(state, dict) and type(state.get('format')) is int):
        raise CheckpointError(f'{path}: not a checkpoint of this tool (no format={FORMAT} record): '
                              f'weights alone (final_weights.pt, another tool\'s) cannot be '
                              f'resumed; to start a run from them, give the file as the model\'s '
                              f'weights, not to --resume')
    check_format(state, path)
    return state


def is_checkpoint(content) -> bool:
    """Whether a loaded weights file's ``content`` is a checkpoint of this tool, of any format: a
    dict with an integer ``format`` and a ``model`` (another tool's may have a ``format`` of its
    own beside its ``state_dict``)."""
    return isinstance(content, dict) and type(content.get('format')) is int and 'model' in content


def check_format(state: dict, path) -> None:
    """CheckpointError naming ``path`` when the checkpoint ``state`` has another format than
    :data:`FORMAT` (a newer version of this tool wrote it)."""
    if state['format'] != FORMAT:
        raise CheckpointError(f'{path}: a checkpoint of format {state["format"]}, written by '
                              f'another version of this tool; this one reads format {FORMAT}: '
                              f'upgrade imagenet-ffcv to read it')


def resolve_resume(resume: str, folder, run_name: str = '', launch: dict = None):
    """The checkpoint ``--resume`` names: '' -> None (a new run; on torchrun's restart of the job's
    workers, ``launch``, its run: ``run_dir.restarted_run``); 'auto' -> the checkpoint of the
    latest run named ``run_name`` ('' : of the unnamed runs) under the logging folder ``folder``
    (``run_dir.latest_checkpoint``; None when there is none, so the same command line starts a run
    and resumes it after a pre-emption, and says so, naming the unfinished runs of other names
    there: a mistyped folder or run name in a requeued job would start over without a word).
    When that run has finished, this says so (the trainer then ends without training: a job
    chain's later jobs do not train a new run); anything else is a checkpoint's path or a run
    folder holding one, which must exist (CheckpointError)."""
    if not resume:
        return restarted_run(folder, run_name, launch)
    if resume == 'auto':
        path = latest_checkpoint(folder, run_name)
        if path and RunDir(path.parent).is_finished:
            print(f'=> {path.parent} has finished (final_weights.pt): nothing to resume; to train '
                  'a new run, leave out --resume auto or give the run another name')
        elif path is None:
            others = unfinished_run_names(folder) if Path(folder).is_dir() else []
            named = f'run named {run_name!r}' if run_name else 'unnamed run'
            found = ', '.join(f'{n!r}' if n else 'unnamed' for n in others)
            print(f'=> --resume auto: no {named} with a checkpoint in {folder}: this starts '
                  f'a new one' + (f' (unfinished runs there: {found}; give its run name to '
                                  f'resume one)' if others else ''), flush=True)
        return path
    path = Path(resume)
    if path.is_dir() and RunDir(path).checkpoint.is_file():  # a run folder
        path = RunDir(path).checkpoint
    if not path.is_file():
        what = 'a folder without a checkpoint.pt' if path.is_dir() else 'no such file'
        raise CheckpointError(f'--resume {resume}: {what}; give a run folder, its checkpoint.pt '
                              f'or "auto" (the latest run under {folder})')
    return path


def finished_found_by_auto(path, resume: str) -> bool:
    """Whether ``--resume auto`` (``resume``) found a finished run, ``path`` its checkpoint
    (:func:`resolve_resume` said so): the trainer then ends without training, so that a job
    chain's later jobs start no new run."""
    return resume == 'auto' and bool(path) and RunDir(path.parent).is_finished


def no_epoch_left(path, progress: Progress, epochs: int, say: bool = True) -> bool:
    """Whether the finished run resumed from its checkpoint ``path`` (None: no run resumed), at
    ``progress`` (restored from it), has no epoch of ``epochs`` left to train: resuming it would
    validate again and write its final weights anew. This says so when ``say``, with what trains
    it on: more epochs (forced), another top-1 target."""
    if not (path and RunDir(path.parent).is_finished) or progress.epochs_left(epochs):
        return False
    if say:
        more = f'give more epochs with {FORCE_KEY}=1'
        how = (f'change or turn off {TARGET_KEY}, which it reached'
               + (f', and {more}' if progress.epoch >= epochs else '')) if progress.reached else more
        print(f'=> {path.parent} has finished (final_weights.pt), and this config leaves it no '
              f'epoch to train: nothing to resume (to train it further, {how})')
    return True


def weights_in(path) -> Path:
    """``path`` as a weights file to read (eval-only, predict, fine-tuning): a run folder gives
    its final_weights.pt (or .safetensors, when copied alone), or, for a run not finished, its
    checkpoint.pt; any other path (a file, a folder without these) is returned as it is, for the
    reader to name."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        return next((p for p in (run.final_weights, run.final_safetensors, run.checkpoint)
                     if p.is_file()), path)
    return path


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


def saved_progress(saved: dict, now: tuple) -> tuple:
    """``(Progress, moved)``: where the checkpoint ``saved`` left its run, moved to the batch size
    and process count ``now`` (:meth:`Progress.rebatched`; a run before ``derived.world_size``
    is taken to have had as many processes), and ``moved`` a line saying so when the iteration
    moved, else ''."""
    progress = Progress(epoch=saved['epoch'], iteration=saved['iteration'],
                        best_top1=saved['best_top1'], **saved['progress'])
    config = saved['config']
    was = (config['training']['batch_size'], config.get('derived', {}).get('world_size', now[1]))
    progress.rebatched(was, now)
    moved = '' if progress.iteration == saved['iteration'] else (
        f"=> the checkpoint's iteration {saved['iteration']} ({was[0]} images x {was[1]} "
        f"process(es)) is iteration {progress.iteration} here ({now[0]} x {now[1]})")
    return progress, moved


def training_state(*, model_state: dict, optimizer, epoch: int, iteration: int, config: dict,
                   classes, best_top1, progress: dict, scaler=None, ema=None,
                   rng: list = None) -> dict:
    """The checkpoint of a run that has trained ``iteration`` iterations of ``epoch`` (the keys of
    the module docstring): ``model_state`` (the unwrapped model's state dict), the optimizer's,
    the loss scaler's and the EMA's states (``scaler``, ``ema``: None when the run has none), the
    random states of every rank in rank order (``rng``: :func:`rng_state` of each, as
    ``distributed.all_gather_object`` gives them; None: this process's alone), the resolved
    ``config`` and ``classes``, the best top-1 so far and ``progress`` (:meth:`Progress.saved`)."""
    rng = rng or [rng_state()]
    state = {'format': FORMAT, 'model': model_state, 'optimizer': optimizer.state_dict(),
             'optimizer_class': type(optimizer).__name__,
             'epoch': epoch, 'iteration': iteration, 'rng': rng[0], 'config': config,
             'best_top1': best_top1, 'classes': classes, 'progress': progress}
    if len(rng) > 1:
        state['rng_other_ranks'] = rng[1:]
    if scaler is not None:
        state['scaler'] = scaler.state_dict()
    if ema is not None:
        state['ema'] = ema.state_dict()
    return state


def restore_training_state(saved: dict, *, model, optimizer, scaler=None, ema=None,
                           rank: int = 0) -> bool:
    """Load a checkpoint written from :func:`training_state` into ``model`` (unwrapped),
    ``optimizer``, ``scaler`` and ``ema`` (each when the run has one and the checkpoint holds it)
    and set the random states that rank ``rank`` had (a rank the checkpoint's run did not have
    keeps its own). The optimizer keeps its own settings (weight decay, momentum, betas: those
    of the current config, which differ from the checkpoint's only under ``checkpoint.force=1``)
    and takes the checkpoint's state (momentum buffers, moments, step counts). Returns False when
    the run has an EMA that the checkpoint lacks (it then starts from the weights at its next
    update), else True. Raises CheckpointError when the checkpoint's weights do not fit ``model``
    (another arch or class count) or its optimizer is of another class or has other parameter
    groups (each possible under ``checkpoint.force=1``)."""
    was, now = saved.get('optimizer_class', type(optimizer).__name__), type(optimizer).__name__
    if was != now:  # SGD's momentum buffers are no state of AdamW's (it would fail at a step)
        raise CheckpointError(f'the checkpoint\'s optimizer is {was} and this run\'s {now}: its '
                              f'state does not carry over; resume with the run\'s optimizer, or '
                              f'start a new run that fine-tunes from the checkpoint\'s weights')
    try:
        model.load_state_dict(saved['model'])
    except RuntimeError as e:  # torch's error, a traceback of missing and unexpected keys
        raise CheckpointError(f'the checkpoint\'s weights do not fit this run\'s model ('
                              f'{" ".join(str(e).split())[:300]}); resume with the run\'s '
                              f'{ARCH_KEY} and classes') from None
    settings = [{k: v for k, v in group.items() if k != 'params'}
                for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved['optimizer'])  # which sets the saved settings too
    except ValueError as e:  # other parameter groups (bn_wd changed, even if forced)
        raise CheckpointError(f'the checkpoint\'s optimizer state does not fit this run\'s '
                              f'parameter groups ({e}); resume with the run\'s weight decay '
                              f'groups (bn_wd) and model') from None
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    if scaler is not None and saved.get('scaler'):
        scaler.load_state_dict(saved['scaler'])
    if ema is not None and saved.get('ema'):
        ema.load_state_dict(saved['ema'])
    states = [saved['rng'], *saved.get('rng_other_ranks', [])]
    if rank < len(states):
        set_rng_state(states[rank])
    return ema is None or bool(saved.get('ema'))
