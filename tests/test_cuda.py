"""The CUDA path, on a GPU (skipped without one; ``benchmarks/gpu_check.sh`` runs these on the lent
GPU machine): the CUDA loaders against the CPU ones, stream safety of their batches, a training step
in bf16 and fp16, torch.compile and the training options (EMA, augmentation, MixUp/CutMix, AdamW,
clipping, gradient accumulation) on CUDA, checkpoints moving between CUDA and CPU, eval-only and
``predict.py`` on CUDA against CPU.

Loader batches come from ``loaders.val_loader`` (centre crop: the same pixels on every pass) on the
demo sample betons (shorter side 64). A CPU process inside a CUDA test is a subprocess with
``CUDA_VISIBLE_DEVICES=''`` (``distributed.from_env`` then picks the CPU), started with this
process's PYTHONPATH (where ffcv may come from ``.carry``).
"""
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest
import torch

from conftest import REPO, SAMPLE, decoder_node, small_config
from imagenet_ffcv import (betons, checkpoint, config, constants, distributed, engine, loaders,
                           models, predict, train)
from imagenet_ffcv.precision import resolve_precision

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

CPU, CUDA = torch.device('cpu'), torch.device('cuda', 0)
RES = 48  # px; the sample betons store shorter side 64
TENSORBOARD = importlib.util.find_spec('tensorboard') is not None
SLEEP_CYCLES = 20_000_000  # torch.cuda._sleep: about 10-20 ms of GPU time (1-2 GHz clocks)


# --- helpers shared with test_cuda_pipeline_on_cpu.py ---------------------------------------------

def batches_of(loader) -> list:
    """Every batch of ``loader`` as ``(images, labels)`` copies (the loader's buffers are reused);
    ``clone`` keeps the memory format."""
    return [(x.clone(), y.clone()) for x, y in loader]


def tolerance(dtype, reference: torch.Tensor) -> float:
    """The largest |batch - CPU batch| expected of a normalised batch delivered as ``dtype``: the
    device path rounds each resampled pixel to a whole grey level before normalising (half a
    level over the smallest std at most), then stores ``dtype`` (half its spacing at the largest
    value; a whole spacing allowed)."""
    grey_level = 0.5 / float(constants.IMAGENET_STD.min())
    return grey_level + torch.finfo(dtype).eps * float(reference.abs().max()) + 1e-4


def check_against_cpu(got: list, cpu: list, dtype, device_type: str) -> None:
    """``got`` (batches of a device pipeline) equals ``cpu`` (the CPU loader's) within
    :func:`tolerance`: same count, shapes and labels, ``dtype``, channels_last, on the device."""
    assert len(got) == len(cpu)
    for (x, y), (x_cpu, y_cpu) in zip(got, cpu):
        assert x.device.type == device_type and y.device.type == device_type
        assert x.dtype == dtype and y.dtype == torch.int64
        assert x.shape == x_cpu.shape and x.shape[1:] == (3, RES, RES)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.cpu(), y_cpu)
        diff = float((x.cpu().float() - x_cpu).abs().max())
        assert diff <= tolerance(dtype, x_cpu), (dtype, diff, tolerance(dtype, x_cpu))


def cli_args(cfg, **overrides) -> list:
    """``cfg`` (a loaded config) as ``--section.key=value`` arguments, with ``overrides`` given as
    ``{'section.key': value}`` (``**{'training.epochs': 2}``)."""
    flat = {**config.flatten(config.to_dict(cfg)), **overrides}
    return [f'--{key}={value}' for key, value in flat.items()]


def run_on_cpu(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """``train_imagenet.py ARGS`` in a process that sees no GPU."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get('PYTHONPATH', '')) if p)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONPATH=path, PYTHONUNBUFFERED='1')
    result = subprocess.run([sys.executable, 'train_imagenet.py', *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert 'process(es) on cpu' in result.stdout
    return result


def log_epochs(run_dir) -> list:
    return [json.loads(line)['epoch'] for line in open(Path(run_dir) / 'log.jsonl')]


# --- the CUDA loaders against the CPU ones -------------------------------------------------------

@pytest.fixture(scope='module')
def cpu_val_batches(sample_betons):
    return batches_of(loaders.val_loader(path=sample_betons['val'], batch_size=32, num_workers=2,
                                         res=RES, device=CPU))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_val_batches_equal_the_cpu_ones(sample_betons, cpu_val_batches, dtype):
    """Same images, labels and order; normalised on the device to the dtype asked for, within
    the uint8 rounding and that dtype's precision; channels_last."""
    loader = loaders.val_loader(path=sample_betons['val'], batch_size=32, num_workers=2, res=RES,
                                device=CUDA, dtype=dtype)
    check_against_cpu(batches_of(loader), cpu_val_batches, dtype, 'cuda')


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA GPUs')
def test_a_loader_on_the_second_gpu_makes_no_cuda_context_on_the_first(sample_betons):
    """A rank's loader thread works on the rank's GPU: a loader on cuda:1 (rank 1 of a node)
    leaves GPU 0 without a CUDA context (ffcv's thread made one there: a new thread's device is
    0). Run in a process of its own, whose CUDA starts on cuda:1."""
    script = ('import sys, torch\n'
              'from imagenet_ffcv import loaders\n'
              'torch.cuda.set_device(1)\n'
              'loader = loaders.val_loader(path=sys.argv[1], batch_size=16, num_workers=2, '
              f'res={RES}, device=torch.device("cuda", 1))\n'
              'count = sum(len(y) for _, y in loader)\n'
              'torch.cuda.synchronize(1)\n'
              'print(count, torch._C._cuda_hasPrimaryContext(0))\n')
    result = subprocess.run([sys.executable, '-c', script, str(sample_betons['val'])],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(betons.num_samples(sample_betons['val'])), 'False']


def test_the_host_batch_is_pinned_and_the_decoders_scratch_is_not(sample_betons):
    """The decoder's uint8 batch, which is copied to the GPU, sits in pinned host memory (so the
    copy is asynchronous); its scratch memory (a whole image per row, never copied) does not:
    ``loaders.allocate`` gives it a row per thread, unpinned."""
    loader = loaders.val_loader(path=sample_betons['val'], batch_size=32, num_workers=2, res=RES,
                                device=CUDA)
    pixels, scratch, _ = loaders.allocate(loader.graph, 32, loader.batches_ahead + 2)[
        'operation'][decoder_node(loader)]
    assert torch.from_numpy(pixels).is_pinned()
    assert not torch.from_numpy(scratch).is_pinned()


# --- stream safety ---------------------------------------------------------------------------
# ffcv runs each batch's pipeline on one of its side streams (one per slot of its ring of
# batches_ahead + 2 buffers) and makes the consumer's stream wait for it; it guards its own
# buffers with events recorded on the consumer's stream. The batch NormalizeOnDevice returns is
# allocated on that side stream, outside the ring: NormalizeOnDevice marks it used by the default
# stream (record_stream), so that the caching allocator does not hand its memory to the next
# batch of that side stream while the default stream may still read it.
#
# Each test reads batches on the default stream behind a slow kernel (torch.cuda._sleep) and
# compares per-image sums with those of a pass that synchronised after every batch. The host is
# kept at most LAG batches ahead of the default stream, except in the last two tests, which let it
# run ahead without limit (ffcv alone does not guard its pinned host buffers against that;
# loaders.Loader's epoch iterator does). Each runs with the loader thread waiting for the copy
# out of the host buffer after each batch and before reusing the slot (loaders.COPY_WAIT).

LAG = 2


def checksums(x: torch.Tensor) -> torch.Tensor:
    """Per-image sums (float64 (B,)), computed on the current stream."""
    return x.double().sum(dim=(1, 2, 3))


class Pace:
    """Keeps the host at most ``lag`` calls ahead of the default stream (lag None: no limit)."""

    def __init__(self, lag):
        self.lag, self.events = lag, deque()

    def __call__(self):
        if self.lag is None:
            return
        event = torch.cuda.Event()
        event.record()
        self.events.append(event)
        if len(self.events) > self.lag:
            self.events.popleft().synchronize()


@pytest.fixture(scope='module', params=['batch', 'slot'])
def stream_loader(sample_betons, request):
    """The CUDA val loader over the 340 sample train images in batches of 16 (22 batches, several
    times ffcv's ring), made with ``loaders.COPY_WAIT`` = the param, and the reference sums: each
    batch summed, then the device synchronised."""
    default, loaders.COPY_WAIT = loaders.COPY_WAIT, request.param
    try:
        loader = loaders.val_loader(path=sample_betons['train'], batch_size=16, num_workers=2,
                                    res=RES, device=CUDA, dtype=torch.bfloat16)
    finally:
        loaders.COPY_WAIT = default
    assert loader.copy_wait == request.param
    reference = []
    for x, _ in loader:
        reference.append(checksums(x))
        torch.cuda.synchronize()
    assert len(reference) > 3 * (loader.batches_ahead + 2)
    return loader, reference


def assert_same_sums(got: dict, reference: list) -> None:
    torch.cuda.synchronize()
    wrong = [i for i, ref in enumerate(reference) if not torch.equal(got[i], ref)]
    assert sorted(got) == list(range(len(reference)))
    assert not wrong, f'batches {wrong} of {len(reference)} changed before they were read'


def test_a_batch_is_not_overwritten_while_the_default_stream_still_reads_it(stream_loader):
    """Each batch is read behind a slow kernel, then dropped at once (as a training loop does)."""
    loader, reference = stream_loader
    pace, sums, behind = Pace(LAG), {}, 0
    for i, (x, _) in enumerate(loader):
        behind += not torch.cuda.current_stream().query()  # the GPU still reads earlier batches
        torch.cuda._sleep(SLEEP_CYCLES)
        sums[i] = checksums(x)
        pace()
    assert behind > 0, 'no batch arrived while the GPU was busy: the test probed nothing'
    assert_same_sums(sums, reference)


@pytest.mark.parametrize('extra', range(5))
def test_batches_held_longer_than_ffcv_ring_stay_intact(stream_loader, extra):
    """``ring + extra`` batches held alive (ring = batches_ahead + 2, so ffcv has reused every
    slot meanwhile), each read behind a slow kernel only when it leaves the window and dropped
    right after: the memory must not go to a later batch before that read is done. The host
    yields before each read, so ffcv's thread queues the next batch while the oldest is freed
    (ring + 1 held reuses the freed batch's side stream first; the other sizes cover the
    other slots)."""
    loader, reference = stream_loader
    window = loader.batches_ahead + 2 + extra
    pace, held, sums = Pace(LAG), deque(), {}
    for i, (x, _) in enumerate(loader):
        held.append((i, x))
        if len(held) > window:
            time.sleep(0.001)
            j, old = held.popleft()
            torch.cuda._sleep(SLEEP_CYCLES)
            sums[j] = checksums(old)
            del old
        pace()
    for j, old in held:
        sums[j] = checksums(old)
    assert_same_sums(sums, reference)


def test_batches_survive_a_consumer_far_behind_the_host(stream_loader):
    """As the first stream test, with no limit on how far the host runs ahead of the GPU: ffcv
    1.0.2 alone would decode into a pinned host buffer whose asynchronous copy to the GPU has not
    run yet (it waits for the consumer's stream); loaders.Loader's epoch iterator makes the loader
    thread wait for that copy before it decodes into the buffer again, so every batch arrives
    intact, its labels (copied from a pinned host buffer too) included."""
    from ffcv.reader import Reader
    loader, reference = stream_loader
    sums, labels, behind = {}, [], 0
    for i, (x, y) in enumerate(loader):
        behind += not torch.cuda.current_stream().query()
        torch.cuda._sleep(SLEEP_CYCLES)
        sums[i] = checksums(x)
        labels.append(y.clone())
    assert behind > 0, 'no batch arrived while the GPU was busy: the test probed nothing'
    assert_same_sums(sums, reference)
    stored = Reader(str(loader.fname)).metadata['f1'].astype('int64')
    got = torch.cat(labels).cpu()
    assert torch.equal(got, torch.as_tensor(stored[:len(got)])), 'labels changed before read'


def test_the_next_epoch_does_not_overwrite_what_the_gpu_still_reads(stream_loader,
                                                                     sample_betons):
    """``loaders.Loader`` hands an epoch's buffers to the next epoch (the labels are ffcv's device
    buffers, read by the training loop itself). Two epochs back to back, every batch read behind
    a slow kernel and the host never waiting: the next epoch starts while the GPU still has the
    last epoch's reads queued, and every image and label arrives as the synchronised pass saw it."""
    from ffcv.reader import Reader
    loader, reference = stream_loader
    labels = torch.as_tensor(Reader(str(sample_betons['train'])).metadata['f1'].astype('int64'))
    sums = {}
    for epoch in range(2):
        for i, (x, y) in enumerate(loader):
            torch.cuda._sleep(SLEEP_CYCLES)
            sums[epoch, i] = checksums(x), y.clone()
    torch.cuda.synchronize()
    for epoch in range(2):
        assert_same_sums({i: sums[epoch, i][0] for i in range(len(reference))}, reference)
        got = torch.cat([sums[epoch, i][1].cpu() for i in range(len(reference))])
        assert torch.equal(got, labels[:len(got)]), f'epoch {epoch}: labels changed'


def test_every_epoch_uses_the_same_side_streams_and_reserves_no_more_memory(sample_betons):
    """ffcv 1.0.2 takes batches_ahead + 2 new side streams from torch's pool (32 per device) for
    each epoch, and NormalizeOnDevice's batches are allocated on them; torch's caching allocator
    keeps a stream's freed memory for that stream, so each epoch reserved more until the pool came
    round. ``loaders.Loader`` keeps its streams: 20 epochs (100 streams' worth) reserve what the
    first two did. float32 batches of 64 at 48 px (1.8 MB, each in a 20 MB block of its own)."""
    loader = loaders.val_loader(path=sample_betons['train'], batch_size=64, num_workers=2,
                                res=RES, device=CUDA, dtype=torch.float32)
    streams, reserved = [], []
    for _ in range(20):
        epoch = iter(loader)
        for x, _ in epoch:
            checksums(x)
        streams.append([stream.cuda_stream for stream in epoch.cuda_streams])
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved(CUDA))
    assert all(handles == streams[0] for handles in streams), streams
    assert reserved[-1] - reserved[1] < 3 * 20 * 2**20, [r / 2**20 for r in reserved]


# --- training step, checkpoints, eval-only, predict ------------------------------------------

def test_validation_waits_for_the_gpu_once_not_at_every_batch():
    """engine.evaluate sums its top-1/top-5 hits and loss on the device and reads them once: the
    syncs torch's sync debug mode reports are as many over 6 batches as over 2 (it read three
    numbers back per batch before, each a wait for the GPU)."""
    import warnings
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10)).to(CUDA)
    batch = (torch.randn(16, 3, 32, 32, device=CUDA), torch.randint(0, 10, (16,), device=CUDA))
    syncs = {}
    for n in (2, 6):
        engine.evaluate(model=model, loader=[batch] * n)  # warm: cuDNN's choices, allocations
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                result = engine.evaluate(model=model, loader=[batch] * n)
            finally:
                torch.cuda.set_sync_debug_mode('default')
        syncs[n] = sum('synchroniz' in str(w.message) for w in caught)
        assert result['count'] == 16 * n
    assert syncs[6] == syncs[2]


def test_an_ema_update_after_the_first_does_not_wait_for_the_gpu():
    """ema.EMA's updates queue their work without a sync that torch's sync debug mode reports
    (torch's AveragedModel copies its CPU count to the device at each update, a copy that waits
    for the GPU): the EMA recipe updates every 4 steps."""
    import warnings
    from imagenet_ffcv.ema import make_ema
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).to(CUDA)
    ema = make_ema(model, 0.9)
    ema.update_parameters(model)  # the first copies the weights
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            for _ in range(3):
                ema.update_parameters(model)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    assert not [str(w.message) for w in caught if 'synchroniz' in str(w.message)]
    assert int(ema.n_averaged) == 4


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_a_training_step_on_cuda_lowers_the_loss_on_a_fixed_batch(amp):
    """engine.train_step with autocast (and a GradScaler for fp16): the loss of a fixed batch is
    lower after each step; the weights stay float32."""
    precision = resolve_precision(amp, CUDA)
    torch.manual_seed(0)
    model = models.build_model(arch='resnet18', num_classes=10, use_blurpool=True,
                               channels_last=True).to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler('cuda') if precision.loss_scaling else None
    x = torch.randn(32, 3, 64, 64, device=CUDA).to(precision.input_dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=CUDA)
    losses = [float(engine.train_step(model=model, x=x, y=y, optimizer=optimizer,
                                      loss_fn=torch.nn.CrossEntropyLoss(),
                                      amp_dtype=precision.amp_dtype, scaler=scaler))
              for _ in range(3)]
    assert losses[2] < losses[1] < losses[0], losses
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all())
               for p in model.parameters())


def test_a_compiled_training_step_on_cuda_matches_eager():
    """models.compile_model (training.compile=1) on CUDA, fp32: the loss and gradients of one step
    equal eager's from the same weights (a small conv + BN + BlurPool net: compiling is the test,
    not the model)."""
    torch.manual_seed(0)
    eager = models.apply_blurpool(torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 10))).to(CUDA).to(memory_format=torch.channels_last)
    compiled = models.compile_model(copy.deepcopy(eager))
    x = torch.randn(8, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device=CUDA)
    results = []
    for net in (eager, compiled):
        net.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in net.parameters()]))
    (loss, grads), (loss_c, grads_c) = results
    assert loss_c == pytest.approx(loss, rel=1e-4)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=1e-3, atol=1e-4 * max(1.0, float(g.abs().max())))


def test_a_run_with_the_training_options_on_cuda(sample_betons, tmp_path):
    """EMA, TrivialAugmentWide, Random Erasing, MixUp/CutMix, AdamW, cosine, gradient clipping,
    gradient accumulation, keep_best and TensorBoard (where installed) together on CUDA (bf16, or
    fp16 with the scaler's unscale-then-clip): the run finishes, every weights file is finite, the
    EMA is validated and the event file is written."""
    cfg = small_config(sample_betons, tmp_path, '--training.epochs=2', '--lr.lr=0.002',
                       '--lr.lr_schedule_type=cosine', '--training.optimizer=adamw',
                       '--training.clip_grad_norm=2', '--training.ema_decay=0.9',
                       '--training.auto_augment=ta_wide', '--training.random_erase=0.25',
                       '--training.grad_accum_steps=2',
                       '--training.mixup_alpha=0.2', '--training.cutmix_alpha=1.0',
                       '--checkpoint.keep_best=1', f'--logging.tensorboard={int(TENSORBOARD)}',
                       '--logging.every_iters=4')
    summary = train.main(cfg)
    run_dir = Path(summary['run_dir'])
    for name in ('final_weights.pt', 'final_weights_ema.pt', 'best_weights.pt'):
        state = torch.load(run_dir / name, weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    assert 0 <= summary['top_1_ema'] <= 1 and summary['best_epoch'] in (0, 1)
    if TENSORBOARD:  # the lent GPU machine may not have the package
        assert list((run_dir / 'tensorboard').glob('events.out.tfevents.*'))


@pytest.mark.parametrize('auto_augment', ['ra', 'ta_wide'])
def test_augmentation_of_a_cuda_batch_draws_and_gives_what_the_cpu_does(auto_augment):
    """augment.batch_augmenter on a bf16 channels_last batch on the GPU (as the CUDA loader gives
    it) keeps its dtype, layout and device, and with the same seed draws the ops the CPU draws
    (torch's CPU generator): the images agree with the CPU's within bf16 rounding and the GPU's
    interpolation: mean difference 0.016 for RandAugment from bf16 alone on CPU, about 1.1 for
    another draw (normalised units)."""
    from imagenet_ffcv.augment import batch_augmenter
    x = torch.randn(16, 3, 40, 40, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    augment = batch_augmenter(auto_augment=auto_augment, random_erase=0.5)
    torch.manual_seed(4)
    on_cpu = augment(x)
    on_gpu_input = x.to(CUDA, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(4)
    on_gpu = augment(on_gpu_input)
    assert on_gpu.device == on_gpu_input.device and on_gpu.dtype == torch.bfloat16
    assert on_gpu.is_contiguous(memory_format=torch.channels_last)
    assert (on_gpu.float().cpu() - on_cpu).abs().mean() < 0.2


def test_sync_bn_trains_with_synchronized_batchnorm_and_saves_torchvision_keys(sample_betons,
                                                                             tmp_path):
    """training.sync_bn=1: every BatchNorm of the model is torch.nn.SyncBatchNorm (DDP then
    reduces its statistics over the ranks; one process computes them alone), the run finishes
    with finite weights, and final_weights.pt loads into torchvision's plain ResNet-18."""
    import torchvision
    cfg = small_config(sample_betons, tmp_path, '--training.epochs=1', '--training.sync_bn=1',
                       '--training.use_blurpool=0')
    run = train.build(cfg, distributed.from_env(), 0.0)
    kinds = {type(m) for m in run.model_without_ddp.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {torch.nn.SyncBatchNorm}
    summary = train.main(cfg)
    state = torch.load(Path(summary['run_dir']) / 'final_weights.pt', weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    torchvision.models.resnet18(num_classes=10).load_state_dict(state)


def run_config(sample_betons, folder):
    """Two epochs that stop after the first (top-1 target 1 %, nearly always met): the run's
    checkpoint.pt then holds epoch 1 of 2, a run to continue. LR 0.025 as the short run uses."""
    return small_config(sample_betons, folder, '--training.epochs=2', '--lr.lr=0.025',
                        '--training.target_top1=0.01')


@pytest.fixture(scope='module')
def cuda_run(sample_betons, tmp_path_factory):
    """The run of :func:`run_config` on CUDA (bf16 where the GPU has it): ``(summary, cfg)``."""
    cfg = run_config(sample_betons, tmp_path_factory.mktemp('cuda_runs'))
    summary = train.main(cfg)
    assert summary['epochs'] == 1, 'the 1 % top-1 target was not met after one epoch'
    return summary, cfg


def test_a_checkpoint_written_on_cuda_resumes_on_cpu(cuda_run, tmp_path):
    summary, cfg = cuda_run
    run_dir = tmp_path / 'run'
    shutil.copytree(summary['run_dir'], run_dir)  # leave the fixture's run as it is
    saved = checkpoint.load(run_dir / 'checkpoint.pt')
    assert saved['epoch'] == 1 and saved['config']['derived']['device'].startswith('cuda')
    run_on_cpu(cli_args(cfg, **{'training.target_top1': 0.0,
                                'checkpoint.resume': run_dir / 'checkpoint.pt'}))
    assert log_epochs(run_dir) == [0, 1]
    resumed = checkpoint.load(run_dir / 'checkpoint.pt')
    assert resumed['epoch'] == 2 and resumed['config']['derived']['device'] == 'cpu'
    assert (run_dir / 'final_weights.pt').exists()


def test_a_checkpoint_written_on_cpu_resumes_on_cuda(sample_betons, tmp_path):
    cfg = run_config(sample_betons, tmp_path / 'runs')
    run_on_cpu(cli_args(cfg))
    [ckpt] = (tmp_path / 'runs').glob('*/checkpoint.pt')
    assert checkpoint.load(ckpt)['config']['derived']['device'] == 'cpu'
    summary = train.main(config.load_config(cli_args(
        cfg, **{'training.target_top1': 0.0, 'checkpoint.resume': ckpt})))
    assert Path(summary['run_dir']) == ckpt.parent and log_epochs(ckpt.parent) == [0, 1]
    resumed = checkpoint.load(ckpt)
    assert resumed['epoch'] == 2 and resumed['config']['derived']['device'].startswith('cuda')
    assert resumed['config']['derived']['amp'] == resolve_precision('auto', CUDA).name


@torch.no_grad()
def logits_on_both(weights, val_beton, res) -> tuple:
    """``(cpu, cuda, labels)``: the logits (N, classes) of the saved model on the val set with
    validation's flip TTA rule, on the CPU in fp32 (what eval-only computes on a CPU machine) and
    on CUDA in the precision ``training.amp=auto`` picks there, from the same CPU batches."""
    precision = resolve_precision('auto', CUDA)
    on_cpu = weights.load_model(weights, num_classes=10).model.eval()
    on_cuda = weights.load_model(weights, num_classes=10).model.to(CUDA).eval()
    cpu, cuda, labels = [], [], []
    for x, y in batches_of(loaders.val_loader(path=val_beton, batch_size=64, num_workers=2,
                                              res=res, device=CPU)):
        cpu.append(engine.flip_tta_logits(on_cpu, x))
        with torch.autocast('cuda', dtype=precision.amp_dtype,
                            enabled=precision.amp_dtype is not None):
            x = x.to(CUDA, precision.input_dtype)
            cuda.append(engine.flip_tta_logits(on_cuda, x).float().cpu())
        labels.append(y)
    return torch.cat(cpu), torch.cat(cuda), torch.cat(labels)


def test_eval_only_on_cuda_gives_the_cpu_top1(cuda_run, sample_betons, tmp_path):
    """The logits on CUDA are the CPU ones within bf16 error, and eval-only's top-1 on CUDA
    counts the CPU's right images, but for images whose two best logits are closer than twice
    that error (and one more)."""
    summary, cfg = cuda_run
    weights = Path(summary['run_dir']) / 'final_weights.pt'
    on_cuda = train.main(config.load_config(cli_args(
        cfg, **{'training.eval_only': 1, 'model.weights': weights,
                'training.target_top1': 0.0, 'logging.folder': tmp_path})))
    cpu, cuda, labels = logits_on_both(weights, sample_betons['val'], cfg.validation.resolution)
    error = float((cuda - cpu).abs().max())
    assert error <= 0.05 * float(cpu.abs().max()) + 0.02, error
    best = cpu.topk(2, dim=1).values
    close = int((best[:, 0] - best[:, 1] <= 2 * error).sum())
    hits = int((cpu.argmax(1) == labels).sum())
    assert on_cuda['val_count'] == len(labels) == 100
    assert abs(round(on_cuda['top_1'] * 100) - hits) <= 1 + close, (on_cuda['top_1'], hits, close)
    cpu_loss = float(torch.nn.functional.cross_entropy(cpu, labels))
    assert on_cuda['val_loss'] == pytest.approx(cpu_loss, rel=0.05)


def test_predict_on_cuda_gives_the_cpu_classes(cuda_run):
    """predict.py's top-1 class is the same on CUDA and CPU for every image whose two best CPU
    probabilities are more than 0.02 apart (at most two images apart in all), and the
    probabilities agree to 0.02."""
    summary, _ = cuda_run
    weights = Path(summary['run_dir']) / 'final_weights.pt'
    files = sorted((SAMPLE / 'val').glob('*/*.JPEG'))
    on_cpu = predict.predict(files, weights=weights, max_res=64, device=CPU)
    on_cuda = predict.predict(files, weights=weights, max_res=64, device=CUDA)
    close = {i for i, r in enumerate(on_cpu) if r[0][2] - r[1][2] < 0.02}
    differ = {i for i, (a, b) in enumerate(zip(on_cpu, on_cuda)) if a[0][0] != b[0][0]}
    assert differ <= close and len(differ) <= 2, (differ, close)
    for a, b in zip(on_cpu, on_cuda):
        p_cpu = dict((wnid, p) for wnid, _, p in a)
        assert all(abs(p - p_cpu[wnid]) < 0.02 for wnid, _, p in b if wnid in p_cpu)
