"""One SMTP transaction on an open session (MAIL, RCPT..., DATA, RSET), and the one table that
turns what can go wrong talking to a remote server into a reply we record.

Theory of operation. Every failure is looked up in FAILURES by the phase it happened in and its
exception type; the row gives the reply line (RFC 3463 enhanced code included), and the reply's
code gives the outcome (RFC 5321 4.2.1: 2yz delivered, 5yz bounced, anything else deferred).
What the caller then does depends on how far the transaction got, not on the exception:

  - before any recipient is decided (connect, STARTTLS, AUTH, EHLO, MAIL): HostFailure, and the
    next MX host is tried; recipients left when no host is left are deferred with the last reply;
  - after some recipients are decided (RCPT): the rest are deferred with the reply;
  - after the final dot was sent (DATA): the accepted recipients are deferred, never sent to the
    next MX (RFC 5321 6.1: that would risk a duplicate).

Replies a server spoke (a refused MAIL or RCPT, a DATA reply) go through the same code rule.
An exception no row matches is a bug: it propagates, and the deliverer defers with 4.3.0.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Callable

import aiosmtplib

from backend.queue.model import BOUNCED, DEFERRED, DELIVERED, Recipient

R_CONNECT_FAILED = "421 4.4.1 Cannot connect to {host}: {error}"
R_TIMEOUT = "421 4.4.2 Timeout talking to {host}: {error}"
R_LOST = "421 4.4.2 Connection to {host} lost: {error}"
R_TLS_NOT_OFFERED = "421 4.7.10 TLS required but {host} does not offer STARTTLS"
R_TLS_FAILED = "421 4.7.5 TLS handshake with {host} failed: {error}"
R_SMARTHOST_AUTH = "421 4.7.0 Smarthost {host} refused our credentials: {error}"
R_NO_DATA_REPLY = "451 4.4.2 No reply from {host} after end of data (may or may not be delivered)"
R_NO_SMTPUTF8 = "554 5.6.7 {host} does not support SMTPUTF8, required for this {what} (RFC 6531 3.5)"


class HostFailure(Exception):
    """This host cannot take the transaction now; the next MX host may."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


class TLSHandshakeFailed(HostFailure):
    """STARTTLS failed; with opportunistic TLS the host is tried again in cleartext (RFC 7435)."""


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


# ---------------------------------------------------------------- the failure table

# Phases of talking to a server.
CONNECT = "connect"  # TCP, implicit TLS, greeting
STARTTLS = "starttls"  # RFC 3207
AUTH = "auth"  # RFC 4954, smarthost only
SESSION = "session"  # EHLO/HELO, and anything after STARTTLS or AUTH that is not their own failure
ENVELOPE = "envelope"  # MAIL, RCPT
DATA = "data"  # DATA up to the reply after the final dot

TIMEOUTS = (asyncio.TimeoutError,)  # aiosmtplib's SMTPTimeoutError is one too
NETWORK = (aiosmtplib.SMTPException, OSError)  # ssl.SSLError and ConnectionError are OSErrors


def _ssl_error(e: BaseException) -> ssl.SSLError | None:
    # aiosmtplib wraps the implicit-TLS handshake's SSLError (a certificate that does not verify)
    # in SMTPConnectError: report it as the TLS failure it is (4.7.5), not as unreachable (4.4.1).
    err = e if isinstance(e, ssl.SSLError) else e.__cause__
    return err if isinstance(err, ssl.SSLError) else None


def _server_reply(e, peer: str) -> str:
    return reply_text(e.code, e.message)


def _implicit_tls_failed(e, peer: str) -> str:
    err = _ssl_error(e)
    return R_TLS_FAILED.format(host=peer, error=getattr(err, "verify_message", None) or err.reason or err)


def _starttls_failed(e, peer: str) -> str:
    return R_TLS_FAILED.format(host=peer, error=getattr(e, "reason", None) or e)


@dataclass(frozen=True)
class Rule:
    phase: str
    errors: tuple[type[BaseException], ...]
    reply: Callable[[BaseException, str], str]  # (exception, peer) -> reply line
    when: Callable[[BaseException], object] = lambda e: True


# First matching row wins (order matters where types overlap: a timeout is an OSError too).
FAILURES: tuple[Rule, ...] = (
    Rule(CONNECT, (aiosmtplib.SMTPConnectResponseError,), _server_reply),  # a 4xx/5xx greeting
    Rule(CONNECT, TIMEOUTS, lambda e, peer: R_TIMEOUT.format(host=peer, error=e)),
    Rule(CONNECT, NETWORK, _implicit_tls_failed, when=_ssl_error),
    Rule(CONNECT, NETWORK, lambda e, peer: R_CONNECT_FAILED.format(host=peer, error=getattr(e, "strerror", None) or e)),
    # A server that drops the connection mid-handshake is a TLS failure too.
    Rule(STARTTLS, (ssl.SSLError, ssl.CertificateError, aiosmtplib.SMTPServerDisconnected, ConnectionError),
         _starttls_failed),
    Rule(STARTTLS, (aiosmtplib.SMTPResponseException,), _server_reply),
    Rule(AUTH, (aiosmtplib.SMTPAuthenticationError,),
         lambda e, peer: R_SMARTHOST_AUTH.format(host=peer, error=_server_reply(e, peer))),
    Rule(AUTH, (aiosmtplib.SMTPException,), lambda e, peer: R_SMARTHOST_AUTH.format(host=peer, error=e)),
    Rule(SESSION, (aiosmtplib.SMTPResponseException,), _server_reply),
    Rule(SESSION, TIMEOUTS, lambda e, peer: R_TIMEOUT.format(host=peer, error=e)),
    Rule(SESSION, NETWORK, lambda e, peer: R_LOST.format(host=peer, error=e)),
    Rule(ENVELOPE, TIMEOUTS, lambda e, peer: R_TIMEOUT.format(host=peer, error=e)),
    Rule(ENVELOPE, NETWORK, lambda e, peer: R_LOST.format(host=peer, error=e)),
    Rule(DATA, (aiosmtplib.SMTPDataError,), _server_reply),  # the reply after the final dot
    Rule(DATA, TIMEOUTS, lambda e, peer: R_NO_DATA_REPLY.format(host=peer)),
    Rule(DATA, NETWORK, lambda e, peer: R_LOST.format(host=peer, error=e)),
)


def failure_reply(phase: str, e: BaseException, peer: str) -> str | None:
    """The reply for ``e`` in ``phase``; None: no row (a bug, or left to the enclosing phase)."""
    for rule in FAILURES:
        if rule.phase == phase and isinstance(e, rule.errors) and rule.when(e):
            return rule.reply(e, peer)
    return None


def host_failure(phase: str, e: BaseException, peer: str) -> HostFailure:
    """The HostFailure to raise for ``e`` in ``phase``; ``e`` itself is re-raised if no row matches."""
    reply = failure_reply(phase, e, peer)
    if reply is None:
        raise e
    return HostFailure(reply)


def failure_outcome(reply: str) -> str:
    """DELIVERED / DEFERRED / BOUNCED from a recorded reply line's code."""
    return reply_outcome(int(reply[:3]))


# ---------------------------------------------------------------- one transaction


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


Outcomes = dict[int, tuple[str, str]]  # recipient id -> (state, reply)


def _mail_options(client: aiosmtplib.SMTP, sender: str, content: bytes, rcpts: list[Recipient], peer: str):
    """(MAIL parameters, recipients bounced for want of SMTPUTF8, the recipients left to send)."""
    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(content)}")  # RFC 1870
    if client.supports_extension("8bitmime") and not content.isascii():
        options.append("BODY=8BITMIME")  # RFC 6152
    # RFC 6531 3.4: a transaction carrying a UTF-8 address or UTF-8 headers says SMTPUTF8 in
    # MAIL; 3.5: a server that does not offer it must not be sent either, and we do not
    # downgrade (RFC 6857), so those recipients bounce with 5.6.7.
    message_utf8 = not sender.isascii() or headers_need_smtputf8(content)
    utf8_rcpts = [r for r in rcpts if not r.address.isascii()]
    if not (message_utf8 or utf8_rcpts) or client.supports_extension("smtputf8"):
        if message_utf8 or utf8_rcpts:
            options.append("SMTPUTF8")
        return options, {}, rcpts
    if message_utf8:
        what = "sender address" if not sender.isascii() else "message's headers"
        return options, {r.id: (BOUNCED, R_NO_SMTPUTF8.format(host=peer, what=what)) for r in rcpts}, []
    # Only some recipients need it: they bounce, the others go as plain ASCII.
    bounced = {r.id: (BOUNCED, R_NO_SMTPUTF8.format(host=peer, what="recipient address")) for r in utf8_rcpts}
    return options, bounced, [r for r in rcpts if r.id not in bounced]


class Transaction:
    """MAIL/RCPT.../DATA for one message on one open session."""

    def __init__(self, client: aiosmtplib.SMTP, peer: str, command_timeout: float):
        self.client = client
        self.peer = peer
        self.command_timeout = command_timeout

    async def run(self, sender: str, content: bytes, rcpts: list[Recipient]) -> tuple[Outcomes, bool]:
        """({rcpt id: (state, reply)}, session reusable). Raises HostFailure when nothing was
        decided and the next MX may do better."""
        c = self.client
        options, decided, rcpts = _mail_options(c, sender, content, rcpts, self.peer)
        if not rcpts:
            return decided, True
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        try:
            accepted = await self._envelope(sender, options, encoding, rcpts, decided)
        except Exception as e:  # noqa: BLE001 - looked up in FAILURES; no row: re-raised
            reply = failure_reply(ENVELOPE, e, self.peer)
            if reply is None:
                raise
            if not decided:
                raise HostFailure(reply) from None
            return _defer_rest(decided, rcpts, reply), False
        if accepted is None:
            return decided, c.is_connected
        if not accepted:
            await self._rset()
            return decided, c.is_connected
        # From here on the message may have reached the server: no next-MX retry (that would
        # risk a duplicate); whatever goes wrong defers the accepted recipients (RFC 5321 6.1).
        try:
            resp = await c.data(content, timeout=self.command_timeout)
            reply, state = reply_text(resp.code, resp.message), DELIVERED
        except Exception as e:  # noqa: BLE001 - looked up in FAILURES; no row: re-raised
            reply = failure_reply(DATA, e, self.peer)
            if reply is None:
                raise
            if not isinstance(e, aiosmtplib.SMTPDataError):
                return _defer_rest(decided, rcpts, reply), False  # no reply: the session is lost
            state = failure_outcome(reply)
        decided.update({r.id: (state, reply) for r in accepted})
        if state != DELIVERED:
            await self._rset()
        # RFC 5321 4.1.1.4: the 250 after the data ends the transaction and clears its state, so
        # the session carries the next MAIL as it is (the pool checks it with NOOP before reuse).
        return decided, c.is_connected

    async def _envelope(
        self, sender, options, encoding, rcpts: list[Recipient], decided: Outcomes
    ) -> list[Recipient] | None:
        """MAIL and RCPTs; the accepted recipients (None: MAIL got a 4xx, no RSET needed).
        Refused ones go into ``decided``."""
        c = self.client
        try:
            await c.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPSenderRefused as e:
            reply = reply_text(e.code, e.message)
            state = BOUNCED if reply_outcome(e.code) == BOUNCED else DEFERRED
            if state == DEFERRED and not decided:
                raise HostFailure(reply) from None  # 4xx to MAIL: maybe the next MX does better
            decided.update({r.id: (state, reply) for r in rcpts})
            return [] if state == BOUNCED else None
        accepted: list[Recipient] = []
        for r in rcpts:
            try:
                await c.rcpt(r.address, encoding=encoding)
                accepted.append(r)
            except aiosmtplib.SMTPRecipientRefused as e:
                decided[r.id] = (reply_outcome(e.code), reply_text(e.code, e.message))
        return accepted

    async def _rset(self) -> None:
        # RFC 5321 4.1.1.5: RSET ends the transaction so the session can carry the next message.
        try:
            await self.client.rset(timeout=self.command_timeout)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            self.client.close()


def _defer_rest(decided: Outcomes, rcpts: list[Recipient], reply: str) -> Outcomes:
    for r in rcpts:
        decided.setdefault(r.id, (DEFERRED, reply))
    return decided
