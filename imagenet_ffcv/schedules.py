"""Learning-rate and resolution schedules: pure functions of an explicit (fractional) epoch.

They check only what a direct caller could get wrong in their own arguments; the rules between
config keys are checked in ``config`` before a run starts, and ``config.lr_schedule_kwargs`` /
``config.resolution_kwargs`` turn the config into their arguments. A new LR schedule is a function
here, its entry in :data:`LR_SCHEDULES` and its own arguments in ``config.lr_schedule_kwargs``.

An epoch value ``t`` is ``epoch + (iteration + 0.5) / iterations_per_epoch`` during training, so
the LR is updated every iteration and never sits at exactly 0 on the first or last step.
"""
import math
from fractions import Fraction

from .errors import InputError


def cyclic_lr(t: float, *, lr: float, epochs: int, peak_epoch: float,
              warmup_epochs: float = 0.0) -> float:
    """Triangular ("cyclic", one cycle) LR: linear from 0 at t=0 up to ``lr`` at ``peak_epoch``,
    then linear down to 0 at t=``epochs``. As ffcv-imagenet's ``get_cyclic_lr`` and Smith,
    "Super-Convergence" (2017). Units: ``t`` and ``peak_epoch`` in epochs. Returns the LR.
    ``warmup_epochs``: the warm-up factor of :func:`lr_at` applies on top; unused here.
    """
    if not 0 <= peak_epoch <= epochs:
        raise InputError(f'peak_epoch={peak_epoch} must lie in [0, epochs={epochs}]')
    if t <= peak_epoch:
        return lr * t / peak_epoch if peak_epoch > 0 else lr
    if t >= epochs:
        return 0.0
    return lr * (epochs - t) / (epochs - peak_epoch)


def step_lr(t: float, *, lr: float, epochs: int, step_ratio: float, step_length: float = 30,
            step_fractions=(), warmup_epochs: float = 0.0) -> float:
    """Step LR: ``lr * step_ratio ** n``, n the number of steps taken by ``t``: one every
    ``step_length`` epochs, or one at each of ``step_fractions`` of ``epochs`` when given (the
    classic ResNet-50 recipe, He et al. 2015 and torchvision's reference, divides by 10 at 1/3 and
    2/3 of 90 epochs). It steps (no ramp between steps): lr=0.1, step_ratio=0.1, step_length=30
    gives 0.1 for t<30, 0.01 for 30<=t<60, ... Units: ``t`` and ``step_length`` in epochs.
    ``warmup_epochs``: applied by :func:`lr_at`; unused here. Raises ValueError when
    ``step_length`` <= 0 and no fractions are given.
    """
    if step_fractions:
        return lr * step_ratio ** sum(1 for f in step_fractions if t >= f * epochs)
    if step_length <= 0:
        raise InputError(f'step_length={step_length} must be > 0')
    return lr * step_ratio ** math.floor(t / step_length)


def poly_lr(t: float, *, lr: float, epochs: int, power: float, warmup_epochs: float = 0.0) -> float:
    """Polynomial decay, as Caffe's ``lr_policy: "poly"``: ``lr * (1 - t / epochs) ** power``, 0 from
    ``t = epochs`` on. Units: ``t`` in epochs (Caffe counts iterations; the ratio is the same).
    ``warmup_epochs``: applied by :func:`lr_at`; unused here."""
    return lr * max(0.0, 1.0 - t / epochs) ** power


def cosine_lr(t: float, *, lr: float, epochs: int, min_lr: float = 0.0,
              warmup_epochs: float = 0.0) -> float:
    """Cosine annealing without restarts (Loshchilov & Hutter, "SGDR", 2017; torchvision's
    reference: warm-up, then ``CosineAnnealingLR(T_max=epochs - warmup_epochs, eta_min=min_lr)``):
    ``lr`` until ``warmup_epochs`` (the warm-up factor of :func:`lr_at` ramps it there), then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * (t - warmup_epochs) / (epochs - warmup_epochs))) / 2``,
    which is ``min_lr`` from ``t = epochs`` on. Units: ``t`` and ``warmup_epochs`` in epochs.
    Raises ValueError when ``min_lr`` is negative or above ``lr``."""
    if not 0 <= min_lr <= lr:
        raise InputError(f'min_lr={min_lr} must lie in [0, lr={lr}]')
    if t <= warmup_epochs:
        return lr
    if t >= epochs:
        return min_lr
    progress = (t - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def linear_lr(t: float, *, lr: float, epochs: int, warmup_epochs: float = 0.0) -> float:
    """Linear decay to zero over the whole run, the budget-aware schedule of Li, Yumer and
    Ramanan, "Budgeted Training: Rethinking Deep Neural Network Training Under Resource
    Constraints" (ICLR 2020): ``lr`` until ``warmup_epochs`` (the warm-up factor of :func:`lr_at`
    ramps it there), then linear down to 0 at ``t = epochs``. Units: epochs."""
    if t <= warmup_epochs:
        return lr
    return lr * max(0.0, epochs - t) / (epochs - warmup_epochs)


def warmup_factor(t: float, *, warmup_epochs: float) -> float:
    """Linear warm-up (Goyal et al. 2017): the schedule's LR is multiplied by ``t / warmup_epochs``
    during the first ``warmup_epochs`` epochs, then by 1. ``warmup_epochs`` 0: no warm-up."""
    return 1.0 if warmup_epochs <= 0 or t >= warmup_epochs else t / warmup_epochs


def parse_fractions(text: str) -> list:
    """``'1/3, 2/3'`` or ``'0.5'`` -> sorted list of floats, each in (0, 1); ``''`` -> [].
    Raises ValueError naming the bad item."""
    values = []
    for item in filter(None, (part.strip() for part in text.split(','))):
        try:
            value = float(Fraction(item))
        except (ValueError, ZeroDivisionError):
            raise InputError(f'{item!r} is not a fraction such as 1/3 or 0.5') from None
        if not 0 < value < 1:
            raise InputError(f'{item!r} must lie strictly between 0 and 1')
        values.append(value)
    return sorted(values)


# The LR schedules by name (lr.lr_schedule_type), as timm's scheduler factory: each takes
# ``(t, *, lr, epochs, warmup_epochs, **its own arguments)``; config.lr_schedule_kwargs gives them.
LR_SCHEDULES = {'cyclic': cyclic_lr, 'step': step_lr, 'poly': poly_lr, 'cosine': cosine_lr,
                'linear': linear_lr}
# The schedules that hold lr.lr through the warm-up and decay only after it (a warm-up as long as
# the run would never decay: config refuses it).
DECAY_AFTER_WARMUP = ('cosine', 'linear')


def lr_at(t: float, *, schedule: str, lr: float, epochs: int, warmup_epochs: float = 0.0,
          **arguments) -> float:
    """The LR at fractional epoch ``t`` of the schedule named ``schedule`` (a key of
    :data:`LR_SCHEDULES`, called with ``lr``, ``epochs``, ``warmup_epochs`` and its own
    ``arguments``), times the warm-up factor. Raises ValueError for an unknown name and TypeError
    for an argument the schedule does not take."""
    if schedule not in LR_SCHEDULES:
        raise InputError(f'schedule={schedule!r}: expected one of {", ".join(LR_SCHEDULES)}')
    value = LR_SCHEDULES[schedule](t, lr=lr, epochs=epochs, warmup_epochs=warmup_epochs,
                                   **arguments)
    return value * warmup_factor(t, warmup_epochs=warmup_epochs)


def scaled_lr(lr: float, *, batch_size: int, world_size: int, ref_batch_size: int) -> float:
    """Linear LR scaling (Goyal et al., "Accurate, Large Minibatch SGD", 2017).

    ``lr`` was tuned for a global batch of ``ref_batch_size`` images; the run uses ``batch_size``
    per process on ``world_size`` processes. Returns ``lr * batch_size * world_size /
    ref_batch_size``, or ``lr`` unchanged when ``ref_batch_size`` is 0 (unset).
    """
    if ref_batch_size == 0:
        return lr
    if ref_batch_size < 0:
        raise InputError(f'ref_batch_size={ref_batch_size} must be >= 0 (0: no scaling)')
    return lr * batch_size * world_size / ref_batch_size


def remaining_work(epoch: int, *, epochs: int, res_at) -> float:
    """The cost of epochs ``epoch + 1 .. epochs - 1`` in epochs at ``epoch``'s resolution: the sum
    of ``(res_at(e) / res_at(epoch)) ** 2`` (the work of an epoch grows with the pixels per
    image). ``res_at``: epoch -> side in pixels, e.g. :func:`resolution_at` with its arguments.
    Multiplied by the seconds of this epoch, it estimates the time left after it."""
    res = res_at(epoch)
    return sum((res_at(e) / res) ** 2 for e in range(epoch + 1, epochs))


def resolution_at(epoch: int, *, min_res: int, max_res: int, start_ramp: int, end_ramp: int) -> int:
    """Progressive resizing (ffcv-imagenet): ``min_res`` up to ``start_ramp``, linear to ``max_res``
    at ``end_ramp``, then ``max_res``. Values on the ramp are rounded to a multiple of 32 pixels,
    kept within ``[min_res, max_res]`` (ffcv-imagenet's rounding alone went past bounds that are not
    multiples of 32: 192 px between 160 and 180, then back to 180). Returns the side in pixels of
    the square training crops for ``epoch`` (0-based); it never decreases from epoch to epoch.
    """
    if min_res > max_res:
        raise InputError(f'min_res={min_res} is above max_res={max_res}')
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    res = min_res + (max_res - min_res) * (epoch - start_ramp) / (end_ramp - start_ramp)
    return min(max_res, max(min_res, int(round(res / 32)) * 32))
