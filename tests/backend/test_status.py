"""`homemx-backend status` against a real backend (in this event loop, its listeners on real ports)
and a real rspamd: a healthy node exits 0 and shows every section ok; a broken node (a listener
closed, an expired certificate, a deferred message two hours old, rspamd stopped) exits 1 and names
each problem, in text and in --json; an unreadable config exits 2 with one line."""

from __future__ import annotations

import asyncio
import datetime
import json
import smtplib
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backend.queue.model import DEFERRED, DELIVERED, NewMessage, NewRecipient
from backend.queue.store import Queue
from tests.backend.helpers import (
    ALICE,
    ALICE_PW,
    BACKEND_CLI,
    BOB,
    HOSTNAME,
    listener_block,
    running_backend,
    wait_for,
    write_config,
)
from tests.conftest import require_tool
from tests.lab.ports import free_port
from tests.lab.rspamd import RSPAMD_BIN, RefusingDNS, Rspamd

REMOTE = "friend@remote.example"


async def status(cfg: Path, *extra: str) -> tuple[int, str, str]:
    """The CLI in its own process (the event loop keeps serving the listeners it probes)."""
    proc = await asyncio.create_subprocess_exec(
        BACKEND_CLI, "status", "-c", str(cfg), "--tunnel-config", str(cfg.parent / "hmxtest9.conf"),
        "--timeout", "5", *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def node_config(tmp: Path, rspamd_url: str, dns_port: int) -> tuple[Path, dict[str, int]]:
    ports = {name: free_port("127.0.0.1") for name in ("mx", "submission", "metrics")}
    listeners = (listener_block("mx", "mx", f"127.0.0.1:{ports['mx']}")
                 + listener_block("submission", "submission", f"127.0.0.1:{ports['submission']}"))
    # Remote recipients are deferred at once: every DNS query is refused.
    cfg = write_config(tmp, listeners, server_extra=f'metrics_listen = "127.0.0.1:{ports["metrics"]}"',
                       extra=f'[rspamd]\nurl = "{rspamd_url}"\n\n[dns]\nself_check_interval = 0\n\n'
                       f'[delivery]\nnameservers = ["127.0.0.1"]\ndns_port = {dns_port}\n')
    return cfg, ports


def submit(port: int, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.starttls(context=_no_verify())
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, rcpts, f"From: {ALICE}\r\nTo: {', '.join(rcpts)}\r\nSubject: status\r\n\r\nhi\r\n")


def _no_verify():
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def states(backend) -> dict[str, str]:
    return {r.address: r.state for e in backend.queue.list() for r in e.recipients}


def write_expired_cert(directory: Path) -> None:
    """Replace the test certificate with one that expired yesterday (same names, a valid pair)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=90)).not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


@pytest.fixture(scope="module")
def refusing_dns():
    server = RefusingDNS()
    yield server.port
    server.close()


@pytest.fixture(scope="module")
def rspamd():
    require_tool(RSPAMD_BIN)
    with Rspamd() as rs:
        yield rs


@pytest.mark.asyncio
async def test_healthy_node_exits_0_with_every_section_ok(tmp_path, rspamd, refusing_dns):
    cfg, ports = node_config(tmp_path, rspamd.url, refusing_dns)
    async with running_backend(cfg) as backend:
        # One message, one local recipient (delivered to its Maildir) and one remote (deferred:
        # the test's DNS answers nothing).
        await asyncio.to_thread(submit, ports["submission"], [BOB, REMOTE])
        await wait_for(lambda: states(backend) == {BOB: DELIVERED, REMOTE: DEFERRED}, 30)

        code, out, err = await status(cfg)
        assert code == 0, out + err
        assert err == ""
        lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
        for section in ("listeners", "queue", "deliveries", "certificate", "rspamd", "metrics"):
            assert lines[section].split()[1] == "ok", out
        assert "2 of 2 listening" in lines["listeners"]
        assert "queued 0, deferred 1, delivered 1" in lines["queue"]
        assert f"to <{BOB}> delivered: 250 2.0.0 Delivered to Maildir" in out
        assert f"to <{REMOTE}> deferred: 4" in out  # last failed, with its reply
        assert f"{rspamd.url}/ping: pong" in lines["rspamd"]
        assert "(in 36" in lines["certificate"]  # 365 days left
        assert lines["dns"].split()[2] == "off"  # self_check_interval = 0
        assert out.rstrip().endswith("-- all is well")

        code, out, _ = await status(cfg, "--json")
        assert code == 0
        doc = json.loads(out)
        assert doc["ok"] is True and doc["attention"] == []
        sections = doc["sections"]
        assert [r["listening"] for r in sections["listeners"]["listeners"]] == [True, True]
        assert sections["queue"]["counts"]["delivered"] == 1 and sections["queue"]["counts"]["deferred"] == 1
        assert sections["queue"]["oldest"]["age"] < 600
        assert sections["deliveries"]["last_success"]["recipient"] == BOB
        assert sections["deliveries"]["last_failure"]["recipient"] == REMOTE
        assert sections["deliveries"]["last_failure"]["reply"].startswith("4")
        assert 364 < sections["certificate"]["days_left"] <= 365
        assert sections["rspamd"]["reachable"] is True
        assert sections["tunnel"]["state"] == "off"
        assert sections["metrics"]["state"] == "ok"


@pytest.mark.asyncio
async def test_broken_node_exits_1_and_names_each_problem(tmp_path, rspamd, refusing_dns):
    cfg, ports = node_config(tmp_path, rspamd.url, refusing_dns)
    write_expired_cert(tmp_path / "tls")
    # A message for a remote recipient, queued two hours ago; the runner attempts it at start and
    # defers it (no DNS answers).
    two_hours_ago = time.time() - 7200
    q = Queue(tmp_path / "data" / "queue.sqlite3", now=lambda: two_hours_ago, group_commit=False)
    old_id = q.enqueue(NewMessage(ALICE, (NewRecipient(REMOTE, REMOTE, False),), b"Subject: old\r\n\r\nx\r\n", "submission"))
    q.close()
    async with running_backend(cfg) as backend:
        await wait_for(lambda: states(backend) == {REMOTE: DEFERRED}, 30)
        backend.servers[0].close()  # the mx listener goes down; submission stays up
        await backend.servers[0].wait_closed()
        rspamd.stop()
        try:
            code, out, err = await status(cfg)
            code_json, out_json, _ = await status(cfg, "--json")
        finally:
            rspamd.start()

    assert code == 1, out + err
    assert err == ""
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    for section in ("listeners", "queue", "certificate", "rspamd"):
        assert lines[section].split()[1] == "ATTENTION", out
    assert lines["metrics"].split()[1] == "ok"
    assert f"mx           mx          127.0.0.1:{ports['mx']}" in out and "NOT LISTENING: Connection refused" in out
    assert "1 of 2 listening" in lines["listeners"]
    assert f"oldest {old_id} waiting 2 h 0 min" in lines["queue"]
    assert "EXPIRED" in lines["certificate"]
    assert "no answer: Connection refused (mail is accepted unscanned)" in lines["rspamd"]
    assert "-- 4 need attention:" in out

    assert code_json == 1
    doc = json.loads(out_json)
    assert doc["ok"] is False
    assert [p.split(":")[0] for p in doc["attention"]] == ["listeners", "queue", "certificate", "rspamd"]
    sections = doc["sections"]
    assert [(r["name"], r["listening"]) for r in sections["listeners"]["listeners"]] == [("mx", False), ("submission", True)]
    assert sections["queue"]["oldest"]["id"] == old_id and sections["queue"]["oldest"]["age"] > 3600
    assert sections["certificate"]["days_left"] < 0
    assert sections["rspamd"]["reachable"] is False
    assert sections["deliveries"]["last_success"] is None
    assert sections["deliveries"]["last_failure"]["queue_id"] == old_id


@pytest.mark.asyncio
async def test_unreadable_config_exits_2_with_one_line(tmp_path):
    code, out, err = await status(tmp_path / "missing.toml")
    assert code == 2
    assert out == ""
    assert err.splitlines() == [f"homemx-backend: config error: {tmp_path / 'missing.toml'}: cannot read: No such file or directory"]


@pytest.mark.asyncio
async def test_acme_placeholder_and_failed_renewal_need_attention(tmp_path):
    """With [acme] on, the live chain in data_dir/acme is what is served (not [tls] cert): the
    self-signed placeholder the daemon installs before the first issuance, and a failed last
    renewal as the renewer records it, are both named."""
    from backend.config import load_config
    from backend.tls import certfiles, renew

    cfg = write_config(tmp_path, listener_block("mx", "mx"), extra="[acme]\nenabled = true\n")
    config = load_config(cfg)
    certfiles.ensure_placeholder(config.acme_dir, HOSTNAME)
    failed_at = time.time() - 600
    renew.save_state(config.acme_dir, renew.RenewalState(last_attempt=failed_at, last_result="failure",
                                                         last_error="urn:ietf:params:acme:error:connection",
                                                         failures=2, next_attempt=failed_at + 120))
    code, out, _ = await status(cfg, "--json")
    assert code == 1
    doc = json.loads(out)
    cert = doc["sections"]["certificate"]
    assert cert["state"] == "attention"
    assert cert["path"] == str(config.acme_dir / "live" / "fullchain.pem")
    assert cert["self_signed"] is True and cert["names"] == [HOSTNAME]
    assert cert["acme"]["last_result"] == "failure" and cert["acme"]["failures"] == 2
    problems = [p for p in doc["attention"] if p.startswith("certificate:")]
    assert len(problems) == 2
    assert "placeholder" in problems[0]
    assert "failed: urn:ietf:params:acme:error:connection (2 in a row)" in problems[1]
