"""The edge proxy at work: listeners, per-connection admission and pre-greeting, the upstream dial with its PROXY v2 header, the two-way splice, and graceful drain.

Every connection runs one handler task (a splice between two real sockets stays in that task; other
streams, as in unit tests, get one extra pump task); every phase has a deadline; the handler catches its own exceptions and logs them with its connection id, so one bad
connection never takes down another or the server.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
from dataclasses import dataclass, field
from functools import partial
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

Connector = Callable[[tuple[str, int]], Awaitable[trio.abc.HalfCloseableStream]]


async def tcp_connect(address: tuple[str, int]) -> trio.SocketStream:
    """Dial an upstream given as an IP literal (config guarantees it). A plain socket connect:
    trio.open_tcp_stream's happy-eyeballs machinery (resolver call, nursery, attempt tasks) costs
    a tenth of the gateway's CPU per relayed session and buys nothing for a literal address."""
    host, port = address
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class UpstreamUnavailable(Exception):
    """The upstream could not be reached (refused, timed out, closed before its banner)."""


class BindError(Exception):
    """A listener address could not be bound (in use, not local, no permission)."""


@dataclass
class ListenerRuntime:
    config: ListenerConfig
    admission: Admission
    bound: list[tuple[str, int]] = field(default_factory=list)


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
                    accepting.start_soon(
                        partial(trio.serve_listeners, partial(self._handle, lr), group, handler_nursery=handlers)
                    )
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

    # ------------------------------------------------------------ one connection

    async def _handle(self, lr: ListenerRuntime, stream: trio.SocketStream) -> None:
        try:
            peer = _addr(stream.socket.getpeername())
            local = _addr(stream.socket.getsockname())
        except OSError:  # reset between accept and here
            await trio.aclose_forcefully(stream)
            return
        await self.handle_connection(lr.config.name, stream, peer, local)

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
                self.metrics.refusals.labels(cfg.name, reason).inc()
                if cfg.speaks_smtp_replies:
                    template = edge.R421_TOO_FAST if reason == REFUSE_RATE else (
                        edge.R421_TOO_MANY if reason != "global_cap" else edge.R421_BUSY)
                    await self._reply_and_close(client, edge.reply(template, host=self.hostname))
                log.info("conn=%d listener=%s client=%s refused: %s", conn.cid, cfg.name, _fmt(peer), reason)
                return
            admitted = True
            self.metrics.active.labels(cfg.name).inc()
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
                self.metrics.active.labels(cfg.name).dec()
            self.metrics.connections.labels(cfg.name, conn.outcome).inc()
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
            self.metrics.bytes.labels(cfg.name, "upstream_to_client").inc(len(banner))
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
        conn.outcome = await self._splice(cfg, conn, client, upstream[0], last_from)

    async def _dial(self, lr: ListenerRuntime, conn: _Conn) -> trio.abc.HalfCloseableStream:
        """Connect upstream and write the PROXY v2 header, within connect_timeout."""
        cfg = lr.config
        started = trio.current_time()
        stream = None
        try:
            with trio.fail_after(cfg.connect_timeout):
                stream = await self.connect(cfg.upstream)
                if cfg.proxy_v2:
                    await stream.send_all(encode_proxy_v2(conn.peer, conn.local))
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            self.metrics.upstream_up.labels(cfg.name).set(0)
            if isinstance(e, trio.TooSlowError):
                raise UpstreamUnavailable(f"connect to {cfg.upstream[0]}:{cfg.upstream[1]} timed out") from None
            raise UpstreamUnavailable(f"connect to {cfg.upstream[0]}:{cfg.upstream[1]}: {e}") from None
        self.metrics.upstream_up.labels(cfg.name).set(1)
        self.metrics.connect_latency.labels(cfg.name).observe(trio.current_time() - started)
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
            self.metrics.checks.labels(cfg.name, "dnsbl", "listed" if zone else "clean").inc()
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
                self.metrics.checks.labels(cfg.name, "early_talker", "pass").inc()
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
            self.metrics.checks.labels(cfg.name, "early_talker", "fail").inc()
        if decision.reply is not None:
            await self._reply_and_close(client, decision.reply)
        return None

    async def _splice(self, cfg: ListenerConfig, conn: _Conn, client, upstream, last_from: str | None = None) -> str:
        """Copy both ways until both sides have sent EOF; returns the outcome.

        Backpressure: each direction holds at most one buffer_size chunk and does not read more
        until send_all has handed it to the kernel. A FIN from one side becomes send_eof on the
        other (half-close), and the session ends when both directions are finished. Any activity
        in either direction pushes back the shared idle deadline. A side that resets ends the
        session; ``reset_is_close`` decides whether that was a normal end. ``last_from`` says which
        side spoke last before the splice began (the banner relayed by the pre-greeting).
        """
        if isinstance(client, trio.SocketStream) and isinstance(upstream, trio.SocketStream):
            return await self._relay(cfg, conn, client.socket, upstream.socket, last_from)
        idle = trio.CancelScope(deadline=trio.current_time() + cfg.idle_timeout)
        failed: str | None = None  # CLIENT or UPSTREAM: the side whose socket broke
        eof = {CLIENT: False, UPSTREAM: False}
        writing = {CLIENT: False, UPSTREAM: False}  # a chunk read but not yet handed to this side
        up_bytes = self.metrics.bytes.labels(cfg.name, "client_to_upstream")
        down_bytes = self.metrics.bytes.labels(cfg.name, "upstream_to_client")
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

    async def _relay(self, cfg: ListenerConfig, conn: _Conn, csock, usock, last_from: str | None) -> str:
        """``_splice`` for two real sockets in this one task: the same rules (one chunk in flight
        per direction, FIN becomes shutdown(SHUT_WR), shared idle deadline, ``reset_is_close``),
        but one readiness wait covers both sockets through the run's shared epoll
        (gateway.relaypoll: two descriptors per session, as for two pumps), and reads and writes
        are non-blocking calls. A second pump task and its nursery cost about a
        third of the memory of an idle relayed connection and a share of the CPU per session."""
        # Per-side state in two-element lists indexed 0 = client, 1 = upstream: an idle relayed
        # connection keeps this frame alive, and lists are a quarter of the size of dicts.
        fds = (csock.fileno(), usock.fileno())
        socks = (csock, usock)
        # Bytes written to a side, counted as the kernel takes them (as send_all does).
        counters = (self.metrics.bytes.labels(cfg.name, "upstream_to_client"),
                    self.metrics.bytes.labels(cfg.name, "client_to_upstream"))
        eof = [False, False]  # this side sent FIN
        pending = [b"", b""]  # read from the other side, not yet written to this one
        shut = [False, False]  # FIN passed on to this side
        failed: int | None = None  # the side whose socket broke
        last = {CLIENT: 0, UPSTREAM: 1, None: None}[last_from]
        size = cfg.buffer_size
        deadline = trio.current_time() + cfg.idle_timeout
        poll = shared_poll()
        waiter = poll.register(fds)
        try:
            while not (shut[0] and shut[1]):
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
                    continue
                masks = [(0 if eof[i] or pending[1 - i] else select.EPOLLIN) | (select.EPOLLOUT if pending[i] else 0)
                         for i in (0, 1)]
                with trio.move_on_at(deadline) as idle:
                    await poll.wait(waiter, masks)
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
