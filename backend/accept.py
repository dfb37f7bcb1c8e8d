"""The accept pipeline: one path from "a front end has a message" to "it is queued".

Every SMTP listener calls it at the final dot (receive/smtpd.py), and any other front end (the
HTTP send API, a local ``sendmail``) calls it the same way, without SMTP:

    policy (loop count; on submission/lan the From header) → inbound trust (mx: SPF, DKIM, ARC,
    DMARC, rspamd — backend/auth/inbound.py: a refusal, Authentication-Results, or the Junk folder)
    → trace header (Received) → submission fields (Date, Message-ID) → DKIM signature
    (submission/lan) → spool (large bodies) → queue (group commit) → the queue id

It raises ``Refused`` with the SMTP reply to give (a policy 5xx, or 451 for a local fault) and
counts every outcome in ``homemx_backend_messages_received{listener, outcome}``. Envelope checks
(who may send from which address, who receives) stay at MAIL/RCPT time in receive/, where SMTP
can refuse them early; the accept pipeline trusts the envelope it is given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from backend.auth.results import Envelope
from backend.config import BackendConfig
from backend.metrics import BackendMetrics
from backend.queue.model import NewMessage, NewRecipient, QueueError, new_queue_id
from backend.queue.store import Queue
from backend.receive.directory import Directory
from backend.smtp import replies as R
from backend.smtp.message import count_received, from_addresses, has_field, header_block, rfc5322_date

if TYPE_CHECKING:
    from backend.auth.inbound import InboundChecks

log = logging.getLogger("homemx.accept")

MX, SUBMISSION, LAN = "mx", "submission", "lan"


# A message this large is put together off the event loop: bytes.join releases the GIL while it
# copies a large result (CPython), where ``a + b`` holds it; a 25 MB copy held the loop for
# 15-20 ms (first-touch page faults included), every other session's reply waiting behind it
# (docs/benchmarks.md, B6).
JOIN_OFF_LOOP = 1 << 20


async def join(parts: tuple, run_blocking: Callable[..., Awaitable] | None) -> bytes:
    """``b"".join(parts)`` (bytes or memoryviews), on a worker thread when the result is large."""
    if run_blocking is not None and sum(map(len, parts)) >= JOIN_OFF_LOOP:
        return await run_blocking(b"".join, parts)
    return b"".join(parts)


@dataclass(frozen=True)
class Incoming:
    """A message as a front end hands it over: its envelope, what is known of the client, and the
    CRLF-canonical bytes (smtp.message.crlf_canonical)."""

    listener: str  # the listener's name (metrics, queue record)
    kind: str  # MX, SUBMISSION or LAN: which policy applies
    sender: str  # envelope sender, "" for the null sender
    recipients: tuple[NewRecipient, ...]  # resolved at RCPT time
    content: bytes
    client_addr: str
    helo: str = "unknown"
    protocol: str = "ESMTP"  # RFC 3848 ("ESMTPSA" …) for the Received header
    auth_user: str | None = None
    rcpt_to: tuple[str, ...] = ()  # the addresses as the client gave them (a single one is traced)
    max_received: int = 30  # more Received fields than this: a mail loop (RFC 5321 6.3)
    conn_id: str = "-"  # for the log line
    api_key: str | None = None  # the HTTP send API's key that sent it (backend/http/api.py): its webhook hears the outcomes


class Refused(Exception):
    """The message is not queued; ``reply`` is the SMTP answer, ``reason`` the metric label."""

    def __init__(self, reply: str, reason: str):
        super().__init__(reply)
        self.reply, self.reason = reply, reason


class Acceptor:
    def __init__(
        self,
        config: BackendConfig,
        queue: Queue,
        directory: Directory,
        metrics: BackendMetrics,
        run_blocking: Callable[..., Awaitable],
        signer: Callable[[bytes, str, bool], bytes] | None = None,  # (content, sender, canonical)
        checks: InboundChecks | None = None,
    ):
        self.config = config
        self.queue = queue
        self.directory = directory
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.signer = signer  # DKIM (deliver/outbound.py): blocking, (message, sender) -> signed
        self.checks = checks  # inbound trust (auth/inbound.py); None: accept as received

    async def accept(self, m: Incoming, started: float | None = None) -> str:
        """Queue ``m``; returns its queue id, or raises Refused."""
        started = time.monotonic() if started is None else started
        try:
            qid = await self._accept(m)
        except Refused as e:
            self.metrics.messages_received.labels(m.listener, "error" if e.reply.startswith("4") else "rejected").inc()
            raise
        self.metrics.messages_received.labels(m.listener, "accepted").inc()
        log.info(
            "conn=%s client=%s queued %s from=<%s> rcpts=%d size=%d duration=%.3fs",
            m.conn_id, m.client_addr, qid, m.sender, len(m.recipients), len(m.content), time.monotonic() - started,
        )
        return qid

    async def _accept(self, m: Incoming) -> str:
        header = header_block(m.content)
        if count_received(header) >= m.max_received:
            raise Refused(R.R554_LOOP, "mail_loop")
        if m.kind != MX:
            reply = self.check_from_header(m, header)
            if reply:
                raise Refused(reply, "from_not_allowed")
        qid = new_queue_id(time.time())
        content, prefix, folder = (m.content,), self.received_header(m, qid), None
        if self.checks is not None:
            verify = m.kind == MX and self.config.auth.enabled
            scan = self.checks.scans(m.listener, m.kind)
            if verify or scan:
                env = Envelope(m.listener, m.client_addr, m.helo, m.sender,
                               tuple(r.address for r in m.recipients), m.auth_user, qid)
                try:
                    out = await self.checks.check(env, header, m.content, verify=verify, scan=scan)
                except Exception as e:  # noqa: BLE001 - a bug in a check: 451 (the sender retries), never a lost message
                    log.error("conn=%s inbound checks failed: %s: %s", m.conn_id, type(e).__name__, e, exc_info=e)
                    raise Refused(R.R451_LOCAL_ERROR, "local_error") from e
                if out.refuse is not None:
                    raise Refused(*out.refuse)
                if out.header is not None:  # forged fields removed
                    content = (out.header, memoryview(m.content)[len(header):])
                # RFC 8601 5: Authentication-Results goes above the existing fields, with the trace
                # fields of this hop (Received on top: it is the hop's first).
                prefix += out.prepend
                folder = out.folder
        if m.kind != MX:
            prefix += self.submission_fields(header, qid)
        msg = NewMessage(
            sender=m.sender,
            recipients=m.recipients,
            content=await join((prefix, *content), self.run_blocking),
            listener=m.listener,
            client_addr=m.client_addr,
            auth_user=m.auth_user,
            id=qid,
            folder=folder,
            api_key=m.api_key,
        )
        try:
            if self.signer is not None and m.kind != MX:
                # Incoming.content is CRLF-canonical (the front end made it so): not checked again.
                signed = await self.run_blocking(self.signer, msg.content, msg.sender or "<>", True)
                msg = dataclasses.replace(msg, content=signed)
            if len(msg.content) > self.queue.SPOOL_THRESHOLD:
                msg = await self.run_blocking(self.queue.spool_large, msg)
            # The queue's writer thread commits it with whatever else is pending (group commit);
            # waiting on its future takes no worker thread.

            await asyncio.wrap_future(self.queue.submit(msg))
        except Exception as e:  # noqa: BLE001 - any local fault: 451, never 5xx
            # A full disk or a stopped queue is named in one line; anything else is a bug and
            # gets its traceback in the log (never in the reply).
            expected = isinstance(e, (OSError, sqlite3.Error, QueueError))
            log.error("conn=%s could not queue message: %s: %s", m.conn_id, type(e).__name__, e,
                      exc_info=None if expected else e)
            raise Refused(R.R451_LOCAL_ERROR, "local_error") from e
        return qid

    def check_from_header(self, m: Incoming, header: bytes) -> str | None:
        """Submission and lan: the From header names addresses the client may use (RFC 6409 8.1
        leaves it to policy; homemx refuses spoofing its own users)."""
        addrs = from_addresses(header)
        if addrs is None:
            return R.R550_NO_FROM
        for a in addrs:
            if m.auth_user is not None:
                if not self.directory.owns(m.auth_user, a):
                    return R.R553_FROM_NOT_OWNER
            elif not self.directory.is_local_domain(a.rpartition("@")[2]):
                return R.R553_SENDER_DOMAIN
        return None

    def submission_fields(self, header: bytes, qid: str) -> bytes:
        """RFC 6409 8.2-8.3: a submission server adds Date and Message-ID when the client left
        them out (before DKIM signing, so the signature covers them)."""
        out = b""
        if not has_field(header, b"Date"):
            out += b"Date: " + rfc5322_date().encode() + b"\r\n"
        if not has_field(header, b"Message-ID"):
            # RFC 5322 3.6.4: unique worldwide; the queue id is unique here, the random part
            # keeps it so across data directories.
            mid = f"<{qid}.{secrets.token_hex(6)}@{self.config.server.hostname}>"
            out += b"Message-ID: " + mid.encode() + b"\r\n"
        return out

    def received_header(self, m: Incoming, qid: str) -> bytes:
        """RFC 5321 4.4 trace information; RFC 3848 protocol names."""
        helo = re.sub(r"[^\x21-\x7e]", "?", m.helo or "unknown")[:255]
        ip = m.client_addr
        lit = f"IPv6:{ip}" if ":" in ip else ip
        rcpt = f"\r\n\tfor <{m.rcpt_to[0]}>" if len(m.rcpt_to) == 1 else ""
        line = (
            f"Received: from {helo} ([{lit}])\r\n\tby {self.config.server.hostname} (homemx) with {m.protocol}"
            f" id {qid}{rcpt};\r\n\t{rfc5322_date()}\r\n"
        )
        return line.encode("utf-8", "surrogateescape")
