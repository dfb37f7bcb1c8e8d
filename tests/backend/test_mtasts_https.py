"""MTA-STS policy fetch over real loopback HTTPS (RFC 8461 3.3): what the fetcher accepts and what it refuses.

A raw asyncio HTTPS server answers with exactly the bytes each test gives it (so redirects, sizes and
framings are the server's choice, not a library's) and records every request it parsed; names resolve
through a table resolver standing in for DNS (the DNS path is covered with nsd in test_delivery).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

import dns.resolver
import pytest
import pytest_asyncio

from backend.deliver import mtasts
from backend.deliver.remote import Deliverer
from backend.metrics import BackendMetrics
from backend.queue.store import Queue
from tests.lab.delivery import LabCA, backend_config, run_blocking
from tests.lab.mtasts import POLICY

DOMAIN = "example.net"
HOST = f"mta-sts.{DOMAIN}"


class _TXT:
    def __init__(self, text: str):
        self.strings = [text.encode()]


class _A:
    def __init__(self, address: str):
        self.address = address


class _Zone:
    """A table resolver: the TXT record announcing a policy and the policy host's address."""

    def __init__(self):
        self.records = {
            (f"_mta-sts.{DOMAIN}", "TXT"): [_TXT("v=STSv1; id=1")],
            (HOST, "A"): [_A("127.0.0.1")],
        }

    async def resolve(self, name, rtype, **kwargs):
        answer = self.records.get((name, rtype))
        if not answer:
            raise dns.resolver.NXDOMAIN()
        return answer


def response(status: str, body: bytes = b"", headers: str = "Content-Type: text/plain\r\n", length: bool = True) -> bytes:
    """An HTTP/1.1 response; without ``length`` the body is delimited by closing the connection."""
    size = f"Content-Length: {len(body)}\r\n" if length else "Connection: close\r\n"
    return f"HTTP/1.1 {status}\r\n{headers}{size}\r\n".encode() + body


def chunked(body: bytes, size: int = 4096) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


class RawHTTPS:
    """Loopback HTTPS answering each path with given bytes (404 otherwise); records request heads.

    The connection stays open after a response that has a length (HTTP/1.1 keep-alive) until the
    client closes it; ``closed`` is set when it does.
    """

    def __init__(self, ctx: ssl.SSLContext, responses: dict[str, bytes]):
        self.ctx = ctx
        self.responses = responses
        self.requests: list[str] = []
        self.closed = asyncio.Event()
        self.server = None
        self.port = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                self.requests.append(head)
                path = head.split(" ", 2)[1]
                answer = self.responses.get(path, response("404 Not Found", b"no such thing\n"))
                writer.write(answer)
                await writer.drain()
                if b"Content-Length" not in answer.split(b"\r\n\r\n")[0]:
                    break  # a close-delimited or chunked-then-close answer
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.closed.set()
            writer.close()

    async def start(self) -> "RawHTTPS":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return LabCA(tmp_path_factory.mktemp("ca"))


@pytest_asyncio.fixture
async def serve(ca):
    """``await serve(responses, ctx=None)`` starts a server (certificate for HOST from the trusted CA by default)."""
    servers = []

    async def _serve(responses: dict[str, bytes], ctx: ssl.SSLContext | None = None) -> RawHTTPS:
        srv = await RawHTTPS(ctx or ca.server_context(HOST), responses).start()
        servers.append(srv)
        return srv

    yield _serve
    for srv in servers:
        await srv.close()


@pytest_asyncio.fixture
async def fetcher(ca):
    """``fetcher(port)`` gives an MTASTS trusting only the test CA; all are closed at the end."""
    made = []

    def _make(port: int, timeout: float = mtasts.FETCH_TIMEOUT) -> mtasts.MTASTS:
        m = mtasts.MTASTS(_Zone(), https_port=port, ca_file=str(ca.ca_file), timeout=timeout)
        made.append(m)
        return m

    yield _make
    for m in made:
        await m.close()


def fetch_failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "policy fetch for" in r.getMessage()]


PATH = mtasts.POLICY_PATH


@pytest.mark.asyncio
async def test_the_policy_is_fetched_from_the_rfc_url_and_the_connection_is_closed_with_the_fetcher(serve, fetcher):
    srv = await serve({PATH: response("200 OK", POLICY.encode())})
    m = fetcher(srv.port)
    pol = await m.policy(DOMAIN)
    assert (pol.mode, pol.mx, pol.id) == ("enforce", ("mail.example.net", "*.example.net"), "1")
    [head] = srv.requests
    request_line, *headers = head.split("\r\n")
    assert request_line == "GET /.well-known/mta-sts.txt HTTP/1.1"
    assert f"Host: {HOST}" in headers  # RFC 8461 3.3: the policy host, whatever port the test server has
    assert not srv.closed.is_set()  # a keep-alive connection in the client's pool
    await m.close()
    await asyncio.wait_for(srv.closed.wait(), 10)  # shutdown closes it


@pytest.mark.asyncio
async def test_a_chunked_policy_is_read(serve, fetcher):
    srv = await serve({PATH: response("200 OK", headers="Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n", length=False)
                       .replace(b"Connection: close\r\n", b"") + chunked(POLICY.encode(), 7)})
    assert (await fetcher(srv.port).policy(DOMAIN)).mode == "enforce"


@pytest.mark.asyncio
async def test_a_redirect_is_not_followed(serve, fetcher, caplog):
    # RFC 8461 3.3: "HTTP 3xx redirects MUST NOT be followed". The target would serve a valid policy.
    srv = await serve({
        PATH: response("301 Moved Permanently", headers=f"Location: https://{HOST}/policy.txt\r\n"),
        "/policy.txt": response("200 OK", POLICY.encode()),
    })
    with caplog.at_level(logging.WARNING, "homemx.mtasts"):
        assert await fetcher(srv.port).policy(DOMAIN) is None
    assert [h.split("\r\n")[0] for h in srv.requests] == ["GET /.well-known/mta-sts.txt HTTP/1.1"]
    assert fetch_failures(caplog) == [f"mta-sts: policy fetch for {DOMAIN} failed: {HOST} answered HTTP 301"]


@pytest.mark.asyncio
async def test_a_404_is_no_policy(serve, fetcher, caplog):
    srv = await serve({})
    with caplog.at_level(logging.WARNING, "homemx.mtasts"):
        assert await fetcher(srv.port).policy(DOMAIN) is None
    assert len(srv.requests) == 1
    assert fetch_failures(caplog) == [f"mta-sts: policy fetch for {DOMAIN} failed: {HOST} answered HTTP 404"]


@pytest.mark.asyncio
async def test_a_policy_not_served_as_text_plain_is_refused(serve, fetcher):
    srv = await serve({PATH: response("200 OK", POLICY.encode(), headers="Content-Type: text/html\r\n")})
    assert await fetcher(srv.port).policy(DOMAIN) is None


def _padded(size: int) -> bytes:
    """A valid policy padded with blank lines (which the parser skips) to exactly ``size`` bytes."""
    body = POLICY.encode()
    return body + b"\n" * (size - len(body))


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", ["content-length", "close-delimited", "chunked"])
async def test_a_body_over_64_kib_is_no_policy_however_it_is_framed(serve, fetcher, caplog, framing):
    body = _padded(mtasts.MAX_POLICY_BYTES + 1)
    answer = {
        "content-length": response("200 OK", body),
        "close-delimited": response("200 OK", body, length=False),  # no length announced: the cap is on the stream
        "chunked": response("200 OK", headers="Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n", length=False)
        .replace(b"Connection: close\r\n", b"") + chunked(body),
    }[framing]
    srv = await serve({PATH: answer})
    with caplog.at_level(logging.WARNING, "homemx.mtasts"):
        assert await fetcher(srv.port).policy(DOMAIN) is None
    assert fetch_failures(caplog) == [f"mta-sts: policy fetch for {DOMAIN} failed: policy at {HOST} exceeds 65536 bytes"]


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", ["content-length", "close-delimited"])
async def test_a_body_of_exactly_64_kib_is_accepted(serve, fetcher, framing):
    body = _padded(mtasts.MAX_POLICY_BYTES)
    srv = await serve({PATH: response("200 OK", body, length=framing == "content-length")})
    assert (await fetcher(srv.port).policy(DOMAIN)).mode == "enforce"


@pytest.mark.asyncio
@pytest.mark.parametrize("wrong", ["untrusted issuer", "other name"])
async def test_a_wrong_certificate_is_no_policy_and_no_request_is_sent(serve, fetcher, ca, tmp_path, caplog, wrong):
    if wrong == "untrusted issuer":
        ctx = LabCA(tmp_path).server_context(HOST)  # the right name, from a CA the fetcher does not trust
    else:
        ctx = ca.server_context(f"mta-sts.other.{DOMAIN}")  # the trusted CA, another name
    srv = await serve({PATH: response("200 OK", POLICY.encode())}, ctx=ctx)
    with caplog.at_level(logging.WARNING, "homemx.mtasts"):
        assert await fetcher(srv.port).policy(DOMAIN) is None
    assert srv.requests == []
    [failure] = fetch_failures(caplog)
    assert "certificate verify failed" in failure, failure


@pytest.mark.asyncio
async def test_a_policy_host_that_never_answers_is_given_up(ca, fetcher, caplog):
    async def silent(reader, writer):
        await reader.read()  # TLS done, request read, never an answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=ca.server_context(HOST))
    try:
        m = fetcher(server.sockets[0].getsockname()[1], timeout=0.5)
        with caplog.at_level(logging.WARNING, "homemx.mtasts"):
            assert await asyncio.wait_for(m.policy(DOMAIN), 10) is None  # liveness bound, not a timing claim
        assert len(fetch_failures(caplog)) == 1
    finally:
        server.close()


@pytest.mark.asyncio
async def test_a_policy_host_without_an_address_is_no_policy(fetcher, caplog):
    m = fetcher(1)
    del m.resolver.records[(HOST, "A")]
    with caplog.at_level(logging.WARNING, "homemx.mtasts"):
        assert await m.policy(DOMAIN) is None
    [failure] = fetch_failures(caplog)
    assert f"{HOST} has no address" in failure, failure


@pytest.mark.asyncio
async def test_the_deliverer_closes_the_policy_connection_at_shutdown(serve, ca, tmp_path):
    srv = await serve({PATH: response("200 OK", POLICY.encode())})
    config = backend_config(tmp_path, delivery={"mta_sts": True})
    queue = Queue(config.queue_db)
    m = mtasts.MTASTS(_Zone(), https_port=srv.port, ca_file=str(ca.ca_file), store=mtasts.PolicyStore(tmp_path / "sts.db"))
    deliverer = Deliverer(config, queue, BackendMetrics(), run_blocking, resolver=_Zone(), mtasts=m)
    try:
        assert (await deliverer.mtasts.policy(DOMAIN)).mode == "enforce"
        assert not srv.closed.is_set()
        await deliverer.close()
        await asyncio.wait_for(srv.closed.wait(), 10)
    finally:
        await asyncio.to_thread(queue.close)
