"""A decoder on its own thread, so that the LM of the next frames runs while it decodes.

At batch 1 a frame step of a Pocket TTS LM is bound by reading its weights, and one core
reads them nearly as fast as two; the decoder is compute-bound on activations that stay
in cache. Giving each its own core and running them at the same time therefore beats
running both on two cores one after the other (benchmarks/results/design_notes.md,
"decoder overlap"); the LM takes the core back while the worker is idle, where that does
not change its bits (``lm_threads``). The engine thread keeps the scheduling; this worker
owns every call that touches the decoder's state, in submission order (one FIFO thread),
so a slot closed and reopened for the next request can never see a decode out of order.

    w = DecodeWorker(DecodeSlots(vae, 16))
    w.open(3)                                # queued, ordered with the decodes
    fut = w.decode([3], latents)             # concurrent.futures.Future of the audio
    ...                                      # the LM's next frame runs here
    wav = fut.result()
    w.close(3); w.shutdown()
"""
from __future__ import annotations

import queue
import threading
import weakref
from concurrent.futures import Future
from contextlib import contextmanager

import torch

from calm_fast.runtime.decode_slots import DecodeSlots


def _run(q: queue.SimpleQueue, threads: int, errors: list) -> None:
    # torch's intra-op thread count is per OS thread (OpenMP's ICV): this sets the
    # decoder's own and leaves the engine thread's as it was. torch initialises a thread's
    # count lazily, at its first parallel call, from the last value set in ANY thread; the
    # get_num_threads() call does that first, or the engine thread's latest setting would
    # later override this one (a thread count that depends on timing changes the sums'
    # rounding from run to run).
    torch.get_num_threads()
    torch.set_num_threads(threads)
    while True:
        item = q.get()
        if item is None:
            return
        fut, fn, args = item
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            with torch.no_grad():
                fut.set_result(fn(*args))
        except BaseException as e:  # handed to whoever waits on the future, and kept for
            fut.set_exception(e)     # calls nobody waits on (open, close)
            errors.append(e)


@contextmanager
def lm_threads(worker: "DecodeWorker | None", overlapped: bool, invariant: bool):
    """While the block runs, this thread (the LM's) has one intra-op thread fewer, the
    decode worker's core, when it has more than one and ``overlapped`` (the caller decodes
    on ``worker`` at this step's batch size): while the worker decodes, and also while it
    is idle unless the LM's step is thread-count ``invariant``
    (``Scheduler.thread_invariant``). A step whose bits depend on its thread count thus
    keeps to the same count whatever the timing. Restored after."""
    threads = torch.get_num_threads()
    fewer = (worker is not None and overlapped and threads > 1
             and (worker.busy or not invariant))
    if fewer:
        torch.set_num_threads(threads - 1)
    try:
        yield
    finally:
        if fewer:
            torch.set_num_threads(threads)


def _stop(q: queue.SimpleQueue, thread: threading.Thread) -> None:
    q.put(None)
    if thread is not threading.current_thread():
        thread.join(timeout=10)


class DecodeWorker:
    """Runs ``slots``' open/close/decode calls in order on one thread with ``threads``
    intra-op threads. Calls return futures; an error surfaces where its future is read,
    and any call's error at the next ``sync`` (the decoder's state is then unknown)."""

    def __init__(self, slots: DecodeSlots, threads: int = 1):
        self.slots = slots
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._last: Future | None = None
        self._errors: list = []
        self._thread = threading.Thread(target=_run, args=(self._q, threads, self._errors),
                                        daemon=True, name="calm-fast-decoder")
        self._thread.start()
        # The thread holds only the queue, so a worker dropped without shutdown() still
        # stops it; at exit it is stopped and joined before the interpreter finalises (a
        # daemon thread killed inside torch can crash CPython <= 3.13, see serve/service.py).
        self._stop = weakref.finalize(self, _stop, self._q, self._thread)

    def run(self, fn, *args) -> Future:
        """Queue ``fn(*args)`` (a call on the slots' state, e.g. several decodes)."""
        if not self._stop.alive:
            raise RuntimeError("the decode worker was shut down")
        fut: Future = Future()
        self._q.put((fut, fn, args))
        self._last = fut
        return fut

    def open(self, slot: int) -> Future:
        return self.run(self.slots.open, slot)

    def close(self, slot: int) -> Future:
        return self.run(self.slots.close, slot)

    def decode(self, slots: list[int], latents: torch.Tensor) -> Future:
        return self.run(self.slots.decode, slots, latents)

    @property
    def busy(self) -> bool:
        """Whether a call queued so far has not finished yet."""
        return self._last is not None and not self._last.done()

    def check(self) -> None:
        """Re-raise the first error of a call run so far (without waiting)."""
        if self._errors:
            raise self._errors[0]

    def sync(self) -> None:
        """Wait until everything queued so far has run (re-raises the last call's error)."""
        if self._last is not None:
            try:
                self._last.result()
            except BaseException:
                pass
        self.check()

    def shutdown(self) -> None:
        self._stop()
