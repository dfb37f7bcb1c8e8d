"""Native bring-up in namespaces: `up` twice is idempotent, `down` leaves nothing behind, files work with `wg setconf`."""

from __future__ import annotations

import io
import os
import subprocess

import wgconfig

import pytest

from tests.conftest import require_root, require_tool
from tests.lab.netns import Lab
from wireguard import wgquick

from .tunnel_lab import HOME_TUN, make_tunnel_lab, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture
def lab():
    require_root()
    require_tool("wireguard-go", "wg", "wg-quick", "nft", "ip")
    with Lab() as lab:
        yield lab


def _snapshot(ns, ifname: str) -> dict:
    return {
        "links": [n for n in ns.link_names() if n == ifname],
        "rules": [line for line in ns.run(["ip", "rule", "show"]).stdout.splitlines() if "2525" in line],
        "table": ns.run(["ip", "route", "show", "table", "2525"], check=False).stdout.strip(),
        "addrs": ns.run(["ip", "-o", "addr", "show"]).stdout.count(HOME_TUN),
        "nft": ns.run(["nft", "list", "tables"]).stdout.strip(),
        "pids": ns.pids(),
    }


def test_up_twice_is_idempotent_and_down_leaves_nothing(lab):
    t = make_tunnel_lab(lab)
    home, gw = t.topo.home, t.topo.gateway
    before_home, before_gw = _snapshot(home, t.home_if), _snapshot(gw, t.gw_if)
    forward_before = gw.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    t.up(extra_gw=("--public-if", "eth0", "--public-addr", t.topo.gateway_addr))
    first = t.wait_handshake()
    up_home = _snapshot(home, t.home_if)
    assert up_home["links"] == [t.home_if] and len(up_home["rules"]) == 1
    assert f"from {HOME_TUN} lookup 2525" in up_home["rules"][0]
    assert up_home["table"].split() == ["default", "dev", t.home_if, "proto", "static", "scope", "link"]
    assert up_home["nft"] == f"table inet homemx_{t.home_if}"
    assert gw.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    gw_pids = gw.pids()
    gw_ruleset = gw.run(["nft", "list", "ruleset"]).stdout

    t.up(extra_gw=("--public-if", "eth0", "--public-addr", t.topo.gateway_addr))  # again: nothing changes
    assert _snapshot(home, t.home_if) == up_home
    assert gw.pids() == gw_pids
    again = t.status("home")
    # the unchanged peer was not re-set, so its session (and handshake time) survived the second `up`
    assert again["peers"][0]["latest_handshake"] == first["peers"][0]["latest_handshake"]
    assert gw.run(["nft", "list", "tables"]).stdout.splitlines() == [f"table inet homemx_{t.gw_if}"]
    assert gw.run(["nft", "list", "ruleset"]).stdout == gw_ruleset

    t.down()
    assert _snapshot(home, t.home_if) == before_home
    assert _snapshot(gw, t.gw_if) == before_gw
    assert gw.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == forward_before
    for ifname in (t.home_if, t.gw_if):
        assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")
    assert list((lab.workdir / "state").glob("*.json")) == []
    assert t.status("home") == {"interface": t.home_if, "present": False}
    # down again is harmless and says so
    r = t.cli(home, "backend", "down", "-c", str(t.home_conf))
    assert "was not up" in r.stdout
    # and the home's own connectivity is as before
    assert home.run(["ip", "route", "show", "default"]).stdout.startswith(f"default via {t.topo.router_lan_addr}")


def test_down_without_state_file_still_removes_the_tunnel(lab):
    t = make_tunnel_lab(lab)
    t.up()
    for f in (lab.workdir / "state").glob("*.json"):
        f.unlink()  # e.g. /run wiped by hand
    t.down()
    assert _snapshot(t.topo.home, t.home_if)["links"] == []
    assert _snapshot(t.topo.home, t.home_if)["rules"] == []
    assert t.topo.home.run(["nft", "list", "tables"]).stdout.strip() == ""
    assert wait_for(lambda: not t.topo.home.pids() and not t.topo.gateway.pids(), 5, what="wireguard-go to exit")


def test_files_are_accepted_by_wg_quick_strip_and_wg_setconf(lab):
    t = make_tunnel_lab(lab)
    ns = t.topo.home
    ifname = lab.name("x")
    env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
    ns.popen(["wireguard-go", "-f", ifname], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(f"/var/run/wireguard/{ifname}.sock"), 10, what="wireguard-go socket")
    for conf in (t.gw_conf, t.home_conf):
        cfg = wgquick.read(conf)
        stripped = ns.run(["wg-quick", "strip", str(conf)]).stdout
        (lab.workdir / "stripped.conf").write_text(stripped)
        ns.run(["wg", "setconf", ifname, str(lab.workdir / "stripped.conf")])
        # `wg showconf` prints the device's config back in wg(8) form (no Address): read it with wgconfig
        shown = wgconfig.WGConfig()
        shown.read_from_fileobj(io.StringIO(ns.run(["wg", "showconf", ifname]).stdout))
        iface = shown.get_interface()
        assert iface["PrivateKey"] == cfg.private_key
        assert iface.get("ListenPort") == cfg.listen_port or cfg.listen_port is None
        (pub, p), (q,) = shown.get_peers(keys_only=False).popitem(), cfg.peers
        allowed = p["AllowedIPs"] if isinstance(p["AllowedIPs"], list) else [p["AllowedIPs"]]
        assert (pub, p.get("PresharedKey"), allowed, p.get("Endpoint"), p.get("PersistentKeepalive")) == (
            q.public_key, q.preshared_key, [str(n) for n in q.allowed_ips],
            f"{q.endpoint[0]}:{q.endpoint[1]}" if q.endpoint else None, q.persistent_keepalive)
