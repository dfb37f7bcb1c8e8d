"""One reading of a client address (backend/receive/clientaddr.py): the socket's peer and the PROXY
header's source are stored zone-less, IPv4-mapped IPv6 as IPv4, compressed, so the same client is
the same address in trusted networks, AUTH limits, logs and the Received header."""

from __future__ import annotations

import re

import pytest

from backend.queue.store import Queue
from backend.receive.authlimit import client_key
from backend.receive.clientaddr import canonical_host
from gateway.proxyv2 import encode_proxy_v2
from tests.backend.helpers import ALICE, RawSMTP, listener_block, running_backend, write_config


@pytest.mark.parametrize(
    "given, canonical",
    [
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("::FFFF:c633:6407", "198.51.100.7"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("198.51.100.7", "198.51.100.7"),
        ("unknown", "unknown"),
    ],
)
def test_canonical_host(given, canonical):
    assert canonical_host(given) == canonical


def test_the_auth_limit_key_is_the_same_for_a_mapped_and_a_plain_ipv4_client():
    assert client_key("::ffff:198.51.100.7") == client_key("198.51.100.7") == "198.51.100.7"
    assert client_key("2001:db8::1%eth0") == client_key("2001:db8::ffff") == "2001:db8::/64"


@pytest.mark.asyncio
async def test_an_ipv4_mapped_client_behind_the_gateway_is_its_ipv4_address_everywhere(tmp_path, caplog):
    """A PROXY v2 header of the IPv6 family carrying ::ffff:198.51.100.7 (a dual-stack gateway
    socket): trusted as 198.51.100.0/24, logged and traced as 198.51.100.7."""
    import logging

    caplog.set_level(logging.INFO, logger="homemx.smtp")
    lan = listener_block("lan", "lan", proxy_protocol=True, trusted_proxies=["127.0.0.1/32"],
                         trusted_networks=["198.51.100.0/24"])
    async with running_backend(write_config(tmp_path, lan)) as b:
        header = encode_proxy_v2(("::ffff:198.51.100.7", 40000), ("2001:db8::25", 587))
        c = await RawSMTP.connect(b.bound_port("lan"), prefix=header)
        assert (await c.reply()).startswith("220")
        assert (await c.cmd("EHLO app.example")).startswith("250")
        assert (await c.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250")
        assert (await c.cmd("RCPT TO:<friend@remote.example>")).startswith("250")  # trusted: relays
        assert (await c.cmd("DATA")).startswith("354")
        reply = await c.cmd(f"From: {ALICE}\r\nSubject: mapped\r\n\r\nhi\r\n.")
        assert reply.startswith("250"), reply
        qid = reply.rsplit(" ", 1)[1]
        await c.cmd("QUIT")
        stored = Queue(b.config.queue_db, group_commit=False).content(qid)
    received = stored.partition(b"\r\n\r\n")[0].decode()
    assert "([198.51.100.7])" in received and "IPv6" not in received, received
    assert re.search(r"client=198\.51\.100\.7 ", caplog.text)
    assert "::ffff:" not in caplog.text
