"""One training epoch and one evaluation pass. The same code runs on CPU (fp32) and CUDA (bf16, or
fp16 with loss scaling: ``precision``)."""
import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from tqdm import tqdm

from . import distributed
from .commands import progress_bar
from .constants import DEFAULT_CROP_RATIO
from .errors import ImagenetFfcvError
from .metrics import topk_correct


def flip_tta_logits(model, x: torch.Tensor, flip_tta: bool = True) -> torch.Tensor:
    """Logits of ``model`` for images ``x`` (float (N, 3, H, W)): with ``flip_tta``, the mean of
    the logits of the images and of their left-right flips (test-time augmentation, as
    ffcv-imagenet's validation), else the logits of the images. The one rule shared by validation
    and ``imagenet-ffcv-predict`` (which takes the softmax of these logits). Returns float32
    (N, classes): the views are averaged in float32, not in autocast's bfloat16 (8 significant
    bits: logits near 200 come in steps of 1)."""
    logits = model(x).float()
    if flip_tta:
        logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
    return logits


class NonFiniteLossError(ImagenetFfcvError, FloatingPointError):
    """The training loss became NaN or infinite; ``epoch`` and ``iteration`` locate the first such
    step. The weights are spoilt from that step on: resume from the last checkpoint instead."""

    def __init__(self, epoch: int, iteration: int):
        self.epoch, self.iteration = epoch, iteration
        super().__init__(f'non-finite training loss at epoch {epoch}, iteration {iteration}: '
                         'stopped without saving; the last checkpoint is the last good state '
                         '(lower the LR, or check the data, then resume from it)')


class CorruptRecordError(ImagenetFfcvError, ValueError):
    """A sample of the .beton did not decode (corrupt bytes in its record); the message names the
    file and the sample on the rank that met it."""


def _raise_if_corrupt(message, corrupt_on_any_rank: bool) -> None:
    if corrupt_on_any_rank:
        raise CorruptRecordError(message or 'a sample of a .beton did not decode on another rank '
                                 '(its message names it); stopped')


@dataclass
class StepOptions:
    """The optional parts of a training step, all off by default.

    clip_grad_norm: clip the global L2 norm of the gradients to this value before the step
    (``torch.nn.utils.clip_grad_norm_``, after unscaling under fp16); 0: off.
    augment: a per-image transform of the batch ``x -> x`` (float (B, 3, H, W), normalised), e.g.
    ``augment.batch_augmenter``'s RandAugment/TrivialAugmentWide/RandomErasing, on the batch's
    device before ``mix``; None: off.
    mix: a batch transform ``(x, y) -> (x, soft targets float (B, classes))``, e.g.
    ``mixup.batch_mixer``'s MixUp/CutMix, applied to each batch on its device; None: off.
    ema: a ``torch.optim.swa_utils.AveragedModel`` of the model, updated from its parameters and
    buffers every ``ema_every`` optimizer steps of the run, counted across epochs; None: off.
    grad_accum_steps: gradient accumulation (timm's ``--grad-accum-steps``): the gradients of this
    many consecutive batches are summed, each loss divided by the group's batch count, before one
    optimizer step, so the step is that of one batch that many times larger (without BatchNorm;
    BatchNorm normalizes each batch alone). Under DDP only the group's last backward pass
    all-reduces (``no_sync``). The LR, clipping, the loss scaler and the EMA step once per optimizer
    step; the last group of an epoch may hold fewer batches.
    """
    clip_grad_norm: float = 0.0
    augment: Callable = None
    mix: Callable = None
    ema: torch.nn.Module = None
    ema_every: int = 1
    grad_accum_steps: int = 1


@dataclass
class EpochHooks:
    """What :func:`train_one_epoch` calls back between steps, and how often.

    stop_requested: ``() -> bool``, true once this rank is asked to stop (a signal, see
    ``signals.StopRequest``); corrupt_record: ``() -> message or None`` (a sample that did not
    decode, see ``loaders.Loader.corrupt_record``); None: never. The ranks agree on both (and on a
    non-finite loss) every ``check_every`` iterations, at the last one, and at each checkpoint
    iteration; these must be the same on every rank (each is a collective). ``log_every`` may
    differ (live logs are rank 0's): a log iteration is no check.
    save_checkpoint: ``(iterations done, the epoch so far) -> None``, every ``checkpoint_every``
    iterations (0: never) except the last; the epoch so far: this rank's ``{'loss_sum': float,
    'images': int, 'seconds': float}`` from the epoch's start, for ``train_one_epoch(so_far=)``.
    log_train: ``(iterations done, {'loss', 'lr', 'img_per_s'}) -> None`` every ``log_every``
    iterations (0: never), with this rank's loss of that iteration and the img/s of all processes
    (this one's x their number).
    """
    stop_requested: Callable = None
    corrupt_record: Callable = None
    check_every: int = 10
    save_checkpoint: Callable = None
    checkpoint_every: int = 0
    log_train: Callable = None
    log_every: int = 0


def _agree(first_bad, iterations: int, epoch: int, stop_requested, corrupt_record) -> bool:
    """The ranks' check of :func:`train_one_epoch` (one all-reduce): raises CorruptRecordError
    or NonFiniteLossError when any rank met one; returns False when any rank asks to stop."""
    device = first_bad.device
    stop_here = bool(stop_requested and stop_requested())
    corrupt = corrupt_record() if corrupt_record else None
    bad, go_on, intact = distributed.all_reduce_min(torch.stack([
        first_bad, torch.tensor(0 if stop_here else 1, device=device),
        torch.tensor(0 if corrupt else 1, device=device)]))
    _raise_if_corrupt(corrupt, intact == 0)
    if bad < iterations:
        raise NonFiniteLossError(epoch, int(bad))
    return bool(go_on)


def forward_backward(*, model, x, y, loss_fn, amp_dtype=None, scaler=None, augment=None,
                     mix=None, loss_divisor: int = 1, sync: bool = True) -> torch.Tensor:
    """Forward and backward pass on the batch ``x`` (float (B, 3, H, W)), ``y`` (int64 (B,)),
    adding the gradients of ``loss / loss_divisor`` to the parameters' ``.grad``: the forward pass
    under autocast to ``amp_dtype`` (None: full precision), the loss scaled by ``scaler`` (a
    ``torch.amp.GradScaler``, for fp16) when given. ``sync`` False: inside the model's
    ``no_sync()`` (DistributedDataParallel keeps the gradients local until a pass with ``sync``;
    a model without ``no_sync`` is unaffected). augment, mix: see :class:`StepOptions` (augment
    first); with mix the loss takes the soft targets. Returns the detached loss, not divided (a 0-d
    tensor; no device sync)."""
    if augment is not None:
        x = augment(x)
    if mix is not None:
        x, y = mix(x, y)
    no_sync = getattr(model, 'no_sync', None) if not sync else None
    with no_sync() if no_sync else contextlib.nullcontext():
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(x), y)
        part = loss / loss_divisor if loss_divisor != 1 else loss
        (scaler.scale(part) if scaler is not None else part).backward()
    return loss.detach()


def optimizer_step(*, model, optimizer, scaler=None, clip_grad_norm: float = 0.0) -> None:
    """One optimizer step on the gradients the parameters hold: clipped to the global norm
    ``clip_grad_norm`` first (0: off; ``torch.nn.utils.clip_grad_norm_``, after unscaling under
    fp16); with ``scaler`` the step is skipped when the gradients overflow, then the scale
    updated, as ``torch.amp`` documents."""
    if clip_grad_norm:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_step(*, model, x, y, optimizer, loss_fn, amp_dtype=None, scaler=None,
               clip_grad_norm: float = 0.0, mix=None) -> torch.Tensor:
    """One optimizer step on one batch: gradients zeroed, :func:`forward_backward`,
    :func:`optimizer_step` (see those for the arguments). Returns the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(model=model, x=x, y=y, loss_fn=loss_fn, amp_dtype=amp_dtype,
                            scaler=scaler, mix=mix)
    optimizer_step(model=model, optimizer=optimizer, scaler=scaler, clip_grad_norm=clip_grad_norm)
    return loss


def _start_step(optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group['lr'] = lr
    optimizer.zero_grad(set_to_none=True)
    return lr


def _show(bar, *, loss, lr: float, img_per_s: float, eta_s: float) -> None:
    bar.set_postfix(loss=f'{float(loss):.3f}', lr=f'{lr:.3g}', img_per_s=f'{img_per_s:.0f}',
                    eta=tqdm.format_interval(eta_s), refresh=False)  # shown at the bar's redraw


@contextlib.contextmanager
def _progress(loader, first: int, *, desc: str, show: bool):
    """A tqdm bar (shown when ``show``) over the batches of ``loader`` from batch ``first`` on;
    the ones before are not decoded where the loader can start there
    (``loaders.Loader.epoch_from``). Leaving the block (at the end, a stop or an error) closes
    the bar and the loader's epoch, whose thread then stops decoding and leaves its buffers to
    the next epoch (tqdm closes what it iterates only when the bar is disabled)."""
    batches = (loader.epoch_from(first) if hasattr(loader, 'epoch_from') else
               itertools.islice(loader, first, None))
    bar = progress_bar(batches, desc=desc, total=len(loader), initial=first, disable=not show,
                       leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
        if hasattr(batches, 'close'):
            batches.close()


class _Tally:
    """An epoch's figures as :func:`train_one_epoch` goes, from ``so_far`` on: the loss summed
    over its images and the first iteration whose loss is not finite (``iterations``: none yet),
    both kept on the device so that adding needs no sync; the images and the seconds."""

    def __init__(self, so_far: dict, device, iterations: int):
        so_far = so_far or {'loss_sum': 0.0, 'images': 0, 'seconds': 0.0}
        self.loss_sum = torch.tensor(so_far['loss_sum'], dtype=torch.float64, device=device)
        self.iterations = iterations
        self.first_bad = torch.full((), iterations, dtype=torch.int64, device=device)
        self.images = self.images_before = so_far['images']
        self.seconds_before, self.start = so_far['seconds'], time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, iteration: int) -> None:
        """The loss (a 0-dim tensor, mean over ``images``) of ``iteration``."""
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad < self.iterations),
                                     self.first_bad, iteration)
        self.loss_sum += loss.double() * images
        self.images += images

    def this_process(self) -> tuple:
        """(images, seconds) of this process's part of the epoch."""
        return self.images - self.images_before, time.perf_counter() - self.start

    def figures(self) -> dict:
        """``{'loss_sum', 'images', 'seconds'}`` of the epoch so far (``so_far`` of a resume)."""
        return {'loss_sum': float(self.loss_sum), 'images': self.images,
                'seconds': self.seconds_before + time.perf_counter() - self.start}


def train_one_epoch(*, model, loader, optimizer, loss_fn, lr_at, epoch: int, amp_dtype=None,
                    scaler=None, options: StepOptions = None, hooks: EpochHooks = None,
                    show_progress: bool = True, start_iteration: int = 0, so_far: dict = None,
                    iterations_after: float = 0.0) -> dict:
    """Train ``model`` on every batch of ``loader`` once: :func:`forward_backward` on each batch,
    :func:`optimizer_step` after every ``options.grad_accum_steps`` of them.

    lr_at: function of the fractional epoch giving the LR; the optimizer step over iterations
    ``a..b-1`` takes ``lr_at(epoch + (a + b) / 2 / len(loader))`` (one batch a step: ``(i + 0.5) /
    len(loader)``), set on every parameter group before its first batch.
    amp_dtype, scaler: the mixed precision (``precision.Precision``, :func:`forward_backward`).
    options: clipping, augmentation, mixing, EMA, accumulation (:class:`StepOptions`; None: off).
    hooks: stop requests, corrupt records, checkpoints and live logs (:class:`EpochHooks`; None:
    none), their periods in iterations, run after the optimizer step that reaches one. A
    non-finite loss on any rank raises :class:`NonFiniteLossError` at the next check, a corrupt
    record :class:`CorruptRecordError`; a stop request ends the epoch there, ``'stopped'`` true.
    Batches: float images (B, 3, H, W) and int64 labels (B,) on the model's device.
    start_iteration: resume within the epoch: batches ``0..start_iteration-1`` are not trained
    on again (the loader's order is fixed by its seed and epoch). A loader with ``epoch_from``
    (``loaders.Loader``) does not decode them; from any other iterable they are read and dropped.
    Past the epoch's end (a resume forced past a change of batch size or GPUs): the epoch is done.
    so_far: the epoch's figures before ``start_iteration`` (what ``hooks.save_checkpoint`` was
    given with the checkpoint resumed), counted in the returned ones; None: nothing before.
    iterations_after: the work of the later epochs, in iterations of this one
    (``schedules.remaining_work``): the bar's ``eta`` is the run's time left at this speed.

    Returns the epoch's figures up to where it ended, ``so_far`` included: ``{'train_loss': mean
    loss per image, 'images': this process's, 'seconds': wall time, 'lr': the last step's,
    'iterations_done': ``len(loader)`` unless stopped early, 'stopped': the ranks agreed to stop,
    'so_far': these figures as a checkpoint holds them}``.
    """
    model.train()
    options, hooks = options or StepOptions(), hooks or EpochHooks()
    iterations = len(loader)
    start_iteration = min(start_iteration, iterations)
    tally = _Tally(so_far, next(model.parameters()).device, iterations)
    done, stopped, lr = start_iteration, False, 0.0
    accum, step_end = options.grad_accum_steps, start_iteration  # the last step's end
    with _progress(loader, start_iteration, desc=f'epoch {epoch}', show=show_progress) as bar:
        for i, (x, y) in enumerate(bar, start_iteration):
            group = min(accum, iterations - step_end)  # the batches of this optimizer step
            if i == step_end:  # a new optimizer step: its LR, at its middle, and no gradients yet
                lr = _start_step(optimizer, lr_at(epoch + (step_end + group / 2) / iterations))
            loss = forward_backward(model=model, x=x, y=y, loss_fn=loss_fn, amp_dtype=amp_dtype,
                                    scaler=scaler, augment=options.augment, mix=options.mix,
                                    loss_divisor=group, sync=i + 1 == step_end + group)
            tally.add(loss, y.shape[0], i)
            done = i + 1
            if done < step_end + group:  # accumulating; hooks and checks follow optimizer steps
                continue
            optimizer_step(model=model, optimizer=optimizer, scaler=scaler,
                           clip_grad_norm=options.clip_grad_norm)
            run_step = epoch * -(-iterations // accum) + -(-done // accum)  # from 1, as done
            if options.ema is not None and run_step % options.ema_every == 0:
                options.ema.update_parameters(model)
            # due: a multiple of its period (in iterations) was reached in this optimizer step
            checkpoint_due, log_due, check_due = (
                bool(every) and done // every != step_end // every
                for every in (hooks.checkpoint_every, hooks.log_every, hooks.check_every))
            step_end = done
            agree_due = done == iterations or check_due or checkpoint_due  # alike on all ranks
            if agree_due or log_due:  # (not agree_due: True, without the collective)
                go_on = not agree_due or _agree(tally.first_bad, iterations, epoch,
                                                hooks.stop_requested, hooks.corrupt_record)
                images, seconds = tally.this_process()
                img_per_s = images * distributed.processes() / seconds
                if log_due and hooks.log_train:
                    hooks.log_train(done, {'loss': float(loss), 'lr': lr, 'img_per_s': img_per_s})
                if show_progress:
                    _show(bar, loss=loss, lr=lr, img_per_s=img_per_s, eta_s=seconds * (
                        iterations - done + iterations_after) / (done - start_iteration))
                if not go_on:
                    stopped = True
                    break
                if checkpoint_due and done < iterations:
                    hooks.save_checkpoint(done, tally.figures())
    whole = tally.figures()
    return {'train_loss': whole['loss_sum'] / max(whole['images'], 1), 'images': whole['images'],
            'seconds': whole['seconds'], 'lr': lr, 'iterations_done': done, 'stopped': stopped,
            'so_far': whole}


@torch.no_grad()
def evaluate(*, model, loader, amp_dtype=None, flip_tta: bool = True, ten_crop: bool = False,
             corrupt_record=None, progress: str = '', stop_requested: Callable = None) -> dict:
    """Top-1, top-5 and cross-entropy of ``model`` over ``loader`` (batches, with a length),
    summed over all ranks.

    Each rank passes its own disjoint part of the val set (see ``loaders.val_loader``), so every image
    counts once. Pass the plain model, not the DDP wrapper: ranks may see different batch counts.
    flip_tta: logits are the mean of those of the image and of its left-right flip; the loss
    (without label smoothing) is taken on those mean logits, averaged per image.
    ten_crop: instead, the mean logits of 10 views (Krizhevsky et al. 2012): the four corner crops
    and the centre crop, each ``224/256`` of the side of the square input, and their flips. Feed it
    whole central squares (``loaders.val_loader(..., crop_ratio=1.0)``) of ``256/224`` times the
    views' side. torchvision's Resize(256) + TenCrop(224) cuts its corners from the whole resized
    image instead: the same views for a square image, others for the rest.
    corrupt_record: as in :func:`train_one_epoch`, checked at the end (CorruptRecordError).
    progress: the label of a progress bar ('' : none).
    stop_requested: ``() -> bool``, asked before each batch (a signal came: ``signals``); once
    true on a rank, that rank's pass ends there, and the pass returns ``{'stopped': True}`` on
    every rank (they agree in the final all-reduce).
    Returns ``{'top_1', 'top_5'}`` as fractions in [0, 1], ``'val_loss'`` and ``'count'`` (images).
    """
    model.eval()
    device = next(model.parameters()).device
    sums, count = torch.zeros(3, dtype=torch.float64, device=device), 0  # top-1/5 hits, loss
    stopped = False
    with _progress(loader, 0, desc=progress, show=bool(progress)) as batches:
        for x, y in batches:
            if stop_requested is not None and stop_requested():
                stopped = True
                break
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if ten_crop:
                    side = round(x.shape[-1] * DEFAULT_CROP_RATIO)
                    views = TF.ten_crop(x, [side, side])
                    logits = sum(model(view).float() for view in views) / 10  # float32 sums
                else:
                    logits = flip_tta_logits(model, x, flip_tta)
            sums += torch.cat([topk_correct(logits, y, ks=(1, 5)).double(),  # on the device:
                               F.cross_entropy(logits, y, reduction='sum').double().view(1)])
            count += y.shape[0]  # no wait for the GPU per batch
    corrupt = corrupt_record() if corrupt_record else None
    sums = torch.cat([sums, sums.new_tensor([count, bool(corrupt), stopped])])
    top1, top5, loss, count, corrupt_ranks, stopped_ranks = distributed.all_reduce_sum(
        sums).tolist()
    _raise_if_corrupt(corrupt, corrupt_ranks > 0)
    if stopped_ranks:
        return {'stopped': True}
    n = max(count, 1)
    return {'top_1': top1 / n, 'top_5': top5 / n, 'val_loss': loss / n, 'count': int(count)}
