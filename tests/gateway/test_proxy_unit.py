"""Connection handler over memory streams with a virtual clock: early talker, greet wait, limits, timeouts, 421 when home is down."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.lab.proxyv2_decoder import parse_proxy_v2
from gateway.config import config_from_dict
from gateway.dnsbl import DnsblChecker
from gateway.proxy import Gateway
from tests.lab.gateway import sample

HOST = "mx.example.org"
CLIENT = ("203.0.113.7", 40001)
LOCAL = ("198.51.100.1", 25)


def make_config(**listener):
    lst = {"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0", "upstream": "10.8.0.2:2525"}
    lst.update(listener)
    limits = lst.pop("limits", {})
    dnsbl = lst.pop("dnsbl_zones", None)
    raw = {"server": {"hostname": HOST}, "limits": limits, "listener": [lst]}
    if dnsbl:
        raw["dnsbl"] = {"zones": dnsbl}
        lst["dnsbl"] = True
    return config_from_dict(raw, Path("test.toml"))


class FakeHome:
    """The upstream side of memory streams: records dials, reads the PROXY header, sends a banner."""

    def __init__(self, dial_delay=0.0, fail: Exception | None = None, hang=False, banner=b"220 home ESMTP\r\n"):
        self.dial_delay = dial_delay
        self.fail = fail
        self.hang = hang
        self.banner = banner
        self.dials: list[float] = []
        self.sessions: list[trio.abc.Stream] = []
        self.headers = []
        self.nursery: trio.Nursery | None = None

    async def connect(self, address):
        self.dials.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        await trio.sleep(self.dial_delay)
        if self.fail is not None:
            raise self.fail
        gw_end, home_end = trio.testing.memory_stream_pair()
        self.sessions.append(home_end)
        self.nursery.start_soon(self._greet, home_end)
        return gw_end

    async def _greet(self, stream):
        buf = b""
        while (parsed := parse_proxy_v2(buf)) is None:
            buf += await stream.receive_some(1024)
        self.headers.append(parsed[0])
        if self.banner:
            await stream.send_all(self.banner)


async def read_until_eof(stream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(4096):
        out += chunk
    return out


async def start_conn(nursery, gw, peer=CLIENT, listener="mx"):
    client_end, gw_end = trio.testing.memory_stream_pair()
    nursery.start_soon(gw.handle_connection, listener, gw_end, peer, LOCAL)
    return client_end


@pytest.mark.trio
async def test_early_talker_gets_554_and_never_reaches_home(autojump_clock):
    home = FakeHome()
    gw = Gateway(make_config(greet_wait="6s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        client = await start_conn(n, gw)
        await trio.sleep(1)
        await client.send_all(b"EHLO bot.example\r\n")
        reply = await read_until_eof(client)
    assert reply == b"554 5.5.0 mx.example.org Protocol error: client sent data before the greeting\r\n"
    assert home.dials == []
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="early_talker") == 1


@pytest.mark.trio
async def test_greet_wait_then_banner_relayed_with_real_address(autojump_clock):
    home = FakeHome()
    gw = Gateway(make_config(greet_wait="6s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        t0 = trio.current_time()
        client = await start_conn(n, gw)
        banner = await client.receive_some(4096)
        assert trio.current_time() - t0 >= 6
        assert banner == b"220 home ESMTP\r\n"
        assert home.dials and home.dials[0] - t0 >= 6  # nothing dialled home during the wait
        assert home.headers[0].src == CLIENT and home.headers[0].dst == LOCAL
        await client.send_all(b"EHLO good.example\r\n")
        assert await home.sessions[0].receive_some(4096) == b"EHLO good.example\r\n"
        await home.sessions[0].send_all(b"250 ok\r\n")
        assert await client.receive_some(4096) == b"250 ok\r\n"
        await client.send_eof()
        assert await home.sessions[0].receive_some(4096) == b""  # half-close propagated
        await home.sessions[0].send_all(b"221 bye\r\n")  # the other direction still flows
        assert await client.receive_some(4096) == b"221 bye\r\n"
        await home.sessions[0].aclose()
        assert await client.receive_some(4096) == b""
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="relayed") == 1


@pytest.mark.trio
async def test_early_talk_while_dialling_is_still_early(autojump_clock):
    home = FakeHome(dial_delay=2)
    gw = Gateway(make_config(greet_wait="6s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        client = await start_conn(n, gw)
        await trio.sleep(7)  # wait over, dial in progress, no banner yet
        await client.send_all(b"HELO x\r\n")
        reply = await read_until_eof(client)
    assert reply.startswith(b"554 5.5.0 mx.example.org")


@pytest.mark.trio
async def test_client_closing_during_wait_dials_nothing(autojump_clock):
    home = FakeHome()
    gw = Gateway(make_config(greet_wait="6s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        client = await start_conn(n, gw)
        await client.aclose()
    assert home.dials == []
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="client_gone") == 1


@pytest.mark.trio
async def test_upstream_connect_timeout_gives_421(autojump_clock):
    home = FakeHome(hang=True)
    gw = Gateway(make_config(connect_timeout="5s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        t0 = trio.current_time()
        client = await start_conn(n, gw)
        reply = await read_until_eof(client)
    assert reply == b"421 4.3.2 mx.example.org Service not available, try again later\r\n"
    assert 5 <= trio.current_time() - t0 < 10
    assert sample(gw, "homemx_gateway_upstream_up", listener="mx") == 0


@pytest.mark.trio
async def test_upstream_refused_after_greet_wait_gives_421(autojump_clock):
    home = FakeHome(fail=ConnectionRefusedError(111, "Connection refused"))
    gw = Gateway(make_config(greet_wait="3s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        client = await start_conn(n, gw)
        reply = await read_until_eof(client)
    assert reply.startswith(b"421 4.3.2 mx.example.org Service not available")


@pytest.mark.trio
async def test_upstream_silent_banner_timeout_gives_421(autojump_clock):
    home = FakeHome(banner=b"")
    gw = Gateway(make_config(greet_wait="1s", banner_timeout="20s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        client = await start_conn(n, gw)
        reply = await read_until_eof(client)
    assert reply.startswith(b"421 4.3.2")


@pytest.mark.trio
async def test_tcp_listener_closes_silently_when_upstream_down(autojump_clock):
    home = FakeHome(hang=True)
    gw = Gateway(make_config(kind="tcp", name="imaps", connect_timeout="5s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        client = await start_conn(n, gw, listener="imaps")
        assert await read_until_eof(client) == b""


@pytest.mark.trio
async def test_per_client_cap_keyed_by_ipv6_64(autojump_clock):
    home = FakeHome()
    gw = Gateway(make_config(max_per_client=1), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        first = await start_conn(n, gw, peer=("2001:db8:1:2::1", 1000))
        assert await first.receive_some(100) == b"220 home ESMTP\r\n"
        same64 = await start_conn(n, gw, peer=("2001:db8:1:2::ffff", 1001))
        assert (await read_until_eof(same64)).startswith(b"421 4.7.0 mx.example.org Too many connections")
        other64 = await start_conn(n, gw, peer=("2001:db8:1:3::1", 1002))
        assert await other64.receive_some(100) == b"220 home ESMTP\r\n"
        await first.aclose()
        await home.sessions[0].aclose()  # both directions finished: the session ends
        await trio.sleep(0.1)
        again = await start_conn(n, gw, peer=("2001:db8:1:2::ffff", 1003))  # slot released
        assert await again.receive_some(100) == b"220 home ESMTP\r\n"
        n.cancel_scope.cancel()
    assert sample(gw, "homemx_gateway_refusals_total", listener="mx", reason="per_client_cap") == 1


@pytest.mark.trio
async def test_global_cap(autojump_clock):
    home = FakeHome()
    gw = Gateway(make_config(limits={"max_connections": 2}), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        for i in range(2):
            c = await start_conn(n, gw, peer=(f"192.0.2.{i + 1}", 1000))
            assert await c.receive_some(100) == b"220 home ESMTP\r\n"
        third = await start_conn(n, gw, peer=("192.0.2.3", 1000))
        assert (await read_until_eof(third)).startswith(b"421 4.7.0 mx.example.org Server busy")
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_rate_limit_token_bucket(autojump_clock):
    home = FakeHome(banner=b"220 x\r\n")
    gw = Gateway(make_config(rate=0.5, burst=2), connect=home.connect)

    async def one() -> bytes:
        async with trio.open_nursery() as n:
            home.nursery = n
            c = await start_conn(n, gw)
            first = await c.receive_some(100)
            await c.aclose()
            if first.startswith(b"220"):
                await home.sessions[-1].aclose()
            t0 = trio.current_time()
        assert trio.current_time() - t0 < 5  # virtual time did not run on to an idle timeout
        return first

    assert await one() == b"220 x\r\n"
    assert await one() == b"220 x\r\n"
    assert (await one()).startswith(b"421 4.7.0 mx.example.org Connection rate limit exceeded")
    await trio.sleep(2)  # one token back at 0.5/s
    assert await one() == b"220 x\r\n"
    assert sample(gw, "homemx_gateway_refusals_total", listener="mx", reason="rate") == 1


@pytest.mark.trio
async def test_tcp_listener_refusal_just_closes(autojump_clock):
    home = FakeHome(banner=b"")
    gw = Gateway(make_config(kind="tcp", name="imaps", max_per_client=1), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        await start_conn(n, gw, listener="imaps")
        await trio.sleep(1)
        second = await start_conn(n, gw, listener="imaps")
        assert await read_until_eof(second) == b""
        n.cancel_scope.cancel()
    assert sample(gw, "homemx_gateway_refusals_total", listener="imaps", reason="per_client_cap") == 1


@pytest.mark.trio
async def test_idle_timeout_closes_both_sides(autojump_clock, caplog):
    caplog.set_level(logging.INFO, "homemx.gateway")
    home = FakeHome()
    gw = Gateway(make_config(idle_timeout="300s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        t0 = trio.current_time()
        client = await start_conn(n, gw)
        await client.receive_some(100)
        await trio.sleep(200)
        await client.send_all(b"NOOP\r\n")  # activity pushes the deadline back
        assert await home.sessions[0].receive_some(100) == b"NOOP\r\n"
        assert await read_until_eof(client) == b""
        assert await read_until_eof(home.sessions[0]) == b""
        assert 500 <= trio.current_time() - t0 < 510
    assert "outcome=idle_timeout" in caplog.text and "conn=1 " in caplog.text


@pytest.mark.trio
async def test_session_timeout_despite_activity(autojump_clock):
    home = FakeHome()
    gw = Gateway(make_config(idle_timeout="60s", session_timeout="600s"), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        t0 = trio.current_time()
        client = await start_conn(n, gw)
        await client.receive_some(100)
        with trio.move_on_after(10_000):
            while True:
                try:
                    await client.send_all(b"NOOP\r\n")
                except trio.BrokenResourceError:
                    break
                await home.sessions[0].receive_some(100)
                await trio.sleep(30)
        assert 600 <= trio.current_time() - t0 < 640
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="session_timeout") == 1


@pytest.mark.trio
async def test_dnsbl_listed_client_gets_554(autojump_clock):
    table = {"7.113.0.203.zen.example": ["127.0.0.2"]}
    queries = []

    async def lookup(name):
        queries.append(name)
        return table.get(name, [])

    home = FakeHome()
    cfg = make_config(greet_wait="2s", dnsbl_zones=["zen.example"])
    checker = DnsblChecker(("zen.example",), lookup, timeout=2, cache_ttl=600, clock=trio.current_time)
    gw = Gateway(cfg, connect=home.connect, dnsbl=checker)
    async with trio.open_nursery() as n:
        home.nursery = n
        for _ in range(2):
            reply = await read_until_eof(await start_conn(n, gw))
            assert reply.startswith(b"554 5.7.1 mx.example.org Service unavailable; client [203.0.113.7] blocked using zen.example")
        clean = await start_conn(n, gw, peer=("203.0.113.8", 1))
        assert await clean.receive_some(100) == b"220 home ESMTP\r\n"
        n.cancel_scope.cancel()
    assert queries.count("7.113.0.203.zen.example") == 1  # second answer came from the cache
    assert home.dials and len(home.dials) == 1


@pytest.mark.trio
async def test_handler_never_raises(autojump_clock, caplog):
    home = FakeHome(fail=RuntimeError("boom"))
    gw = Gateway(make_config(), connect=home.connect)
    async with trio.open_nursery() as n:
        home.nursery = n
        client = await start_conn(n, gw)
        assert await read_until_eof(client) == b""
    assert "conn=1 listener=mx" in caplog.text and "boom" in caplog.text
    assert sample(gw, "homemx_gateway_connections_total", listener="mx", outcome="error") == 1
