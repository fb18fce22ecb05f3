"""Runs train.main in this process (alone, or as one rank under torchrun) for the tests
that stop or kill a run: writes this rank's process id to OUT_DIR/pid<RANK> when it starts and its
summary (weights hash, val count, top-1, a draw of torch's generator after the run) to
OUT_DIR/rank<RANK>.json at the end, and exits with the run's exit code.

    python tests/torchrun_main.py OUT_DIR [--full-disk-in=FUNCTION]
        [--send-signal=NAME:EPOCH:STEP:RANK] [--pause=SECONDS:EPOCH:STEP:RANK] --section.key=...
    torchrun --nproc_per_node=2 tests/torchrun_main.py OUT_DIR ...

``--send-signal=SIGKILL:2:5:0`` sends signal NAME to rank RANK's own process while it trains step
STEP (a batch, counted from 0 within the epoch) of epoch EPOCH, at the job's first start only (no
pid file of that rank in OUT_DIR yet; TORCHELASTIC_RESTART_COUNT is per node): a test then knows
where the run was when the signal arrived, rather than guessing it from the time.
``--pause=120:2:5:1`` makes rank RANK wait there instead, outside any collective (busy, not dead,
while another rank dies), until SECONDS have passed or SIGTERM (torchrun stopping it) has come, on
which it exits at once with 128 + 15. With both, the signal waits until every rank named by
``--pause`` is in its pause (OUT_DIR/paused<RANK>), so that none of them is still in a collective
of the step before. ``--full-disk-in=write_results``: rank 0's writing of the finished run's
results and final weights (``train.write_results``; or of a checkpoint, ``_write_checkpoint``)
fails as a full disk makes it fail.
"""
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from imagenet_ffcv import config, engine, train  # noqa: E402


def pause(seconds: float, marker: Path) -> None:
    """Write ``marker``, then wait ``seconds`` outside any collective, or until SIGTERM comes: then
    exit with 143."""
    previous = signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
    marker.touch()
    time.sleep(seconds)
    signal.signal(signal.SIGTERM, previous)


def send_signal(name: str, after: list) -> None:
    """Send signal ``name`` to this process once every path in ``after`` exists."""
    while not all(path.exists() for path in after):
        time.sleep(0.05)
    os.kill(os.getpid(), getattr(signal, name))


def at_step(action, epoch: int, step: int) -> None:
    """Make ``engine``'s training loop call ``action()`` as step ``step`` of ``epoch`` starts (a
    resumed epoch counts the steps it skips)."""
    where = {'epoch': None, 'step': 0}
    train_one_epoch, forward_backward = engine.train_one_epoch, engine.forward_backward

    def counting_epoch(**kwargs):
        where.update(epoch=kwargs['epoch'], step=kwargs.get('start_iteration', 0))
        return train_one_epoch(**kwargs)

    def acting_step(**kwargs):
        if (where['epoch'], where['step']) == (epoch, step):
            action()
        where['step'] += 1
        return forward_backward(**kwargs)

    engine.train_one_epoch, engine.forward_backward = counting_epoch, acting_step


if __name__ == '__main__':
    out_dir, args = Path(sys.argv[1]), sys.argv[2:]
    rank = os.environ.get('RANK', '0')
    first_start = not (out_dir / f'pid{rank}').exists()
    (out_dir / f'pid{rank}').write_text(str(os.getpid()))
    actions = []
    if args and args[0].startswith('--full-disk-in='):
        def full_disk(*_):
            raise OSError(errno.ENOSPC, 'No space left on device')
        setattr(train, args.pop(0).split('=', 1)[1], full_disk)
    while args and args[0].startswith(('--send-signal=', '--pause=')):
        option, value = args.pop(0).split('=', 1)
        actions.append((option, *value.split(':')))
    paused = [out_dir / f'paused{r}' for option, *_, r in actions if option == '--pause']
    for option, what, epoch, step, action_rank in actions:
        if option == '--send-signal':
            action = lambda name=what: send_signal(name, paused)  # noqa: E731
        else:
            action = lambda s=float(what): pause(s, out_dir / f'paused{rank}')  # noqa: E731
        if rank == action_rank and first_start:
            at_step(action, int(epoch), int(step))
    summary = train.main(config.load_config(args))
    summary['next_random'] = torch.rand(()).item()  # the rank's generator after the run
    summary['restart_count'] = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
    (out_dir / f'rank{rank}.json').write_text(json.dumps(summary))
    sys.exit(summary.get('exit_code', 0))
