"""A real authoritative DNS server for tests: Debian's nsd serving zones given as text.

Use it on loopback (a 127.x.y.z address and an OS-chosen free port) for unit and integration
tests, or inside a network namespace on port 53 for the end-to-end lab (``netns_exec`` is the
command prefix, e.g. ``["ip", "netns", "exec", "lab-internet"]``). It always runs in the
foreground (``-d``) in its own session, so ``stop()`` can end it and every child it forked.

    with NSD({"example.org": zone_text("example.org", records)}) as ns:
        resolver = ns.resolver()            # dnspython resolver pointed at it
        ns.reload({"example.org": other})   # new zone text, same address and port
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from tests.lab.ports import free_port
from tests.lab.process import LabDaemon

NSD_BIN = "/usr/sbin/nsd"
NSD_CHECKZONE_BIN = "/usr/sbin/nsd-checkzone"
DIG_BIN = "dig"

READY_TIMEOUT = 15.0


# nsd's main process exits on SIGTERM without waiting for its server child, which then becomes a
# zombie of pid 1 (and some container inits never reap). This wrapper is a child subreaper
# (prctl PR_SET_CHILD_SUBREAPER): it runs nsd, forwards SIGTERM, and reaps every descendant.
_REAPER = r"""
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
p = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: p.terminate())
rc = p.wait()
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
sys.exit(rc)
"""


class NSDError(Exception):
    """nsd refused a zone or did not start; the message carries nsd's own words."""


def zone_text(origin: str, records: str, *, serial: int = 1, ttl: int = 300, ns_address: str | None = None) -> str:
    """A complete zone: $ORIGIN/$TTL, SOA and NS (ns.ORIGIN, with glue when ``ns_address`` is set), then ``records``."""
    origin = origin.rstrip(".") + "."
    head = [
        f"$ORIGIN {origin}",
        f"$TTL {ttl}",
        f"@\tIN\tSOA\tns.{origin} hostmaster.{origin} {serial} 3600 600 86400 60",
        f"@\tIN\tNS\tns.{origin}",
    ]
    if ns_address:
        rtype = "AAAA" if ipaddress.ip_address(ns_address).version == 6 else "A"
        head.append(f"ns.{origin}\tIN\t{rtype}\t{ns_address}")
    return "\n".join(head) + "\n" + records.rstrip("\n") + "\n"


def reverse_zone_name(address: str) -> str:
    """The reverse zone that holds the PTR of ``address``: its /24 (IPv4) or /64 (IPv6) arpa zone."""
    ip = ipaddress.ip_address(address)
    labels = ip.reverse_pointer.split(".")
    # IPv4: drop the last octet label; IPv6: drop the 16 nibbles of the interface identifier.
    return ".".join(labels[1:] if ip.version == 4 else labels[16:])


def server_resolver(address: str, port: int, timeout: float = 3.0):
    """A dnspython resolver that asks only the DNS server at ``address``:``port``, without a cache
    (tests change zones and must see the new answers)."""
    import dns.resolver

    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [address]
    r.port = port
    r.timeout = r.lifetime = timeout
    r.cache = None
    return r


class NSD(LabDaemon):
    """One nsd instance with its own working directory; a context manager that always stops it."""

    def __init__(
        self,
        zones: Mapping[str, str],
        *,
        address: str = "127.0.0.1",
        port: int | None = None,
        netns_exec: Sequence[str] = (),
        workdir: str | os.PathLike[str] | None = None,
    ):
        self.zones = dict(zones)
        self.address = str(ipaddress.ip_address(address))
        self.netns_exec = list(netns_exec)
        if port is None:
            # Inside a namespace the test owns the whole port space: use the real DNS port there.
            port = 53 if self.netns_exec else free_port(self.address, udp=True)
        self.port = port
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="homemx-nsd-"))
        self.proc: subprocess.Popen | None = None

    # ------------------------------------------------------------ files

    def _zone_file(self, name: str) -> Path:
        return self.workdir / f"{name.rstrip('.').lower() or 'root'}.zone"

    def _write(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name, text in self.zones.items():
            path = self._zone_file(name)
            path.write_text(text)
            # Refuse a bad zone here with nsd's own message rather than as a silent SERVFAIL later.
            r = subprocess.run([NSD_CHECKZONE_BIN, name, str(path)], capture_output=True, text=True)
            if r.returncode != 0:
                raise NSDError(f"zone {name} rejected by nsd-checkzone: {(r.stdout + r.stderr).strip()}")
        ip6 = ipaddress.ip_address(self.address).version == 6
        w = self.workdir
        conf = [
            "server:",
            f"  ip-address: {self.address}@{self.port}",
            f"  do-ip4: {'no' if ip6 else 'yes'}",
            f"  do-ip6: {'yes' if ip6 else 'no'}",
            '  username: ""',
            '  chroot: ""',
            '  database: ""',
            f'  zonesdir: "{w}"',
            f'  zonelistfile: "{w}/zone.list"',
            f'  pidfile: "{w}/nsd.pid"',
            f'  xfrdfile: "{w}/xfrd.state"',
            f'  xfrdir: "{w}"',
            f'  logfile: "{w}/nsd.log"',
            "  server-count: 1",
            "  verbosity: 1",
            # Response rate limiting off (nsd.conf(5)): every test client is one address, and the
            # inbound checks alone ask ~6 names per message; nsd's 200 qps default dropped answers
            # (a 2 s wait for the retry) where a real deployment's caching resolver never would.
            "  rrl-ratelimit: 0",
            "remote-control:",
            "  control-enable: no",
        ]
        for name in self.zones:
            conf += ["zone:", f"  name: {name}", f'  zonefile: "{self._zone_file(name)}"']
        (w / "nsd.conf").write_text("\n".join(conf) + "\n")

    def log(self) -> str:
        try:
            return (self.workdir / "nsd.log").read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------ life cycle

    def start(self) -> "NSD":
        if self.proc is not None:
            raise NSDError("already started")
        self._write()
        cmd = [*self.netns_exec, sys.executable, "-c", _REAPER, NSD_BIN, "-d", "-c", str(self.workdir / "nsd.conf")]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready()
        except BaseException:
            out = self.stop()
            raise NSDError(f"nsd did not start on {self.address}@{self.port}: {out.strip()} {self.log().strip()}")
        return self

    def _wait_ready(self) -> None:
        # Ask through dig run with the same prefix, so readiness is checked from where nsd
        # listens (inside its namespace when there is one).
        zone = next(iter(self.zones), ".")
        deadline = time.monotonic() + READY_TIMEOUT
        cmd = [*self.netns_exec, DIG_BIN, "+time=1", "+tries=1", "+short", "-p", str(self.port), f"@{self.address}", zone, "SOA"]
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise NSDError("nsd exited")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                return
            time.sleep(0.05)
        raise NSDError("no answer within timeout")

    def stop(self) -> str:
        """Stop nsd and everything it forked; return what it printed. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        # SIGTERM to the main process only: it stops and reaps its own server/xfrd children
        # (signalling the whole group would leave them as zombies of pid 1).
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
        # Children left in the session (nsd's xfrd/server processes) go too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return (out or b"").decode(errors="replace")

    def reload(self, zones: Mapping[str, str] | None = None) -> None:
        """Serve new zone text (replacing all zones when given), same address and port.

        A restart rather than SIGHUP: nsd's reload keys on file mtimes and serials, and a test
        that rewrites a zone within the same second must never see the old data.
        """
        if zones is not None:
            self.zones = dict(zones)
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


    # ------------------------------------------------------------ clients

    def resolver(self, timeout: float = 3.0):
        """A dnspython resolver that asks only this server (from the current namespace)."""
        return server_resolver(self.address, self.port, timeout)
