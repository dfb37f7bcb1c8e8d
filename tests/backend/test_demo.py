"""The README's first command: the demo stack (gateway + backend on loopback) as ./dev demo starts it."""

from __future__ import annotations

import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

from tests.backend.helpers import BACKEND_CLI, wait_for_sync

GATEWAY_CLI = str(Path(sys.executable).parent / "homemx-gateway")
OFFSETS = (25, 65, 87, 91, 92, 125, 126, 165, 187)


def _free_base() -> int:
    for _ in range(50):
        base = random.randrange(20000, 60000, 100)
        try:
            for off in OFFSETS:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + off))
            return base
        except OSError:
            continue
    raise AssertionError("no free port range")


def test_demo_stack_delivers_through_gateway_and_signs_lan_mail(tmp_path):
    base = _free_base()
    d = tmp_path / "demo"
    r = subprocess.run([BACKEND_CLI, "demo", "--dir", str(d), "--port-base", str(base), "--prepare"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(d / "demo-password").st_mode & 0o777) == "0o600"
    procs = [
        subprocess.Popen([GATEWAY_CLI, "run", "-c", str(d / "gateway.toml")], stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "gw.log", "wb"), start_new_session=True),
        subprocess.Popen([BACKEND_CLI, "demo", "--dir", str(d), "--port-base", str(base)],
                         stdout=open(tmp_path / "out.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True),
    ]
    try:
        def up(port):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return True
            except OSError:
                return False

        wait_for_sync(lambda: up(base + 25) and up(base + 126), 30)
        out = (tmp_path / "out.log").read_text()
        assert f"swaks --server 127.0.0.1:{base + 25} --to demo@example.test" in out  # how to send a test message
        with smtplib.SMTP("127.0.0.1", base + 25, timeout=30) as s:  # the "internet" side, via the gateway
            s.sendmail("you@example.net", ["demo@example.test"], "From: you@example.net\r\nSubject: in\r\n\r\nhi\r\n")
        with smtplib.SMTP("127.0.0.1", base + 126, timeout=30) as s:  # a homelab app on the LAN listener
            s.sendmail("nas@example.test", ["demo@example.test"], "From: nas@example.test\r\nSubject: lan\r\n\r\nok\r\n")
        new = d / "data" / "mail" / "example.test" / "demo" / "Maildir" / "new"
        files = wait_for_sync(lambda: new.exists() and len(os.listdir(new)) == 2 and sorted(new.iterdir()), 30)
        texts = [f.read_text() for f in files]
        lan = [t for t in texts if "Subject: lan" in t][0]
        assert "a=rsa-sha256" in lan and "a=ed25519-sha256" in lan
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(15)
