"""Gateway metrics: the Prometheus series the edge proxy exports and the small trio HTTP endpoint (h11) that serves them.

Each Gateway owns its own CollectorRegistry (tests run several gateways in one process). The
tunnel handshake age comes from the wireguard package when it is installed; without it that one
series is simply absent.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Iterable

import h11
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("homemx.gateway.metrics")

# A tunnel round trip is milliseconds; a connect timeout is seconds.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _TunnelCollector:
    """Reads the WireGuard handshake age at scrape time (never on the event loop: see serve_metrics)."""

    def __init__(self, ifname: str):
        self.ifname = ifname

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            from wireguard import status  # lazily: the wireguard package is optional at run time
        except ImportError:
            return []
        try:
            age = status.handshake_age(self.ifname)
        except Exception as e:  # a missing interface must not break the whole scrape
            log.debug("handshake age of %s unavailable: %s", self.ifname, e)
            return []
        if age is None:
            return []
        g = GaugeMetricFamily(
            "homemx_gateway_tunnel_handshake_age_seconds",
            "Seconds since the latest WireGuard handshake with the backend",
            labels=["interface"],
        )
        g.add_metric([self.ifname], float(age))
        return [g]


class GatewayMetrics:
    def __init__(self, tunnel_interface: str | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "homemx_gateway_connections", "Connections by listener and outcome", ["listener", "outcome"], registry=r
        )
        self.active = Gauge("homemx_gateway_active_connections", "Open client connections", ["listener"], registry=r)
        self.bytes = Counter(
            "homemx_gateway_bytes", "Bytes relayed", ["listener", "direction"], registry=r
        )
        self.refusals = Counter(
            "homemx_gateway_refusals", "Connections refused by a limit", ["listener", "reason"], registry=r
        )
        self.checks = Counter(
            "homemx_gateway_edge_checks", "Edge checks and their results", ["listener", "check", "result"], registry=r
        )
        self.connect_latency = Histogram(
            "homemx_gateway_upstream_connect_seconds",
            "Time to open the upstream connection",
            ["listener"],
            buckets=CONNECT_BUCKETS,
            registry=r,
        )
        self.upstream_up = Gauge(
            "homemx_gateway_upstream_up", "1 if the latest upstream connect succeeded", ["listener"], registry=r
        )
        if tunnel_interface:
            r.register(_TunnelCollector(tunnel_interface))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The endpoint answers one request per connection (Prometheus opens few, and a scrape is one GET).
METRICS_PATH = "/metrics"
MAX_REQUEST_HEAD = 8192  # request line + headers; a scraper's request is a few hundred bytes
REQUEST_TIMEOUT = 10.0  # for the whole request to arrive, and again for the answer to be taken
LINGER_TIMEOUT = 2.0  # after answering: how long unread input is drained before closing
LINGER_BYTES = 64 * 1024


def _response(
    status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8", headers=(), head_only: bool = False
) -> list:
    """The h11 events of one complete response that closes the connection.

    ``head_only`` answers a HEAD: the headers describe ``body`` but it is not sent (RFC 9110 9.3.2).
    """
    head = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *headers,
    ]
    events = [h11.Response(status_code=status, reason=HTTPStatus(status).phrase.encode(), headers=head)]
    if not head_only:
        events.append(h11.Data(data=body))
    return events + [h11.EndOfMessage()]


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The request head (None: the client left without one). h11 enforces the size limit."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_REQUEST_HEAD))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed before a request
            return None


async def _answer(request: h11.Request, metrics: GatewayMetrics, path: str) -> list:
    head_only = request.method == b"HEAD"
    if request.target.split(b"?", 1)[0] != path.encode():
        return _response(404, b"not found\n", head_only=head_only)
    if request.method not in (b"GET", b"HEAD"):
        return _response(405, b"method not allowed\n", headers=[("Allow", "GET, HEAD")])
    # generate_latest may run the tunnel collector, which can shell out: keep it off the loop.
    body = await trio.to_thread.run_sync(metrics.render)
    return _response(200, body, CONTENT_TYPE_LATEST, head_only=head_only)


async def _respond(conn: h11.Connection, stream: trio.SocketStream, metrics: GatewayMetrics, path: str) -> list | None:
    """The response to the one request on this connection (None: the client left without one)."""
    request = None
    with trio.move_on_after(REQUEST_TIMEOUT) as reading:
        try:
            request = await _read_request(conn, stream)
        except h11.RemoteProtocolError as e:  # malformed (400) or too large (431)
            log.debug("metrics: bad request: %s", e)
            return _response(e.error_status_hint, HTTPStatus(e.error_status_hint).phrase.encode() + b"\n")
    if reading.cancelled_caught:
        return _response(408, b"request timeout\n")
    if request is None:
        return None
    events = await _answer(request, metrics, path)
    log.debug("metrics: %s %r: %d", request.method.decode("ascii", "replace"), request.target, events[0].status_code)
    return events


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then drain what the client still sends for a moment before closing.

    RFC 9112 9.6: closing with unread input makes the kernel send a reset, which can destroy the
    response the client has not read yet (a 405 to a POST with a body, a 431 to a huge head).
    """
    with trio.move_on_after(LINGER_TIMEOUT):
        await stream.send_eof()
        drained = 0
        while drained < LINGER_BYTES and (data := await stream.receive_some(16384)):
            drained += len(data)


async def serve_metrics(
    metrics: GatewayMetrics,
    listeners: list[trio.SocketListener],
    *,
    path: str = METRICS_PATH,
    task_status=trio.TASK_STATUS_IGNORED,
):
    """Serve Prometheus text for ``GET`` (and ``HEAD``) of ``path`` on already bound listeners until cancelled.

    Parsed with h11 rather than by hand: other paths get 404, other methods 405, a malformed or
    oversized request 400/431, and a client too slow to send its request 408.
    """

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            events = await _respond(conn, stream, metrics, path)
            if events:
                with trio.move_on_after(REQUEST_TIMEOUT):  # a client that does not read cannot hold it either
                    await stream.send_all(b"".join(conn.send(e) for e in events))
                await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("metrics handler failed")
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)
