"""train_imagenet.py end to end on CPU: its CLI, refusals before any work and the live logs (the
short run of conftest.py and its outputs are in test_eval_predict.py, the one file that uses it,
so that only one pytest process trains it; the torchrun runs are in test_faults.py)."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, SAMPLE, run_env, small_args, small_config
from imagenet_ffcv import betons, commands, config, train
from imagenet_ffcv.classes import class_list_path, read_class_list, write_class_list


@pytest.mark.slow
def test_cli_trains_and_prints_results_table(sample_betons, tmp_path):
    proc = subprocess.run(
        [sys.executable, 'train_imagenet.py', '--config', 'rn18_configs/rn18_16_epochs.yaml',
         f'--data.train_dataset={sample_betons["train"]}',
         f'--data.val_dataset={sample_betons["val"]}', '--data.num_workers=2',
         '--training.epochs=1', '--lr.lr_peak_epoch=0.5', '--training.batch_size=64', '--resolution.min_res=32',
         '--resolution.max_res=32', '--validation.resolution=32', f'--logging.folder={tmp_path}'],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '| arch' in proc.stdout and 'top-1' in proc.stdout and 'resnet18' in proc.stdout
    assert '-> 0.03125 used' in proc.stdout  # lr 0.5 for batch 1024, scaled to batch 64
    # stderr is no terminal: the epoch's and validation's bars are each drawn once ('%|'), then
    # cleared, not redrawn up to 10 times a second (124 times over the demo's first 2 epochs)
    assert proc.stderr.count('%|') == 2 and 'epoch 0:   0%|' in proc.stderr


def test_progress_bars_redraw_once_a_minute_where_stderr_is_no_terminal(monkeypatch):
    with commands.progress_bar(range(3)) as bar:  # pytest's stderr is no terminal
        # and tqdm's monitor thread redraws a bar not redrawn for maxinterval (10 s: 20 s after
        # each minute's line, a second one)
        assert bar.mininterval == bar.maxinterval == commands.LOG_REDRAW_S == 60
    with commands.progress_bar(range(3), mininterval=5) as bar:
        assert bar.mininterval == 5
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True, raising=False)
    with commands.progress_bar(range(3)) as bar:
        assert (bar.mininterval, bar.maxinterval) == (0.1, 10)  # tqdm's
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, 'ipykernel', sys)  # a Jupyter kernel redraws in place
    with commands.progress_bar(range(3)) as bar:
        assert bar.mininterval == 0.1
    monkeypatch.delitem(sys.modules, 'ipykernel')
    monkeypatch.setattr(sys, 'stderr', None)  # pythonw, 2>&-: a disabled bar, as tqdm's
    with commands.progress_bar(range(3), disable=True) as bar:
        assert list(bar) == [0, 1, 2]


def test_live_logs_that_fail_to_start_leave_the_run_folder_unlocked(sample_betons, tmp_path,
                                                                     monkeypatch):
    """W&B failing to start (e.g. offline without an API key) after the run folder was made and
    locked: the error comes out, and the folder's lock is given back, so that --resume on any
    machine can continue it (a lock left by a job on another host is refused)."""
    from imagenet_ffcv import train

    def wandb_fails(*args, **kwargs):
        raise RuntimeError('wandb.init failed')
    monkeypatch.setattr(train, 'LiveLog', wandb_fails)
    with pytest.raises(RuntimeError, match='wandb.init failed'):
        train.cli(['--config', 'rn18_configs/rn18_16_epochs.yaml',
                   f'--data.train_dataset={sample_betons["train"]}',
                   f'--data.val_dataset={sample_betons["val"]}', '--data.num_workers=2',
                   '--training.epochs=1', '--lr.lr_peak_epoch=0.5', '--training.batch_size=64',
                   f'--logging.folder={tmp_path}'])
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run_dir / 'params.json').exists() and not (run_dir / 'lock').exists()


def test_live_logs_that_fail_to_close_leave_the_run_folder_unlocked(sample_betons, tmp_path,
                                                                    monkeypatch):
    """W&B or TensorBoard failing as the live logs close (W&B's finish with the network gone):
    the error comes out, and the run folder's lock was given back before (it was left behind, so
    that a later --resume on another host was refused); also when train.main is called while
    its caller handles another exception (sys.exc_info() took that for the run's end). When an
    error ends the run, the close is quiet, so that error is the one raised."""
    from imagenet_ffcv import loggers

    def close_fails(self, quiet=False):
        if not quiet:
            raise RuntimeError('wandb.finish failed')
    monkeypatch.setattr(loggers.LiveLog, 'close', close_fails)
    with pytest.raises(RuntimeError, match='wandb.finish failed'):
        train.cli(small_args(sample_betons, tmp_path / 'a', '--training.epochs=1'))
    [run_dir] = [p for p in (tmp_path / 'a').iterdir() if p.is_dir()]
    assert (run_dir / 'final_weights.pt').exists() and not (run_dir / 'lock').exists()
    try:
        raise ValueError('handled by the caller')
    except ValueError:
        with pytest.raises(RuntimeError, match='wandb.finish failed'):
            train.main(small_config(sample_betons, tmp_path / 'b', '--training.epochs=1'))

    def full_disk(*args):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(train, 'write_results', full_disk)
    with pytest.raises(OSError, match='No space left'):
        train.main(small_config(sample_betons, tmp_path / 'c', '--training.epochs=1'))


def test_train_and_val_betons_from_different_class_lists_are_refused(sample_betons, tmp_path):
    """A val .beton written from another train split (other class list) would shift labels. One
    of some of the training classes (a test set written with --classes, ImageNet-R's) is for
    eval-only: said so (not "written from different train splits")."""
    import shutil
    val = tmp_path / 'val.beton'
    shutil.copy(sample_betons['val'], val)
    classes = read_class_list(class_list_path(sample_betons['val']))
    write_class_list(class_list_path(val), classes[1:] + classes[:1])
    from imagenet_ffcv.classes import ClassListError  # the command's one line, not a traceback
    with pytest.raises(ClassListError, match='differ'):
        betons.num_classes(sample_betons['train'], val_path=val)
    write_class_list(class_list_path(val), classes[:3])
    with pytest.raises(ClassListError) as e:
        betons.num_classes(sample_betons['train'], val_path=val)
    assert str(e.value) == (f'{val} holds 3 of the 10 classes of {sample_betons["train"]} (a test '
                            f'set written with --classes): validate on a .beton of all of them, '
                            f'and evaluate the weights on this one alone, in an eval-only run')
    assert betons.num_classes(sample_betons['train'], val_path=sample_betons['val']) == 10


def test_a_val_beton_of_more_classes_than_the_training_one_is_refused_at_the_start(sample_betons,
                                                                                  tmp_path):
    """ffcv-imagenet's ``write_imagenet.py --subset N`` (the first N images: a few classes) beside
    a whole val split, neither with a class list: the run trained on and failed at its first
    validation ("IndexError: Target 3 is out of bounds"; with log_level 0, after the whole run).
    It is refused at the start naming both files, class list beside the training .beton or not."""
    import shutil
    from imagenet_ffcv import sources, writer
    from imagenet_ffcv.classes import ClassListError
    val = tmp_path / 'val.beton'
    shutil.copy(sample_betons['val'], val)
    train = tmp_path / 'train.beton'
    classes = sources.find_classes(SAMPLE / 'train')
    writer.write_beton([s for s in sources.list_samples(SAMPLE / 'train', classes) if s[1] < 3],
                       train, max_res=32, num_workers=1)
    message = (f'{val} holds labels up to 9, and {train} has 3 classes (0..2): the val images of '
               'the others could never be predicted right')
    with pytest.raises(ClassListError, match=message.replace('(', r'\(').replace(')', r'\)')):
        betons.num_classes(train, val_path=val, warn=False)
    write_class_list(class_list_path(train), classes[:3])
    with pytest.raises(ClassListError, match='holds labels up to 9'):
        betons.num_classes(train, val_path=val, warn=False)
    assert betons.num_classes(sample_betons['train'], val_path=val, warn=False) == 10
    # a damaged val file is named, as its loader names it, not "file format mismatch"
    from imagenet_ffcv.verify import CorruptBetonError
    val.write_bytes(val.read_bytes()[:5000])
    with pytest.raises(CorruptBetonError, match=f'{val}: '):
        betons.num_classes(sample_betons['train'], val_path=val, warn=False)


def test_a_beton_copied_without_its_class_list_trains_with_a_warning(sample_betons, tmp_path,
                                                                     recwarn):
    """A .beton copied to scratch without NAME.classes.tsv trained without a word: no class
    list check against val, no classes.tsv in the run, and predict refusing to name classes at
    the end. It still trains (labels 0..N-1), with a warning naming the file to copy."""
    import shutil
    train = tmp_path / 'copied.beton'
    shutil.copy(sample_betons['train'], train)
    assert betons.num_classes(sample_betons['train'], val_path=sample_betons['val']) == 10
    assert not recwarn.list
    assert betons.num_classes(train, val_path=sample_betons['val']) == 10
    assert [str(w.message) for w in recwarn.list] == [
        f'{train}: no class list beside it (copied.classes.tsv, written with it by '
        'imagenet-ffcv-write): its classes are labels 0..N-1 alone, checked against no other '
        '.beton or weights and named nowhere; copy it with the .beton']
    assert betons.num_classes(train, val_path=sample_betons['val'], warn=False) == 10
    assert len(recwarn.list) == 1
    # the val .beton copied without its class list: warned of too (a val .beton of another data
    # set's classes trained on without a word, its top-1 reported)
    recwarn.clear()
    val = tmp_path / 'v.beton'
    shutil.copy(sample_betons['val'], val)
    assert betons.num_classes(sample_betons['train'], val_path=val) == 10
    assert [str(w.message) for w in recwarn.list] == [
        f'{val}: no class list beside it (v.classes.tsv, written with it by imagenet-ffcv-write): '
        'its classes are labels 0..N-1 alone, checked against no other .beton or weights and '
        'named nowhere; copy it with the .beton']


def test_a_beton_that_is_not_there_is_named_by_its_key_and_where_it_was_looked_for(
        sample_betons, tmp_path, monkeypatch, capsys):
    """A val .beton forgotten on the command line, its path then from a --config file
    (demo_out/val_128.beton), was told as ".beton file not found" under a name the user never
    typed, and a relative path without the folder it was looked for in."""
    monkeypatch.chdir(tmp_path)
    args = small_args(sample_betons, tmp_path / 'runs', '--data.val_dataset=demo_out/val.beton')
    assert train.cli(args) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and (f'data.val_dataset=demo_out/val.beton: .beton file not '
                                     f'found, looked for in {tmp_path};') in err, err
    assert not (tmp_path / 'runs').exists()
    # the images' folder given for the training .beton: named by its key too (it was not)
    assert train.cli(small_args(sample_betons, tmp_path / 'runs',
                                f'--data.train_dataset={SAMPLE / "train"}')) == 1
    assert (f'data.train_dataset={SAMPLE / "train"}: a folder, not a .beton file; write one from '
            f'its images with imagenet-ffcv-write --data-dir {SAMPLE} --split train --out '
            f'FILE.beton\n') in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()


def test_a_process_cache_larger_than_the_memory_is_refused_before_any_work(sample_betons,
                                                                           tmp_path, monkeypatch,
                                                                           capsys):
    """data.in_memory=0 (ffcv's process cache) keeps about the whole training .beton in each
    process (random order: every page stays from its first batch to its last), so a file times
    the node's processes above the available memory is a one-line error before any work,
    naming data.in_memory=1; it was an out-of-memory kill late in the first epoch."""
    from imagenet_ffcv import preflight
    size = os.path.getsize(sample_betons['train'])
    cfg = small_config(sample_betons, tmp_path, '--data.in_memory=0')
    with pytest.raises(config.ConfigError, match=r'8 process\(es\).*Set data.in_memory=1'):
        preflight.check_process_cache(cfg, 8, available=8 * size - 1)
    preflight.check_process_cache(cfg, 8, available=8 * size)
    preflight.check_process_cache(small_config(sample_betons, tmp_path, '--data.in_memory=1'), 8,
                                  available=0)
    monkeypatch.setattr(preflight.psutil, 'virtual_memory',
                        lambda: SimpleNamespace(available=size - 1))
    assert train.cli(small_args(sample_betons, tmp_path / 'runs', '--data.in_memory=0')) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'data.in_memory=0' in err and 'GB are available' in err, err
    assert not (tmp_path / 'runs').exists()


def test_several_cuda_processes_of_a_node_are_warned_of_a_small_dev_shm(sample_betons, tmp_path,
                                                                         monkeypatch):
    """NCCL keeps the buffers between a node's processes in /dev/shm and fails to start with too
    little (NVIDIA's NCCL guide: a Docker container's 64 MiB; --shm-size=1g): a warning before
    NCCL starts (here the set-up fails as NCCL would), for several processes on CUDA only, from
    one process of each node; not with the 1 GiB advised, part of it in use (the check needs no
    GPU)."""
    import shutil
    import warnings
    import torch
    from imagenet_ffcv import distributed
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: SimpleNamespace(
        total=64 * 2 ** 20, used=0, free=64 * 2 ** 20) if str(p) == '/dev/shm' else usage(p))

    class NcclFailed(Exception):
        pass

    def fail(*args, **kwargs):
        raise NcclFailed
    monkeypatch.setattr(distributed, 'setup', fail)
    cfg = small_config(sample_betons, tmp_path)
    for device, local_rank, processes, warned in [('cuda', 0, 8, True), ('cuda', 1, 8, False),
                                                  ('cuda', 0, 1, False), ('cpu', 0, 8, False)]:
        monkeypatch.setattr(distributed, 'from_env', lambda: distributed.DistInfo(
            rank=local_rank, world_size=processes, local_rank=local_rank,
            device=torch.device(device), local_world_size=processes))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            with pytest.raises(NcclFailed):
                train.main(cfg)
        assert [str(w.message) for w in caught] == (
            ['/dev/shm holds 64 MiB: NCCL keeps the buffers between the 8 processes of this node '
             "there and fails to start with too little; NVIDIA's NCCL guide gives a container "
             'docker run --shm-size=1g --ulimit memlock=-1'] if warned else []), device
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: SimpleNamespace(
        total=2 ** 30, used=2 ** 20, free=2 ** 30 - 2 ** 20))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(NcclFailed):
        warnings.simplefilter('always')
        monkeypatch.setattr(distributed, 'from_env', lambda: distributed.DistInfo(
            rank=0, world_size=8, local_rank=0, device=torch.device('cuda'), local_world_size=8))
        train.main(cfg)
    assert caught == []


def test_the_memory_available_counts_a_cgroup_limit(tmp_path, monkeypatch):
    """Under a cgroup memory limit (SLURM's --mem, a container's), v2 or v1, the memory this
    process may take is the limit less what is in use but the page cache (active, as a .beton
    that several ranks read, or inactive), the least over its cgroup and those above it; psutil
    alone sees the whole machine's."""
    from imagenet_ffcv import preflight
    gib = 2 ** 30
    machine = 100 * gib
    monkeypatch.setattr(preflight.psutil, 'virtual_memory', lambda: SimpleNamespace(
        available=machine))
    v2 = tmp_path / 'v2'
    for folder, limit in (('job_1', 5 * gib), ('job_1/step_0', 'max')):  # 4 GiB in use
        (v2 / folder).mkdir(parents=True)
        (v2 / folder / 'memory.max').write_text(f'{limit}\n')
        (v2 / folder / 'memory.current').write_text(f'{4 * gib}\n')
        (v2 / folder / 'memory.stat').write_text(
            f'anon {2 * gib}\nactive_file {gib}\ninactive_file {gib}\n')
    (tmp_path / 'cgroup2').write_text('0::/job_1/step_0\n')
    assert preflight.memory_available(tmp_path / 'cgroup2', v2) == 3 * gib
    v1 = tmp_path / 'v1'
    (v1 / 'memory' / 'slurm' / 'job_2').mkdir(parents=True)
    for name, value in (('memory.limit_in_bytes', 3 * gib), ('memory.usage_in_bytes', 2 * gib),
                        ('memory.stat', f'cache {gib}\ntotal_active_file {gib // 4}\n'
                                        f'total_inactive_file {gib // 4}')):
        (v1 / 'memory' / 'slurm' / 'job_2' / name).write_text(f'{value}\n')
    (tmp_path / 'cgroup1').write_text('5:cpuset:/\n4:memory:/slurm/job_2\n0::/\n')
    assert preflight.memory_available(tmp_path / 'cgroup1', v1) == min(machine, gib + gib // 2)
    (tmp_path / 'none').write_text('0::/\n')
    assert preflight.memory_available(tmp_path / 'none', tmp_path / 'empty') == machine
    assert preflight.memory_available(tmp_path / 'missing') == machine


def test_the_run_header_warns_of_settings_that_do_nothing(sample_betons, tmp_path, capsys):
    """The header of a run with AdamW and a momentum (read by SGD only) names the momentum; the
    rules are config_warnings.USED_ONLY_WITH (tests/test_config.py)."""
    from imagenet_ffcv import distributed
    run = train.build(small_config(sample_betons, tmp_path, '--training.optimizer=adamw',
                                   '--training.momentum=0.8'), distributed.from_env(), 0.0)
    capsys.readouterr()
    train.open_run_dir(run, None).unlock()
    out = capsys.readouterr().out
    assert ('=> warning: training.momentum=0.8 does nothing here: it is used only with '
            'training.optimizer=sgd\n') in out
    assert out.count('warning') == 1 and ', decoder fused with ' in out


def test_the_run_header_says_when_the_region_decoder_is_not_built(sample_betons, tmp_path,
                                                                   monkeypatch, capsys):
    """Without the built C part the fused decoders decode whole JPEGs (a warning said so), and
    the header still said "decoder fused" as if it were."""
    from imagenet_ffcv import distributed, jpeg_region
    run = train.build(small_config(sample_betons, tmp_path), distributed.from_env(), 0.0)
    monkeypatch.setattr(jpeg_region, 'region_decoder', lambda: None)
    capsys.readouterr()
    train.open_run_dir(run, None).unlock()
    assert ', decoder fused (whole JPEGs: its C part is not built) with ' in \
        capsys.readouterr().out


def test_a_model_that_cannot_take_the_runs_batches_is_refused_before_any_work(sample_betons,
                                                                              tmp_path, capsys):
    """torchvision's ViT at 32 px (it takes 224 alone), and a ResNet's BatchNorm given batches of
    one 32 px image, failed with a traceback at the first batch, after the run folder was made;
    a forward pass on the meta device finds both first. ViT at 224 px passes."""
    from imagenet_ffcv import config, preflight
    args = small_args(sample_betons, tmp_path / 'runs', '--model.arch=vit_b_16')
    assert train.cli(args) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and ("model.arch=vit_b_16 cannot take the run's training batches "
                                     "of 32 image(s) at 32 px (AssertionError: Wrong image "
                                     "height! Expected 224 but got 32!): give it sides "
                                     "(resolution.*, validation.resolution) and batches it takes, "
                                     "or another arch") in err, err
    assert not (tmp_path / 'runs').exists()
    with pytest.raises(config.ConfigError, match=r"resnet18 cannot take the run's training "
                                                 r"batches of 1 image\(s\) at 32 px "
                                                 r"\(ValueError: Expected more than 1 value"):
        preflight.check_model_takes(small_config(sample_betons, tmp_path,
                                                 '--training.batch_size=1'))
    # SyncBatchNorm takes batches of one image on each of several processes
    preflight.check_model_takes(small_config(sample_betons, tmp_path, '--training.batch_size=1',
                                             '--training.sync_bn=1'))
    preflight.check_model_takes(small_config(sample_betons, tmp_path, '--model.arch=vit_b_16',
                                             *(f'--{key}=224' for key in (
                                                 'resolution.min_res', 'resolution.max_res',
                                                 'validation.resolution'))))
