"""The home's web face on the network: the HTTP and HTTPS listeners the gateway's 80/443
passthrough reaches, with PROXY v2, TLS at home, per-client and time limits, then aiohttp.

Why aiohttp: the backend already depends on it for its HTTP client work (the MTA-STS policy
fetch, rspamd), it is well kept, and its low-level server (``web.Server`` and its
``RequestHandler`` protocol) gives a hardened HTTP/1.1 parser and keep-alive without a framework
on top: the routes are a handful (backend/http/routes.py).

Theory of operation. aiohttp reads no PROXY header, and it can do TLS only through the event
loop's ``create_server(ssl=...)``, i.e. from the first byte, while behind the gateway the PROXY
header comes in clear before the TLS ClientHello. So every accepted socket first meets a front
door of ours (``_Front``):

1. ``proxy_protocol``: a peer that is not a trusted proxy is closed before anything is read (like
   the SMTP listeners). The PROXY v2 header must come within PROXY_TIMEOUT; it is parsed by
   aiosmtpd's parser and judged by the SMTP listeners' rules (receive/proxy.py ``proxy_refusal``);
   the real client address replaces the gateway's.
2. The per-client connection limit (an IPv4 address or an IPv6 /64, receive/authlimit.py
   ``client_key``): one more connection is closed at once.
3. HTTPS: TLS starts on the same transport, asyncio's SSLProtocol fed with whatever was read past
   the header (as receive/smtptls.py does for 465), with the server context SMTP uses.
4. The connection is handed to an aiohttp RequestHandler whose peername is the real client, so
   logs, ``request.remote`` and limits see the client, never the gateway.

Time: each connection has one deadline, ``[http] timeout`` for the TLS handshake and each request
(headers, body, the answer), renewed whenever an answer is ready; when it passes the socket is
aborted. aiohttp itself has no limit until the headers are complete, so this is what cuts off a
slowloris client. Size: a body is read up to ``max_request_size`` (413); request and header lines
and their number are bounded by aiohttp's parser (400).

Logs: one line per request (connection id, real client, Host, method, path, route, status,
duration; never the query string, which may carry an address) and one per connection refused or
cut off.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import ssl
from asyncio import sslproto
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from aiosmtpd.proxy_protocol import get_proxy

from backend.config import BackendConfig
from backend.http.routes import Challenges, RequestRefused, Site, host_name, text
from backend.metrics import BackendMetrics
from backend.receive.authlimit import client_key
from backend.receive.clientaddr import canonical_host, client_ip
from backend.receive.context import PROXY_TIMEOUT
from backend.receive.proxy import proxy_refusal
from backend.tls.context import TLSSetupError

log = logging.getLogger("homemx.http")

_conn_ids = itertools.count(1)

PROXY_V2_MAX = 16 + 0xFFFF  # PROXY v2 2.2: a 16-byte preamble, then at most 65535 bytes
LINGER = 2.0  # seconds to read and drop an unread body after answering, so the answer is not lost to a reset
MAX_HEADERS = 64  # header fields per request (aiohttp: 400 beyond)
MAX_LINE = 8190  # bytes per request line and per header field (aiohttp's default)


class HTTPFace:
    """The web face: its listeners (``listen_http``, ``listen_https``), the connections they
    hold, and what those share (routes, limits, metrics). ``start`` binds; ``close`` stops."""

    def __init__(
        self,
        config: BackendConfig,
        *,
        tls_context: ssl.SSLContext | None,
        challenges: Challenges | None,
        metrics: BackendMetrics,
        proxy_timeout: float = PROXY_TIMEOUT,
    ):
        self.config = config
        self.settings = config.http
        self.tls_context = tls_context
        self.metrics = metrics
        self.proxy_timeout = proxy_timeout
        self.site = Site(config, challenges, self.settings.max_request_size)
        self.servers: dict[str, asyncio.base_events.Server] = {}
        self.connections: set[_Front] = set()
        self.per_client: collections.Counter[str] = collections.Counter()
        self.web: web.Server | None = None

    async def start(self) -> None:
        """Bind the configured listeners. HTTPS without a certificate is a start error."""
        loop = asyncio.get_running_loop()
        # handler_cancellation: a client that goes away mid-request stops its handler.
        self.web = web.Server(self._handle, request_factory=self._make_request, handler_cancellation=True)
        for name, https, listen in (("http", False, self.settings.listen_http), ("https", True, self.settings.listen_https)):
            if listen is None:
                continue
            if https and self.tls_context is None:
                raise TLSSetupError("[http] listen_https needs a certificate ([tls] cert and key)")
            host, port = listen
            server = await loop.create_server(lambda n=name, h=https: _Front(self, n, h), host, port, reuse_address=True)
            self.servers[name] = server
            bound = server.sockets[0].getsockname()
            log.info("http face %s on %s port %d", name, bound[0], bound[1])

    def bound_port(self, name: str) -> int:
        """The port the ``http`` or ``https`` listener is bound to (tests bind port 0)."""
        return self.servers[name].sockets[0].getsockname()[1]

    async def close(self, grace: float) -> None:
        """Stop accepting, let requests in progress finish within ``grace`` seconds, close the rest."""
        for server in self.servers.values():
            server.close()
        for front in list(self.connections):
            if not front.connected:
                front.abort("shutdown")  # still in the PROXY header or the TLS handshake
        if self.web is not None:
            await self.web.shutdown(grace)
        for front in list(self.connections):
            front.abort("shutdown")

    def trusted_proxy(self, host: str) -> bool:
        ip = client_ip(host)
        return ip is not None and any(ip in n for n in self.settings.trusted_proxies)

    def _make_request(self, message, payload, protocol, writer, task) -> BaseRequest:
        # Bounds request.read() too, should any route use it (routes.read_body is the one reader).
        return BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop(),
                           client_max_size=self.settings.max_request_size)

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        front: _Front = request.protocol.front
        started = asyncio.get_running_loop().time()
        try:
            route, response, refused = await self.site.answer(request, front.https)
        except (HttpProcessingError, RequestPayloadError) as e:  # a body aiohttp could not decode (bad chunked framing)
            route, response, refused = "bad-request", RequestRefused(400, "bad body").response(), str(e)
            request.content.feed_eof()  # nothing more of it is worth reading: no lingering on it
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away: nothing to answer (the connection's end is counted)
        except Exception as e:  # noqa: BLE001 - a defect of ours: a 500 and one line, never a dead server
            log.error("conn=%s client=%s route failed: %r", front.conn_id, front.client[0], e)
            route, response, refused = "error", RequestRefused(500, "").response(), repr(e)
        if response.status >= 400:
            response.force_close()  # a client that erred gets no second chance on this connection
        front.answered()
        self.count(front, request, route, response.status, started, refused)
        return response

    def count(self, front: _Front, request: BaseRequest | None, route: str, status: int, started: float,
              refused: str | None) -> None:
        """The request's log line and metric."""
        self.metrics.http_requests.labels(route, str(status)).inc()
        if request is None:
            what = "- -"
            host = "-"
        else:
            what = f"{request.method} {request.rel_url.raw_path[:200]}"
            host = host_name(request.headers.get("Host")) or "-"
        log.info(
            "conn=%s client=%s host=%s %s route=%s status=%d%s duration=%.3fs",
            front.conn_id, front.client[0], host, what, route, status,
            f" refused={refused!r}" if refused else "", asyncio.get_running_loop().time() - started,
        )


class _Connection(RequestHandler):
    """aiohttp's HTTP/1.1 protocol for one connection, seeing the real client as its peer."""

    def __init__(self, manager: web.Server, *, front: _Front, **kwargs):
        super().__init__(manager, **kwargs)
        self.front = front

    @property
    def peername(self):  # request.remote and aiohttp's own messages use this
        return self.front.client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.front.connected = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.front.ended()

    def data_received(self, data: bytes) -> None:
        request, queued = self._current_request, len(self._messages)
        super().data_received(data)
        # aiohttp 3.14 with its C parser: a body found malformed in a later segment than its
        # headers becomes a queued 400 while the request reading that body waits for ever (the
        # pure-Python parser fails the body instead). Fail the body, so the route answers 400 now.
        # A new message while the body is unfinished can only be that error: the parser reaches a
        # pipelined request only after the body before it ended.
        if request is not None and len(self._messages) > queued and not request.content.is_eof():
            request.content.set_exception(RequestPayloadError("malformed body"))

    def log_exception(self, message: str, *args, exc_info=None, **kwargs) -> None:
        # aiohttp logs what goes wrong around a request with a traceback (e.g. a malformed body
        # found while it drops the unread rest after the answer): one line.
        log.info("conn=%s client=%s %s: %r", self.front.conn_id, self.front.client[0], message % args, exc_info)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own answers (a request its parser refused: 400; a line too long): one log line
        and a short body, never a traceback."""
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already being sent")  # as aiohttp does: close
        self.front.answered()
        face = self.front.face
        face.count(self.front, None, "bad-request", status, asyncio.get_running_loop().time(),
                   message or (type(exc).__name__ if exc else None))
        response = text(status, f"{status} {HTTPStatus(status).phrase}\n")
        response.force_close()
        return response


class _Front(asyncio.Protocol):
    """One accepted socket until aiohttp has it (see the module's theory of operation), and the
    connection's deadline, client slot and outcome until it ends."""

    def __init__(self, face: HTTPFace, listener: str, https: bool):
        self.face = face
        self.listener = listener
        self.https = https
        self.conn_id = f"{listener}-{next(_conn_ids)}"
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.client: tuple[str, int] = ("unknown", 0)
        self.transport: asyncio.Transport | None = None
        self.outcome = "closed"
        self.requests = 0
        self.connected = False  # aiohttp's protocol has the connection (after any TLS handshake)
        self._slot: str | None = None  # the per-client key this connection counts against
        self._timer: asyncio.TimerHandle | None = None
        self._header: asyncio.StreamReader | None = None  # bytes before the hand-off (PROXY phase)
        self._header_bytes = 0
        self._paused = False  # we paused reading in the PROXY phase (resumed at the hand-off)
        self._task: asyncio.Task | None = None
        self._ended = False

    # -- the asyncio protocol, until the hand-off ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client = (canonical_host(peer[0]), peer[1])
        self.face.connections.add(self)
        if not self.face.settings.proxy_protocol:
            self._open(b"")
        elif not self.face.trusted_proxy(self.client[0]):
            # Only the gateway may speak PROXY to us; anyone else is closed before any byte.
            self.abort("untrusted-peer")
        else:
            self._header = asyncio.StreamReader(limit=PROXY_V2_MAX)
            self._arm(self.face.proxy_timeout, "proxy-timeout")
            self._task = asyncio.create_task(self._read_proxy_header(), name=f"http-proxy-{self.conn_id}")

    def data_received(self, data: bytes) -> None:
        assert self._header is not None  # after the hand-off the transport feeds another protocol
        self._header.feed_data(data)
        self._header_bytes += len(data)
        if self._header_bytes > PROXY_V2_MAX:
            # Whatever the client sends behind the header waits in the kernel until the hand-off.
            self.transport.pause_reading()
            self._paused = True

    def eof_received(self) -> bool:
        if self._header is not None:
            self._header.feed_eof()  # the header reader then ends the connection
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.ended()

    async def _read_proxy_header(self) -> None:
        reader = self._header
        try:
            proxy_data = await get_proxy(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.abort("closed")  # gone before a whole header
            return
        reason = proxy_refusal(proxy_data)
        if reason is not None:
            log.info("conn=%s peer=%s refused PROXY header: %s", self.conn_id, self.client[0], proxy_data.error or reason)
            self.abort(reason.replace("_", "-"))
            return
        self.client = (canonical_host(str(proxy_data.src_addr)), int(proxy_data.src_port or 0))
        # What the client sent behind the header (often the TLS ClientHello, in the same
        # segment): with EOF fed this read never waits, so nothing arrives in between.
        reader.feed_eof()
        rest = await reader.read()
        self._header = None
        self._open(rest)

    # -- the hand-off --------------------------------------------------------------------------

    def _open(self, rest: bytes) -> None:
        face = self.face
        key = client_key(self.client[0])
        if face.per_client[key] >= face.settings.max_connections_per_client:
            self.abort("too-many-connections")
            return
        face.per_client[key] += 1
        self._slot = key
        timeout = face.settings.timeout
        self._arm(timeout, "timeout")
        handler = _Connection(
            face.web, front=self, loop=self.loop, keepalive_timeout=timeout, access_log=None,
            max_line_size=MAX_LINE, max_field_size=MAX_LINE, max_headers=MAX_HEADERS, lingering_time=LINGER,
        )
        transport = self.transport
        if self.https:
            handshake = self.loop.create_future()
            tls = sslproto.SSLProtocol(self.loop, handler, face.tls_context, handshake, server_side=True,
                                       ssl_handshake_timeout=timeout)
            transport.set_protocol(tls)
            tls.connection_made(transport)
            if rest:
                buf = tls.get_buffer(len(rest))
                buf[: len(rest)] = rest
                tls.buffer_updated(len(rest))
            handshake.add_done_callback(self._handshake_done)
        else:
            transport.set_protocol(handler)
            handler.connection_made(transport)
            if rest:
                handler.data_received(rest)
        if self._paused:
            transport.resume_reading()

    def _handshake_done(self, handshake: asyncio.Future) -> None:
        error = None if handshake.cancelled() else handshake.exception()
        if self._ended or (error is None and self.connected):
            return  # ended already (aborted), or aiohttp has the connection
        # A failed handshake (a scanner, no common cipher, the deadline), or the connection went
        # during it: asyncio then never tells the application protocol, so the end is ours.
        if self.outcome == "closed":
            self.outcome = "tls-failed"
        log.info("conn=%s client=%s TLS handshake failed: %r", self.conn_id, self.client[0], error)
        self.transport.close()
        self.ended()

    # -- deadline and end ----------------------------------------------------------------------

    def _arm(self, seconds: float, outcome: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self.abort, outcome)

    def answered(self) -> None:
        """An answer is ready: the next request gets a fresh deadline."""
        self.requests += 1
        self._arm(self.face.settings.timeout, "idle")

    def abort(self, outcome: str) -> None:
        """Cut the connection (a refusal, the deadline, shutdown); nothing more is sent."""
        if self.outcome == "closed":
            self.outcome = outcome
        if self.transport is not None:
            self.transport.abort()
        if not self.connected:
            self.ended()  # no aiohttp protocol to report the loss

    def ended(self) -> None:
        """The connection is over: free its client slot, count it, and log it when it did not
        end the usual way."""
        if self._ended:
            return
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        if self._slot is not None:
            self.face.per_client[self._slot] -= 1
            if not self.face.per_client[self._slot]:
                del self.face.per_client[self._slot]
        self.face.connections.discard(self)
        self.face.metrics.http_connections.labels(self.listener, self.outcome).inc()
        if self.outcome not in ("closed", "idle", "shutdown") or not self.requests:
            log.info("conn=%s listener=%s client=%s outcome=%s requests=%d duration=%.3fs", self.conn_id,
                     self.listener, self.client[0], self.outcome, self.requests, self.loop.time() - self.started)
