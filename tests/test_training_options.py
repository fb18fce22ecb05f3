"""The optional training features, each on a tiny model where the expected result can be computed
by hand: EMA (torch.optim.swa_utils), MixUp/CutMix (torchvision.transforms.v2), gradient clipping,
AdamW/LAMB, gradient accumulation, the live log cadence and the progress bars (validation, whole-run
ETA)."""
import contextlib
import copy
import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import small_config
from imagenet_ffcv import (checkpoint, config, distributed, engine, models, optimizers,
                           schedules, train)
from imagenet_ffcv.ema import EMA, make_ema
from imagenet_ffcv.mixup import batch_mixer
from imagenet_ffcv.optional import MissingPackageError


def tiny_bn_net():
    """Conv + BatchNorm + linear: parameters and BN buffers (running statistics)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def batches(n=12, size=8):
    torch.manual_seed(1)
    return [(torch.randn(size, 3, 6, 6), torch.randint(0, 3, (size,))) for _ in range(n)]


def float_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_the_ema_updates_as_torchs_averaged_model_does():
    """ema.EMA (updates that do not read the count on the device) gives torch's AveragedModel's
    averages, bit for bit, over 5 updates between SGD steps: weights, BN running statistics and
    the integer count of batches BN saw; and the same state dict."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    model = tiny_bn_net()
    ours = make_ema(model, 0.8)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(5):
        engine.train_step(model=model, x=x, y=y, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss())
        ours.update_parameters(model)
        torchs.update_parameters(model)
    got, expected = ours.state_dict(), torchs.state_dict()
    assert got.keys() == expected.keys() and 'module.1.num_batches_tracked' in got
    assert all(torch.equal(got[k], expected[k]) for k in got), [
        k for k in got if not torch.equal(got[k], expected[k])]
    assert int(got['n_averaged']) == 5
    # without use_buffers, torch's copies the buffers (ours averaged them)
    ours = EMA(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=False)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=False)
    for x, y in batches(3):
        engine.train_step(model=model, x=x, y=y, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss())
        ours.update_parameters(model)
        torchs.update_parameters(model)
    got, expected = ours.state_dict(), torchs.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_ema_is_the_hand_computed_average_of_parameters_and_buffers_every_k_iterations():
    """train_one_epoch updates the EMA every ema_every iterations of the run, counted across
    epochs (3 epochs of 4 iterations, every 3: after iterations 3, 6, 9 and 12; counted within each
    epoch, the EMA had 3 updates, and none at all with epochs shorter than ema_every); the result
    equals ``ema = d * ema + (1 - d) * w`` computed by hand over a copy of the model trained step
    by step (the first update copies the weights), for the weights and BN's running statistics."""
    decay, every, data = 0.8, 3, batches(12)
    model = tiny_bn_net()
    reference = copy.deepcopy(model)
    ema = make_ema(model, decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(3):
        engine.train_one_epoch(model=model, loader=data[4 * epoch:4 * epoch + 4],
                               optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
                               lr_at=lambda t: 0.1, epoch=epoch, show_progress=False,
                               options=engine.StepOptions(ema=ema, ema_every=every))
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    expected = None
    for i, (x, y) in enumerate(data):
        reference.train()
        engine.train_step(model=reference, x=x, y=y, optimizer=ref_optimizer,
                          loss_fn=nn.CrossEntropyLoss())
        if (i + 1) % every == 0:
            w = float_state(reference)
            expected = w if expected is None else {
                k: decay * expected[k] + (1 - decay) * w[k] for k in w}
    assert int(ema.n_averaged) == len(data) // every
    got = float_state(ema.module)
    final = float_state(model)
    assert got.keys() == expected.keys() and 'running_mean' in ''.join(got)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(got[k], final[k]) for k in got)  # not the model's weights
    assert not torch.allclose(got['1.running_mean'], final['1.running_mean'])


class NoSyncRecorder(nn.Module):
    """A model with DistributedDataParallel's ``no_sync()``: records, for each forward pass,
    whether it ran inside it."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inside, self.passes = net, False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        yield
        self.inside = False

    def forward(self, x):
        self.passes.append(self.inside)
        return self.net(x)


@pytest.mark.parametrize('batch_count', [8, 5])
def test_grad_accum_4_x_16_gives_the_update_of_one_batch_of_64(batch_count):
    """Without BatchNorm, 4 accumulated batches of 16 step as one batch of 64 (to float64
    tolerance): SGD with momentum and weight decay, gradient clipping on the summed gradients,
    the EMA and the LR once per optimizer step, at the same fractional epochs; DDP's all-reduce
    only on each step's last batch; checkpoints after a step only. With 5 batches the last step
    holds one batch, of 16."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5)).double()
    x, y = torch.randn(16 * batch_count, 3, 6, 6, dtype=torch.float64), \
        torch.randint(0, 5, (16 * batch_count,))
    small = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
    large = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]
    # 5 batches: the steps' middles differ from the large batches' (their sizes do), so a
    # constant LR
    lr_at = (lambda t: 0.5 / (1 + t)) if batch_count == 8 else (lambda t: 0.3)
    results = {}
    for accum, data in ((4, small), (1, large)):
        model = NoSyncRecorder(copy.deepcopy(net))
        ema, times, saved = make_ema(model.net, 0.5), [], []
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for epoch in range(2):
            engine.train_one_epoch(
                model=model, loader=data, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
                lr_at=lambda t: times.append(t) or lr_at(t), epoch=epoch,
                show_progress=False, hooks=engine.EpochHooks(
                    save_checkpoint=lambda done, so_far: saved.append(done), checkpoint_every=2),
                options=engine.StepOptions(clip_grad_norm=0.05, ema=ema, grad_accum_steps=accum))
        results[accum] = model, ema, times, saved
    (model, ema, times, saved), (ref, ref_ema, ref_times, ref_saved) = results[4], results[1]
    for got, expected in ((model.net, ref.net), (ema.module, ref_ema.module)):
        for a, b in zip(got.parameters(), expected.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int(ema.n_averaged) == int(ref_ema.n_averaged) == 4  # two steps an epoch
    assert not torch.equal(next(model.net.parameters()), next(net.parameters()))
    if batch_count == 8:
        assert times == ref_times == [0.25, 0.75, 1.25, 1.75]
        assert model.passes == [True, True, True, False] * 4 and ref.passes == [False] * 4
        assert saved == [4, 4] and ref_saved == []  # 2 iterations reached after a step only
    else:
        assert times == [0.4, 0.9, 1.4, 1.9]  # (0 + 4) / 2 / 5, (4 + 5) / 2 / 5, ...
        assert model.passes == [True, True, True, False, False] * 2
        assert saved == [4, 4]


def test_ema_decay_outside_0_1_is_refused():
    with pytest.raises(ValueError, match='decay=1'):
        make_ema(tiny_bn_net(), 1.0)


def test_mixup_mixes_images_and_targets_in_the_same_proportion():
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, targets = batch_mixer(num_classes=5, mixup_alpha=0.4)(x, y)
    assert targets.shape == (6, 5) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    lam = float(targets[1, 1])  # sample 1 (class 1) mixed with sample 0 (class 0), its roll
    assert 0 < lam < 1 and float(targets[1, 0]) == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed[1], lam * x[1] + (1 - lam) * x[0])


def test_cutmix_pastes_a_rectangle_and_both_on_pick_one_per_batch():
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    mixed, targets = batch_mixer(num_classes=4, cutmix_alpha=1.0)(x, y)
    from_other = (mixed[1] == x[0]).all(0)  # pixels of image 1 taken from image 0
    assert (from_other | (mixed[1] == x[1]).all(0)).all()
    assert float(targets[1, 0]) == pytest.approx(float(from_other.float().mean()), abs=1e-6)
    both = batch_mixer(num_classes=4, mixup_alpha=0.4, cutmix_alpha=1.0)
    kinds = set()
    for _ in range(20):  # MixUp changes every pixel; CutMix leaves some untouched
        out, _ = both(x, y)
        kinds.add(bool((out[1] == x[1]).all(0).any()))
    assert kinds == {True, False}
    assert batch_mixer(num_classes=4) is None


def test_train_step_with_mixup_trains_on_the_soft_targets_with_label_smoothing():
    """The loss is cross-entropy with label smoothing against the mixed targets: the same value as
    computed by hand on the mixed batch, and not the loss on the original labels."""
    model, (x, y) = tiny_bn_net(), batches(1)[0]
    mix = batch_mixer(num_classes=3, mixup_alpha=1.0)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.manual_seed(5)
    x_mixed, targets = mix(x, y)
    with torch.no_grad():
        by_hand = loss_fn(copy.deepcopy(model).train()(x_mixed), targets)
        plain = loss_fn(copy.deepcopy(model).train()(x), y)
    torch.manual_seed(5)
    loss = engine.train_step(model=model.train(), x=x, y=y, mix=mix, loss_fn=loss_fn,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-6)
    assert abs(float(loss) - float(plain)) > 1e-3


@pytest.mark.parametrize('scaled', [False, True])
def test_clip_grad_norm_bounds_the_update_after_unscaling(scaled):
    """Plain SGD at lr 1: the update is minus the gradient, so its global norm equals the clip
    value. With a loss scaler (fp16's) the gradients are unscaled first: clipping the scaled ones
    would make the update 2**10 times smaller."""
    model, (x, y) = tiny_bn_net(), batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10) if scaled else None
    engine.train_step(model=model, x=x, y=y, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                      loss_fn=nn.CrossEntropyLoss(), scaler=scaler, clip_grad_norm=0.01)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert float(update.norm()) == pytest.approx(0.01, rel=1e-4)


def test_optimizers_keep_the_weight_decay_groups():
    model = tiny_bn_net()
    groups = [{'params': [model[0].weight], 'weight_decay': 0.05},
              {'params': [model[0].bias], 'weight_decay': 0.0}]
    adamw = optimizers.make_optimizer('adamw', groups, lr=0.01, betas=(0.8, 0.99))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g['weight_decay'] for g in adamw.param_groups] == [0.05, 0.0]
    assert adamw.param_groups[0]['betas'] == (0.8, 0.99)
    assert isinstance(optimizers.make_optimizer('sgd', groups, lr=0.1, momentum=0.5),
                      torch.optim.SGD)
    with pytest.raises(ValueError, match='adam'):
        optimizers.make_optimizer('adam', groups, lr=0.1)


def test_lamb_comes_from_timm_or_names_the_missing_package(monkeypatch):
    groups = [{'params': [nn.Parameter(torch.ones(2))], 'weight_decay': 0.0}]
    try:
        import timm.optim
    except ImportError:
        timm = None
    if timm is not None:
        lamb = optimizers.make_optimizer('lamb', groups, lr=0.01)
        assert type(lamb).__name__ == 'Lamb' and lamb.param_groups[0]['betas'] == (0.9, 0.999)
    monkeypatch.setitem(sys.modules, 'timm.optim', None)
    with pytest.raises(MissingPackageError, match=r"'timm'.*pip install timm=="):
        optimizers.make_optimizer('lamb', groups, lr=0.01)


def test_train_scalars_are_logged_every_n_iterations_with_the_loss_of_that_step():
    model, data = tiny_bn_net(), batches(12)
    logged = []
    engine.train_one_epoch(model=model, loader=data, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(), lr_at=lambda t: 0.1 * t,
        epoch=0, show_progress=False,
        hooks=engine.EpochHooks(log_every=5, log_train=lambda i, v: logged.append((i, v))))
    assert [i for i, _ in logged] == [5, 10]
    assert logged[0][1]['lr'] == pytest.approx(0.1 * 4.5 / 12)
    assert logged[0][1]['loss'] > 0 and logged[0][1]['img_per_s'] > 0


def test_epoch_bar_shows_the_whole_run_eta_and_validation_has_a_bar(capsys, monkeypatch):
    model, data = tiny_bn_net(), batches(10)
    shown, show = [], engine._show

    def kept(bar, **figures):  # the postfix set, drawn at the bar's next redraw
        show(bar, **figures)
        shown.append(bar.postfix)
    monkeypatch.setattr(engine, '_show', kept)
    engine.train_one_epoch(model=model, loader=data, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(), lr_at=lambda t: 0.1,
        epoch=0, show_progress=True, iterations_after=1e9)
    assert 'epoch 0' in capsys.readouterr().err and shown and 'eta=' in shown[-1]
    eta = shown[-1].rsplit('eta=', 1)[1].split(',')[0]
    assert eta.count(':') == 2  # a billion iterations left: hours, shown as H:MM:SS
    engine.evaluate(model=model, loader=data, progress='val')
    assert 'val' in capsys.readouterr().err
    engine.evaluate(model=model, loader=data)
    assert capsys.readouterr().err == ''


def test_a_stop_request_ends_an_evaluation_before_its_next_batch():
    model, data = tiny_bn_net(), batches(10)
    seen, asked = [], []
    model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))

    def after_three_batches():
        asked.append(True)
        return len(asked) > 3
    assert engine.evaluate(model=model, loader=data, flip_tta=False,
                           stop_requested=after_three_batches) == {'stopped': True}
    assert seen == [8, 8, 8]  # three batches evaluated, the fourth not
    seen.clear()
    whole = engine.evaluate(model=model, loader=data, flip_tta=False,
                            stop_requested=lambda: False)
    assert whole['count'] == sum(seen) == 80 and 'stopped' not in whole


def test_remaining_work_follows_the_resolution_schedule():
    res_at = {0: 160, 1: 160, 2: 192, 3: 224}.get
    assert schedules.remaining_work(0, epochs=4, res_at=res_at) == pytest.approx(
        1 + (192 / 160) ** 2 + (224 / 160) ** 2)
    assert schedules.remaining_work(3, epochs=4, res_at=res_at) == 0


# ----------------------------------------------------------------------------- a run with them all
OPTIONS = ['--training.epochs=3', '--resolution.min_res=32', '--resolution.max_res=32',
           '--lr.lr_schedule_type=cosine', '--lr.warmup_epochs=1', '--lr.min_lr=0.0005',
           '--lr.lr=0.002', '--training.optimizer=adamw', '--training.weight_decay=0.05',
           '--training.clip_grad_norm=2', '--training.ema_decay=0.9', '--training.ema_every=2',
           '--training.mixup_alpha=0.2', '--training.cutmix_alpha=1.0',
           '--training.grad_accum_steps=2', '--checkpoint.keep_best=1', '--checkpoint.keep_last=2',
           '--training.auto_augment=ta_wide', '--training.random_erase=0.25',
           '--logging.run_name=every-option', '--logging.tensorboard=1', '--logging.every_iters=4']


@pytest.fixture(scope='module')
def options(tmp_path_factory):
    """OPTIONS, starting from the weights of a 7-class ResNet-18 (model.weights: fine-tuning)."""
    path = tmp_path_factory.mktemp('start') / 'start.pt'
    torch.manual_seed(7)
    torch.save(models.build_model(arch='resnet18', num_classes=7, use_blurpool=False,
                                  channels_last=False).state_dict(), path)
    return [*OPTIONS, f'--model.weights={path}']


@pytest.fixture(scope='module')
def options_run(sample_betons, tmp_path_factory, options):
    """3 epochs of ResNet-18 on the sample (10 iterations each, 2 a step) with every stateful
    option on."""
    folder = tmp_path_factory.mktemp('options')
    summary = train.main(small_config(sample_betons, folder, *options))
    run_dir = Path(summary['run_dir'])
    return summary, run_dir, [json.loads(line) for line in open(run_dir / 'log.jsonl')]


def test_a_run_with_every_option_reports_and_saves_the_ema_and_ends_at_min_lr(options_run):
    summary, run_dir, log = options_run
    assert all('top_1_ema' in r and 'val_loss_ema' in r for r in log)
    assert summary['top_1_ema'] == log[-1]['top_1_ema']
    model = torch.load(run_dir / 'final_weights.pt', weights_only=True)
    ema = torch.load(run_dir / 'final_weights_ema.pt', weights_only=True)
    assert ema.keys() == model.keys() and (run_dir / 'final_weights_ema.safetensors').exists()
    assert not torch.equal(ema['fc.weight'], model['fc.weight'])
    state = checkpoint.load(run_dir / 'checkpoint.pt')
    # 10 batches an epoch, 2 accumulated: 5 optimizer steps an epoch, 15 in the run; the EMA after
    # every second of the run's steps (counted within epochs, after steps 2 and 4 of each: 6)
    assert int(state['ema']['n_averaged']) == 15 // 2
    assert 'exp_avg_sq' in next(iter(state['optimizer']['state'].values()))  # AdamW's
    assert int(state['optimizer']['state'][0]['step']) == 3 * 5
    # the last step (batches 8 and 9, t = 3 - 0.1 epochs) is a hair above min_lr
    assert log[-1]['lr'] == pytest.approx(schedules.lr_at(
        2.9, schedule='cosine', lr=0.002, epochs=3, warmup_epochs=1, min_lr=0.0005), rel=1e-12)
    assert 0.0005 < log[-1]['lr'] < 0.0005 * 1.02


def test_keep_best_holds_the_weights_of_the_best_epoch(options_run, sample_betons, tmp_path):
    """best_weights.pt evaluated on its own gives the top-1 logged for the best epoch."""
    summary, run_dir, log = options_run
    best = max(range(len(log)), key=lambda e: (log[e]['top_1'], -e))
    assert (summary['best_epoch'], summary['best_top1']) == (best, log[best]['top_1'])
    result = train.main(small_config(
        sample_betons, tmp_path, '--training.eval_only=1',
        f'--model.weights={run_dir / "best_weights.pt"}'))
    assert result['top_1'] == log[best]['top_1']


def test_tensorboard_holds_the_train_and_val_scalars(options_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    summary, run_dir, log = options_run
    events = EventAccumulator(str(run_dir / 'tensorboard'))
    events.Reload()
    assert [e.step for e in events.Scalars('train/loss')] == [4, 8, 14, 18, 24, 28]
    assert [e.step for e in events.Scalars('train/lr')] == [4, 8, 14, 18, 24, 28]
    val = events.Scalars('val/top_1')
    assert [e.value for e in val] == pytest.approx([r['top_1'] for r in log])
    assert [e.value for e in events.Scalars('val/top_1_ema')] == \
        pytest.approx([r['top_1_ema'] for r in log])


def test_resume_with_every_option_ends_like_the_uninterrupted_run(options_run, options,
                                                                  sample_betons, tmp_path):
    """Stopped after epoch 0 (a top-1 target of 0.1 %: any hit on the val set reaches it; the
    target may change on resume), then resumed from its checkpoint with the target off: AdamW's moments, the EMA, the random state of
    TrivialAugmentWide, Random Erasing and MixUp/CutMix, the best epoch, and the crops, flips and
    order (a function of the seed: crops.py) all continue, so the weights, the EMA and the best
    weights end bit for bit as the uninterrupted run's, each epoch logged once."""
    summary, run_dir, log = options_run
    first = train.main(small_config(sample_betons, tmp_path, *options,
                                    '--training.target_top1=0.001'))
    assert first['target_reached_epoch'] == 0
    saved = Path(first['run_dir']) / 'checkpoint.pt'
    resumed = train.main(small_config(sample_betons, tmp_path, *options, f'--resume={saved}'))
    for name in ('final_weights.pt', 'final_weights_ema.pt', 'best_weights.pt'):
        got = torch.load(Path(resumed['run_dir']) / name, weights_only=True)
        expected = torch.load(run_dir / name, weights_only=True)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name  # bit for bit
    assert resumed['weights_sha256'] == summary['weights_sha256']
    assert (resumed['top_1'], resumed['top_1_ema'], resumed['best_epoch']) == \
        (summary['top_1'], summary['top_1_ema'], summary['best_epoch'])
    log_lines = (Path(first['run_dir']) / 'log.jsonl').read_text().splitlines()
    assert [json.loads(line)['epoch'] for line in log_lines] == [0, 1, 2]
    # checkpoint.keep_last=2: the checkpoints after epochs 2 and 3 (epoch 1's deleted after the
    # resume), each as the uninterrupted run's
    for folder in (run_dir, Path(resumed['run_dir'])):
        assert sorted(p.name for p in folder.glob('checkpoint_epoch_*.pt')) == [
            'checkpoint_epoch_2.pt', 'checkpoint_epoch_3.pt']
    for epochs_done in (2, 3):
        got, expected = (checkpoint.load(folder / f'checkpoint_epoch_{epochs_done}.pt')
                         for folder in (Path(resumed['run_dir']), run_dir))
        assert got['epoch'] == expected['epoch'] == epochs_done
        assert all(torch.equal(got['model'][k], expected['model'][k]) for k in expected['model'])


def test_a_resume_within_an_epoch_with_every_stateful_option_continues_bit_for_bit(tmp_path):
    """The trainer's resume test above stops at an epoch's end, and the SIGKILL test of
    test_resume.py trains without these options: here a stop request within an epoch (iteration
    4 of 7, gradients accumulated over 2 batches, EMA every 3 optimizer steps, MixUp + CutMix,
    TrivialAugmentWide + Random Erasing, clipping, a cosine LR with warm-up), a checkpoint
    through its file, and a resume in a fresh state with other random draws end with the
    weights and the EMA of the uninterrupted run, bit for bit."""
    from imagenet_ffcv.augment import batch_augmenter
    torch.manual_seed(1)
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 3, (8,))) for _ in range(7)]
    lr_at = functools.partial(schedules.lr_at, schedule='cosine', lr=0.1, epochs=3,
                              warmup_epochs=0.5)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def fresh(seed):
        model = tiny_bn_net()
        ema = make_ema(model, 0.7)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        options = engine.StepOptions(
            ema=ema, ema_every=3, grad_accum_steps=2, clip_grad_norm=1.0,
            mix=batch_mixer(num_classes=3, mixup_alpha=0.4, cutmix_alpha=1.0),
            augment=batch_augmenter(auto_augment='ta_wide', random_erase=0.3))
        torch.manual_seed(seed)
        return model, ema, optimizer, options

    def epoch(model, optimizer, options, e, **kwargs):
        return engine.train_one_epoch(model=model, loader=data, optimizer=optimizer,
                                      loss_fn=loss_fn, lr_at=lr_at, epoch=e, options=options,
                                      show_progress=False, **kwargs)

    model, ema, optimizer, options = fresh(42)
    for e in range(3):
        epoch(model, optimizer, options, e)
    expected = [copy.deepcopy(m.state_dict()) for m in (model, ema)]

    model, ema, optimizer, options = fresh(42)
    epoch(model, optimizer, options, 0)
    stats = epoch(model, optimizer, options, 1,
                  hooks=engine.EpochHooks(stop_requested=lambda: True, check_every=4))
    assert (stats['iterations_done'], stats['stopped']) == (4, True)
    checkpoint.save(checkpoint.training_state(
        model_state=model.state_dict(), optimizer=optimizer, epoch=1, iteration=4, config={},
        classes=None, best_top1=None, progress={}, ema=ema), tmp_path / 'checkpoint.pt')

    saved = checkpoint.load(tmp_path / 'checkpoint.pt')
    model, ema, optimizer, options = fresh(123)  # another process: other random draws
    checkpoint.restore_training_state(saved, model=model, optimizer=optimizer, ema=ema)
    epoch(model, optimizer, options, 1, start_iteration=saved['iteration'])
    epoch(model, optimizer, options, 2)
    for got, want in zip((model.state_dict(), ema.state_dict()), expected):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), [
            k for k in want if not torch.equal(got[k], want[k])]


def test_compile_may_change_on_resume_but_the_stateful_options_may_not():
    saved = {'training': {'compile': 0, 'ema_decay': 0.0, 'mixup_alpha': 0.0}}
    now = {'training': {'compile': 1, 'ema_decay': 0.999, 'mixup_alpha': 0.2}}
    assert config.schedule_changes(saved, now) == [
        'training.ema_decay: 0.0 -> 0.999', 'training.mixup_alpha: 0.0 -> 0.2']


def test_training_compile_wraps_the_model_and_checkpoints_keep_torchvision_keys(
        sample_betons, tmp_path):
    """training.compile=1: the trained module is torch.compile's wrapper of the plain model (the
    compilation itself, lazy, is tested in test_models.py); what is saved has torchvision's keys."""
    cfg = small_config(sample_betons, tmp_path, '--training.compile=1')
    run = train.build(cfg, distributed.from_env(), 0.0)
    assert run.model is not run.model_without_ddp
    assert run.model._orig_mod is run.model_without_ddp
    assert list(models.unwrapped_state_dict(run.model)) == \
        list(run.model_without_ddp.state_dict())


def test_sync_bn_off_cuda_is_refused_before_any_work(sample_betons, tmp_path):
    """SyncBatchNorm runs on CUDA only (its CUDA test: tests/test_cuda.py)."""
    cfg = small_config(sample_betons, tmp_path, '--training.sync_bn=1')
    with pytest.raises(config.ConfigError, match=r'training.sync_bn=1: torch.nn.SyncBatchNorm '
                                                 r'runs on CUDA GPUs only.*this run is on cpu'):
        train.main(cfg)
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_wandb_asked_for_but_missing_stops_before_any_work(sample_betons, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)
    cfg = small_config(sample_betons, tmp_path, '--logging.wandb_project=imagenet')
    with pytest.raises(MissingPackageError, match=r"logging.wandb_project='imagenet' needs the "
                                                  r"package 'wandb'.*pip install wandb=="):
        train.main(cfg)
    assert list(tmp_path.iterdir()) == []  # no run folder
