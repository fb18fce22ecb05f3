"""Multi-process faults with torchrun on CPU (gloo): two "nodes" on localhost, a rank that dies, a
rank that hangs. Each run trains ResNet-18 at 32 px on the sample betons."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, run_env

pytestmark = pytest.mark.slow


def trainer_args(betons, out, *extra, signal_at=None, pause_at=None, full_disk_in=None):
    """tests/torchrun_main.py's arguments; ``signal_at``: its ``NAME:EPOCH:STEP:RANK``,
    ``pause_at``: its ``SECONDS:EPOCH:STEP:RANK``; ``full_disk_in``: its ``--full-disk-in``."""
    actions = ([f'--full-disk-in={full_disk_in}'] if full_disk_in else []) + (
        [f'--send-signal={signal_at}'] if signal_at else []) + (
        [f'--pause={pause_at}'] if pause_at else [])
    return ['tests/torchrun_main.py', str(out), *actions,
            f'--data.train_dataset={betons["train"]}',
            f'--data.val_dataset={betons["val"]}', '--data.num_workers=1',
            f'--logging.folder={out}', '--model.arch=resnet18', '--training.batch_size=16',
            '--lr.lr_peak_epoch=0.5', '--resolution.min_res=32', '--resolution.max_res=32',
            '--validation.resolution=32', '--validation.batch_size=32', *extra]


def torchrun_env(out, **extra) -> dict:
    """run_env() with TMPDIR in a folder beside ``out``, which pytest removes: each torchrun start
    leaves a torchelastic_* folder in TMPDIR (eight in /tmp after each run of the suite)."""
    tmp = Path(f'{out}-tmp')
    tmp.mkdir(exist_ok=True)
    return dict(run_env(), TMPDIR=str(tmp), **extra)


def node(node_rank, port, args, *torchrun_options):
    """One torchrun launcher, node ``node_rank`` of 2, one process, c10d rendezvous on localhost
    (the README's multi-node launch line); ``args``: :func:`trainer_args`'s."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node-rank={node_rank}',
           '--nproc_per_node=1', '--rdzv-backend=c10d', f'--rdzv-endpoint=localhost:{port}',
           '--rdzv-id=test', *torchrun_options] + args
    return subprocess.Popen(cmd, cwd=REPO, env=torchrun_env(args[1]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f'{path} did not appear'
        time.sleep(0.2)


def wait_training(out, timeout=300):
    """Wait until rank 0 has logged its first epoch (both ranks are in the training loop)."""
    deadline = time.time() + timeout
    while not list(out.glob('*/log.jsonl')):
        assert time.time() < deadline, 'training did not start'
        time.sleep(0.2)


# One epoch of two ranks, with checkpoints within the epoch and --resume auto (the long-job launch
# line): the two-node run below, and the reference of the restart test.
TWO_RANKS = ('--training.epochs=1', '--lr.lr=0.1', '--checkpoint.every_iters=3', '--resume=auto',
             '--training.mixup_alpha=0.2')  # random draws on each rank, kept across a restart


@pytest.fixture(scope='module')
def two_node_run(sample_betons, tmp_path_factory):
    """The two-node run's rank summaries (two torchrun launchers on localhost)."""
    out = tmp_path_factory.mktemp('two_nodes')
    port = free_port()
    args = trainer_args(sample_betons, out, *TWO_RANKS)
    nodes = [node(0, port, args), node(1, port, args)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    return [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]


def test_two_nodes_on_localhost_train_in_sync(two_node_run):
    """The two ranks end with bit-identical weights and BN statistics, each having drawn its own
    random numbers (MixUp); validation counts each of the 100 val images exactly once; only rank
    0 writes a run folder, with one epoch logged."""
    ranks = two_node_run
    assert ranks[0]['weights_sha256'] == ranks[1]['weights_sha256']
    assert ranks[0]['next_random'] != ranks[1]['next_random']  # each rank its own draws
    assert ranks[0]['val_count'] == ranks[1]['val_count'] == 100
    assert ranks[0]['top_1'] == ranks[1]['top_1']
    writers = [r for r in ranks if r['run_dir'] is not None]
    assert len(writers) == 1  # rank 0, whichever node it ran on
    log = [json.loads(line) for line in open(f'{writers[0]["run_dir"]}/log.jsonl')]
    assert len(log) == 1 and log[0]['val_count'] == 100


# Each line is one write to the pipe the two ranks share: print, unbuffered (PYTHONUNBUFFERED),
# writes the text and its newline apart, and the other rank's line could fall between them (a
# fresh clone's run read 'rank 0: ...rank 1: ...' and an empty line).
ON_RANK_0 = """
import os
import torch.distributed
from imagenet_ffcv import distributed
info = distributed.from_env()
distributed.setup(info, timeout_s=60)


def fails():
    raise ValueError('no such checkpoint')


def say(text):
    os.write(1, f'rank {info.rank}: {text}\\n'.encode())


try:
    distributed.on_rank_0(fails)
except Exception as e:
    say(f'{type(e).__name__}: {e}')
say(distributed.on_rank_0(lambda: 42))
shared = os.path.join(os.environ['OUT'], 'params.json')
if info.rank == 0:
    open(shared, 'w').close()
distributed.check_every_rank_sees(shared if info.rank == 0 else None)
say('all see it')
if info.rank == 1:  # a run folder on rank 0's node alone, as rank 1's node sees it
    distributed.os.path.exists = lambda path: False
try:
    distributed.check_every_rank_sees(shared if info.rank == 0 else None, wait_s=1)
except Exception as e:
    say(f'{type(e).__name__}: {e}')
torch.distributed.barrier()
distributed.cleanup()
"""


def test_what_fails_on_rank_0_alone_is_raised_on_every_rank(tmp_path):
    """distributed.on_rank_0 (the trainer's checkpoint lookup, run folder and live logs): rank 0's
    error is raised there and, naming it, on rank 1, which would otherwise wait in its next
    collective; a result comes back on rank 0 only. distributed.check_every_rank_sees (the run
    folder's params.json, which rank 0 has just written): a rank that does not find it (a run
    folder on one node's own disk, which a requeue with rank 0 on another node would start over
    from epoch 0) fails every rank, naming it."""
    script = tmp_path / 'on_rank_0.py'
    script.write_text(ON_RANK_0)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                           f'--master_port={free_port()}', str(script)], cwd=REPO,
                          env=torchrun_env(tmp_path, OUT=str(tmp_path)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = set(proc.stdout.splitlines())
    assert {'rank 0: ValueError: no such checkpoint', 'rank 0: 42', 'rank 1: None',
            'rank 1: RankZeroError: rank 0 failed: ValueError: no such checkpoint',
            'rank 0: all see it', 'rank 1: all see it'} <= lines
    host = socket.gethostname()
    error = (f'NotSharedError: {tmp_path / "params.json"}, written by rank 0 on {host}, is not '
             f'found by rank 1 on {host}: the run folder must be on a filesystem every node shares')
    assert [line for line in lines if 'NotSharedError' in line and error in line] != []
    assert {line.split(':')[0] for line in lines if 'NotSharedError' in line} == {'rank 0',
                                                                                  'rank 1'}


@pytest.mark.parametrize('writing', ['_write_checkpoint', 'write_results'])
def test_a_full_disk_as_rank_0_writes_fails_every_rank_at_once(sample_betons, tmp_path, writing):
    """Rank 0 alone writes a checkpoint, and the finished run's results and final weights; the
    ranks then agree on a signal that came meanwhile (a collective). A full disk there ended rank
    0, and rank 1 failed in that collective with 'Connection closed by peer' (with NCCL it would
    wait for the timeout): each rank now names rank 0's error."""
    start = time.time()
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                           f'--master_port={free_port()}',
                           *trainer_args(sample_betons, tmp_path, '--training.epochs=1',
                                         '--dist.timeout_s=120', full_disk_in=writing)],
                          cwd=REPO, env=torchrun_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and time.time() - start < 120
    assert 'RankZeroError: rank 0 failed: OSError: [Errno 28] No space left on device' in \
        proc.stderr, proc.stderr[-3000:]
    assert 'Connection closed by peer' not in proc.stderr


def test_a_dead_rank_makes_the_job_fail_quickly(sample_betons, tmp_path):
    """SIGKILL one of two ranks (one launcher, two processes): the job ends non-zero, not hangs."""
    proc = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
         f'--master_port={free_port()}'] + trainer_args(sample_betons, tmp_path,
                                                        '--training.epochs=50'),
        cwd=REPO, env=torchrun_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        wait_training(tmp_path)
        os.kill(int((tmp_path / 'pid1').read_text()), signal.SIGKILL)
        killed = time.time()
        proc.communicate(timeout=120)
        assert proc.returncode != 0 and time.time() - killed < 120
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_hung_rank_makes_the_other_node_fail_within_the_timeout(sample_betons, tmp_path):
    """SIGSTOP the process of node 1 (alive, connections open, never answering): node 0's rank
    gives up after dist.timeout_s (20 s here) and its launcher exits non-zero, where the default
    gloo timeout would keep it waiting for 30 minutes."""
    port = free_port()
    args = trainer_args(sample_betons, tmp_path, '--training.epochs=50', '--dist.timeout_s=20')
    nodes = [node(0, port, args), node(1, port, args)]
    try:
        wait_training(tmp_path)
        wait_for(tmp_path / 'pid1')
        stopped_pid = int((tmp_path / 'pid1').read_text())
        # c10d assigns ranks by arrival: wait on the launcher that is not rank 1's parent.
        parent = int(open(f'/proc/{stopped_pid}/stat').read().rsplit(')', 1)[1].split()[1])
        [other] = [p for p in nodes if p.pid != parent]
        os.kill(stopped_pid, signal.SIGSTOP)
        stopped = time.time()
        out = other.communicate(timeout=120)[0]
        assert other.returncode != 0 and time.time() - stopped < 120
        # gloo's words for its timeout depend on the collective it was in: 'Timed out waiting
        # ...' in a receive, 'Application timeout caused pair closure' in DDP's broadcast
        assert re.search(r'timed out|application timeout', out, re.I), out[-3000:]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        try:
            os.kill(stopped_pid, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass


def test_torchrun_restarts_a_killed_worker_on_either_node_and_the_run_ends_as_an_uninterrupted_one(
        sample_betons, tmp_path, two_node_run):
    """The long-job launch line (README) on two nodes: torchrun --max-restarts=1 ... --resume auto
    with checkpoints within epochs. Rank 1 is killed (SIGKILL) while it trains step 4 (from 0) of
    the first attempt, after the checkpoint of iteration 3, and rank 0 is then busy outside any
    collective: so the killed rank's launcher restarts its worker for its failure
    (TORCHELASTIC_RESTART_COUNT 1), the other launcher for the other node's (a membership change,
    which keeps its count at 0), and the new workers of both still meet at once. They resume from
    that checkpoint, and the job ends with exit 0, each epoch logged once, and the final weights of
    the uninterrupted two-node run (the batches are a function of the seed: crops.py)."""
    port = free_port()
    args = trainer_args(sample_betons, tmp_path, *TWO_RANKS, signal_at='SIGKILL:0:4:1',
                        pause_at='120:0:4:0')
    nodes = [node(n, port, args, '--max-restarts=1') for n in (0, 1)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert sorted(r['restart_count'] for r in ranks) == [0, 1]  # one start after the first
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert f'=> resuming {run_dir} at epoch 0, iteration 3' in outs[0] + outs[1]
    log = [json.loads(line) for line in open(run_dir / 'log.jsonl')]
    assert [r['epoch'] for r in log] == [0]
    assert ranks[0]['weights_sha256'] == ranks[1]['weights_sha256']
    assert ranks[0]['weights_sha256'] == two_node_run[0]['weights_sha256']
