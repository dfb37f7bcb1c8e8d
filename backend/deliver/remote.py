"""Outbound delivery of claimed recipients: grouping by destination, trying its hosts in order,
and recording every outcome (with the DSN of what bounced) in the queue.

Theory of operation. The queue runner claims due recipients (their next attempt is already moved
forward, so a crash mid-delivery never re-hammers a destination) and calls ``Deliverer.deliver``
with the claimed recipients of one message. They are grouped by destination (domain, or the
smarthost: ``tlspolicy``), and each group is one SMTP transaction carrying all its recipients.
Hosts are tried in MX preference order (``mx``); a host that cannot be reached or refuses the
session before any recipient was decided makes us try the next one (``connect``,
``transaction``). Every recipient ends the attempt with one outcome:

    2xx                                  → delivered
    4xx, connection error, timeout,      → deferred, next attempt from the retry schedule
    no reply after the final dot           (bounced instead once max_queue_age has passed)
    5xx, null MX, NXDOMAIN,              → bounced
    SMTPUTF8 needed but not offered

Each destination's outcomes are committed as soon as it is done, in the same transaction as one
RFC 3464 report for its bounced recipients (never to ``<>``), so a crash cannot separate a bounce
from its report. A message still deferred after ``delay_notice_after`` gets one "delayed" report,
queued in the commit that marks it sent. Reports are DKIM-signed and queued as new messages from
``<>``: the runner puts them in the Maildir of a local sender or delivers them here.

Sessions stay open after a transaction in a pool (``pool``). A global and a per-destination
semaphore bound concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from backend.config import BackendConfig
from backend.deliver import dsn
from backend.deliver.connect import Connector
from backend.deliver.mtasts import MTASTS, STORE_FILE, PolicyStore
from backend.deliver.mx import PermanentFailure, TemporaryFailure
from backend.deliver.pool import POOL_IDLE_TIMEOUT, Pool
from backend.deliver.tlspolicy import SMARTHOST, TLS_NONE, Destinations, Target, destination_of
from backend.deliver.transaction import R_TLS_NOT_OFFERED, HostFailure, Transaction
from backend.dns.resolver import make_resolver
from backend.metrics import BackendMetrics
from backend.queue.runner import retry_delay_for
from backend.queue.model import BOUNCED, DEFERRED, NewMessage, NewRecipient, QueueEntry, Recipient
from backend.queue.store import Queue
from backend.reports import tlsrpt

log = logging.getLogger("homemx.delivery")

R_EXPIRED = "554 5.4.7 Delivery time expired after {age}; last error: {last}"
R_LOCAL_ERROR = "451 4.3.0 Local error during delivery: {error}"
R_NO_HOST_TO_TRY = "421 4.4.1 No host to try"

# {rcpt id: (state, reply, remote peer or None, tls status)}: one destination's attempt.
Outcomes = dict[int, tuple[str, str, "str | None", str]]


def expired(created: float, now: float, max_queue_age: float) -> bool:
    """RFC 5321 4.5.4.1: give up after a few days (the configured max_queue_age)."""
    return now - created >= max_queue_age


def human_age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} seconds"


def _dsn_recipient(r, reply: str, remote: str | None, now: float, action: str, retry_until: float | None = None):
    """One recipient's part of a DSN: failed (permanent status) or delayed (will retry until)."""
    return dsn.DSNRecipient(
        final_recipient=r.address,
        original_recipient=r.orig_address,
        action=action,
        status=dsn.status_from_reply(reply, permanent=action == dsn.FAILED),
        diagnostic=reply,
        remote_mta=f"dns; {remote.split('[')[0]}" if remote else None,
        last_attempt=now,
        will_retry_until=retry_until,
    )


class Deliverer:
    """The outbound half of the backend: what the queue runner calls ``remote``."""

    def __init__(
        self,
        config: BackendConfig,
        queue: Queue,
        metrics: BackendMetrics,
        run_blocking: Callable[..., Awaitable],
        *,
        now: Callable[[], float] = time.time,
        resolver=None,
        mtasts: MTASTS | None = None,
        ca_file: str | None = None,
        local_domains: Callable[[str], bool] | None = None,
        signer: Callable[[bytes, str], bytes] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        pool_idle_timeout: float = POOL_IDLE_TIMEOUT,
    ):
        self.config = config
        self.d = config.delivery
        self.queue = queue
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.now = now
        self.resolver = resolver or make_resolver(self.d.nameservers, self.d.dns_port)
        if mtasts is None and self.d.mta_sts:
            store = PolicyStore(config.server.data_dir / STORE_FILE)
            mtasts = MTASTS(self.resolver, now=now, store=store, run_blocking=run_blocking)
        self.mtasts = mtasts
        # TLS-RPT (RFC 8460): every new session's TLS outcome, under the policy it was made with.
        self.tls_outcomes = tlsrpt.Recorder(config.server.data_dir, metrics, run_blocking, now)
        self.policies = tlsrpt.PolicyMemo(mtasts, self.tls_outcomes) if mtasts is not None else None
        self.destinations = Destinations(self.d, self.resolver, self.policies)
        self.pool = Pool(
            Connector(config, ca_file).open, self.d.command_timeout, monotonic=monotonic, idle_timeout=pool_idle_timeout
        )
        self.retry_delay = retry_delay_for(self.d.retry_schedule)
        # DSNs are signed like every other message we originate (blocking: runs in run_blocking).
        self.signer = signer
        self.is_local_domain = local_domains or (lambda dom: dom.lower() in config.domains)
        self._global = asyncio.Semaphore(self.d.concurrency)
        self._per_dest: dict[str, asyncio.Semaphore] = {}

    async def close(self) -> None:
        """Close the MTA-STS client and QUIT every idle session (daemon shutdown)."""
        if self.mtasts is not None:
            await self.mtasts.close()  # its HTTP client and policy store
        await self.pool.close()

    # ------------------------------------------------------------ entry point

    async def deliver(self, message_id: str, recipients: list[Recipient]) -> None:
        """Attempt the claimed ``recipients`` of one message and record each outcome in the queue.

        Each destination's outcomes are committed as soon as that destination is done, together
        with the DSN for its bounced recipients: a slow MX elsewhere does not hold them back (a
        crash meanwhile would make us deliver them again), and a crash can never leave a
        recipient bounced without its report. One message may so produce several DSNs, one per
        destination that bounced something, which RFC 3464 allows.
        """
        try:
            entry, content = await self.run_blocking(self._entry_and_content, message_id)
        except Exception:  # noqa: BLE001 - deleted meanwhile (queue delete): nothing to do
            log.warning("queue=%s vanished before delivery", message_id)
            return
        # One transaction per destination: a domain's MX, or the smarthost for all it relays.
        groups: dict[str, list[Recipient]] = {}
        for r in recipients:
            groups.setdefault(destination_of(self.d, r.domain.lower()), []).append(r)
        deferred: list[tuple[Recipient, str, str | None]] = []

        async def attempt(dest: str, rcpts: list[Recipient]) -> None:
            try:
                outcomes = await self._deliver_destination(entry, content, dest, rcpts)
            except Exception as e:  # noqa: BLE001 - a bug defers the recipients; it never strands them
                log.error("queue=%s domain=%s delivery crashed: %r", message_id, dest, e, exc_info=e)
                reply = R_LOCAL_ERROR.format(error=e.__class__.__name__)
                outcomes = {r.id: (DEFERRED, reply, None, TLS_NONE) for r in rcpts}
            deferred.extend(await self._record(entry, content, rcpts, outcomes))

        results = await asyncio.gather(*(attempt(d, rs) for d, rs in groups.items()), return_exceptions=True)
        for dest, res in zip(groups, results):
            if isinstance(res, Exception):
                # Nothing of this destination was committed (one transaction); the next attempt
                # was stored when the recipients were claimed, so they are tried again then.
                log.error("queue=%s domain=%s outcomes not recorded, retried later: %s", message_id, dest, res)
        try:
            await self._delay_notice(entry, content, deferred)
        except Exception as e:  # noqa: BLE001 - not marked sent either: the next attempt sends it
            log.error("queue=%s delay notice not queued, next attempt tries again: %s", message_id, e)
        self.pool.sweep()

    def _entry_and_content(self, message_id: str) -> tuple[QueueEntry, bytes]:
        # Blocking, in one worker-thread hop (each hop costs the event loop a wake-up).
        return self.queue.get(message_id), self.queue.content(message_id)

    # ------------------------------------------------------------ one destination

    def _semaphore(self, dest: str) -> asyncio.Semaphore:
        sem = self._per_dest.get(dest)
        if sem is None:
            sem = self._per_dest[dest] = asyncio.Semaphore(self.d.per_destination_concurrency)
        return sem

    async def _deliver_destination(
        self, entry: QueueEntry, content: bytes, dest: str, rcpts: list[Recipient]
    ) -> Outcomes:
        try:
            targets = await self.destinations.targets(dest)
        except PermanentFailure as e:
            return {r.id: (BOUNCED, e.reply, None, TLS_NONE) for r in rcpts}
        except TemporaryFailure as e:
            return {r.id: (DEFERRED, e.reply, None, TLS_NONE) for r in rcpts}
        async with self._global, self._semaphore(dest):
            return await self._try_targets(entry, content, targets, rcpts, dest)

    async def _try_targets(
        self, entry: QueueEntry, content: bytes, targets: list[Target], rcpts: list[Recipient], dest: str = SMARTHOST
    ) -> Outcomes:
        """Hosts in order until every recipient is decided; what is left is deferred with the last reply."""
        outcomes: Outcomes = {}
        pending = list(rcpts)
        last_reply = R_NO_HOST_TO_TRY
        for target in targets:
            started = time.monotonic()
            try:
                session = await self.pool.session(target)
            except HostFailure as e:
                await self._tls_outcome(dest, target, failure=e)
                last_reply = e.reply
                log.info("queue=%s %s: %s (trying next host)", entry.id, target.peer, e.reply)
                continue
            if session.uses == 0:  # a new session (a pooled one was counted when it was opened)
                await self._tls_outcome(dest, target, session=session)
            session.uses += 1
            try:
                decided, reusable = await Transaction(session.client, session.peer, self.d.command_timeout).run(
                    entry.sender, content, pending
                )
            except HostFailure as e:
                self.pool.discard(session)
                last_reply = e.reply
                log.info("queue=%s %s: %s (trying next host)", entry.id, target.peer, e.reply)
                continue
            except Exception as e:  # noqa: BLE001 - whatever it was, the session is in an unknown state
                # No exception may leave a session neither released nor discarded, nor skip the
                # outcomes: what was not decided is deferred (a duplicate is possible if the error
                # came after the final dot; losing the message is not).
                self.pool.discard(session)
                log.error("queue=%s %s: transaction failed: %r", entry.id, target.peer, e, exc_info=e)
                last_reply = R_LOCAL_ERROR.format(error=e.__class__.__name__)
                break
            finally:
                self.metrics.delivery_duration.observe(time.monotonic() - started)
            if reusable:
                self.pool.release(session)
            else:
                self.pool.discard(session)
            for rid, (state, reply) in decided.items():
                outcomes[rid] = (state, reply, session.peer, session.tls)
            pending = [r for r in pending if r.id not in outcomes]
            if not pending:
                break
        for r in pending:
            outcomes[r.id] = (DEFERRED, last_reply, None, TLS_NONE)
        return outcomes

    async def _tls_outcome(self, dest: str, target: Target, *, session=None, failure: HostFailure | None = None):
        """Record a new session's TLS outcome for TLS-RPT (not for the smarthost: no policy domain)."""
        if dest == SMARTHOST:
            return
        try:
            if failure is not None:
                result = tlsrpt.failure_type(failure, R_TLS_NOT_OFFERED.partition("{")[0])
                if result is None:  # TLS was never tried (unreachable, refused before STARTTLS)
                    return
            else:
                result = tlsrpt.session_type(session.tls, session.client.supports_extension("starttls"), TLS_NONE)
            info = self.policies.info(dest) if self.policies is not None else tlsrpt.policy_info(dest, None)
        except Exception as e:  # noqa: BLE001 - a report must never cost a delivery
            log.error("tls-rpt: outcome of %s not recorded: %r", target.peer, e, exc_info=e)
            return
        await self.tls_outcomes.session(info, result, target.host_name, target.address)  # never raises

    # ------------------------------------------------------------ recording and DSNs

    async def _record(self, entry: QueueEntry, content: bytes, rcpts: list[Recipient], outcomes: Outcomes):
        """Commit one destination's outcomes and the DSN of its bounced recipients in one
        transaction (``Queue.record_outcomes``). Returns the deferred (recipient, reply, remote)."""
        now = self.now()
        rows: list[tuple[int, str, str, float | None]] = []
        done: list[tuple[Recipient, str, str, str | None, str]] = []
        bounced: list[dsn.DSNRecipient] = []
        deferred: list[tuple[Recipient, str, str | None]] = []
        for r in rcpts:
            state, reply, remote, tls = outcomes[r.id]
            next_attempt = None
            if state == DEFERRED:
                if expired(entry.created, now, self.d.max_queue_age):
                    state = BOUNCED
                    reply = R_EXPIRED.format(age=human_age(now - entry.created), last=reply)
                else:
                    # r.attempts already counts this attempt (claim_due added it): the delay
                    # after the n-th attempt is the runner's for n-1 attempts before.
                    next_attempt = now + self.retry_delay(r.attempts - 1)
                    deferred.append((r, reply, remote))
            rows.append((r.id, state, reply, next_attempt))
            done.append((r, state, reply, remote, tls))
            if state == BOUNCED:
                bounced.append(_dsn_recipient(r, reply, remote, now, dsn.FAILED))
        report = await self._dsn_message(entry, content, bounced, dsn.FAILED) if bounced else None
        qids = await self.run_blocking(self.queue.record_outcomes, rows, [report] if report else [])
        for r, state, reply, remote, tls in done:
            self.metrics.delivery_attempts.labels(state, tls).inc()
            log.info(
                "queue=%s rcpt=%s %s via=%s tls=%s attempt=%d reply=%r",
                entry.id, r.address, state, remote or "-", tls, r.attempts, reply,
            )
        if report is not None:
            self._dsn_queued(entry, dsn.FAILED, qids[0], report)
        return deferred

    async def _delay_notice(self, entry: QueueEntry, content: bytes, deferred) -> None:
        """One "delayed" report per message, once it has waited ``delay_notice_after``.

        Sent after every destination of the attempt has finished, so it lists all the deferred
        recipients; queued in the same commit that marks it sent. A crash before that commit only
        postpones it to the next attempt (the deferrals themselves are already recorded).
        """
        now = self.now()
        d_after = self.d.delay_notice_after
        if not deferred or d_after is None or entry.delay_dsn_sent or now - entry.created < d_after:
            return
        until = entry.created + self.d.max_queue_age
        delayed = [_dsn_recipient(r, reply, remote, now, dsn.DELAYED, until) for r, reply, remote in deferred]
        notice = await self._dsn_message(entry, content, delayed, dsn.DELAYED)
        qids = await self.run_blocking(self.queue.record_outcomes, [], [notice] if notice else [], entry.id)
        if notice is not None:
            self._dsn_queued(entry, dsn.DELAYED, qids[0], notice)

    async def expire_local(self, entry: QueueEntry, content: bytes, rcpt: Recipient, last: str) -> None:
        """A local recipient whose Maildir write has failed until the message's max age: bounced
        with the last error, its DSN queued in the same commit, as for a remote one (the runner
        delivers to Maildir itself and calls this; a Maildir that never heals must not keep a
        message, unreported, in the queue forever)."""
        now = self.now()
        reply = R_EXPIRED.format(age=human_age(now - entry.created), last=last)
        report = await self._dsn_message(entry, content, [_dsn_recipient(rcpt, reply, None, now, dsn.FAILED)], dsn.FAILED)
        qids = await self.run_blocking(self.queue.record_outcomes, [(rcpt.id, BOUNCED, reply, None)],
                                       [report] if report else [])
        log.info("queue=%s rcpt=%s bounced: %s", entry.id, rcpt.address, reply)
        if report is not None:
            self._dsn_queued(entry, dsn.FAILED, qids[0], report)

    async def _dsn_message(self, entry: QueueEntry, content: bytes, rcpts: list[dsn.DSNRecipient], kind: str):
        """The report to queue (a DKIM-signed NewMessage from ``<>``), or None for a ``<>`` sender."""
        if not dsn.should_send(entry.sender):
            # RFC 5321 4.5.5 / RFC 3464: a message from <> (itself a DSN) never gets one.
            log.info("queue=%s %s, sender is <>: no DSN", entry.id, kind)
            return None
        report = dsn.build_dsn(
            reporting_mta=self.config.server.hostname,
            sender=entry.sender,
            queue_id=entry.id,
            arrival=entry.created,
            recipients=rcpts,
            headers=dsn.original_headers(content),
            now=self.now(),
        )
        if self.signer is not None:
            # Signed like every message we originate: without it DMARC on a report from
            # MAILER-DAEMON@<hostname> rests on the HELO SPF check alone (issue 11 point 9).
            try:
                report = await self.run_blocking(self.signer, report, "")
            except Exception as e:  # noqa: BLE001 - an unsigned report still beats a lost one
                log.error("queue=%s %s DSN left unsigned: DKIM signing failed: %s", entry.id, kind, e)
        local = self.is_local_domain(entry.sender.rpartition("@")[2])
        return NewMessage(
            sender="",
            recipients=(NewRecipient(entry.sender, entry.sender, local),),
            content=report,
            listener="dsn",
        )

    def _dsn_queued(self, entry: QueueEntry, kind: str, qid: str, report: NewMessage) -> None:
        self.metrics.bounces.labels(kind).inc()
        where = "local" if report.recipients[0].local else "remote"
        log.info("queue=%s %s DSN queued as %s to <%s> (%s)", entry.id, kind, qid, entry.sender, where)
