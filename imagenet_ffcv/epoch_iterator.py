"""The thread that decodes one epoch of a loader: ffcv 1.0.2's ``EpochIterator`` (batch after batch
into a ring of ``batches_ahead + 2`` slots, each with its CUDA side stream, handed on through a
queue of ``batches_ahead``), which also

- keeps the pinned host buffers safe on CUDA: ffcv decodes into a slot again without waiting for
  the asynchronous copy of the slot's last batch to the GPU, which itself waits for the consumer's
  stream, so a loader running ahead of the GPU would overwrite pixels not yet copied. With the
  loader's ``copy_wait`` 'batch' the thread waits for the slot's side stream after each batch;
  with 'slot', before it decodes into that slot again (an event recorded after the slot's last
  batch; ``loaders.COPY_WAIT``);
- stops when asked: ``close`` returns once the thread has ended (at most CLOSE_WAIT_S; ffcv's
  only asks it to stop, and its thread goes on decoding until its queue is full), and an epoch
  still running when the process ends is closed first (``atexit``). A daemon thread inside torch
  code, which releases the GIL, when the interpreter finalises makes the process abort
  ("terminate called without an active exception": CPython ends such a thread with
  ``pthread_exit``, whose unwinding meets a C++ destructor that may not throw;
  python/cpython#87135, until Python 3.14);
- hands on its error: an exception in the thread is raised by the consumer's next ``next``, where
  ffcv's thread dies with it and leaves the consumer waiting for ever; a consumer never waits on
  a thread that has ended;
- works on the consumer's GPU: a new thread's current CUDA device is 0, and ffcv's
  ``torch.cuda.stream`` blocks go back to device 0's stream on leaving, which creates a CUDA
  context there (about 0.3-0.5 GB, ffcv issue #356): each rank of an 8-GPU node but rank 0 would
  hold one on GPU 0;
- uses the loader's side streams (``loaders.Loader.ring_streams``), the same every epoch, not the
  new ones ffcv takes for each.
"""
import atexit
import sys
import threading
from queue import Empty, Full

import torch
from . import ffcv_import  # noqa: F401  (first: ffcv without its import-time compiling)
from ffcv.loader.epoch_iterator import IS_CUDA
from ffcv.loader.epoch_iterator import EpochIterator as FfcvEpochIterator
from ffcv.pipeline.compiler import Compiler

WAIT_S = 0.5  # while waiting on the queue, each side looks this often whether the other has ended
CLOSE_WAIT_S = 10.0  # close waits this long at most for the thread to end
_atexit_registered = False  # close_running_epochs, by the first epoch of the process


class EpochIterator(FfcvEpochIterator):
    """An epoch of ``loader`` in ``order`` (the module's docstring says what it adds to ffcv's);
    a thread, started when made. Iterating gives the batches; ``close`` ends the epoch early."""

    def __init__(self, loader, order):
        self._copied = [None] * (loader.batches_ahead + 2)  # per slot: its last batch's event
        self._finished = threading.Event()  # set when the thread has left its pipeline for good
        self._leaving = threading.Lock()  # one thread leaves the memory context
        super().__init__(loader, order)  # starts the thread
        global _atexit_registered
        if not _atexit_registered:
            atexit.register(close_running_epochs)
            _atexit_registered = True

    def run(self):
        """ffcv 1.0.2's loop: decode each batch into the next slot of the ring and hand it on,
        then None at the end of the epoch. It stops before a batch once closed, and hands on an
        exception instead of the batch."""
        slots = self.loader.batches_ahead + 2
        events = [None] * slots  # per slot: the consumer's stream when it took the slot's batch
        try:
            if IS_CUDA:
                torch.cuda.set_device(self.current_stream.device)
                self.cuda_streams = self.loader.ring_streams  # read by __next__ after a batch
            Compiler.set_num_threads(self.loader.num_workers)
            for b_ix, batch_indices in enumerate(self.iter_ixes):
                if self.terminate_event.is_set():
                    return
                slot = b_ix % slots
                result = self.run_pipeline(b_ix, batch_indices, slot, events[slot])
                if not self._hand_on((slot, result)):
                    return
                if IS_CUDA:  # ffcv: handing on batch b means that the consumer has taken batch
                    # b - batches_ahead, so its work on batch b - batches_ahead - 1 (in the slot
                    # after this one) is queued on its stream: decoding into that slot waits for it
                    event = torch.cuda.Event()
                    event.record(self.current_stream)
                    events[(slot - self.loader.batches_ahead - 1) % slots] = event
            self._hand_on(None)
        except BaseException as e:  # noqa: BLE001 - raised in the consumer by __next__
            if isinstance(e, StopIteration):  # would end the consumer's loop as if done
                e = RuntimeError(f'the loader thread raised StopIteration: {e!r}')
            self._hand_on(e)
        finally:
            self._finished.set()
            if self.terminate_event.is_set():  # closed: a close that gave up waiting left this
                self._leave_memory_context()

    def has_stopped(self) -> bool:
        """True once the thread has left its pipeline for good (at the end of the epoch, closed,
        or after an error): it writes into the epoch's buffers no more."""
        return self._finished.is_set()

    def _hand_on(self, item) -> bool:
        """Put ``item`` on the queue, waiting while it is full; False if closed meanwhile."""
        while not self.terminate_event.is_set():
            try:
                self.output_queue.put(item, timeout=WAIT_S)
                return True
            except Full:
                pass
        return False

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if self._copied[batch_slot] is not None:  # 'slot': the slot's last batch is copied out
            self._copied[batch_slot].synchronize()
        result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        if IS_CUDA:
            stream = self.cuda_streams[batch_slot]
            if self.loader.copy_wait == 'batch':
                stream.synchronize()
            else:
                self._copied[batch_slot] = stream.record_event()
        return result

    def __next__(self):
        """The next batch (a tuple of the pipelines' outputs).

        Raises:
            StopIteration: at the end of the epoch, or once closed.
            Exception: what the thread raised while decoding (the epoch is closed).
            RuntimeError: the thread ended without handing anything on.
        """
        while True:
            if self.terminate_event.is_set():
                raise StopIteration
            try:
                item = self.output_queue.get(timeout=WAIT_S)
                break
            except Empty:
                if (self._finished.is_set() and self.output_queue.empty()
                        and not self.terminate_event.is_set()):  # nothing will come
                    self.close()
                    raise RuntimeError('the loader thread ended without finishing the epoch')
        if item is None:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            try:
                raise item
            finally:  # else this frame, in the exception's traceback, would hold it: a cycle
                del item
        slot, result = item
        if IS_CUDA:  # the batch's copy to the device, queued on the slot's side stream
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result

    def close(self):
        """End the epoch: the thread stops before its next batch, and this returns once it has
        (it finishes the batch it is decoding; at most CLOSE_WAIT_S), then leaves ffcv's memory
        context of the epoch (or the thread does, when it stops later). Called from the thread
        itself (the last reference to the epoch can go there), it waits for nothing."""
        self.terminate_event.set()
        if not sys.is_finalizing() and self.is_alive() and threading.get_ident() != self.ident:
            _empty(self.output_queue)  # a thread waiting for a place in it goes on at once
            self.join(CLOSE_WAIT_S)
        if self._finished.is_set() or not self.is_alive():  # nothing reads the epoch's memory
            self._leave_memory_context()

    def _leave_memory_context(self):
        with self._leaving:
            if not self.closed:
                self.closed = True
                self.memory_context.__exit__(None, None, None)


def _empty(queue) -> None:
    """Take every item out of ``queue`` (batches nobody will read, once closed)."""
    try:
        while True:
            queue.get_nowait()
    except Empty:
        pass


def close_running_epochs() -> None:
    """Close every epoch of this process whose thread still runs (registered with ``atexit`` by
    the first epoch): all asked to stop at once, then each waited for (``EpochIterator.close``);
    one that fails to close is reported on stderr and the others are still closed."""
    epochs = [t for t in threading.enumerate() if isinstance(t, EpochIterator)]
    for epoch in epochs:
        epoch.terminate_event.set()
    for epoch in epochs:
        try:
            epoch.close()
        except Exception as e:  # noqa: BLE001 - the others must still stop
            print(f'imagenet_ffcv: closing a loader epoch at exit: {e!r}', file=sys.stderr)
