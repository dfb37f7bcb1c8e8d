"""The group-commit writer: one thread that runs every durable write of the queue, batching all
that queued up while the previous commit was syncing into one transaction (N concurrent writers
cost one fsync, not N; Postfix pays one fsync per message), and hands each caller its outcome
through a future.

Waiters may go away: a session whose client vanished after the dot is cancelled by aiosmtpd, and
cancelling the asyncio side cancels the concurrent future. That is normal. The writer marks every
future RUNNING when it takes the batch (set_running_or_notify_cancel), so from then on nobody can
cancel it and setting its result is always valid; a future already cancelled before that keeps
its op anyway. Policy: every submitted operation is executed, whether or not anyone still waits for
its result. Delivery outcomes must be recorded in any case; a message whose client vanished at the
dot is committed whole (the client saw no 250, may send it again: a duplicate, which RFC 5321 6.1
prefers to a loss). Never half-written: the store runs each batch inside one transaction.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue as stdqueue
import threading
from typing import Callable

from backend.queue.model import QueueError

log = logging.getLogger("homemx.queue")

MAX_BATCH = 256

# An operation: given the store's connection and the commit's time, do one write and return its result.
Op = Callable[..., object]


class QueueClosed(QueueError):
    """The queue takes no more writes: closed, or its writer thread is gone (sessions answer 451)."""


class GroupCommitWriter:
    """The writer thread. ``run_ops(ops)`` runs a list of operations in ONE transaction and returns
    their results (raising leaves nothing written); ``notify(what)`` wakes the runner after a commit
    that brought new work, once per batch for each distinct ``what`` its operations were submitted with."""

    def __init__(self, run_ops: Callable[[list[Op]], list], notify: Callable[[object], None]):
        self._run_ops = run_ops
        self._notify = notify
        self._pending: stdqueue.Queue = stdqueue.Queue()
        # _lock orders "is the writer still taking work?" against putting work in _pending, so no
        # operation is ever left in the queue after the writer stopped (its caller would wait forever).
        self._lock = threading.Lock()
        self._closed = False
        self._stopped = False  # the thread has ended (closed, or died)
        self.failure: BaseException | None = None  # what killed the thread, if anything did
        self._thread = threading.Thread(target=self._loop, name="queue-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Op, notify: object = None) -> concurrent.futures.Future:
        """Hand ``op`` to the writer; ``notify`` (when set): what new work it brings, passed to
        ``notify()`` once it is committed.
        Raises QueueClosed at once when the writer takes no more work."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed or self._stopped:
                raise QueueClosed(
                    "the queue is closed" if self._closed else f"the queue writer has stopped: {self.failure!r}"
                )
            self._pending.put((op, fut, notify))
        return fut

    def close(self) -> None:
        """Let the writer finish what was submitted, then stop it. Later submits raise QueueClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._stopped:
                self._pending.put(None)
        self._thread.join(timeout=10)

    def healthy(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def _loop(self) -> None:
        batch: list = []
        try:
            while True:
                item = self._pending.get()
                if item is None:
                    return
                batch = [item]
                while len(batch) < MAX_BATCH:
                    try:
                        nxt = self._pending.get_nowait()
                    except stdqueue.Empty:
                        break
                    if nxt is None:
                        self._pending.put(None)
                        break
                    batch.append(nxt)
                self._commit_batch(batch)
                batch = []
        except BaseException as e:  # noqa: BLE001 - not a write failure (those are reported): a bug
            self.failure = e
            # ERROR with the traceback (it is a bug); the daemon's watchdog logs the one CRITICAL
            # line when it stops because of it (backend/run.py).
            log.error("queue writer died, nothing can be stored any more: %r", e, exc_info=e)
            raise
        finally:
            self._fail_leftovers(batch)

    def _fail_leftovers(self, batch: list) -> None:
        """The thread is ending: nobody may wait forever, so what was taken or is still queued fails now."""
        with self._lock:
            self._stopped = True
        gone = QueueClosed(f"the queue writer has stopped: {self.failure!r}")
        leftover = list(batch)
        while True:
            try:
                item = self._pending.get_nowait()
            except stdqueue.Empty:
                break
            if item is not None:
                leftover.append(item)
        for _, fut, _ in leftover:
            # Those of the batch that failed are RUNNING already (or settled): asking again
            # would make concurrent.futures log a CRITICAL "unexpected state" line.
            if not (fut.running() or fut.done()):
                fut.set_running_or_notify_cancel()
            _settle(fut, exc=gone)

    def _commit_batch(self, batch: list) -> None:
        """One transaction for the whole batch; on failure, each op alone (isolation)."""
        for _, fut, _ in batch:
            fut.set_running_or_notify_cancel()  # False: cancelled waiter, the op runs all the same
        try:
            results = self._run_ops([op for op, _, _ in batch])
        except Exception as e:  # noqa: BLE001 - reported to each waiting caller
            if len(batch) == 1:
                _settle(batch[0][1], exc=e)
                return
            # One bad write (say, a message too big for the remaining disk) must not fail its
            # neighbours: retry each on its own.
            for op, fut, notify in batch:
                try:
                    result = self._run_ops([op])[0]
                except Exception as e1:  # noqa: BLE001
                    _settle(fut, exc=e1)
                    continue
                _settle(fut, result=result)
                if notify:
                    self._notify(notify)
            return
        for (_, fut, _), result in zip(batch, results):
            _settle(fut, result=result)
        # One wake-up per batch and kind of work, not one per message (a batch holds up to MAX_BATCH).
        for what in {notify for _, _, notify in batch if notify}:
            self._notify(what)


def _settle(fut: concurrent.futures.Future, result: object = None, exc: BaseException | None = None) -> None:
    """Give a RUNNING future its outcome. Harmless on a future that is already done (cancelled
    before the writer took it): a waiter that went away is normal, never the writer's error."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
