"""`[server] log_format = "json"` on a real `homemx-gateway run` process: every line is one JSON
object, and a relayed connection's outcome line carries conn, listener, client, outcome, up, down
and duration as fields."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool
from tests.gateway.peers import smtp_sink, stop, wait_for_text
from tests.lab.ports import free_port


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_json_lines_of_a_relayed_connection(tmp_path):
    require_tool("smtp-sink")
    port = free_port("127.0.0.1")
    with smtp_sink(tmp_path, dump=False) as sink:
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(f"""
[server]
hostname = "mx.example.org"
shutdown_grace = "2s"
log_format = "json"
[[listener]]
name = "mx"
kind = "smtp"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{sink.port}"
proxy_v2 = false
""")
        log = tmp_path / "gateway.log"
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                                stderr=open(log, "wb"), cwd=Path(__file__).parents[2])
        try:
            wait_for_text(log, '"message": "listener mx (smtp) on ')
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert read_line(s).startswith(b"220 ")
                s.sendall(b"QUIT\r\n")
                assert read_line(s).startswith(b"221 ")
            wait_for_text(log, '"outcome": "relayed"')
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            stop(proc)
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line parses
    assert all({"timestamp", "level", "logger", "message"} <= e.keys() for e in entries)
    outcome = [e for e in entries if "outcome" in e]
    assert len(outcome) == 1
    e = outcome[0]
    assert e["logger"].startswith("homemx.gateway") and e["level"] == "INFO"
    assert isinstance(e["conn"], int) and e["listener"] == "mx" and e["outcome"] == "relayed"
    assert e["client"].startswith("[127.0.0.1]:")
    assert e["up"] == len(b"QUIT\r\n") and e["down"] > 0 and isinstance(e["duration"], float)
    assert e["message"] == (f"conn={e['conn']} listener=mx client={e['client']} outcome=relayed "
                            f"up={e['up']} down={e['down']} duration={e['duration']:.3f}s")
