"""Real daemons for chaos and fuzz runs: homemx-backend and homemx-gateway as processes on loopback, started, SIGKILLed, restarted and stopped, with their logs kept and checked for tracebacks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.backend.helpers import BACKEND_CLI, listener_block, write_config
from tests.lab.ports import free_port
from tests.gateway.peers import wait_port

GATEWAY_CLI = str(Path(sys.executable).parent / "homemx-gateway")
GATEWAY_HOST = "mx.chaos.example"

# What must never appear in a daemon's log or in a reply: a traceback, a thread dying, or a Python
# exception's repr leaking into the text (aiosmtpd's default error reply is "500 Error: (Name) msg").
TRACE_RE = re.compile(
    r"Traceback \(most recent call last\)|Exception in thread|Task exception was never retrieved"
    r"|Exception in callback|exception group|ExceptionGroup"
)
EXCEPTION_TEXT_RE = re.compile(
    r"Traceback|\b[A-Z][A-Za-z]*(?:Error|Exception)\b|\(most recent call last\)|Error: \("
)


class Daemon:
    """One daemon process (its own session, so SIGKILL reaches nothing else) logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, port: int, config: Path):
        self.name, self.argv, self.log_path, self.port, self.config = name, argv, log_path, port, config
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        try:
            wait_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; the exit code, or None when it ignored SIGTERM and had to be killed."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def tracebacks(text: str, context: int = 1500) -> list[str]:
    """Excerpts of ``text`` around every traceback-like line (empty: the log is clean)."""
    return [text[max(0, m.start() - 200): m.start() + context] for m in TRACE_RE.finditer(text)]


@dataclass
class BackendPorts:
    mx: int  # behind the gateway: PROXY v2 from loopback required
    lan: int  # behind the gateway too (relay for trusted networks), PROXY v2 from loopback required
    plain: int  # an mx listener without PROXY, for direct clients
    metrics: int
    submission: int = 0  # with submission=True: STARTTLS + AUTH, PROXY v2 required (as deployed)
    submissions: int = 0  # with submission=True: implicit TLS after the PROXY v2 header


def backend_daemon(work: Path, *, log_level: str = "info", extra: str = "", listener_opts: dict | None = None,
                   users: dict[str, str] | None = None, submission: bool = False) -> tuple[Daemon, BackendPorts]:
    """A `homemx-backend run` with three listeners (mx and lan behind PROXY v2, mx without) and metrics;
    with ``submission``, also submission (587) and submissions (465) behind PROXY v2, as deployed."""
    opts = {"timeout": 30, **(listener_opts or {})}
    ports = BackendPorts(free_port(), free_port(), free_port(), free_port())
    proxied = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
    listeners = (
        listener_block("mx", "mx", f"127.0.0.1:{ports.mx}", **proxied, **opts)
        + listener_block("lan", "lan", f"127.0.0.1:{ports.lan}", **proxied, trusted_networks=["127.0.0.0/8"],
                         **{"auth_failure_delay": 0, **opts})
        + listener_block("plain", "mx", f"127.0.0.1:{ports.plain}", **opts)
    )
    if submission:
        ports.submission, ports.submissions = free_port(), free_port()
        listeners += (listener_block("submission", "submission", f"127.0.0.1:{ports.submission}", **proxied, **opts)
                      + listener_block("submissions", "submissions", f"127.0.0.1:{ports.submissions}", **proxied,
                                       **opts))
    cfg = write_config(work, listeners, extra=extra, users=users,
                       server_extra=f'metrics_listen = "127.0.0.1:{ports.metrics}"')
    cfg.write_text(cfg.read_text().replace('log_level = "debug"', f'log_level = "{log_level}"'))
    return Daemon("backend", [BACKEND_CLI, "run", "-c", str(cfg)], work / "backend.log", ports.plain, cfg), ports


def gateway_daemon(work: Path, upstreams: dict[str, int], *, greet_wait: str = "200ms",
                   log_level: str = "info") -> tuple[Daemon, dict[str, int]]:
    """A `homemx-gateway run` with one smtp listener per upstream (name → backend port; "submission"
    and "submissions" are set up as submission ports), PROXY v2 on, limits high enough that only the chaos, not the rate limiter, decides what happens."""
    ports = {name: free_port() for name in upstreams}
    text = (f'[server]\nhostname = "{GATEWAY_HOST}"\nlog_level = "{log_level}"\nshutdown_grace = "2s"\n'
            "[limits]\nmax_connections = 5000\nmax_per_client = 5000\nrate = 1000000\nburst = 1000000\n")
    for name, up in upstreams.items():
        text += (f'[[listener]]\nname = "{name}"\nkind = "smtp"\nlisten = "127.0.0.1:{ports[name]}"\n'
                 f'upstream = "127.0.0.1:{up}"\nproxy_v2 = true\n'
                 f'greet_wait = "{greet_wait if name == "mx" else "0s"}"\n')
        if name in ("submission", "submissions"):
            # As provisioned (provision/render.py): no greet wait; 465's client speaks TLS first.
            text += "submission = true\n" + ("implicit_tls = true\n" if name == "submissions" else "")
    cfg = work / "gateway.toml"
    cfg.write_text(text)
    first = next(iter(ports.values()))
    return Daemon("gateway", [GATEWAY_CLI, "run", "-c", str(cfg)], work / "gateway.log", first, cfg), ports
