"""The gateway's metrics endpoint over real loopback sockets: GET of its path only, every other request refused.

Responses are read to EOF (one request per connection) and parsed here by hand, so the test's
oracle is not the server's own HTTP library.
"""

from __future__ import annotations

import pytest
import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import MAX_REQUEST_HEAD, GatewayMetrics, serve_metrics


class Reply:
    def __init__(self, raw: bytes):
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        assert sep, raw
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.version, code, self.reason = status_line.split(" ", 2)
        self.status = int(code)
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


async def exchange(address, request: bytes) -> Reply:
    """Send ``request`` and read everything until the server closes the connection."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    return Reply(raw)


@pytest.fixture
async def endpoint(nursery):
    """A served GatewayMetrics with one counter moved; yields (metrics, address)."""
    metrics = GatewayMetrics()
    metrics.connections.labels("mx", "relayed").inc(3)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(serve_metrics, metrics, listeners)
    yield metrics, listeners[0].socket.getsockname()[:2]


@pytest.mark.trio
async def test_get_of_the_path_is_the_prometheus_text(endpoint):
    metrics, address = endpoint
    reply = await exchange(address, b"GET /metrics HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\n\r\n")
    assert (reply.status, reply.headers["content-type"]) == (200, CONTENT_TYPE_LATEST)
    assert int(reply.headers["content-length"]) == len(reply.body)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.body.decode())
        for s in family.samples
    }
    assert samples[("homemx_gateway_connections_total", (("listener", "mx"), ("outcome", "relayed")))] == 3.0


@pytest.mark.trio
async def test_an_http_1_0_scrape_and_a_query_string_are_served(endpoint):
    _, address = endpoint
    assert (await exchange(address, b"GET /metrics HTTP/1.0\r\n\r\n")).status == 200
    assert (await exchange(address, b"GET /metrics?name[]=x HTTP/1.1\r\nHost: gw\r\n\r\n")).status == 200


@pytest.mark.trio
async def test_head_has_the_headers_of_get_and_no_body(endpoint):
    _, address = endpoint
    reply = await exchange(address, b"HEAD /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (reply.status, reply.headers["content-type"], reply.body) == (200, CONTENT_TYPE_LATEST, b"")
    assert int(reply.headers["content-length"]) > 0


@pytest.mark.trio
@pytest.mark.parametrize("target", [b"/", b"/metrics/", b"/metricsx", b"/favicon.ico", b"http://gw/metrics"])
async def test_other_paths_are_404(endpoint, target):
    _, address = endpoint
    reply = await exchange(address, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert reply.status == 404
    assert b"homemx_gateway" not in reply.body


@pytest.mark.trio
@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"])
async def test_other_methods_are_405_with_allow(endpoint, method):
    _, address = endpoint
    reply = await exchange(address, method + b" /metrics HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert b"homemx_gateway" not in reply.body


@pytest.mark.trio
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",  # no target, no version
        b"GET /metrics\r\n\r\n",  # HTTP/0.9-style request line
        b"GET /metrics HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host (RFC 9112 3.2)
        b"GET /metrics HTTP/1.1\r\nHost: gw\r\nNo colon here\r\n\r\n",
        b"GET  /metrics HTTP/1.1\r\nHost: gw\r\n\r\n",  # two spaces
    ],
)
async def test_a_malformed_request_is_400(endpoint, request_bytes):
    _, address = endpoint
    reply = await exchange(address, request_bytes)
    assert reply.status == 400
    assert b"homemx_gateway" not in reply.body


@pytest.mark.trio
async def test_an_oversized_request_head_is_431(endpoint):
    _, address = endpoint
    filler = b"X-Filler: " + b"a" * (2 * MAX_REQUEST_HEAD) + b"\r\n"
    reply = await exchange(address, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n" + filler + b"\r\n")
    assert reply.status == 431


@pytest.mark.trio
async def test_a_client_too_slow_to_send_its_request_is_answered_408_and_dropped(endpoint, autojump_clock):
    _, address = endpoint
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n")  # never the blank line
        with trio.fail_after(60):  # virtual time: the server's 10 s deadline must come first
            raw = b""
            while chunk := await stream.receive_some(65536):
                raw += chunk
    assert Reply(raw).status == 408


@pytest.mark.trio
async def test_a_client_that_leaves_without_a_request_does_not_stop_the_endpoint(endpoint):
    _, address = endpoint
    stream = await trio.open_tcp_stream(*address)
    await stream.aclose()
    assert (await exchange(address, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")).status == 200
