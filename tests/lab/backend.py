"""A real `homemx-backend run` process for tests: started on a config, waited for on its port, killed with SIGKILL
or stopped with SIGTERM; ``daemons`` stops every one a test started; ``lan_config`` writes a config with one lan
listener; ``queue_json`` reads the queue through the CLI as a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.backend.helpers import BACKEND_CLI, listener_block, run_cli, wait_for_sync, write_config


class Daemon:
    def __init__(self, cfg: Path, wrapper: list[str] | None = None):
        self.cfg = cfg
        self.log = cfg.parent / "daemon.log"
        self.cmd = (wrapper or []) + [BACKEND_CLI, "run", "-c", str(cfg)]
        self.proc: subprocess.Popen | None = None

    def start(self, port: int) -> "Daemon":
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return True
            except OSError:
                return False

        wait_for_sync(up, 20)
        return self

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def lan_config(tmp_path: Path, port: int, extra_listener: str = "", **kw) -> Path:
    return write_config(
        tmp_path, listener_block("lan", "lan", f"127.0.0.1:{port}", trusted_networks=["127.0.0.0/8"]) + extra_listener, **kw
    )


def queue_json(cfg: Path, *args: str):
    r = run_cli("queue", "list", "--all", "--json", "-c", str(cfg), *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def queue_db(tmp: Path) -> Path:
    """The queue database of a daemon whose config ``lan_config`` wrote in ``tmp``."""
    return tmp / "data" / "queue.sqlite3"
