"""Learning-rate and resolution schedules: values worked out by hand."""
import math

import pytest

from imagenet_ffcv.schedules import cyclic_lr, lr_at, resolution_at, scaled_lr, step_lr

# ffcv-imagenet's rn50/rn18 16-epoch shape: peak at epoch 2, down to 0 at epoch 16.
CYC = dict(lr=0.5, epochs=16, peak_epoch=2)


# ----------------------------------------------------------------------------- cyclic
def test_cyclic_lr_is_zero_at_start():
    """The triangle starts at 0 at t=0."""
    assert cyclic_lr(0.0, **CYC) == 0.0


def test_cyclic_lr_is_half_lr_halfway_to_the_peak():
    """t=1 with peak at 2: lr * 1/2 = 0.25; t=0.5: lr/4 = 0.125."""
    assert cyclic_lr(1.0, **CYC) == pytest.approx(0.25)
    assert cyclic_lr(0.5, **CYC) == pytest.approx(0.125)


def test_cyclic_lr_reaches_lr_at_peak_epoch():
    """At t=peak_epoch the LR is exactly the configured peak."""
    assert cyclic_lr(2.0, **CYC) == pytest.approx(0.5)


def test_cyclic_lr_decays_linearly_to_zero_at_epochs():
    """Down leg from (2, 0.5) to (16, 0): t=9 -> 0.25, t=12.5 -> 0.125, t=15 -> 0.5/14."""
    assert cyclic_lr(9.0, **CYC) == pytest.approx(0.25)
    assert cyclic_lr(12.5, **CYC) == pytest.approx(0.125)
    assert cyclic_lr(15.0, **CYC) == pytest.approx(0.5 / 14)
    assert cyclic_lr(16.0, **CYC) == 0.0


def test_cyclic_lr_is_zero_after_the_last_epoch():
    """Past t=epochs the LR stays 0 (never negative)."""
    assert cyclic_lr(16.5, **CYC) == 0.0
    assert cyclic_lr(100.0, **CYC) == 0.0


def test_cyclic_lr_per_iteration_values_are_positive_on_first_and_last_step():
    """With t = epoch + (it + 0.5)/n, the first and last steps have small but non-zero LR."""
    n = 4
    first = cyclic_lr(0 + 0.5 / n, **CYC)
    last = cyclic_lr(15 + (n - 1 + 0.5) / n, **CYC)
    assert first == pytest.approx(0.5 * 0.125 / 2)   # t=0.125 -> lr * 0.125/2
    assert last == pytest.approx(0.5 * 0.125 / 14)   # t=15.875 -> lr * 0.125/14
    assert first > 0 and last > 0


def test_cyclic_lr_peak_at_zero_starts_at_lr():
    """peak_epoch=0: LR is lr at t=0, then decays; no division by zero."""
    assert cyclic_lr(0.0, lr=1.0, epochs=10, peak_epoch=0) == 1.0
    assert cyclic_lr(5.0, lr=1.0, epochs=10, peak_epoch=0) == pytest.approx(0.5)


def test_cyclic_lr_peak_at_epochs_is_a_pure_ramp():
    """peak_epoch=epochs: linear ramp up the whole run, 0 afterwards; no division by zero."""
    assert cyclic_lr(5.0, lr=1.0, epochs=10, peak_epoch=10) == pytest.approx(0.5)
    assert cyclic_lr(10.0, lr=1.0, epochs=10, peak_epoch=10) == pytest.approx(1.0)
    assert cyclic_lr(10.5, lr=1.0, epochs=10, peak_epoch=10) == 0.0


@pytest.mark.parametrize('peak', [-0.5, 16.01, 20])
def test_cyclic_lr_peak_outside_range_raises(peak):
    """peak_epoch outside [0, epochs] is a ValueError naming it."""
    with pytest.raises(ValueError, match='peak_epoch'):
        cyclic_lr(1.0, lr=0.5, epochs=16, peak_epoch=peak)


# ----------------------------------------------------------------------------- step
STEP = dict(lr=0.1, epochs=90, step_ratio=0.1, step_length=30)


def test_step_lr_really_steps():
    """0.1 up to t<30, 0.01 from t=30, 0.001 from t=60: no ramp in between."""
    assert step_lr(0.0, **STEP) == pytest.approx(0.1)
    assert step_lr(29.99, **STEP) == pytest.approx(0.1)
    assert step_lr(30.0, **STEP) == pytest.approx(0.01)
    assert step_lr(45.0, **STEP) == pytest.approx(0.01)
    assert step_lr(59.99, **STEP) == pytest.approx(0.01)
    assert step_lr(60.0, **STEP) == pytest.approx(0.001)
    assert step_lr(89.5, **STEP) == pytest.approx(0.001)


def test_step_lr_constant_for_run_shorter_than_step_length():
    """A 16-epoch run with step_length 30 never steps: every per-iteration value is lr."""
    values = {step_lr(e + (i + 0.5) / 10, **STEP) for e in range(16) for i in range(10)}
    assert values == {0.1}


def test_step_lr_nonpositive_step_length_raises():
    """step_length <= 0 is a ValueError (would divide by zero)."""
    with pytest.raises(ValueError, match='step_length'):
        step_lr(1.0, lr=0.1, epochs=90, step_ratio=0.1, step_length=0)


# ----------------------------------------------------------------------------- lr_at
ALL = dict(lr=0.5, epochs=16)


def test_lr_at_dispatches_to_cyclic():
    """schedule='cyclic' gives the triangle: 0.25 at t=1, 0.5 at t=2."""
    assert lr_at(1.0, schedule='cyclic', peak_epoch=2, **ALL) == pytest.approx(0.25)
    assert lr_at(2.0, schedule='cyclic', peak_epoch=2, **ALL) == pytest.approx(0.5)


def test_lr_at_dispatches_to_step():
    """schedule='step' with step_length 5: 0.5 at t=1, 0.05 at t=5, 0.005 at t=12."""
    step = dict(schedule='step', step_ratio=0.1, step_length=5, **ALL)
    assert lr_at(1.0, **step) == pytest.approx(0.5)
    assert lr_at(5.0, **step) == pytest.approx(0.05)
    assert lr_at(12.0, **step) == pytest.approx(0.005)


def test_lr_at_unknown_schedule_raises():
    """An unknown schedule name is a ValueError naming it."""
    with pytest.raises(ValueError, match='exponential'):
        lr_at(1.0, schedule='exponential', **ALL)


def test_a_schedule_takes_only_its_own_arguments():
    """Each schedule is called with its own arguments: another schedule's is a TypeError."""
    with pytest.raises(TypeError, match='min_lr'):
        lr_at(1.0, schedule='cyclic', peak_epoch=2, min_lr=0.3, **ALL)


# ----------------------------------------------------------------------------- linear
def test_linear_decays_to_zero_over_the_whole_run_after_the_warm_up():
    """Budgeted training (Li et al. 2020): warm-up over 2 epochs to 0.4, then a straight line to 0
    at epoch 10 (0.2 half-way, at epoch 6); without warm-up the line starts at t=0."""
    kwargs = dict(schedule='linear', lr=0.4, epochs=10, warmup_epochs=2)
    assert lr_at(1.0, **kwargs) == pytest.approx(0.2)
    assert [lr_at(t, **kwargs) for t in (2.0, 6.0, 9.0, 10.0, 11.0)] == pytest.approx(
        [0.4, 0.2, 0.05, 0.0, 0.0])
    assert lr_at(2.5, schedule='linear', lr=0.4, epochs=10) == pytest.approx(0.3)
    values = [lr_at(2 + k / 10, **kwargs) for k in range(81)]
    steps = [a - b for a, b in zip(values, values[1:])]
    assert steps == pytest.approx([0.4 / 80] * 80)  # the same decrease every tenth of an epoch


def test_the_linear_schedule_is_a_config_choice():
    """lr.lr_schedule_type=linear reaches the schedule through the config's adapter."""
    from imagenet_ffcv import config
    cfg = config.load_config(['--data.train_dataset=a', '--data.val_dataset=b',
                              '--logging.folder=c', '--lr.lr_schedule_type=linear',
                              '--lr.lr=0.4', '--training.epochs=10', '--lr.warmup_epochs=2'])
    assert lr_at(6.0, lr=cfg.lr.lr, **config.lr_schedule_kwargs(cfg)) == pytest.approx(0.2)


# ----------------------------------------------------------------------------- cosine
def test_cosine_warms_up_then_halves_midway_and_ends_at_min_lr():
    """Warm-up over 2 epochs to lr 0.4, cosine over the 8 epochs after it down to min_lr 0.01:
    half-way between lr and min_lr at epoch 6, min_lr at the end and after it."""
    kwargs = dict(schedule='cosine', lr=0.4, epochs=10, warmup_epochs=2, min_lr=0.01)
    assert lr_at(1.0, **kwargs) == pytest.approx(0.2)  # linear warm-up
    assert lr_at(2.0, **kwargs) == pytest.approx(0.4)
    assert lr_at(6.0, **kwargs) == pytest.approx((0.4 + 0.01) / 2)
    assert lr_at(4.0, **kwargs) == pytest.approx(0.01 + 0.39 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(10.0, **kwargs) == pytest.approx(0.01)
    assert lr_at(11.0, **kwargs) == pytest.approx(0.01)
    last_step = lr_at(10 - 0.5 / 100, **kwargs)  # the last of 100 iterations per epoch
    assert 0.01 < last_step < 0.01 + 1e-6
    values = [lr_at(2 + k / 10, **kwargs) for k in range(81)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decreasing after the warm-up


def test_cosine_min_lr_above_lr_raises():
    with pytest.raises(ValueError, match='min_lr=0.5'):
        lr_at(1.0, schedule='cosine', lr=0.1, epochs=4, min_lr=0.5)


# ----------------------------------------------------------------------------- scaled_lr
def test_scaled_lr_one_gpu_of_the_rn50_recipe():
    """1.7 tuned for 4096; one process of 512 images: 1.7 * 512 / 4096 = 0.2125."""
    assert scaled_lr(1.7, batch_size=512, world_size=1, ref_batch_size=4096) == pytest.approx(0.2125)


def test_scaled_lr_published_setup_keeps_lr():
    """8 processes x 512 = 4096 = ref: the LR is unchanged (1.7)."""
    assert scaled_lr(1.7, batch_size=512, world_size=8, ref_batch_size=4096) == pytest.approx(1.7)


def test_scaled_lr_ref_zero_means_no_scaling():
    """ref_batch_size=0 (unset) returns lr as is, whatever the batch."""
    assert scaled_lr(0.5, batch_size=32, world_size=3, ref_batch_size=0) == 0.5


def test_scaled_lr_negative_ref_raises():
    """A negative ref_batch_size is a ValueError naming lr.ref_batch_size."""
    with pytest.raises(ValueError, match='ref_batch_size'):
        scaled_lr(0.5, batch_size=512, world_size=1, ref_batch_size=-1)


# ----------------------------------------------------------------------------- resolution
RES = dict(min_res=160, max_res=192, start_ramp=11, end_ramp=13)


def test_resolution_min_up_to_start_ramp():
    """Epochs 0..11 (start_ramp inclusive) train at min_res 160."""
    assert [resolution_at(e, **RES) for e in range(12)] == [160] * 12


def test_resolution_max_from_end_ramp():
    """Epochs 13..15 (and beyond) train at max_res 192."""
    assert [resolution_at(e, **RES) for e in (13, 14, 15, 100)] == [192] * 4


def test_resolution_on_ramp_is_multiple_of_32_between_bounds():
    """Epoch 12: 160 + 32 * 1/2 = 176, rounded to a multiple of 32 (half to even, as ffcv-imagenet's
    np.round) -> 192."""
    r = resolution_at(12, **RES)
    assert r % 32 == 0 and 160 <= r <= 192
    assert r == 192


def test_resolution_long_ramp_values():
    """min 128, max 256, ramp 10..14: 160, 192, 224 on the ramp (exact multiples of 32)."""
    kw = dict(min_res=128, max_res=256, start_ramp=10, end_ramp=14)
    assert [resolution_at(e, **kw) for e in range(9, 16)] == [128, 128, 160, 192, 224, 256, 256]


def test_resolution_stays_within_bounds_that_are_not_multiples_of_32():
    """The ramp's rounding to 32 px went past bounds that are not multiples of 32 (ffcv-imagenet's
    formula): 192 px between 160 and 180, then back down to 180; 96 px below a min_res of 100.
    Now each side lies within the bounds and never decreases."""
    for kw in (dict(min_res=160, max_res=180, start_ramp=0, end_ramp=10),
               dict(min_res=100, max_res=200, start_ramp=0, end_ramp=10),
               dict(min_res=150, max_res=250, start_ramp=2, end_ramp=7)):
        sides = [resolution_at(e, **kw) for e in range(15)]
        assert all(kw['min_res'] <= r <= kw['max_res'] for r in sides), (kw, sides)
        assert sides == sorted(sides), (kw, sides)
    assert [resolution_at(e, min_res=160, max_res=180, start_ramp=0, end_ramp=10)
            for e in range(4, 12)] == [160, 160, 160, 160, 180, 180, 180, 180]  # 8-9: was 192


def test_resolution_matches_ffcv_imagenet_formula_for_every_config_shape():
    """Same values as ffcv-imagenet's get_resolution (np.interp + np.round) for all recipe ramps."""
    np = pytest.importorskip('numpy')

    def reference(epoch, min_res, max_res, start_ramp, end_ramp):
        if epoch <= start_ramp:
            return min_res
        if epoch >= end_ramp:
            return max_res
        interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
        return int(np.round(interp[0] / 32)) * 32

    shapes = [(16, 11, 13), (24, 17, 20), (32, 23, 27), (40, 29, 34), (56, 41, 48), (88, 65, 76)]
    for epochs, start, end in shapes:
        kw = dict(min_res=160, max_res=192, start_ramp=start, end_ramp=end)
        assert [resolution_at(e, **kw) for e in range(epochs)] == \
            [reference(e, **kw) for e in range(epochs)], (epochs, start, end)


def test_resolution_min_above_max_raises():
    """min_res > max_res is a ValueError naming resolution.min_res."""
    with pytest.raises(ValueError, match='min_res'):
        resolution_at(0, min_res=224, max_res=192, start_ramp=11, end_ramp=13)

