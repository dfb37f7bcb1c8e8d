"""Queue runner: picks due recipients, delivers local ones to Maildir, hands remote ones to outbound delivery."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from typing import Awaitable, Callable, Protocol

from backend import maildir
from backend.config import BackendConfig
from backend.metrics import BackendMetrics
from backend.queue import DELIVERED, DEFERRED, Queue, Recipient

log = logging.getLogger("homemx.runner")

IDLE_POLL = 5.0  # the CLI can change the queue from another process; look at least this often
BATCH = 200


class RemoteDelivery(Protocol):
    """Outbound delivery (backend part 2). ``deliver`` attempts the claimed recipients of one
    message and records each outcome in the queue itself."""

    async def deliver(self, message_id: str, recipients: list[Recipient]) -> None: ...


def retry_delay_for(schedule: tuple[float, ...]) -> Callable[[int], float]:
    def delay(attempts_before: int) -> float:
        return schedule[min(attempts_before, len(schedule) - 1)]

    return delay


class QueueRunner:
    def __init__(
        self,
        config: BackendConfig,
        queue: Queue,
        metrics: BackendMetrics,
        run_blocking: Callable[..., Awaitable],
        remote: RemoteDelivery | None = None,
        now: Callable[[], float] = time.time,
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

    def poke(self) -> None:
        """Thread-safe wake-up (the queue's writer thread calls it after a commit)."""
        loop = self._loop
        loop.call_soon_threadsafe(self.wakeup.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue.on_enqueued = self.poke
        while True:
            self.wakeup.clear()
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 - the runner must survive a bad round (disk, DB busy)
                log.exception("queue run failed; retrying")
            timeout = IDLE_POLL
            try:
                nxt = await self.run_blocking(self.queue.next_due_time)
                if nxt is not None:
                    timeout = max(0.0, min(IDLE_POLL, nxt - self.now()))
            except Exception:  # noqa: BLE001
                pass
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def run_once(self) -> None:
        # Remote recipients wait when there is no outbound delivery or it is paused for maintenance;
        # local ones are always delivered.
        local_only = None if self.remote is not None and not self.config.delivery.paused else True
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

    async def _deliver_local(self, message_id: str, rcpts: list[Recipient]) -> None:
        content = await self.run_blocking(self.queue.content, message_id)
        entry = await self.run_blocking(self.queue.get, message_id)
        for r in rcpts:
            box = self.config.maildir_for(r.address)
            prefix = f"Return-Path: <{entry.sender}>\r\nDelivered-To: {r.address}\r\n".encode()
            try:
                await self.run_blocking(maildir.deliver, box, content, f"{message_id}_{r.id}", prefix)
            except OSError as e:
                log.error("queue=%s rcpt=%s maildir delivery deferred: %s", message_id, r.address, e)
                self.metrics.maildir_deliveries.labels("deferred").inc()
                await self.run_blocking(self.queue.set_result, r.id, DEFERRED, f"451 4.3.0 Maildir write failed: {e.strerror}")
                continue
            self.metrics.maildir_deliveries.labels("delivered").inc()
            await self.run_blocking(self.queue.set_result, r.id, DELIVERED, "250 2.0.0 Delivered to Maildir")
            log.info("queue=%s rcpt=%s delivered to maildir", message_id, r.address)

    async def drain(self, timeout: float) -> None:
        """Let deliveries in flight finish for ``timeout`` seconds, then cancel the rest: their next
        attempt was recorded before they started, so nothing is lost and nothing is re-hammered."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
