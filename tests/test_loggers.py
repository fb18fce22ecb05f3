"""Live logs (imagenet_ffcv.loggers): TensorBoard events read back as TensorBoard reads them,
the purge of a resumed run, W&B's optional import, an offline W&B run, and the no-op log."""
import glob
import importlib.util
import json
import struct
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from imagenet_ffcv import loggers
from imagenet_ffcv.loggers import LiveLog
from imagenet_ffcv.optional import MissingPackageError

NO_WANDB = ('wandb is optional (requirements-extras.txt): .venv/bin/pip install -r '
            'requirements-extras.txt runs this test')

CONFIG = {'model': {'arch': 'resnet18'}, 'lr': {'lr': 0.5}, 'data': {'path': REPO}}


def read_events(folder) -> EventAccumulator:
    """Every event of ``folder/tensorboard``, as TensorBoard loads them (orphaned data purged)."""
    events = EventAccumulator(str(folder / 'tensorboard'), size_guidance={'scalars': 0,
                                                                          'tensors': 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list:
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def config_texts(events: EventAccumulator) -> list:
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors('config/text_summary')]


def next_second() -> None:
    """Wait for the next whole second: TensorBoard reads event files in name order, and a name is
    the creation second then a per-process counter compared as text (``.10`` before ``.9``), so
    two writers of one process within one second may be read in the wrong order. A resumed run
    is a later process, seconds after the first start: this only concerns tests."""
    time.sleep(1.01 - time.time() % 1)


def write_first_run(folder) -> None:
    with LiveLog(folder, tensorboard=True, config=CONFIG) as log:
        assert log.active
        log.train_scalars(10, {'loss': 2.5, 'lr': 0.1, 'img_per_s': 900.0})
        log.train_scalars(20, {'loss': 2.0, 'lr': np.float32(0.2), 'img_per_s': 1000})
        log.epoch_scalars(0, {'top_1': 0.25, 'top_5': 0.5, 'val_loss': 3.0, 'top_1_ema': None})
        log.epoch_scalars(1, {'top_1': 0.5, 'top_5': 0.75, 'val_loss': 2.0, 'note': 'text',
                              'reached': True})


def test_tensorboard_tags_steps_values_and_config(tmp_path):
    """train/<key> at the given iterations, val/<key> at the epochs, non-numeric values skipped,
    the config once as a JSON code block."""
    write_first_run(tmp_path)
    events = read_events(tmp_path)
    assert set(events.Tags()['scalars']) == {'train/loss', 'train/lr', 'train/img_per_s',
                                             'val/top_1', 'val/top_5', 'val/val_loss'}
    assert scalars(events, 'train/loss') == [(10, 2.5), (20, 2.0)]
    assert scalars(events, 'train/lr') == [(10, 0.1), (20, 0.2)]
    assert scalars(events, 'train/img_per_s') == [(10, 900.0), (20, 1000.0)]
    assert scalars(events, 'val/top_1') == [(0, 0.25), (1, 0.5)]
    assert scalars(events, 'val/val_loss') == [(0, 3.0), (1, 2.0)]
    [text] = config_texts(events)
    assert text.startswith('```json\n') and text.endswith('\n```')
    written = json.loads(text[len('```json\n'):-len('\n```')])
    assert written == {**CONFIG, 'data': {'path': str(REPO)}}  # not JSON: written as str


def test_a_close_that_fails_while_an_error_ends_the_run_warns_instead_of_replacing_it(
        tmp_path, capsys):
    """The trainer closes its live logs as a run ends, an error or not; the close failing too (a
    folder gone read-only) replaced the error that ended the run. Quiet, it is a warning; else it
    is raised, and the W&B run is finished either way."""
    class Failing:
        def close(self):
            raise OSError(30, 'Read-only file system')

    class Run:
        finished = False

        def finish(self):
            Run.finished = True
    for quiet in (True, False):
        log = LiveLog(tmp_path, tensorboard=False, config={})
        log._writer, log._wandb_run, Run.finished = Failing(), Run(), False
        if quiet:
            log.close(quiet=True)
            assert '=> warning: closing the TensorBoard or W&B log failed too (OSError: [Errno ' \
                '30] Read-only file system)' in capsys.readouterr().err
        else:
            with pytest.raises(OSError, match='Read-only'):
                log.close()
        assert Run.finished
        log.close()  # once closed, nothing more


def test_resume_purges_the_iterations_after_the_checkpoint(tmp_path):
    """A log resumed at iteration 15 hides what the first start logged from step 15 on (step 20)
    in every tag, keeps step 10, adds no second config text; val/ points (step = epoch, below 15)
    are not purged."""
    write_first_run(tmp_path)
    next_second()
    with LiveLog(tmp_path, tensorboard=True, config=CONFIG, resume_step=15) as log:
        log.train_scalars(30, {'loss': 1.0, 'lr': 0.3})
    events = read_events(tmp_path)
    assert len(glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))) == 2
    assert scalars(events, 'train/loss') == [(10, 2.5), (30, 1.0)]
    assert scalars(events, 'train/lr') == [(10, 0.1), (30, 0.3)]
    assert scalars(events, 'train/img_per_s') == [(10, 900.0)]
    assert scalars(events, 'val/top_1') == [(0, 0.25), (1, 0.5)]
    assert len(config_texts(events)) == 1


def test_both_off_does_nothing(tmp_path):
    """Neither backend: inactive, every call a no-op, no folder created."""
    folder = tmp_path / 'run'
    log = LiveLog(folder, tensorboard=False, config=CONFIG, run_name='r')
    assert not log.active
    log.train_scalars(1, {'loss': 1.0})
    log.epoch_scalars(0, {'top_1': 0.5}, step=1)
    log.close()
    log.close()
    assert not folder.exists()


def test_numeric_items_keeps_real_numbers_only():
    values = {'a': 1, 'b': 2.5, 'c': np.float64(0.25), 'd': np.int64(3), 'nan': float('nan'),
              'none': None, 'text': '1.0', 'flag': True, 'list': [1.0]}
    kept = loggers.numeric_items(values)
    assert list(kept) == ['a', 'b', 'c', 'd', 'nan']
    assert all(type(v) is float for v in kept.values()) and kept['c'] == 0.25


def test_wandb_run_id_is_sanitized():
    assert loggers.wandb_run_id('20260101-120000-ab12cd') == '20260101-120000-ab12cd'
    assert loggers.wandb_run_id("a/b:c;d,e#f?g'h i") == 'a-b-c-d-e-f-g-h-i'
    assert len(loggers.wandb_run_id('x' * 300)) == 128
    assert loggers.wandb_run_id('') is None


def test_importing_the_module_does_not_import_wandb(monkeypatch):
    """loggers.py run afresh (as a copy: the tests' module stays as it is) imports no wandb."""
    monkeypatch.delitem(sys.modules, 'wandb', raising=False)
    spec = importlib.util.spec_from_file_location('imagenet_ffcv._loggers_copy', loggers.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert 'wandb' not in sys.modules


def test_missing_wandb_names_the_package_and_the_extras_file(tmp_path, monkeypatch):
    """A W&B project without wandb installed: an ImportError saying what to install, raised
    before anything is written."""
    monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` raises ImportError
    folder = tmp_path / 'run'
    with pytest.raises(ImportError) as caught:
        LiveLog(folder, tensorboard=True, wandb_project='proj', run_name='r')
    assert isinstance(caught.value, MissingPackageError)
    message = str(caught.value)
    assert "'wandb'" in message and 'pip install wandb==' in message
    assert "pip install -e '.[wandb]'" in message  # a checkout's extra: the package is not on PyPI
    assert "W&B logging (project 'proj')" in message  # what asked for it
    assert not folder.exists()


def wandb_records(path) -> list:
    """The records of an offline run's ``.wandb`` file (W&B's internal format: a 7-byte header,
    then LevelDB-log chunks in 32 KiB blocks, each a protobuf Record); skips the test when the
    format is not the one expected."""
    pb = pytest.importorskip('wandb.proto.wandb_internal_pb2', reason=NO_WANDB)
    data = path.read_bytes()
    if not data.startswith(b':W&B'):
        pytest.skip(f'{path.name}: this wandb version writes a .wandb format this test cannot '
                    'read back (the run itself was logged)')
    records, chunks, pos, block = [], b'', 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: the record is complete
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b''
    return records


def wandb_history(records) -> dict:
    """{step: {key: value}} of the history rows, W&B's own keys (``_step``...) left out."""
    rows = {}
    for record in records:
        if record.WhichOneof('record_type') == 'history':
            items = {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            rows[record.history.step.num] = {k: v for k, v in items.items()
                                             if not k.startswith('_')}
    return rows


def test_wandb_offline_run_holds_the_values(tmp_path, monkeypatch):
    """An offline W&B run in the run folder: one step axis (the iteration), epoch values in the
    row of their step with an 'epoch' metric, a step below the last one raised to it, the config
    saved. Skipped without wandb (an optional package)."""
    pytest.importorskip('wandb', reason=NO_WANDB)
    for name in ('WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR'):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    folder = tmp_path / 'run'
    log = LiveLog(folder, tensorboard=False, wandb_project='proj', run_name='2026/01:x',
                  config=CONFIG)
    try:
        assert log.active
        log.train_scalars(10, {'loss': 2.5, 'lr': 0.1})
        log.train_scalars(20, {'loss': 2.0, 'lr': 0.2})
        log.epoch_scalars(0, {'top_1': 0.25, 'top_1_ema': None})  # joins the row of step 20
        log.train_scalars(30, {'loss': 1.5})
        log.epoch_scalars(1, {'top_1': 0.5}, step=25)  # below 30: logged at 30
    finally:
        log.close()
    assert not log.active and not (folder / 'tensorboard').exists()
    [run_file] = (folder / 'wandb').glob('offline-run-*-2026-01-x/run-2026-01-x.wandb')
    records = wandb_records(run_file)
    assert wandb_history(records) == {
        10: {'train/loss': 2.5, 'train/lr': 0.1},
        20: {'train/loss': 2.0, 'train/lr': 0.2, 'val/top_1': 0.25, 'epoch': 0},
        30: {'train/loss': 1.5, 'val/top_1': 0.5, 'epoch': 1}}
    [run] = [record.run for record in records if record.WhichOneof('record_type') == 'run']
    assert (run.run_id, run.project, run.display_name) == ('2026-01-x', 'proj', '2026/01:x')
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config['model'] == {'arch': 'resnet18'} and config['data'] == {'path': str(REPO)}


def test_tensorboard_is_needed_only_when_asked_for(tmp_path, monkeypatch):
    """Without the tensorboard package (a bare GPU machine) a run that does not log to it works;
    one that asks for it stops with an error naming the package, its pin and the key."""
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    log = LiveLog(tmp_path / 'run', tensorboard=False)
    log.epoch_scalars(0, {'top_1': 0.5})
    assert not log.active and not (tmp_path / 'run').exists()
    with pytest.raises(MissingPackageError, match=r"TensorBoard logging needs the package "
                                                  r"'tensorboard'.*pip install "
                                                  r"tensorboard==2\.21\.0"):
        LiveLog(tmp_path / 'run', tensorboard=True)
