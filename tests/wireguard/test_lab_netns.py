"""The namespace lab's teardown: nothing of a lab survives it — normal exit, an exception, or SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.lab.netns import IFNAMSIZ, Lab, NETNS_RUN, home_behind_nat

from .tunnel_lab import Listener, connect, wait_for

pytestmark = pytest.mark.netns
ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _root():
    require_root()
    require_tool("ip", "nft")


def test_topology_nat_and_teardown_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            topo = home_behind_nat(lab)
            assert all(len(ns.name) <= IFNAMSIZ for ns in lab.namespaces)
            listener = Listener(topo.internet, (25,))
            assert connect(topo.home, topo.internet_addr, 25) == "OK 220 lab"
            # the internet host sees the router's public address: the home really is behind NAT
            wait_for(lambda: listener.seen() == [(25, topo.router_wan_addr)], 5, what="NATed connection")
            sleeper = topo.home.popen(["sleep", "300"])
            topo.home.etc_file("resolv.conf", "nameserver 198.51.100.1\n")
            assert topo.home.run(["cat", "/etc/resolv.conf"]).stdout == "nameserver 198.51.100.1\n"
            Path(f"/var/run/wireguard/{lab.prefix}zz.sock").parent.mkdir(parents=True, exist_ok=True)
            Path(f"/var/run/wireguard/{lab.prefix}zz.sock").touch()
            raise RuntimeError("boom")
    assert lab.leftovers() == []
    assert sleeper.poll() is not None and listener.proc.poll() is not None


def test_prefixes_are_unique():
    with Lab() as a, Lab() as b:
        assert len(a.prefix) == len(b.prefix) and a.prefix != b.prefix
        a.namespace("x")
        b.namespace("x")
    assert a.leftovers() == [] and b.leftovers() == []


def test_sigterm_still_tears_down():
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from tests.lab.netns import Lab;"
        "lab = Lab(); ns = lab.namespace('s'); ns.popen(['sleep', '300']);"
        "print(lab.prefix, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        prefix = proc.stdout.readline().strip()
        assert prefix and any(p.name.startswith(prefix) for p in NETNS_RUN.iterdir())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert not any(p.name.startswith(prefix) for p in NETNS_RUN.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
