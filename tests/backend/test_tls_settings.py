"""TLS settings (issue 14), over real sockets. Server: TLS 1.2 offers AEAD suites only (no CBC, so no
LUCKY13) and no session tickets, on STARTTLS (587) and implicit TLS (465). Client: opportunistic
delivery takes any TLS, even 1.0 (RFC 7435), verified delivery refuses it; the client contexts are
built once and shared by every connection."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import warnings

import pytest

from backend.deliver.connect import Connector
from backend.deliver.tlspolicy import OPPORTUNISTIC, REQUIRED, Target
from backend.queue.model import DEFERRED, DELIVERED
from backend.tls.context import TLS12_CIPHERS, client_context
from tests.backend.helpers import client_tls, listener_block, open_tls, running_backend, wait_for_sync, write_config
from tests.conftest import require_tool
from tests.lab.delivery import Sink, backend_config
from tests.lab.delivery_fixtures import ca, dns_server, make, receivers  # noqa: F401 - fixtures
from tests.lab.ports import free_port

# Every ECDHE CBC suite of TLS 1.2 (what homemx offered before: the two SHA-2 ones, LUCKY13 flagged).
CBC_SUITES = (
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:"
    "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA"
)

HOW = {"starttls-587": ("submission", True), "implicit-465": ("submissions", False)}


def tls12_client(ciphers: str) -> ssl.SSLContext:
    ctx = client_tls()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    return ctx


@pytest.mark.asyncio
@pytest.mark.parametrize("how", HOW)
async def test_tls12_offers_aead_suites_only(tmp_path, how):
    kind, starttls = HOW[how]
    cfg = write_config(tmp_path, listener_block("l", kind))
    async with running_backend(cfg) as b:
        port = b.bound_port("l")
        cbc_only = tls12_client(CBC_SUITES)
        offered = [c["name"] for c in cbc_only.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert offered and not [n for n in offered if "GCM" in n or "CHACHA" in n]
        # No shared cipher: the server sends a handshake_failure alert and closes (asyncio may see the reset first).
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await open_tls(port, cbc_only, starttls=starttls)
        # The same client offering the AEAD suites too connects, with one of them.
        s = await open_tls(port, tls12_client(CBC_SUITES + ":" + TLS12_CIPHERS), starttls=starttls)
        name, version, _ = s.writer.get_extra_info("ssl_object").cipher()
        assert version == "TLSv1.2" and name in TLS12_CIPHERS.split(":")
        assert (await s.cmd("QUIT")).startswith("221")


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("how", HOW)
async def test_no_session_ticket_is_issued(tmp_path, how, version):
    """A ticket is the session's secrets under a key the process never rotates: none is sent."""
    kind, starttls = HOW[how]
    cfg = write_config(tmp_path, listener_block("l", kind))
    async with running_backend(cfg) as b:
        ctx = client_tls()
        ctx.minimum_version = ctx.maximum_version = version
        first = await open_tls(b.bound_port("l"), ctx, starttls=starttls)
        assert (await first.cmd("EHLO client.example")).startswith("250")  # TLS 1.3 tickets come after the handshake
        ssl_object = first.writer.get_extra_info("ssl_object")
        assert ssl_object.version() == version.name.replace("_", ".")
        session = ssl_object.session
        assert session is not None and not session.has_ticket
        assert (await first.cmd("QUIT")).startswith("221")


@pytest.mark.asyncio
async def test_tls13_sessions_cannot_be_resumed(tmp_path):
    """TLS 1.3 resumes only through tickets: a client offering its last session gets a full handshake."""
    cfg = write_config(tmp_path, listener_block("l", "submissions"))
    async with running_backend(cfg) as b:
        ctx = client_tls()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3

        def connect_twice(port: int) -> tuple[bool, bool]:
            with socket.create_connection(("127.0.0.1", port), 10) as raw, ctx.wrap_socket(raw) as first:
                assert first.recv(1024).startswith(b"220")  # tickets, if any, come before the banner
                session = first.session
            with socket.create_connection(("127.0.0.1", port), 10) as raw, ctx.wrap_socket(raw, session=session) as again:
                assert again.recv(1024).startswith(b"220")
                return session.has_ticket, again.session_reused

        assert await asyncio.to_thread(connect_twice, b.bound_port("l")) == (False, False)


# ---------------------------------------------------------------- client side


def tls10_only_server_context(cert, key) -> ssl.SSLContext:
    """A receiving MTA that speaks nothing newer than TLS 1.0 (they still exist)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # naming TLSv1 is deprecated; we mean it
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(cert, key)
    return ctx


def test_opportunistic_context_speaks_tls10_to_openssl_and_the_verified_one_refuses(ca, tmp_path):
    """Against ``openssl s_server -tls1`` (another TLS implementation than ours): the opportunistic
    context negotiates TLS 1.0; the verified one, trusting that very server's CA, refuses."""
    require_tool("openssl")
    cert, key = ca.issue("old.test")
    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key),
         "-tls1", "-cipher", "DEFAULT@SECLEVEL=0", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_sync(lambda: _listening(port), 10)
        with socket.create_connection(("127.0.0.1", port), 10) as raw:
            with client_context(False).wrap_socket(raw, server_hostname="old.test") as tls:
                assert tls.version() == "TLSv1"
        with socket.create_connection(("127.0.0.1", port), 10) as raw:
            with pytest.raises(ssl.SSLError):
                client_context(True, str(ca.ca_file)).wrap_socket(raw, server_hostname="old.test")
    finally:
        server.kill()
        server.wait(5)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


@pytest.mark.asyncio
async def test_opportunistic_delivery_encrypts_with_tls10_and_required_tls_refuses_it(make, receivers, ca):
    """RFC 7435: where TLS is opportunistic, TLS 1.0 beats the cleartext the old TLS 1.2 floor fell back to."""
    cert, key = ca.issue("mx.good.test")
    sink = await receivers.start("127.0.0.18", Sink(), tls_context=tls10_only_server_context(cert, key))
    h = make(tls_policy="opportunistic")
    qid = h.submit("alice@example.org", ["bob@good.test"])
    await h.round()
    assert h.states(qid)["bob@good.test"][0] == DELIVERED
    assert [m.tls for m in sink.messages] == [True]  # over TLS 1.0, not in clear
    assert h.metric("homemx_backend_delivery_attempts_total", {"result": "delivered", "tls": "unverified"}) == 1
    h2 = make(tls_policy="required")  # the certificate would verify: only the version is refused
    q2 = h2.submit("alice@example.org", ["bob@good.test"])
    await h2.round()
    state, reply = h2.states(q2)["bob@good.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.5 TLS handshake"), reply
    assert len(sink.messages) == 1


@pytest.mark.asyncio
async def test_one_client_context_serves_every_connection(tmp_path, receivers, ca):
    """Built once per Connector (loading the CA bundle costs ~20 ms), not once per connection."""
    sink = await receivers.start("127.0.0.18", Sink(), tls_context=ca.server_context("mx.good.test"))
    cfg = backend_config(tmp_path, delivery={"connect_timeout": "5s", "command_timeout": "10s"})
    connector = Connector(cfg, str(ca.ca_file))
    used = {}
    for policy in (OPPORTUNISTIC, REQUIRED):
        contexts = []
        for _ in range(2):
            session = await connector.open(Target("mx.good.test", "127.0.0.18", receivers.port, policy))
            contexts.append(session.client.transport.get_extra_info("ssl_object").context)
            await session.client.quit()
        assert contexts[0] is contexts[1]
        used[policy] = contexts[0]
    assert used[OPPORTUNISTIC] is not used[REQUIRED]
    assert sink.connections == 4


# ---------------------------------------------------------------- the acceptance scan


@pytest.mark.asyncio
async def test_testssl_finds_no_cbc_suite_no_lucky13_and_no_session_ticket(tmp_path):
    """Issue 14's acceptance: Debian's testssl.sh against implicit TLS (465) and STARTTLS (587)."""
    require_tool("testssl")
    cfg = write_config(tmp_path, listener_block("smtps", "submissions") + listener_block("sub", "submission"))
    async with running_backend(cfg) as b:

        async def scan(name: str, *args: str) -> dict[str, dict]:
            out = tmp_path / f"{name}.json"
            proc = await asyncio.create_subprocess_exec(
                "testssl", "--quiet", "--color", "0", "--warnings", "off", "-s", "-S", "--lucky13",
                "--jsonfile", str(out), *args, f"127.0.0.1:{b.bound_port(name)}",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.wait_for(proc.wait(), 240)
            return {f["id"]: f for f in json.loads(out.read_text())}

        # Both at once (each takes ~25 s, mostly waiting on handshakes).
        for findings in await asyncio.gather(scan("smtps"), scan("sub", "-t", "smtp")):
            assert findings["cipherlist_AVERAGE"]["finding"] == "not offered"  # "Obsoleted CBC ciphers"
            assert findings["LUCKY13"]["severity"] == "OK", findings["LUCKY13"]
            assert findings["TLS_session_ticket"]["finding"].startswith("no"), findings["TLS_session_ticket"]
            assert findings["sessionresumption_ticket"]["finding"] == "not supported"
            assert findings["cipherlist_STRONG"]["finding"].startswith("offered")  # the scan did reach TLS
