"""Shared fixtures: the embedded demo sample and small .beton files written from it once."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# numba reads the two settings below when it is imported, so nothing may import it before this
# file runs (pytest does, to parse pytest.ini, if a filterwarnings line names a numba warning
# class): this process would compile at numba's default level while the runs it starts compile at
# level 0, and their results would differ in the last bit.
if 'numba' in sys.modules:
    raise RuntimeError('numba was imported before tests/conftest.py set NUMBA_OPT and '
                       'NUMBA_CACHE_DIR, which it reads at import (a filterwarnings line of '
                       'pytest.ini that names a numba warning class imports it): see conftest.py')

# numba compiles every ffcv pipeline afresh (seconds each, dozens of times in the suite): at LLVM
# optimisation level 0 it compiles about a quarter faster. The code runs slower, which the tests'
# small images do not notice, and its fastmath functions may differ from the default level's in
# the last bit: every process of the tests uses level 0 (subprocesses inherit it); benchmarks
# outside the tests run at numba's default level.
os.environ.setdefault('NUMBA_OPT', '0')
# Functions compiled with cache=True (resampling's) are cached on disk under a key that does not
# hold the optimisation level: the tests' level-0 code goes to a folder of its own, not to the
# __pycache__ that training runs and benchmarks load from. (At level 0 numba cannot cache resample
# itself, and warns so; with its cache, level 3 still made test_resume.py 10 % slower.)
os.environ.setdefault('NUMBA_CACHE_DIR', os.path.join(tempfile.gettempdir(),
                                                      f'imagenet_ffcv-tests-numba-{os.getuid()}'))
# make test runs two pytest processes, and tests start training processes, on the same cores:
# torch's OpenMP threads (libgomp) spin for a while after each parallel region by default, taking
# the cores that the other processes wait for; 'PASSIVE' makes them sleep instead
# (docs/reliability.md has the suite's times). libgomp reads it when torch loads it, so it is set
# before anything imports torch; subprocesses inherit it.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
# A process the tests start that crashes or aborts prints every thread's Python stack to its
# stderr, which the failing test shows (docs/reliability.md: an abort at exit seen once).
os.environ.setdefault('PYTHONFAULTHANDLER', '1')

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / 'demo' / 'imagenette_sample'
SHARED_DATA = REPO.parent / 'shared' / 'data'
PYTHON = sys.executable

sys.path.insert(0, str(REPO))

# What the suite's files under the temporary folder came to at their peak, with pytest.ini's
# retention policy: pytest's folders 1,539 MB, torch.compile's cache 152 MB, numba's 1 MB (du every
# 15 s through make test of a fresh clone; 2-core AMD EPYC VM, 2026-12-07, commit 24b47f0).
PEAK_DISK_MB = 1692


def pytest_sessionstart(session):
    """Stops a run of whole test folders at once, in one line, when the disk of the folder its
    tmp_path folders go in has less room than the suite takes (not after hundreds of 'No space
    left on device' errors). A run of chosen tests (-k, -m, a file) is not checked."""
    option = session.config.option
    if option.keyword or option.markexpr or not all(
            os.path.isdir(arg) for arg in session.config.args):
        return
    folder = option.basetemp or os.environ.get('PYTEST_DEBUG_TEMPROOT') or tempfile.gettempdir()
    folder = os.path.dirname(os.path.abspath(folder)) if option.basetemp else folder
    free_mb = shutil.disk_usage(folder).free // 2**20
    if free_mb < PEAK_DISK_MB:
        pytest.exit(f'the tests write up to {PEAK_DISK_MB} MB under {folder}, whose disk has '
                    f'{free_mb} MB free: free some space there, or set TMPDIR to a folder on a '
                    'disk with more room', returncode=1)


@pytest.fixture(scope='session')
def sample_betons(tmp_path_factory):
    """train.beton (340 images) and val.beton (100 images) of the demo sample, shorter side 64."""
    from imagenet_ffcv import sources, writer
    from imagenet_ffcv.classes import class_list_path, write_class_list
    out = tmp_path_factory.mktemp('betons')
    classes = sources.find_classes(SAMPLE / 'train')
    paths = {}
    for split in ('train', 'val'):
        paths[split] = out / f'{split}.beton'
        writer.write_beton(sources.list_samples(SAMPLE / split, classes), paths[split], max_res=64,
                         num_workers=2)
        write_class_list(class_list_path(paths[split]), classes)
    return paths


def free_port() -> int:
    """A TCP port of localhost that is free now (for a process group's store)."""
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def run_env():
    """Environment for subprocesses: the repo on PYTHONPATH, no tqdm noise."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED='1')
    return env


def decoder_node(loader):
    """The id of the image decoder's op in ``loader``'s pipeline graph: the op whose memory
    request holds a ``decoders.ScratchQuery``."""
    from imagenet_ffcv.decoders import ScratchQuery
    queries = loader.graph.collect_requirements()[0]['operation']
    (node,) = [n for n, q in queries.items()
               if isinstance(q, tuple) and any(isinstance(part, ScratchQuery) for part in q)]
    return node


def small_args(betons, folder, *extra) -> list:
    """The command line of a ResNet-18 run on the sample betons at 32 px (training and
    validation), small batches, 2 loader threads; ``extra`` arguments override these. (At the
    default 160 px, one CPU epoch of the 340 images took 24 s on 2 cores; at 32 px 8.5 s, mostly
    numba compiling.)"""
    return [f'--data.train_dataset={betons["train"]}', f'--data.val_dataset={betons["val"]}',
            '--data.num_workers=2', f'--logging.folder={folder}', '--model.arch=resnet18',
            '--training.batch_size=32', '--validation.batch_size=64',
            '--validation.resolution=32', '--resolution.min_res=32', '--resolution.max_res=32',
            '--lr.lr=0.1', '--lr.lr_peak_epoch=1', *extra]


def small_config(betons, folder, *extra):
    """The config of :func:`small_args`."""
    from imagenet_ffcv import config
    return config.load_config(small_args(betons, folder, *extra))


@pytest.fixture(scope='session')
def short_run(sample_betons, tmp_path_factory):
    """A 6-epoch ResNet-18 run on the sample (32 -> 64 px): ``(summary, cfg)``."""
    from imagenet_ffcv import train
    folder = tmp_path_factory.mktemp('runs')
    cfg = small_config(sample_betons, folder, '--training.epochs=6', '--resolution.min_res=32',
                       '--resolution.max_res=64', '--resolution.start_ramp=3',
                       '--resolution.end_ramp=5', '--lr.ref_batch_size=64',
                       '--lr.lr=0.05')  # 0.025 used: at 0.05 the loss rose too far after warm-up
    summary = train.main(cfg)
    return summary, cfg
