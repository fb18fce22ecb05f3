"""Live logging of a training run, for watching it while it runs: TensorBoard event files and,
optionally, Weights & Biases (W&B). ``log.jsonl`` (``run_dir``) stays the record of the run; these
are views of the same numbers.

Rank 0 alone logs: the caller creates a :class:`LiveLog` on the primary process only
(``dist.is_primary``); other ranks create none (or one with every backend off, whose calls do
nothing).

Where it writes, in the run folder ``folder``:

- ``folder/tensorboard/``: the event files (``tensorboard --logdir LOGGING_FOLDER`` shows all runs);
- ``folder/wandb/``: W&B's local files (an offline run, ``WANDB_MODE=offline``, is uploaded later
  with ``wandb sync folder/wandb/offline-run-*``).

Tags, one place for their names (the keys are the caller's, e.g. ``loss``, ``lr``, ``img_per_s``;
``top_1``, ``top_5``, ``val_loss``):

- ``train/<key>``: :meth:`LiveLog.train_scalars`, at step = the global iteration (batches since
  the run's first start, counting across resumes: optimizer steps times
  ``training.grad_accum_steps``);
- ``val/<key>``: :meth:`LiveLog.epoch_scalars`; TensorBoard's step is the epoch (0-based), W&B's is
  the global iteration, with the epoch as the metric ``epoch`` (W&B has one step axis, see below);
- ``config`` (TensorBoard text): the resolved config as a JSON code block, written once, when the
  run starts (``resume_step`` 0). A resumed run keeps the first start's text (at step 0, which no
  purge removes) rather than adding a second copy.

Resuming (``resume_step`` = the global iteration of the checkpoint, > 0):

- TensorBoard: the writer starts with ``purge_step=resume_step``, a ``SessionLog.START`` event that
  makes TensorBoard drop every event, of every tag, whose step is >= ``resume_step`` and was written
  before it (what the killed run logged after its checkpoint). The purge works on one step axis, the
  iteration's: ``val/<key>`` points (step = epoch, far below any iteration) are never purged, so an
  epoch whose validation the killed run logged before its checkpoint appears twice.
- W&B: the run id is ``run_name`` (sanitized) with ``resume='allow'``, so the resumed process
  continues the same W&B run. W&B keeps only steps above the last one it holds: the iterations
  between the checkpoint and the kill are logged again by the resumed process and W&B ignores them
  (with a warning) until the run passes the step where the killed process stopped.
"""
import json
import numbers
import re
import sys
from pathlib import Path

from .optional import require

_WANDB_ID_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")  # W&B refuses :;,#?/' in a run id


def numeric_items(values: dict) -> dict:
    """The entries of ``values`` that are real numbers, as floats: ints, floats, numpy scalars
    (NaN and inf kept). Others are skipped: None, str, bool, containers, tensors (pass
    ``loss.item()``: the caller decides when to wait for the GPU)."""
    return {key: float(value) for key, value in values.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)}


def wandb_run_id(run_name: str) -> str:
    """A W&B run id made from ``run_name``: characters other than letters, digits, ``_.-`` become
    ``-`` and at most 128 are kept. None for an empty name (W&B then picks an id, and a restarted
    process cannot continue that run)."""
    return _WANDB_ID_BAD_CHARS.sub('-', run_name)[:128] or None


class LiveLog:
    """The live logs of one run: TensorBoard when ``tensorboard``, W&B when ``wandb_project`` is
    set, both, or neither (then every call does nothing and nothing is written). Create it on rank
    0 only; call :meth:`close` at the end (or use it as a context manager).

    folder: the run folder (``RunDir.path``). run_name: the run's id (the run folder's name): W&B's
    run name and id. config: the resolved config (JSON-serialisable; other values are written as
    their ``str``). resume_step: the global iteration the run resumes from; 0 for a new run.

    Raises ``optional.MissingPackageError`` (an ImportError) naming wandb and the install command
    when ``wandb_project`` is set and wandb is not installed, and what ``wandb.init`` raises (e.g.
    ``wandb.errors.UsageError`` online without an API key: run ``wandb login`` or set
    ``WANDB_MODE=offline``); nothing is left open then.
    """

    def __init__(self, folder, *, tensorboard: bool, wandb_project: str = '', run_name: str = '',
                 config: dict = None, resume_step: int = 0):
        self.folder = Path(folder)
        self._writer = None
        self._wandb_run = None
        self._wandb_step = resume_step  # the last W&B step logged: W&B steps only increase
        if wandb_project:  # first: the backend that can fail, before any file is written
            self._wandb_run = self._start_wandb(wandb_project, run_name, config)
        if tensorboard:
            try:
                tensorboard_module = require('torch.utils.tensorboard', 'TensorBoard logging',
                                             package='tensorboard')
                self._writer = tensorboard_module.SummaryWriter(
                    log_dir=str(self.folder / 'tensorboard'), purge_step=resume_step or None)
                if config is not None and resume_step == 0:
                    text = json.dumps(config, indent=2, default=str)
                    self._writer.add_text('config', f'```json\n{text}\n```', global_step=0)
            except BaseException:
                self.close()
                raise

    def _start_wandb(self, project: str, run_name: str, config):
        """``wandb.init`` for this run, its files under ``folder/wandb/``. wandb is imported
        here only (an optional package, ``requirements-extras.txt``)."""
        wandb = require('wandb', needed_for=f'W&B logging (project {project!r})')
        self.folder.mkdir(parents=True, exist_ok=True)  # W&B falls back to a temp dir without it
        return wandb.init(project=project, name=run_name or None, id=wandb_run_id(run_name),
                          resume='allow', config=config, dir=str(self.folder))

    @property
    def active(self) -> bool:
        """Whether any backend is on (and the log not closed)."""
        return self._writer is not None or self._wandb_run is not None

    def train_scalars(self, step: int, values: dict) -> None:
        """Log ``values`` (e.g. ``{'loss': 2.3, 'lr': 0.1, 'img_per_s': 900.0}``, units as the
        caller documents them) as ``train/<key>`` at ``step``, the global iteration; non-numeric
        values are skipped (:func:`numeric_items`). Steps should increase: W&B ignores a step
        below the last one it holds."""
        scalars = {f'train/{key}': value for key, value in numeric_items(values).items()}
        if not scalars:
            return
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)
            self._wandb_step = max(self._wandb_step, step)

    def epoch_scalars(self, epoch: int, values: dict, *, step: int = None) -> None:
        """Log ``values`` (e.g. ``{'top_1': 0.5, 'top_5': 0.9, 'val_loss': 1.2}``; accuracies
        as fractions) as ``val/<key>``; non-numeric values are skipped. TensorBoard: at step
        ``epoch`` (0-based), then flushed to disk. W&B: at ``step``, the global iteration at the
        end of the epoch, with ``epoch`` added as a metric; without ``step``, at the last step
        logged (the epoch's values join that row). A ``step`` below the last one logged is raised
        to it, as W&B would ignore it."""
        scalars = {f'val/{key}': value for key, value in numeric_items(values).items()}
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, global_step=epoch)
            self._writer.flush()
        if self._wandb_run is not None and scalars:
            self._wandb_step = max(self._wandb_step, step if step is not None else 0)
            self._wandb_run.log({**scalars, 'epoch': epoch}, step=self._wandb_step)

    def close(self, quiet: bool = False) -> None:
        """Flush and close the event file and finish the W&B run; later calls do nothing.
        ``quiet``: what fails is printed as a warning on stderr, not raised (the run already ends
        by an error, which it would replace: a folder gone read-only was told as TensorBoard's)."""
        writer, run = self._writer, self._wandb_run
        self._writer = self._wandb_run = None
        try:
            try:
                if writer is not None:
                    writer.close()
            finally:
                if run is not None:
                    run.finish()
        except Exception as e:
            if not quiet:
                raise
            print(f'=> warning: closing the TensorBoard or W&B log failed too ({type(e).__name__}:'
                  f' {e})', file=sys.stderr, flush=True)

    def __enter__(self) -> 'LiveLog':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
