"""Outbound delivery: MX resolution, SMTP transactions (aiosmtplib), TLS policy, per-recipient outcomes, retries and DSNs.

Theory of operation. The queue runner claims due recipients (their next attempt is already moved
forward, so a crash mid-delivery never re-hammers a destination) and calls ``Deliverer.deliver``
with the claimed recipients of one message. They are grouped by destination (domain, or the
smarthost), and each group is one SMTP transaction carrying all its recipients. Hosts are tried
in MX preference order; a host that cannot be reached or refuses the session before any recipient
was decided makes us try the next one. Every recipient ends the attempt with one outcome:

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

Sessions stay open after a transaction (RSET, then idle in a pool) so that the next message to
the same host reuses them; a session idle for ``pool_idle_timeout`` gets its QUIT (from a timer, so
also when no mail follows) and is never reused. A global and a per-destination semaphore bound
concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver

from backend.deliver import dsn
from backend.config import BackendConfig
from backend.metrics import BackendMetrics
from backend.deliver.mtasts import ASYNCIO_DNS, MTASTS, STORE_FILE, Policy, PolicyStore
from backend.queue.model import BOUNCED, DEFERRED, DELIVERED, NewMessage, NewRecipient, QueueEntry, Recipient
from backend.queue.store import Queue

log = logging.getLogger("homemx.delivery")

# Replies we record for failures no remote server spoke (RFC 3463 enhanced codes).
R_NULL_MX = "556 5.1.10 Recipient domain does not accept mail (null MX, RFC 7505)"
R_NO_DOMAIN = "550 5.1.2 Recipient domain does not exist (NXDOMAIN)"
R_NO_HOST = "550 5.4.4 Recipient domain has no MX and no address"
R_MX_NO_ADDRESS = "550 5.4.4 No MX host of the recipient domain has an address"
R_DNS_TEMP = "451 4.4.3 DNS lookup failed for {domain}: {error}"
R_CONNECT_FAILED = "421 4.4.1 Cannot connect to {host}: {error}"
R_TIMEOUT = "421 4.4.2 Timeout talking to {host}: {error}"
R_LOST = "421 4.4.2 Connection to {host} lost: {error}"
R_TLS_NOT_OFFERED = "421 4.7.10 TLS required but {host} does not offer STARTTLS"
R_TLS_FAILED = "421 4.7.5 TLS handshake with {host} failed: {error}"
R_MTASTS_NO_MX = "451 4.7.5 No MX host of {domain} matches its MTA-STS policy"
R_SMARTHOST_AUTH = "421 4.7.0 Smarthost {host} refused our credentials: {error}"
R_NO_DATA_REPLY = "451 4.4.2 No reply from {host} after end of data (may or may not be delivered)"
R_EXPIRED = "554 5.4.7 Delivery time expired after {age}; last error: {last}"
R_NO_SMTPUTF8 = "554 5.6.7 {host} does not support SMTPUTF8, required for this {what} (RFC 6531 3.5)"
R_LOCAL_ERROR = "451 4.3.0 Local error during delivery: {error}"

# TLS status of a session, the ``tls`` label of delivery metrics.
TLS_NONE, TLS_UNVERIFIED, TLS_VERIFIED = "none", "unverified", "verified"

# What a destination asks of TLS.
OPPORTUNISTIC, REQUIRED = "opportunistic", "required"

SMARTHOST = "[smarthost]"  # destination key of everything relayed (never a valid domain name)

POOL_IDLE_TIMEOUT = 30.0  # close an idle session after this (Postfix smtp_connection_cache_time_limit is 2 s;
#                           a home server sends little, so a longer reuse window pays off)
POOL_MAX_USES = 100  # Postfix smtp_connection_reuse_count_limit is 100 too


class TemporaryFailure(Exception):
    """A failure that defers (DNS timeout/SERVFAIL, all hosts unreachable, TLS required and missing)."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


class PermanentFailure(Exception):
    """A failure that bounces every recipient of a destination (null MX, NXDOMAIN)."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


class HostFailure(Exception):
    """This host cannot take the transaction now; the next MX host may."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


# ---------------------------------------------------------------- pure helpers


def reply_text(code: int, message: str) -> str:
    """An SMTP reply as one line ("550 5.1.1 No such user"): multi-line replies joined by spaces."""
    return f"{code} {' '.join(message.split())}".strip()


def reply_outcome(code: int) -> str:
    """RFC 5321 4.2.1: 2yz success, 4yz transient, 5yz permanent (anything else: transient)."""
    if 200 <= code < 300:
        return DELIVERED
    if 500 <= code < 600:
        return BOUNCED
    return DEFERRED


def next_attempt_after(now: float, attempts: int, schedule: tuple[float, ...]) -> float:
    """When to try again after the ``attempts``-th attempt (1-based) deferred."""
    return now + schedule[min(max(attempts - 1, 0), len(schedule) - 1)]


def expired(created: float, now: float, max_queue_age: float) -> bool:
    """RFC 5321 4.5.4.1: give up after a few days (the configured max_queue_age)."""
    return now - created >= max_queue_age


def headers_need_smtputf8(message: bytes) -> bool:
    """Whether the header section holds internationalised headers (RFC 6532: raw UTF-8).

    Other 8-bit bytes in headers (a legacy charset sent raw) are not UTF-8 headers; such mail
    goes out as it always has, without SMTPUTF8.
    """
    head = message.partition(b"\r\n\r\n")[0]
    if head.isascii():
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def human_age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} seconds"


@dataclass(frozen=True)
class MXHost:
    name: str
    preference: int
    addresses: tuple[str, ...]


# ---------------------------------------------------------------- DNS


def make_resolver(nameservers: tuple[str, ...], port: int, timeout: float = 10.0) -> dns.asyncresolver.Resolver:
    """dnspython's async resolver, on the configured nameservers (empty: /etc/resolv.conf)."""
    if nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = list(nameservers)
    else:
        r = dns.asyncresolver.Resolver()
    r.port = port
    r.timeout = min(timeout, r.timeout)
    r.lifetime = timeout
    # Positive answers are cached for their TTL: a burst of mail to one domain costs one MX lookup,
    # not one per message (a local caching resolver would do the same; many homes have none).
    r.cache = dns.resolver.LRUCache(4096)
    return r


async def _addresses(resolver, host: str, families: tuple[int, ...]) -> tuple[list[str], str | None]:
    """(addresses, temporary error or None). A and/or AAAA in the order of ``families``."""
    out: list[str] = []
    temp: str | None = None
    for fam in families:
        rtype = "A" if fam == 4 else "AAAA"
        try:
            ans = await resolver.resolve(host, rtype, backend=ASYNCIO_DNS)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as e:
            temp = f"{rtype} {host}: {e.__class__.__name__}"
            continue
        out.extend(r.address for r in ans)
    return out, temp


async def resolve_destination(resolver, domain: str, families: tuple[int, ...] = (4, 6)) -> list[MXHost]:
    """The hosts to try for ``domain``, best first, each with its addresses.

    RFC 5321 5.1: MX records in preference order (equal preferences shuffled); with no MX the
    domain itself is the host (implicit MX). RFC 7505: a null MX ("0 .") means no mail at all.
    Raises PermanentFailure (null MX, NXDOMAIN, nothing to connect to) or TemporaryFailure
    (SERVFAIL, timeout).
    """
    try:
        ans = await resolver.resolve(domain, "MX", backend=ASYNCIO_DNS)
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in ans]
    except dns.resolver.NXDOMAIN:
        raise PermanentFailure(R_NO_DOMAIN) from None
    except dns.resolver.NoAnswer:
        records = None
    except dns.exception.DNSException as e:
        # NoNameservers is what dnspython raises for SERVFAIL; Timeout/LifetimeTimeout for silence.
        raise TemporaryFailure(R_DNS_TEMP.format(domain=domain, error=e.__class__.__name__)) from None

    if records is None:
        addrs, temp = await _addresses(resolver, domain, families)
        if addrs:
            return [MXHost(domain, 0, tuple(addrs))]
        if temp:
            raise TemporaryFailure(R_DNS_TEMP.format(domain=domain, error=temp))
        raise PermanentFailure(R_NO_HOST)

    real = [(p, h) for p, h in records if h not in ("", ".")]
    if not real:
        raise PermanentFailure(R_NULL_MX)
    by_pref: dict[int, list[str]] = defaultdict(list)
    for p, h in real:
        by_pref[p].append(h)
    hosts: list[MXHost] = []
    temps: list[str] = []
    for pref in sorted(by_pref):
        names = by_pref[pref]
        random.shuffle(names)  # RFC 5321 5.1: spread load among equal preferences
        for name in names:
            addrs, temp = await _addresses(resolver, name, families)
            if temp:
                temps.append(temp)
            if addrs:
                hosts.append(MXHost(name, pref, tuple(addrs)))
    if hosts:
        return hosts
    if temps:
        raise TemporaryFailure(R_DNS_TEMP.format(domain=domain, error="; ".join(temps)))
    raise PermanentFailure(R_MX_NO_ADDRESS)


# ---------------------------------------------------------------- sessions


@dataclass
class Session:
    """One open SMTP session to a host, reusable for several transactions."""

    client: aiosmtplib.SMTP
    key: tuple
    peer: str  # "mx.example.net[192.0.2.1]:25" for logs and DSN Remote-MTA
    host_name: str
    tls: str
    uses: int = 0
    idle_since: float = 0.0


@dataclass(frozen=True)
class Target:
    """Where and how to connect for one destination."""

    host_name: str  # MX name: TLS server name and certificate check
    address: str
    port: int
    tls: str  # OPPORTUNISTIC | REQUIRED
    implicit_tls: bool = False
    auth: tuple[str, str] | None = None  # smarthost credentials

    @property
    def key(self) -> tuple:
        return (self.address, self.port, self.host_name, self.tls, self.implicit_tls, self.auth is not None)

    @property
    def peer(self) -> str:
        return f"{self.host_name}[{self.address}]:{self.port}"


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
        self.ca_file = ca_file  # None: the system trust store (tests point it at their CA)
        if mtasts is None and self.d.mta_sts:
            store = PolicyStore(config.server.data_dir / STORE_FILE)
            mtasts = MTASTS(self.resolver, now=now, store=store, run_blocking=run_blocking)
        self.mtasts = mtasts
        # DSNs are signed like every other message we originate (blocking: runs in run_blocking).
        self.signer = signer
        self.is_local_domain = local_domains or (lambda dom: dom.lower() in config.domains)
        self._global = asyncio.Semaphore(self.d.concurrency)
        self._per_dest: dict[str, asyncio.Semaphore] = {}
        self._idle: dict[tuple, list[Session]] = defaultdict(list)
        self._closing: set[asyncio.Task] = set()  # QUITs of expired idle sessions (kept referenced)
        # The pool's own clock (idle times), apart from ``now`` (queue times): tests inject both.
        self.monotonic = monotonic
        self.pool_idle_timeout = pool_idle_timeout
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.families = self._families()
        self._smarthost_password: str | None = None

    def _families(self) -> tuple[int, ...]:
        # A socket bound to an IPv4 source cannot reach an IPv6 MX (and vice versa).
        src = self.d.source_address
        if src is None:
            return (4, 6)
        return (6,) if ":" in src else (4,)

    # ------------------------------------------------------------ TLS contexts

    def tls_context(self, verify: bool) -> ssl.SSLContext:
        if verify:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        else:
            # Opportunistic TLS (RFC 7435): encrypt against passive eavesdropping even when the
            # certificate cannot be checked; most MX certificates do not match the MX name.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

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
            entry = await self.run_blocking(self.queue.get, message_id)
            content = await self.run_blocking(self.queue.content, message_id)
        except Exception:  # noqa: BLE001 - deleted meanwhile (queue delete): nothing to do
            log.warning("queue=%s vanished before delivery", message_id)
            return
        # One transaction per destination: a domain's MX, or the smarthost for all it relays.
        groups: dict[str, list[Recipient]] = defaultdict(list)
        for r in recipients:
            dom = r.domain.lower()
            groups[SMARTHOST if self._smarthost_for(dom) else dom].append(r)
        deferred: list[tuple[Recipient, str, str | None]] = []

        async def attempt(dest: str, rcpts: list[Recipient]) -> None:
            try:
                outcomes = await self._deliver_domain(entry, content, dest, rcpts)
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
        self._sweep_idle()

    # ------------------------------------------------------------ recording and DSNs

    async def _record(self, entry: QueueEntry, content: bytes, rcpts: list[Recipient], outcomes):
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
                    next_attempt = next_attempt_after(now, r.attempts, self.d.retry_schedule)
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

    # ------------------------------------------------------------ one destination

    def _smarthost_for(self, domain: str) -> bool:
        d = self.d
        if d.smarthost is None:
            return False
        if not d.smarthost_domains:
            return True
        return any(domain == s or domain.endswith("." + s) for s in d.smarthost_domains)

    def _semaphore(self, dest: str) -> asyncio.Semaphore:
        sem = self._per_dest.get(dest)
        if sem is None:
            sem = self._per_dest[dest] = asyncio.Semaphore(self.d.per_destination_concurrency)
        return sem

    async def _targets(self, domain: str) -> list[Target]:
        """The connection targets for a domain, best first. Raises Temporary/PermanentFailure."""
        d = self.d
        if domain == SMARTHOST:
            addr, port = d.smarthost
            name = d.smarthost_hostname or addr
            implicit = d.smarthost_tls == "implicit"
            return [Target(name, addr, port, REQUIRED, implicit_tls=implicit, auth=self._smarthost_auth())]
        hosts = await resolve_destination(self.resolver, domain, self.families)
        tls = d.domain_tls_policy.get(domain, d.tls_policy)
        policy: Policy | None = None
        if self.mtasts is not None:
            policy = await self.mtasts.policy(domain)
        if policy is not None and policy.mode == "enforce":
            # RFC 8461 4.1/5: only MX hosts the policy names, and only with a verified certificate.
            allowed = [h for h in hosts if policy.allows(h.name)]
            if not allowed:
                raise TemporaryFailure(R_MTASTS_NO_MX.format(domain=domain))
            hosts, tls = allowed, REQUIRED
        elif policy is not None and policy.mode == "testing":
            for h in hosts:
                if not policy.allows(h.name):
                    log.warning("mta-sts testing: %s MX %s not in policy (delivering anyway)", domain, h.name)
        return [Target(h.name, a, d.remote_port, tls) for h in hosts for a in h.addresses]

    def _smarthost_auth(self) -> tuple[str, str] | None:
        d = self.d
        if d.smarthost_username is None:
            return None
        if self._smarthost_password is None:
            if d.smarthost_password_file is None:
                raise TemporaryFailure("451 4.3.5 smarthost_username set without smarthost_password_file")
            self._smarthost_password = d.smarthost_password_file.read_text().strip()
        return (d.smarthost_username, self._smarthost_password)

    async def _deliver_domain(self, entry: QueueEntry, content: bytes, domain: str, rcpts: list[Recipient]):
        """{rcpt id: (state, reply, remote peer, tls status)} for one destination domain."""
        try:
            targets = await self._targets(domain)
        except PermanentFailure as e:
            return {r.id: (BOUNCED, e.reply, None, TLS_NONE) for r in rcpts}
        except TemporaryFailure as e:
            return {r.id: (DEFERRED, e.reply, None, TLS_NONE) for r in rcpts}
        async with self._global, self._semaphore(domain):
            return await self._try_targets(entry, content, targets, rcpts)

    async def _try_targets(self, entry: QueueEntry, content: bytes, targets: list[Target], rcpts: list[Recipient]):
        outcomes: dict[int, tuple[str, str, str | None, str]] = {}
        pending = list(rcpts)
        last_reply = "421 4.4.1 No host to try"
        for target in targets:
            started = time.monotonic()
            try:
                session = await self._session(target)
            except HostFailure as e:
                last_reply = e.reply
                log.info("queue=%s %s: %s (trying next host)", entry.id, target.peer, e.reply)
                continue
            try:
                decided, reusable = await self._transaction(session, entry.sender, content, pending)
            except HostFailure as e:
                self._discard(session)
                last_reply = e.reply
                log.info("queue=%s %s: %s (trying next host)", entry.id, target.peer, e.reply)
                continue
            except Exception as e:  # noqa: BLE001 - whatever it was, the session is in an unknown state
                # No exception may leave a session neither released nor discarded, nor skip the
                # outcomes: what was not decided is deferred (a duplicate is possible if the error
                # came after the final dot; losing the message is not).
                self._discard(session)
                log.error("queue=%s %s: transaction failed: %r", entry.id, target.peer, e, exc_info=e)
                last_reply = R_LOCAL_ERROR.format(error=e.__class__.__name__)
                break
            finally:
                self.metrics.delivery_duration.observe(time.monotonic() - started)
            if reusable:
                self._release(session)
            else:
                self._discard(session)
            for rid, (state, reply) in decided.items():
                outcomes[rid] = (state, reply, session.peer, session.tls)
            pending = [r for r in pending if r.id not in outcomes]
            if not pending:
                break
        for r in pending:
            outcomes[r.id] = (DEFERRED, last_reply, None, TLS_NONE)
        return outcomes

    # ------------------------------------------------------------ sessions and the pool

    def _take_idle(self, key: tuple) -> Session | None:
        self._sweep_idle()  # an expired session is never reused: it gets its QUIT instead
        idle = self._idle.get(key)
        while idle:
            s = idle.pop()
            if s.client.is_connected:
                return s
            self._discard(s)
        return None

    def _release(self, session: Session) -> None:
        if session.uses >= POOL_MAX_USES or not session.client.is_connected:
            self._discard(session)
            return
        session.idle_since = self.monotonic()
        self._idle[session.key].append(session)
        self._arm_sweep()

    def _discard(self, session: Session) -> None:
        try:
            session.client.close()
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _sweep_idle(self) -> None:
        """QUIT the idle sessions that have waited ``pool_idle_timeout``; drop those the remote closed."""
        now = self.monotonic()
        for key, sessions in list(self._idle.items()):
            keep = []
            for s in sessions:
                if not s.client.is_connected:
                    self._discard(s)
                elif now - s.idle_since >= self.pool_idle_timeout:
                    task = asyncio.ensure_future(self._quit(s))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
                else:
                    keep.append(s)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def _arm_sweep(self) -> None:
        # A timer, so an idle session is closed when it expires even if no other mail follows:
        # holding a slot at the remote (RFC 5321 4.5.3.2.7: servers wait 5 min) helps nobody.
        if self._sweep_timer is not None or not self._idle:
            return
        oldest = min(s.idle_since for ss in self._idle.values() for s in ss)
        delay = max(0.0, oldest + self.pool_idle_timeout - self.monotonic())
        self._sweep_timer = asyncio.get_running_loop().call_later(delay, self._on_sweep_timer)

    def _on_sweep_timer(self) -> None:
        self._sweep_timer = None
        self._sweep_idle()
        self._arm_sweep()

    async def _quit(self, s: Session) -> None:
        try:
            await asyncio.wait_for(s.client.quit(), 5)
        except Exception:  # noqa: BLE001 - a polite QUIT that fails changes nothing
            self._discard(s)

    async def close(self) -> None:
        """QUIT every idle session (daemon shutdown)."""
        if self.mtasts is not None:
            await self.mtasts.close()  # its HTTP client and policy store
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        sessions = [s for ss in self._idle.values() for s in ss]
        self._idle.clear()
        await asyncio.gather(*(self._quit(s) for s in sessions), *self._closing, return_exceptions=True)

    async def _session(self, target: Target) -> Session:
        """An idle session to ``target`` that still answers, or a new one. Raises HostFailure."""
        while True:
            s = self._take_idle(target.key)
            if s is None:
                break
            try:
                resp = await s.client.noop(timeout=self.d.command_timeout)
                if resp.code == 250:
                    return s
            except aiosmtplib.SMTPException:
                pass
            self._discard(s)
        try:
            return await self._connect(target, tls_allowed=True)
        except _TLSHandshakeFailed as e:
            # Opportunistic TLS: a broken TLS stack on the far side must not stop mail
            # (RFC 7435 opportunistic security); reconnect and stay in cleartext. Never for REQUIRED.
            log.info("%s: %s; retrying without TLS (opportunistic)", target.peer, e.reply)
            return await self._connect(target, tls_allowed=False)

    async def _connect(self, target: Target, tls_allowed: bool) -> Session:
        d = self.d
        src = (d.source_address, 0) if d.source_address else None
        verify = target.tls == REQUIRED
        try:
            if target.implicit_tls:
                client = aiosmtplib.SMTP(
                    hostname=target.host_name,
                    sock=await self._bound_socket(target),
                    local_hostname=self.config.server.hostname,
                    timeout=d.command_timeout,
                    use_tls=True,
                    start_tls=False,
                    tls_context=self.tls_context(verify=True),
                )
            else:
                client = aiosmtplib.SMTP(
                    hostname=target.address,
                    port=target.port,
                    local_hostname=self.config.server.hostname,
                    source_address=src,
                    timeout=d.command_timeout,
                    start_tls=False,
                )
            await client.connect(timeout=d.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as e:
            raise HostFailure(reply_text(e.code, e.message)) from None
        except (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError) as e:
            raise HostFailure(R_TIMEOUT.format(host=target.peer, error=e)) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            # aiosmtplib wraps the implicit-TLS handshake's SSLError (a certificate that does not
            # verify) in SMTPConnectError: report it as the TLS failure it is (4.7.5), not as an
            # unreachable host (4.4.1).
            err = e if isinstance(e, ssl.SSLError) else e.__cause__
            if isinstance(err, ssl.SSLError):
                reason = getattr(err, "verify_message", None) or err.reason or err
                raise HostFailure(R_TLS_FAILED.format(host=target.peer, error=reason)) from None
            raise HostFailure(R_CONNECT_FAILED.format(host=target.peer, error=getattr(e, "strerror", None) or e)) from None
        tls = TLS_VERIFIED if target.implicit_tls else TLS_NONE
        try:
            await self._hello(client, target, starttls_required=verify and not target.implicit_tls)
            if not target.implicit_tls:
                if tls_allowed and client.supports_extension("starttls"):
                    try:
                        resp = await client.starttls(
                            server_hostname=target.host_name,
                            tls_context=self.tls_context(verify),
                            timeout=d.command_timeout,
                        )
                    except (ssl.SSLError, ssl.CertificateError, aiosmtplib.SMTPServerDisconnected, ConnectionError) as e:
                        # A server that drops the connection mid-handshake is a TLS failure too.
                        client.close()
                        reply = R_TLS_FAILED.format(host=target.peer, error=getattr(e, "reason", None) or e)
                        if verify:
                            raise HostFailure(reply) from None
                        raise _TLSHandshakeFailed(reply) from None
                    except aiosmtplib.SMTPResponseException as e:
                        if verify:
                            raise HostFailure(reply_text(e.code, e.message)) from None
                        raise _TLSHandshakeFailed(reply_text(e.code, e.message)) from None
                    if resp.code != 220:
                        raise HostFailure(reply_text(resp.code, resp.message))
                    tls = TLS_VERIFIED if verify else TLS_UNVERIFIED
                    await self._hello(client, target, starttls_required=False)  # RFC 3207 4.2: forget and ask again
                elif verify:
                    # RFC 3207 / RFC 8461 5: with TLS required, never fall back to cleartext.
                    raise HostFailure(R_TLS_NOT_OFFERED.format(host=target.peer))
            if target.auth is not None:
                try:
                    await client.login(*target.auth)
                except aiosmtplib.SMTPAuthenticationError as e:
                    raise HostFailure(R_SMARTHOST_AUTH.format(host=target.peer, error=reply_text(e.code, e.message))) from None
                except aiosmtplib.SMTPException as e:
                    raise HostFailure(R_SMARTHOST_AUTH.format(host=target.peer, error=e)) from None
        except (HostFailure, _TLSHandshakeFailed):
            client.close()
            raise
        except aiosmtplib.SMTPResponseException as e:
            client.close()
            raise HostFailure(reply_text(e.code, e.message)) from None
        except (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError) as e:
            client.close()
            raise HostFailure(R_TIMEOUT.format(host=target.peer, error=e)) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            client.close()
            raise HostFailure(R_LOST.format(host=target.peer, error=e)) from None
        log.debug("connected to %s tls=%s", target.peer, tls)
        return Session(client, target.key, target.peer, target.host_name, tls)

    async def _bound_socket(self, target: Target) -> socket.socket:
        """A TCP socket bound to the source address and connected (implicit-TLS smarthost path,
        where aiosmtplib needs a ready socket to use the relay's name for the TLS handshake)."""
        fam = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if self.d.source_address:
                sock.bind((self.d.source_address, 0))
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (target.address, target.port)), self.d.connect_timeout
            )
        except BaseException:
            sock.close()
            raise
        return sock

    async def _hello(self, client: aiosmtplib.SMTP, target: Target, starttls_required: bool) -> None:
        """EHLO; HELO to a server that refuses EHLO (RFC 5321 3.2: the client SHOULD fall back).

        A HELO session has no extensions, so no STARTTLS: where TLS is still to be started and is
        required, refusing EHLO ends the attempt as "TLS not offered" (never a cleartext fallback).
        """
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError as e:
            if e.code < 500:
                raise
            if starttls_required:
                raise HostFailure(R_TLS_NOT_OFFERED.format(host=target.peer)) from None
            await client.helo()

    async def _transaction(self, s: Session, sender: str, content: bytes, rcpts: list[Recipient]):
        """One MAIL/RCPT.../DATA on an open session: ({rcpt id: (state, reply)}, session reusable).

        Raises HostFailure when nothing was decided and the next MX may do better.
        """
        c = s.client
        s.uses += 1
        decided: dict[int, tuple[str, str]] = {}
        options = []
        if c.supports_extension("size"):
            options.append(f"SIZE={len(content)}")  # RFC 1870
        if c.supports_extension("8bitmime") and not content.isascii():
            options.append("BODY=8BITMIME")  # RFC 6152
        # RFC 6531 3.4: a transaction carrying a UTF-8 address or UTF-8 headers says SMTPUTF8 in
        # MAIL; 3.5: a server that does not offer it must not be sent either, and we do not
        # downgrade (RFC 6857), so those recipients bounce with 5.6.7.
        message_utf8 = not sender.isascii() or headers_need_smtputf8(content)
        utf8_rcpts = [r for r in rcpts if not r.address.isascii()]
        if message_utf8 or utf8_rcpts:
            if c.supports_extension("smtputf8"):
                options.append("SMTPUTF8")
            elif message_utf8:
                what = "sender address" if not sender.isascii() else "message's headers"
                return {r.id: (BOUNCED, R_NO_SMTPUTF8.format(host=s.peer, what=what)) for r in rcpts}, True
            else:
                # Only some recipients need it: they bounce, the others go as plain ASCII.
                for r in utf8_rcpts:
                    decided[r.id] = (BOUNCED, R_NO_SMTPUTF8.format(host=s.peer, what="recipient address"))
                rcpts = [r for r in rcpts if r.id not in decided]
                if not rcpts:
                    return decided, True
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        try:
            try:
                await c.mail(sender, options=options, encoding=encoding)
            except aiosmtplib.SMTPSenderRefused as e:
                reply = reply_text(e.code, e.message)
                if reply_outcome(e.code) == BOUNCED:
                    await self._rset(c)
                    decided.update({r.id: (BOUNCED, reply) for r in rcpts})
                    return decided, c.is_connected
                if not decided:
                    raise HostFailure(reply) from None
                return self._defer_rest(decided, rcpts, reply), c.is_connected
            accepted: list[Recipient] = []
            for r in rcpts:
                try:
                    await c.rcpt(r.address, encoding=encoding)
                    accepted.append(r)
                except aiosmtplib.SMTPRecipientRefused as e:
                    decided[r.id] = (reply_outcome(e.code), reply_text(e.code, e.message))
            if not accepted:
                await self._rset(c)
                return decided, c.is_connected
        except (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError) as e:
            if not decided:
                raise HostFailure(R_TIMEOUT.format(host=s.peer, error=e)) from None
            return self._defer_rest(decided, rcpts, R_TIMEOUT.format(host=s.peer, error=e)), False
        except (aiosmtplib.SMTPException, OSError) as e:
            if not decided:
                raise HostFailure(R_LOST.format(host=s.peer, error=e)) from None
            return self._defer_rest(decided, rcpts, R_LOST.format(host=s.peer, error=e)), False
        # From here on the message may have reached the server: no next-MX retry (that would
        # risk a duplicate); whatever goes wrong defers the accepted recipients (RFC 5321 6.1).
        try:
            resp = await c.data(content, timeout=self.d.command_timeout)
            reply = reply_text(resp.code, resp.message)
            for r in accepted:
                decided[r.id] = (DELIVERED, reply)
            await self._rset(c)
            return decided, c.is_connected
        except aiosmtplib.SMTPDataError as e:
            reply = reply_text(e.code, e.message)
            for r in accepted:
                decided[r.id] = (reply_outcome(e.code), reply)
            await self._rset(c)
            return decided, c.is_connected
        except (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError):
            return self._defer_rest(decided, rcpts, R_NO_DATA_REPLY.format(host=s.peer)), False
        except (aiosmtplib.SMTPException, OSError) as e:
            return self._defer_rest(decided, rcpts, R_LOST.format(host=s.peer, error=e)), False

    @staticmethod
    def _defer_rest(decided: dict, rcpts: list[Recipient], reply: str) -> dict:
        for r in rcpts:
            decided.setdefault(r.id, (DEFERRED, reply))
        return decided

    async def _rset(self, c: aiosmtplib.SMTP) -> None:
        # RFC 5321 4.1.1.5: RSET ends the transaction so the session can carry the next message.
        try:
            await c.rset(timeout=self.d.command_timeout)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            c.close()


class _TLSHandshakeFailed(Exception):
    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply
