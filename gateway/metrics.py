"""Gateway metrics: the Prometheus series the edge proxy exports and the small trio HTTP endpoint that serves them.

Each Gateway owns its own CollectorRegistry (tests run several gateways in one process). The
tunnel handshake age comes from the wireguard package when it is installed; without it that one
series is simply absent.
"""

from __future__ import annotations

import logging
from typing import Iterable

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


async def serve_metrics(
    metrics: GatewayMetrics, listeners: list[trio.SocketListener], *, task_status=trio.TASK_STATUS_IGNORED
):
    """Serve ``GET /metrics`` (any path, in fact) as Prometheus text over HTTP/1.0 on already bound
    listeners until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                # generate_latest may run the tunnel collector, which can shell out: keep it off the loop.
                body = await trio.to_thread.run_sync(metrics.render)
                head = (
                    f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("metrics handler failed")
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)
