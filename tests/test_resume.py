"""Runs that survive: SIGKILL mid-epoch then --resume, SIGTERM (pre-emption), a changed config
refused, a non-finite loss. Runs of the trainer on the sample betons (CPU): a signalled run in a
process of its own, the others in this one.

The batches, random crops and flips included, depend only on the seed, the epoch and the sample
(imagenet_ffcv/crops.py), so a run killed and resumed mid-epoch must end with exactly the weights of
an uninterrupted one.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_env, small_config
from imagenet_ffcv import checkpoint, config, train
from imagenet_ffcv.run_lock import RunLockedError

EPOCHS = 4  # at 32, 32, 64, 64 px: the kill falls in epoch 2, the first at 64 px
RUN = ['--training.epochs=4', '--lr.lr=0.05', '--lr.lr_peak_epoch=1', '--logging.log_level=0',
       '--resolution.min_res=32', '--resolution.max_res=64', '--resolution.start_ramp=1',
       '--resolution.end_ramp=3']


def signalled_cli(signal_at: str, betons, folder, *extra):
    """The trainer's run of :func:`train_args`, sent a signal at a known step: ``signal_at`` is
    ``NAME:EPOCH:STEP`` (tests/torchrun_main.py)."""
    return [sys.executable, 'tests/torchrun_main.py', str(folder),
            f'--send-signal={signal_at}:0', *train_args(betons, folder, *extra)]


def train_args(betons, folder, *extra):
    return [f'--data.train_dataset={betons["train"]}', f'--data.val_dataset={betons["val"]}',
            '--data.num_workers=2', f'--logging.folder={folder}', '--model.arch=resnet18',
            '--training.batch_size=32', '--validation.batch_size=64',
            '--validation.resolution=32', *RUN, *extra]


def run(args):
    return subprocess.run(args, cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=600)


def log_of(run_dir):
    return [json.loads(line) for line in open(run_dir / 'log.jsonl')]


@pytest.fixture(scope='module')
def uninterrupted(sample_betons, tmp_path_factory):
    folder = tmp_path_factory.mktemp('uninterrupted')
    summary = train.main(small_config(sample_betons, folder, *RUN))
    return summary, log_of(folder / os.listdir(folder)[0])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_like_an_uninterrupted_run(
        sample_betons, tmp_path, uninterrupted, capsys):
    """SIGKILL while step 5 of epoch 2 runs (steps counted from 0): the checkpoint of
    iteration 4 is the last one, so the resumed run trains step 4 again, then goes on. The killed
    run is a process of its own; the resumed one is train_imagenet.py's command line in this
    process, as the uninterrupted one (their ffcv pipelines compiled once)."""
    killed = run(signalled_cli('SIGKILL:2:5', sample_betons, tmp_path,
                               '--checkpoint.every_iters=2', '--resume', 'auto'))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert '=> checkpoint: epoch 2, iteration 4' in killed.stdout
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    state = checkpoint.load(run_dir / 'checkpoint.pt')  # complete, even though killed
    assert (state['epoch'], state['iteration']) == (2, 4)
    assert not (run_dir / 'final_weights.pt').exists()

    # The same options: --resume auto finds the checkpoint and continues.
    capsys.readouterr()
    assert train.cli(train_args(sample_betons, tmp_path, '--checkpoint.every_iters=2',
                                '--resume', 'auto')) == 0
    assert f'=> resuming {run_dir} at epoch 2, iteration 4' in capsys.readouterr().out
    log = log_of(run_dir)
    assert [r['epoch'] for r in log] == list(range(EPOCHS))  # each epoch once
    summary, reference = uninterrupted
    # Same position in the LR and resolution schedules, epoch by epoch.
    assert [r['lr'] for r in log] == [r['lr'] for r in reference]
    assert [r['res'] for r in log] == [r['res'] for r in reference]
    # Epoch 2's line covers the whole epoch, the iterations before the kill too.
    assert [r['train_loss'] for r in log] == pytest.approx([r['train_loss'] for r in reference],
                                                           rel=1e-9)
    assert abs(log[-1]['top_1'] - summary['top_1']) <= 0.03, (log[-1]['top_1'], summary['top_1'])
    # Stricter: the same weights, bit for bit (model, optimizer state and schedule all restored).
    resumed = torch.load(run_dir / 'final_weights.pt', weights_only=True)
    expected = torch.load(Path(summary['run_dir']) / 'final_weights.pt', weights_only=True)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert log[-1]['top_1'] == summary['top_1']
    assert (run_dir / 'progress.png').exists()


def test_a_finished_run_resumed_by_path_trains_nothing_unless_forced_further(
        sample_betons, tmp_path, uninterrupted, capsys):
    """A finished run keeps its results in results.json (they were printed only). Resumed by its
    folder with no epoch left, it validated again and wrote its final weights anew (--resume auto
    said it had finished): now it says so and trains nothing (test_training_options' resume test
    trains on a run finished at its target). Forced with more epochs it trains them, and
    params.json holds the config it went on with (it kept the first start's). A forced resume
    with another arch is one error naming the key (a traceback of missing keys, then the
    weights' missing keys, cut short, as forced it skipped the check of keys no force carries)."""
    import shutil
    summary, _ = uninterrupted
    results = json.loads((Path(summary['run_dir']) / 'results.json').read_text())
    assert results == json.loads(json.dumps(summary))
    run_dir = tmp_path / 'run'
    shutil.copytree(summary['run_dir'], run_dir)
    before = (run_dir / 'final_weights.pt').stat().st_mtime_ns
    capsys.readouterr()
    assert train.main(small_config(sample_betons, tmp_path, *RUN, f'--resume={run_dir}')) == {
        'run_dir': str(run_dir), 'finished_before': True}
    assert (f'=> {run_dir} has finished (final_weights.pt), and this config leaves it no epoch to '
            'train: nothing to resume') in capsys.readouterr().out
    assert (run_dir / 'final_weights.pt').stat().st_mtime_ns == before
    with pytest.raises(config.ConfigError, match=r"model.arch: 'resnet18' -> 'resnet34'\nresume "
                                                 r"with the config of the run \(model.arch cannot "
                                                 r"change on resume, even forced: start a new run"):
        train.main(small_config(sample_betons, tmp_path, *RUN, '--model.arch=resnet34',
                                '--checkpoint.force=1', f'--resume={run_dir}'))
    more = train.main(small_config(sample_betons, tmp_path, *RUN, '--training.epochs=5',
                                   '--checkpoint.force=1', '--logging.run_name=other',
                                   f'--resume={run_dir}'))
    assert more['epochs'] == 5 and [r['epoch'] for r in log_of(run_dir)] == list(range(5))
    params = json.loads((run_dir / 'params.json').read_text())
    assert params['training']['epochs'] == 5
    assert params['logging']['run_name'] == ''  # the run's own name: --resume auto finds it so
    assert json.loads((run_dir / 'results.json').read_text())['epochs'] == 5
    # the 4-epoch final weights and results kept aside: while it trained on, the run was not
    # finished (a pre-empted job's --resume auto found it finished and stopped)
    assert json.loads((run_dir / 'results_epoch_4.json').read_text())['top_1'] == summary['top_1']
    kept = torch.load(run_dir / 'final_weights_epoch_4.pt', weights_only=True)
    expected = torch.load(Path(summary['run_dir']) / 'final_weights.pt', weights_only=True)
    assert all(torch.equal(kept[k], expected[k]) for k in expected)
    assert (run_dir / 'final_weights_epoch_4.safetensors').exists()


def test_a_rank_that_stops_for_another_ranks_signal_ends_as_stopped(sample_betons, tmp_path,
                                                                     monkeypatch, capsys):
    """The ranks agree to stop when any of them got SIGTERM (a pre-emption notice that reached
    one node), and fit returns False on each. On a rank that got no signal itself its
    StopRequest is false: the rank went on into the end of a finished run (validation, final
    weights), and, its peers gone, failed in a collective. It now ends as stopped, exit 143."""
    monkeypatch.setattr(train, 'fit', lambda run, stop: False)  # no signal here
    summary = train.main(small_config(sample_betons, tmp_path, '--training.epochs=1'))
    assert summary['stopped'] and summary['exit_code'] == 143
    assert 'stopped by a signal on another rank' in capsys.readouterr().out
    assert not (Path(summary['run_dir']) / 'final_weights.pt').exists()


def signal_as_it_starts(monkeypatch, module, name):
    """SIGTERM to this process as ``module.name`` is first called (then it is put back)."""
    original = getattr(module, name)

    def signalled(*args, **kwargs):
        monkeypatch.setattr(module, name, original)
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, signalled)


def test_a_signal_in_the_last_check_window_leaves_the_validation_to_the_resumed_run(
        sample_betons, tmp_path, monkeypatch, capsys):
    """SIGTERM while step 5 of the last epoch runs (10 steps, checked at the 10th): the epoch
    ends, its checkpoint is written marked val_pending, and the run stops, exit 143; resumed, it
    trains nothing, validates that epoch (logging it once) and writes the final weights, ending
    as an uninterrupted run. It used to validate (and, with it, 10-crop) before it stopped:
    ImageNet's 50,000 images, ten times over for 10-crop, outlast a grace time such as SLURM's
    30 s KillWait, whose SIGKILL then lost the epoch."""
    from torchrun_main import at_step
    from imagenet_ffcv import engine
    args = ('--training.epochs=2', '--logging.log_level=1')
    uninterrupted = train.main(small_config(sample_betons, tmp_path / 'whole', *args))
    for name in ('train_one_epoch', 'forward_backward'):  # at_step replaces them: put back after
        monkeypatch.setattr(engine, name, getattr(engine, name))
    at_step(lambda: os.kill(os.getpid(), signal.SIGTERM), epoch=1, step=5)
    summary = train.main(small_config(sample_betons, tmp_path / 'cut', *args))
    assert summary['stopped'] and summary['exit_code'] == 143
    run_dir = Path(summary['run_dir'])
    state = checkpoint.load(run_dir / 'checkpoint.pt')
    assert (state['epoch'], state['progress']['val_pending']) == (2, True)
    assert not (run_dir / 'final_weights.pt').exists()
    assert 'SIGTERM received' in capsys.readouterr().out
    assert ['top_1' in r for r in log_of(run_dir)] == [True, False]
    monkeypatch.undo()
    resumed = train.main(small_config(sample_betons, tmp_path / 'cut', *args,
                                      f'--resume={run_dir}'))
    assert resumed['top_1'] == uninterrupted['top_1'] and 'stopped' not in resumed
    assert resumed['weights_sha256'] == uninterrupted['weights_sha256']
    assert (run_dir / 'final_weights.pt').exists()
    assert [(r['epoch'], r['top_1']) for r in log_of(run_dir)] == [
        (r['epoch'], r['top_1']) for r in log_of(Path(uninterrupted['run_dir']))]
    assert 'epoch 1: top-1 ' in capsys.readouterr().out


def test_a_signal_during_validation_stops_it_and_the_resume_validates_that_epoch_first(
        sample_betons, tmp_path, monkeypatch, capsys):
    """SIGTERM while epoch 0 of 3 validates, with a top-1 target that epoch reaches: the
    validation stops before its next batch, the epoch is logged without it, its checkpoint is
    marked val_pending and the run stops, exit 143. Resumed, the run validates epoch 0 first,
    reaches the target there and ends as the uninterrupted run: same epoch, same weights, the
    log's record completed. Before, the validation ran to its end; cut without the mark, the
    resumed run reached the target an epoch later, with other weights."""
    from imagenet_ffcv import evaluate
    args = ('--training.epochs=3', '--training.target_top1=0.000001', '--logging.log_level=1')
    uninterrupted = train.main(small_config(sample_betons, tmp_path / 'whole', *args))
    assert (uninterrupted['target_reached_epoch'], uninterrupted['epochs']) == (0, 1)
    signal_as_it_starts(monkeypatch, evaluate, 'validate_with_ema')
    summary = train.main(small_config(sample_betons, tmp_path / 'cut', *args))
    assert summary['stopped'] and summary['exit_code'] == 143
    run_dir = Path(summary['run_dir'])
    state = checkpoint.load(run_dir / 'checkpoint.pt')
    assert (state['epoch'], state['iteration'], state['progress']['val_pending']) == (1, 0, True)
    [record] = log_of(run_dir)
    assert record['epoch'] == 0 and 'top_1' not in record and 'train_loss' in record
    out = capsys.readouterr().out
    assert 'SIGTERM received' in out and 'top-1 -' in out
    resumed = train.main(small_config(sample_betons, tmp_path / 'cut', *args,
                                      f'--resume={run_dir}'))
    assert (resumed['target_reached_epoch'], resumed['epochs']) == (0, 1)
    assert resumed['weights_sha256'] == uninterrupted['weights_sha256']
    [record] = log_of(run_dir)
    assert record['top_1'] == uninterrupted['top_1'] and 'train_loss' in record


def test_a_pending_validation_resumes_with_its_log_deleted_or_a_config_that_skips_it(
        sample_betons, tmp_path, monkeypatch):
    """The resume of a run whose epoch-0 validation a signal stopped: with log.jsonl deleted,
    the validation makes the epoch's record (it raised StopIteration); with
    logging.log_level=0 (a change a resume takes), epoch 0 is not validated and the run goes on
    (it raised KeyError: 'top_1')."""
    from imagenet_ffcv import evaluate
    args = ('--training.epochs=2', '--logging.log_level=1')
    for folder, again in (('deleted', args), ('skipped', ('--training.epochs=2',
                                                          '--logging.log_level=0'))):
        signal_as_it_starts(monkeypatch, evaluate, 'validate_with_ema')
        run_dir = Path(train.main(small_config(sample_betons, tmp_path / folder, *args))[
            'run_dir'])
        assert checkpoint.load(run_dir / 'checkpoint.pt')['progress']['val_pending']
        if folder == 'deleted':
            (run_dir / 'log.jsonl').unlink()
        resumed = train.main(small_config(sample_betons, tmp_path / folder, *again,
                                          f'--resume={run_dir}'))
        assert 'top_1' in resumed and (run_dir / 'final_weights.pt').exists()
        assert [(r['epoch'], 'top_1' in r) for r in log_of(run_dir)] == (
            [(0, True), (1, True)] if folder == 'deleted' else [(0, False), (1, True)])


def test_a_run_that_finishes_after_another_ranks_signal_ends_with_its_status(
        sample_betons, tmp_path, monkeypatch):
    """Ctrl-C reached another rank only, as a run finished: by its top-1 target, or by the
    resumed validation of its last epoch; this rank ends with 130 too (it ended with 0)."""
    from imagenet_ffcv import distributed, evaluate
    all_reduce_min = distributed.all_reduce_min

    def another_rank_signalled(values):  # fit's one-value check: -(the largest signal number)
        return [-signal.SIGINT] if values.numel() == 1 else all_reduce_min(values)
    signal_as_it_starts(monkeypatch, evaluate, 'validate_with_ema')
    pending = train.main(small_config(sample_betons, tmp_path / 'pending', '--training.epochs=1'))
    run_dir = Path(pending['run_dir'])
    monkeypatch.setattr(distributed, 'all_reduce_min', another_rank_signalled)
    for summary in (train.main(small_config(sample_betons, tmp_path / 'target',
                                            '--training.epochs=3',
                                            '--training.target_top1=0.000001')),
                    train.main(small_config(sample_betons, tmp_path / 'pending',
                                            '--training.epochs=1', f'--resume={run_dir}'))):
        assert summary['exit_code'] == 130 and 'top_1' in summary
        assert (Path(summary['run_dir']) / 'final_weights.pt').exists()


def test_amend_log_puts_a_validation_where_an_epoch_validated_at_once_has_it(tmp_path):
    from imagenet_ffcv.run_dir import RunDir
    run_dir = RunDir.create(tmp_path, params={}, run_name='a')
    try:
        run_dir.append_log({'epoch': 0, 'train_loss': 2.0, 'lr': 0.1})
        run_dir.amend_log(0, {'top_1': 0.1, 'top_5': 0.5})
        run_dir.amend_log(0, {'top_1': 0.2, 'top_1_10crop': 0.3})  # amended again: replaced
        run_dir.amend_log(1, {'top_1': 0.4})  # no record (a log cut or deleted): one made
        assert [list(r.items()) for r in run_dir.read_log()] == [
            [('epoch', 0), ('train_loss', 2.0), ('top_1', 0.2), ('top_1_10crop', 0.3),
             ('top_5', 0.5), ('lr', 0.1)], [('epoch', 1), ('top_1', 0.4)]]
    finally:
        run_dir.unlock()


def test_a_signal_during_the_last_10_crop_leaves_it_to_the_resumed_run(
        sample_betons, tmp_path, monkeypatch):
    """SIGTERM as the 10-crop after the last epoch starts (its centre validation done): the
    10-crop stops, the run stops unfinished (exit 143), not finished with the 10-crop left out
    or done again regardless; resumed, it validates and 10-crops that epoch and writes the final
    weights, the last record of the log holding both."""
    from imagenet_ffcv import evaluate
    args = ('--training.epochs=1', '--logging.log_level=1', '--validation.ten_crop=1',
            '--checkpoint.keep_best=1')
    signal_as_it_starts(monkeypatch, evaluate, 'ten_crop_eval')
    summary = train.main(small_config(sample_betons, tmp_path, *args))
    assert summary['stopped'] and summary['exit_code'] == 143
    run_dir = Path(summary['run_dir'])
    assert checkpoint.load(run_dir / 'checkpoint.pt')['progress']['val_pending']
    assert not (run_dir / 'final_weights.pt').exists()
    resumed = train.main(small_config(sample_betons, tmp_path, *args, f'--resume={run_dir}'))
    assert 'top_1_10crop' in resumed and (run_dir / 'final_weights.pt').exists()
    [record] = log_of(run_dir)
    assert record['top_1'] == resumed['top_1'] and record['top_1_10crop'] == resumed[
        'top_1_10crop']


def test_a_signal_as_the_finished_run_writes_its_final_weights_lets_it_finish(
        sample_betons, tmp_path, monkeypatch):
    """SIGTERM after the last epoch's checkpoint, as the results are gathered: the run writes
    results.json and its final weights, then ends with 143, as docs/training.md says. The
    signal's handler was gone by then: SIGTERM killed the process, leaving no final weights and
    its lock."""
    from imagenet_ffcv import metrics

    def killed(signum, frame):  # the default action, but a test failure rather than pytest's end
        raise AssertionError('SIGTERM reached its default handler')
    signal_as_it_starts(monkeypatch, metrics, 'model_complexity')
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        summary = train.main(small_config(sample_betons, tmp_path, '--training.epochs=1'))
    finally:
        signal.signal(signal.SIGTERM, previous)
    run_dir = Path(summary['run_dir'])
    assert summary['exit_code'] == 143 and 'top_1' in summary and 'gmacs' in summary
    assert sorted(p.name for p in run_dir.glob('[fl]*')) == [
        'final_weights.pt', 'final_weights.safetensors', 'log.jsonl']  # no lock left
    assert json.loads((run_dir / 'results.json').read_text())['top_1'] == summary['top_1']


def test_a_signal_during_the_validation_of_a_run_resumed_after_its_last_epoch_stops_it(
        sample_betons, tmp_path, monkeypatch, capsys):
    """A run stopped after its last checkpoint, before its final weights, validates again when
    resumed: a signal then stops that validation at its next batch (it ran to its end, 10-crop
    too, outlasting a grace time such as SLURM's), the run ending as stopped, exit 143, without
    final weights; the next resume finishes it."""
    from imagenet_ffcv import evaluate

    def full_disk(*args):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(train, 'write_results', full_disk)
    with pytest.raises(OSError):
        train.main(small_config(sample_betons, tmp_path, '--training.epochs=1'))
    monkeypatch.undo()
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    signal_as_it_starts(monkeypatch, evaluate, 'validate_with_ema')
    resume = ('--training.epochs=1', f'--resume={run_dir}')
    before = (run_dir / 'checkpoint.pt').stat().st_mtime_ns
    capsys.readouterr()
    summary = train.main(small_config(sample_betons, tmp_path, *resume))
    assert summary['stopped'] and summary['exit_code'] == 143
    assert not (run_dir / 'final_weights.pt').exists()
    assert (run_dir / 'checkpoint.pt').stat().st_mtime_ns == before  # and it says so
    out = capsys.readouterr().out  # it said 'checkpoint ... written'
    assert f"=> stopped by SIGTERM: it resumes from {run_dir / 'checkpoint.pt'}; continue" in out
    assert 'written' not in out
    finished = train.main(small_config(sample_betons, tmp_path, *resume))
    assert 'top_1' in finished and (run_dir / 'final_weights.pt').exists()


def test_a_run_folder_gone_read_only_is_told_by_the_write_that_failed_not_by_its_lock(
        sample_betons, tmp_path, monkeypatch, capsys):
    """The run folder turns immutable as epoch 0 is logged (a filesystem remounted read-only):
    the error names log.jsonl, the write that failed; removing the lock then failed too, and its
    error replaced the first one (the user was told of the lock). The lock is left, with a
    warning, for the resumed run to take over."""
    probe = tmp_path / 'probe'
    probe.mkdir()
    if subprocess.run(['chattr', '+i', str(probe)], capture_output=True).returncode != 0:
        pytest.skip('chattr +i is not available here (a filesystem without it, or not root: it '
                    'needs CAP_LINUX_IMMUTABLE)')
    subprocess.run(['chattr', '-i', str(probe)], check=True)
    log_epoch, frozen = train.log_epoch, []

    def read_only(run, *args):
        frozen.append(run.run_dir.path)
        subprocess.run(['chattr', '+i', str(run.run_dir.path)], check=True)
        return log_epoch(run, *args)
    monkeypatch.setattr(train, 'log_epoch', read_only)
    try:
        with pytest.raises(OSError) as info:
            train.main(small_config(sample_betons, tmp_path, '--training.epochs=1'))
    finally:
        for path in frozen:
            subprocess.run(['chattr', '-i', str(path)], check=True)
    [run_dir] = frozen
    assert info.value.filename == str(run_dir / 'log.jsonl')
    assert (run_dir / 'lock').exists()
    assert f"=> warning: {run_dir / 'lock'}: cannot remove this job's lock (Operation not " \
        "permitted); the job that resumes the run takes it over" in capsys.readouterr().err


def test_a_signal_on_another_rank_in_the_last_epoch_ends_every_rank_with_its_status(
        sample_betons, tmp_path, monkeypatch):
    """Ctrl-C reached another rank only, after the last epoch's validation (during its
    checkpoint): the run finishes (final weights), and this rank too ends with that signal's
    status, 130, where it ended with 0 while the signalled rank ended with 130 (the job's status
    depended on which rank a launcher reported)."""
    from imagenet_ffcv import distributed
    all_reduce_min = distributed.all_reduce_min

    def another_rank_signalled(values):  # fit's one-value check: -(the largest signal number)
        return [-signal.SIGINT] if values.numel() == 1 else all_reduce_min(values)
    monkeypatch.setattr(distributed, 'all_reduce_min', another_rank_signalled)
    summary = train.main(small_config(sample_betons, tmp_path, '--training.epochs=1'))
    assert summary['exit_code'] == 130 and 'top_1' in summary
    assert (Path(summary['run_dir']) / 'final_weights.pt').exists()


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_143(sample_betons, tmp_path):
    """SIGTERM while step 4 of epoch 1 runs: the ranks agree to stop at their next check (with
    a checkpoint every 3 iterations, after step 5: 6 iterations done), the checkpoint of that
    point is written and the process exits 143, without finishing the epoch."""
    proc = run(signalled_cli('SIGTERM:1:4', sample_betons, tmp_path,
                             '--checkpoint.every_iters=3'))
    out = proc.stdout
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + proc.stderr[-2000:]
    assert 'stopped by SIGTERM' in out and '--resume auto' in out
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    state = checkpoint.load(run_dir / 'checkpoint.pt')
    assert (state['epoch'], state['iteration']) == (1, 6)
    assert [r['epoch'] for r in log_of(run_dir)] == [0]
    assert not (run_dir / 'final_weights.pt').exists()
    assert not (run_dir / 'lock').exists()  # removed on the way out, as at a run's end


def test_resuming_with_a_different_schedule_is_refused_unless_forced(sample_betons, tmp_path):
    """The changed keys are listed before the loaders are built: a batch larger than the training
    set (the config's default 512, the command line not repeating the run's 32) was refused by
    the loaders' check first, which told the user to lower training.batch_size."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    cfg = small_config(sample_betons, tmp_path, *RUN)
    resolved = {**{s: dict(vars(v)) for s, v in vars(cfg).items()},
                'derived': {'world_size': 1, 'global_batch_size': 32, 'lr_used': 0.05,
                            'num_classes': 10, 'device': 'cpu'}}
    checkpoint.save({'format': 1, 'config': resolved}, run_dir / 'checkpoint.pt')
    cfg = small_config(sample_betons, tmp_path, *RUN, '--training.epochs=20', '--lr.lr=0.1',
                       '--training.batch_size=512', f'--resume={run_dir / "checkpoint.pt"}')
    with pytest.raises(config.ConfigError) as info:
        train.main(cfg)
    message = str(info.value)
    assert 'training.epochs: 4 -> 20' in message and 'lr.lr: 0.05 -> 0.1' in message
    assert 'training.batch_size: 32 -> 512' in message and 'checkpoint.force=1' in message
    # the same config on another number of processes (derived, once the run is built): refused
    resolved['derived'].update(world_size=2, global_batch_size=64)
    checkpoint.save({'format': 1, 'config': resolved}, run_dir / 'checkpoint.pt')
    with pytest.raises(config.ConfigError, match=r'derived.global_batch_size: 64 -> 32'
                                                 r'\n  derived.world_size: 2 -> 1') as info:
        train.main(small_config(sample_betons, tmp_path, *RUN, f'--resume={run_dir}'))
    # a user kept the global batch with grad_accum_steps, was refused again, and went round: the
    # message says another process count always needs checkpoint.force=1
    assert str(info.value).endswith(
        'set checkpoint.force=1 to continue anyway (another number of processes always needs '
        'it; keep the global batch with training.grad_accum_steps or training.batch_size)')
    assert 'another number of processes' not in message
    # another training set (data.train_dataset may move, its images may not change: the
    # checkpoint's iteration meant another place in the epoch); an older checkpoint without
    # the count resumes (above)
    from imagenet_ffcv import betons
    resolved['derived'].update(world_size=1, global_batch_size=32, train_images=99)
    checkpoint.save({'format': 1, 'config': resolved}, run_dir / 'checkpoint.pt')
    images = betons.num_samples(sample_betons['train'])
    with pytest.raises(config.ConfigError, match=rf'derived.train_images: 99 -> {images}\n'):
        train.main(small_config(sample_betons, tmp_path, *RUN, f'--resume={run_dir}'))
    # a change that no force carries over is not offered force (it was, then failed forced)
    with pytest.raises(config.ConfigError) as info:
        train.main(small_config(sample_betons, tmp_path, *RUN, '--training.optimizer=adamw',
                                f'--resume={run_dir}'))
    assert str(info.value).endswith(
        "\nresume with the config of the run (training.optimizer cannot change on resume, even "
        f"forced: start a new run; model.weights={run_dir / 'checkpoint.pt'} starts it from these "
        "weights where the arch is the same, with model.reset_head=1 for other classes)")


def test_a_resume_forced_to_another_batch_goes_on_after_as_many_images(
        sample_betons, tmp_path, monkeypatch, capsys):
    """checkpoint.force=1 past a change of batch size (or of processes: the images of an iteration
    change with either): the epoch goes on after as many images. It went on at the checkpoint's
    iteration, here after 4 x 16 images at iteration 4 of 32, skipping 64 images."""
    from imagenet_ffcv import engine
    optimizer_step, steps = engine.optimizer_step, []

    def signalled_at_step_4(**kwargs):
        optimizer_step(**kwargs)
        steps.append(kwargs['optimizer'])
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine, 'optimizer_step', signalled_at_step_4)
    one_epoch = ('--training.epochs=1', '--checkpoint.every_iters=2')
    summary = train.main(small_config(sample_betons, tmp_path, *one_epoch,
                                      '--training.batch_size=16'))
    run_dir = Path(summary['run_dir'])
    assert summary['exit_code'] == 143
    assert checkpoint.load(run_dir / 'checkpoint.pt')['iteration'] == len(steps) == 4
    capsys.readouterr()
    summary = train.main(small_config(sample_betons, tmp_path, *one_epoch, '--checkpoint.force=1',
                                      '--training.batch_size=32', f'--resume={run_dir}'))
    assert 'stopped' not in summary and (run_dir / 'final_weights.pt').exists()
    assert ("=> the checkpoint's iteration 4 (16 images x 1 process(es)) is iteration 2 here "
            "(32 x 1)") in capsys.readouterr().out
    assert len(steps) - 4 == 340 // 32 - 2  # the epoch's iterations after the first 64 images


def test_a_position_moved_to_other_processes_keeps_the_epochs_mean_loss_and_images():
    """Rank 0's figures of the epoch so far become one process's share of the images before the
    new iteration: the log line's mean loss stays, and the run's images (rank 0's times the
    processes) are those before it, the images trained again after it not counted twice."""
    so_far = {'loss_sum': 30.0, 'images': 96, 'seconds': 2.0}
    two = checkpoint.Progress(iteration=6, epoch_so_far=so_far)
    two.rebatched(was=(16, 2), now=(32, 1))
    assert two.iteration == 6 and two.epoch_so_far == {'loss_sum': 60.0, 'images': 192,
                                                       'seconds': 2.0}
    four = checkpoint.Progress(iteration=6, epoch_so_far=so_far)
    four.rebatched(was=(16, 2), now=(16, 3))
    assert four.iteration == 4 and four.epoch_so_far == {'loss_sum': 20.0, 'images': 64,
                                                         'seconds': 2.0}
    rounded = checkpoint.Progress(iteration=7, epoch_so_far={'loss_sum': 28.0, 'images': 112,
                                                             'seconds': 2.0})
    rounded.rebatched(was=(16, 1), now=(16, 3))  # 112 images: iteration 2 of 48, 96 before it
    assert rounded.iteration == 2 and rounded.epoch_so_far == {'loss_sum': 8.0, 'images': 32,
                                                               'seconds': 2.0}
    same = checkpoint.Progress(iteration=6, epoch_so_far=so_far)
    same.rebatched(was=(16, 2), now=(16, 2))
    assert same.iteration == 6 and same.epoch_so_far is so_far


def test_non_finite_loss_stops_naming_epoch_and_iteration_and_keeps_the_checkpoint(
        sample_betons, tmp_path, capsys):
    """Epoch 0 trains normally; the step schedule then multiplies the LR by 1e12. The command
    line (train.cli, which train_imagenet.py runs) exits 1 with one line on stderr."""
    assert train.cli(train_args(sample_betons, tmp_path, '--training.epochs=2',
                                '--lr.lr_schedule_type=step', '--lr.step_length=1',
                                '--lr.step_ratio=1e12', '--training.label_smoothing=0')) == 1
    err = capsys.readouterr().err
    assert 'non-finite training loss at epoch 1, iteration' in err and err.count('\n') == 1, err
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    state = checkpoint.load(run_dir / 'checkpoint.pt')
    assert (state['epoch'], state['iteration']) == (1, 0)  # the end of epoch 0: last good state
    assert all(torch.isfinite(t).all() for t in state['model'].values() if t.is_floating_point())
    assert not (run_dir / 'final_weights.pt').exists()


def test_two_jobs_sharing_a_folder_continue_only_their_own_run(sample_betons, tmp_path, capsys):
    """Jobs 'a' and 'b' in one logging.folder, both with --resume auto: b does not adopt a's
    unfinished run; a, while its lock names a live process (another job on the same run), is
    refused naming it, the run untouched; once that process is dead, a continues its own run, and
    once that has finished, a's next job ends at once."""
    def job(name):
        return train.main(small_config(sample_betons, tmp_path, '--training.epochs=1',
                                       '--logging.log_level=0', f'--logging.run_name={name}',
                                       '--resume=auto'))
    run_a = Path(job('a')['run_dir'])
    for name in ('final_weights.pt', 'final_weights.safetensors'):
        (run_a / name).unlink()  # a is unfinished: its job was stopped before the end
    saved = (run_a / 'checkpoint.pt').read_bytes()
    run_b = Path(job('b')['run_dir'])
    assert run_b != run_a and run_b.name.startswith('b-') and run_a.name.startswith('a-')
    assert (run_a / 'checkpoint.pt').read_bytes() == saved and not (run_a / 'lock').exists()

    other = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],
                             stdin=subprocess.PIPE)
    try:
        (run_a / 'lock').write_text(json.dumps({'pid': other.pid, 'host': socket.gethostname()}))
        with pytest.raises(RunLockedError, match=f'PID {other.pid} on {socket.gethostname()}'):
            job('a')
        assert (run_a / 'checkpoint.pt').read_bytes() == saved and len(log_of(run_a)) == 1
    finally:
        other.communicate(b'')  # that job ends without unlocking (killed)
    capsys.readouterr()
    assert Path(job('a')['run_dir']) == run_a
    out = capsys.readouterr().out
    assert f'taking over the lock of PID {other.pid}' in out and f'=> resuming {run_a}' in out
    assert (run_a / 'final_weights.pt').exists() and not (run_a / 'lock').exists()
    assert sorted(p.name[0] for p in tmp_path.iterdir()) == ['a', 'b']
    # a has finished: the same job again (a job chain's next one) trains nothing, starts no run
    weights = (run_a / 'final_weights.pt').read_bytes()
    assert job('a') == {'run_dir': str(run_a), 'finished_before': True}
    assert 'nothing to resume' in capsys.readouterr().out
    assert sorted(p.name[0] for p in tmp_path.iterdir()) == ['a', 'b'] and len(log_of(run_a)) == 1
    assert (run_a / 'final_weights.pt').read_bytes() == weights


def test_a_checkpoint_is_not_written_once_another_job_holds_the_runs_lock(tmp_path):
    """save_checkpoint asks the run folder whether its lock is still this job's first: a job
    whose lock another job took over must not write the checkpoint the other job resumes from."""
    from types import SimpleNamespace
    from imagenet_ffcv.run_dir import RunDir
    model = torch.nn.Linear(2, 2)
    run = SimpleNamespace(
        dist=SimpleNamespace(is_primary=True), model=model, scaler=None, classes=None,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), resolved={}, wall_start=0.0,
        progress=checkpoint.Progress(), options=SimpleNamespace(ema=None),
        cfg=SimpleNamespace(checkpoint=SimpleNamespace(keep_last=0)),
        run_dir=RunDir.create(tmp_path, params={}, run_name='a'))
    train.save_checkpoint(run, 1, 0)
    saved = checkpoint.load(run.run_dir.checkpoint)
    assert (saved['epoch'], saved['iteration'], saved['progress']['images']) == (1, 0, 0)
    run.run_dir.lock_file.write_text(json.dumps({'pid': 1, 'host': 'node-17', 'heartbeat_s': 30}))
    with pytest.raises(RunLockedError, match='is now held by PID 1 on node-17'):
        train.save_checkpoint(run, 2, 0)
    assert checkpoint.load(run.run_dir.checkpoint)['epoch'] == 1
