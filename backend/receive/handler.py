"""The aiosmtpd handler hooks: PROXY, EHLO, MAIL, RCPT (reception policy) and DATA (hands the
message to the accept pipeline, backend/accept.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING


from aiosmtpd.smtp import Envelope, Session, TLSSetupException

from backend.smtp import replies as R
from backend.smtp.paths import (
    Address,
    PathError,
    parse_address,
)
from backend.accept import Incoming, Refused, join
from backend.smtp.masquerade import masquerade_header
from backend.smtp.message import crlf_canonical, header_block
from backend.queue.model import NewRecipient
from backend.receive.clientaddr import canonical_host
from backend.receive.context import ListenerContext
from backend.receive.proxy import proxy_refusal

if TYPE_CHECKING:
    from backend.receive.smtpd import HomeSMTP


log = logging.getLogger("homemx.smtp")


class Handler:
    """aiosmtpd hooks: thin, calling policy and the queue, replying only after the queue commit."""

    def __init__(self, ctx: ListenerContext):
        self.ctx = ctx
        self.kind = ctx.listener.kind

    # PROXY v2 (HAProxy spec 2.2): the rules every listener behind the gateway applies (proxy_refusal).
    async def handle_PROXY(self, server: HomeSMTP, session: Session, envelope: Envelope, proxy_data) -> bool:
        reason = proxy_refusal(proxy_data) if server.ctx.trusted_proxy(server.client_host) else "bad_proxy_header"
        if reason == "bad_proxy_header":
            server.outcome = "bad-proxy-header"
            server._reject("bad_proxy_header")
            log.info("conn=%s peer=%s refused PROXY header %r", server.conn_id, server.client_host, proxy_data)
            return False
        if reason == "bad_proxy_checksum":
            server.outcome = "bad-proxy-checksum"
            server._reject("bad_proxy_checksum")
            log.info("conn=%s peer=%s refused PROXY header: bad CRC32C or TLV block", server.conn_id, server.client_host)
            return False
        server.client = (canonical_host(str(proxy_data.src_addr)), int(proxy_data.src_port or 0))
        if self.kind == "submissions":
            return await server.start_implicit_tls()
        return True

    async def handle_EHLO(self, server: HomeSMTP, session: Session, envelope: Envelope, hostname: str, responses):
        session.host_name = hostname
        out = []
        for line in responses:
            if self.kind == "mx" and line[4:].startswith("AUTH"):
                continue  # no AUTH on the MX: users submit on 587/465
            out.append(line)
        # RFC 2034: we send enhanced status codes, so say so.
        out.insert(-1, "250-ENHANCEDSTATUSCODES")
        return out

    async def handle_MAIL(self, server: HomeSMTP, session: Session, envelope: Envelope, address: str, options):
        sender = address if address != "<>" else ""
        if self.kind != "mx":
            reply = self._check_sender(server, session, sender)
            if reply:
                server._reject("sender_not_allowed")
                return reply
        envelope.mail_from = sender or "<>"
        envelope.mail_options.extend(options)
        envelope.resolved = []  # type: ignore[attr-defined]
        envelope.started = time.monotonic()  # type: ignore[attr-defined]
        return R.R250_OK

    def _check_sender(self, server: HomeSMTP, session: Session, sender: str) -> str | None:
        d = self.ctx.directory
        if session.authenticated:
            if not sender:
                return R.R553_NULL_SENDER
            return None if d.owns(server.login_user or "", sender) else R.R553_NOT_OWNER
        # lan, trusted network, no AUTH: any address of ours, nothing else (we sign for our domains only).
        if not sender:
            return R.R553_NULL_SENDER
        return None if d.is_local_domain(sender.rpartition("@")[2]) else R.R553_SENDER_DOMAIN

    async def handle_RCPT(self, server: HomeSMTP, session: Session, envelope: Envelope, address: str, options):
        resolved: list[NewRecipient] = getattr(envelope, "resolved", [])
        if len(envelope.rcpt_tos) >= self.ctx.listener.max_recipients:
            server._reject("too_many_recipients")
            return R.R452_TOO_MANY_RCPTS
        try:
            addr: Address = parse_address(address)
        except PathError as e:
            server._reject("bad_path")
            return e.reply
        d = self.ctx.directory
        local = d.is_local_domain(addr.domain)
        if self.kind == "mx" and not local:
            server._reject("relay_denied")
            return R.R554_RELAY_DENIED
        targets = d.recipients(str(addr))
        if targets is None:
            server._reject("unknown_user")
            return R.R550_NO_SUCH_USER
        resolved.extend(targets)
        envelope.resolved = resolved  # type: ignore[attr-defined]
        envelope.rcpt_tos.append(str(addr))
        envelope.rcpt_options.extend(options)
        return R.R250_OK

    async def handle_DATA(self, server: HomeSMTP, session: Session, envelope: Envelope) -> str:
        """The dot: the message goes through the accept pipeline (backend/accept.py)."""
        content = envelope.original_content or b""
        if not getattr(envelope, "canonical", False):
            content = crlf_canonical(content)
        if self.kind == "lan":
            # From/Sender of root, root@nas → our domain, as the envelope was at MAIL (smtp/masquerade.py)
            header = header_block(content)
            new = masquerade_header(header, self.ctx.masquerade_domain, self.ctx.listener.local_hostnames)
            if new != header:
                content = await join((new, memoryview(content)[len(header):]), self.ctx.run_blocking)
        proto = "ESMTP" if session.extended_smtp else "SMTP"  # RFC 3848 names
        proto += "S" if server.tls_active else ""
        proto += "A" if session.authenticated else ""
        incoming = Incoming(
            listener=self.ctx.listener.name,
            kind=self.kind if self.kind == "mx" else ("lan" if self.kind == "lan" else "submission"),
            sender="" if envelope.mail_from == "<>" else envelope.mail_from,
            recipients=tuple(getattr(envelope, "resolved", [])),
            content=content,
            client_addr=server.client_host,
            helo=session.host_name or "unknown",
            protocol=proto,
            auth_user=server.login_user if session.authenticated else None,
            rcpt_to=tuple(envelope.rcpt_tos),
            max_received=self.ctx.listener.max_received_headers,
            conn_id=server.conn_id,
        )
        # The commit runs as a task of its own: when the client vanishes after the dot, aiosmtpd
        # cancels this session, and the shield keeps that cancellation away from the commit (and
        # from the queue writer's future), so the message is either stored whole or not at all.
        commit = asyncio.ensure_future(self._accept(server, incoming, getattr(envelope, "started", time.monotonic())))
        self.ctx.sessions.track_commit(commit)
        return await asyncio.shield(commit)

    async def _accept(self, server: HomeSMTP, incoming: Incoming, started: float) -> str:
        try:
            qid = await self.ctx.acceptor.accept(incoming, started)
        except Refused as e:
            if not e.reply.startswith("4"):
                server._reject(e.reason)
            return e.reply
        server.accepted += 1
        server.outcome = "accepted"
        return R.queued(qid)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # Logged by HomeSMTP.smtp_STARTTLS; aiosmtpd closes without sending this reply.
            return R.R451_LOCAL_ERROR
        log.error("SMTP session error: %r", error)
        return R.R451_LOCAL_ERROR
