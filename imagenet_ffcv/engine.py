"""One training epoch and one evaluation pass. The same code runs on CPU (fp32) and CUDA (bf16)."""
import time

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from tqdm import tqdm

from . import distributed
from .data import DEFAULT_CROP_RATIO
from .metrics import topk_correct


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; ``epoch`` and ``iteration`` locate the first such
    step. The weights are spoilt from that step on: resume from the last checkpoint instead."""

    def __init__(self, epoch: int, iteration: int):
        self.epoch, self.iteration = epoch, iteration
        super().__init__(f'non-finite training loss at epoch {epoch}, iteration {iteration}: '
                         'stopped without saving; the last checkpoint is the last good state '
                         '(lower the LR, or check the data, then resume from it)')


def train_one_epoch(*, model, loader, optimizer, loss_fn, lr_at, epoch: int, amp_dtype=None,
                    show_progress: bool = True, start_iteration: int = 0, check_every: int = 10,
                    stop_requested=lambda: False, checkpoint_every: int = 0,
                    save_checkpoint=None) -> dict:
    """Train ``model`` on every batch of ``loader`` once.

    lr_at: function of the fractional epoch ``epoch + (i + 0.5) / len(loader)`` giving the LR of
    iteration ``i``; it is set on every parameter group before each step.
    amp_dtype: ``torch.bfloat16`` for mixed precision on CUDA, None for full precision.
    Batches: float images (B, 3, H, W) and int64 labels (B,) on the model's device.
    start_iteration: resume within the epoch: batches ``0..start_iteration-1`` are read (the
    loader's order is fixed by its seed and epoch) but not trained on again.

    Every ``check_every`` iterations, and at the last one, the ranks agree (one small all-reduce,
    which also syncs the device) on two things: a non-finite loss on any rank since the last check
    raises :class:`NonFiniteLossError`; ``stop_requested()`` true on any rank (a signal, see
    ``checkpoint.StopRequest``) ends the epoch there, with ``'stopped'`` true. Then, every
    ``checkpoint_every`` iterations (0: never) except the last, ``save_checkpoint(i + 1)`` is
    called with the number of iterations done.

    Returns ``{'train_loss': mean loss per image, 'images': images this process trained on,
    'seconds': wall time, 'lr': LR of the last step, 'iterations_done': iterations of the epoch
    trained (``len(loader)`` unless stopped early), 'stopped': the ranks agreed to stop}``.
    """
    model.train()
    iterations = len(loader)
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    first_bad = torch.full((), iterations, dtype=torch.int64, device=device)  # none yet
    images, done, stopped = 0, start_iteration, False
    lr = 0.0
    bar = tqdm(loader, desc=f'epoch {epoch}', disable=not show_progress, leave=False,
               dynamic_ncols=True)
    start = time.perf_counter()
    for i, (x, y) in enumerate(bar):
        if i < start_iteration:
            continue  # trained on before the checkpoint this run resumed from
        lr = lr_at(epoch + (i + 0.5) / iterations)
        for group in optimizer.param_groups:
            group['lr'] = lr
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        # Recorded on the device, without a sync: the first iteration whose loss is not finite.
        first_bad = torch.where(torch.isfinite(loss) | (first_bad < iterations), first_bad, i)
        loss_sum += loss.double() * y.shape[0]
        images += y.shape[0]
        done = i + 1
        if (done % check_every == 0 or done == iterations
                or (checkpoint_every and done % checkpoint_every == 0)):
            bad, stop = distributed.all_reduce_min(
                torch.stack([first_bad, torch.tensor(0 if stop_requested() else 1, device=device)]))
            if bad < iterations:
                raise NonFiniteLossError(epoch, bad)
            if show_progress:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f'{float(loss):.3f}', lr=f'{lr:.3g}',
                                img_per_s=f'{images / elapsed:.0f}')
            if stop == 0:
                stopped = True
                break
            if checkpoint_every and done % checkpoint_every == 0 and done < iterations:
                save_checkpoint(done)
    bar.close()
    return {'train_loss': float(loss_sum) / max(images, 1), 'images': images,
            'seconds': time.perf_counter() - start, 'lr': lr, 'iterations_done': done,
            'stopped': stopped}


@torch.no_grad()
def evaluate(*, model, loader, amp_dtype=None, flip_tta: bool = True, ten_crop: bool = False) -> dict:
    """Top-1, top-5 and cross-entropy of ``model`` over ``loader``, summed over all ranks.

    Each rank passes its own disjoint part of the val set (see ``data.val_loader``), so every image
    counts once. Pass the plain model, not the DDP wrapper: ranks may see different batch counts.
    flip_tta: logits are the mean of those of the image and of its left-right flip; the loss
    (without label smoothing) is taken on those mean logits, averaged per image.
    ten_crop: instead, the mean logits of 10 views (Krizhevsky et al. 2012): the four corner crops
    and the centre crop, each ``224/256`` of the side of the square input, and their flips. Feed it
    whole central squares (``data.val_loader(..., crop_ratio=1.0)``).
    Returns ``{'top_1', 'top_5'}`` as fractions in [0, 1], ``'val_loss'`` and ``'count'`` (images).
    """
    model.eval()
    device = next(model.parameters()).device
    hits1 = hits5 = count = 0
    loss_sum = 0.0
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if ten_crop:
                side = round(x.shape[-1] * DEFAULT_CROP_RATIO)
                logits = sum(model(view) for view in TF.ten_crop(x, [side, side])) / 10
            else:
                logits = model(x)
                if flip_tta:
                    logits = (logits + model(torch.flip(x, dims=[3]))) / 2
        logits = logits.float()
        top1, top5 = topk_correct(logits, y, ks=(1, 5))
        hits1, hits5, count = hits1 + top1, hits5 + top5, count + y.shape[0]
        loss_sum += float(F.cross_entropy(logits, y, reduction='sum'))
    sums = torch.tensor([hits1, hits5, loss_sum, count], dtype=torch.float64, device=device)
    top1, top5, loss, count = distributed.all_reduce_sum(sums).tolist()
    n = max(count, 1)
    return {'top_1': top1 / n, 'top_5': top5 / n, 'val_loss': loss / n, 'count': int(count)}
