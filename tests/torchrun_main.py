"""Runs train.main in this process (alone, or as one rank under torchrun) for the tests
that stop or kill a run: writes this rank's process id to OUT_DIR/pid<RANK> when it starts and its
summary (weights hash, val count, top-1, a draw of torch's generator after the run) to
OUT_DIR/rank<RANK>.json at the end, and exits with the run's exit code.

    python tests/torchrun_main.py OUT_DIR [--send-signal=NAME:EPOCH:STEP:RANK] --section.key=...
    torchrun --nproc_per_node=2 tests/torchrun_main.py OUT_DIR ...

``--send-signal=SIGKILL:2:5:0`` sends signal NAME to rank RANK's own process while it trains step
STEP (a batch, counted from 0 within the epoch) of epoch EPOCH, on torchrun's first attempt only:
a test then knows where the run was when the signal arrived, rather than guessing it from the
time.
"""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from imagenet_ffcv import config, engine, train  # noqa: E402


def signal_at(name: str, epoch: int, step: int) -> None:
    """Make ``engine``'s training loop send ``name`` to this process as step ``step`` of ``epoch``
    starts (a resumed epoch counts the steps it skips)."""
    where = {'epoch': None, 'step': 0}
    train_one_epoch, forward_backward = engine.train_one_epoch, engine.forward_backward

    def counting_epoch(**kwargs):
        where.update(epoch=kwargs['epoch'], step=kwargs.get('start_iteration', 0))
        return train_one_epoch(**kwargs)

    def signalling_step(**kwargs):
        if (where['epoch'], where['step']) == (epoch, step):
            os.kill(os.getpid(), getattr(signal, name))
        where['step'] += 1
        return forward_backward(**kwargs)

    engine.train_one_epoch, engine.forward_backward = counting_epoch, signalling_step


if __name__ == '__main__':
    out_dir, args = Path(sys.argv[1]), sys.argv[2:]
    rank = os.environ.get('RANK', '0')
    (out_dir / f'pid{rank}').write_text(str(os.getpid()))
    if args and args[0].startswith('--send-signal='):
        name, epoch, step, signal_rank = args.pop(0).split('=', 1)[1].split(':')
        if rank == signal_rank and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0':
            signal_at(name, int(epoch), int(step))
    summary = train.main(config.load_config(args))
    summary['next_random'] = torch.rand(()).item()  # the rank's generator after the run
    (out_dir / f'rank{rank}.json').write_text(json.dumps(summary))
    sys.exit(summary.get('exit_code', 0))
