"""Learning-rate and resolution schedules: pure functions of an explicit (fractional) epoch.

An epoch value ``t`` is ``epoch + (iteration + 0.5) / iterations_per_epoch`` during training, so
the LR is updated every iteration and never sits at exactly 0 on the first or last step.
"""
import math


def cyclic_lr(t: float, *, lr: float, epochs: int, peak_epoch: float) -> float:
    """Triangular ("cyclic", one cycle) LR: linear from 0 at t=0 up to ``lr`` at ``peak_epoch``,
    then linear down to 0 at t=``epochs``. As ffcv-imagenet's ``get_cyclic_lr`` and Smith,
    "Super-Convergence" (2017). Units: ``t`` and ``peak_epoch`` in epochs. Returns the LR.
    """
    if not 0 <= peak_epoch <= epochs:
        raise ValueError(f'lr.lr_peak_epoch={peak_epoch} must lie in [0, training.epochs={epochs}]')
    if t <= peak_epoch:
        return lr * t / peak_epoch if peak_epoch > 0 else lr
    if t >= epochs:
        return 0.0
    return lr * (epochs - t) / (epochs - peak_epoch)


def step_lr(t: float, *, lr: float, step_ratio: float, step_length: float) -> float:
    """Step LR: ``lr * step_ratio ** floor(t / step_length)``. It steps (no ramp between steps):
    e.g. lr=0.1, step_ratio=0.1, step_length=30 gives 0.1 for t<30, 0.01 for 30<=t<60, ...
    As in He et al., "Deep Residual Learning" (2015). Units: ``t`` and ``step_length`` in epochs.
    """
    if step_length <= 0:
        raise ValueError(f'lr.step_length={step_length} must be > 0')
    return lr * step_ratio ** math.floor(t / step_length)


def lr_at(t: float, *, schedule: str, lr: float, epochs: int, peak_epoch: float,
          step_ratio: float, step_length: float) -> float:
    """The LR of the named schedule (``'cyclic'`` or ``'step'``) at fractional epoch ``t``."""
    if schedule == 'cyclic':
        return cyclic_lr(t, lr=lr, epochs=epochs, peak_epoch=peak_epoch)
    if schedule == 'step':
        return step_lr(t, lr=lr, step_ratio=step_ratio, step_length=step_length)
    raise ValueError(f"lr.lr_schedule_type={schedule!r}: expected 'cyclic' or 'step'")


def scaled_lr(lr: float, *, batch_size: int, world_size: int, ref_batch_size: int) -> float:
    """Linear LR scaling (Goyal et al., "Accurate, Large Minibatch SGD", 2017).

    ``lr`` was tuned for a global batch of ``ref_batch_size`` images; the run uses ``batch_size``
    per process on ``world_size`` processes. Returns ``lr * batch_size * world_size /
    ref_batch_size``, or ``lr`` unchanged when ``ref_batch_size`` is 0 (unset).
    """
    if ref_batch_size == 0:
        return lr
    if ref_batch_size < 0:
        raise ValueError(f'lr.ref_batch_size={ref_batch_size} must be >= 0 (0: no scaling)')
    return lr * batch_size * world_size / ref_batch_size


def resolution_at(epoch: int, *, min_res: int, max_res: int, start_ramp: int, end_ramp: int) -> int:
    """Progressive resizing (ffcv-imagenet): ``min_res`` up to ``start_ramp``, linear to ``max_res``
    at ``end_ramp``, then ``max_res``. Values on the ramp are rounded to a multiple of 32 pixels.
    Returns the side in pixels of the square training crops for ``epoch`` (0-based).
    """
    if min_res > max_res:
        raise ValueError(f'resolution.min_res={min_res} is above resolution.max_res={max_res}')
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    res = min_res + (max_res - min_res) * (epoch - start_ramp) / (end_ramp - start_ramp)
    return int(round(res / 32)) * 32
