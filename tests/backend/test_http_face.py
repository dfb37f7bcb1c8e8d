"""The home's web face (backend/http/) over real sockets: a backend with [http] enabled, behind PROXY v2
as the gateway's 80/443 passthrough reaches it, spoken to by a raw client (so every header byte,
PROXY header and slow write is the test's choice).

What is checked: each route and Host (MTA-STS policy against what `dns records` publishes,
autoconfig against the configured listeners, autodiscover, HTTP-01 tokens, the redirect), the real
client address in logs and limits, and every refusal (untrusted peer, missing PROXY header, garbage,
oversize body, slow headers and bodies, hostile XML). The last test is the issue's acceptance: one
backend's delivery side fetches another's policy from this face and enforces it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import google_crc32c
from cryptography import x509
import pytest
import pytest_asyncio

from backend.config import ConfigError, load_config
from backend.deliver.mtasts import parse_policy, parse_txt
from backend.dns.records import build_records, mta_sts_id
from backend.http.routes import host_name
from backend.queue.model import DEFERRED, DELIVERED
from backend.run import Backend
from backend.tls.challenges import ID_PE_ACME_IDENTIFIER, tls_alpn_certificate
from gateway.proxyv2 import encode_local_v2, encode_proxy_v2
from tests.backend.helpers import DOMAIN, HOSTNAME, client_tls, listener_block, write_config, write_users
from tests.conftest import require_tool
from tests.lab.delivery import Harness, LabCA, backend_config
from tests.lab.nsd import NSD, zone_text
from tests.lab.ports import free_port

REAL_CLIENT = ("203.0.113.7", 40123)
OTHER_CLIENT = ("198.51.100.44", 50000)
GATEWAY = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
SUBMISSION_LISTENERS = listener_block("sub", "submission") + listener_block("subs", "submissions")
LIMIT = 4096  # max_request_size of these tests
PP2_TYPE_CRC32C = 0x03  # PROXY protocol spec 2.2.5


def http_table(**overrides) -> str:
    settings = {
        "enabled": "true",
        "listen_http": '"127.0.0.1:0"',
        "listen_https": '"127.0.0.1:0"',
        "proxy_protocol": "true",
        "trusted_proxies": '["127.0.0.1/32"]',
        "max_request_size": str(LIMIT),
        "timeout": '"10s"',
    }
    settings.update({k: str(v) for k, v in overrides.items()})
    return "[http]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())


class Face:
    """A running backend with its web face, and a raw client for it."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.face = backend.http_face

    def port(self, listener: str) -> int:
        return self.face.bound_port(listener)

    async def connect(self, listener: str, *, client=REAL_CLIENT, proxy: bool = True, host: str | None = None,
                      local_addr=None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection as the gateway makes it: PROXY v2 header for ``client``, then (https) TLS
        with SNI ``host``."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port(listener), local_addr=local_addr)
        if proxy:
            writer.write(encode_proxy_v2(client, ("192.0.2.25", 443 if listener == "https" else 80)))
        if listener == "https":
            await writer.start_tls(client_tls(), server_hostname=host or HOSTNAME)
        return reader, writer

    async def request(self, listener: str, raw: bytes, **kw) -> "Answer":
        """Send ``raw``, read until the server closes; a refused connection (closed or reset
        before any answer) is an empty answer."""
        reader, writer = await self.connect(listener, host=kw.pop("sni", None), **kw)
        try:
            writer.write(raw)
            return Answer(await asyncio.wait_for(reader.read(), 10))
        except ConnectionError:
            return Answer(b"")
        finally:
            writer.close()

    async def get(self, listener: str, host: str, path: str, method: str = "GET", body: bytes = b"",
                  headers: str = "", **kw) -> "Answer":
        length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
        raw = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{headers}{length}Connection: close\r\n\r\n".encode() + body
        return await self.request(listener, raw, sni=host, **kw)

    def requests(self, route: str, status: int) -> float:
        value = self.backend.metrics.registry.get_sample_value(
            "homemx_backend_http_requests_total", {"route": route, "status": str(status)})
        return value or 0.0

    def connections(self, listener: str, outcome: str) -> float:
        value = self.backend.metrics.registry.get_sample_value(
            "homemx_backend_http_connections_total", {"listener": listener, "outcome": outcome})
        return value or 0.0


class Answer:
    """An HTTP/1.1 response as received (the whole stream up to the server's close)."""

    def __init__(self, raw: bytes):
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1]) if raw else None
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}


async def start(tmp_path, *, listeners: str = SUBMISSION_LISTENERS, http: str | None = None, dns: str = "enforce"):
    cfg = write_config(tmp_path, listeners, extra=f'[dns]\nmta_sts_mode = "{dns}"\n\n{http or http_table()}')
    backend = Backend(load_config(cfg))
    await backend.start()
    return backend


@pytest_asyncio.fixture
async def face(tmp_path):
    backend = await start(tmp_path)
    try:
        yield Face(backend)
    finally:
        await backend.stop(grace=0.5)


def started(tmp_path, **kw):
    """``async with started(tmp_path, http=...) as face`` for tests that need their own settings."""
    import contextlib

    @contextlib.asynccontextmanager
    async def run():
        backend = await start(tmp_path, **kw)
        try:
            yield Face(backend)
        finally:
            await backend.stop(grace=0.5)

    return run()


# ---------------------------------------------------------------- MTA-STS (RFC 8461)


@pytest.mark.asyncio
async def test_the_mta_sts_policy_is_what_dns_records_publishes_and_matches_its_txt_id(face):
    got = await face.get("https", f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt")
    assert got.status == 200
    assert got.headers["content-type"].split(";")[0] == "text/plain"  # RFC 8461 3.3
    policy = parse_policy(got.body.decode())
    assert policy.mode == "enforce"
    records = build_records(face.backend.config)
    mx = [r.rdata.split()[1].rstrip(".") for r in records if r.rtype == "MX" and r.name == f"{DOMAIN}."]
    assert list(policy.mx) == mx == [HOSTNAME]
    [txt] = [r.rdata.strip('"') for r in records if r.name == f"_mta-sts.{DOMAIN}."]
    # The id senders see in DNS is the one derived from exactly the text served.
    assert parse_txt([txt]) == mta_sts_id(face.backend.config, DOMAIN) == hashlib.sha256(got.body).hexdigest()[:20]
    assert face.requests("mta-sts", 200) == 1


@pytest.mark.asyncio
async def test_the_policy_is_https_only_plain_http_redirects_to_it(face):
    got = await face.get("http", f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt")
    assert got.status == 301
    assert got.headers["location"] == f"https://mta-sts.{DOMAIN}/.well-known/mta-sts.txt"
    assert b"STSv1" not in got.body


@pytest.mark.asyncio
async def test_no_policy_is_served_when_mta_sts_is_off(tmp_path):
    async with started(tmp_path, dns="testing") as f:
        assert (await f.get("https", f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt")).status == 200
    cfg = write_config(tmp_path, SUBMISSION_LISTENERS, extra=http_table())  # no [dns] mta_sts_mode
    backend = Backend(load_config(cfg))
    await backend.start()
    try:
        got = await Face(backend).get("https", f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt")
        assert got.status == 404
    finally:
        await backend.stop(grace=0.5)


@pytest.mark.asyncio
async def test_only_get_and_head_read_the_policy(face):
    head = await face.get("https", f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt", method="HEAD")
    assert head.status == 200 and head.body == b""
    post = await face.get("https", f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt", method="POST", body=b"x")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"


# ---------------------------------------------------------------- unknown names and paths


@pytest.mark.asyncio
async def test_unknown_hosts_and_paths_are_404_and_a_missing_host_is_400(face):
    assert (await face.get("https", "www.elsewhere.example", "/.well-known/mta-sts.txt")).status == 404
    assert (await face.get("https", f"mta-sts.{DOMAIN}", "/index.html")).status == 404
    assert (await face.get("https", f"autoconfig.{DOMAIN}", "/.well-known/mta-sts.txt")).status == 404
    assert (await face.get("http", "www.elsewhere.example", "/")).status == 404  # no redirect for names not ours
    no_host = await face.request("https", b"GET /.well-known/mta-sts.txt HTTP/1.0\r\n\r\n")
    assert no_host.status == 400


# ---------------------------------------------------------------- port 80


@pytest.mark.asyncio
async def test_port_80_redirects_to_the_same_url_over_https(face):
    got = await face.get("http", f"autoconfig.{DOMAIN}", "/mail/config-v1.1.xml?emailaddress=alice%40example.org")
    assert got.status == 301
    assert got.headers["location"] == f"https://autoconfig.{DOMAIN}/mail/config-v1.1.xml?emailaddress=alice%40example.org"
    assert face.requests("redirect", 301) == 1


@pytest.mark.asyncio
async def test_port_80_serves_http01_tokens_from_the_challenge_store(face):
    token, keyauth = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0", "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0.9jg46WB3rR_AHD"
    face.backend.challenges.put_http01(token, keyauth)
    got = await face.get("http", HOSTNAME, f"/.well-known/acme-challenge/{token}")
    assert got.status == 200 and got.body == keyauth.encode()
    assert (await face.get("http", f"mta-sts.{DOMAIN}", f"/.well-known/acme-challenge/{token}")).body == keyauth.encode()
    assert (await face.get("http", HOSTNAME, "/.well-known/acme-challenge/unknown-token")).status == 404
    assert (await face.get("https", HOSTNAME, f"/.well-known/acme-challenge/{token}")).status == 404  # port 80 only
    face.backend.challenges.remove_http01(token)
    assert (await face.get("http", HOSTNAME, f"/.well-known/acme-challenge/{token}")).status == 404


@pytest.mark.asyncio
async def test_port_443_behind_the_proxy_header_answers_tls_alpn_01(face):
    """RFC 8737 through the gateway: a CA's handshake (SNI = the name, ALPN acme-tls/1) after the
    PROXY header gets the challenge certificate; a handshake for another name gets the real one."""
    name = f"mta-sts.{DOMAIN}"
    face.backend.challenges.put_tls_alpn(name, *tls_alpn_certificate(name, "token.thumbprint"))

    async def handshake(alpn: list[str] | None, sni: str = name) -> tuple[x509.Certificate, str | None]:
        reader, writer = await asyncio.open_connection("127.0.0.1", face.port("https"))
        writer.write(encode_proxy_v2(REAL_CLIENT, ("192.0.2.25", 443)))
        ctx = client_tls()
        if alpn:
            ctx.set_alpn_protocols(alpn)
        await writer.start_tls(ctx, server_hostname=sni)
        tls = writer.get_extra_info("ssl_object")
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        writer.close()
        return cert, tls.selected_alpn_protocol()

    cert, alpn = await handshake(["acme-tls/1"])
    assert alpn == "acme-tls/1"
    assert cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER).critical
    cert, alpn = await handshake(None, sni=HOSTNAME)
    assert alpn is None and cert.subject.rfc4514_string() == f"CN={HOSTNAME}"


# ---------------------------------------------------------------- autoconfig


def autoconfig_servers(body: bytes) -> tuple[ET.Element, list[tuple[str, str, str, str, str, str]]]:
    root = ET.fromstring(body)
    provider = root.find("emailProvider")
    servers = [
        (s.tag, s.get("type"), s.findtext("hostname"), s.findtext("port"), s.findtext("socketType"), s.findtext("username"))
        for s in provider
        if s.tag in ("incomingServer", "outgoingServer")
    ]
    return root, servers


@pytest.mark.asyncio
@pytest.mark.parametrize("host, path", [
    (f"autoconfig.{DOMAIN}", "/mail/config-v1.1.xml"),
    (DOMAIN, "/.well-known/autoconfig/mail/config-v1.1.xml"),
])
async def test_autoconfig_parses_and_lists_the_configured_listeners(face, host, path):
    got = await face.get("https", host, path)
    assert got.status == 200 and got.headers["content-type"].startswith("application/xml")
    root, servers = autoconfig_servers(got.body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    assert root.find("emailProvider").findtext("domain") == DOMAIN
    assert servers == [
        ("incomingServer", "imap", HOSTNAME, "993", "SSL", "%EMAILADDRESS%"),
        ("outgoingServer", "smtp", HOSTNAME, "465", "SSL", "%EMAILADDRESS%"),
        ("outgoingServer", "smtp", HOSTNAME, "587", "STARTTLS", "%EMAILADDRESS%"),
    ]
    assert {a.text for a in root.iter("authentication")} == {"password-cleartext"}


@pytest.mark.asyncio
async def test_autoconfig_offers_only_the_submission_ports_that_exist(tmp_path):
    async with started(tmp_path, listeners=listener_block("sub", "submission")) as f:
        _, servers = autoconfig_servers((await f.get("https", f"autoconfig.{DOMAIN}", "/mail/config-v1.1.xml")).body)
    assert [(s[3], s[4]) for s in servers] == [("993", "SSL"), ("587", "STARTTLS")]


# ---------------------------------------------------------------- autodiscover

AUTODISCOVER_REQUEST = """<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>{address}</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>"""
RESPONSE_NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"


@pytest.mark.asyncio
async def test_autodiscover_answers_for_a_local_address(face):
    body = AUTODISCOVER_REQUEST.format(address="alice@example.org").encode()
    got = await face.get("https", f"autodiscover.{DOMAIN}", "/Autodiscover/Autodiscover.xml", method="POST", body=body)
    assert got.status == 200
    account = ET.fromstring(got.body).find(f"{RESPONSE_NS}Response/{RESPONSE_NS}Account")
    protocols = [
        (p.findtext(f"{RESPONSE_NS}Type"), p.findtext(f"{RESPONSE_NS}Server"), p.findtext(f"{RESPONSE_NS}Port"),
         p.findtext(f"{RESPONSE_NS}LoginName"), p.findtext(f"{RESPONSE_NS}Encryption"))
        for p in account.findall(f"{RESPONSE_NS}Protocol")
    ]
    assert protocols == [
        ("IMAP", HOSTNAME, "993", "alice@example.org", "SSL"),
        ("SMTP", HOSTNAME, "465", "alice@example.org", "SSL"),
        ("SMTP", HOSTNAME, "587", "alice@example.org", "TLS"),
    ]
    # Any of our names answers (Outlook asks https://DOMAIN/autodiscover/autodiscover.xml first).
    again = await face.get("https", DOMAIN, "/autodiscover/autodiscover.xml", method="POST", body=body)
    assert again.status == 200
    assert face.requests("autodiscover", 200) == 2


@pytest.mark.asyncio
async def test_autodiscover_get_is_answered_with_an_invalid_request_error(face):
    got = await face.get("https", f"autodiscover.{DOMAIN}", "/autodiscover/autodiscover.xml")
    assert got.status == 200
    assert [e.text for e in ET.fromstring(got.body).iter() if e.tag.endswith("ErrorCode")] == ["600"]


@pytest.mark.asyncio
async def test_autodiscover_for_another_domain_is_404(face):
    body = AUTODISCOVER_REQUEST.format(address="someone@elsewhere.example").encode()
    assert (await face.get("https", DOMAIN, "/autodiscover/autodiscover.xml", method="POST", body=body)).status == 404


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Autodiscover><Request><EMailAddress>&lol9;@example.org</EMailAddress></Request></Autodiscover>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Autodiscover><Request><EMailAddress>&xxe;</EMailAddress></Request></Autodiscover>"""


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [
    b"not xml at all",
    b"<Autodiscover><Request></Request></Autodiscover>",  # no address
    b"<Autodiscover><Request><EMailAddress>not an address</EMailAddress></Request></Autodiscover>",
    BILLION_LAUGHS,
    EXTERNAL_ENTITY,
], ids=["garbage", "no-address", "bad-address", "billion-laughs", "external-entity"])
async def test_autodiscover_refuses_bad_and_hostile_xml_with_400(face, caplog, body):
    caplog.set_level(logging.INFO, logger="homemx.http")
    got = await face.get("https", DOMAIN, "/autodiscover/autodiscover.xml", method="POST", body=body)
    assert got.status == 400
    assert b"root:" not in got.raw and b"lol" not in got.body
    assert "Traceback" not in caplog.text
    [line] = [r.getMessage() for r in caplog.records if "route=autodiscover" in r.getMessage()]
    assert "status=400" in line


# ---------------------------------------------------------------- sizes and garbage


@pytest.mark.asyncio
async def test_a_body_over_max_request_size_is_413(face):
    body = AUTODISCOVER_REQUEST.format(address="alice@example.org").encode().ljust(LIMIT + 1, b" ")
    got = await face.get("https", DOMAIN, "/autodiscover/autodiscover.xml", method="POST", body=body)
    assert got.status == 413
    # Chunked: no length announced, refused as it grows past the limit.
    chunk = b"x" * 1024
    raw = (b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: example.org\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"".join(b"400\r\n" + chunk + b"\r\n" for _ in range(5)) + b"0\r\n\r\n")
    assert (await face.request("https", raw, sni=DOMAIN)).status == 413
    assert face.requests("autodiscover", 413) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("listener", ["http", "https"])
async def test_garbage_is_400_and_one_line_without_traceback(face, caplog, listener):
    caplog.set_level(logging.DEBUG)
    got = await face.request(listener, b"\x16\x03\x01\x00garbage\r\n\r\n", sni=DOMAIN)
    assert got.status == 400
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]
    [line] = [r.getMessage() for r in caplog.records if r.name == "homemx.http" and "status=400" in r.getMessage()]
    assert f"client={REAL_CLIENT[0]}" in line


# ---------------------------------------------------------------- PROXY v2 and the real client


@pytest.mark.asyncio
async def test_the_real_client_from_the_proxy_header_is_in_the_log_line(face, caplog):
    caplog.set_level(logging.INFO, logger="homemx.http")
    await face.get("https", f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt")
    [line] = [r.getMessage() for r in caplog.records if "route=mta-sts" in r.getMessage()]
    assert f"client={REAL_CLIENT[0]} host=mta-sts.{DOMAIN} GET /.well-known/mta-sts.txt" in line
    assert "127.0.0.1" not in line


@pytest.mark.asyncio
async def test_a_peer_that_is_not_a_trusted_proxy_is_closed_unanswered(face):
    # 127.0.0.2 is not in trusted_proxies: even a well-formed PROXY header gets nothing.
    got = await face.get("http", DOMAIN, "/", local_addr=("127.0.0.2", 0))
    assert got.raw == b""
    assert face.connections("http", "untrusted-peer") == 1
    assert face.requests("redirect", 301) == 0


@pytest.mark.asyncio
async def test_a_request_without_the_proxy_header_is_closed_unanswered(face):
    got = await face.request("http", f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode(), proxy=False)
    assert got.raw == b""
    assert face.connections("http", "bad-proxy-header") == 1


@pytest.mark.asyncio
async def test_connections_per_real_client_are_limited(tmp_path):
    async with started(tmp_path, http=http_table(max_connections_per_client=2)) as f:
        held = []
        for _ in range(2):  # two keep-alive connections of one client, each answered once
            reader, writer = await f.connect("http")
            writer.write(f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 301")
            held.append(writer)
        third = await f.get("http", DOMAIN, "/")
        assert third.raw == b""
        assert f.connections("http", "too-many-connections") == 1
        assert (await f.get("http", DOMAIN, "/", client=OTHER_CLIENT)).status == 301  # another client is served
        held[0].close()
        await held[0].wait_closed()
        # The slot is free once the server has seen the close.
        await asyncio.wait_for(_until(lambda: f.face.per_client.get(REAL_CLIENT[0]) == 1), 10)
        assert (await f.get("http", DOMAIN, "/")).status == 301
        held[1].close()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
@pytest.mark.parametrize("header, outcome", [
    (b"PROXY TCP4 203.0.113.7 192.0.2.25 40123 80\r\n", "bad-proxy-header"),  # v1: never from the gateway
    (encode_local_v2(), "bad-proxy-header"),  # LOCAL: no client behind it
    ("crc", "bad-proxy-checksum"),
], ids=["v1", "local", "bad-crc32c"])
async def test_a_proxy_header_the_smtp_listeners_refuse_is_refused_here_too(face, header, outcome):
    if header == "crc":
        zeroed = encode_proxy_v2(REAL_CLIENT, ("192.0.2.25", 80), tlvs=((PP2_TYPE_CRC32C, b"\0" * 4),))
        header = zeroed[:-4] + struct.pack("!I", google_crc32c.value(zeroed) ^ 1)
    got = await face.request("http", header + f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode(), proxy=False)
    assert got.raw == b""
    await asyncio.wait_for(_until(lambda: face.connections("http", outcome) == 1), 10)


@pytest.mark.asyncio
async def test_an_ipv6_client_is_logged_as_itself(face, caplog):
    caplog.set_level(logging.INFO, logger="homemx.http")
    assert (await face.get("http", DOMAIN, "/", client=("2001:db8::77", 40124))).status == 301
    assert "client=2001:db8::77 host=example.org GET / route=redirect status=301" in caplog.text


@pytest.mark.asyncio
async def test_the_log_line_never_carries_the_query_string(face, caplog):
    caplog.set_level(logging.INFO, logger="homemx.http")
    got = await face.get("https", f"autoconfig.{DOMAIN}", "/mail/config-v1.1.xml?emailaddress=alice%40example.org")
    assert got.status == 200
    [line] = [r.getMessage() for r in caplog.records if "route=autoconfig" in r.getMessage()]
    assert "GET /mail/config-v1.1.xml route=autoconfig status=200" in line and "alice" not in line


@pytest.mark.asyncio
async def test_stopping_the_backend_closes_idle_keep_alive_connections(tmp_path):
    backend = await start(tmp_path, http=http_table(timeout='"60s"'))  # the deadline would not end it
    f = Face(backend)
    port = f.port("http")
    reader, writer = await f.connect("http")
    writer.write(f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 301")
    await backend.stop(grace=0.5)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()


@pytest.mark.parametrize("header, name", [
    ("mta-sts.Example.ORG", "mta-sts.example.org"),
    ("example.org:443", "example.org"),
    ("example.org.", "example.org"),
    ("192.0.2.1", None),
    ("[2001:db8::1]:443", None),
    ("localhost", None),
    ("exa mple.org", None),
    ("example.org:https", None),
    ("-bad.example.org", None),
    ("", None),
    (None, None),
])
def test_host_header_to_name(header, name):
    assert host_name(header) == name


# ---------------------------------------------------------------- time bounds


@pytest.mark.asyncio
@pytest.mark.parametrize("phase", ["headers", "body"])
async def test_a_slow_client_is_cut_off_at_the_timeout(tmp_path, caplog, phase):
    caplog.set_level(logging.INFO, logger="homemx.http")
    async with started(tmp_path, http=http_table(timeout='"1s"')) as f:
        reader, writer = await f.connect("https", host=DOMAIN)
        if phase == "headers":
            start = f"GET /.well-known/autoconfig/mail/config-v1.1.xml HTTP/1.1\r\nHost: {DOMAIN}\r\n"
        else:
            start = f"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 1000\r\n\r\n"
        writer.write(start.encode())

        async def trickle():  # slowloris: a byte now and then, never the end
            while True:
                writer.write(b"X-a: b\r\n" if phase == "headers" else b"x")
                await asyncio.sleep(0.1)

        dripping = asyncio.create_task(trickle())
        try:
            # A generous liveness bound: without a deadline the server would wait for ever.
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass  # the abort may reach the client as a reset
        finally:
            dripping.cancel()
            writer.close()
        await asyncio.wait_for(_until(lambda: f.connections("https", "timeout") == 1), 10)
    assert "outcome=timeout" in caplog.text


@pytest.mark.asyncio
async def test_a_peer_that_never_sends_the_proxy_header_is_closed(tmp_path):
    cfg = write_config(tmp_path, SUBMISSION_LISTENERS, extra=http_table())
    backend = Backend(load_config(cfg), proxy_timeout=0.5)
    await backend.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", backend.http_face.bound_port("https"))
        writer.write(b"\r\n\r\n\x00\r\n")  # the start of a header, never the rest
        assert await asyncio.wait_for(reader.read(), 10) == b""
        f = Face(backend)
        await asyncio.wait_for(_until(lambda: f.connections("https", "proxy-timeout") == 1), 10)
        writer.close()
    finally:
        await backend.stop(grace=0.5)


# ---------------------------------------------------------------- config


def test_proxy_protocol_needs_trusted_proxies(tmp_path):
    cfg = write_config(tmp_path, SUBMISSION_LISTENERS, extra=http_table(trusted_proxies="[]"))
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config(cfg)


# ---------------------------------------------------------------- acceptance: another home fetches and enforces

HOME_A = "home-a.test"
SPOOFED = "spoofed-a.test"  # another domain of the same home, whose MX an attacker replaced in DNS
A_ADDR = "127.0.0.31"


def home_a_config(tmp: Path, ca: LabCA, mx_port: int) -> Path:
    """Home A: a real backend receiving mail on mx (STARTTLS with a certificate of the test CA)
    and serving its MTA-STS policies on its HTTPS face, enforce mode."""
    tmp.mkdir()
    hostname = f"mail.{HOME_A}"
    cert, key = ca.issue(hostname, *(f"mta-sts.{d}" for d in (HOME_A, SPOOFED)))
    write_users(tmp / "passwd", {f"bob@{HOME_A}": "bob-secret-pw", f"carol@{SPOOFED}": "carol-secret-pw"})
    path = tmp / "backend.toml"
    path.write_text(f"""[server]
hostname = "{hostname}"
data_dir = "{tmp}/data"

[tls]
cert = "{cert}"
key = "{key}"

[users]
passwd_file = "{tmp}/passwd"

[domain."{HOME_A}"]
[domain."{SPOOFED}"]

{listener_block("mx", "mx", f"{A_ADDR}:{mx_port}")}
[auth]
enabled = false

[gateway]
public_ipv4 = ["{A_ADDR}"]

[dns]
mta_sts_mode = "enforce"

[http]
enabled = true
listen_https = "{A_ADDR}:0"

[delivery]
nameservers = ["127.0.0.1"]
dns_port = 9
""")
    return path


def published_zone(config) -> str:
    """What home A's operator published, as `dns records` prints it (MX, the host's A record, the
    _mta-sts TXT with its id), the policy hosts' addresses, and one forgery: the MX of SPOOFED
    points at an attacker's host that the policy does not name."""
    host = f"mail.{HOME_A}."
    lines = []
    for r in build_records(config):
        if r.rtype == "MX" and r.name == f"{SPOOFED}.":
            lines.append(f"{r.name} IN MX 10 mx.attacker.test.")
        elif r.rtype == "MX" or (r.rtype == "A" and r.name == host) or r.name.startswith("_mta-sts."):
            lines.append(f"{r.name} IN {r.rtype} {r.rdata}")
    lines += [f"mta-sts.{d}. IN A {A_ADDR}" for d in (HOME_A, SPOOFED)]
    lines.append("mx.attacker.test. IN A 127.0.0.32")
    return zone_text("test", "\n".join(lines))


@pytest.mark.asyncio
async def test_another_homes_delivery_fetches_this_policy_over_https_and_enforces_it(tmp_path):
    """Issue 14 acceptance: homemx's own delivery side (home B) fetches another lab domain's
    MTA-STS policy from a homemx HTTPS face (home A) and enforces it: the MX the policy names gets
    the message over verified TLS, a forged MX gets nothing."""
    require_tool("/usr/sbin/nsd", "dig")
    (tmp_path / "ca").mkdir()
    ca = LabCA(tmp_path / "ca")
    mx_port = free_port(A_ADDR)
    home_a = Backend(load_config(home_a_config(tmp_path / "a", ca, mx_port)))
    await home_a.start()
    try:
        with NSD({"test": published_zone(home_a.config)}) as ns:
            b_dir = tmp_path / "b"
            b_dir.mkdir()
            delivery = {"nameservers": [ns.address], "dns_port": ns.port, "remote_port": mx_port, "mta_sts": True,
                        "connect_timeout": "5s", "command_timeout": "10s", "retry_schedule": ["5m"]}
            home_b = Harness(b_dir, backend_config(b_dir, delivery=delivery), ca_file=ca.ca_file,
                             mtasts_port=home_a.http_face.bound_port("https"))
            try:
                good = home_b.submit("alice@example.org", [f"bob@{HOME_A}"])
                forged = home_b.submit("alice@example.org", [f"carol@{SPOOFED}"])
                await home_b.round()
                assert home_b.states(good)[f"bob@{HOME_A}"][0] == DELIVERED
                state, reply = home_b.states(forged)[f"carol@{SPOOFED}"]
                assert state == DEFERRED and reply.startswith("451 4.7.5"), reply  # RFC 8461 4.1: no such MX
                assert home_b.metric("homemx_backend_delivery_attempts_total", {"result": "delivered", "tls": "verified"}) == 1
                policies = home_b.deliverer.mtasts
                assert (await policies.policy(HOME_A)).mx == (f"mail.{HOME_A}",)
            finally:
                await home_b.close()
        # Both policies came from home A's face, and bob's message is in home A's Maildir.
        assert Face(home_a).requests("mta-sts", 200) == 2
        inbox = home_a.config.maildir_for(f"bob@{HOME_A}") / "new"
        await asyncio.wait_for(_until(lambda: inbox.exists() and len(list(inbox.iterdir())) == 1), 10)
    finally:
        await home_a.stop(grace=0.5)


@pytest.mark.asyncio
@pytest.mark.parametrize("together", [True, False], ids=["one-segment", "body-later"])
async def test_a_body_with_broken_chunked_framing_is_400(face, caplog, together):
    caplog.set_level(logging.INFO, logger="homemx.http")
    head = b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: example.org\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"zz\r\nnot a chunk size\r\n0\r\n\r\n"
    if together:
        got = await face.request("https", head + body, sni=DOMAIN)
    else:
        reader, writer = await face.connect("https", host=DOMAIN)
        writer.write(head + b"5\r\nhello\r\n")
        await writer.drain()
        # The handler is reading the body by now (it answers nothing before the body ends).
        await asyncio.wait_for(_until(lambda: any(c._current_request for c in face.face.web.connections)), 10)
        writer.write(body)
        got = Answer(await asyncio.wait_for(reader.read(), 10))
        writer.close()
    assert got.status == 400
    assert "Traceback" not in caplog.text and "route failed" not in caplog.text
    assert "status=400" in caplog.text


@pytest.mark.asyncio
async def test_hundreds_of_mangled_requests_get_4xx_or_a_close_and_never_a_traceback(tmp_path, caplog):
    """Valid requests of every route with bytes flipped, inserted, dropped or cut short, on both
    listeners: each gets a 3xx/4xx answer (a 2xx only when the mangling left a valid request) or a
    close at the deadline; nothing is logged above INFO and the face still answers afterwards."""
    import random

    rng = random.Random(14)
    seeds = [
        f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.{DOMAIN}\r\nConnection: close\r\n\r\n".encode(),
        f"GET /mail/config-v1.1.xml?emailaddress=a%40{DOMAIN} HTTP/1.1\r\nHost: autoconfig.{DOMAIN}\r\nConnection: close\r\n\r\n".encode(),
        (f"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\nContent-Length: 200\r\n\r\n"
         + AUTODISCOVER_REQUEST.format(address=f"a@{DOMAIN}")[:200]).encode(),
        f"GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: {HOSTNAME}\r\nConnection: close\r\n\r\n".encode(),
    ]

    def mangle(raw: bytes) -> bytes:
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            op, at = rng.randrange(4), rng.randrange(len(data))
            if op == 0:
                data[at] = rng.randrange(256)
            elif op == 1:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op == 2:
                del data[at:at + rng.randint(1, 8)]
            else:
                data = data[:at]
        return bytes(data)

    caplog.set_level(logging.INFO)
    async with started(tmp_path, http=http_table(timeout='"1s"', max_connections_per_client=1000)) as f:
        sem = asyncio.Semaphore(50)

        async def one(i: int) -> int | None:
            async with sem:
                listener = "https" if i % 2 else "http"
                return (await f.request(listener, mangle(rng.choice(seeds)), sni=DOMAIN)).status

        statuses = await asyncio.gather(*(one(i) for i in range(300)))
        assert all(s is None or 200 <= s < 500 for s in statuses), sorted(set(map(str, statuses)))
        assert sum(s is not None and 400 <= s < 500 for s in statuses) > 50  # most mangling is noticed
        assert (await f.get("https", f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt")).status == 200
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.INFO] == []
    assert "Traceback" not in caplog.text
