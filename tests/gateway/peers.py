"""Real peers for gateway integration tests and the benchmark: Postfix's smtp-sink, HAProxy with accept-proxy, Dovecot with a haproxy listener, each on loopback, always stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.lab.ports import free_port


def wait_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port}") from None
            time.sleep(0.05)


def wait_for_text(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {path}:\n{content}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def smtp_sink(workdir: Path, port: int | None = None, host: str = "127.0.0.1", dump: bool = True, backlog: int = 1024):
    """Postfix smtp-sink on host:port; with ``dump`` every transaction lands in workdir/sink/."""
    port = port or free_port(host)
    # smtp-sink drops to the postfix user after binding, and pytest's tmp_path sits below 0700
    # directories that user cannot traverse: dump into a directory of its own, removed at the end.
    dump_dir = Path(tempfile.mkdtemp(prefix="hmx-sink-"))
    shutil.chown(dump_dir, "postfix")
    args = ["smtp-sink", "-u", "postfix", "-c", "-m", "2000"]
    if dump:
        args += ["-d", str(dump_dir) + "/%H%M%S."]
    args += [f"[{host}]:{port}" if ":" in host else f"{host}:{port}", str(backlog)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(workdir / "sink.log", "ab"))
    try:
        wait_port(host, port, proc=proc)
        proc.port = port  # type: ignore[attr-defined]
        proc.dump_dir = dump_dir  # type: ignore[attr-defined]
        yield proc
    finally:
        stop(proc)
        shutil.rmtree(dump_dir, ignore_errors=True)


def sink_messages(proc) -> list[bytes]:
    return [p.read_bytes() for p in sorted(Path(proc.dump_dir).iterdir())]


HAPROXY_CFG = """
global
    log stdout format raw local0
    maxconn {maxconn}
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
{binds}
    log-format "haproxy-accepted client=%ci:%cp frontend=%fi:%fp"
    option logasap
    default_backend be
backend be
    server up {upstream}{server_opts}
"""


@contextlib.contextmanager
def haproxy(workdir: Path, upstream: tuple[str, int], *, accept_proxy: bool, send_proxy: bool = False,
            hosts=("127.0.0.1",), maxconn: int = 1000):
    """HAProxy in mode tcp: ``accept_proxy`` makes it a PROXY v2 receiver that logs the address
    from the header; ``send_proxy`` makes it a sender (the benchmark's comparison proxy)."""
    port = free_port(hosts[0])
    binds = "\n".join(
        f"    bind {'[' + h + ']' if ':' in h else h}:{port}{' accept-proxy' if accept_proxy else ''}" for h in hosts
    )
    cfg = workdir / "haproxy.cfg"
    up = f"[{upstream[0]}]:{upstream[1]}" if ":" in upstream[0] else f"{upstream[0]}:{upstream[1]}"
    cfg.write_text(HAPROXY_CFG.format(maxconn=maxconn, binds=binds, upstream=up,
                                      server_opts=" send-proxy-v2" if send_proxy else ""))
    log = workdir / "haproxy.log"
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        wait_port(hosts[0], port, proc=proc)
        proc.port = port  # type: ignore[attr-defined]
        proc.log = log  # type: ignore[attr-defined]
        yield proc
    finally:
        stop(proc)


DOVECOT_CONF = """
base_dir = {run}
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
login_trusted_networks =
haproxy_trusted_networks = 127.0.0.0/8 ::1
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{d}/mail/%u
passdb {{
  driver = static
  args = password=secret
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={d}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imap_haproxy {{
    address = 127.0.0.1
    port = {port}
    haproxy = yes
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""


@contextlib.contextmanager
def dovecot(workdir: Path):
    """Dovecot with an IMAP listener that requires a PROXY header (haproxy = yes)."""
    d = workdir / "dovecot"
    for sub in ("run", "state", "mail", "home"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    shutil.chown(d / "mail", "dovecot", "dovecot")
    shutil.chown(d / "home", "dovecot", "dovecot")
    os.chmod(d, 0o755)
    port = free_port()
    # Its sockets in a short directory of their own: unix socket paths stop at 107 bytes, and
    # run/token-login/imap-urlauth under pytest's tmp_path (longer under xdist workers) did not fit.
    run = Path(tempfile.mkdtemp(prefix="hmx-dc-"))
    run.chmod(0o755)
    conf = d / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(d=d, run=run, port=port))
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdout=open(d / "stdout.log", "ab"),
                            stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        proc.port = port  # type: ignore[attr-defined]
        proc.log = d / "dovecot.log"  # type: ignore[attr-defined]
        yield proc
    finally:
        stop(proc)
        shutil.rmtree(run, ignore_errors=True)
