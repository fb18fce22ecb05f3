"""Classic-recipe parity: poly / fraction-step LR with warm-up, any torchvision model, 10-crop
evaluation, stopping at a top-1 target, error rates, and the classic recipe configs."""
import json
from pathlib import Path

import pytest
import torch

from conftest import REPO
from imagenet_ffcv import config, distributed, engine, evaluate, metrics, models, schedules, train
from imagenet_ffcv.precision import resolve_precision


def test_poly_lr_values():
    assert schedules.poly_lr(0, lr=1.0, epochs=10, power=2) == 1.0
    assert schedules.poly_lr(5, lr=1.0, epochs=10, power=2) == pytest.approx(0.25)
    assert schedules.poly_lr(7.5, lr=0.4, epochs=10, power=1) == pytest.approx(0.1)
    assert schedules.poly_lr(10, lr=1.0, epochs=10, power=2) == 0.0
    assert schedules.poly_lr(12, lr=1.0, epochs=10, power=2) == 0.0


def test_step_at_fractions_of_training_is_the_classic_30_60_of_90():
    fractions = schedules.parse_fractions('1/3, 2/3')
    lr = lambda t: schedules.lr_at(t, schedule='step', lr=0.1, epochs=90,  # noqa: E731
                                   step_ratio=0.1, step_fractions=fractions)
    assert lr(0) == pytest.approx(0.1) and lr(29.99) == pytest.approx(0.1)
    assert lr(30) == pytest.approx(0.01) and lr(59.99) == pytest.approx(0.01)
    assert lr(60) == pytest.approx(0.001) and lr(89.99) == pytest.approx(0.001)


def test_parse_fractions_rejects_bad_items():
    assert schedules.parse_fractions('') == []
    assert schedules.parse_fractions('0.75, 1/4') == [0.25, 0.75]
    for bad in ('1/0', 'abc', '1.5', '0'):
        with pytest.raises(ValueError, match=repr(bad).replace('.', r'\.')):
            schedules.parse_fractions(bad)


def test_linear_warmup_applies_to_every_schedule():
    own = {'cyclic': {'peak_epoch': 2}, 'step': {'step_ratio': 0.1, 'step_length': 30},
           'poly': {'power': 1.0}}
    for schedule, args in own.items():
        base = schedules.lr_at(5.0, schedule=schedule, lr=0.8, epochs=20, **args)
        warm = schedules.lr_at(1.25, schedule=schedule, lr=0.8, epochs=20, warmup_epochs=5,
                               **args)
        cold = schedules.lr_at(1.25, schedule=schedule, lr=0.8, epochs=20, **args)
        assert warm == pytest.approx(cold * 1.25 / 5), schedule
        assert schedules.lr_at(5.0, schedule=schedule, lr=0.8, epochs=20, warmup_epochs=5,
                               **args) == pytest.approx(base), schedule
    assert schedules.lr_at(0.0, schedule='step', lr=0.8, epochs=20, warmup_epochs=5,
                           **own['step']) == 0.0


@pytest.mark.parametrize('arch', ['alexnet', 'mobilenet_v3_large', 'efficientnet_b0',
                                  'convnext_tiny', 'vgg11_bn', 'resnet50'])
def test_torchvision_architectures_take_a_cpu_step(arch):
    """Any torchvision classifier by name: 7 classes from the data, BlurPool and channels_last on,
    one SGD step on tiny images changes the weights and keeps the loss finite."""
    torch.manual_seed(0)
    model = models.build_model(arch=arch, num_classes=7, use_blurpool=True, channels_last=True)
    optimizer = torch.optim.SGD(models.param_groups(model, weight_decay=5e-5, bn_wd=False),
                                lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 6])
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    logits = model(x)
    assert logits.shape == (2, 7)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_ten_crop_averages_corners_centre_and_flips():
    """engine.evaluate(ten_crop=True) gives the logits' mean over the 4 corner crops, the centre
    crop (224/256 of the side) and their left-right flips, worked out here by slicing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5)).eval()
    x = torch.randn(3, 3, 32, 32)
    c = 28  # round(32 * 224 / 256)
    crops = [x[..., :c, :c], x[..., :c, -c:], x[..., -c:, :c], x[..., -c:, -c:],
             x[..., 2:2 + c, 2:2 + c]]
    views = crops + [v.flip(-1) for v in crops]
    with torch.no_grad():
        expected = sum(model(v) for v in views) / 10
    y = expected.argmax(1)
    y_wrong = expected.argmin(1)
    assert engine.evaluate(model=model, loader=[(x, y)], ten_crop=True)['top_1'] == 1.0
    assert engine.evaluate(model=model, loader=[(x, y_wrong)], ten_crop=True)['top_1'] == 0.0
    loss = torch.nn.functional.cross_entropy(expected, y).item()
    assert engine.evaluate(model=model, loader=[(x, y)], ten_crop=True)['val_loss'] == \
        pytest.approx(loss, rel=1e-5)


def test_ten_crop_views_have_the_side_of_the_centre_crop_validation(sample_betons, tmp_path):
    """evaluate.ten_crop_eval cuts views of validation.resolution px, the side of the centre-crop
    validation's images (from central squares of 256/224 that side, as torchvision's Resize(256)
    then TenCrop(224)), and its centre view shows what the centre-crop validation shows."""
    cfg = config.load_config([
        f'--data.train_dataset={sample_betons["train"]}',
        f'--data.val_dataset={sample_betons["val"]}',
        '--data.num_workers=1', '--validation.resolution=48', '--validation.batch_size=100',
        f'--logging.folder={tmp_path}'])
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(10))

        def forward(self, x):
            seen.append(x.clone())
            return self.bias.expand(x.shape[0], 10)

    dist = distributed.from_env({})
    precision = resolve_precision(cfg.training.amp, dist.device)
    evaluate.ten_crop_eval(cfg, dist, Recorder(), precision)
    assert len(seen) == 10 and {tuple(v.shape[1:]) for v in seen} == {(3, 48, 48)}
    corner, centre_view = seen[0], seen[4]  # torchvision's order: 4 corners, centre, flips
    seen.clear()
    evaluate.validate(cfg, Recorder(), evaluate.make_val_loader(cfg, dist, precision), precision)
    centre_crop = seen[0]  # then its flip
    # the same part of each image, resampled otherwise (0.20 here, against 0.65 for a corner)
    assert (centre_view - centre_crop).abs().mean() < 0.5 * (corner - centre_crop).abs().mean()


def test_results_table_gives_accuracy_and_error_rates():
    summary = metrics.with_error_rates({'top_1': 0.7612, 'top_5': 0.9287})
    assert summary['top_1_err'] == pytest.approx(0.2388)
    summary.update(arch='resnet50', epochs=90, wall_time_s=100.0, train_img_per_s=2500.0,
                   top_1_10crop=0.775, top_5_10crop=0.935, top_1_err_10crop=0.225,
                   top_5_err_10crop=0.065, target_top1=0.6, target_reached_epoch=7,
                   time_to_target_s=3600.0)
    table = metrics.results_table(summary)
    assert 'top-1 err' in table and '23.88 %' in table and '76.12 %' in table
    assert '10-crop' in table and '77.50 %' in table
    assert 'reached at epoch 7' in table and '3600 s' in table


def test_stop_at_target_top1_with_ten_crop_and_error_rates(sample_betons, tmp_path, capsys):
    """The run ends at the first epoch whose top-1 reaches the target, with weights, log (error
    rates, 10-crop on the last line) and a results table that gives the time to accuracy. Killed
    after that epoch's checkpoint but before its final weights, it resumes to the same end and
    trains no further epoch (it trained on to training.epochs before: the checkpoint did not
    hold the target reached), and ends with the same results, 10-crop too."""
    target = 0.12
    args = [
        f'--data.train_dataset={sample_betons["train"]}', f'--data.val_dataset={sample_betons["val"]}',
        '--data.num_workers=2', f'--logging.folder={tmp_path}', '--model.arch=resnet18',
        '--training.batch_size=32', '--validation.batch_size=64', '--validation.resolution=32',
        '--resolution.min_res=32', '--resolution.max_res=32', '--lr.lr=0.1',
        '--lr.lr_schedule_type=poly', '--lr.warmup_epochs=1', '--training.epochs=4',
        f'--training.target_top1={target}', '--validation.ten_crop=1']
    summary = train.main(config.load_config(args))
    log = [json.loads(line) for line in open(f'{summary["run_dir"]}/log.jsonl')]
    tops = [r['top_1'] for r in log]
    first = next((i for i, t in enumerate(tops) if t >= target), None)
    assert summary['target_reached_epoch'] == first
    assert len(log) == (first + 1 if first is not None else 4)
    assert all(t < target for t in tops[:-1])  # it did not run past the target
    for r in log:
        assert r['top_1_err'] == pytest.approx(1 - r['top_1'])
    assert 0 <= log[-1]['top_1_10crop'] <= 1  # 10-crop once, for the final weights
    assert all('top_1_10crop' not in r for r in log[:-1])
    assert (tmp_path / summary['run_dir'] / 'final_weights.pt').exists()
    out = capsys.readouterr().out
    assert '10-crop' in out and 'top-1 err' in out
    assert ('reached at epoch' in out) == (first is not None)
    run_dir = Path(summary['run_dir'])
    for name in ('final_weights.pt', 'final_weights.safetensors'):  # killed before these
        (run_dir / name).unlink()
    resumed = train.main(config.load_config([*args, '--resume=auto']))
    assert resumed['run_dir'] == summary['run_dir'] and (run_dir / 'final_weights.pt').exists()
    assert [json.loads(line) for line in open(run_dir / 'log.jsonl')] == log
    assert (resumed['target_reached_epoch'], resumed['epochs'], resumed['top_1']) == (
        summary['target_reached_epoch'], summary['epochs'], summary['top_1'])
    # the resumed end validates as the last epoch did: 10-crop too (it lost those keys), and
    # the time to the target is the first process's
    assert (resumed['top_1_10crop'], resumed['time_to_target_s']) == (
        summary['top_1_10crop'], summary['time_to_target_s'])


def test_classic_recipe_configs_load():
    base = ['--data.train_dataset=x', '--data.val_dataset=y']
    step = config.load_config(['--config', str(REPO / 'imagenet_ffcv/configs/rn50_configs/rn50_step_90_epochs.yaml')] + base)
    assert (step.lr.lr, step.lr.ref_batch_size, step.training.weight_decay) == (0.1, 256, 1e-4)
    lr = lambda t: schedules.lr_at(t, lr=step.lr.lr, **config.lr_schedule_kwargs(step))  # noqa
    assert [lr(t) for t in (29.5, 30.5, 60.5)] == pytest.approx([0.1, 0.01, 0.001])
    assert step.resolution.min_res == step.resolution.max_res == 224
    target = config.load_config(['--config', str(REPO / 'imagenet_ffcv/configs/rn50_configs/rn50_60pct_target.yaml')] + base)
    assert target.training.target_top1 == 0.6 and target.model.arch == 'resnet50'


def test_flip_tta_averages_bfloat16_logits_in_float32():
    """Under bf16 autocast a model's logits are bfloat16 (8 significant bits: steps of 2 between
    256 and 512); the flip TTA's mean is taken in float32, so 256 and 258 average to 257."""
    def model(x):  # the logit of each image: its top-left pixel, as bfloat16
        return x[:, 0, 0, :1].to(torch.bfloat16)

    x = torch.zeros(1, 3, 4, 4)
    x[..., 0], x[..., -1] = 256.0, 258.0  # the flip brings the last column first
    logits = engine.flip_tta_logits(model, x)
    assert logits.dtype == torch.float32 and logits.item() == 257.0
