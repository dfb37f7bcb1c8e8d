"""Delivery webhooks of the HTTP send API: the durable event queue (table ``webhook_event`` in the
queue database), the worker that POSTs each event, signed, to its API key's ``webhook_url`` with
retries, and the per-message view of those deliveries for ``GET /v1/messages/{id}``.

Theory of operation.

1. Events. When the queue records the outcome of a recipient of a message sent through an API key
   (``message.api_key`` set) as delivered, deferred or bounced, ``record_events`` writes one event
   row *in the same commit* (``Queue.record_outcomes`` calls it; every outcome, local or remote,
   goes through that one method). A crash can never leave an outcome without its event, nor an
   event without its outcome. The JSON body is fixed then (the event's id is the receiver's
   de-duplication key: delivery is at least once). Every API message gets its events; whether its
   key has a webhook is looked up when the event is sent (the keys file is another database, and
   reading it inside the queue's commit would make mail wait on it): an event whose key has no
   webhook (or no longer exists) is dropped then.
2. Sending. ``WebhookSender`` runs beside the queue runner as its own task with at most
   ``concurrency`` POSTs at once and a bounded time per POST (``[api] webhook_timeout``): a
   receiver that hangs or is down holds a slot of its own, never a delivery. Like the mail queue,
   an event's next attempt is planned *before* the POST (``claim_due``), so a crash mid-POST never
   makes it hammer the receiver on restart; a 2xx answer marks it sent. Anything else (another
   status, a refused connection, no answer in time) leaves it pending for the planned retry
   (``[api] webhook_retry_schedule``: 10 s, 30 s, 1 min, 5 min, 15 min, 30 min, then hourly);
   once it is older than ``[api] webhook_give_up_after`` (3 days) a failure gives it up (state
   ``failed``, its last error kept). Redirects are not followed (a 3xx is a failure).
3. Signing (replay-safe, as Stripe's and Standard Webhooks' schemes): headers
   ``Homemx-Timestamp: <unix seconds>`` and ``Homemx-Signature: v1=<hex HMAC-SHA256(secret,
   "<timestamp>.<body>")>``, a fresh timestamp at each attempt. The receiver recomputes the HMAC
   over the raw body, compares in constant time, and rejects a timestamp more than a few minutes
   from its clock (``verify_signature``; docs/api.md "Webhooks" has a stand-alone snippet).

Metrics: ``homemx_backend_webhook_deliveries_total{key,result}`` (sent, retry, gave_up) and
``homemx_backend_webhook_pending``. Logs: one line per POST outcome (never the URL's query, the
secret or the body).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import aiohttp

from backend.http.apikeys import KeyStore
from backend.queue.model import BOUNCED, DEFERRED, DELIVERED

log = logging.getLogger("homemx.webhooks")

EVENTS = (DELIVERED, DEFERRED, BOUNCED)
PENDING, SENT, FAILED = "pending", "sent", "failed"
CONCURRENCY = 4  # POSTs at once: a home box has a handful of receivers
IDLE_POLL = 30.0  # look at the table at least this often (wake-ups after commits are best effort)
FAILURE_WAIT = 5.0  # after a round that could not read or write the table
PURGE_EVERY = 300.0
SIGNATURE_TOLERANCE = 300  # seconds a receiver should accept between our timestamp and its clock
USER_AGENT = "homemx-webhooks/1"


# ---------------------------------------------------------------- events, in the outcome's commit


def record_events(conn: sqlite3.Connection, now: float, outcomes: Iterable[tuple[int, str]]) -> int:
    """Write the webhook events of ``outcomes`` (recipient id, state just recorded) inside the
    caller's transaction: one per recipient of a message sent through an API key that is now
    delivered, deferred or bounced (a held recipient kept its state: no event). Returns how many."""
    wanted = {rid: state for rid, state in outcomes if state in EVENTS}
    if not wanted:
        return 0
    q = ",".join("?" * len(wanted))
    rows = conn.execute(
        "SELECT r.id, r.message_id, r.address, r.orig_address, r.state, r.attempts, r.last_reply, m.api_key"
        f" FROM recipient r JOIN message m ON m.id = r.message_id WHERE r.id IN ({q}) AND m.api_key IS NOT NULL",
        list(wanted),
    ).fetchall()
    events = []
    for rid, message_id, address, orig, state, attempts, reply, api_key in rows:
        if state != wanted[rid]:
            continue
        event_id = "evt_" + secrets.token_hex(10)
        payload = {
            "id": event_id, "event": state, "message_id": message_id, "recipient": address,
            "original_recipient": orig, "timestamp": round(now, 3), "reply": reply, "attempts": attempts,
        }
        events.append((event_id, api_key, message_id, address, state, now, json.dumps(payload), PENDING, now))
    conn.executemany(
        "INSERT INTO webhook_event (id, api_key, message_id, recipient, event, created, payload, state, next_attempt)"
        " VALUES (?,?,?,?,?,?,?,?,?)", events,
    )
    return len(events)


def webhook_status(source: Any, message_id: str) -> list[dict]:
    """The webhook events of a message and how their delivery went, oldest first, for ``GET
    /v1/messages/{id}``. ``source``: the Queue, or a connection to the queue database. Blocking."""

    def query(conn: sqlite3.Connection) -> list[dict]:
        rows = conn.execute(
            "SELECT id, event, recipient, created, state, attempts, next_attempt, last_attempt, last_error,"
            " delivered_at FROM webhook_event WHERE message_id = ? ORDER BY created, id", (message_id,),
        ).fetchall()
        return [
            {"id": r[0], "event": r[1], "recipient": r[2], "created": r[3], "state": r[4], "attempts": r[5],
             "next_attempt": r[6] if r[4] == PENDING else None, "last_attempt": r[7], "last_error": r[8],
             "delivered_at": r[9]}
            for r in rows
        ]

    if isinstance(source, sqlite3.Connection):
        return query(source)
    return source.read(query)  # the Queue


# ---------------------------------------------------------------- signing


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Homemx-Signature`` value: ``v1=`` and the hex HMAC-SHA256 of "<timestamp>.<body>"."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, signature_header: str, body: bytes,
                     now: float | None = None, tolerance: int = SIGNATURE_TOLERANCE) -> bool:
    """What a receiver does: the timestamp is within ``tolerance`` seconds of its clock (an old
    request replayed is refused) and one of the header's comma-separated ``v1=`` values is the
    HMAC, compared in constant time."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    expected = signature(secret, ts, body)
    return any(hmac.compare_digest(expected, v.strip()) for v in signature_header.split(","))


# ---------------------------------------------------------------- the event table's operations


@dataclass(frozen=True)
class ClaimedEvent:
    id: str
    api_key: str
    message_id: str
    event: str
    created: float
    payload: str
    attempts: int  # this one included
    next_attempt: float  # planned before the POST: the retry if it fails


def retry_delay_for(schedule: tuple[float, ...]) -> Callable[[int], float]:
    """The wait planned after the n-th attempt (n counted before it, 0-based); the last repeats."""
    return lambda attempts_before: schedule[min(max(attempts_before, 0), len(schedule) - 1)]


def _claim_op(limit: int, exclude: frozenset[str], retry_delay: Callable[[int], float]):
    def claim(conn: sqlite3.Connection, now: float) -> list[ClaimedEvent]:
        rows = conn.execute(
            "SELECT id, api_key, message_id, event, created, payload, attempts FROM webhook_event"
            " WHERE state = 'pending' AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
            (now, limit + len(exclude)),
        ).fetchall()
        rows = [r for r in rows if r[0] not in exclude][:limit]
        claimed = [ClaimedEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6] + 1, now + retry_delay(r[6])) for r in rows]
        conn.executemany(
            "UPDATE webhook_event SET attempts = ?, last_attempt = ?, next_attempt = ? WHERE id = ?",
            [(c.attempts, now, c.next_attempt, c.id) for c in claimed],
        )
        return claimed

    return claim


def _result_op(event_id: str, state: str, error: str | None):
    def result(conn: sqlite3.Connection, now: float) -> None:
        conn.execute(
            "UPDATE webhook_event SET state = ?, last_error = ?, delivered_at = ? WHERE id = ?",
            (state, error, now if state == SENT else None, event_id),
        )

    return result


def _drop_op(event_id: str):
    def drop(conn: sqlite3.Connection, now: float) -> None:
        conn.execute("DELETE FROM webhook_event WHERE id = ?", (event_id,))

    return drop


def _purge_op(keep_for: float):
    def purge(conn: sqlite3.Connection, now: float) -> int:
        return conn.execute(
            "DELETE FROM webhook_event WHERE state != 'pending' AND COALESCE(delivered_at, last_attempt, created) < ?",
            (now - keep_for,),
        ).rowcount

    return purge


def _pending(exclude: frozenset[str], conn: sqlite3.Connection) -> tuple[int, float | None]:
    """(pending events, when the earliest one not under way is due)."""
    count = conn.execute("SELECT COUNT(*) FROM webhook_event WHERE state = 'pending'").fetchone()[0]
    rows = conn.execute(
        "SELECT id, next_attempt FROM webhook_event WHERE state = 'pending' ORDER BY next_attempt LIMIT ?",
        (len(exclude) + 1,),
    )
    return count, next((due for eid, due in rows if eid not in exclude), None)


def _reason(e: BaseException, timeout: float) -> str:
    """One line for a failed POST (no traceback: a receiver being down is a normal event)."""
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect: {e.os_error.strerror or e.os_error}"
    return f"{type(e).__name__}: {e}"[:200]


# ---------------------------------------------------------------- the worker


class WebhookSender:
    """POSTs due events to their keys' webhooks, beside the queue runner (Backend.start)."""

    def __init__(
        self,
        queue,  # backend.queue.store.Queue: transact, read, on_webhook_events
        keys,  # backend.http.apikeys.KeyStore: get, webhook_secret, sent
        metrics,
        run_blocking: Callable[..., Awaitable],
        *,
        schedule: tuple[float, ...],
        give_up_after: float,
        timeout: float,
        keep_for: float = 86400.0,
        concurrency: int = CONCURRENCY,
        now: Callable[[], float] = time.time,
        idle_poll: float = IDLE_POLL,
    ):
        self.queue, self.keys, self.metrics, self.run_blocking = queue, keys, metrics, run_blocking
        self.retry_delay = retry_delay_for(schedule)
        self.give_up_after, self.timeout, self.keep_for = give_up_after, timeout, keep_for
        self.concurrency, self.now, self.idle_poll = concurrency, now, idle_poll
        self.wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: dict[str, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None
        self._last_purge = 0.0

    @classmethod
    def from_config(cls, config, queue, metrics, run_blocking: Callable[..., Awaitable]) -> "WebhookSender":
        """The daemon's sender: [api] webhook settings, the keys file in data_dir (blocking: opens it)."""
        api = config.api
        return cls(queue, KeyStore(config.server.data_dir / "apikeys.sqlite3"), metrics, run_blocking,
                   schedule=api.webhook_retry_schedule, give_up_after=api.webhook_give_up_after,
                   timeout=api.webhook_timeout, keep_for=config.delivery.keep_final)

    def poke(self) -> None:
        """Thread-safe wake-up (the queue calls it after a commit that wrote events)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.wakeup.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue.on_webhook_events = self.poke
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=self.concurrency),
            headers={"User-Agent": USER_AGENT},
        )
        try:
            while True:
                self.wakeup.clear()
                try:
                    wait = await self.run_once()
                except Exception as e:  # noqa: BLE001 - a bad round (database busy, disk) is retried
                    log.warning("webhook round failed: %s: %s; retrying in %.0f s", type(e).__name__, e, FAILURE_WAIT)
                    wait = FAILURE_WAIT
                woken = asyncio.ensure_future(self.wakeup.wait())
                try:
                    await asyncio.wait([woken], timeout=wait)
                finally:
                    woken.cancel()
        finally:
            await self.close()

    async def close(self) -> None:
        """Cancel POSTs under way (their next attempt is already planned) and close the client."""
        tasks = list(self._in_flight.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_once(self) -> float:
        """Start the due POSTs there are free slots for; returns how long to wait for the next."""
        free = self.concurrency - len(self._in_flight)
        if free > 0:
            claimed = await self.run_blocking(
                self.queue.transact, _claim_op(free, frozenset(self._in_flight), self.retry_delay)
            )
            for ev in claimed:
                self._in_flight[ev.id] = asyncio.create_task(self._attempt(ev), name=f"webhook-{ev.id}")
        if self.now() - self._last_purge > PURGE_EVERY:
            self._last_purge = self.now()
            await self.run_blocking(self.queue.transact, _purge_op(self.keep_for))
        count, due = await self.run_blocking(self.queue.read, functools.partial(_pending, frozenset(self._in_flight)))
        self.metrics.webhook_pending.set(count)
        if len(self._in_flight) >= self.concurrency or due is None:
            return self.idle_poll  # a finishing POST wakes the loop
        return max(0.0, min(self.idle_poll, due - self.now()))

    async def _attempt(self, ev: ClaimedEvent) -> None:
        try:
            await self._post(ev)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not kill the worker; the retry is planned
            log.exception("webhook evt=%s key=%s: attempt failed", ev.id, ev.api_key)
        finally:
            self._in_flight.pop(ev.id, None)
            self.wakeup.set()

    async def _post(self, ev: ClaimedEvent) -> None:
        key = await self.run_blocking(self.keys.get, ev.api_key)
        secret = await self.run_blocking(self.keys.webhook_secret, ev.api_key) if key is not None else None
        if key is None or not key.webhook_url or not secret:
            await self.run_blocking(self.queue.transact, _drop_op(ev.id))
            log.debug("webhook evt=%s key=%s: the key has no webhook; event dropped", ev.id, ev.api_key)
            return
        body = self._body(ev, await self._tags(ev))
        timestamp = int(self.now())
        headers = {
            "Content-Type": "application/json",
            "Homemx-Timestamp": str(timestamp),
            "Homemx-Signature": signature(secret, timestamp, body),
            "Homemx-Event-Id": ev.id,
        }
        assert self._session is not None
        error: str | None
        try:
            async with self._session.post(key.webhook_url, data=body, headers=headers, allow_redirects=False) as resp:
                error = None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            error = _reason(e, self.timeout)
        if error is None:
            await self.run_blocking(self.queue.transact, _result_op(ev.id, SENT, None))
            self.metrics.webhook_deliveries.labels(ev.api_key, "sent").inc()
            log.info("webhook evt=%s key=%s queue=%s event=%s sent (attempt %d)", ev.id, ev.api_key, ev.message_id,
                     ev.event, ev.attempts)
            return
        if self.now() - ev.created >= self.give_up_after:
            await self.run_blocking(self.queue.transact, _result_op(ev.id, FAILED, error))
            self.metrics.webhook_deliveries.labels(ev.api_key, "gave_up").inc()
            log.warning("webhook evt=%s key=%s queue=%s event=%s given up after %d attempts: %s", ev.id, ev.api_key,
                        ev.message_id, ev.event, ev.attempts, error)
            return
        await self.run_blocking(self.queue.transact, _result_op(ev.id, PENDING, error))
        self.metrics.webhook_deliveries.labels(ev.api_key, "retry").inc()
        log.warning("webhook evt=%s key=%s queue=%s event=%s failed (attempt %d): %s; next in %.0f s", ev.id,
                    ev.api_key, ev.message_id, ev.event, ev.attempts, error, max(0.0, ev.next_attempt - self.now()))

    async def _tags(self, ev: ClaimedEvent) -> list[str] | None:
        """The tags the message was sent with (the keys file remembers them), if any."""
        sent_record = getattr(self.keys, "sent", None)
        if sent_record is None:
            return None
        sent = await self.run_blocking(sent_record, ev.message_id)
        return list(sent[4]) if sent is not None and len(sent) > 4 and sent[4] else None

    @staticmethod
    def _body(ev: ClaimedEvent, tags: list[str] | None) -> bytes:
        payload = json.loads(ev.payload)
        if tags:
            payload["tags"] = tags
        return json.dumps(payload, separators=(",", ":")).encode()
