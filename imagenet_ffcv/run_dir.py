"""A run's folder, ``LOGGING_FOLDER/<run id>/``, and everything in it:

- ``params.json``: the resolved config, with the code's version (written atomically at the start,
  and again at each resume: a forced resume may change it);
- ``results.json``: the finished run's results (:meth:`RunDir.write_results`);
- ``classes.tsv``: the class list of the training .beton (for ``imagenet-ffcv-predict``);
- ``log.jsonl``: one JSON record per epoch, appended; on resume, cut back to the checkpoint's epoch;
- ``checkpoint.pt``: where the run stands (``checkpoint``); ``final_weights.pt`` and
  ``final_weights.safetensors`` once it finished (and ``final_weights_ema.pt``/``.safetensors``
  with EMA); ``best_weights.pt`` with ``checkpoint.keep_best``; a finished run resumed for more
  epochs keeps its earlier final files as ``*_epoch_<N>`` (:meth:`RunDir.reopen`);
- ``progress.png``: the run's plot;
- ``checkpoint_epoch_<N>.pt``: the checkpoints after epoch N (``checkpoint.keep_history``);
- ``lock``: who writes the run, while it runs (``run_lock``).

A run is *finished* when ``final_weights.pt`` exists; ``--resume auto`` picks the latest run of the
same run name (:func:`latest_checkpoint`), and the trainer ends at once when that run finished.
"""
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import uuid
from datetime import datetime
from pathlib import Path

from . import run_lock
from .errors import ImagenetFfcvError
from .files import remove_stale_temporaries, write_text_atomic

CHECKPOINT_NAME = 'checkpoint.pt'
FINAL_WEIGHTS_NAME = 'final_weights.pt'
REPO = Path(__file__).resolve().parents[1]
RUN_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')  # a run name is one folder-name component
RUN_FOLDER = re.compile(r'(?:(?P<name>.+)-)?\d{8}-\d{6}-[0-9a-f]{6}')  # RunDir.create's names


class RunLogError(ImagenetFfcvError):
    """A ``log.jsonl`` line that is not JSON, before its last line; the message names both."""


class RunDir:
    """The folder of one run; rank 0 alone writes in it."""

    def __init__(self, path):
        self.path = Path(path)
        self.params = self.path / 'params.json'
        self.results = self.path / 'results.json'
        self.classes = self.path / 'classes.tsv'
        self.log = self.path / 'log.jsonl'
        self.checkpoint = self.path / CHECKPOINT_NAME
        self.final_weights = self.path / FINAL_WEIGHTS_NAME
        self.final_safetensors = self.final_weights.with_suffix('.safetensors')
        self.plot = self.path / 'progress.png'
        self.final_weights_ema = self.path / 'final_weights_ema.pt'  # training.ema_decay > 0
        self.best_weights = self.path / 'best_weights.pt'  # checkpoint.keep_best=1
        self.lock_file = self.path / 'lock'

    @classmethod
    def create(cls, folder, *, params: dict, class_list=None, run_name: str = '') -> 'RunDir':
        """A new run folder ``folder/[<run_name>-]<date-time-random>/``, locked by this process
        (:meth:`lock`), holding ``params.json`` (``params``, which should hold the run name) and,
        when ``class_list`` exists, a copy of it as ``classes.tsv``. Prints a note when the latest
        run of that name in ``folder`` has a checkpoint and is unfinished (a requeued job without
        ``--resume auto`` starts over without a word)."""
        previous = latest_checkpoint(folder, run_name) if Path(folder).is_dir() else None
        if previous and not cls(previous.parent).is_finished:
            named = f' named {run_name}' if run_name else ''
            print(f'=> note: {previous.parent}, the latest run{named} here, is unfinished; this '
                  f'starts a new run (--resume auto continues that one)')
        run_id = datetime.now().strftime('%Y%m%d-%H%M%S-') + uuid.uuid4().hex[:6]  # RUN_FOLDER's
        run = cls(Path(folder) / (f'{run_name}-{run_id}' if run_name else run_id))
        run.path.mkdir(parents=True)
        run.lock()
        write_text_atomic(run.params, json.dumps(params, indent=2))
        if class_list is not None and Path(class_list).exists():
            shutil.copy(class_list, run.classes)
        return run

    @classmethod
    def reopen(cls, checkpoint_path, *, epoch: int, params: dict = None,
               loaded_ns: int = None) -> 'RunDir':
        """The folder of the run being resumed from ``checkpoint_path`` at ``epoch``: the log
        records of ``epoch`` on are dropped (they were written after that checkpoint, and will be
        written again), temporaries left by a killed save are removed, and ``params.json`` holds
        ``params`` (when given: the config the run goes on with, under the run's own name, which
        ``--resume auto`` finds it by). A finished run trained on (more epochs, another target)
        is no longer finished: its final weights and results are renamed
        ``<name>_epoch_<N>.<ext>`` (N: the epochs they hold), or a pre-empted job's ``--resume
        auto`` would find it finished and stop. It is locked first (:meth:`lock`):
        RunLockedError when another live job writes it, and nothing is touched; so too when the
        checkpoint is no longer the one loaded, ``loaded_ns`` its ``st_mtime_ns`` then (another
        job wrote it since, while this one waited for the lock)."""
        run = cls(Path(checkpoint_path).parent)
        run.lock()
        if loaded_ns is not None and Path(checkpoint_path).stat().st_mtime_ns != loaded_ns:
            run.unlock()
            raise run_lock.RunLockedError(
                f'{checkpoint_path}: written again by another job since this one loaded it (it '
                f'waited for the run\'s lock); run this job again to continue from it')
        if run.is_finished:
            run.keep_finished_aside()
        run.keep_log_until(epoch)
        remove_stale_temporaries(run.path)  # (another node's job may wait for the lock: its claim)
        # the lock is held: no other job writes the run's files, whichever node its rank 0 ran on
        remove_stale_temporaries(run.path, others_stale_s=None, kinds=('partial',))
        if params is not None:
            params = {**params, 'logging': {**params.get('logging', {}),
                                            'run_name': run.run_name}}
            write_text_atomic(run.params, json.dumps(params, indent=2))
        return run

    def keep_finished_aside(self) -> None:
        """Rename the final weights (EMA's too) and results of a finished run to
        ``<name>_epoch_<N>.<ext>``, N the epochs in its log: the run is unfinished again."""
        epochs = max((r['epoch'] + 1 for r in self.read_log()), default=0)
        finals = [self.final_weights_ema, self.final_weights_ema.with_suffix('.safetensors'),
                  self.results, self.final_safetensors, self.final_weights]  # the marker last
        for path in finals:
            if path.exists():
                os.replace(path, path.with_name(f'{path.stem}_epoch_{epochs}{path.suffix}'))
        print(f'=> {self.path} trains on from its finished end: its final weights and results of '
              f'{epochs} epochs are kept as final_weights_epoch_{epochs}.pt, ...', flush=True)

    def holds_weights(self, path) -> bool:
        """Whether ``path`` is one of the weights files a run writes in this folder: the final
        weights, EMA's and the best (``.pt`` or ``.safetensors``), or their ``_epoch_<N>`` copies
        (:meth:`keep_finished_aside`)."""
        path = Path(path)
        stems = {p.stem for p in (self.final_weights, self.final_weights_ema, self.best_weights)}
        return (path.parent == self.path and path.suffix in ('.pt', '.safetensors')
                and re.sub(r'_epoch_\d+$', '', path.stem) in stems)

    def write_results(self, summary: dict) -> None:
        """``results.json``: a finished run's results as the trainer returns them (top-1/top-5,
        time to the target, best epoch, img/s, parameters, GMACs, ...), written atomically, once
        :meth:`check_lock` has found the run's lock still this process's."""
        self.check_lock()
        write_text_atomic(self.results, json.dumps(summary, indent=2))

    @property
    def is_finished(self) -> bool:
        return self.final_weights.exists()

    @property
    def launch(self) -> dict:
        """What its params.json holds of the torchrun job that started it
        (``distributed.launch_identity``), else {}."""
        try:
            launch = json.loads(self.params.read_text()).get('launch')
        except (OSError, ValueError, AttributeError):
            return {}
        return launch if isinstance(launch, dict) else {}

    @property
    def run_name(self) -> str:
        """The run name its ``params.json`` holds ('' when unnamed); without a readable
        params.json (deleted, cut short), the one its folder's name holds
        (``[<run_name>-]<date>-<time>-<random>``), else '': one run's damaged params.json stops
        no ``--resume auto`` in its logging folder."""
        try:
            return json.loads(self.params.read_text()).get('logging', {}).get('run_name', '')
        except (OSError, ValueError, AttributeError):  # missing, not JSON, not a mapping
            match = RUN_FOLDER.fullmatch(self.path.name)
            return (match.group('name') or '') if match else ''

    def lock_holder(self):
        """What the run's lock holds of the job that holds it (``run_lock.read_lock``)."""
        return run_lock.read_lock(self.lock_file)

    def lock(self) -> None:
        """Lock the run for this process (``run_lock.acquire``: RunLockedError when another job
        writes it; a lock its ended job left is taken over)."""
        self._heartbeat = run_lock.acquire(self.lock_file, self.path)

    def check_lock(self) -> None:
        """RunLockedError when the lock this process took is now another job's
        (``run_lock.check_held``); called before each write of the run."""
        run_lock.check_held(self.lock_file, getattr(self, '_heartbeat', None), self.path)

    def unlock(self) -> None:
        """Remove the lock if this process holds it (``run_lock.release``)."""
        run_lock.release(self.lock_file, getattr(self, '_heartbeat', None))

    def append_log(self, record: dict) -> None:
        """Append one epoch's record (a JSON line) to ``log.jsonl``, on disk before the epoch's
        checkpoint is written (so a power cut cannot keep the checkpoint and lose the record).
        RunLockedError, writing nothing, when another job has taken the run's lock over
        (:meth:`check_lock`)."""
        self.check_lock()
        with open(self.log, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())

    def read_log(self) -> list:
        """The records of ``log.jsonl``, in order ([] when there is none). A last line cut short
        (a kill, a full disk or a power cut during its append, before the epoch's checkpoint:
        the resumed run writes it again) is left out; another line that is not JSON raises
        RunLogError naming the file and the line."""
        if not self.log.exists():
            return []
        lines = [(n, line) for n, line in enumerate(self.log.read_text().splitlines(), 1)
                 if line.strip()]
        records = []
        for k, (n, line) in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if k < len(lines) - 1:
                    raise RunLogError(f'{self.log}: line {n} is not a JSON record ({line[:60]!r}); '
                                      'mend or delete that line (its epoch\'s record is lost, not '
                                      'the training), then resume')
        return records

    def amend_log(self, epoch: int, values: dict) -> None:
        """Add ``values`` to ``epoch``'s record of ``log.jsonl``, after its ``train_loss`` as
        an epoch validated at once has them (a validation done after the epoch was logged:
        ``evaluate.validate_pending``), or append them as its record when it has none (a log
        deleted or cut); the file rewritten atomically, once the lock is checked."""
        self.check_lock()
        records = self.read_log()
        at = next((i for i, r in enumerate(records) if r['epoch'] == epoch), None)
        if at is None:
            records.append({'epoch': epoch, **values})
        else:  # values amended before (a resume killed before its checkpoint) are replaced
            old = {k: v for k, v in records[at].items() if k not in values}
            keys = list(old)
            cut = keys.index('train_loss') + 1 if 'train_loss' in keys else len(keys)
            records[at] = {**{k: old[k] for k in keys[:cut]}, **values,
                           **{k: old[k] for k in keys[cut:]}}
        write_text_atomic(self.log, ''.join(json.dumps(r) + '\n' for r in records))

    def keep_log_until(self, epoch: int) -> None:
        """Drop the records of ``log.jsonl`` from ``epoch`` on, so that every epoch appears once
        after a resume."""
        if self.log.exists():
            kept = [r for r in self.read_log() if r['epoch'] < epoch]
            write_text_atomic(self.log, ''.join(json.dumps(r) + '\n' for r in kept))


def latest_checkpoint(folder, run_name: str = '', where=None):
    """The most recently written ``checkpoint.pt`` among the run folders ``folder/*/`` of the runs
    named ``run_name`` (in their params.json; '' : unnamed runs only) for which ``where(RunDir)``
    holds (None: all), finished or not, or None when there is none."""
    runs = (RunDir(p.parent) for p in Path(folder).glob(f'*/{CHECKPOINT_NAME}'))
    candidates = [run.checkpoint for run in runs
                  if run.run_name == run_name and (where is None or where(run))]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def restarted_run(folder, run_name: str, launch):
    """On torchrun's restart of this job's workers (``launch``: ``distributed.launch_identity``,
    its ``restart`` > 0) with no ``--resume``: the checkpoint of the run this job started (the
    latest run of ``run_name`` in ``folder`` whose params.json holds the same torchrun job: the
    same ``--rdzv-id``, else the same agent; another job's newer run does not hide it), said in a
    message, as ``--resume auto`` would find it; else None (a new run; on a restart, with a
    warning). A restart started a new run from epoch 0, leaving the job's run behind, unless the
    command said ``--resume auto``."""
    if not launch or not launch['restart']:
        return None
    key = 'rdzv' if launch['rdzv'] else 'agent'
    path = latest_checkpoint(folder, run_name, where=lambda run: run.launch.get(key) == launch[key])
    if path:
        print(f'=> torchrun restart {launch["restart"]} of this job\'s workers: continuing the run '
              f'it started, {path.parent}, as --resume auto would', flush=True)
        return path
    print(f'=> warning: torchrun restart {launch["restart"]} of this job\'s workers, and no run it '
          f'started has a checkpoint: this starts a new run (--resume auto continues the latest '
          f'of its run name)', flush=True)
    return None


def unfinished_run_names(folder) -> list:
    """The run names (sorted; '' for unnamed runs) of the run folders ``folder/*/`` that hold a
    ``checkpoint.pt`` and no final weights."""
    return sorted({RunDir(p.parent).run_name for p in Path(folder).glob(f'*/{CHECKPOINT_NAME}')
                   if not RunDir(p.parent).is_finished})


def code_version() -> dict:
    """``{'version': the installed package's version or None, 'git_commit': SHA or None,
    'git_dirty': bool or None}`` of the code that runs: the commit of the checkout this package
    is in (the folder above it holds ``.git``), and whether its tracked files differ from it
    (None for both outside a checkout, as after ``pip install .``, even into a virtual
    environment inside one, or without git), as airbench keeps the code with its results."""
    try:
        version = importlib.metadata.version('imagenet-ffcv')
    except importlib.metadata.PackageNotFoundError:
        version = None

    def git(*args):
        return subprocess.run(['git', '-C', str(REPO), *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git('rev-parse', 'HEAD')
        if head.returncode != 0 or not (REPO / '.git').exists():
            return {'version': version, 'git_commit': None, 'git_dirty': None}
        status = git('status', '--porcelain', '--untracked-files=no')
        return {'version': version, 'git_commit': head.stdout.strip(),
                'git_dirty': bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {'version': version, 'git_commit': None, 'git_dirty': None}
