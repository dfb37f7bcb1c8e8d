"""The gateway on real loopback sockets with real clients (smtplib, swaks) and real peers (HAProxy, Dovecot, Postfix smtp-sink)."""

from __future__ import annotations

import contextlib
import imaplib
import logging
import smtplib
import socket
import ssl
import struct
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.proxy import tcp_connect
from tests.conftest import require_tool
from tests.gateway.peers import dovecot, haproxy, sink_messages, smtp_sink, wait_for_text
from tests.lab.gateway import bound, gateway_config, running, sample, smtp_banner, wait_sample
from tests.lab.ports import free_port


def rst_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN (RFC 793 abort)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def smtplib_send(host, port, source, marker):
    with smtplib.SMTP(host, port, timeout=20, source_address=(source, 0)) as s:
        client_port = s.sock.getsockname()[1]
        s.sendmail("alice@sender.example", ["bob@example.org"], f"Subject: {marker}\r\n\r\n{marker}\r\n")
    return client_port


@pytest.mark.trio
async def test_smtplib_and_swaks_through_gateway_reach_real_peers_with_real_address(tmp_path):
    """smtplib (IPv4 and ::1) and swaks → gateway (greet wait on) → HAProxy accept-proxy → smtp-sink.

    HAProxy logs the client address it read from our PROXY v2 header: the client's own source
    address and port, not the gateway's 127.0.0.1."""
    require_tool("haproxy", "smtp-sink", "swaks")
    with smtp_sink(tmp_path) as sink, haproxy(tmp_path, ("127.0.0.1", sink.port), accept_proxy=True) as hap:
        cfg = gateway_config({
            "name": "mx", "kind": "smtp", "listen": ["127.0.0.1:0", "[::1]:0"],
            "upstream": f"127.0.0.1:{hap.port}", "greet_wait": "300ms",
        })
        async with running(cfg) as gw:
            _, p4 = bound(gw, "mx")
            _, p6 = bound(gw, "mx", socket.AF_INET6)
            cport4 = await trio.to_thread.run_sync(smtplib_send, "127.0.0.1", p4, "127.0.0.5", "via-ipv4")
            cport6 = await trio.to_thread.run_sync(smtplib_send, "::1", p6, "::1", "via-ipv6")
            swaks = await trio.run_process(
                ["swaks", "--server", "127.0.0.1", "--port", str(p4), "--local-interface", "127.0.0.6",
                 "--from", "carol@sender.example", "--to", "bob@example.org", "--header", "Subject: via-swaks",
                 "--body", "via-swaks", "--timeout", "20"],
                capture_stdout=True, capture_stderr=True, check=False)
            assert swaks.returncode == 0, swaks.stdout.decode() + swaks.stderr.decode()
            assert b"<-  250" in swaks.stdout
        log = wait_for_text(hap.log, "client=127.0.0.6:")
        assert f"client=127.0.0.5:{cport4} frontend=127.0.0.1:{p4}" in log
        assert f"client=::1:{cport6} frontend=::1:{p6}" in log
        bodies = b"\n".join(sink_messages(sink))
        for marker in (b"via-ipv4", b"via-ipv6", b"via-swaks"):
            assert marker in bodies


@pytest.mark.trio
async def test_early_talker_over_real_socket(tmp_path):
    require_tool("smtp-sink")
    with smtp_sink(tmp_path, dump=False) as sink:
        cfg = gateway_config({"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0",
                              "upstream": f"127.0.0.1:{sink.port}", "proxy_v2": False, "greet_wait": "1s"})
        async with running(cfg) as gw:
            s = trio.socket.socket()
            await s.connect(bound(gw, "mx"))
            await s.send(b"EHLO spambot.example\r\n")
            reply = b""
            while chunk := await s.recv(4096):
                reply += chunk
            s.close()
    assert reply.startswith(b"554 5.5.0 mx.example.org ")
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="early_talker") == 1


@pytest.mark.trio
async def test_client_reset_during_greet_wait_is_a_normal_outcome(caplog):
    """A client (scanner) that resets while held in the greet wait: one INFO line with
    outcome=client_reset, no traceback, nothing dialled; the gateway goes on serving."""
    caplog.set_level(logging.INFO, "homemx.gateway")
    dialled = []

    async def connect(address):
        dialled.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    cfg = gateway_config({"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0",
                          "upstream": "127.0.0.1:9", "proxy_v2": False, "greet_wait": "30s"})
    async with running(cfg, connect=connect) as gw:
        s = socket.create_connection(bound(gw, "mx"))
        # Admitted (the gauge counts it) means accepted and past getpeername: the RST lands in the wait.
        await wait_sample(gw, "homemx_gateway_active_connections", 1, listener="mx")
        rst_close(s)
        await wait_sample(gw, "homemx_gateway_connections_total", 1, listener="mx", outcome="client_reset")
        assert sample(gw, "homemx_gateway_active_connections", listener="mx") == 0
    assert dialled == []
    assert [r.levelname for r in caplog.records if "conn=1 " in r.getMessage()] == ["INFO"]
    assert "outcome=client_reset" in caplog.text
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text


@pytest.mark.trio
async def test_client_reset_with_a_request_outstanding_is_a_reset():
    """The counterpart of a normal close: a client that pipelines its last commands and resets
    before the upstream answered abandoned the session mid-exchange: outcome reset."""
    got_quit = trio.Event()

    async def silent_mta(stream):
        await stream.send_all(b"220 fake ESMTP\r\n")
        seen = b""
        with contextlib.suppress(trio.BrokenResourceError):  # however the gateway hangs up
            while chunk := await stream.receive_some(4096):
                seen += chunk
                if seen.endswith(b"QUIT\r\n"):
                    got_quit.set()  # and never answer: the client's request stays outstanding

    async with trio.open_nursery() as n:
        up = await n.start(partial(trio.serve_tcp, silent_mta, 0, host="127.0.0.1"))
        cfg = gateway_config({"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0", "proxy_v2": False,
                              "upstream": f"127.0.0.1:{up[0].socket.getsockname()[1]}"})
        async with running(cfg) as gw:
            s = socket.create_connection(bound(gw, "mx"))
            assert await trio.to_thread.run_sync(s.recv, 4096) == b"220 fake ESMTP\r\n"
            s.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n")
            await got_quit.wait()
            rst_close(s)
            await wait_sample(gw, "homemx_gateway_connections_total", 1, listener="mx", outcome="reset")
        n.cancel_scope.cancel()
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="relayed") is None


# What a client has sent when it vanishes (issue 11, item 1), after reading the banner unless noted.
TRANSACTION = b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
VANISH_AT = {
    "before_banner": None,  # during the greet wait, reading nothing
    "after_banner": b"",
    "mid_command": b"EHLO c.exa",
    "pipelined_to_data": TRANSACTION,
    "mid_data": TRANSACTION + b"Subject: x\r\n\r\npart of a bo",
    "after_dot": TRANSACTION + b"Subject: x\r\n\r\nbody\r\n.\r\n",
    "dot_quit": TRANSACTION + b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    "after_221": TRANSACTION + b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",  # reads up to the 221
}


async def vanishing_client(address, step: str, rst: bool) -> None:
    s = trio.socket.socket()
    try:
        await s.connect(address)
        data = VANISH_AT[step]
        if data is not None:
            seen = b""
            while not seen.endswith(b"\r\n") and (chunk := await s.recv(4096)):
                seen += chunk
            while data:
                data = data[await s.send(data):]
            while step == "after_221" and b"\r\n221 " not in seen and (chunk := await s.recv(4096)):
                seen += chunk
    finally:
        if rst:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


@pytest.mark.trio
async def test_clients_vanishing_at_every_step_leave_the_gateway_serving(tmp_path, caplog):
    """Clients that close (FIN) or reset (RST) at every SMTP step, pipelining up to the dot and QUIT
    without reading the replies, all at once through the gateway to a real MTA: every session ends,
    none as an error or a traceback, and a normal transaction right after gets its 250."""
    require_tool("smtp-sink")
    caplog.set_level(logging.INFO, "homemx.gateway")
    with smtp_sink(tmp_path, dump=False) as sink:
        cfg = gateway_config({"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0", "proxy_v2": False,
                              "upstream": f"127.0.0.1:{sink.port}", "greet_wait": "300ms",
                              "max_per_client": 100, "rate": 100, "burst": 100})
        async with running(cfg) as gw:
            address = bound(gw, "mx")
            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    for _ in range(3):
                        for step in VANISH_AT:
                            for rst in (False, True):
                                n.start_soon(vanishing_client, address, step, rst)
                await wait_sample(gw, "homemx_gateway_active_connections", 0, listener="mx")
            with trio.fail_after(10):  # a liveness bound: the greet wait is 0.3 s
                await trio.to_thread.run_sync(smtplib_send, *address, "127.0.0.1", "after-the-storm")
            await wait_sample(gw, "homemx_gateway_active_connections", 0, listener="mx")
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="error") is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
    assert "Traceback" not in caplog.text
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="relayed") >= 1


def imap_login(port):
    with imaplib.IMAP4("127.0.0.1", port, timeout=20) as m:
        typ, _ = m.login("alice", "secret")
        caps = m.capabilities
        m.logout()
    return typ, caps


@pytest.mark.trio
async def test_dovecot_accepts_proxy_v2_and_logs_real_address(tmp_path):
    """A tcp listener in front of Dovecot's `haproxy = yes` IMAP listener: login works (Dovecot
    rejects connections without a valid header) and Dovecot logs the client's real address."""
    require_tool("dovecot")
    with dovecot(tmp_path) as dc:
        cfg = gateway_config({"name": "imap", "kind": "tcp", "listen": ["127.0.0.1:0", "[::1]:0"],
                              "upstream": f"127.0.0.1:{dc.port}"})
        async with running(cfg) as gw:
            typ, _ = await trio.to_thread.run_sync(imap_login, bound(gw, "imap")[1])
            assert typ == "OK"

            def login6(port):
                with imaplib.IMAP4("::1", port, timeout=20) as m:
                    return m.login("alice", "secret")[0]

            assert await trio.to_thread.run_sync(login6, bound(gw, "imap", socket.AF_INET6)[1]) == "OK"
        log = wait_for_text(dc.log, "rip=::1")
        assert "Login: user=<alice>" in log and "rip=127.0.0.1" in log


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    from backend.tls.selfsigned import write_self_signed  # a test may import the backend; the gateway may not

    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert_path, key_path, "imap.example.org", days=1)
    return cert_path, key_path


class RecordingStream(trio.abc.HalfCloseableStream):
    """Wraps the gateway's upstream stream and keeps every byte the gateway handled."""

    def __init__(self, inner, seen: bytearray):
        self.inner, self.seen = inner, seen

    async def send_all(self, data):
        self.seen += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        data = await self.inner.receive_some(max_bytes)
        self.seen += data
        return data

    async def send_eof(self):
        await self.inner.send_eof()

    async def aclose(self):
        await self.inner.aclose()


@pytest.mark.trio
async def test_tls_session_passes_end_to_end_as_ciphertext(tmp_path):
    cert, key = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    secret = b"A001 LOGIN alice correct-horse-battery-staple\r\n"

    async def tls_server(stream):
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        await tls.send_all(b"* OK IMAP ready\r\n")
        got = await tls.receive_some(4096)
        await tls.send_all(b"echo " + got)
        await tls.aclose()

    seen = bytearray()

    async def recording_connect(address):
        return RecordingStream(await tcp_connect(address), seen)

    async with trio.open_nursery() as n:
        upstream = await n.start(partial(trio.serve_tcp, tls_server, 0, host="127.0.0.1"))
        up_port = upstream[0].socket.getsockname()[1]
        cfg = gateway_config({"name": "imaps", "kind": "tcp", "listen": "127.0.0.1:0",
                              "upstream": f"127.0.0.1:{up_port}", "proxy_v2": False})
        async with running(cfg, connect=recording_connect) as gw:
            raw = await trio.open_tcp_stream(*bound(gw, "imaps"))
            tls = trio.SSLStream(raw, client_ctx, server_hostname="imap.example.org")
            assert await tls.receive_some(4096) == b"* OK IMAP ready\r\n"
            await tls.send_all(secret)
            assert await tls.receive_some(4096) == b"echo " + secret
            await tls.aclose()
        n.cancel_scope.cancel()
    assert seen[:1] == b"\x16"  # a TLS handshake record: the ClientHello, straight from the client
    assert len(seen) > 500
    assert b"correct-horse" not in seen and b"IMAP ready" not in seen


@pytest.mark.trio
async def test_upstream_stopped_gives_421_and_recovers_without_restart(tmp_path):
    require_tool("smtp-sink")
    port = free_port()
    cfg = gateway_config({"name": "mx", "kind": "smtp", "listen": ["127.0.0.1:0", "[::1]:0"],
                          "upstream": f"127.0.0.1:{port}", "proxy_v2": False, "connect_timeout": "3s"})
    async with running(cfg) as gw:
        addr = bound(gw, "mx")
        with smtp_sink(tmp_path, port=port, dump=False):
            assert (await trio.to_thread.run_sync(smtp_banner, *addr)).startswith(b"220 ")
        # The real MTA is gone: connection refused at the gateway's dial.
        reply = await trio.to_thread.run_sync(smtp_banner, *addr)
        assert reply == b"421 4.3.2 mx.example.org Service not available, try again later\r\n"
        reply6 = await trio.to_thread.run_sync(smtp_banner, *bound(gw, "mx", socket.AF_INET6))
        assert reply6.startswith(b"421 4.3.2 ")
        assert sample(gw, "homemx_gateway_upstream_up", listener="mx") == 0
        with smtp_sink(tmp_path, port=port, dump=False):
            assert (await trio.to_thread.run_sync(smtp_banner, *addr)).startswith(b"220 ")
        assert sample(gw, "homemx_gateway_upstream_up", listener="mx") == 1


@pytest.mark.trio
async def test_metrics_endpoint_serves_prometheus_text(tmp_path):
    cfg = gateway_config({"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0",
                          "upstream": f"127.0.0.1:{free_port()}", "connect_timeout": "2s"},
                         metrics_listen="127.0.0.1:0", tunnel_interface="hmxnonexistent0")
    async with running(cfg) as gw:
        await trio.to_thread.run_sync(smtp_banner, *bound(gw, "mx"))
        s = await trio.open_tcp_stream(*gw.metrics_address)
        await s.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = b""
        while chunk := await s.receive_some(65536):
            body += chunk
    text = body.decode()
    assert text.startswith("HTTP/1.1 200 OK")  # h11 answers in its own version (RFC 9110 2.5), 1.0 clients included
    assert 'homemx_gateway_connections_total{listener="mx",outcome="upstream_unavailable"} 1.0' in text
    assert 'homemx_gateway_upstream_up{listener="mx"} 0.0' in text
    assert "homemx_gateway_tunnel_handshake_age_seconds" not in text  # no such interface: series absent
