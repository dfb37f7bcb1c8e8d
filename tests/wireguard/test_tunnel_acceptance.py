"""Acceptance: the real tunnel in namespaces — home behind NAT dials the gateway; only tcp/25 bound to the tunnel address leaves via the VPS."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import require_root, require_tool
from tests.lab.netns import Lab

from .tunnel_lab import GW_TUN, HOME_TUN, Listener, connect, make_tunnel_lab, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def tunnel():
    require_root()
    require_tool("wireguard-go", "wg", "nft", "ip")
    with Lab() as lab:
        t = make_tunnel_lab(lab)
        t.up()
        t.wait_handshake()
        listener = Listener(t.topo.internet, (25, 80))
        try:
            yield t, listener
        finally:
            listener.close()
            t.down()


def test_handshake_seen_through_status_on_both_ends(tunnel):
    t, _ = tunnel
    home = t.wait_handshake()
    assert home["present"] and home["implementation"] == "userspace"
    assert home["peers"][0]["endpoint"] == f"{t.topo.gateway_addr}:51820"
    assert home["handshake_age"] < 60 and home["up"]
    gw = t.status("gateway")
    assert gw["handshake_age"] is not None
    # the gateway sees the home's NAT address as its endpoint: the home dialled out through NAT
    assert gw["peers"][0]["endpoint"].startswith(t.topo.router_wan_addr + ":")
    assert gw["peers"][0]["allowed_ips"] == [f"{HOME_TUN}/32"]


def test_smtp_bound_to_tunnel_address_leaves_from_gateway_public_address(tunnel):
    t, listener = tunnel
    out = connect(t.topo.home, t.topo.internet_addr, 25, src=HOME_TUN)
    assert out == "OK 220 lab"
    seen = wait_for(lambda: [s for s in listener.seen() if s[0] == 25], 5, what="the port 25 connection")
    assert seen[-1] == (25, t.topo.gateway_addr)
    # and the tunnel really carried it
    assert t.status("home")["tx_bytes"] > 0


def test_port_80_through_the_tunnel_does_not_pass(tunnel):
    t, listener = tunnel
    before = len([s for s in listener.seen() if s[0] == 80])
    out = connect(t.topo.home, t.topo.internet_addr, 80, src=HOME_TUN, timeout=1.5)
    assert out.startswith("FAIL")
    assert len([s for s in listener.seen() if s[0] == 80]) == before
    # the drop rule counted it: the gateway's own table, not an accident of routing
    r = t.topo.gateway.run(["nft", "-j", "list", "table", "inet", f"homemx_{t.gw_if}"])
    counters = [e["counter"]["packets"] for item in json.loads(r.stdout)["nftables"] if "rule" in item
                for e in item["rule"]["expr"] if "counter" in e]
    assert sum(counters) > 0


def test_connection_not_bound_to_tunnel_goes_out_via_home_router(tunnel):
    t, listener = tunnel
    for port in (25, 80):
        assert connect(t.topo.home, t.topo.internet_addr, port) == "OK 220 lab"
        wait_for(lambda: any(s == (port, t.topo.router_wan_addr) for s in listener.seen()), 5,
                 what=f"port {port} via the home router")
    # the home's main table still has its original default route, nothing through the tunnel
    main = t.topo.home.run(["ip", "route", "show", "table", "main"]).stdout
    assert f"default via {t.topo.router_lan_addr} dev eth0" in main and "default dev" not in main


def test_gateway_reaches_home_over_the_tunnel(tunnel):
    # the path the edge proxy uses: gateway → backend tunnel address (not via the egress rules)
    t, _ = tunnel
    server = t.topo.home.popen(["python3", "-c", (
        "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        f"s.bind(('{HOME_TUN}', 2525)); s.listen(); print('ready', flush=True);"
        "c,a=s.accept(); c.sendall(('220 from ' + a[0] + chr(13) + chr(10)).encode()); c.close()")],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    assert connect(t.topo.gateway, HOME_TUN, 2525) == f"OK 220 from {GW_TUN}"
    server.wait(timeout=5)
