"""A real rspamd for tests: Debian's /usr/bin/rspamd with Debian's stock /etc/rspamd, our ``local.d``
(backend.auth.rspamd.rspamd_local_config, offline) in a directory of its own, on its own ports.

    with Rspamd() as rs:
        rs.url                       # http://127.0.0.1:<port>: the normal worker (/checkv2, /ping)
        rs.controller                # "127.0.0.1:<port>": the controller, for rspamc -h (learning)
        rs.rspamc("learn_spam", msg) # rspamc against our controller
        rs.task_log("Q123")          # rspamd's log line for the message with that Queue-Id
        rs.redis.keys("BAYES_*")     # what it learned, in its own Redis
        rs.stop(); rs.start()        # down and back up on the same ports

    message bodies with GTUBE_REJECT / GTUBE_ADD_HEADER / GTUBE_REWRITE_SUBJECT / GTUBE_NO_ACTION
    get that action (rspamd's test patterns, enabled here only).

It never touches the system's rspamd service (Debian's package may have one enabled): our instance
has its own LOCAL_CONFDIR, DBDIR, RUNDIR and LOGDIR (``--var``), its own ports (the stock config
binds 11332-11334 on localhost; our local.d replaces the binds and turns the milter proxy off),
runs in the foreground (``-f``) in its own session, and ``stop()`` signals only that session.

No lookup leaves the machine: rspamd's resolver is RefusingDNS, a loopback DNS server of ours that
answers every query REFUSED at once (a dead port would make each lookup wait for its timeout, and
a check of a plain message take rspamd's 8 s task timeout; nsd would do, but its response rate
limiting drops answers at rspamd's ~6 lookups per message and a check then waits 2 s); the modules
that ask the internet are off. Pass ``nameserver`` ("host:port", e.g. the lab's nsd) to give rspamd
real zones (nsd's rate limiting then applies: fine for a few messages, not for a benchmark).

rspamd's Bayes statistics live in a redis-server of our own (RedisServer: a loopback port, a
directory of its own, nothing saved to disk), never the system's.

Start-up: rspamd compiles its URL suffix list and regular expressions with Hyperscan (about 12 s
on the lab machine); the compiled databases are kept in HS_CACHE (shared by every instance, keyed
by content), so every start after the first takes under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

import dns.exception
import dns.message
import dns.rcode

from backend.auth.rspamd import rspamd_local_config
from tests.lab.ports import free_port
from tests.lab.process import LabDaemon, stop_session

RSPAMD_BIN = "/usr/bin/rspamd"
RSPAMC_BIN = "/usr/bin/rspamc"
REDIS_BIN = "/usr/bin/redis-server"
REDIS_CLI_BIN = "/usr/bin/redis-cli"
STOCK_CONF = "/etc/rspamd/rspamd.conf"
USER = GROUP = "_rspamd"  # Debian's rspamd user; rspamd refuses to run its workers as root
HS_CACHE = Path(tempfile.gettempdir()) / "homemx-rspamd-hs-cache"
READY_TIMEOUT = 90.0  # a cold Hyperscan cache; a warm start takes under a second


# rspamd's GTUBE patterns (with enable_test_patterns): the message body gets the action named.
GTUBE_REJECT = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_ADD_HEADER = b"YJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_REWRITE_SUBJECT = b"ZJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_NO_ACTION = b"AJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


# Readiness probes run inside the namespace when rspamd does (``netns_exec``): exit status 0 = ready.
_HTTP_PING = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/ping", timeout=1) as r:
    sys.exit(0 if r.status == 200 and r.read().strip() == b"pong" else 1)
"""
_REDIS_PING = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as s:
    s.sendall(b"PING\\r\\n")
    sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
"""


def _in_netns(netns_exec: list[str], code: str, *args: str) -> bool:
    import sys

    r = subprocess.run(netns_exec + [sys.executable, "-c", code, *args], capture_output=True, timeout=10)
    return r.returncode == 0


class RspamdError(Exception):
    """rspamd did not start; the message carries the end of its own log."""


class RefusingDNS:
    """A DNS server on a loopback UDP port that answers every query REFUSED (RFC 1035 4.1.1 RCODE 5)
    at once, from a thread of the test process; ``close()`` stops it."""

    def __init__(self, address: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.2)  # how long close() may wait for the thread
        self.address, self.port = address, self.sock.getsockname()[1]
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="refusing-dns", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                reply = dns.message.make_response(dns.message.from_wire(data))
            except dns.exception.DNSException:
                continue  # not a query: no answer, as a real server would drop it
            reply.set_rcode(dns.rcode.REFUSED)
            self.queries += 1
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class RedisServer:
    """Our own redis-server on a loopback port, in the foreground in its own session, nothing
    persisted (``--save ""``); ``close()`` stops it."""

    def __init__(self, workdir: Path, address: str = "127.0.0.1", netns_exec: Sequence[str] = (), port: int | None = None):
        self.netns_exec = list(netns_exec)
        self.address = address
        self.port = port or (6379 if self.netns_exec else free_port(address))
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            REDIS_BIN, "--bind", address, "--port", str(self.port), "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--unixsocket", "",
            "--logfile", str(workdir / "redis.log"),
        ]
        self.proc = subprocess.Popen(self.netns_exec + cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RspamdError(f"redis-server did not start on {self}: {self.log()[-2000:]}")
            time.sleep(0.02)

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"

    def _pong(self) -> bool:
        if self.netns_exec:
            return _in_netns(self.netns_exec, _REDIS_PING, self.address, str(self.port))
        try:
            with socket.create_connection((self.address, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def keys(self, pattern: str = "*") -> list[str]:
        """The keys this Redis holds that match ``pattern`` (rspamd's Bayes: BAYES_SPAM_keys, learned_ids, RS_*)."""
        r = subprocess.run(self.netns_exec + [REDIS_CLI_BIN, "-h", self.address, "-p", str(self.port), "--raw", "KEYS", pattern],
                           capture_output=True, text=True, timeout=10, check=True)
        return r.stdout.split()

    def log(self) -> str:
        try:
            return (self.workdir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        stop_session(self.proc, grace=10)


class Rspamd(LabDaemon):
    """One rspamd instance with its own directories and ports; a context manager that always stops it
    (and its own RefusingDNS and RedisServer)."""

    def __init__(
        self,
        *,
        address: str = "127.0.0.1",
        nameserver: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        extra_config: Mapping[str, str] | None = None,
        netns_exec: Sequence[str] = (),
    ):
        self.address = address
        # In a namespace of the test's own, the whole port space is ours: rspamd's usual ports.
        self.netns_exec = list(netns_exec)
        if self.netns_exec and nameserver is None:
            raise ValueError("in a network namespace rspamd needs a nameserver there (e.g. the lab's nsd)")
        self.port = 11333 if self.netns_exec else free_port(address)
        self.controller_port = 11334 if self.netns_exec else free_port(address)
        self.nameserver = nameserver
        self.extra_config = dict(extra_config or {})
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="homemx-rspamd-"))
        self.proc: subprocess.Popen | None = None
        self._dns: RefusingDNS | None = None
        self.redis: RedisServer | None = None
        self.startup_seconds: float | None = None  # of the last start()

    @property
    def url(self) -> str:
        """The normal worker's base URL (what backend's [rspamd] url points at)."""
        return f"http://{self.address}:{self.port}"

    @property
    def controller(self) -> str:
        """The controller as ``host:port`` (rspamc -h; the web UI and /stat, /history)."""
        return f"{self.address}:{self.controller_port}"

    # ------------------------------------------------------------ files

    def _write(self) -> None:
        for sub in ("etc", "db", "run", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        HS_CACHE.mkdir(exist_ok=True)
        files = rspamd_local_config(redis=str(self.redis), nameservers=[self.nameserver], offline=True)
        lab = {
            "local.d/worker-normal.inc": f'bind_socket = "{self.address}:{self.port}";\ncount = 1;\n',
            "local.d/worker-controller.inc": f'bind_socket = "{self.address}:{self.controller_port}";\ncount = 1;\n',
            # The stock config's milter proxy would bind localhost:11332, where the system's rspamd listens.
            "local.d/worker-proxy.inc": "enabled = false;\n",
            "local.d/logging.inc": 'type = "file";\nfilename = "$LOGDIR/rspamd.log";\nlevel = "info";\n',
        }
        files.update(lab)
        files["local.d/options.inc"] = files.get("local.d/options.inc", "") + (
            f'hs_cache_dir = "{HS_CACHE}";\n'
            # GTUBE variants with other actions than reject (YJS...: add header, ZJS...: rewrite
            # subject, AJS...: no action; GTUBE_ADD_HEADER etc. below), so tests can ask for each.
            # Never on a real home: anyone could send them.
            "enable_test_patterns = true;\n"
        )
        files.update(self.extra_config)
        for rel, text in files.items():
            path = self.workdir / "etc" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        # The workers run as _rspamd and write the statistics, history and Hyperscan databases.
        for path in [self.workdir, HS_CACHE, *self.workdir.rglob("*")]:
            shutil.chown(path, USER, GROUP)

    def log(self) -> str:
        """rspamd's log so far (what it printed before its logger was up, then its log file)."""
        text = ""
        for name in ("stdout.log", "log/rspamd.log"):
            try:
                text += (self.workdir / name).read_text(errors="replace")
            except OSError:
                pass
        return text

    def task_log(self, queue_id: str) -> str:
        """rspamd's one summary line for the message checked with ``Queue-Id: queue_id`` ("" if none):
        it names the client ip, user, envelope sender and recipients, action, score and symbols."""
        mark = f"qid: <{queue_id}>"
        for line in self.log().splitlines():
            if "rspamd_task_write_log" in line and mark in line:
                return line
        return ""

    # ------------------------------------------------------------ life cycle

    def start(self) -> "Rspamd":
        if self.proc is not None:
            raise RspamdError("already started")
        if self.nameserver is None:
            self._dns = RefusingDNS(self.address)
            self.nameserver = f"{self._dns.address}:{self._dns.port}"
        if self.redis is None:
            self.redis = RedisServer(self.workdir / "redis", self.address, self.netns_exec)
        self._write()
        d = self.workdir
        cmd = [
            RSPAMD_BIN, "-f", "-u", USER, "-g", GROUP, "-c", STOCK_CONF,
            f"--var=LOCAL_CONFDIR={d / 'etc'}", f"--var=DBDIR={d / 'db'}",
            f"--var=RUNDIR={d / 'run'}", f"--var=LOGDIR={d / 'log'}",
        ]
        started = time.monotonic()
        with open(d / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                self.netns_exec + cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=d, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException as e:
            self.stop()
            tail = "\n".join(self.log().splitlines()[-20:])
            raise RspamdError(f"rspamd did not start on {self.url}: {e}\n{tail}") from None
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RspamdError(f"rspamd exited with {self.proc.returncode}")
            if self._pong(self.url) and self._pong(f"http://{self.controller}"):
                return
            time.sleep(0.05)
        raise RspamdError("no answer to /ping within the timeout")

    def _pong(self, base: str) -> bool:
        if self.netns_exec:
            return _in_netns(self.netns_exec, _HTTP_PING, base)
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=1) as r:
                return r.status == 200 and r.read().strip() == b"pong"
        except OSError:
            return False

    def stop(self) -> None:
        """Stop rspamd and every process of its session (its workers). Safe to call twice; keeps the
        directories, ports, resolver and Redis (what it learned), so ``start()`` brings the same
        instance back."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # SIGTERM to the main process: it stops its workers and waits for them.
        stop_session(proc, grace=10)

    def close(self) -> None:
        self.stop()
        if self._dns is not None:
            self._dns.close()
            self._dns = None
            self.nameserver = None
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


    # ------------------------------------------------------------ clients

    def rspamc(self, command: str, message: bytes, *, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """``rspamc -h <controller> <command>`` with ``message`` on stdin (learn_spam, learn_ham, ...)."""
        return subprocess.run(
            self.netns_exec + [RSPAMC_BIN, "-h", self.controller, command], input=message, capture_output=True, timeout=timeout
        )

    def stat(self) -> dict:
        """The controller's /stat (scanned and learned counts, per-action totals)."""
        with urllib.request.urlopen(f"http://{self.controller}/stat", timeout=5) as r:
            return json.load(r)
