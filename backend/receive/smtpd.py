"""SMTP reception on the backend's listeners (mx, submission, submissions, lan) on top of aiosmtpd.

Theory of operation. aiosmtpd owns the wire protocol (command loop, DATA reading, dot-unstuffing,
STARTTLS, SIZE); this module adds what a mail server on the internet needs on top of it:

- PROXY v2 on the mx listener: aiosmtpd reads the header before the banner (``proxy_protocol_timeout``);
  we close untrusted peers before anything is read, and refuse v1, LOCAL, and non-TCP headers.
- The real client address is kept on the protocol object (``HomeSMTP.client``), because aiosmtpd
  replaces ``session`` after STARTTLS (RFC 3207 4.2 reset) and the new session's peer is the gateway.
- Strict path parsing (backend.addresses) before aiosmtpd's lenient one, so relay disguises get 5xx.
- AUTH PLAIN/LOGIN checked against the passwd-file in a worker thread (bcrypt is slow on purpose),
  with one failure limiter for all listeners, keyed by client (an IPv4 address or an IPv6 /64);
  never AUTH on the mx listener (it would be a password oracle on port 25).
- A message is committed by a task of its own (``SessionRegistry.commits``): a client that vanishes
  after the final dot cancels its session, never a half-done commit.
- Shutdown drains (RFC 5321 3.8): listeners close first, idle sessions get 421 4.3.2, a DATA in
  progress may finish within the grace (its message is committed and answered), then 421.
- Line endings: aiosmtpd ends DATA only on <CRLF>.<CRLF> and splits lines on CRLF, so <LF>.<CR><LF>,
  <LF>.<LF> and <CR>.<CR> are plain content. Our one policy: a lone CR or LF in DATA is normalised to
  CRLF when the message is stored (and the end of DATA is never affected by it). Commands may end in
  LF or CRLF (like Postfix); a CR inside a command line is a syntax error.
- Every reply carries an enhanced status code (aiosmtpd's own replies are rewritten in ``push``).
- Any local fault while accepting a message → 451 4.3.0 and a reset envelope; the session goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import inspect
import ipaddress
import itertools
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from asyncio import sslproto

import aiosmtpd.smtp as aiosmtpd_smtp
import google_crc32c
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException

from backend.smtp import replies as R
from backend.smtp.paths import (
    Address,
    PathError,
    is_bare_postmaster,
    parse_address,
    parse_path,
    split_path_and_params,
)
from backend.accept import Acceptor, Incoming, Refused
from backend.config import BackendConfig, ListenerConfig
from backend.receive.directory import Directory
from backend.smtp.datareader import LINE_TOO_LONG, OK, DataReader
from backend.smtp.message import crlf_canonical
from backend.metrics import BackendMetrics
from backend.queue.store import NewRecipient, Queue
from backend.receive.users import UserDB

log = logging.getLogger("homemx.smtp")

PROXY_TIMEOUT = 10.0  # the gateway sends the header at once; anything slower is not the gateway
_conn_ids = itertools.count(1)


AUTH_DELAY_MAX = 10.0  # seconds: the longest wait before a failed AUTH is answered


def client_key(host: str) -> str:
    """The unit a limit applies to: an IPv4 address, or the /64 of an IPv6 address (one home or
    one server usually holds a whole /64, so counting single IPv6 addresses limits nothing).
    An IPv4-mapped IPv6 address counts as the IPv4 address it maps."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def auth_delay(failures: int, step: float) -> float:
    """How long to wait before answering the n-th failed AUTH in the window: cheap for a user who
    mistyped once, slow for a guesser."""
    return min(failures * step, AUTH_DELAY_MAX)


@dataclass
class AuthLimiter:
    """Failed AUTH attempts per client (``client_key``) in a sliding window, one for every
    listener (Postfix's anvil, smaller): a lockout earned on 465 holds on 587 too. Each listener
    applies its own limit and window to the shared history."""

    now: Callable[[], float] = time.monotonic
    _failures: dict[str, collections.deque] = field(default_factory=dict)
    _horizon: float = 0.0  # the longest window of any listener: how long a failure is kept
    _since_sweep: int = 0

    def _recent(self, key: str, window: float) -> collections.deque:
        dq = self._failures.get(key)
        if dq is None:
            return collections.deque()
        cutoff = self.now() - window
        return collections.deque(t for t in dq if t >= cutoff)

    def serve_window(self, window: float) -> None:
        """A listener judging failures over ``window`` seconds uses this limiter: keep each failure
        that long, whichever listener recorded it (else failures on a port with a short window
        would be forgotten before a port with a long one looks at them)."""
        self._horizon = max(self._horizon, window)

    def count(self, host: str, window: float) -> int:
        """Failures of this client within the last ``window`` seconds."""
        return len(self._recent(client_key(host), window))

    def blocked(self, host: str, max_failures: int, window: float) -> bool:
        return self.count(host, window) >= max_failures

    def failed(self, host: str, window: float) -> int:
        """Record a failure; returns the client's failures within ``window`` (this one included)."""
        key = client_key(host)
        self._horizon = max(self._horizon, window)
        now = self.now()
        dq = self._failures.setdefault(key, collections.deque())
        while dq and dq[0] < now - self._horizon:
            dq.popleft()
        dq.append(now)
        self._since_sweep += 1
        if self._since_sweep >= 1024:
            # Guessers from many addresses must not grow the table for ever.
            self._since_sweep = 0
            stale = [k for k, d in self._failures.items() if d[-1] < now - self._horizon]
            for k in stale:
                del self._failures[k]
        return self.count(host, window)


class SessionRegistry:
    """The open SMTP sessions of every listener and the message commits they started: what a
    shutdown drains. One per daemon."""

    def __init__(self) -> None:
        self.sessions: set["HomeSMTP"] = set()
        self.commits: set[asyncio.Task] = set()
        self.closing = False
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, session: "HomeSMTP") -> None:
        self.sessions.add(session)
        self._empty.clear()

    def discard(self, session: "HomeSMTP") -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._empty.set()

    def track_commit(self, task: asyncio.Task) -> None:
        # The registry holds the only strong reference to a commit whose session has gone (the
        # event loop keeps tasks weakly), and shutdown waits for it before closing the queue.
        self.commits.add(task)
        task.add_done_callback(self.commits.discard)

    async def drain(self, grace: float) -> None:
        """RFC 5321 3.8: 421 to every idle session now, to a session in DATA once its message is
        answered (or when ``grace`` runs out), then wait for the commits in flight. Call after
        the listeners are closed, so no session starts meanwhile."""
        self.closing = True
        for s in list(self.sessions):
            if not s.in_data:
                s.hang_up(R.R421_SHUTTING_DOWN, "shutdown")
        if self.sessions:
            busy = sum(1 for s in self.sessions if s.in_data)
            if busy:
                log.info("draining: %d session(s) in DATA, %.1fs grace", busy, grace)
            try:
                await asyncio.wait_for(self._empty.wait(), grace)
            except asyncio.TimeoutError:
                for s in list(self.sessions):
                    s.hang_up(R.R421_SHUTTING_DOWN, "shutdown")  # nothing of theirs was acknowledged
        if self.commits:
            # Committing takes an fsync; a commit that outlives a second grace is reported and the
            # queue closes anyway (its message then has no 250 and no record, or a record).
            done, pending = await asyncio.wait(set(self.commits), timeout=max(grace, 1.0))
            if pending:
                log.error("shutdown: %d message commit(s) still pending", len(pending))


@dataclass
class ListenerContext:
    """Everything a listener's sessions share."""

    config: BackendConfig
    listener: ListenerConfig
    directory: Directory
    users: UserDB
    queue: Queue
    metrics: BackendMetrics
    tls_context: ssl.SSLContext | None
    auth_limiter: AuthLimiter  # one for all listeners
    sessions: SessionRegistry  # one for all listeners
    # The accept pipeline (policy, trace header, DKIM, spool, queue) shared by every listener.
    acceptor: Acceptor | None = None
    # Runs blocking work (queue, bcrypt, signing) off the event loop.
    run_blocking: Callable[..., Awaitable] | None = None
    # How long the PROXY header (and, on submissions behind the gateway, the TLS handshake) may take.
    proxy_timeout: float = PROXY_TIMEOUT

    def trusted_proxy(self, host: str) -> bool:
        return _in_networks(host, self.listener.trusted_proxies)

    def trusted_network(self, host: str) -> bool:
        return _in_networks(host, self.listener.trusted_networks)

    @property
    def primary_domain(self) -> str:
        """The first configured domain: where mail to a bare ``<postmaster>`` goes."""
        return next(iter(self.config.domains))


PP2_TYPE_CRC32C = 0x03  # PROXY protocol spec 2.2.5


def proxy_checksum_ok(proxy_data) -> bool:
    """PROXY protocol 2.2.5: a header that carries a PP2_TYPE_CRC32C TLV is valid only if the
    CRC32c (RFC 4960 appendix B, network byte order) of the whole header, with the checksum field
    set to zero, equals it. A header without one passes; a malformed TLV block or a second or
    wrongly sized checksum fails.

    The TLVs are walked here rather than with aiosmtpd's ProxyTLV, whose offsets are wrong for
    TLVs nested in PP2_TYPE_SSL and which keeps only the last of two TLVs of one type."""
    tlvs = bytes(proxy_data.rest)
    if not tlvs:
        return True
    i, crc_at = 0, None
    while i < len(tlvs):
        if i + 3 > len(tlvs):
            return False
        kind, length = tlvs[i], int.from_bytes(tlvs[i + 1 : i + 3], "big")
        if i + 3 + length > len(tlvs):
            return False
        if kind == PP2_TYPE_CRC32C:
            if length != 4 or crc_at is not None:
                return False
            crc_at = i + 3
        i += 3 + length
    if crc_at is None:
        return True
    header = bytearray(proxy_data.whole_raw)
    at = proxy_data.tlv_start + crc_at
    expected = int.from_bytes(header[at : at + 4], "big")
    header[at : at + 4] = bytes(4)
    return google_crc32c.value(bytes(header)) == expected


def _in_networks(host: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in n for n in networks)


class HomeSession(Session):
    """aiosmtpd's Session without its deprecated ``login_data`` property, which logs a warning
    each time aiosmtpd itself sets it after a successful AUTH (we use ``auth_data``)."""

    login_data: Any = None


class HomeSMTP(SMTP):
    """One SMTP session (aiosmtpd creates one protocol object per connection)."""

    def __init__(self, handler: "Handler", ctx: ListenerContext, **kwargs):
        self.ctx = ctx
        self.conn_id = f"{ctx.listener.name}-{next(_conn_ids)}"
        self.client: tuple[str, int] | None = None  # the real client (after PROXY), kept across STARTTLS
        self.started = time.monotonic()
        self.accepted = 0
        self.outcome = "closed"
        # The authenticated login (survives STARTTLS; AUTH is only allowed after it anyway). Not named
        # auth_*: aiosmtpd takes every auth_* attribute of the session for an AUTH mechanism.
        self.login_user: str | None = None
        self.in_data = False  # from the 354 to the reply after the dot: shutdown lets this finish
        self._greeted = False  # a reply (the banner) was sent: the peer now reads SMTP replies
        self._reply_lines: list[str] = []
        self._registered = False
        # aiosmtpd.smtp's module-level ``inspect`` is our cached stand-in for the duration of this
        # constructor only (no await in between, so no other code runs meanwhile); anything else
        # it inspects gets the real module's answers. Nothing stays patched for the process.
        aiosmtpd_smtp.inspect = _INSPECT
        try:
            super().__init__(handler, **kwargs)
        finally:
            aiosmtpd_smtp.inspect = inspect
        if ctx.listener.kind == "submissions":
            # Implicit TLS (RFC 8314): every byte is encrypted from the start, which aiosmtpd
            # cannot see (it knows STARTTLS only), so AUTH is allowed without STARTTLS here.
            # Set after __init__: passing auth_require_tls=False makes aiosmtpd warn per connection.
            self._auth_require_tls = False

    def _create_session(self) -> Session:
        return HomeSession(self.loop)

    # -- connection lifecycle ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        old_session = self.session
        super().connection_made(transport)
        if starttls:
            # aiosmtpd made a fresh Session; its peer is the TCP peer (the gateway). Carry over
            # what belongs to the client, not to the TLS layer.
            assert self.session is not None
            if old_session is not None:
                self.session.proxy_data = old_session.proxy_data
            return
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if peer else ("unknown", 0)
        self.ctx.sessions.add(self)
        self._registered = True
        if self.ctx.listener.proxy_protocol and not self.ctx.trusted_proxy(self.client[0]):
            # Only the gateway may speak PROXY to us; anyone else is closed before any byte.
            self.outcome = "untrusted-peer"
            self.ctx.metrics.rejections.labels(self.ctx.listener.name, "untrusted_proxy_peer").inc()
            transport.close()
        elif self.ctx.sessions.closing:
            # Accepted just before the listener closed: RFC 5321 3.1, a 421 greeting.
            self.hang_up(R.R421_SHUTTING_DOWN, "shutdown")

    def connection_lost(self, error: Exception | None) -> None:
        # aiosmtpd calls this itself after a failed STARTTLS handshake, then asyncio calls it
        # again: the outcome is logged and counted once.
        if self._registered:
            self._registered = False
            self.ctx.sessions.discard(self)
            log.info(
                "conn=%s listener=%s client=%s outcome=%s accepted=%d duration=%.3fs",
                self.conn_id,
                self.ctx.listener.name,
                self.client_host,
                self.outcome,
                self.accepted,
                time.monotonic() - self.started,
            )
            self.ctx.metrics.connections.labels(self.ctx.listener.name, self.outcome).inc()
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        keep_open = super().eof_received()  # aiosmtpd cancels the session's command loop
        if not self._greeted:
            # Before the banner (a PROXY header still incomplete) nothing will answer or close
            # the half-closed connection: aiosmtpd's loop closes it only once past the header,
            # so it was noticed at the PROXY timeout (and logged as one). Close it now.
            return False
        return keep_open

    def hang_up(self, reply: str | None, outcome: str) -> None:
        """Send a last reply (when the peer reads replies yet) and close. Commands the client
        already pipelined behind are dropped, never executed."""
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.outcome = outcome
        # Before the banner a PROXY listener's peer is the gateway, or a TLS handshake is still
        # to come (submissions behind the gateway): no reply then, just close.
        if reply and (self._greeted or not self.ctx.listener.proxy_protocol):
            try:
                transport.write((reply + "\r\n").encode())
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        transport.close()

    async def start_implicit_tls(self) -> bool:
        """Implicit TLS (RFC 8314) on a listener that first reads a PROXY header: the header is
        cleartext, the TLS ClientHello follows it (often in the same segment), so the TLS layer is
        put in place after the header, fed whatever bytes were already read past it, and the
        banner is sent inside TLS."""
        assert self.transport is not None and self.ctx.tls_context is not None
        leftover = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        self._drop_plaintext()
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.ctx.tls_context, waiter, server_side=True)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        if leftover:
            buf = self._tls_protocol.get_buffer(len(leftover))
            buf[: len(leftover)] = leftover
            self._tls_protocol.buffer_updated(len(leftover))
        try:
            await asyncio.wait_for(waiter, self.ctx.proxy_timeout)
            if self._lost_in_handshake():
                raise ConnectionResetError("connection closed during the TLS handshake")
        except (asyncio.TimeoutError, ssl.SSLError, ConnectionError, OSError) as e:
            log.info("conn=%s client=%s TLS handshake failed: %r", self.conn_id, self.client_host, e)
            if self.outcome == "closed":
                self.outcome = "tls-failed"
            # Nobody else will end this session (see _lost_in_handshake): once aiosmtpd has
            # closed the transport on our False, finish it like any lost connection.
            self.loop.call_soon(self._end_if_open)
            return False
        return True

    def _drop_plaintext(self) -> None:
        """Before TLS starts: forget what the command reader holds (RFC 3207 5: nothing sent in
        clear may count as sent under TLS) and let the socket be read again. The reader pauses
        the socket's transport when it holds more than 128 KiB; the TLS layer then waited for a
        ClientHello, or noticed a reset, only at the idle timeout."""
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        self._reader._maybe_resume_transport()  # type: ignore[attr-defined]

    def _lost_in_handshake(self) -> bool:
        """Whether the connection went while the TLS handshake was in progress. asyncio's
        SSLProtocol then wakes the handshake waiter without an error and never calls our
        connection_lost (it only does so after a completed handshake), so the session would
        wait on its reader for ever: never logged, never counted, held by the drain."""
        return self.transport is None or self.transport.is_closing()

    def _end_if_open(self) -> None:
        if self._registered:
            self.connection_lost(None)

    @property
    def client_host(self) -> str:
        return self.client[0] if self.client else "unknown"

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None or self.ctx.listener.kind == "submissions"

    def _wire_closing(self) -> bool:
        """Whether the connection under this session is lost or being closed. Under TLS the
        session's transport says so only a loop turn or two after the socket under it failed
        (asyncio reports the loss with call_soon, twice), and answering pipelined commands never
        yields meanwhile: the socket's own transport is asked too."""
        t = self.transport
        if t is None or t.is_closing():
            return True
        # STARTTLS and 465 behind the gateway keep the socket's transport; 465 without PROXY
        # has the event loop's TLS layer, which holds it.
        wire = self._original_transport or getattr(getattr(t, "_ssl_protocol", None), "_transport", None)
        return wire is not None and wire.is_closing()

    async def push(self, status) -> None:
        self._greeted = True
        if self._wire_closing():
            # The client is gone (a reset found by the last write) or we are hanging up: no more
            # replies, and nothing it pipelined runs. aiosmtpd's loop then waits on the empty
            # reader until connection_lost ends the session. (Writing on would make asyncio log
            # "socket.send() raised exception." for every reply after the fifth.)
            self._reply_lines.clear()
            self._reader._buffer.clear()  # type: ignore[attr-defined]
            return
        closing = False
        if isinstance(status, str):
            status = R.enhance(status)
            # A 421 (RFC 5321 3.8) and aiosmtpd's "too many unrecognized commands" 502 are
            # followed by a close: nothing the client pipelined behind may run.
            closing = status.startswith("421") or status.startswith(R.R502_TOO_MANY_BAD_PREFIX)
            if closing:
                self.outcome = status[:3]
            # aiosmtpd pushes a multi-line reply (EHLO) one line at a time, a send() each; hold
            # the continuation lines ("250-...") and write the reply in one piece.
            if status[3:4] == "-":
                self._reply_lines.append(status)
                return
            if self._reply_lines:
                status = "\r\n".join([*self._reply_lines, status])
                self._reply_lines.clear()
            # aiosmtpd echoes arguments in some replies (502 Could not VRFY ...); bytes of theirs
            # that were not UTF-8 (surrogates) cannot be encoded strictly.
            status = status.encode("utf-8", "replace")
        await super().push(status)
        if closing:
            self._reader._buffer.clear()  # type: ignore[attr-defined]

    def _timeout_cb(self):
        self.hang_up(R.R421_TIMEOUT, "timeout")
        super()._timeout_cb()

    # -- commands ------------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str):
        if hostname and "\r" in hostname:
            await self.push(R.R501_BARE_CR)
            return
        await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str):
        if hostname and "\r" in hostname:
            await self.push(R.R501_BARE_CR)
            return
        await super().smtp_HELO(hostname)

    async def smtp_STARTTLS(self, arg: str | None):
        if self.tls_active:
            # A second STARTTLS would stack TLS inside TLS (aiosmtpd does not check); asyncio's
            # SSLProtocol cannot run over its own transport (TypeError on the first error).
            await self.push(R.R503_TLS_ACTIVE)
            return
        if not arg and self.tls_context:
            self._drop_plaintext()
        try:
            await super().smtp_STARTTLS(arg)
            if self._lost_in_handshake():
                # Closed mid-handshake (our idle timeout, a silent client): aiosmtpd saw a
                # success. Raising makes it end the session (it calls connection_lost itself).
                raise TLSSetupException() from ConnectionResetError("connection closed during the TLS handshake")
        except TLSSetupException as e:
            # After "220 Ready to start TLS" the handshake failed (a scanner, no common cipher, a
            # reset): a normal network outcome, one line. aiosmtpd then closes the connection.
            log.info("conn=%s client=%s STARTTLS handshake failed: %r", self.conn_id, self.client_host, e.__cause__)
            if self.outcome == "closed":
                self.outcome = "tls-failed"  # a timeout keeps its own outcome
            raise

    async def smtp_AUTH(self, arg: str | None) -> None:
        if self.ctx.listener.kind == "mx":
            # Port 25 is for mail to our users, not for logins: accepting AUTH here (even unadvertised)
            # would give password guessers a second door that the submission ports' policy does not see.
            self._reject("auth_on_mx")
            await self.push(R.R503_AUTH_NOT_ENABLED)
            return
        if arg and not arg.split():
            # aiosmtpd strips the argument as bytes but splits it as text, where \x1c-\x1f and
            # U+0085 are whitespace too: its split()[0] would raise. No mechanism is no argument.
            arg = None
        await super().smtp_AUTH(arg)

    def _getaddr(self, arg: str):
        """aiosmtpd parses addresses (VRFY's; MAIL's and RCPT's after our own checks) with the
        email package's header parser, which raises IndexError or UnboundLocalError on some
        malformed input as well as HeaderParseError (e.g. ``VRFY <``): each means "cannot parse"."""
        try:
            return super()._getaddr(arg)
        except Exception:  # noqa: BLE001 - a parser bug is a syntax error of the client's, not ours
            return None, None

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg is not None and self.session is not None and self.session.host_name:
            stripped = self._strip_command_keyword("FROM:", arg)
            if stripped is not None and not (self._auth_required and not self.session.authenticated):
                try:
                    path, _ = split_path_and_params(stripped)
                    parse_path(path, allow_null=True)
                except PathError as e:
                    self._reject("bad_path")
                    await self.push(e.reply)
                    return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg is not None and self.envelope is not None and self.envelope.mail_from is not None:
            stripped = self._strip_command_keyword("TO:", arg)
            if stripped is not None:
                try:
                    path, params = split_path_and_params(stripped)
                    if is_bare_postmaster(path):
                        # RFC 5321 4.5.1: <Postmaster> without a domain MUST be accepted; it is the
                        # postmaster of this server, i.e. of our primary domain.
                        path = f"<postmaster@{self.ctx.primary_domain}>"
                        arg = f"TO:{path} {params}".rstrip()
                    parse_path(path)
                except PathError as e:
                    self._reject("bad_path")
                    await self.push(e.reply)
                    return
        await super().smtp_RCPT(arg)

    # -- DATA (RFC 5321 4.1.1.4, 4.5.2) ----------------------------------------------------------
    # aiosmtpd reads DATA one line at a time on the event loop, then post-processes the whole
    # message in one go: a 25 MB message is some 400,000 Python iterations plus several full
    # passes during which no other session runs (docs/benchmarks.md, B6). Here 64 KiB chunks go
    # to the sans-IO reader (smtp/datareader.py: the end, transparency, line endings, line and
    # size limits), yielding to other sessions between megabytes; what follows the terminator
    # (pipelined commands) goes back to the command reader.

    DATA_CHUNK = 65536
    DATA_LINE_MAX = 999  # aiosmtpd's limit (1001 octets with CRLF); RFC 5321 4.5.3.1.6 says 998

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        try:
            await self._read_data()
        finally:
            self.in_data = False
        if self.ctx.sessions.closing:
            # Shutting down: the message was answered; nothing more on this session.
            self.hang_up(R.R421_SHUTTING_DOWN, "shutdown")

    async def _read_data(self) -> None:
        assert self.envelope is not None
        data = DataReader(self.data_size_limit, self.DATA_LINE_MAX)
        since_yield = 0
        while not data.done:
            chunk = await self._reader.read(self.DATA_CHUNK)
            if not chunk:
                return  # connection gone: nothing was accepted
            self._reset_timeout()  # RFC 5321 4.5.3.2.5/6: the timeout is per data block
            data.feed(chunk)
            since_yield += len(chunk)
            if since_yield >= 1 << 20:
                since_yield = 0
                await asyncio.sleep(0)  # let other sessions run during a large message
        if data.leftover:
            # aiosmtpd private: the StreamReader's buffer is where its command loop reads from
            # (docs/development.md, "aiosmtpd internals we touch").
            self._reader._buffer[0:0] = data.leftover  # type: ignore[attr-defined]
        if data.status != OK:
            too_long = data.status == LINE_TOO_LONG
            self._reject("line_too_long" if too_long else "message_too_big")
            self._set_post_data_state()
            await self.push(R.R500_LINE_TOO_LONG if too_long else R.R552_TOO_BIG)
            return
        content = data.content()
        self.envelope.content = content
        self.envelope.original_content = content
        self.envelope.canonical = True  # type: ignore[attr-defined]
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(R.R250_OK if status is MISSING else status)

    def _reject(self, reason: str) -> None:
        self.ctx.metrics.rejections.labels(self.ctx.listener.name, reason).inc()

    async def check_auth_needed(self, caller_method: str) -> bool:
        # lan: trusted networks submit without AUTH; everyone else must authenticate.
        if self.ctx.listener.kind == "lan" and not self.ctx.trusted_network(self.client_host):
            if not (self.session and self.session.authenticated):
                self._reject("auth_required")
                await self.push(R.R530_AUTH_REQUIRED)
                return True
            return False
        return await super().check_auth_needed(caller_method)

    # -- AUTH (RFC 4954) -----------------------------------------------------------------------
    # aiosmtpd's built-in mechanisms call a synchronous authenticator; bcrypt must not run on the
    # event loop, so PLAIN and LOGIN are re-implemented here with an awaited check.

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        if await self._auth_blocked():
            return AuthResult(success=False, handled=True)
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = self._b64(args[1])
            if blob is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # RFC 4616: acting as another identity is not supported.
            return await self._auth_failed()
        return await self._auth_check(login, password)

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        if await self._auth_blocked():
            return AuthResult(success=False, handled=True)
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = self._b64(args[1])
            if login is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._auth_check(login, password)

    async def challenge_auth(self, challenge, encode_to_b64: bool = True, log_client_response: bool = False):
        """aiosmtpd's challenge (334) and the client's answer, with a bounded answer line: its
        readline() raised ValueError past the reader's limit (64 KiB) and left the rest of the
        line to be read as commands. RFC 4954 4: a longer answer is refused with 500 5.5.6 and
        counts as a failed AUTH; the whole line is read and dropped."""
        if isinstance(challenge, str):
            challenge = challenge.encode()
        await self.push(b"334 " + (base64.b64encode(challenge) if encode_to_b64 else challenge))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            line = e.partial  # the connection is going; aiosmtpd's readline() answered the same
        except asyncio.LimitOverrunError as e:
            await self._skip_line(e.consumed)
            self._count_auth_failure()
            await self.push(R.R500_AUTH_LINE_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":  # RFC 4954 4: the client cancels
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        decoded = self._b64(blob)
        if decoded is None:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING
        return decoded

    async def _skip_line(self, consumed: int) -> None:
        """Drop an overlong line: what the reader holds of it, and the rest up to its LF."""
        while True:
            await self._reader.readexactly(consumed)
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.IncompleteReadError:
                return  # the connection ended inside the line
            except asyncio.LimitOverrunError as e:
                consumed = e.consumed

    @staticmethod
    def _b64(text: str | bytes) -> bytes | None:
        try:
            return base64.b64decode(text.encode() if isinstance(text, str) else text, validate=True)
        except (binascii.Error, ValueError):
            return None

    async def _auth_blocked(self) -> bool:
        lc = self.ctx.listener
        if self.ctx.auth_limiter.blocked(self.client_host, lc.auth_max_failures, lc.auth_failure_window):
            self._reject("auth_lockout")
            await self.push(R.R421_AUTH_LOCKOUT)
            if self.transport is not None:
                self.transport.close()
            return True
        return False

    async def _auth_check(self, login: bytes, password: bytes) -> AuthResult:
        try:
            user = await self.ctx.run_blocking(self.ctx.users.authenticate, login, password)
        except Exception:  # noqa: BLE001 - unreadable passwd-file and the like: temporary
            log.exception("conn=%s AUTH check failed", self.conn_id)
            await self.push(R.R454_AUTH_TEMP)
            return AuthResult(success=False, handled=True)
        if user is None:
            return await self._auth_failed()
        self.login_user = user
        log.info("conn=%s client=%s authenticated as %s", self.conn_id, self.client_host, user)
        return AuthResult(success=True, auth_data=user, message=R.R235_AUTH_OK)

    def _count_auth_failure(self) -> int:
        """Record a failed AUTH for this client (the shared limiter, the metric, one log line);
        returns the client's failures in the window."""
        lc = self.ctx.listener
        n = self.ctx.auth_limiter.failed(self.client_host, lc.auth_failure_window)
        self.ctx.metrics.auth_failures.labels(lc.name).inc()
        log.info("conn=%s client=%s AUTH failed (%d in window)", self.conn_id, self.client_host, n)
        return n

    async def _auth_failed(self) -> AuthResult:
        n = self._count_auth_failure()
        delay = auth_delay(n, self.ctx.listener.auth_failure_delay)
        if delay:
            await asyncio.sleep(delay)
        return AuthResult(success=False, handled=False, message=R.R535_AUTH_FAILED)


class Handler:
    """aiosmtpd hooks: thin, calling policy and the queue, replying only after the queue commit."""

    def __init__(self, ctx: ListenerContext):
        self.ctx = ctx
        self.kind = ctx.listener.kind

    # PROXY v2 (HAProxy spec 2.2): only v2, only the PROXY command, only TCP over IPv4/IPv6.
    async def handle_PROXY(self, server: HomeSMTP, session: Session, envelope: Envelope, proxy_data) -> bool:
        ok = (
            server.ctx.trusted_proxy(server.client_host)
            and proxy_data.version == 2
            and proxy_data.command == 1
            and proxy_data.family in (1, 2)
            and proxy_data.protocol == 1
            and proxy_data.src_addr is not None
        )
        if not ok:
            server.outcome = "bad-proxy-header"
            server._reject("bad_proxy_header")
            log.info("conn=%s peer=%s refused PROXY header %r", server.conn_id, server.client_host, proxy_data)
            return False
        if not proxy_checksum_ok(proxy_data):
            server.outcome = "bad-proxy-checksum"
            server._reject("bad_proxy_checksum")
            log.info("conn=%s peer=%s refused PROXY header: bad CRC32C or TLV block", server.conn_id, server.client_host)
            return False
        server.client = (str(proxy_data.src_addr), int(proxy_data.src_port or 0))
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
        if local:
            targets = d.resolve(str(addr))
            if targets is None:
                server._reject("unknown_user")
                return R.R550_NO_SUCH_USER
        else:
            targets = [str(addr)]
        for t in targets:
            resolved.append(NewRecipient(address=t, orig_address=str(addr), local=d.is_mailbox(t)))
        envelope.resolved = resolved  # type: ignore[attr-defined]
        envelope.rcpt_tos.append(str(addr))
        envelope.rcpt_options.extend(options)
        return R.R250_OK

    async def handle_DATA(self, server: HomeSMTP, session: Session, envelope: Envelope) -> str:
        """The dot: the message goes through the accept pipeline (backend/accept.py)."""
        content = envelope.original_content or b""
        if not getattr(envelope, "canonical", False):
            content = crlf_canonical(content)
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


class _AiosmtpdInspect:
    """Stand-in for the ``inspect`` module inside aiosmtpd.smtp while a HomeSMTP is constructed.

    aiosmtpd's SMTP.__init__ calls ``inspect.getmembers()`` on the session and on the handler for
    every connection, only to pick the ``auth_*`` methods, and ``inspect.signature()`` on the EHLO
    hook: about 0.2 ms per connection, a tenth of the event loop at 400 connections/s (py-spy,
    docs/benchmarks.md B3). For our classes the answer depends on the class alone, so the names
    are computed once per class and bound per instance; any other object gets the real module."""

    def __init__(self, real, classes: tuple[type, ...]):
        self._real = real
        self._classes = classes
        self._auth_names: dict[type, list[str]] = {}
        self._signatures: dict = {}

    def __getattr__(self, name):
        return getattr(self._real, name)

    def getmembers(self, obj, predicate=None):
        cls = type(obj)
        if predicate is not None or not isinstance(obj, self._classes):
            return self._real.getmembers(obj, predicate)
        names = self._auth_names.get(cls)
        if names is None:
            names = self._auth_names[cls] = sorted(n for n in dir(cls) if n.startswith("auth_"))
        return [(n, getattr(obj, n)) for n in names]

    def signature(self, fn):
        key = getattr(fn, "__func__", fn)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = self._real.signature(fn)
        return sig


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message names the files and the reason."""


def make_tls_context(config: BackendConfig) -> ssl.SSLContext | None:
    if config.tls.cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls.cert, config.tls.key)
    except (ssl.SSLError, OSError) as e:
        # The config loader tries this too; the files may have changed since (a renewal).
        raise TLSSetupError(f"certificate {config.tls.cert} and key {config.tls.key}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def protocol_factory(ctx: ListenerContext) -> Callable[[], HomeSMTP]:
    """The aiosmtpd protocol factory for one listener, with that listener's policy."""
    lc = ctx.listener
    handler = Handler(ctx)
    kind = lc.kind
    ctx.auth_limiter.serve_window(lc.auth_failure_window)
    # RFC 5321 4.5.3.1: generous call limits, with "*" so that unlisted commands are not capped at
    # aiosmtpd's default of 20 (a known trap).
    call_limit = {"*": 200, "RCPT": lc.max_recipients + 50, "AUTH": lc.auth_max_failures + 2, "NOOP": 50}

    def factory() -> HomeSMTP:
        return HomeSMTP(
            handler,
            ctx,
            hostname=ctx.config.server.hostname,
            ident="homemx",
            data_size_limit=lc.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=ctx.tls_context if kind != "submissions" else None,
            require_starttls=False,
            timeout=lc.timeout,
            auth_required=kind in ("submission", "submissions"),
            auth_require_tls=True,  # submissions (implicit TLS): see HomeSMTP.__init__
            command_call_limit=call_limit,
            proxy_protocol_timeout=ctx.proxy_timeout if lc.proxy_protocol else None,
        )

    return factory


_INSPECT = _AiosmtpdInspect(inspect, (HomeSMTP, Handler))  # used inside HomeSMTP.__init__ only
