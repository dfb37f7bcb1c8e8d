"""The gateway in front of the real homemx backend (`homemx-backend run`): mail delivered to a Maildir with the client's real address (IPv4 and IPv6) in the Received header; backend stopped → 421 4.3.2, started again → the next connection succeeds; a STARTTLS session ending with QUIT counts as a normal close; an idle client reads the backend's 421 4.4.2 before the gateway's idle timeout."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from tests.backend.helpers import BACKEND_CLI, client_tls, listener_block, maildir_files, write_config
from tests.gateway.peers import stop, wait_port
from tests.lab.ports import free_port
from tests.lab.gateway import bound, gateway_config, running, sample, smtp_banner, wait_sample


def start_backend(cfg: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([BACKEND_CLI, "run", "-c", str(cfg)], stdout=open(cfg.parent / "backend.log", "ab"),
                            stderr=subprocess.STDOUT)
    wait_port("127.0.0.1", port, timeout=20, proc=proc)
    return proc


def send(host, port, source, marker):
    with smtplib.SMTP(host, port, timeout=20, source_address=(source, 0)) as s:
        s.sendmail("alice@sender.example", ["bob@example.org"], f"Subject: {marker}\r\n\r\n{marker}\r\n")


def wait_maildir(tmp_path, count, timeout=15.0):
    deadline = time.monotonic() + timeout
    while len(files := maildir_files(tmp_path, "bob@example.org")) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(files)} messages in bob's Maildir, expected {count}")
        time.sleep(0.05)
    return [f.read_bytes() for f in files]


@pytest.mark.trio
async def test_gateway_into_real_backend(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, listener_block(
        "mx", "mx", f"127.0.0.1:{port}", proxy_protocol=True, trusted_proxies=["127.0.0.1/32", "::1/128"]))
    backend = start_backend(cfg, port)
    try:
        gcfg = gateway_config({"name": "mx", "kind": "smtp", "listen": ["127.0.0.1:0", "[::1]:0"],
                               "upstream": f"127.0.0.1:{port}", "greet_wait": "300ms", "connect_timeout": "3s"})
        async with running(gcfg) as gw:
            v4, v6 = bound(gw, "mx"), bound(gw, "mx", socket.AF_INET6)
            await trio.to_thread.run_sync(send, *v4, "127.0.0.5", "via-gateway-ipv4")
            await trio.to_thread.run_sync(send, *v6, "::1", "via-gateway-ipv6")
            messages = await trio.to_thread.run_sync(wait_maildir, tmp_path, 2)
            by_marker = {m: next(x for x in messages if m.encode() in x) for m in ("via-gateway-ipv4", "via-gateway-ipv6")}
            received4 = by_marker["via-gateway-ipv4"].split(b"\r\n\r\n")[0]
            received6 = by_marker["via-gateway-ipv6"].split(b"\r\n\r\n")[0]
            assert b"127.0.0.5" in received4  # the real client, not the gateway's 127.0.0.1
            assert b"::1" in received6

            stop(backend)
            reply = await trio.to_thread.run_sync(smtp_banner, *v4)
            assert reply == b"421 4.3.2 mx.example.org Service not available, try again later\r\n"

            backend = start_backend(cfg, port)
            assert (await trio.to_thread.run_sync(smtp_banner, *v4)).startswith(b"220 ")
            await trio.to_thread.run_sync(send, *v4, "127.0.0.5", "after-restart")
            await trio.to_thread.run_sync(wait_maildir, tmp_path, 3)
    finally:
        stop(backend)


def starttls_quit(host, port):
    """EHLO, STARTTLS, EHLO, QUIT → 221, then close the way smtplib (and most clients) do: without
    reading the backend's TLS close_notify that follows the 221."""
    s = smtplib.SMTP(host, port, timeout=20)
    s.ehlo("client.example")
    s.starttls(context=client_tls())
    s.ehlo("client.example")
    return s.quit()[0]


@pytest.mark.trio
async def test_tls_session_ending_with_quit_is_a_normal_close(tmp_path):
    """STARTTLS through the gateway to the real backend, QUIT, 221: counted and logged as a normal
    close (outcome relayed), not a reset, though the client's kernel answers the unread close_notify
    with RST (RFC 2525 2.17)."""
    port = free_port()
    cfg = write_config(tmp_path, listener_block(
        "mx", "mx", f"127.0.0.1:{port}", proxy_protocol=True, trusted_proxies=["127.0.0.1/32"]))
    backend = start_backend(cfg, port)
    sessions = 5
    try:
        gcfg = gateway_config({"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0",
                               "upstream": f"127.0.0.1:{port}", "greet_wait": "0s"},
                              metrics_listen="127.0.0.1:0")
        async with running(gcfg) as gw:
            for _ in range(sessions):
                assert await trio.to_thread.run_sync(starttls_quit, *bound(gw, "mx")) == 221
            await wait_sample(gw, "homemx_gateway_active_connections", 0, listener="mx")
            text = await trio.to_thread.run_sync(scrape, gw.metrics_address)
        assert f'homemx_gateway_connections_total{{listener="mx",outcome="relayed"}} {sessions}.0' in text
        assert 'outcome="reset"' not in text
    finally:
        stop(backend)


def scrape(address) -> str:
    """The gateway's /metrics page, as Prometheus would read it."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    return body.decode()


def idle_client(host, port) -> bytes:
    """Read the banner, then stay silent: everything the server says until the connection closes."""
    with socket.create_connection((host, port), timeout=20) as s:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


@pytest.mark.trio
async def test_idle_client_reads_the_backends_421_through_the_gateway(tmp_path):
    """Short injected timeouts in the shipped relation (gateway idle > backend listener timeout):
    the idle client reads the backend's 421 4.4.2 and the gateway counts a normal close."""
    port = free_port()
    cfg = write_config(tmp_path, listener_block(
        "mx", "mx", f"127.0.0.1:{port}", proxy_protocol=True, trusted_proxies=["127.0.0.1/32"], timeout="1s"))
    backend = start_backend(cfg, port)
    try:
        gcfg = gateway_config({"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0",
                               "upstream": f"127.0.0.1:{port}", "greet_wait": "0s", "idle_timeout": "4s"})
        async with running(gcfg) as gw:
            transcript = await trio.to_thread.run_sync(idle_client, *bound(gw, "mx"))
            await wait_sample(gw, "homemx_gateway_connections_total", 1, listener="mx", outcome="relayed")
        assert transcript.startswith(b"220 ")
        assert transcript.endswith(b"\r\n") and transcript.split(b"\r\n")[-2].startswith(b"421 4.4.2 ")
        assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="idle_timeout") is None
    finally:
        stop(backend)
