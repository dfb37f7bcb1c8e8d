"""A real RFC 2136 primary for tests: Debian's Knot DNS (knotd) serving zones given as text and
accepting dynamic updates signed with one TSIG key (nsd, our usual test DNS, takes no updates).

    with Knot({"example.org": zone_text("example.org", records)}) as knot:
        knot.port, knot.key_file      # [acme] dns01_server = "127.0.0.1:PORT", dns01_tsig_key_file
        knot.resolver()               # dnspython resolver pointed at it

It runs in the foreground in its own session on loopback (OS-chosen free port), with its own
working directory; ``stop()`` ends it.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

from tests.lab.ports import free_port
from tests.lab.nsd import server_resolver
from tests.lab.process import LabDaemon, stop_session

KNOTD_BIN = "/usr/sbin/knotd"
DIG_BIN = "dig"
READY_TIMEOUT = 15.0
TSIG_KEY_NAME = "homemx-acme"
TSIG_ALGORITHM = "hmac-sha256"


class KnotError(Exception):
    """knotd did not start; the message carries its output."""


class Knot(LabDaemon):
    def __init__(self, zones: Mapping[str, str], *, address: str = "127.0.0.1"):
        self.zones = dict(zones)
        self.address = address
        self.port = free_port(address, udp=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="homemx-knot-"))
        self.secret = base64.b64encode(os.urandom(32)).decode()
        self.key_file = self.workdir / "tsig.key"
        self.proc: subprocess.Popen | None = None

    def _write(self) -> None:
        w = self.workdir
        (w / "db").mkdir(exist_ok=True)  # knotd does not create it: every update would fail "not exists"
        # BIND's key clause, as tsig-keygen prints it: what an operator hands the backend.
        self.key_file.write_text(
            f'key "{TSIG_KEY_NAME}" {{\n\talgorithm {TSIG_ALGORITHM};\n\tsecret "{self.secret}";\n}};\n'
        )
        conf = [
            "server:",
            f"    listen: {self.address}@{self.port}",
            f'    rundir: "{w}"',
            f'    pidfile: "{w}/knot.pid"',
            "database:",
            f'    storage: "{w}/db"',
            "control:",
            f'    listen: "{w}/knot.sock"',
            "log:",
            "  - target: stdout",
            "    any: info",
            "key:",
            f"  - id: {TSIG_KEY_NAME}",
            f"    algorithm: {TSIG_ALGORITHM}",
            f"    secret: {self.secret}",
            "acl:",
            "  - id: acme-update",
            f"    key: {TSIG_KEY_NAME}",
            "    action: update",
            "template:",
            "  - id: default",
            f'    storage: "{w}"',
            "    zonefile-sync: -1",  # updates live in the journal; the zone file stays as written
            "zone:",
        ]
        for name, text in self.zones.items():
            (w / f"{name}.zone").write_text(text)
            conf += [f"  - domain: {name}", f'    file: "{w}/{name}.zone"', "    acl: acme-update"]
        (w / "knot.conf").write_text("\n".join(conf) + "\n")

    def start(self) -> "Knot":
        self._write()
        self.log_file = open(self.workdir / "knot.log", "ab")
        self.proc = subprocess.Popen([KNOTD_BIN, "-c", str(self.workdir / "knot.conf")], stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise KnotError(f"knotd did not start on {self.address}@{self.port}: {self.log()}")
        return self

    def _wait_ready(self) -> None:
        zone = next(iter(self.zones))
        deadline = time.monotonic() + READY_TIMEOUT
        cmd = [DIG_BIN, "+time=1", "+tries=1", "+short", "-p", str(self.port), f"@{self.address}", zone, "SOA"]
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise KnotError("knotd exited")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                return
            time.sleep(0.05)
        raise KnotError("no answer within timeout")

    def log(self) -> str:
        try:
            return (self.workdir / "knot.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_session(proc)
        self.log_file.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


    def resolver(self, timeout: float = 3.0):
        return server_resolver(self.address, self.port, timeout)
