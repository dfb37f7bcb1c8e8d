"""Network-namespace lab: short unique namespaces, veth links, a bridged "internet", a NAT router, and a teardown that always runs.

Reusable by every lab test and benchmark:

    with Lab() as lab:
        topo = home_behind_nat(lab)          # internet / gateway / router (NAT) / home
        topo.home.run(["ping", "-c1", topo.internet_addr])
        p = topo.internet.popen(["some-daemon"])   # killed at teardown
        topo.home.etc_file("resolv.conf", "nameserver 198.51.100.1\n")

Names: every namespace, /etc/netns dir, wireguard-go socket and work dir of one Lab starts with its
prefix ("hx" + pid and a counter in fixed-width base 36, 9 characters), so concurrent test runs never collide and a
teardown removes only its own things. Interface names stay below IFNAMSIZ (15 characters).
Teardown (``close``; also from ``with``, atexit and SIGTERM/SIGHUP): kill everything still running
in the namespaces (``ip netns pids``), delete them, remove their /etc/netns dirs, wireguard-go
sockets and the work dir. Addresses are RFC 5737 documentation ranges: nothing leaves the machine.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
WG_RUN_DIR = Path("/var/run/wireguard")
IFNAMSIZ = 15  # usable characters in an interface name

_counter = itertools.count()
_live: "set[Lab]" = set()
_lock = threading.Lock()
_handlers_installed = False


def _b36(n: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(width):
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out


def unique_prefix(tag: str = "hx") -> str:
    """A prefix no other live Lab (in this or another process) uses: tag + pid + counter, base 36.

    Fixed widths (pid_max 4194304 < 36**5) so no prefix is the start of another: a teardown that
    globs ``prefix*`` can only ever match its own lab's names.
    """
    while True:
        prefix = f"{tag}{_b36(os.getpid(), 5)}{_b36(next(_counter) % 36**2, 2)}"
        if not any(p.name.startswith(prefix) for p in (NETNS_RUN.iterdir() if NETNS_RUN.exists() else [])):
            return prefix


def _close_all() -> None:
    for lab in list(_live):
        lab.close()


def _on_signal(signum, frame):
    _close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    # Ctrl-C raises KeyboardInterrupt, which runs `with` exits and fixture finalizers; SIGTERM and
    # SIGHUP would kill us without cleanup, so they clean first. Only replace default handlers.
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


def _run(cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


class Namespace:
    """One network namespace of a Lab: run commands and processes in it, give it /etc files."""

    def __init__(self, lab: "Lab", name: str):
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name})"

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str] | str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run to completion inside the namespace (a string runs under sh -c); output is captured as text."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        return _run(self.cmd(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start a process inside the namespace; the Lab stops it at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.cmd(argv), **kw)
        self.lab._procs.append(proc)
        return proc

    def etc_file(self, relpath: str, text: str, mode: int = 0o644) -> Path:
        """Write /etc/netns/NAME/relpath: `ip netns exec` shows it as /etc/relpath inside."""
        path = NETNS_ETC / self.name / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, mode)
        return path

    def sysctl(self, key: str, value: str) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def pids(self) -> list[int]:
        r = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []

    def link_names(self) -> list[str]:
        r = self.run(["ip", "-o", "link", "show"], check=False)
        return [line.split(": ")[1].split("@")[0] for line in r.stdout.splitlines() if ": " in line]


class Lab:
    """A set of namespaces with one unique prefix, torn down as a whole (see the module docstring)."""

    def __init__(self, tag: str = "hx"):
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root")
        _install_handlers()
        self.prefix = unique_prefix(tag)
        self.namespaces: list[Namespace] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        with _lock:
            _live.add(self)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def name(self, role: str) -> str:
        """A name unique to this lab: prefix + role, short enough for an interface name."""
        name = f"{self.prefix}{role}"
        if len(name) > IFNAMSIZ:
            raise ValueError(f"{name!r} is longer than {IFNAMSIZ} characters: use a shorter role")
        return name

    def namespace(self, role: str) -> Namespace:
        ns = Namespace(self, self.name(role))
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def veth(self, a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
        """A veth pair created directly in its two namespaces (no name ever exists in the host's)."""
        _run(["ip", "-n", a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name])
        a.run(["ip", "link", "set", a_if, "up"])
        b.run(["ip", "link", "set", b_if, "up"])

    def bridge(self, ns: Namespace, name: str = "br0") -> str:
        ns.run(["ip", "link", "add", name, "type", "bridge"])
        ns.run(["ip", "link", "set", name, "up"])
        return name

    def attach(self, ns: Namespace, ifname: str, bridge_ns: Namespace, bridge: str, port_if: str) -> None:
        """Connect ``ns`` to a bridge in ``bridge_ns`` through a veth (``port_if`` is the bridge side)."""
        self.veth(ns, ifname, bridge_ns, port_if)
        bridge_ns.run(["ip", "link", "set", port_if, "master", bridge])

    def close(self) -> None:
        """Tear everything down; safe to call twice and after partial set-up."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for ns in self.namespaces:
            self._kill_all(ns)
        for proc in self._procs:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=2)
        for ns in self.namespaces:
            _run(["ip", "netns", "del", ns.name], check=False)
            shutil.rmtree(NETNS_ETC / ns.name, ignore_errors=True)
        if WG_RUN_DIR.exists():
            for sock in WG_RUN_DIR.glob(f"{self.prefix}*.sock"):
                sock.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        with _lock:
            _live.discard(self)

    @staticmethod
    def _kill_all(ns: Namespace) -> None:
        pids = ns.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                pids = ns.pids()
                if not pids:
                    return
                time.sleep(0.02)

    def leftovers(self) -> list[str]:
        """What of this lab still exists on the host (empty after a good teardown): for tests of teardown."""
        out = [str(p) for p in NETNS_RUN.glob(f"{self.prefix}*")] if NETNS_RUN.exists() else []
        out += [str(p) for p in NETNS_ETC.glob(f"{self.prefix}*")] if NETNS_ETC.exists() else []
        out += [str(p) for p in WG_RUN_DIR.glob(f"{self.prefix}*.sock")] if WG_RUN_DIR.exists() else []
        if self.workdir.exists():
            out.append(str(self.workdir))
        return out


# ---------------------------------------------------------------- the standard homemx topology

INTERNET_NET = ipaddress.ip_network("198.51.100.0/24")  # RFC 5737 TEST-NET-2: "the internet"
HOME_NET = ipaddress.ip_network("192.0.2.0/24")  # RFC 5737 TEST-NET-1: the home LAN behind NAT


@dataclass
class Topology:
    """internet (bridge + a host), gateway (public address), router (NAT) and home behind it."""

    lab: Lab
    internet: Namespace
    gateway: Namespace
    router: Namespace
    home: Namespace
    internet_addr: str = "198.51.100.1"  # a host in "the internet" (remote MTA, DNS, ...)
    gateway_addr: str = "198.51.100.10"  # the VPS's public address
    router_wan_addr: str = "198.51.100.20"  # the home's public (NAT) address
    router_lan_addr: str = "192.0.2.1"
    home_addr: str = "192.0.2.2"
    gateway_if: str = "eth0"  # the gateway's public interface
    home_if: str = "eth0"


def home_behind_nat(lab: Lab) -> Topology:
    """Build internet / gateway / router / home. Home's default route goes via the NAT router."""
    inet = lab.namespace("i")
    gw = lab.namespace("g")
    rt = lab.namespace("r")
    home = lab.namespace("h")
    topo = Topology(lab, inet, gw, rt, home)
    br = lab.bridge(inet, "br0")
    plen = INTERNET_NET.prefixlen
    inet.run(["ip", "addr", "add", f"{topo.internet_addr}/{plen}", "dev", br])
    lab.attach(gw, "eth0", inet, br, "pg")
    gw.run(["ip", "addr", "add", f"{topo.gateway_addr}/{plen}", "dev", "eth0"])
    # The internet host is the "upstream" of everyone on the segment (a default route so that
    # source selection and route lookups behave as on a real VPS).
    gw.run(["ip", "route", "add", "default", "via", topo.internet_addr])
    lab.attach(rt, "wan", inet, br, "pr")
    rt.run(["ip", "addr", "add", f"{topo.router_wan_addr}/{plen}", "dev", "wan"])
    rt.run(["ip", "route", "add", "default", "via", topo.internet_addr])
    lab.veth(rt, "lan", home, "eth0")
    rt.run(["ip", "addr", "add", f"{topo.router_lan_addr}/{HOME_NET.prefixlen}", "dev", "lan"])
    home.run(["ip", "addr", "add", f"{topo.home_addr}/{HOME_NET.prefixlen}", "dev", "eth0"])
    home.run(["ip", "route", "add", "default", "via", topo.router_lan_addr])
    rt.sysctl("net.ipv4.ip_forward", "1")
    rt.run(["nft", "-f", "-"], input=(
        "table ip homenat {\n"
        "  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        '    oifname "wan" masquerade\n  }\n}\n'))
    return topo
