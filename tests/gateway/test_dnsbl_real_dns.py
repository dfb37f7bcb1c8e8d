"""DNSBL through dnspython's trio support against a real authoritative server (nsd on loopback)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from gateway.config import config_from_dict
from tests.conftest import require_tool
from tests.lab.ports import free_port
from tests.lab.gateway import bound, running
from tests.lab.nsd import NSD, zone_text


def listing(*octets: int) -> str:
    """DNSBL records listing 127.0.0.N for each N (RFC 5782 2.1: A 127.0.0.2 under the reversed name)."""
    return "".join(f"{n}.0.0.127\tIN\tA\t127.0.0.2\n{n}.0.0.127\tIN\tTXT\t\"listed for testing\"\n" for n in octets)


@pytest.mark.trio
async def test_listed_client_refused_unlisted_passes_real_dns(tmp_path):
    require_tool("nsd")
    # 127.0.0.5 is listed, 127.0.0.6 is not.
    with NSD({"bl.test": zone_text("bl.test", listing(5), ns_address="127.0.0.1")}, workdir=tmp_path / "nsd") as nsd:
        closed = free_port()  # the upstream: nobody listens, so a client that passes gets 421 4.3.2
        cfg = config_from_dict({
            "server": {"hostname": "mx.example.org", "shutdown_grace": "1s"},
            "dnsbl": {"zones": ["bl.test"], "nameservers": [nsd.address], "port": nsd.port, "timeout": "3s"},
            "listener": [{"name": "mx", "kind": "smtp", "listen": ["127.0.0.1:0"], "upstream": f"127.0.0.1:{closed}",
                          "dnsbl": True, "greet_wait": "100ms", "connect_timeout": "2s"}],
        }, Path("dnsbl.toml"))
        async with running(cfg) as gw:
            host, port = bound(gw, "mx")

            def banner_from(source):
                with socket.create_connection((host, port), timeout=20, source_address=(source, 0)) as s:
                    data = b""
                    while not data.endswith(b"\r\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    return data.decode()

            listed = await trio.to_thread.run_sync(banner_from, "127.0.0.5")
            clean = await trio.to_thread.run_sync(banner_from, "127.0.0.6")
            # The list changes: 127.0.0.5 delisted, 127.0.0.7 listed. Only the cache can still
            # refuse .5; the fresh answer for .7 shows nsd serves the new zone.
            await trio.to_thread.run_sync(nsd.reload, {"bl.test": zone_text("bl.test", listing(7), serial=2,
                                                                            ns_address="127.0.0.1")})
            again = await trio.to_thread.run_sync(banner_from, "127.0.0.5")
            fresh = await trio.to_thread.run_sync(banner_from, "127.0.0.7")
    assert listed.startswith("554 5.7.1") and "bl.test" in listed and "127.0.0.5" in listed
    assert clean.startswith("421 4.3.2")  # passed the DNSBL, then found home unreachable
    assert again.startswith("554 5.7.1") and "127.0.0.5" in again  # answered from the cache
    assert fresh.startswith("554 5.7.1") and "127.0.0.7" in fresh
