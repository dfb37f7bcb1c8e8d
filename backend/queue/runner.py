"""Queue runner: picks due recipients, delivers local ones to Maildir, hands remote ones to outbound delivery.

When it runs. The runner sleeps until the earliest recipient it could claim is due (a message's
expiry is one of those times: the queue caps every planned attempt at it), or until it is woken:
by a commit that queued new work (in-process), by the queue CLI of another process (a datagram
on ``wake_path``), or by a remote attempt that finished. IDLE_POLL bounds the sleep in case a
wake-up was lost (it is best effort). A round that fails (the queue cannot be written: a full
disk) is retried with exponential back-off up to FAILURE_BACKOFF_MAX, never at the pace of an
overdue next attempt; the failure is logged once when it starts and once when it ends, and
exported as ``homemx_backend_queue_runner_failing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Protocol

from backend.local import maildir
from backend.config import BackendConfig
from backend.metrics import BackendMetrics
from backend.queue.model import DELIVERED, DEFERRED, Recipient
from backend.queue.store import NEW_REMOTE, NEW_WORK, Queue
from backend.queue.writer import QueueClosed
from backend.reports import dmarc as dmarc_reports

log = logging.getLogger("homemx.runner")

IDLE_POLL = 30.0  # look at the queue at least this often, in case a wake-up was lost (all are best effort)
BATCH = 200
FAILURE_BACKOFF_MIN = 1.0  # wait after the first failed round, doubled after each further one ...
FAILURE_BACKOFF_MAX = 60.0  # ... up to this
WAKE_SOCKET = "runner.wake"  # next to the queue database; the queue CLI pokes the daemon through it


class RemoteDelivery(Protocol):
    """Outbound delivery (backend part 2). ``deliver`` attempts the claimed recipients of one
    message and records each outcome in the queue itself."""

    async def deliver(self, message_id: str, recipients: list[Recipient]) -> None: ...

    async def expire_local(self, entry, content: bytes, rcpt: Recipient, last: str) -> None:
        """Bounce a local recipient at the message's max age, its DSN queued in the same commit."""


def retry_delay_for(schedule: tuple[float, ...]) -> Callable[[int], float]:
    """The delay planned at claim time, from the number of attempts made *before* this one: the
    n-th attempt (1-based) plans schedule[n-1]. The deliverer calls the same function when it
    records a deferral (with the attempt count after the claim, minus one): one index convention."""

    def delay(attempts_before: int) -> float:
        return schedule[min(max(attempts_before, 0), len(schedule) - 1)]

    return delay


# ---------------------------------------------------------------- cross-process wake-up


def wake_path(queue_db: Path) -> Path:
    """The datagram socket the running daemon listens on (next to its queue database)."""
    return Path(queue_db).parent / WAKE_SOCKET


@contextlib.contextmanager
def _unix_address(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits sun_path (108 bytes): the path itself, or, when it is longer,
    the same file through a descriptor of its directory (/proc/self/fd/N/name)."""
    text = os.fsencode(path)
    if len(text) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def poke_daemon(queue_db: Path) -> bool:
    """Tell a running daemon that the queue changed (``queue retry``/``release``), so it looks now
    instead of at its next poll. Best effort: False when no daemon listens."""
    path = wake_path(queue_db)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, _unix_address(path) as addr:
            s.setblocking(False)
            s.sendto(b"wake", addr)
        return True
    except OSError:  # no daemon (ENOENT, ECONNREFUSED), or its buffer is full: it is awake anyway
        return False


class _WakeProtocol(asyncio.DatagramProtocol):
    def __init__(self, wake: Callable[[], None]):
        self.wake = wake

    def datagram_received(self, data: bytes, addr) -> None:
        self.wake()  # the content does not matter: any datagram means "look at the queue"


class QueueRunner:
    def __init__(
        self,
        config: BackendConfig,
        queue: Queue,
        metrics: BackendMetrics,
        run_blocking: Callable[..., Awaitable],
        remote: RemoteDelivery | None = None,
        now: Callable[[], float] = time.time,
        idle_poll: float = IDLE_POLL,
    ):
        self.config = config
        self.queue = queue
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.remote = remote
        self.now = now
        self.wakeup = asyncio.Event()
        self.retry_delay = retry_delay_for(config.delivery.retry_schedule)
        self._tasks: set[asyncio.Task] = set()
        self._in_flight: set[int] = set()  # recipient ids with a remote attempt under way
        self._last_purge = 0.0
        self.idle_poll = idle_poll
        self.backoff_min, self.backoff_max = FAILURE_BACKOFF_MIN, FAILURE_BACKOFF_MAX
        self.failures = 0  # consecutive failed rounds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_transport: asyncio.DatagramTransport | None = None
        self._wake_path: Path | None = None
        self.dmarc_rua = dmarc_reports.rua_addresses(config)  # mail to these is read as DMARC reports

    def poke(self, what: str = NEW_WORK) -> None:
        """Thread-safe wake-up (the queue's writer thread calls it after a commit). Work only remote
        delivery can take does not wake a runner that would not claim it (remote delivery paused
        or absent): claim_due and next_due_time would find nothing new, once per commit. Those
        recipients are claimed when delivery resumes (the restart after the config change)."""
        if what == NEW_REMOTE and self._local_only():
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.wakeup.set)

    async def listen_for_wakeups(self, path: Path) -> None:
        """Bind the wake-up socket (mode 0600: only the daemon's user pokes it). A stale socket of
        a previous run is replaced. Best effort: if it cannot be bound, the idle poll remains."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with _unix_address(path) as addr:
                sock.bind(addr)
                # chmod, not a umask around bind: the umask is process-wide and worker threads
                # create files meanwhile. A poke in between only makes the runner look early.
                os.chmod(addr, 0o600)
            sock.setblocking(False)
            self._wake_transport, _ = await loop.create_datagram_endpoint(lambda: _WakeProtocol(self.poke), sock=sock)
        except OSError as e:
            sock.close()
            log.warning("no wake-up socket at %s (%s): queue CLI changes are seen within %.0f s", path, e, self.idle_poll)
            return
        self._wake_path = path

    def close(self) -> None:
        """Stop listening for wake-ups (the socket file is removed)."""
        if self._wake_transport is not None:
            self._wake_transport.close()
            self._wake_transport = None
            if self._wake_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._wake_path)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue.on_enqueued = self.poke
        while True:
            self.wakeup.clear()
            try:
                await self.run_once()
            except Exception as e:  # noqa: BLE001 - the runner must survive a bad round (disk, DB busy)
                timeout = self._failed(e)
            else:
                self._succeeded()
                timeout = await self._until_next_due()
            await self._sleep(timeout)

    async def _sleep(self, timeout: float) -> None:
        """Until woken or ``timeout``. Not asyncio.wait_for: on Python 3.11 it swallows a
        cancellation that arrives as the event is set (it returns the event's result), and the
        runner would go on while Backend.stop waits for it to end."""
        woken = asyncio.ensure_future(self.wakeup.wait())
        try:
            await asyncio.wait([woken], timeout=timeout)
        finally:
            woken.cancel()

    def _failed(self, e: Exception) -> float:
        """Count a failed round; returns how long to wait before the next one."""
        self.failures += 1
        self.metrics.queue_runner_failures.inc()
        if self.failures == 1:
            self.metrics.queue_runner_failing.set(1)
            # One line when the trouble starts (and one when it ends), never one per round: a full
            # disk must not also fill the log. A database or OS error names its cause; anything
            # else is a bug and gets its traceback (QueueClosed: the writer died, the watchdog
            # reports it and stops the daemon).
            expected = isinstance(e, (sqlite3.Error, OSError, QueueClosed))
            log.error(
                "queue run failed: %s: %s; retrying with back-off up to %.0f s (logged again when it recovers)",
                type(e).__name__, e, self.backoff_max, exc_info=None if expected else e,
            )
        return min(self.backoff_max, self.backoff_min * 2 ** (self.failures - 1))

    def _succeeded(self) -> None:
        if self.failures:
            log.warning("queue runs recovered after %d failed rounds", self.failures)
            self.metrics.queue_runner_failing.set(0)
            self.failures = 0

    def _local_only(self) -> bool | None:
        # Remote recipients wait when there is no outbound delivery or it is paused for maintenance;
        # local ones are always delivered.
        return None if self.remote is not None and not self.config.delivery.paused else True

    async def _until_next_due(self) -> float:
        """Seconds until the earliest recipient this runner could claim is due (at most idle_poll)."""
        try:
            nxt = await self.run_blocking(self.queue.next_due_time, self._local_only(), frozenset(self._in_flight))
        except Exception:  # noqa: BLE001 - the next round finds and reports the trouble
            return self.backoff_min
        if nxt is None:
            return self.idle_poll
        return max(0.0, min(self.idle_poll, nxt - self.now()))

    async def run_once(self) -> None:
        local_only = self._local_only()
        # Recipients whose attempt is still running are never claimed again, however long it takes
        # (their planned next attempt may already have passed): no second copy in flight.
        claimed = await self.run_blocking(
            self.queue.claim_due, BATCH, self.retry_delay, local_only, frozenset(self._in_flight)
        )
        by_message: dict[str, list[Recipient]] = defaultdict(list)
        for r in claimed:
            by_message[r.message_id].append(r)
        for mid, rcpts in by_message.items():
            local = [r for r in rcpts if r.local]
            remote = [r for r in rcpts if not r.local]
            if local:
                await self._deliver_local(mid, local)
            if remote and self.remote is not None:
                ids = {r.id for r in remote}
                self._in_flight |= ids
                task = asyncio.create_task(self.remote.deliver(mid, remote))
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._attempt_done, ids))
        if self.now() - self._last_purge > 300:
            self._last_purge = self.now()
            await self.run_blocking(self.queue.purge_final, self.config.delivery.keep_final)

    def _attempt_done(self, ids: set[int], task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._in_flight -= ids
        # Its recipients may be due again already (an attempt that outlived its retry delay): the
        # runner's sleep did not count them while they were in flight.
        self.wakeup.set()

    async def _deliver_local(self, message_id: str, rcpts: list[Recipient]) -> None:
        content = await self.run_blocking(self.queue.content, message_id)
        entry = await self.run_blocking(self.queue.get, message_id)
        report_delivered = False
        for r in rcpts:
            box = self.config.maildir_for(r.address)
            prefix = f"Return-Path: <{entry.sender}>\r\nDelivered-To: {r.address}\r\n".encode()
            try:
                if entry.folder is not None:  # Junk (auth/): created on first use
                    box = await self.run_blocking(maildir.folder_path, box, entry.folder)
                await self.run_blocking(maildir.deliver, box, content, f"{message_id}_{r.id}", prefix)
            except OSError as e:
                last = f"451 4.3.0 Maildir write failed: {e.strerror}"
                if self.remote is not None and self.now() - entry.created >= self.config.delivery.max_queue_age:
                    # RFC 5321 4.5.4.1: given up at the max age, as remote recipients are; the
                    # sender gets a DSN (with no remote delivery configured there is no way to send
                    # one, and the recipient stays deferred).
                    log.error("queue=%s rcpt=%s maildir delivery failed until the max age: %s", message_id, r.address, e)
                    self.metrics.maildir_deliveries.labels("bounced").inc()
                    await self.remote.expire_local(entry, content, r, last)
                    continue
                log.error("queue=%s rcpt=%s maildir delivery deferred: %s", message_id, r.address, e)
                self.metrics.maildir_deliveries.labels("deferred").inc()
                await self.run_blocking(self.queue.set_result, r.id, DEFERRED, last)
                continue
            self.metrics.maildir_deliveries.labels("delivered").inc()
            await self.run_blocking(self.queue.set_result, r.id, DELIVERED, "250 2.0.0 Delivered to Maildir")
            log.info("queue=%s rcpt=%s delivered to maildir%s", message_id, r.address,
                     f" folder {entry.folder}" if entry.folder else "")
            # Mail the inbound checks filed as Junk is not trusted as a report (a forgery could
            # otherwise make up sources and verdicts).
            if entry.folder is None and {r.address.lower(), r.orig_address.lower()} & self.dmarc_rua:
                report_delivered = True
        if report_delivered:
            # After the Maildir delivery (the report stays in the mailbox too); ingest never raises.
            # Beside the runner (a 20 MB report takes seconds to parse), drained like a delivery.
            task = asyncio.ensure_future(
                self.run_blocking(dmarc_reports.ingest, self.config.server.data_dir, content, self.metrics, message_id)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:
        """Let deliveries in flight finish for ``timeout`` seconds, then cancel the rest: their next
        attempt was recorded before they started, so nothing is lost and nothing is re-hammered."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
