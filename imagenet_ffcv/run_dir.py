"""A run's folder, ``LOGGING_FOLDER/<run id>/``, and everything in it:

- ``params.json``: the resolved config, with the code's git commit (written once, atomically);
- ``classes.tsv``: the class list of the training .beton (for ``imagenet-ffcv-predict``);
- ``log.jsonl``: one JSON record per epoch, appended; on resume, cut back to the checkpoint's epoch;
- ``checkpoint.pt``: where the run stands (``checkpoint``); ``final_weights.pt`` and
  ``final_weights.safetensors`` once it finished;
- ``progress.png``: the run's plot.

A run is *finished* when ``final_weights.pt`` exists; ``--resume auto`` picks the latest
unfinished one (:func:`latest_unfinished_checkpoint`).
"""
import json
import shutil
import subprocess
import uuid
from datetime import datetime
from pathlib import Path

from .files import remove_stale_temporaries, write_text_atomic

CHECKPOINT_NAME = 'checkpoint.pt'
FINAL_WEIGHTS_NAME = 'final_weights.pt'
REPO = Path(__file__).resolve().parents[1]


class RunDir:
    """The folder of one run; rank 0 alone writes in it."""

    def __init__(self, path):
        self.path = Path(path)
        self.params = self.path / 'params.json'
        self.classes = self.path / 'classes.tsv'
        self.log = self.path / 'log.jsonl'
        self.checkpoint = self.path / CHECKPOINT_NAME
        self.final_weights = self.path / FINAL_WEIGHTS_NAME
        self.final_safetensors = self.final_weights.with_suffix('.safetensors')
        self.plot = self.path / 'progress.png'
        self.final_weights_ema = self.path / 'final_weights_ema.pt'  # training.ema_decay > 0
        self.best_weights = self.path / 'best_weights.pt'  # checkpoint.keep_best=1

    @classmethod
    def create(cls, folder, *, params: dict, class_list=None) -> 'RunDir':
        """A new run folder ``folder/<date-time-random>/`` holding ``params.json`` (``params``)
        and, when ``class_list`` exists, a copy of it as ``classes.tsv``."""
        run_id = datetime.now().strftime('%Y%m%d-%H%M%S-') + uuid.uuid4().hex[:6]
        run = cls(Path(folder) / run_id)
        run.path.mkdir(parents=True)
        write_text_atomic(run.params, json.dumps(params, indent=2))
        if class_list is not None and Path(class_list).exists():
            shutil.copy(class_list, run.classes)
        return run

    @classmethod
    def reopen(cls, checkpoint_path, *, epoch: int) -> 'RunDir':
        """The folder of the run being resumed from ``checkpoint_path`` at ``epoch``: the log
        records of ``epoch`` on are dropped (they were written after that checkpoint, and will be
        written again), and temporaries left by a killed save are removed."""
        run = cls(Path(checkpoint_path).parent)
        run.keep_log_until(epoch)
        remove_stale_temporaries(run.path)
        return run

    @property
    def is_finished(self) -> bool:
        return self.final_weights.exists()

    def append_log(self, record: dict) -> None:
        """Append one epoch's record (a JSON line) to ``log.jsonl``."""
        with open(self.log, 'a') as f:
            f.write(json.dumps(record) + '\n')

    def read_log(self) -> list:
        """The records of ``log.jsonl``, in order ([] when there is none)."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def keep_log_until(self, epoch: int) -> None:
        """Drop the records of ``log.jsonl`` from ``epoch`` on, so that every epoch appears once
        after a resume."""
        if self.log.exists():
            kept = [r for r in self.read_log() if r['epoch'] < epoch]
            write_text_atomic(self.log, ''.join(json.dumps(r) + '\n' for r in kept))


def latest_unfinished_checkpoint(folder):
    """The most recently written ``checkpoint.pt`` among the run folders ``folder/*/`` whose run
    is unfinished (no ``final_weights.pt`` beside it), or None when there is none."""
    candidates = [p for p in Path(folder).glob(f'*/{CHECKPOINT_NAME}')
                  if not RunDir(p.parent).is_finished]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def code_version() -> dict:
    """``{'git_commit': SHA or None, 'git_dirty': bool or None}`` of the code that runs: the
    commit of the repository holding this package, and whether its tracked files differ from it
    (None for both outside a git checkout or without git), as airbench keeps the code with its
    results."""
    def git(*args):
        return subprocess.run(['git', '-C', str(REPO), *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git('rev-parse', 'HEAD')
        if head.returncode != 0:
            return {'git_commit': None, 'git_dirty': None}
        status = git('status', '--porcelain', '--untracked-files=no')
        return {'git_commit': head.stdout.strip(), 'git_dirty': bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {'git_commit': None, 'git_dirty': None}
