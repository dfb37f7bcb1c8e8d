"""A real systemd in a container: a cached debootstrap Debian root booted by systemd-nspawn in a lab namespace.

    root = debian_root()                                   # build/nspawn/<key>/root, made once
    with Container(root, workdir, "hxg", "/run/netns/hx…g") as c:
        c.boot()                                           # PID 1 is systemd; waits until it is up
        c.run(["systemctl", "is-active", "ssh"])           # a command inside (nsenter)
        c.reboot()                                         # `systemctl reboot`, then boot again

The root is made by ``debootstrap --variant=minbase`` from Debian's packages and cached under the
project's ``build/`` (gitignored), keyed by suite, mirror and package list, so only the first run
pays for it (about 80 s here). Each container boots an overlayfs of that root with its own upper
directory: what it writes (provisioning, logs) survives a reboot of the container and vanishes with
the work directory. The container joins a network namespace the test made (``--network-namespace-path``):
its sshd and daemons are reachable there like a host's, and nothing else of the host's network is
visible. This machine's PID 1 is not systemd, so nothing is registered with machined
(``--register=no``, ``--keep-unit``): the container is this process's child, stopped by signalling
its nspawn process (``close``), which also unmounts the overlay. Nothing of the host's own systemd or
services is touched.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "nspawn"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What a homemx host needs when provisioning installs nothing (install_packages = false): systemd as
# PID 1, sshd for Fabric, Python for the venv, the tunnel's tools (wireguard-go: the container has no
# kernel module of its own), Dovecot with Pigeonhole (sievec) for the home's IMAP.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv", "wireguard-tools",
            "wireguard-go", "nftables", "iproute2", "dovecot-imapd", "dovecot-sieve", "procps", "kmod")
REBOOT_EXIT = 133  # systemd-nspawn's exit status when the container's systemd asked for a reboot


class ContainerError(RuntimeError):
    pass


_live: "weakref.WeakSet[Container]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """A test process that exits without its finalizers still stops its containers and unmounts
    their overlays (at exit, or on SIGTERM/SIGHUP before the lab's handler deletes the namespaces)."""
    for c in list(_live):
        c.close()


_previous: dict[int, object] = {}


def _on_signal(signum, frame):
    _close_all()
    prev = _previous.get(signum)
    if callable(prev):
        prev(signum, frame)  # the lab's handler: its namespaces, then the signal's default action
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        _previous[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)


def debian_root(packages: tuple[str, ...] = PACKAGES, suite: str = SUITE, mirror: str = MIRROR,
                cache: Path = CACHE, timeout: float = 900) -> Path:
    """The cached root for this package list, made with debootstrap the first time (under a lock:
    concurrent runs wait for one build instead of making two)."""
    key = hashlib.sha256("\n".join([suite, mirror, *sorted(packages)]).encode()).hexdigest()[:12]
    base = cache / f"{suite}-{key}"
    root, done = base / "root", base / "complete"
    if done.exists():
        return root
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        shutil.rmtree(root, ignore_errors=True)  # a build that was interrupted
        tmp = base / "root.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", suite, str(tmp),
                            mirror], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ContainerError(f"debootstrap {suite} failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
        # the container's hostname comes from nspawn's --hostname, its machine id from nspawn (one per
        # container: two booted from this root must not share one)
        (tmp / "etc" / "hostname").unlink(missing_ok=True)
        (tmp / "etc" / "machine-id").write_text("")
        (tmp / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)  # systemd falls back to it
        tmp.rename(root)
        done.write_text(" ".join(packages) + "\n")
    return root


class Container:
    """One systemd-nspawn container booted from an overlay of ``lower`` in network namespace ``netns``."""

    def __init__(self, lower: Path, workdir: Path, name: str, netns_path: str):
        self.lower, self.name, self.netns_path = lower, name, netns_path
        self.dir = workdir / f"nspawn-{name}"
        self.root = self.dir / "root"
        self.log = self.dir / "console.log"
        self.proc: subprocess.Popen | None = None
        self.leader = 0  # the container's PID 1 (systemd) as the host sees it
        self._mounted = False
        _live.add(self)
        _install_handlers()

    # ------------------------------------------------------------ life cycle

    def mount(self) -> None:
        """The container's root: an overlay of the cached root with this container's own upper dir."""
        if self._mounted:
            return
        for d in ("upper", "work", "root"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}",
                        str(self.root)], check=True, capture_output=True, text=True)
        self._mounted = True

    def mask(self, *units: str) -> None:
        """Units of the root this container must not run (before boot: a link to /dev/null)."""
        self.mount()
        d = self.path("/etc/systemd/system")
        for unit in units:
            (d / unit).unlink(missing_ok=True)
            (d / unit).symlink_to("/dev/null")

    def boot(self, timeout: float = 60) -> None:
        """Start systemd-nspawn --boot and wait until the container's systemd finished starting up
        (``running``, or ``degraded`` when some unit failed: the caller looks at which)."""
        self.mount()
        hosts = self.path("/etc/hosts")
        if not hosts.exists():  # debootstrap writes none; as Debian's installer does, the host's own name resolves
            hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {self.name}\n::1 localhost ip6-localhost ip6-loopback\n")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(self.root), f"--machine={self.name}", f"--hostname={self.name}",
             f"--network-namespace-path={self.netns_path}", "--register=no", "--keep-unit",
             # nspawn keeps CAP_NET_ADMIN only with a network namespace of its own making: this one is
             # the container's all the same (the test made it for it), and the tunnel and nftables need it
             "--capability=CAP_NET_ADMIN",
             "--bind=/dev/net/tun",  # wireguard-go's TUN device
             "--resolv-conf=off", "--timezone=off", "--boot", "systemd.firstboot=off"],
            stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            # and /proc/sys/net writable for the same reason (the gateway's tunnel turns on forwarding)
            env={**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"})
        end = time.monotonic() + timeout
        self.leader = 0
        while not self.leader:
            self.leader = self._find_leader()
            if self.proc.poll() is not None:
                raise ContainerError(f"{self.name}: systemd-nspawn exited {self.proc.returncode}: {self.console()}")
            if time.monotonic() > end:
                raise ContainerError(f"{self.name}: no systemd in the container after {timeout}s: {self.console()}")
            time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded"):
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                         timeout=max(1.0, end - time.monotonic()))
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > end or self.proc.poll() is not None:
                raise ContainerError(f"{self.name}: system state {state!r}, not up after {timeout}s: {self.console()}")
            time.sleep(0.2)  # the bus was not there yet

    def _find_leader(self) -> int:
        """nspawn's child that runs systemd (nspawn forks once or twice before it execs PID 1)."""
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir()
                        for k in (t / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            for k in kids:
                try:
                    if Path(f"/proc/{k}/comm").read_text().strip() == "systemd":
                        return k
                except FileNotFoundError:
                    continue
            todo += kids
        return 0

    def reboot(self, timeout: float = 60) -> None:
        """``systemctl reboot`` inside; nspawn exits with 133 as systemd-nspawn@.service expects; boot again."""
        self.run(["systemctl", "reboot"], check=False)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"{self.name}: did not reboot within {timeout}s: {self.console()}") from None
        if rc != REBOOT_EXIT:
            raise ContainerError(f"{self.name}: systemd-nspawn exited {rc} on reboot, not {REBOOT_EXIT}")
        self.boot(timeout)

    def close(self, timeout: float = 5) -> None:
        """Power the container off (SIGTERM to nspawn: it asks systemd for a clean shutdown), kill it
        if that takes too long, unmount the overlay and remove the work directory. Safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.leader:  # PID 1 of its PID namespace: everything in the container dies with it
                    try:
                        os.kill(self.leader, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._mounted:
            r = subprocess.run(["umount", str(self.root)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True)
            self._mounted = False
        shutil.rmtree(self.dir, ignore_errors=True)
        _live.discard(self)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ inside

    def path(self, p: str) -> Path:
        """A path of the container's file system, as the host sees it (the overlay's merged view)."""
        return self.root / p.lstrip("/")

    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """A command in every namespace of the container (as root, outside any of its units)."""
        # its own session: a `kill 0` (or a stray signal to our process group) in there cannot reach the test
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *argv], capture_output=True, text=True,
                           timeout=timeout, start_new_session=True, **kw)
        if check and r.returncode != 0:
            raise ContainerError(f"{self.name}: {' '.join(argv)} exited {r.returncode}: {r.stderr or r.stdout}")
        return r

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        out = self.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def console(self, tail: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""
