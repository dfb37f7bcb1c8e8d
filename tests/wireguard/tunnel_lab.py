"""Shared helpers for the tunnel acceptance tests: configs written by this package, the real CLI under `ip netns exec`, TCP probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.lab.netns import Lab, Namespace, Topology, home_behind_nat

GW_TUN = "10.77.0.1"
HOME_TUN = "10.77.0.2"
LISTEN_PORT = 51820  # inside the gateway namespace only


def wait_for(pred, timeout: float, step: float = 0.05, what: str = "condition"):
    """Poll until ``pred()`` is truthy; returns its value or raises AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


@dataclass
class TunnelLab:
    topo: Topology
    gw_if: str
    home_if: str
    gw_conf: Path
    home_conf: Path
    env: dict

    def cli(self, ns: Namespace, role: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """The real `homemx-gateway`/`homemx-backend tunnel` command, run as a user would: in the namespace, as root."""
        exe = Path(sys.executable).parent / f"homemx-{role}"
        r = ns.run([str(exe), "tunnel", *argv], check=False, env=self.env, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"tunnel {' '.join(argv)} in {ns.name} failed: {r.stderr}{r.stdout}")
        return r

    def up(self, extra_gw: tuple[str, ...] = ()) -> None:
        self.cli(self.topo.gateway, "gateway", "up", "-c", str(self.gw_conf), *extra_gw)
        self.cli(self.topo.home, "backend", "up", "-c", str(self.home_conf))

    def down(self) -> None:
        self.cli(self.topo.home, "backend", "down", "-c", str(self.home_conf))
        self.cli(self.topo.gateway, "gateway", "down", "-c", str(self.gw_conf))

    def status(self, side: str) -> dict:
        ns, role, conf = ((self.topo.home, "backend", self.home_conf) if side == "home"
                          else (self.topo.gateway, "gateway", self.gw_conf))
        r = self.cli(ns, role, "status", "--json", "-c", str(conf), check=False)
        return json.loads(r.stdout)

    def wait_handshake(self, timeout: float = 20.0) -> dict:
        return wait_for(lambda: (s := self.status("home")).get("handshake_age") is not None and s,
                        timeout, 0.1, "a WireGuard handshake seen by `tunnel status`")


def make_tunnel_lab(lab: Lab) -> TunnelLab:
    """Topology plus both wg-quick files, written by `tunnel keygen`/`tunnel config` (no tunnel yet)."""
    topo = home_behind_nat(lab)
    work = lab.workdir
    env = dict(os.environ, HOMEMX_TUNNEL_STATE_DIR=str(work / "state"), PYTHONPATH=str(Path(__file__).parents[2]))
    gw_if, home_if = lab.name("gw"), lab.name("hw")
    t = TunnelLab(topo, gw_if, home_if, work / f"{gw_if}.conf", work / f"{home_if}.conf", env)
    gk, hk, psk = work / "gw.key", work / "home.key", work / "psk"
    gpub = t.cli(topo.gateway, "gateway", "keygen", "-k", str(gk), "--psk-file", str(psk)).stdout.strip()
    hpub = t.cli(topo.home, "backend", "keygen", "-k", str(hk)).stdout.strip()
    t.cli(topo.gateway, "gateway", "config", "-c", str(t.gw_conf), "-k", str(gk), "--peer-public-key", hpub,
          "--psk-file", str(psk), "--address", f"{GW_TUN}/24", "--peer-address", HOME_TUN,
          "--listen-port", str(LISTEN_PORT), "--public-if", topo.gateway_if, "--public-addr", topo.gateway_addr)
    t.cli(topo.home, "backend", "config", "-c", str(t.home_conf), "-k", str(hk), "--peer-public-key", gpub,
          "--psk-file", str(psk), "--address", f"{HOME_TUN}/24",
          "--endpoint", f"{topo.gateway_addr}:{LISTEN_PORT}")
    return t


# A listener for the "internet" host: accepts on the given ports, prints "PORT PEER-IP" per connection.
LISTENER = r"""
import socket, sys, selectors
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16); sel.register(s, selectors.EVENT_READ, port)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, addr = key.fileobj.accept()
        print(key.data, addr[0], flush=True)
        c.sendall(b"220 lab\r\n"); c.close()
"""

# A client for home: connect (optionally from a source address); prints the greeting or the error.
CLIENT = r"""
import socket, sys
dst, port, src, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(); s.settimeout(timeout)
if src != "-":
    s.bind((src, 0))
try:
    s.connect((dst, port)); print("OK", s.recv(100).decode().strip())
except OSError as e:
    print("FAIL", type(e).__name__); sys.exit(1)
"""


class Listener:
    """The internet host's TCP listener; ``seen()`` returns the (port, source address) pairs so far."""

    def __init__(self, ns: Namespace, ports: tuple[int, ...]):
        self.proc = ns.popen([sys.executable, "-u", "-c", LISTENER, *map(str, ports)], stdout=subprocess.PIPE,
                             text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.lines: list[tuple[int, str]] = []
        os.set_blocking(self.proc.stdout.fileno(), False)

    def seen(self) -> list[tuple[int, str]]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return self.lines
            port, ip = line.split()
            self.lines.append((int(port), ip))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def connect(ns: Namespace, dst: str, port: int, src: str | None = None, timeout: float = 5.0) -> str:
    r = ns.run([sys.executable, "-c", CLIENT, dst, str(port), src or "-", str(timeout)], check=False,
               timeout=timeout + 10)
    return r.stdout.strip()
