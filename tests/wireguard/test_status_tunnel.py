"""The tunnel section of `homemx-backend status` and `homemx-gateway status` on a real WireGuard
tunnel between two namespaces (brought up by the real `tunnel` CLI): ok with the handshake age
while it is up; attention once an end is down (the home's wg-quick file still names it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.backend.helpers import listener_block, write_config
from tests.conftest import require_root, require_tool
from tests.lab.netns import Lab

from .tunnel_lab import make_tunnel_lab

pytestmark = pytest.mark.netns


@pytest.fixture
def lab():
    require_root()
    require_tool("wireguard-go", "wg", "nft", "ip")
    with Lab() as lab:
        yield lab


def status(ns, env, role: str, *argv: str) -> tuple[int, dict]:
    exe = Path(sys.executable).parent / f"homemx-{role}"
    r = ns.run([str(exe), "status", "--json", "--timeout", "1", *argv], check=False, env=env, timeout=60)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def test_tunnel_section_up_then_down(lab):
    t = make_tunnel_lab(lab)
    home, gw = t.topo.home, t.topo.gateway
    backend_cfg = write_config(lab.workdir / "home", listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]))
    gateway_cfg = lab.workdir / "gateway.toml"
    gateway_cfg.write_text(f"""
[server]
hostname = "mx.example.org"
tunnel_interface = "{t.gw_if}"
[[listener]]
name = "mx"
kind = "smtp"
listen = "127.0.0.1:2525"
upstream = "10.77.0.2:25"
""")
    backend_args = ("-c", str(backend_cfg), "--tunnel-config", str(t.home_conf))

    t.up(extra_gw=("--public-if", "eth0", "--public-addr", t.topo.gateway_addr))
    t.wait_handshake()
    _, doc = status(home, t.env, "backend", *backend_args)
    tunnel = doc["sections"]["tunnel"]
    assert tunnel["state"] == "ok" and tunnel["interface"] == t.home_if and tunnel["up"] is True
    assert 0 <= tunnel["handshake_age"] < 60
    assert not any(p.startswith("tunnel") for p in doc["attention"])
    _, doc = status(gw, t.env, "gateway", "-c", str(gateway_cfg))
    tunnel = doc["sections"]["tunnel"]
    assert tunnel["state"] == "ok" and tunnel["interface"] == t.gw_if and 0 <= tunnel["handshake_age"] < 60

    t.down()
    code, doc = status(home, t.env, "backend", *backend_args)
    assert code == 1
    tunnel = doc["sections"]["tunnel"]
    assert tunnel["state"] == "attention" and tunnel["present"] is False
    assert f"{t.home_if} is down (configured in {t.home_conf})" in tunnel["summary"]
    code, doc = status(gw, t.env, "gateway", "-c", str(gateway_cfg))
    assert code == 1 and doc["sections"]["tunnel"]["state"] == "attention"
    assert f"tunnel: {t.gw_if} is down" in " ".join(doc["attention"])
