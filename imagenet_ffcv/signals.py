"""Pre-emption and Ctrl-C: SIGTERM and SIGINT turned into a request the training loop polls, so a
run stops after its current step with a checkpoint written (exit status 128 + the signal); for the
converter, SIGTERM raised as an exception like Ctrl-C's, so that its clean-up runs on the way out.
"""
import contextlib
import os
import signal
import threading

import torch

from . import distributed


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a SLURM job's end), raised wherever the main thread is, as
    Ctrl-C raises KeyboardInterrupt (:func:`sigterm_raises`)."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one would cut the clean-up short
    raise Terminated


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signals reach it only


@contextlib.contextmanager
def sigterm_raises():
    """Within the block SIGTERM raises :class:`Terminated`; the previous handler is restored
    after. Off the main thread (no signal reaches it, and none can be set) nothing changes."""
    if not _on_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_by_sigint() -> None:
    """End this process by SIGINT, after its KeyboardInterrupt was handled (clean-up, message):
    a shell running a loop of commands stops the loop only when one dies of SIGINT. Off the main
    thread, nothing."""
    if _on_main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


class StopRequest:
    """Turns SIGTERM (cluster pre-emption, ``kill``) and the first Ctrl-C (SIGINT) into a flag the
    training loop polls, so it can finish the current step, write a checkpoint and exit. A second
    Ctrl-C raises KeyboardInterrupt at once (abandon the step, no checkpoint).

    Use as a context manager around the training loop; the previous handlers are restored on exit.
    ``signum`` is the signal received (None while none), ``exit_code`` the conventional 128 + signum.
    True once a signal came, or once the ranks agreed to stop for another rank's (:meth:`agree`).
    """

    def __init__(self):
        self.signum = None
        self.elsewhere = None  # the signal another rank received (agree)
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f'\n=> {signal.Signals(signum).name} received: finishing this step, then stopping '
              'with a checkpoint to resume from (after the last epoch: with the final weights)'
              + (' (Ctrl-C again to abandon)' if signum == signal.SIGINT else ''), flush=True)

    def __bool__(self):
        return self.signum is not None or self.elsewhere is not None

    def agree(self, device) -> int:
        """The largest signal number any rank received (0: none; ``distributed.all_reduce_max``
        on ``device``, which every rank must reach), which this rank takes too when it reached
        another one only, so that every rank ends with the same exit status."""
        signum = distributed.all_reduce_max(torch.tensor([self.signum or 0], device=device))[0]
        if signum:
            self.elsewhere = signum
        return signum

    @property
    def name(self) -> str:
        """'SIGTERM', 'SIGINT', or 'a signal on another rank' when this rank received none."""
        return signal.Signals(self.signum).name if self.signum else 'a signal on another rank'

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or self.elsewhere or signal.SIGTERM)
