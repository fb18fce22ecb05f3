"""Mixed precision that fits the GPU (training.amp): the choice per device, one training step in
bf16 and fp16, the loss scaler's overflow handling, and its state in the checkpoint (CPU: autocast
runs bf16 and fp16 on CPU too, so the same code is tested here that runs on CUDA)."""
import pytest
import torch
from torch import nn

from conftest import small_config
from imagenet_ffcv import checkpoint, distributed, engine, train
from imagenet_ffcv.precision import Precision, resolve_precision
from imagenet_ffcv.run_dir import RunDir


def test_auto_is_bf16_where_the_gpu_has_it_else_fp16_and_fp32_on_cpu(monkeypatch):
    """'auto' takes bf16 on compute capability 8.0 and later, fp16 on a V100 or T4, even though
    torch.cuda.is_bf16_supported() is true there too (it counts emulation: a T4 answers True),
    and cuDNN has no bf16 convolutions below 8.0."""
    cpu, gpu = torch.device('cpu'), torch.device('cuda', 1)  # this process's GPU: 1 of 0, 1
    assert resolve_precision('auto', cpu) == Precision('fp32')
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    for other, this, expected in (((7, 5), (9, 0), 'bf16'), ((9, 0), (7, 5), 'fp16')):  # T4, H100
        monkeypatch.setattr(torch.cuda, 'get_device_capability',
                            lambda device, caps={0: other, 1: this}: caps[device.index])
        assert resolve_precision('auto', gpu).name == expected
    fp16 = resolve_precision('auto', gpu)
    assert fp16 == Precision('fp16', torch.float16, loss_scaling=True)
    assert fp16.input_dtype == torch.float16
    assert resolve_precision('off', gpu).input_dtype == torch.float32
    assert resolve_precision('bf16', cpu).amp_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="amp='fp8'"):
        resolve_precision('fp8', cpu)


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


@pytest.mark.parametrize('amp', ['bf16', 'fp16', 'off'])
def test_a_few_steps_in_each_precision_lower_the_loss_on_a_fixed_batch(amp):
    precision = resolve_precision(amp, torch.device('cpu'))
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scaler = torch.amp.GradScaler('cpu') if precision.loss_scaling else None
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    losses = [float(engine.train_step(model=model, x=x, y=y, optimizer=optimizer,
                                      loss_fn=nn.CrossEntropyLoss(),
                                      amp_dtype=precision.amp_dtype, scaler=scaler))
              for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses
    if scaler is not None:
        assert scaler.get_scale() == 65536.0  # no overflow at this scale: never backed off


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    """A scale so large that the fp16 gradients overflow: the step is skipped (weights unchanged)
    and the scale backs off, as torch.amp's loss scaling does (Micikevicius et al. 2018)."""
    model = tiny_net()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 60)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    loss = engine.train_step(model=model, x=x, y=y, optimizer=optimizer,
                             loss_fn=nn.CrossEntropyLoss(), amp_dtype=torch.float16,
                             scaler=scaler)
    assert torch.isfinite(loss)  # the loss itself is fine; its scaled gradients are not
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 59


def test_the_loss_scaler_is_saved_in_the_checkpoint_and_restored(sample_betons, tmp_path):
    cfg = small_config(sample_betons, tmp_path, '--training.amp=fp16')
    dist = distributed.from_env({})
    run = train.build(cfg, dist, wall_start=0.0)
    assert run.precision.name == 'fp16' and run.scaler is not None
    assert run.resolved['derived']['amp'] == 'fp16' and run.resolved['training']['amp'] == 'fp16'
    run.scaler.scale(torch.ones(()))  # the scaler's state starts at its first use
    run.scaler.update(new_scale=1024.0)  # a state a fresh scaler would not have
    run.run_dir = RunDir.create(tmp_path, params=run.resolved)
    train.save_checkpoint(run, 1, 0)
    saved = checkpoint.load(run.run_dir.checkpoint)
    assert saved['scaler']['scale'] == 1024.0

    again = train.build(cfg, dist, wall_start=0.0)
    assert again.scaler.get_scale() == 65536.0
    train.restore(again, saved, run.run_dir.checkpoint)
    assert again.scaler.get_scale() == 1024.0 and again.progress.epoch == 1

    # Without loss scaling (bf16, fp32) the checkpoint has no scaler entry.
    plain = train.build(small_config(sample_betons, tmp_path), dist, wall_start=0.0)
    plain.run_dir = run.run_dir
    train.save_checkpoint(plain, 1, 0)
    assert 'scaler' not in checkpoint.load(run.run_dir.checkpoint)
