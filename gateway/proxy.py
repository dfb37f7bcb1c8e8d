"""The edge proxy at work: listeners, per-connection admission and pre-greeting, the upstream dial with its PROXY v2 header, the two-way splice, and graceful drain.

Every connection runs one handler task (a splice between two real sockets stays in that task; other
streams, as in unit tests, get one extra pump task); every phase has a deadline; the handler catches its own exceptions and logs them with its connection id, so one bad
connection never takes down another or the server.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from . import edge
from .config import GatewayConfig, ListenerConfig
from .dnsbl import DnsblChecker, dnspython_lookup
from .limits import Admission, ClientLimiter, GlobalCap, REFUSE_RATE, client_key
from .metrics import GatewayMetrics, serve_metrics
from .proxyv2 import encode_proxy_v2
from .relaypoll import shared_poll

log = logging.getLogger("homemx.gateway")

# Outcomes besides those in edge.py (log words and metric labels).
OUT_RELAYED = "relayed"
OUT_REFUSED = "refused"
OUT_IDLE = "idle_timeout"
OUT_SESSION = "session_timeout"
OUT_RESET = "reset"
OUT_CLIENT_GONE = edge.OUT_CLIENT_GONE
OUT_ERROR = "error"
OUT_SHUTDOWN = "shutdown"

# The two ends of a splice.
CLIENT = "client"
UPSTREAM = "upstream"

REPLY_SEND_TIMEOUT = 10.0  # a client that does not read our one-line reply is not waited for
LINGER = 2.0  # after a reply: wait this long for the client's FIN so unread input does not RST it
LINGER_DISCARD = 65536
# The accept loop takes up to this many queued connections per wakeup (the whole queue: the
# kernel's somaxconn is 4096) before letting the sessions it started run: it gets one turn per
# trio scheduler pass, and under B8's burst a pass runs thousands of ready sessions. A batch of 64
# (HAProxy's tune.maxaccept) absorbed the burst more slowly (docs/benchmarks.md, B8 round 3).
ACCEPT_BATCH = 4096
# accept() errors: the connection died in the queue (skip it); out of descriptors or memory (wait
# and retry, as trio.serve_listeners does, so the listener survives a flood at its limit).
# The list is trio's (trio/_highlevel_socket.py): the errors Linux accept(2) passes on from the new connection.
_ACCEPT_SKIP = {getattr(errno, n) for n in ("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT",
                                            "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
                                            "ENOSR", "ESOCKTNOSUPPORT",
                                            "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET", "EINTR")
                if hasattr(errno, n)}
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_CAPACITY_PAUSE = 0.1

Connector = Callable[[tuple[str, int]], Awaitable[trio.abc.HalfCloseableStream]]


async def tcp_connect(address: tuple[str, int]) -> trio.SocketStream:
    """Dial an upstream given as an IP literal (config guarantees it). A plain non-blocking connect
    and one wait for writability: trio.open_tcp_stream's happy-eyeballs machinery (resolver call,
    nursery, attempt tasks) costs a tenth of the gateway's CPU per relayed session, and even
    trio's socket.connect resolves the literal again and checkpoints twice (B8 profile)."""
    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class UpstreamUnavailable(Exception):
    """The upstream could not be reached (refused, timed out, closed before its banner)."""


class BindError(Exception):
    """A listener address could not be bound (in use, not local, no permission)."""


@dataclass
class ListenerRuntime:
    config: ListenerConfig
    admission: Admission
    bound: list[tuple[str, int]] = field(default_factory=list)
    # This listener's metric children by (metric, *other labels): ``labels()`` validates and locks
    # on every call, several times per connection; a child once made is reused. Made on first use,
    # so a series appears in /metrics only once something happened (as before).
    children: dict = field(default_factory=dict)

    def series(self, metric, *labels):
        """The child of ``metric`` for this listener and ``labels`` (cached)."""
        key = (metric, *labels)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = metric.labels(self.config.name, *labels)
        return child


class _Conn:
    """One client connection's bookkeeping (kept small: 10,000 of these sit idle at once)."""

    __slots__ = ("cid", "peer", "local", "outcome", "up", "down", "started")

    def __init__(self, cid: int, peer: tuple[str, int], local: tuple[str, int]):
        self.cid = cid
        self.peer = peer
        self.local = local
        self.outcome: str | None = None
        self.up = 0
        self.down = 0
        self.started = trio.current_time()


def _addr(sockaddr) -> tuple[str, int]:
    return sockaddr[0], sockaddr[1]


def ipaddress_is_unspecified(host: str) -> bool:
    """0.0.0.0 or :: (a wildcard bind: the local address differs per connection)."""
    return host in ("0.0.0.0", "::")


class Gateway:
    """Runs every configured listener; ``serve`` returns once drained after ``request_drain``."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        metrics: GatewayMetrics | None = None,
        connect: Connector = tcp_connect,
        dnsbl: DnsblChecker | None = None,
    ):
        self.config = config
        self.hostname = config.server.hostname
        self.metrics = metrics or GatewayMetrics(config.server.tunnel_interface)
        self.connect = connect
        self.global_cap = GlobalCap(config.limits.max_connections)
        self.listeners = {
            lc.name: ListenerRuntime(
                lc,
                Admission(
                    self.global_cap,
                    ClientLimiter(
                        lc.max_per_client,
                        lc.rate,
                        lc.burst,
                        config.limits.tracked_clients,
                        clock=trio.current_time,
                    ),
                ),
            )
            for lc in config.listeners
        }
        if dnsbl is None and config.dnsbl.zones:
            d = config.dnsbl
            dnsbl = DnsblChecker(
                d.zones,
                dnspython_lookup(d.nameservers, d.port, d.timeout),
                d.timeout,
                d.cache_ttl,
                d.cache_size,
                clock=trio.current_time,
            )
        self.dnsbl = dnsbl
        self._ids = itertools.count(1)
        self._drain = trio.Event()
        self.metrics_address: tuple[str, int] | None = None
        # (listeners by runtime, metrics listeners) once bind() has run.
        self._bound: tuple[list[tuple[ListenerRuntime, list[trio.SocketListener]]], list[trio.SocketListener]] | None
        self._bound = None

    # ------------------------------------------------------------ serving

    def request_drain(self) -> None:
        """Stop accepting; running sessions get ``shutdown_grace`` seconds to finish."""
        self._drain.set()

    async def bind(self) -> None:
        """Bind every listener and the metrics endpoint (all or nothing) without serving yet.

        Called before any nursery opens, so a failure reaches the caller as one BindError (one
        line naming the address and the reason) instead of an ExceptionGroup from a nursery."""
        if self._bound is not None:
            return
        groups: list[tuple[ListenerRuntime, list[trio.SocketListener]]] = []
        metrics: list[trio.SocketListener] = []

        async def open_listeners(what: str, host: str, port: int) -> list[trio.SocketListener]:
            try:
                return await trio.open_tcp_listeners(port, host=host)
            except OSError as e:
                raise BindError(f"{what}: cannot bind {host}:{port}: {e.strerror or e}") from None

        try:
            for lr in self.listeners.values():
                group: list[trio.SocketListener] = []
                groups.append((lr, group))
                for host, port in lr.config.listen:
                    group += await open_listeners(f"listener {lr.config.name}", host, port)
                lr.bound = [_addr(s.socket.getsockname()) for s in group]
            m = self.config.server.metrics_listen
            if m is not None:
                metrics += await open_listeners("metrics", m[0], m[1])
                self.metrics_address = _addr(metrics[0].socket.getsockname())
        except BaseException:
            for s in metrics + [s for _, group in groups for s in group]:
                await trio.aclose_forcefully(s)
            raise
        self._bound = (groups, metrics)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless ``bind`` already did), report started, serve until drained."""
        await self.bind()
        assert self._bound is not None
        sockets, metrics_listeners = self._bound
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accepting:
                for lr, group in sockets:
                    for listener in group:
                        accepting.start_soon(self._accept_loop, lr, listener, handlers)
                if metrics_listeners:
                    await accepting.start(serve_metrics, self.metrics, metrics_listeners)
                for lr in self.listeners.values():
                    log.info("listener %s (%s) on %s → %s", lr.config.name, lr.config.kind,
                             ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in lr.bound),
                             "%s:%d" % lr.config.upstream)
                task_status.started(self)
                await self._drain.wait()
                accepting.cancel_scope.cancel()
            for _, group in sockets:
                for s in group:
                    await trio.aclose_forcefully(s)
            grace = self.config.server.shutdown_grace
            log.info("draining: %d active connections, %.0fs grace", self.global_cap.active, grace)
            handlers.cancel_scope.deadline = trio.current_time() + grace
        log.info("drained")

    async def _accept_loop(self, lr: ListenerRuntime, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        """Accept on one listening socket until cancelled, starting a session task per connection.

        Unlike trio.serve_listeners (one accept per wakeup, a wrapper task per connection), each
        wakeup takes up to ACCEPT_BATCH queued connections with plain non-blocking accept() calls
        and waits for readability only once the queue is empty. Under a burst the kernel's accept
        queue is drained before it overflows, so new clients are not left retransmitting their SYN
        (1 s, then 3 s: the B8 p99). The peer address comes with accept(); the local one is the
        bound address unless the socket listens on a wildcard address."""
        # A duplicate descriptor of the same listening socket (same queue, same non-blocking
        # flag) as a plain socket; closed here, before serve() closes the listener itself.
        lsock = socket.socket(fileno=os.dup(listener.socket.fileno()))
        try:
            lsock.setblocking(False)
            bound = lsock.getsockname()
            local = None if ipaddress_is_unspecified(bound[0]) else _addr(bound)
            start = handlers.start_soon
            serve = self.handle_connection
            name = lr.config.name
            while True:
                for _ in range(ACCEPT_BATCH):
                    try:
                        sock, peer = lsock.accept()
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(lsock)
                        break
                    except OSError as e:
                        if e.errno in _ACCEPT_SKIP:
                            continue
                        if e.errno not in _ACCEPT_CAPACITY:
                            raise
                        log.error("listener %s: accept: %s; retrying in %.1fs", lr.config.name,
                                  os.strerror(e.errno), ACCEPT_CAPACITY_PAUSE)
                        await trio.sleep(ACCEPT_CAPACITY_PAUSE)
                        break
                    # The stream is made here, not in a wrapper task: an idle session's stack
                    # holds one coroutine frame less.
                    try:
                        here = local or _addr(sock.getsockname())
                        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                    except OSError:  # reset between accept and here
                        sock.close()
                        continue
                    start(serve, name, stream, _addr(peer), here)
                else:
                    await trio.lowlevel.checkpoint()  # a full batch: let the sessions run, then go on
        finally:
            lsock.close()

    # ------------------------------------------------------------ one connection

    async def handle_connection(
        self, listener: str, client: trio.abc.HalfCloseableStream, peer: tuple[str, int], local: tuple[str, int]
    ) -> None:
        """Serve one accepted client stream to completion. Never raises (except cancellation)."""
        lr = self.listeners[listener]
        cfg = lr.config
        conn = _Conn(next(self._ids), peer, local)
        upstream: list[trio.abc.HalfCloseableStream] = []  # filled as soon as a dial succeeds
        key = None
        admitted = False
        try:
            key = client_key(peer[0])
            reason = lr.admission.admit(key)
            if reason is not None:
                conn.outcome = OUT_REFUSED
                lr.series(self.metrics.refusals, reason).inc()
                if cfg.speaks_smtp_replies:
                    template = edge.R421_TOO_FAST if reason == REFUSE_RATE else (
                        edge.R421_TOO_MANY if reason != "global_cap" else edge.R421_BUSY)
                    await self._reply_and_close(client, edge.reply(template, host=self.hostname))
                log.info("conn=%d listener=%s client=%s refused: %s", conn.cid, cfg.name, _fmt(peer), reason)
                return
            admitted = True
            lr.series(self.metrics.active).inc()
            with trio.move_on_after(cfg.session_timeout) as session:
                await self._session(lr, conn, client, upstream)
            if session.cancelled_caught:
                conn.outcome = OUT_SESSION
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.outcome = OUT_RESET  # the client vanished while we wrote to it
        except Exception:
            conn.outcome = OUT_ERROR
            log.exception("conn=%d listener=%s client=%s failed", conn.cid, cfg.name, _fmt(peer))
        finally:
            if conn.outcome is None:
                conn.outcome = OUT_SHUTDOWN  # only cancellation from outside gets here
            # Under cancellation (drain deadline) an unshielded await here would re-raise
            # Cancelled and skip the bookkeeping below; aclose_forcefully never blocks anyway.
            with trio.CancelScope(shield=True):
                for s in upstream:
                    await trio.aclose_forcefully(s)
                await trio.aclose_forcefully(client)
            if admitted:
                lr.admission.release(key)
                lr.series(self.metrics.active).dec()
            lr.series(self.metrics.connections, conn.outcome).inc()
            if conn.outcome != OUT_REFUSED:
                log.info(
                    "conn=%d listener=%s client=%s outcome=%s up=%d down=%d duration=%.3fs",
                    conn.cid, cfg.name, _fmt(peer), conn.outcome, conn.up, conn.down,
                    trio.current_time() - conn.started,
                )

    async def _session(self, lr: ListenerRuntime, conn: _Conn, client, upstream: list) -> None:
        cfg = lr.config
        pending = b""
        last_from = None  # which side spoke last when the splice begins
        if cfg.speaks_smtp_replies and (cfg.greet_wait > 0 or (cfg.dnsbl and self.dnsbl is not None)):
            result = await self._pregreet(lr, conn, client, upstream)
            if result is None:
                return
            banner, pending = result
            last_from = CLIENT if pending else UPSTREAM
            await client.send_all(banner)
            conn.down += len(banner)
            lr.series(self.metrics.bytes, "upstream_to_client").inc(len(banner))
        else:
            try:
                upstream.append(await self._dial(lr, conn))
            except UpstreamUnavailable as e:
                conn.outcome = edge.OUT_UNAVAILABLE
                log.warning("conn=%d listener=%s upstream unavailable: %s", conn.cid, cfg.name, e)
                if cfg.speaks_smtp_replies:
                    await self._reply_and_close(client, edge.reply(edge.R421_UNAVAILABLE, host=self.hostname))
                return
        if pending:
            await upstream[0].send_all(pending)
            conn.up += len(pending)
        up = upstream[0]
        if isinstance(client, trio.SocketStream) and isinstance(up, trio.SocketStream):
            # Straight to the one-task relay (as _splice would): one coroutine frame less per session.
            conn.outcome = await self._relay(lr, conn, client.socket, up.socket, last_from)
        else:
            conn.outcome = await self._splice(lr, conn, client, up, last_from)

    async def _dial(self, lr: ListenerRuntime, conn: _Conn) -> trio.abc.HalfCloseableStream:
        """Connect upstream and write the PROXY v2 header, within connect_timeout."""
        cfg = lr.config
        started = trio.current_time()
        stream = None
        try:
            with trio.fail_after(cfg.connect_timeout):
                stream = await self.connect(cfg.upstream)
                if cfg.proxy_v2:
                    header = encode_proxy_v2(conn.peer, conn.local)
                    if isinstance(stream, trio.SocketStream):
                        # A fresh socket's send buffer takes the header whole: one send() call,
                        # not send_all's conflict check and checkpoints (B8 profile).
                        try:
                            header = header[os.write(stream.socket.fileno(), header):]
                        except BlockingIOError:
                            pass
                    if header:
                        await stream.send_all(header)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            lr.series(self.metrics.upstream_up).set(0)
            if isinstance(e, trio.TooSlowError):
                raise UpstreamUnavailable(f"connect to {cfg.upstream[0]}:{cfg.upstream[1]} timed out") from None
            raise UpstreamUnavailable(f"connect to {cfg.upstream[0]}:{cfg.upstream[1]}: {e}") from None
        lr.series(self.metrics.upstream_up).set(1)
        lr.series(self.metrics.connect_latency).observe(trio.current_time() - started)
        return stream

    async def _pregreet(self, lr: ListenerRuntime, conn: _Conn, client, upstream: list):
        """Hold the client silent (greet wait, DNSBL), then dial and read the banner while still
        watching for early talk. Returns (banner, bytes the client sent after it) or None when the
        connection ended here (conn.outcome set, reply sent)."""
        cfg = lr.config
        pg = edge.PreGreeting(self.hostname, conn.peer[0])
        decision: edge.Decision | None = None
        banner = b""
        late = b""
        dnsbl_done = trio.Event()

        async def watch_client(cancel: trio.CancelScope) -> None:
            nonlocal decision, late
            try:
                data = await client.receive_some(cfg.buffer_size)
            except trio.BrokenResourceError:
                # A reset is a normal way to leave (scanners do it all day): an outcome, not an
                # exception escaping this nursery as an ExceptionGroup. Raced with the banner: the
                # banner write that follows meets the broken socket and ends the session as a reset.
                if pg.state != edge.PASSED:
                    decision = pg.client_reset()
                    cancel.cancel()
                return
            if pg.state == edge.PASSED:  # raced with the banner: the bytes are ordinary input
                late = data
                return
            decision = pg.client_bytes(data) if data else pg.client_gone()
            cancel.cancel()

        async def check_dnsbl(cancel: trio.CancelScope) -> None:
            nonlocal decision
            zone = await self.dnsbl.listed_in(conn.peer[0])
            lr.series(self.metrics.checks, "dnsbl", "listed" if zone else "clean").inc()
            if zone is not None:
                decision = pg.dnsbl_listed(zone)
                cancel.cancel()
            dnsbl_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_client, nursery.cancel_scope)
            if cfg.dnsbl and self.dnsbl is not None:
                nursery.start_soon(check_dnsbl, nursery.cancel_scope)
            else:
                dnsbl_done.set()
            await trio.sleep(cfg.greet_wait)
            await dnsbl_done.wait()  # bounded by the DNSBL timeout
            pg.wait_over()
            if cfg.greet_wait > 0:
                lr.series(self.metrics.checks, "early_talker", "pass").inc()
            try:
                upstream.append(await self._dial(lr, conn))
                with trio.fail_after(cfg.banner_timeout):
                    banner = await upstream[0].receive_some(cfg.buffer_size)
                if not banner:
                    raise UpstreamUnavailable("upstream closed before its banner")
            except (UpstreamUnavailable, trio.TooSlowError, trio.BrokenResourceError) as e:
                log.warning("conn=%d listener=%s upstream unavailable: %s", conn.cid, cfg.name, e or "banner timeout")
                decision = pg.upstream_failed()
            else:
                pg.banner()
            nursery.cancel_scope.cancel()

        if pg.state == edge.PASSED:
            return banner, late
        assert decision is not None
        conn.outcome = decision.outcome
        if decision.outcome == edge.OUT_EARLY_TALKER:
            lr.series(self.metrics.checks, "early_talker", "fail").inc()
        if decision.reply is not None:
            await self._reply_and_close(client, decision.reply)
        return None

    async def _splice(self, lr: ListenerRuntime, conn: _Conn, client, upstream, last_from: str | None = None) -> str:
        """Copy both ways until both sides have sent EOF; returns the outcome.

        Backpressure: each direction holds at most one buffer_size chunk and does not read more
        until send_all has handed it to the kernel. A FIN from one side becomes send_eof on the
        other (half-close), and the session ends when both directions are finished. Any activity
        in either direction pushes back the shared idle deadline. A side that resets ends the
        session; ``reset_is_close`` decides whether that was a normal end. ``last_from`` says which
        side spoke last before the splice began (the banner relayed by the pre-greeting).
        """
        if isinstance(client, trio.SocketStream) and isinstance(upstream, trio.SocketStream):
            return await self._relay(lr, conn, client.socket, upstream.socket, last_from)
        cfg = lr.config
        idle = trio.CancelScope(deadline=trio.current_time() + cfg.idle_timeout)
        failed: str | None = None  # CLIENT or UPSTREAM: the side whose socket broke
        eof = {CLIENT: False, UPSTREAM: False}
        writing = {CLIENT: False, UPSTREAM: False}  # a chunk read but not yet handed to this side
        up_bytes = lr.series(self.metrics.bytes, "client_to_upstream")
        down_bytes = lr.series(self.metrics.bytes, "upstream_to_client")
        size = cfg.buffer_size

        async def pump(src, dst, upward: bool, nursery: trio.Nursery) -> None:
            nonlocal failed, last_from
            counter = up_bytes if upward else down_bytes
            src_side, dst_side = (CLIENT, UPSTREAM) if upward else (UPSTREAM, CLIENT)
            side = src_side
            try:
                while True:
                    side = src_side
                    data = await src.receive_some(size)
                    side = dst_side
                    if not data:
                        eof[src_side] = True
                        await dst.send_eof()
                        return
                    last_from = src_side
                    idle.deadline = trio.current_time() + cfg.idle_timeout
                    writing[dst_side] = True
                    await dst.send_all(data)
                    writing[dst_side] = False
                    idle.deadline = trio.current_time() + cfg.idle_timeout
                    counter.inc(len(data))
                    if upward:
                        conn.up += len(data)
                    else:
                        conn.down += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # One side reset: nothing more can flow either way that anybody would read.
                if failed is None:
                    failed = side
                nursery.cancel_scope.cancel()

        with idle:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, upstream, client, False, nursery)
                await pump(client, upstream, True, nursery)
        if idle.cancelled_caught:
            return OUT_IDLE
        if failed is None or reset_is_close(failed, eof, last_from, writing):
            return OUT_RELAYED
        return OUT_RESET

    async def _relay(self, lr: ListenerRuntime, conn: _Conn, csock, usock, last_from: str | None) -> str:
        """``_splice`` for two real sockets in this one task: the same rules (one chunk in flight
        per direction, FIN becomes shutdown(SHUT_WR), shared idle deadline, ``reset_is_close``),
        but one readiness wait covers both sockets through the run's shared epoll
        (gateway.relaypoll: two descriptors per session, as for two pumps), and reads and writes
        are non-blocking calls. A second pump task and its nursery cost about a
        third of the memory of an idle relayed connection and a share of the CPU per session."""
        # Per-side state in two-element lists indexed 0 = client, 1 = upstream: an idle relayed
        # connection keeps this frame alive, and lists are a quarter of the size of dicts.
        cfg = lr.config
        fds = (csock.fileno(), usock.fileno())
        socks = (csock, usock)
        # Bytes written to a side, counted as the kernel takes them (as send_all does).
        counters = (lr.series(self.metrics.bytes, "upstream_to_client"),
                    lr.series(self.metrics.bytes, "client_to_upstream"))
        eof = [False, False]  # this side sent FIN
        pending = [b"", b""]  # read from the other side, not yet written to this one
        shut = [False, False]  # FIN passed on to this side
        failed: int | None = None  # the side whose socket broke
        last = {CLIENT: 0, UPSTREAM: 1, None: None}[last_from]
        size = cfg.buffer_size
        deadline = trio.current_time() + cfg.idle_timeout
        poll = shared_poll()
        waiter = poll.register(fds)
        # One idle scope for the whole relay, its deadline moved before a wait when data moved:
        # a scope per wait (create, enter, exit) cost more than the wait itself.
        idle = trio.CancelScope(deadline=deadline)
        try:
            with idle:
                # A fresh session has nothing to read yet: wait for readiness first rather than
                # pay two reads that fail with EAGAIN (each a system call and an exception).
                progress = False
                while not (shut[0] and shut[1]):
                    if not progress:
                        masks = [(0 if eof[i] or pending[1 - i] else select.EPOLLIN)
                                 | (select.EPOLLOUT if pending[i] else 0) for i in (0, 1)]
                        if idle.deadline != deadline:
                            idle.deadline = deadline
                        await poll.wait(waiter, masks)
                    progress = False
                    for src in (0, 1):
                        dst = 1 - src
                        side = dst
                        try:
                            if pending[dst]:
                                n = os.write(fds[dst], pending[dst])
                                self._count(conn, counters[dst], dst, n)
                                pending[dst] = pending[dst][n:]
                                progress = True
                            if pending[dst] or eof[src]:
                                continue
                            side = src
                            data = os.read(fds[src], size)
                            progress = True
                            side = dst
                            if not data:
                                eof[src] = True
                                socks[dst].shutdown(socket.SHUT_WR)
                                shut[dst] = True
                                continue
                            last = src
                            pending[dst] = data
                            n = os.write(fds[dst], data)
                            self._count(conn, counters[dst], dst, n)
                            pending[dst] = data[n:]
                        except BlockingIOError:
                            pass
                        except OSError:  # reset, broken pipe: nothing more can flow either way
                            failed = side
                            break
                    if failed is not None:
                        break
                    if progress:
                        deadline = trio.current_time() + cfg.idle_timeout
            if idle.cancelled_caught:
                return OUT_IDLE
        finally:
            poll.unregister(waiter)
        if failed is None:
            return OUT_RELAYED
        name = (CLIENT, UPSTREAM)
        if reset_is_close(name[failed], dict(zip(name, eof)), None if last is None else name[last],
                          dict(zip(name, (bool(p) for p in pending)))):
            return OUT_RELAYED
        return OUT_RESET

    @staticmethod
    def _count(conn: _Conn, counter, dst: int, n: int) -> None:
        counter.inc(n)
        if dst == 1:  # the upstream
            conn.up += n
        else:
            conn.down += n

    async def _reply_and_close(self, client, data: bytes) -> None:
        """Write one reply, send FIN, and briefly drain the client so unread input does not turn
        our close into a RST that destroys the reply before the client reads it."""
        try:
            with trio.move_on_after(REPLY_SEND_TIMEOUT):
                await client.send_all(data)
                await client.send_eof()
            with trio.move_on_after(LINGER):
                discarded = 0
                while discarded < LINGER_DISCARD:
                    chunk = await client.receive_some(4096)
                    if not chunk:
                        break
                    discarded += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def reset_is_close(failed: str, eof: dict[str, bool], last_from: str | None, writing: dict[str, bool]) -> bool:
    """Whether a reset that ended a splice was in fact the normal end of the session (pure).

    The gateway sees no protocol inside TLS, so it judges by what was in flight. A reset is a
    normal close when nothing was lost: both sides had already sent EOF; or the client reset after
    the upstream had closed; or the upstream spoke last and all of it reached the client (the
    session was at rest, waiting for the client, which may leave at that point). The common case:
    after QUIT the backend sends 221 and its TLS close_notify (RFC 8446 6.1) together and waits for
    the client's close_notify; a client that reads the 221 and closes without reading the alert
    makes its kernel answer with RST, not FIN (unread data on close, RFC 2525 2.17). A reset while
    the client's last bytes await an answer, or while a chunk is being written, is a real reset.
    """
    if eof[CLIENT] and eof[UPSTREAM]:
        return True
    if failed == CLIENT and eof[UPSTREAM]:
        return True
    return last_from == UPSTREAM and not writing[CLIENT]


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}"



__all__ = ["Gateway", "BindError", "UpstreamUnavailable", "tcp_connect"]
