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
import inspect
import itertools
import logging
import re
import time
from typing import Any, Callable


import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import SMTP, Session

from backend.smtp import replies as R
from backend.smtp.paths import (
    PathError,
    is_bare_postmaster,
    parse_path,
    split_path_and_params,
)
from backend.smtp.masquerade import masquerade_path
from backend.receive.clientaddr import canonical_host
from backend.receive.context import ListenerContext
from backend.receive.handler import Handler
from backend.receive.smtpauth import SMTPAuth
from backend.receive.smtpdata import SMTPData
from backend.receive.smtptls import SMTPTLS

log = logging.getLogger("homemx.smtp")

_conn_ids = itertools.count(1)

# <dot-atom@host-name> or <>, then the parameters (see SMTPSession._getaddr).
_SIMPLE_PATH = re.compile(r"<(?:([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                          r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*))?>"
                          r'((?:[ \t][^()\\"]*)?)\Z')  # no comments or quotes in the parameters either


class HomeSession(Session):
    """aiosmtpd's Session without its deprecated ``login_data`` property, which logs a warning
    each time aiosmtpd itself sets it after a successful AUTH (we use ``auth_data``)."""

    login_data: Any = None


class HomeSMTP(SMTPTLS, SMTPAuth, SMTPData, SMTP):
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
        aiosmtpd_smtp.dir = _INSPECT.dir  # module globals shadow the builtin; removed below
        try:
            super().__init__(handler, **kwargs)
        finally:
            aiosmtpd_smtp.inspect = inspect
            del aiosmtpd_smtp.dir
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
        self.client = (canonical_host(peer[0]), peer[1]) if peer else ("unknown", 0)
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
        self._drop_pipelined()
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

    def _drop_pipelined(self) -> None:
        """The session is ending: forget the commands the client pipelined, and never resume the
        reader's transport (were it paused for a full buffer, the reader's next wait would resume
        it, and asyncio's TLS transport, closed twice by aiosmtpd and by us, has no protocol left
        to resume: AttributeError '_resume_reading', an ERROR line the fuzzer saw twice in 10 min)."""
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        self._reader._paused = False  # type: ignore[attr-defined]

    @property
    def client_host(self) -> str:
        return self.client[0] if self.client else "unknown"

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
            self._drop_pipelined()
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
            self._drop_pipelined()

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
        malformed input as well as HeaderParseError (e.g. ``VRFY <``): each means "cannot parse".

        The common shapes (``<local@domain> PARAMS`` with a dot-atom local part and a host name,
        and ``<>``) are split here with one regular expression and give what the email parser
        gives for them (tests/backend/test_addresses.py compares the two); that parser defines
        a ``typing.Protocol`` class on every call and was ~15% of the event loop under load
        (issue 17). Anything else (quoted local parts, source routes, literals, UTF-8, stray
        spaces) still goes to aiosmtpd's parser."""
        m = _SIMPLE_PATH.match(arg) if arg else None
        if m is not None:
            addr, rest = m.group(1), m.group(2)
            if addr is None:
                return "<>", rest
            if self.local_part_limit and addr.index("@") > self.local_part_limit:
                return None, None
            return addr, rest.lstrip()
        try:
            return super()._getaddr(arg)
        except Exception:  # noqa: BLE001 - a parser bug is a syntax error of the client's, not ours
            return None, None

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg is not None and self.session is not None and self.session.host_name:
            stripped = self._strip_command_keyword("FROM:", arg)
            if stripped is not None and not (self._auth_required and not self.session.authenticated):
                try:
                    path, params = split_path_and_params(stripped)
                    if self.ctx.listener.kind == "lan":
                        # root, root@nas → root@<masquerade domain> (backend/smtp/masquerade.py)
                        path, arg = self._masqueraded(path, params, "FROM:", arg)
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
                    elif self.ctx.listener.kind == "lan":
                        path, arg = self._masqueraded(path, params, "TO:", arg)
                    parse_path(path)
                except PathError as e:
                    self._reject("bad_path")
                    await self.push(e.reply)
                    return
        await super().smtp_RCPT(arg)

    def _masqueraded(self, path: str, params: str, keyword: str, arg: str) -> tuple[str, str]:
        """lan: the path with an unqualified or host-local address given our domain, and the command
        argument rebuilt around it (unchanged when nothing needed rewriting)."""
        lc = self.ctx.listener
        new = masquerade_path(path, self.ctx.masquerade_domain, lc.local_hostnames)
        if new == path:
            return path, arg
        log.debug("conn=%s masqueraded %s%s as %s", self.conn_id, keyword, path, new)
        return new, f"{keyword}{new} {params}".rstrip()

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
        self._class_dirs: dict[type, tuple[list[str], frozenset[str]]] = {}

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

    def dir(self, *args):
        """``dir(obj)`` for aiosmtpd's ``smtp_*`` and ``handle_*`` lookups (a third of the cost of
        SMTP.__init__ on top of getmembers, py-spy in docs/benchmarks.md "Round 3 — backend CPU per
        message"): the class's names once per class, plus the instance's own attributes."""
        if len(args) != 1 or not isinstance(args[0], self._classes):
            return dir(*args)
        obj = args[0]
        cls = type(obj)
        cached = self._class_dirs.get(cls)
        if cached is None:
            listed = dir(cls)
            cached = self._class_dirs[cls] = (listed, frozenset(listed))
        listed, names = cached
        # The same names as the builtin's; its sorting is left out (aiosmtpd builds dicts from them).
        return listed + [n for n in getattr(obj, "__dict__", ()) if n not in names]

    def signature(self, fn):
        key = getattr(fn, "__func__", fn)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = self._real.signature(fn)
        return sig


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
        try:
            # Given, aiosmtpd need not look the loop up itself (get_event_loop under a warnings
            # filter: ~1% of the event loop at 550 connections/s).
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
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
            loop=loop,
        )

    return factory


_INSPECT = _AiosmtpdInspect(inspect, (HomeSMTP, Handler))  # used inside HomeSMTP.__init__ only
