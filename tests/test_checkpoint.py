"""Checkpoint files, resume look-up, config comparison, signals and the training loop's checks
(non-finite loss, stop requests, checkpoints within an epoch), on CPU without ffcv."""
import argparse
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from imagenet_ffcv import checkpoint, config, engine, signals, weights


def test_save_replaces_atomically_and_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / 'checkpoint.pt'
    checkpoint.save({'format': 1, 'epoch': 1}, path)
    checkpoint.save({'format': 1, 'epoch': 2}, path)
    assert torch.load(path, weights_only=False)['epoch'] == 2
    with pytest.raises(Exception):
        checkpoint.save({'format': 1, 'epoch': 3, 'bad': lambda: 0}, path)  # cannot be pickled
    assert torch.load(path, weights_only=False)['epoch'] == 2  # the previous one, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pt']  # no partial file


def test_load_names_the_file_for_foreign_or_truncated_files(tmp_path):
    """A file cut short (a copy or download) is called incomplete, as a checkpoint and as weights
    (read from a file object, torch said 'OSError: [Errno 22] Invalid argument' of it)."""
    final = tmp_path / 'final_weights.pt'
    torch.save({'fc.weight': torch.zeros(2, 2)}, final)
    with pytest.raises(checkpoint.CheckpointError,
                       match="final_weights.pt.*cannot be resumed.*as the model's weights"):
        checkpoint.load(final)
    good = tmp_path / 'checkpoint.pt'
    checkpoint.save({'format': 1, 'model': {'w': torch.ones(1000)}}, good)
    truncated = tmp_path / 'truncated.pt'
    incomplete = (r'truncated.pt: incomplete: the zip archive torch.save writes, without its end '
                  r'\({:,} bytes; a copy or download cut short\?\): copy or download it again')
    for size in (500, len(good.read_bytes()) - 30):
        truncated.write_bytes(good.read_bytes()[:size])
        for load in (checkpoint.load, weights.load_weights):
            with pytest.raises(checkpoint.CheckpointError, match=incomplete.format(size)) as info:
                load(truncated)
    assert 'earlier checkpoints' not in str(info.value)
    # with checkpoint.keep_last, the error names the run's earlier checkpoints, newest first
    for epochs in (1, 2):
        (tmp_path / f'checkpoint_epoch_{epochs}.pt').write_bytes(good.read_bytes())
    os.link(truncated, tmp_path / 'checkpoint_epoch_3.pt')  # keep_history's link to the newest
    with pytest.raises(checkpoint.CheckpointError, match=r'truncated.pt: incomplete: .*; the run '
                       r'keeps earlier checkpoints: checkpoint_epoch_2.pt, checkpoint_epoch_1.pt '
                       r'\(--resume PATH continues from one\)'):
        checkpoint.load(truncated)


def test_a_file_whose_bytes_changed_or_of_the_legacy_format_cut_short_is_called_damaged(
        tmp_path):
    """torch.load checks no CRC-32: a .pt with 1,000 bytes zeroed in a tensor's record loaded,
    with other weights, as checkpoint and as weights; a file saved without checksums still loads.
    A legacy-format file cut short said 'IndexError: index out of range'. Weights of other kinds
    and a web page named .safetensors are said as what they are."""
    good = tmp_path / 'checkpoint.pt'
    checkpoint.save({'format': 1, 'model': {'w': torch.arange(10_000.)}}, good)
    data = bytearray(good.read_bytes())
    middle = len(data) // 2  # in the tensor's record, after data.pkl
    data[middle:middle + 1000] = bytes(1000)
    damaged = tmp_path / 'damaged.pt'
    damaged.write_bytes(data)
    for load in (checkpoint.load, weights.load_weights):
        with pytest.raises(checkpoint.CheckpointError, match=r'damaged.pt: damaged: the bytes of '
                           r'its record archive/data/0 do not match the checksum \(CRC-32\)'):
            load(damaged)
    unchecked = tmp_path / 'unchecked.pt'
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({'fc.weight': torch.ones(2, 2)}, unchecked)
    finally:
        torch.serialization.set_crc32_options(True)
    assert weights.load_weights(unchecked).state['fc.weight'].sum() == 4
    # the archive's index damaged: a record marked encrypted (RuntimeError, a traceback once the
    # records' checksums were read)
    index = bytearray(good.read_bytes())
    entry = index.rfind(b'PK\x01\x02')  # the last central directory entry: its flags at +8
    index[entry + 8] |= 1
    damaged.write_bytes(index)
    with pytest.raises(checkpoint.CheckpointError, match=r'damaged.pt: cannot read the checkpoint '
                                                         r'\(RuntimeError: .*encrypted'):
        checkpoint.load(damaged)
    plain = tmp_path / 'plain.pt'  # a plain pickle.dump file: one pickle, not torch's four
    plain.write_bytes(pickle.dumps({'args': argparse.ArgumentError(None, 'x')}, protocol=2))
    with pytest.raises(checkpoint.CheckpointError, match=r'plain.pt: refused: the weights file '
                                                         r'holds Python objects \(such as '
                                                         r'argparse.ArgumentError\)'):
        weights.load_weights(plain)
    legacy = tmp_path / 'legacy.pt'
    for builtin in (frozenset([1]), range(3)):  # intact, refused as such, not called damaged
        torch.save({'w': torch.ones(2), 'x': builtin}, legacy, _use_new_zipfile_serialization=False)
        with pytest.raises(checkpoint.CheckpointError, match=r'legacy.pt: refused: the weights '
                                                             r'file holds Python objects'):
            weights.load_weights(legacy)
    torch.save({'fc.weight': torch.ones(100, 100)}, legacy, _use_new_zipfile_serialization=False)
    full = legacy.read_bytes()
    for size in (300, len(full) - 100):
        legacy.write_bytes(full[:size])
        with pytest.raises(checkpoint.CheckpointError, match=r'legacy.pt: damaged or incomplete: '
                           r"a file of torch.save's legacy format \(before torch 1.6\) that "
                           r'fails to read \(.*; a copy or download cut short\?\): copy or '
                           r'download it again$'):
            weights.load_weights(legacy)
    listed = tmp_path / 'list.pt'
    torch.save([{'fc.weight': torch.ones(2)}], listed)
    with pytest.raises(checkpoint.CheckpointError, match=r'list.pt: holds no state dict of tensors '
                                                         r'\(a list of 1: dict\)'):
        weights.load_weights(listed)
    page = tmp_path / 'final_weights.safetensors'
    page.write_text('<!DOCTYPE html><html><body>Not Found</body></html>' * 3)
    with pytest.raises(checkpoint.CheckpointError, match=r"safetensors: not a safetensors file "
                       r"\(it is text: '<!DOCTYPE html><html><body>Not Found</bo', not a "
                       r'safetensors header; a failed download\? re-download it\)$'):
        weights.load_weights(page)


def test_resume_auto_picks_the_latest_run_and_says_when_it_has_finished(tmp_path, capsys):
    """--resume auto: the latest run of that name, a note when it has finished, and one when
    there is none (a mistyped folder or run name in a requeued job started over without a
    word), naming the runs of other names there. A run folder given to --resume is its
    checkpoint."""
    assert checkpoint.resolve_resume('', tmp_path) is None
    assert checkpoint.resolve_resume('auto', tmp_path / 'typo') is None  # nothing yet: a new run
    assert capsys.readouterr().out == (f"=> --resume auto: no unnamed run with a checkpoint in "
                                       f"{tmp_path / 'typo'}: this starts a new one\n")
    for name, age in (('a', 3), ('b', 2), ('c', 1)):
        (tmp_path / name).mkdir()
        checkpoint.save({'format': 1}, tmp_path / name / 'checkpoint.pt')
        os.utime(tmp_path / name / 'checkpoint.pt', (1e9 - age, 1e9 - age))  # c the latest
    (tmp_path / 'a' / 'final_weights.pt').write_bytes(b'')  # a finished
    assert checkpoint.resolve_resume('auto', tmp_path) == tmp_path / 'c' / 'checkpoint.pt'
    assert 'nothing to resume' not in capsys.readouterr().out
    (tmp_path / 'c' / 'final_weights.pt').write_bytes(b'')  # the latest run finished: not b
    assert checkpoint.resolve_resume('auto', tmp_path) == tmp_path / 'c' / 'checkpoint.pt'
    assert f'=> {tmp_path / "c"} has finished (final_weights.pt): nothing to resume' in \
        capsys.readouterr().out
    with pytest.raises(checkpoint.CheckpointError, match='no-such.pt: no such file'):
        checkpoint.resolve_resume(str(tmp_path / 'no-such.pt'), tmp_path)
    assert checkpoint.resolve_resume(str(tmp_path / 'b'), tmp_path) == tmp_path / 'b' / \
        'checkpoint.pt'
    (tmp_path / 'empty').mkdir()
    with pytest.raises(checkpoint.CheckpointError, match='empty: a folder without a checkpoint'):
        checkpoint.resolve_resume(str(tmp_path / 'empty'), tmp_path)
    (tmp_path / 'b' / 'params.json').write_text(json.dumps({'logging': {'run_name': 'rn50'}}))
    assert checkpoint.resolve_resume('auto', tmp_path, 'rn5') is None
    assert capsys.readouterr().out == (f"=> --resume auto: no run named 'rn5' with a checkpoint "
                                       f"in {tmp_path}: this starts a new one (unfinished runs "
                                       f"there: 'rn50'; give its run name to resume one)\n")
    (tmp_path / 'a' / 'final_weights.pt').unlink()  # a (unnamed) unfinished again
    checkpoint.resolve_resume('auto', tmp_path, 'rn5')
    assert "(unfinished runs there: unnamed, 'rn50';" in capsys.readouterr().out


def test_schedule_changes_are_listed_and_harmless_changes_are_not():
    saved = {'training': {'epochs': 16, 'batch_size': 512, 'eval_only': 0},
             'lr': {'lr': 0.5}, 'data': {'num_workers': 8, 'train_dataset': 'a'},
             'derived': {'world_size': 8, 'device': 'cuda:0'}}
    same_schedule = json.loads(json.dumps(saved))
    same_schedule['data'] = {'num_workers': 2, 'train_dataset': '/moved/a'}
    same_schedule['derived']['device'] = 'cuda:3'
    assert config.schedule_changes(saved, same_schedule) == []
    changed = json.loads(json.dumps(saved))
    changed['training']['epochs'] = 88
    changed['derived']['world_size'] = 4  # a different global batch
    assert config.schedule_changes(saved, changed) == ['derived.world_size: 8 -> 4',
                                                            'training.epochs: 16 -> 88']
    # the batches' crops, flips and decoder are the run's, unlike how its data is read
    changed = json.loads(json.dumps(saved))
    changed['data'].update(min_crop_scale=0.35, flip_prob=0.0, decoder='ffcv')
    assert config.schedule_changes(saved, changed) == [
        "data.decoder: 'fused' -> 'ffcv'", 'data.flip_prob: 0.5 -> 0.0',
        'data.min_crop_scale: 0.08 -> 0.35']


def test_a_key_older_checkpoints_lack_counts_as_its_default():
    """A checkpoint written before a key existed (its config lacks it) resumes with the key at
    its default, the behaviour its run had, and is refused with the key set otherwise."""
    saved = {'training': {'epochs': 16, 'batch_size': 512}}
    now = json.loads(json.dumps(saved))
    now['training'].update(auto_augment='', grad_accum_steps=1, sync_bn=0)
    assert config.schedule_changes(saved, now) == []
    now['training'].update(auto_augment='ra', grad_accum_steps=2)
    assert config.schedule_changes(saved, now) == ["training.auto_augment: '' -> 'ra'",
                                                   'training.grad_accum_steps: 1 -> 2']


def test_each_ranks_random_states_are_kept_and_given_back_to_that_rank():
    """A checkpoint of a 2-rank run holds both ranks' random states (training_state's ``rng``,
    gathered from every rank); restoring gives rank r its own, and a rank the run did not have
    keeps the one it has."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for seed in (10, 11):  # rank 0's and rank 1's generators
        torch.manual_seed(seed)
        states.append(checkpoint.rng_state())
    saved = checkpoint.training_state(model_state=model.state_dict(), optimizer=optimizer,
                                      epoch=1, iteration=0, config={}, classes=None,
                                      best_top1=None, progress={}, rng=states)
    draws = {}
    for rank in (0, 1, 2):
        torch.manual_seed(99)
        checkpoint.restore_training_state(saved, model=model, optimizer=optimizer, rank=rank)
        draws[rank] = torch.rand(3)
    for rank, seed in ((0, 10), (1, 11), (2, 99)):
        torch.manual_seed(seed)
        assert torch.equal(draws[rank], torch.rand(3)), rank
    ema = torch.optim.swa_utils.AveragedModel(model)  # the run has an EMA, the checkpoint none:
    assert checkpoint.restore_training_state(saved, model=model, optimizer=optimizer,
                                             ema=ema) is False  # for train to say so


def test_a_forced_resume_trains_with_the_configs_optimizer_settings_and_the_saved_state():
    """checkpoint.force=1 with another weight decay, momentum or betas: the optimizer takes the
    checkpoint's state (momentum buffers, Adam's moments and step) and keeps the current config's
    settings; optimizer.load_state_dict alone gave back the saved settings, so a forced change
    was logged in params.json but not applied."""
    model = nn.Linear(2, 2)
    for make, old, new in ((torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-4),
                            dict(momentum=0.8, weight_decay=5e-4)),
                           (torch.optim.AdamW, dict(betas=(0.9, 0.999), weight_decay=0.05),
                            dict(betas=(0.8, 0.99), weight_decay=0.1))):
        optimizer = make(model.parameters(), lr=0.1, **old)
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        saved = checkpoint.training_state(model_state=model.state_dict(), optimizer=optimizer,
                                          epoch=1, iteration=0, config={}, classes=None,
                                          best_top1=None, progress={})
        resumed = make(model.parameters(), lr=0.1, **new)
        checkpoint.restore_training_state(saved, model=model, optimizer=resumed)
        assert {k: resumed.param_groups[0][k] for k in new} == new
        state, saved_state = resumed.state[model.weight], optimizer.state[model.weight]
        assert state.keys() == saved_state.keys() and all(
            torch.equal(torch.as_tensor(state[k]), torch.as_tensor(saved_state[k]))
            for k in state)
    two_groups = torch.optim.AdamW([{'params': [model.weight]}, {'params': [model.bias]}], lr=0.1)
    with pytest.raises(checkpoint.CheckpointError,
                       match="resume with the run's weight decay groups"):
        checkpoint.restore_training_state(saved, model=model, optimizer=two_groups)  # forced
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(checkpoint.CheckpointError, match="optimizer is AdamW and this run's SGD"):
        checkpoint.restore_training_state(saved, model=model, optimizer=sgd)  # forced


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    a = (torch.rand(3), __import__('numpy').random.rand(), __import__('random').random())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), __import__('numpy').random.rand(), __import__('random').random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_sigterm_sets_the_stop_flag_and_handlers_are_restored():
    """SIGTERM is a stop request, and a second one too (SLURM signals the step and the batch
    script; a user repeats kill): only Ctrl-C abandons the step. The converter's SIGTERM raises
    Terminated once (a second is ignored: it would cut the clean-up short); both give the
    previous handlers back, also when the block ends by an exception."""
    before = signal.getsignal(signal.SIGTERM)
    with signals.StopRequest() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop and stop.exit_code == 143 and stop.name == 'SIGTERM'
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(signals.Terminated), signals.sigterm_raises():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: the clean-up runs on
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_sets_the_stop_flag_and_a_second_one_abandons_at_once(capsys):
    """The first Ctrl-C (SIGINT) is a stop request as SIGTERM is (the run ends after its step,
    with a checkpoint, exit 130); a second raises KeyboardInterrupt at once. Only Ctrl-C's
    message offers a second Ctrl-C (SIGTERM's did too, to a job with no terminal)."""
    before = signal.getsignal(signal.SIGINT)
    with signals.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop and stop.exit_code == 130 and stop.name == 'SIGINT'
        assert '(Ctrl-C again to abandon)' in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with signals.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.exit_code == 143
    assert capsys.readouterr().out == ('\n=> SIGTERM received: finishing this step, then stopping '
                                       'with a checkpoint to resume from (after the last epoch: '
                                       'with the final weights)\n')


def test_ctrl_c_outside_the_runs_handling_ends_the_trainer_in_one_line(monkeypatch, capsys):
    """Ctrl-C while the trainer starts (numba compiling its loaders) or a second one: the
    KeyboardInterrupt printed a traceback of some 30 lines. It is one line on stderr, and the
    process ends by SIGINT (here recorded, not done), else with status 130. A run stopped by the
    first Ctrl-C (its checkpoint written, status 130) ends by SIGINT too: it exited 130, and a
    shell loop of runs went on to the next one; SIGTERM's 143 stays a status."""
    from imagenet_ffcv import commands, train
    ended = []
    monkeypatch.setattr(commands, 'end_by_sigint', lambda: ended.append(True))

    def interrupted(cfg, command_line):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'main', interrupted)
    assert train.cli(['--data.train_dataset=a', '--data.val_dataset=b',
                      '--logging.folder=c']) == 130
    err = capsys.readouterr().err
    assert err.endswith(': stopped by Ctrl-C (a run keeps its last checkpoint: --resume auto)\n'
                        ) and err.count('\n') == 1, err
    assert ended == [True]
    for status, ends in ((130, [True]), (143, []), (0, [])):
        ended.clear()
        monkeypatch.setattr(train, 'main', lambda cfg, command_line: {'exit_code': status})
        assert train.cli(['--data.train_dataset=a', '--data.val_dataset=b',
                          '--logging.folder=c']) == status and ended == ends
    capsys.readouterr()

    def full_disk(cfg, command_line):  # a full disk or a read-only run folder: no traceback
        raise OSError(28, 'No space left on device', 'runs/x/progress.png')
    monkeypatch.setattr(train, 'main', full_disk)
    assert train.cli(['--data.train_dataset=a', '--data.val_dataset=b', '--logging.folder=c']) == 1
    err = capsys.readouterr().err
    assert err.endswith(": [Errno 28] No space left on device: 'runs/x/progress.png'\n") and \
        err.count('\n') == 1, err

    def inside_the_code(cfg, command_line):  # no file, not the machine's: its traceback stays
        raise OSError(22, 'Invalid argument')
    monkeypatch.setattr(train, 'main', inside_the_code)
    with pytest.raises(OSError, match='Invalid argument'):
        train.cli(['--data.train_dataset=a', '--data.val_dataset=b', '--logging.folder=c'])


def test_each_command_tells_the_tools_errors_in_one_line_and_a_defects_by_its_traceback(
        tmp_path, monkeypatch, capsys):
    """A mistyped --config gave the trainer's traceback (the tool's FileNotFoundError named no
    file for OSError's check), while predict and write printed any ValueError or OSError in one
    line, a defect of the code's too. One rule (commands.is_user_error) now serves the three: the
    tool's own errors and the machine's OSErrors in one line, the others with their traceback."""
    from imagenet_ffcv import predict, train, write
    assert train.cli(['--config', str(tmp_path / 'rn50_88_epochs.yml')]) == 1
    err = capsys.readouterr().err
    assert f'--config {tmp_path / "rn50_88_epochs.yml"}: no such file' in err and \
        err.count('\n') == 1, err
    assert write.cli(['--data-dir', str(tmp_path / 'nowhere'), '--split', 'train', '--out',
                      str(tmp_path / 'train.beton')]) == 1
    err = capsys.readouterr().err
    assert f'{tmp_path / "nowhere"}: no such folder' in err and err.count('\n') == 1, err
    assert predict.cli([str(tmp_path / 'cat.jpg'), '--weights', str(tmp_path / 'w.pt')]) == 1
    err = capsys.readouterr().err
    assert 'w.pt' in err and err.count('\n') == 1, err

    def defect(*args, **kwargs):
        raise ValueError('a defect of the code')
    monkeypatch.setattr(write, 'main', defect)
    monkeypatch.setattr(predict, 'predict', defect)
    with pytest.raises(ValueError, match='a defect of the code'):
        write.cli(['--data-dir', str(tmp_path), '--split', 'train', '--out', 'x.beton'])
    with pytest.raises(ValueError, match='a defect of the code'):
        predict.cli([str(tmp_path / 'cat.jpg'), '--weights', str(tmp_path / 'w.pt')])


class NaNAt(nn.Module):
    """Cross-entropy, except NaN at call number ``at`` (0-based)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, logits, y):
        loss = nn.functional.cross_entropy(logits, y)
        self.calls += 1
        return loss * float('nan') if self.calls - 1 == self.at else loss


def _tiny(iterations=25):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(iterations)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, batches, optimizer


def test_non_finite_loss_names_epoch_and_iteration():
    model, batches, optimizer = _tiny()
    with pytest.raises(engine.NonFiniteLossError, match='epoch 3, iteration 13') as info:
        engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer,
                               loss_fn=NaNAt(13), lr_at=lambda t: 0.1, epoch=3,
                               show_progress=False, hooks=engine.EpochHooks(check_every=10))
    assert (info.value.epoch, info.value.iteration) == (3, 13)
    # Found at the next check (16 iterations done), before the checkpoint at 16 is written.
    model, batches, optimizer = _tiny()
    saved = []
    with pytest.raises(engine.NonFiniteLossError):
        engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer,
                               loss_fn=NaNAt(13), lr_at=lambda t: 0.1, epoch=0,
                               show_progress=False, hooks=engine.EpochHooks(
                                   checkpoint_every=4,
                                   save_checkpoint=lambda done, so_far: saved.append(done)))
    assert saved == [4, 8, 12]


def test_stop_request_ends_the_epoch_at_the_next_check_and_resume_skips_done_batches():
    model, batches, optimizer = _tiny()
    saved = []
    lrs = []

    def lr_at(t):
        lrs.append(t)
        return 0.1
    stats = engine.train_one_epoch(
        model=model, loader=batches, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
        lr_at=lr_at, epoch=0, show_progress=False, hooks=engine.EpochHooks(
            check_every=5, checkpoint_every=6,
            save_checkpoint=lambda done, so_far: saved.append(done),
            stop_requested=lambda: len(lrs) >= 7))
    assert stats['stopped'] and stats['iterations_done'] == 10 and stats['images'] == 40
    assert saved == [6]
    lrs.clear()
    stats = engine.train_one_epoch(
        model=model, loader=batches, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
        lr_at=lr_at, epoch=2, show_progress=False, start_iteration=10)
    assert not stats['stopped'] and stats['iterations_done'] == 25 and stats['images'] == 60
    assert lrs[0] == pytest.approx(2 + 10.5 / 25)  # the schedule continues where it stopped


def test_an_epoch_resumed_within_reports_the_whole_epochs_loss_images_and_time():
    """An epoch stopped at iteration 10 of 25 and resumed there with the figures its checkpoint
    holds (``so_far``) returns the loss and images of the whole epoch, as if never stopped (the
    epoch's log line); without them it reported iterations 10..24 alone."""
    model, batches, optimizer = _tiny()
    whole = engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer,
                                   loss_fn=nn.CrossEntropyLoss(), lr_at=lambda t: 0.1, epoch=0,
                                   show_progress=False)
    model, batches, optimizer = _tiny()
    checkpoints = []
    part = engine.train_one_epoch(
        model=model, loader=batches, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
        lr_at=lambda t: 0.1, epoch=0, show_progress=False, hooks=engine.EpochHooks(
            check_every=5, checkpoint_every=6, stop_requested=lambda: bool(checkpoints),
            save_checkpoint=lambda done, so_far: checkpoints.append((done, so_far))))
    [(done, so_far)] = checkpoints
    assert done == 6 and so_far['images'] == 24 and so_far['seconds'] > 0
    assert part['iterations_done'] == 10 and part['so_far']['images'] == 40
    rest = engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer,
                                  loss_fn=nn.CrossEntropyLoss(), lr_at=lambda t: 0.1, epoch=0,
                                  show_progress=False, start_iteration=10, so_far=part['so_far'])
    assert rest['images'] == whole['images'] == 100
    assert rest['train_loss'] == pytest.approx(whole['train_loss'], rel=1e-12)
    assert rest['seconds'] > part['so_far']['seconds']
    last_15 = engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer,
                                     loss_fn=nn.CrossEntropyLoss(), lr_at=lambda t: 0.1, epoch=0,
                                     show_progress=False, start_iteration=10)
    assert last_15['images'] == 60


def test_rank_0s_live_logs_leave_the_ranks_checks_where_the_other_ranks_have_them(monkeypatch):
    """The ranks' check is a collective (an all-reduce), so every rank must reach it at the same
    iterations; only rank 0 has live logs. With logs every 25 iterations and checks every 10 (60
    iterations), the all-reduces come after the same iterations as without logs (an extra one on
    rank 0 alone would pair with another collective of the others, or hang)."""
    def run(log_every):
        model, batches, optimizer = _tiny(60)
        calls, met, logged = [], [], []
        monkeypatch.setattr(engine.distributed, 'all_reduce_min',
                            lambda values: met.append(len(calls)) or values.tolist())

        def loss_fn(logits, y):
            calls.append(1)
            return nn.functional.cross_entropy(logits, y)
        engine.train_one_epoch(
            model=model, loader=batches, optimizer=optimizer, loss_fn=loss_fn,
            lr_at=lambda t: 0.1, epoch=0, show_progress=False, hooks=engine.EpochHooks(
                check_every=10, log_every=log_every,
                log_train=lambda done, values: logged.append((done, sorted(values)))))
        return met, logged

    without_logs, _ = run(0)
    with_logs, logged = run(25)
    assert without_logs == with_logs == [10, 20, 30, 40, 50, 60]
    assert logged == [(25, ['img_per_s', 'loss', 'lr']), (50, ['img_per_s', 'loss', 'lr'])]


class StartableBatches(list):
    """Batches that an epoch can start at one of (as ``loaders.Loader.epoch_from``); it
    records which batches were read."""

    def epoch_from(self, first_batch):
        self.read = list(range(first_batch, len(self)))
        return iter(self[first_batch:])


def test_a_resumed_epoch_starts_the_loader_at_its_batch_and_trains_as_on_any_iterable():
    """With ``start_iteration``, a loader with ``epoch_from`` is started there (the batches before
    are not read at all); the LR, the counts and the weights are those of a plain list, whose
    first batches are read and dropped."""
    results = []
    for kind in (list, StartableBatches):
        model, batches, optimizer = _tiny()
        batches, lrs = kind(batches), []
        stats = engine.train_one_epoch(
            model=model, loader=batches, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
            lr_at=lambda t: lrs.append(t) or 0.1, epoch=2, show_progress=False,
            start_iteration=10)
        results.append((stats['iterations_done'], stats['images'], lrs,
                        [p.detach().clone() for p in model.parameters()]))
    assert batches.read == list(range(10, 25))
    (done, images, lrs, weights), (done_s, images_s, lrs_s, weights_s) = results
    assert (done, images) == (done_s, images_s) == (25, 60) and lrs == lrs_s
    assert lrs[0] == pytest.approx(2 + 10.5 / 25)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_s))


class Payload:
    """Unpickling this object calls ``Path.touch(marker)``: a stand-in for any code a weights
    file from someone else could run when loaded with pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def hostile_file(tmp_path, name='final_weights.pt'):
    """A weights file whose pickle creates ``tmp_path / 'pwned'`` when loaded unsafely; checked to
    really do so, so that the tests below test something."""
    marker = tmp_path / 'pwned'
    path = tmp_path / name
    torch.save({'format': 1, 'model': {'fc.weight': torch.zeros(2, 2)}, 'x': Payload(marker)},
               path)
    torch.load(path, weights_only=False)  # what the code did before: it runs the payload
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_loading_never_runs_the_code_a_pickle_holds(tmp_path):
    path, marker = hostile_file(tmp_path)
    for load in (checkpoint.load, weights.load_weights, weights.load_model):
        with pytest.raises(checkpoint.CheckpointError, match='final_weights.pt: refused'):
            load(path)
    assert not marker.exists()


def test_timm_and_torchvision_reference_checkpoints_load_and_torchscript_is_refused(tmp_path):
    """timm's train.py and torchvision's reference scripts save their command line as an
    argparse.Namespace beside the state dict: such a checkpoint loads (weights only refused it,
    passing on torch's advice to load it unsafely). A TorchScript archive and a pickle that would
    run code are refused in one line naming what they hold and how to convert a trusted file,
    without torch's advice."""
    import argparse
    model = nn.Linear(2, 2)
    args = argparse.Namespace(model='resnet50', lr=0.5, aa='rand-m9', mean=None)
    torch.save({'epoch': 3, 'arch': 'resnet50', 'state_dict': model.state_dict(), 'args': args,
                'version': 2}, tmp_path / 'timm.pth.tar')
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'epoch': 3, 'args': args},
               tmp_path / 'reference.pth')
    for name in ('timm.pth.tar', 'reference.pth'):
        state = weights.load_weights(tmp_path / name)[0]
        assert torch.equal(state['weight'], model.weight)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit's deprecation
        torch.jit.save(torch.jit.script(model), tmp_path / 'scripted.pt')
    hostile, marker = hostile_file(tmp_path)
    for path, held in ((tmp_path / 'scripted.pt', 'a TorchScript archive'),
                       (hostile, 'the weights file holds Python objects \\(such as ')):
        with pytest.raises(checkpoint.CheckpointError, match=f'refused: {held}') as info:
            weights.load_weights(path)
        assert 'weights_only' not in str(info.value) and '\n' not in str(info.value)
        assert 'torch.save(model.state_dict(), "weights.pt")' in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize('content', [b'<!DOCTYPE html><html>404 Not Found</html>',
                                     bytes(range(7, 200)), b''])
def test_a_file_that_is_not_a_torch_file_is_not_called_unsafe(tmp_path, content):
    """An HTML error page saved by a failed download, garbage, or an empty file is named as not a
    PyTorch file; a real unsafe pickle is still refused as one, and both torch.save formats load."""
    path = tmp_path / 'final_weights.pt'
    path.write_bytes(content)
    for load in (checkpoint.load, weights.load_weights):
        with pytest.raises(checkpoint.CheckpointError,
                           match='final_weights.pt: not a PyTorch file .*re-download it'):
            load(path)
    (tmp_path / 'hostile').mkdir()
    hostile, _ = hostile_file(tmp_path / 'hostile')
    with pytest.raises(checkpoint.CheckpointError, match='final_weights.pt: refused'):
        weights.load_weights(hostile)
    state = nn.Linear(2, 2).state_dict()
    for zipped in (True, False):
        torch.save(state, path, _use_new_zipfile_serialization=zipped)
        assert torch.equal(weights.load_weights(path)[0]['weight'], state['weight'])
    garbage = tmp_path / 'garbage.pt'  # bytes that do not decode as UTF-8 are not called text
    garbage.write_bytes(bytes(range(0x81, 0xC1)))  # (0x80 starts a pickle)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape("(it starts with b'\\x81\\x82")):
        weights.load_weights(garbage)
    beton = tmp_path / 'train_160.beton'  # predict --weights given the data: "re-download it"
    beton.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match='a .beton holds images, not weights: '
                                                         'give a run folder or its final_weights'):
        weights.load_weights(beton)
    config = tmp_path / 'rn50_16_epochs.yaml'  # a config given for the weights: "re-download it"
    config.write_text('\ufeffdata:\n  in_memory: 1\n', encoding='utf-8')  # with a BOM
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            "rn50_16_epochs.yaml: not a PyTorch file (it is text: 'data:\\n  in_memory: 1\\n', not "
            "as torch.save writes; a yaml file holds no weights: give a run folder, a checkpoint "
            "or a weights file)")):
        weights.load_weights(config)


def test_checkpoints_hold_only_tensors_and_plain_values_and_old_ones_still_load(tmp_path):
    state = {'format': 1, 'model': {'w': torch.ones(3)}, 'rng': checkpoint.rng_state()}
    checkpoint.save(state, tmp_path / 'new.pt')
    torch.load(tmp_path / 'new.pt', weights_only=True)  # no numpy objects, no extra globals
    # A checkpoint of the earlier format kept numpy's RNG state as a numpy array.
    old = {'format': 1, 'model': {'w': torch.ones(3)},
           'rng': {**checkpoint.rng_state(), 'numpy': np.random.get_state()}}
    torch.save(old, tmp_path / 'old.pt')
    loaded = checkpoint.load(tmp_path / 'old.pt')
    np.random.set_state(old['rng']['numpy'])
    expected = np.random.rand(3)
    checkpoint.set_rng_state(loaded['rng'])
    assert np.array_equal(np.random.rand(3), expected)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / 'new.pt')['rng'])  # the new format too


def test_final_weights_as_safetensors_carry_config_and_classes(tmp_path):
    model = nn.Linear(4, 3)
    config = {'model': {'arch': 'resnet18'}, 'training': {'use_blurpool': 1, 'channels_last': 1},
              'validation': {'resolution': 32, 'lr_tta': 1}}
    classes = [('n01', 'one'), ('n02', 'two'), ('n03', 'three')]
    safe = weights.save_final_weights(model.state_dict(), tmp_path / 'final_weights.pt',
                                         config=config, classes=classes)
    assert safe == tmp_path / 'final_weights.safetensors'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['final_weights.pt',
                                                          'final_weights.safetensors']
    state, saved_config, saved_classes, _, _ = weights.load_weights(safe)
    assert saved_config == config and saved_classes == classes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert safe.read_bytes()[8:9] == b'{'  # a JSON header, no pickle
    (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(checkpoint.CheckpointError, match="bad.safetensors: not a safetensors file "
                                                         r"\(it is text: 'not a safetensors"):
        weights.load_weights(tmp_path / 'bad.safetensors')


GOOD_CONFIG = {'model': {'arch': 'resnet18'}, 'training': {'use_blurpool': 1, 'channels_last': 1},
               'validation': {'resolution': 32, 'lr_tta': 1}}


@pytest.mark.parametrize('key, value, error', [
    ('config', '{"model": ', "final_weights.safetensors's metadata 'config' is not valid JSON"),
    ('config', '{"foo": 1}', r"final_weights.safetensors: the saved config is not a resolved "
                             r"config of this tool \(KeyError: 'model'\)"),
    ('config', '[1]', 'final_weights.safetensors: the saved config is not a resolved config'),
    ('classes', '[["n01"], ["n02", "two"]]', 'final_weights.safetensors: the saved class list is '
                                             r'not \[\[wnid, name\], ...\]'),
    # values of the wrong kind failed with a traceback (TypeError, AttributeError) or not at all
    *[('config', json.dumps({**GOOD_CONFIG, section: {**GOOD_CONFIG.get(section, {}), key: bad}}),
       f"final_weights.safetensors: the saved config's {section}.{key} is {bad!r}, not a value "
       "of that key")
      for section, key, bad in (('validation', 'resolution', 'abc'),
                                ('validation', 'resolution', None),
                                ('validation', 'resolution', 224.0),
                                ('model', 'arch', 5), ('training', 'use_blurpool', 2),
                                ('data', 'decoder', 'bogus'))],
    ('classes', '{"n01": "one"}', 'final_weights.safetensors: the saved class list is not'),
])
def test_damaged_safetensors_metadata_is_an_error_naming_the_file(tmp_path, key, value, error):
    import safetensors.torch
    path = tmp_path / 'final_weights.safetensors'
    metadata = {'format': weights.SAFETENSORS_FORMAT, 'config': json.dumps(GOOD_CONFIG),
                'classes': json.dumps([['n01', 'one'], ['n02', 'two']]), key: value}
    safetensors.torch.save_file(nn.Linear(4, 2).state_dict(), str(path), metadata=metadata)
    with pytest.raises(checkpoint.CheckpointError, match=error):
        weights.load_weights(path)


def test_metadata_of_safetensors_not_written_by_this_tool_is_not_used(tmp_path):
    import safetensors.torch
    path = tmp_path / 'other.safetensors'
    safetensors.torch.save_file(nn.Linear(4, 2).state_dict(), str(path),
                                metadata={'config': '{"foo": 1}', 'classes': '[1, 2]'})
    state, config, classes, _, _ = weights.load_weights(path)
    assert (config, classes) == (None, None) and state.keys() == {'weight', 'bias'}


@pytest.mark.parametrize('text, error', [
    ('{"model": ', r'params.json is not valid JSON \(Expecting value: line 1 column 11'),
    ('{"model": {"arch": "resnet18"}}', r"params.json: the saved config is not a resolved config "
                                        r"of this tool \(KeyError: 'training'\)"),
])
def test_a_damaged_params_json_beside_final_weights_is_an_error_naming_it(tmp_path, text, error):
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / 'final_weights.pt')
    (tmp_path / 'params.json').write_text(text)
    with pytest.raises(checkpoint.CheckpointError, match=error):
        weights.load_weights(tmp_path / 'final_weights.pt')
    (tmp_path / 'params.json').write_text(json.dumps(GOOD_CONFIG))
    assert weights.load_weights(tmp_path / 'final_weights.pt')[1] == GOOD_CONFIG


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_names_the_file(tmp_path):
    """The disk fills up (simulated with a file-size limit, RLIMIT_FSIZE) while a checkpoint is
    written: the error names the file and the cause, and the previous checkpoint is intact."""
    import subprocess
    import sys
    from conftest import REPO
    path = tmp_path / 'checkpoint.pt'
    checkpoint.save({'format': 1, 'model': {'w': torch.zeros(10)}}, path)
    before = path.read_bytes()
    code = f"""
import resource, signal, sys
import torch
sys.path.insert(0, {str(REPO)!r})
from imagenet_ffcv import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    checkpoint.save({{'format': 1, 'model': {{'w': torch.zeros(1_000_000)}}}}, {str(path)!r})
except checkpoint.CheckpointError as e:
    print(e)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert 'checkpoint.pt: could not be written (File too large)' in proc.stdout
    assert path.read_bytes() == before and checkpoint.load(path)['model']['w'].shape == (10,)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left


def test_keep_history_keeps_the_last_n_epoch_checkpoints_and_deletes_only_after_the_new_one(
        tmp_path):
    latest = tmp_path / 'checkpoint.pt'
    for epoch in range(1, 5):
        checkpoint.save({'format': 1, 'epoch': epoch}, latest)
        path = checkpoint.keep_history(latest, epochs_done=epoch, keep_last=2)
        assert path == tmp_path / f'checkpoint_epoch_{epoch}.pt'
        os.utime(path, (epoch, epoch))  # written in this order, a second apart
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'checkpoint.pt', 'checkpoint_epoch_3.pt', 'checkpoint_epoch_4.pt']
    checkpoint.save({'format': 1, 'epoch': 5}, latest)  # the next save leaves the history as it was
    assert [checkpoint.load(tmp_path / f'checkpoint_epoch_{e}.pt')['epoch'] for e in (3, 4)] == \
        [3, 4]
    # a run resumed from an earlier epoch's file: the abandoned attempt's later epoch 9, written
    # before epochs 3-5, goes first (by time written), though its number is the highest
    (tmp_path / 'checkpoint_epoch_9.pt').write_bytes(b'')
    os.utime(tmp_path / 'checkpoint_epoch_9.pt', (2, 2))
    checkpoint.keep_history(latest, epochs_done=5, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'checkpoint.pt', 'checkpoint_epoch_4.pt', 'checkpoint_epoch_5.pt']
    latest.unlink()  # the new one cannot be made: nothing is deleted
    with pytest.raises(OSError):
        checkpoint.keep_history(latest, epochs_done=6, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'checkpoint_epoch_4.pt', 'checkpoint_epoch_5.pt']


def test_a_finished_run_with_no_epoch_left_says_what_trains_it_on(tmp_path, capsys):
    """A finished run resumed by path with no epoch left: more epochs (forced) train it on; one
    that stopped at its top-1 target needs that target changed (it was told to give more epochs,
    which alone trains nothing)."""
    (tmp_path / 'final_weights.pt').write_bytes(b'')
    path = tmp_path / 'checkpoint.pt'
    path.write_bytes(b'')
    said = f'=> {tmp_path} has finished (final_weights.pt), and this config leaves it no epoch to '
    assert not checkpoint.finished_found_by_auto(path, str(path))  # by path: restored first
    assert checkpoint.finished_found_by_auto(path, 'auto')  # resolve_resume said so
    assert capsys.readouterr().out == ''
    assert not checkpoint.no_epoch_left(path, checkpoint.Progress(epoch=3), epochs=4)
    assert checkpoint.no_epoch_left(path, checkpoint.Progress(epoch=4), epochs=4)
    assert capsys.readouterr().out == (said + 'train: nothing to resume (to train it further, '
                                       'give more epochs with checkpoint.force=1)\n')
    reached = checkpoint.Progress(epoch=2, reached={'epoch': 1, 'time_to_target_s': 9.0})
    assert checkpoint.no_epoch_left(path, reached, epochs=4)
    assert capsys.readouterr().out == (said + 'train: nothing to resume (to train it further, '
                                       'change or turn off training.target_top1, which it '
                                       'reached)\n')
    reached.epoch = 4
    checkpoint.no_epoch_left(path, reached, epochs=4)
    assert capsys.readouterr().out.endswith("which it reached, and give more epochs with "
                                            "checkpoint.force=1)\n")
    assert checkpoint.no_epoch_left(path, reached, epochs=4, say=False)
    assert capsys.readouterr().out == ''  # another rank than 0


def test_weights_are_read_by_content_and_a_file_that_only_lies_in_a_run_folder_is_not_the_runs(
        tmp_path):
    """safetensors or torch.save is told by the file's first bytes: a safetensors file named .pt
    was called 'a failed download', a .pt named .safetensors 'header too large'. A foreign file
    copied into a run folder took the run's params.json and classes.tsv (its arch, BlurPool and
    class names) without a word; only the names a run's weights have take them now. EMA weights
    left aside are named: another tool's beside the plain ones, a run folder's final EMA
    weights. An empty file says it is empty."""
    import safetensors.torch
    state = nn.Linear(2, 2).state_dict()
    safetensors.torch.save_file(state, str(tmp_path / 'st_as.pt'))
    torch.save(state, tmp_path / 'pt_as.safetensors')
    for name in ('st_as.pt', 'pt_as.safetensors'):
        assert torch.equal(weights.load_weights(tmp_path / name).state['weight'], state['weight'])
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'params.json').write_text(json.dumps({'model.arch': 'resnet18',
                                                 'training.use_blurpool': 1}))
    (run / 'classes.tsv').write_text('0\tn01440764\ttench\n1\tn01443537\tgoldfish\n')
    torch.save(state, run / 'someone_elses.pt')
    torch.save(state, run / 'final_weights.pt')
    foreign, own = (weights.load_weights(run / name) for name in ('someone_elses.pt',
                                                                   'final_weights.pt'))
    assert (foreign.config, foreign.classes, foreign.blurpool) == (None, None, None)
    assert own.config['model']['arch'] == 'resnet18' and own.blurpool is True
    assert own.classes == [('n01440764', 'tench'), ('n01443537', 'goldfish')] and not own.note
    torch.save(state, run / 'final_weights_ema.pt')
    assert weights.load_weights(run).note == (
        f"note: {run / 'final_weights.pt'} holds the plain weights; the run's EMA weights are "
        f"{run / 'final_weights_ema.pt'}: give that file to use them")
    ema = {k: v + 1 for k, v in state.items()}
    torch.save({'model': state, 'model_ema': ema, 'epoch': 3, 'args': argparse.Namespace(lr=1)},
               tmp_path / 'reference.pth')  # as torchvision's reference scripts save
    read = weights.load_weights(tmp_path / 'reference.pth')
    assert torch.equal(read.state['weight'], state['weight'])
    said = (f"note: {tmp_path / 'reference.pth'} also holds EMA weights ('model_ema'); the plain "
            f"weights are used; to use the EMA ones, save them alone: python -c ")
    assert read.note.startswith(said)
    # the command it gives works, as a shell reads it (torch.load refused the file's
    # argparse.Namespace, and a quote in its path broke the command)
    quoted = tmp_path / "o'brien" / 'reference.pth'
    quoted.parent.mkdir()
    (tmp_path / 'reference.pth').rename(quoted)
    command = shlex.split(weights.load_weights(quoted).note.split('save them alone: ')[1])
    assert command[:2] == ['python', '-c']
    subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, check=True)
    assert torch.equal(weights.load_weights(tmp_path / 'ema.pt').state['weight'], ema['weight'])
    model = nn.Linear(2, 2)
    checkpoint.save(checkpoint.training_state(
        model_state=model.state_dict(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        epoch=1, iteration=0, config=None, classes=None, best_top1=None, progress={},
        ema=torch.optim.swa_utils.AveragedModel(model)), run / 'checkpoint.pt')
    (run / 'final_weights_ema.pt').unlink()  # not finished yet
    assert weights.load_weights(run / 'checkpoint.pt').note == (
        f"note: {run / 'checkpoint.pt'} also holds EMA weights; the plain weights are used (the "
        f"run writes its EMA weights as final_weights_ema.pt when it finishes)")
    (run / 'final_weights_ema.pt').write_bytes(b'')  # it has finished: they are there
    assert weights.load_weights(run / 'checkpoint.pt').note == (
        f"note: {run / 'checkpoint.pt'} also holds EMA weights; the plain weights are used (the "
        f"run's final EMA weights, after its last epoch, are {run / 'final_weights_ema.pt'}: give "
        "that file to use them)")
    (tmp_path / 'empty.pt').write_bytes(b'')
    with pytest.raises(checkpoint.CheckpointError, match=r'empty.pt: not a PyTorch file \(it is '
                                                         r'empty, 0 bytes, not as torch.save'):
        weights.load_weights(tmp_path / 'empty.pt')
    # each was torch's or safetensors' own words ('[enforce fail at inline_container.cc:180]',
    # 'keys )', 'SafetensorError: ... incomplete metadata, file not fully covered')
    for name in ('readme.txt', 'data.pkl'):  # torch reads data.pkl in a folder only
        with zipfile.ZipFile(tmp_path / 'notes.pt', 'w') as archive:
            archive.writestr(name, 'not weights')
        with pytest.raises(checkpoint.CheckpointError,
                           match=rf"notes.pt: a zip archive, not one torch.save writes \(it holds "
                                 rf"{name}, not a folder of data.pkl and tensors\)"):
            weights.load_weights(tmp_path / 'notes.pt')
    torch.save({}, tmp_path / 'nothing.pt')
    with pytest.raises(checkpoint.CheckpointError, match=r'nothing.pt: holds no state dict of '
                                                         r'tensors \(an empty dict\)'):
        weights.load_weights(tmp_path / 'nothing.pt')
    whole = (tmp_path / 'st_as.pt').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(whole[:len(whole) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r'cut.safetensors: incomplete: its header '
                                                         r'names more bytes than the file holds'):
        weights.load_weights(tmp_path / 'cut.safetensors')
    (tmp_path / 'more.safetensors').write_bytes(whole + bytes(16))  # not cut short: not said so
    with pytest.raises(checkpoint.CheckpointError, match=r'more.safetensors: cannot read the '
                                                         r'weights \(SafetensorError'):
        weights.load_weights(tmp_path / 'more.safetensors')


def test_a_lightning_checkpoint_loads_and_keys_that_do_not_fit_are_named_first(tmp_path):
    """A PyTorch Lightning checkpoint (its LightningModule's network as self.model: every key
    'model.'-prefixed) was refused as another architecture; the prefix is removed, with a note,
    when that makes the keys fit. A classifier kept without a class list is named with the
    classes it is taken for. Keys that do not fit are named before a class list is asked for
    (predict sent the user off to write one first)."""
    from imagenet_ffcv.models import build_model
    model = build_model(arch='resnet18', num_classes=3, use_blurpool=False, channels_last=False)
    lightning = tmp_path / 'l.ckpt'
    torch.save({'state_dict': {f'model.{k}': v for k, v in model.state_dict().items()},
                'epoch': 3, 'global_step': 30}, lightning)
    saved = weights.load_model(lightning, arch='resnet18', num_classes=3,
                               beton=tmp_path / 'val.beton')
    assert all(torch.equal(saved.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert saved.note == (
        f"note: 'model.' removed from the start of every key in {lightning}\nnote: no class list is saved with {lightning}: its classifier's 3 "
        f"outputs are taken as the classes of {tmp_path / 'val.beton'}, in their order")
    with pytest.raises(FileNotFoundError, match='no class list for .*l.ckpt: none saved with it'):
        weights.load_model(lightning, arch='resnet18')  # 3 outputs: whose classes?
    # a LightningModule with a loss's buffer beside its network (it was refused as another
    # architecture)
    with_loss = tmp_path / 'loss.ckpt'
    torch.save({'state_dict': {**{f'model.{k}': v for k, v in model.state_dict().items()},
                               'criterion.weight': torch.ones(3)}}, with_loss)
    saved = weights.load_model(with_loss, arch='resnet18', num_classes=3)
    assert all(torch.equal(saved.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert saved.note == (f"note: the keys under 'model.' in {with_loss} taken, that prefix "
                          "removed; 1 other key(s) left out: criterion.weight")
    # a segmentation model's backbone (torchvision's fcn_resnet50: 'backbone.' and 'classifier.'):
    # refused for want of a classifier, naming the prefix removed (it named the keys alone)
    torch.save({**{f'backbone.{k}': v for k, v in model.state_dict().items()
                   if not k.startswith('fc.')}, 'classifier.0.weight': torch.ones(3)}, with_loss)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['fc.bias', 'fc.weight'\], "
                       r"unexpected none, other shapes none \(the keys under 'backbone.' taken, "
                       r"that prefix removed; 1 other key\(s\) left out: classifier.0.weight\)"):
        weights.load_model(with_loss, arch='resnet18', num_classes=3)
    # two networks whose keys both fit (a model and its EMA): not chosen between
    torch.save({**{f'model.{k}': v for k, v in model.state_dict().items()},
                **{f'ema_model.{k}': v for k, v in model.state_dict().items()}}, with_loss)
    with pytest.raises(checkpoint.CheckpointError, match="unexpected \\['ema_model.bn1.bias'"):
        weights.load_model(with_loss, arch='resnet18', num_classes=3)
    other = build_model(arch='resnet34', num_classes=3, use_blurpool=False, channels_last=False)
    torch.save({f'model.{k}': v for k, v in other.state_dict().items()}, tmp_path / 'o.ckpt')
    with pytest.raises(checkpoint.CheckpointError, match=r"o.ckpt: the weights do not fit "
                                                         r"resnet18: missing \['bn1.bias'.*"
                                                         r"unexpected \['model.bn1.bias'.*their "
                                                         r"keys fit resnet34\)$"):
        weights.load_model(tmp_path / 'o.ckpt', arch='resnet18')  # (with 'model.': named none)
    squeeze = build_model(arch='squeezenet1_1', num_classes=3, use_blurpool=False,
                          channels_last=False)  # its classifier is a conv: no class count read
    torch.save(squeeze.state_dict(), tmp_path / 's.pt')
    with pytest.raises(FileNotFoundError, match='no class list for .*s.pt: none saved with it'):
        weights.load_model(tmp_path / 's.pt', arch='squeezenet1_1')
