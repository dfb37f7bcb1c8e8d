"""A real rspamd for tests: Debian's /usr/bin/rspamd with Debian's stock /etc/rspamd, our ``local.d``
(backend.auth.rspamd.rspamd_local_config, offline) in a directory of its own, on its own ports.

    with Rspamd() as rs:
        rs.url                       # http://127.0.0.1:<port>: the normal worker (/checkv2, /ping)
        rs.controller                # "127.0.0.1:<port>": the controller, for rspamc -h (learning)
        rs.rspamc("learn_spam", msg) # rspamc against our controller
        rs.task_log("Q123")          # rspamd's log line for the message with that Queue-Id
        rs.stop(); rs.start()        # down and back up on the same ports

It never touches the system's rspamd service (Debian's package may have one enabled): our instance
has its own LOCAL_CONFDIR, DBDIR, RUNDIR and LOGDIR (``--var``), its own ports (the stock config
binds 11332-11334 on localhost; our local.d replaces the binds and turns the milter proxy off),
runs in the foreground (``-f``) in its own session, and ``stop()`` signals only that session.

No lookup leaves the machine: rspamd's resolver is our own nsd, which serves one placeholder zone
and answers REFUSED to everything else at once (a dead port would make each lookup wait for its
timeout, and a check of a plain message take rspamd's 8 s task timeout); the modules that ask the
internet are off. Pass ``nameserver`` ("host:port", e.g. the lab's nsd) to give rspamd real zones.

Start-up: rspamd compiles its URL suffix list and regular expressions with Hyperscan (about 12 s
on the lab machine); the compiled databases are kept in HS_CACHE (shared by every instance, keyed
by content), so every start after the first takes under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Mapping

from backend.auth.rspamd import rspamd_local_config
from tests.lab.nsd import NSD, zone_text
from tests.lab.ports import free_port

RSPAMD_BIN = "/usr/bin/rspamd"
RSPAMC_BIN = "/usr/bin/rspamc"
STOCK_CONF = "/etc/rspamd/rspamd.conf"
USER = GROUP = "_rspamd"  # Debian's rspamd user; rspamd refuses to run its workers as root
HS_CACHE = Path(tempfile.gettempdir()) / "homemx-rspamd-hs-cache"
READY_TIMEOUT = 90.0  # a cold Hyperscan cache; a warm start takes under a second
PLACEHOLDER_ZONE = "rspamd-lab.invalid"


class RspamdError(Exception):
    """rspamd did not start; the message carries the end of its own log."""


class Rspamd:
    """One rspamd instance with its own directories and ports; a context manager that always stops it
    (and its own nsd)."""

    def __init__(
        self,
        *,
        address: str = "127.0.0.1",
        nameserver: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        extra_config: Mapping[str, str] | None = None,
    ):
        self.address = address
        self.port = free_port(address)
        self.controller_port = free_port(address)
        self.nameserver = nameserver
        self.extra_config = dict(extra_config or {})
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="homemx-rspamd-"))
        self.proc: subprocess.Popen | None = None
        self._nsd: NSD | None = None
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
        files = rspamd_local_config(nameservers=[self.nameserver], offline=True)
        lab = {
            "local.d/worker-normal.inc": f'bind_socket = "{self.address}:{self.port}";\ncount = 1;\n',
            "local.d/worker-controller.inc": f'bind_socket = "{self.address}:{self.controller_port}";\ncount = 1;\n',
            # The stock config's milter proxy would bind localhost:11332, where the system's rspamd listens.
            "local.d/worker-proxy.inc": "enabled = false;\n",
            "local.d/logging.inc": 'type = "file";\nfilename = "$LOGDIR/rspamd.log";\nlevel = "info";\n',
        }
        files.update(lab)
        files["local.d/options.inc"] = files.get("local.d/options.inc", "") + f'hs_cache_dir = "{HS_CACHE}";\n'
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
            self._nsd = NSD({PLACEHOLDER_ZONE: zone_text(PLACEHOLDER_ZONE, "")}, address=self.address).start()
            self.nameserver = f"{self._nsd.address}:{self._nsd.port}"
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
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=d, start_new_session=True
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

    @staticmethod
    def _pong(base: str) -> bool:
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=1) as r:
                return r.status == 200 and r.read().strip() == b"pong"
        except OSError:
            return False

    def stop(self) -> None:
        """Stop rspamd and every process of its session (its workers). Safe to call twice; keeps the
        directories, ports and nsd, so ``start()`` brings the same instance back."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # SIGTERM to the main process: it stops its workers and waits for them.
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of our session left behind
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        self.stop()
        if self._nsd is not None:
            self._nsd.close()
            self._nsd = None
            self.nameserver = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Rspamd":
        if self.proc is None:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ clients

    def rspamc(self, command: str, message: bytes, *, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """``rspamc -h <controller> <command>`` with ``message`` on stdin (learn_spam, learn_ham, ...)."""
        return subprocess.run(
            [RSPAMC_BIN, "-h", self.controller, command], input=message, capture_output=True, timeout=timeout
        )

    def stat(self) -> dict:
        """The controller's /stat (scanned and learned counts, per-action totals)."""
        with urllib.request.urlopen(f"http://{self.controller}/stat", timeout=5) as r:
            return json.load(r)
