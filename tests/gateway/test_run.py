"""`homemx-gateway run` as a process: binds from the config, drains on SIGTERM (stop accepting, let sessions finish, cut them at the grace deadline)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.gateway.peers import smtp_sink, stop, wait_for_text

GATEWAY = [sys.executable, "-m", "gateway.cli"]


def start_gateway(tmp_path: Path, upstream_port: int, grace: str):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[server]
hostname = "mx.example.org"
shutdown_grace = "{grace}"
[[listener]]
name = "mx"
kind = "smtp"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{upstream_port}"
proxy_v2 = false
""")
    log = tmp_path / "gateway.log"
    proc = subprocess.Popen(GATEWAY + ["run", "-c", str(cfg)], stderr=open(log, "wb"), cwd=Path(__file__).parents[2])
    text = wait_for_text(log, "listener mx (smtp) on ")
    port = int(re.search(r"listener mx \(smtp\) on 127\.0\.0\.1:(\d+)", text).group(1))
    return proc, log, port


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_drains_sessions(tmp_path):
    require_tool("smtp-sink")
    with smtp_sink(tmp_path, dump=False) as sink:
        proc, log, port = start_gateway(tmp_path, sink.port, "20s")
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert read_line(s).startswith(b"220 ")
            proc.send_signal(signal.SIGTERM)
            wait_for_text(log, "draining: 1 active connections")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"HELO client.example\r\n")  # the open session still works
            assert read_line(s).startswith(b"250 ")
            s.sendall(b"QUIT\r\n")
            assert read_line(s).startswith(b"221 ")
            s.close()
            assert proc.wait(15) == 0
        finally:
            stop(proc)
    text = log.read_text()
    assert "outcome=relayed" in text and "drained" in text


def test_sigterm_grace_deadline_cuts_idle_sessions(tmp_path):
    require_tool("smtp-sink")
    with smtp_sink(tmp_path, dump=False) as sink:
        proc, log, port = start_gateway(tmp_path, sink.port, "1s")
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert read_line(s).startswith(b"220 ")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            assert s.recv(4096) == b""  # cut at the deadline
            s.close()
        finally:
            stop(proc)
    assert "outcome=shutdown" in log.read_text()


def run_with_busy_port(tmp_path, toml: str) -> subprocess.CompletedProcess:
    """`homemx-gateway run` with {busy} in ``toml`` replaced by a port this test holds bound."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(toml.replace("{busy}", str(port)))
        r = subprocess.run(GATEWAY + ["run", "-c", str(cfg)], capture_output=True, text=True, timeout=30,
                           cwd=Path(__file__).parents[2])
    r.port = port  # type: ignore[attr-defined]
    return r


LISTENER = '[[listener]]\nname = "mx"\nkind = "smtp"\nlisten = "127.0.0.1:{listen}"\nupstream = "127.0.0.1:1"\n'


def test_bind_error_is_one_line_and_exit_1(tmp_path):
    r = run_with_busy_port(tmp_path, '[server]\nhostname = "mx.example.org"\n' + LISTENER.replace("{listen}", "{busy}"))
    assert r.returncode == 1
    # One line naming the listener, the address and the reason; no traceback, no ExceptionGroup.
    assert r.stderr == f"homemx-gateway: listener mx: cannot bind 127.0.0.1:{r.port}: Address already in use\n"


def test_metrics_bind_error_is_one_line_and_exit_1(tmp_path):
    r = run_with_busy_port(tmp_path, '[server]\nhostname = "mx.example.org"\nmetrics_listen = "127.0.0.1:{busy}"\n'
                           + LISTENER.replace("{listen}", "0"))
    assert r.returncode == 1
    assert r.stderr == f"homemx-gateway: metrics: cannot bind 127.0.0.1:{r.port}: Address already in use\n"


def test_run_serves_with_a_large_young_gc_generation(monkeypatch):
    """B8 (issue 17): with CPython's default thresholds a burst of silent connections spent most of
    the gateway's CPU in cyclic GC that found nothing; run() serves with gateway.run.GC_THRESHOLDS."""
    import gc

    from gateway import run as gwrun
    from tests.lab.gateway import gateway_config

    seen = []
    monkeypatch.setattr(gwrun, "setup_logging", lambda *a: None)
    monkeypatch.setattr(gwrun, "raise_nofile_limit", lambda: 0)
    monkeypatch.setattr(gwrun.trio, "run", lambda *a: seen.append(gc.get_threshold()))
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert gwrun.run(gateway_config({"name": "mx", "kind": "smtp", "listen": "127.0.0.1:0",
                                         "upstream": "127.0.0.1:25"})) == 0
    finally:
        gc.set_threshold(*saved)
    assert len(seen) == 1 and seen[0][0] >= 10_000, seen


def test_the_running_gateway_has_frozen_its_start_up_heap(tmp_path):
    """A full collection walked the gateway's start-up objects: 25-52 ms with nothing relayed,
    seen during B6's loaded phase (docs/benchmarks.md). Once serving, run() collects the start's
    garbage and freezes the rest; in-process callers of run_gateway (tests) are left alone."""
    proc, log, _ = start_gateway(tmp_path, 9, "1s")
    try:
        text = wait_for_text(log, "startup objects out of the collector's way")
        found = re.search(r"serving \((\d+) startup objects out of the collector's way\)", text)
        assert found and int(found.group(1)) > 10_000, text[-1000:]
    finally:
        stop(proc)
