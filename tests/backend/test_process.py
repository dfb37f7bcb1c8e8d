"""The backend as a user runs it: a real `homemx-backend run` process, killed with SIGKILL, run on a
full filesystem, configured wrongly, and managed with the queue/users CLI while it runs."""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess

import pytest

from tests.backend.helpers import (
    ALICE,
    ALICE_PW,
    BACKEND_CLI,
    listener_block,
    maildir_files,
    run_cli,
    wait_for_sync,
    write_config,
)
from tests.lab.ports import free_port
from tests.conftest import require_root, require_tool
from tests.lab.backend import Daemon, daemons, lan_config, queue_json  # noqa: F401 - fixture

MSG = "From: alice@example.org\r\nTo: friend@remote.example\r\nSubject: t\r\n\r\nbody\r\n"


def test_kill9_after_250_keeps_message(tmp_path, daemons):
    port = free_port()
    cfg = lan_config(tmp_path, port)
    d = Daemon(cfg).start(port)
    daemons.append(d)
    with smtplib.SMTP("127.0.0.1", port) as s:
        code, resp = s.ehlo("app")
        s.mail(ALICE)
        s.rcpt("friend@remote.example")
        code, resp = s.data(MSG)
        assert code == 250
        qid = resp.decode().rsplit(" ", 1)[1]
        # SIGKILL right after the 250, before QUIT.
        d.kill9()
    d2 = Daemon(cfg).start(port)
    daemons.append(d2)
    entries = {e["id"]: e for e in queue_json(cfg)}
    assert qid in entries
    assert entries[qid]["recipients"][0]["address"] == "friend@remote.example"
    assert entries[qid]["recipients"][0]["state"] in ("queued", "deferred")


def test_kill9_during_data_no_entry(tmp_path, daemons):
    port = free_port()
    cfg = lan_config(tmp_path, port)
    d = Daemon(cfg).start(port)
    daemons.append(d)
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    f.readline()
    for line in (b"EHLO app", b"MAIL FROM:<alice@example.org>", b"RCPT TO:<friend@remote.example>", b"DATA"):
        s.sendall(line + b"\r\n")
        while True:
            r = f.readline()
            if r[3:4] != b"-":
                break
    assert r.startswith(b"354")
    s.sendall(b"From: alice@example.org\r\n\r\npartial body without the final dot\r\n")
    d.kill9()
    try:
        rest = f.read()  # the connection dies without a 250
    except ConnectionResetError:
        rest = b""
    assert b"250" not in rest
    s.close()
    d2 = Daemon(cfg).start(port)
    daemons.append(d2)
    assert queue_json(cfg) == []


def test_full_filesystem_451_then_next_transaction_succeeds(tmp_path, daemons):
    """A real ENOSPC: the data directory is a 2 MiB tmpfs in a private mount namespace."""
    require_root()
    require_tool("unshare")
    port = free_port()
    cfg = write_config(
        tmp_path,
        listener_block("lan", "lan", f"127.0.0.1:{port}", trusted_networks=["127.0.0.0/8"], max_message_size=20 * 1024 * 1024),
    )
    data = tmp_path / "data"
    data.mkdir()
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount -t tmpfs -o size=2m tmpfs "{data}" && exec "$0" "$@"']
    d = Daemon(cfg, wrapper).start(port)
    daemons.append(d)
    big = MSG + ("x" * 998 + "\r\n") * 4096  # ~4 MB: cannot fit
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("app")
        s.mail(ALICE)
        s.rcpt("friend@remote.example")
        code, resp = s.data(big)
        assert code == 451 and resp.startswith(b"4.3.0"), (code, resp)
        s.mail(ALICE)
        s.rcpt("friend@remote.example")
        code, resp = s.data(MSG)
        assert code == 250, (code, resp, d.log.read_text()[-2000:])
    # Only the small message is queued: ask the CLI inside the daemon's mount namespace (SQLite
    # resolves /proc/PID/root symlinks, so that path would show the host's empty directory).
    r = subprocess.run(["nsenter", "-t", str(d.proc.pid), "-m", BACKEND_CLI, "queue", "list", "--all", "--json",
                        "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    assert len(entries) == 1 and entries[0]["size"] < 10_000


def test_local_delivery_and_queue_cli_while_running(tmp_path, daemons):
    port = free_port()
    cfg = lan_config(tmp_path, port)
    d = Daemon(cfg).start(port)
    daemons.append(d)
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail(ALICE, ["bob@example.org"], "From: alice@example.org\r\nSubject: hi bob\r\n\r\nBODY-MARKER-7f3a\r\n")
        s.sendmail(ALICE, ["friend@remote.example"], MSG)
    wait_for_sync(lambda: maildir_files(tmp_path, "bob@example.org"))
    assert "BODY-MARKER-7f3a" in maildir_files(tmp_path, "bob@example.org")[0].read_text()
    # The daemon runs at log_level = debug (SMTP transcript on) and still never logs a body.
    log_text = d.log.read_text()
    assert "mail FROM:<alice@example.org>" in log_text and "BODY-MARKER-7f3a" not in log_text
    entries = queue_json(cfg)
    remote = [e for e in entries if e["recipients"][0]["address"] == "friend@remote.example"][0]
    local = [e for e in entries if e["recipients"][0]["address"] == "bob@example.org"][0]
    assert local["recipients"][0]["state"] == "delivered"
    qid = remote["id"]
    r = run_cli("queue", "hold", qid, "--json", "-c", str(cfg))
    assert r.returncode == 0 and json.loads(r.stdout)["recipients"] == 1
    assert queue_json(cfg)[-1]["recipients"][0]["state"] == "held" or any(
        e["recipients"][0]["state"] == "held" for e in queue_json(cfg)
    )
    assert run_cli("queue", "release", qid, "-c", str(cfg)).returncode == 0
    show = run_cli("queue", "show", qid, "-c", str(cfg))
    assert show.returncode == 0 and "Subject: t" in show.stdout
    assert run_cli("queue", "retry", "-c", str(cfg)).returncode == 0
    assert run_cli("queue", "delete", qid, "-c", str(cfg)).returncode == 0
    assert qid not in [e["id"] for e in queue_json(cfg)]
    r = run_cli("queue", "show", "NOSUCHID", "-c", str(cfg))
    assert r.returncode == 1 and "NOSUCHID" in r.stderr


def test_users_cli_shares_file_with_auth(tmp_path, daemons):
    port, sport = free_port(), free_port()
    cfg = lan_config(tmp_path, port, listener_block("sub", "submission", f"127.0.0.1:{sport}", auth_failure_delay=0))
    d = Daemon(cfg).start(sport)
    daemons.append(d)
    r = run_cli("users", "add", "carol@example.org", "--password-file", "-", "-c", str(cfg), input="carol-pass-123\n")
    assert r.returncode == 0, r.stderr
    assert "carol-pass-123" not in (tmp_path / "passwd").read_text()
    assert "carol@example.org:{BLF-CRYPT}$2" in (tmp_path / "passwd").read_text()
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", sport) as s:
        s.starttls(context=ctx)
        assert s.login("carol@example.org", "carol-pass-123")[0] == 235
    assert run_cli("users", "delete", "carol@example.org", "-c", str(cfg)).returncode == 0
    with smtplib.SMTP("127.0.0.1", sport) as s:
        s.starttls(context=ctx)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("carol@example.org", "carol-pass-123")
    r = run_cli("users", "add", "x@unknown.example", "--password-file", "-", "-c", str(cfg), input="longenough\n")
    assert r.returncode == 1 and "unknown.example" in r.stderr
    import base64

    log_text = d.log.read_text()
    blob = base64.b64encode(b"\0carol@example.org\0carol-pass-123").decode()
    assert "AUTH" in log_text  # the transcript is there (log_level = debug) ...
    assert "carol-pass-123" not in log_text and blob not in log_text  # ... the secret is not
