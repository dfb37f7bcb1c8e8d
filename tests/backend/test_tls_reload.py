"""Hot reload (issue 14): ``Backend.reload()`` and SIGHUP give new handshakes the new certificate while
sessions already open complete their transactions, pick up new users and DKIM keys, and keep what is
in service when a new file is broken (one log line). Real sockets, and a real ``homemx-backend run``
process for SIGHUP."""

from __future__ import annotations

import base64
import logging
import os
import re
import signal
import smtplib
import socket
import ssl
import threading

import aiosmtplib
import dkim as dkimpy
import pytest
from cryptography import x509

from backend.receive.users import UserDB, hash_password
from backend.tls.challenges import Challenges, tls_alpn_certificate
from backend.tls.context import ServerTLS
from backend.tls.selfsigned import write_self_signed
from gateway.proxyv2 import encode_proxy_v2
from tests.backend.helpers import (
    ALICE,
    ALICE_PW,
    BOB,
    HOSTNAME,
    client_tls,
    listener_block,
    maildir_files,
    open_tls,
    peer_serial,
    running_backend,
    wait_for,
    wait_for_sync,
    write_config,
)
from tests.lab.backend import Daemon, daemons  # noqa: F401 - fixture
from tests.lab.dkim import run_dkim_cli, sig_tags
from tests.lab.ports import free_port

MSG = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: reload\r\n\r\nbody\r\n.\r\n"
CLIENT = ("203.0.113.7", 40123)


def auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def current_serial(tmp_path) -> int:
    return x509.load_pem_x509_certificate((tmp_path / "tls" / "cert.pem").read_bytes()).serial_number


CASES = {
    # listener options, how a client reaches TLS there
    "starttls-587": (dict(kind="submission"), dict(starttls=True)),
    "implicit-465": (dict(kind="submissions"), dict(starttls=False)),
    "implicit-465-behind-gateway": (
        dict(kind="submissions", proxy_protocol=True, trusted_proxies=["127.0.0.1/32"]),
        dict(starttls=False, proxy_header=encode_proxy_v2(CLIENT, ("198.51.100.1", 465))),
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CASES)
async def test_reload_new_handshakes_get_the_new_certificate_while_an_open_session_completes(tmp_path, case):
    listener, how = CASES[case]
    kind = listener.pop("kind")
    cfg = write_config(tmp_path, listener_block("sub", kind, auth_failure_delay=0, **listener))
    async with running_backend(cfg) as b:
        port = b.bound_port("sub")
        old = current_serial(tmp_path)
        before = await open_tls(port, client_tls(), **how)
        assert peer_serial(before) == old
        assert (await before.cmd("EHLO client.example")).startswith("250")
        assert (await before.cmd(auth_plain(ALICE, ALICE_PW))).startswith("235")
        assert (await before.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250")

        write_self_signed(tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem", HOSTNAME)  # a renewal
        new = current_serial(tmp_path)
        assert new != old
        assert b.reload() is True

        after = await open_tls(port, client_tls(), **how)
        assert peer_serial(after) == new  # a new handshake: the new certificate, no restart
        assert (await after.cmd("QUIT")).startswith("221")
        # The session opened before the reload completes its transaction on its own handshake.
        assert (await before.cmd(f"RCPT TO:<{BOB}>")).startswith("250")
        assert (await before.cmd("DATA")).startswith("354")
        assert (await before.cmd(MSG)).startswith("250")
        assert peer_serial(before) == old
        await wait_for(lambda: maildir_files(tmp_path, BOB))


@pytest.mark.asyncio
async def test_a_broken_new_certificate_keeps_the_old_one_and_logs_one_line(tmp_path, caplog):
    cfg = write_config(tmp_path, listener_block("smtps", "submissions"))
    async with running_backend(cfg) as b:
        old = current_serial(tmp_path)
        cert = tmp_path / "tls" / "cert.pem"
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")  # a half-written renewal
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert b.reload() is False
        lines = [r for r in caplog.records if "reload" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in caplog.records]
        assert lines[0].levelno == logging.WARNING
        assert str(cert) in lines[0].getMessage() and "not a PEM certificate" in lines[0].getMessage()
        s = await open_tls(b.bound_port("smtps"), client_tls(), starttls=False)
        assert peer_serial(s) == old  # still served
        assert (await s.cmd("QUIT")).startswith("221")


def test_a_broken_passwd_file_keeps_the_users_read_before(tmp_path, caplog):
    """A half-edited passwd file must not lock every user out: lookups keep the users read
    before and say why once; SIGHUP's reload says so too; the CLI's edits refuse the file."""
    path = tmp_path / "passwd"
    path.write_text(f"{ALICE}:{hash_password(ALICE_PW, rounds=4)}::::::\n")
    db = UserDB(path)
    assert db.authenticate(ALICE.encode(), ALICE_PW.encode()) == ALICE
    path.write_text(path.read_text() + "carol-without-domain:{BLF-CRYPT}x\n")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert db.authenticate(ALICE.encode(), ALICE_PW.encode()) == ALICE
    assert len([r for r in caplog.records if str(path) in r.getMessage()]) == 1
    loaded, text = db.reload()
    assert not loaded and "kept 1" in text and f"{path}:2" in text
    with pytest.raises(Exception, match=f"{path}:2"):
        db.add("dave@example.org", "dave-password")
    assert db.get(ALICE) is not None


def test_the_tls_alpn_challenge_answers_only_on_fronts_made_for_acme(tmp_path):
    """RFC 8737: a CA validating TLS-ALPN-01 (SNI = the name, ALPN acme-tls/1) gets the challenge
    certificate from the HTTPS front; the SMTP fronts keep serving the real certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key, HOSTNAME)
    challenges = Challenges()
    challenges.put_tls_alpn(HOSTNAME, *tls_alpn_certificate(HOSTNAME, "token.thumbprint"))
    holder = ServerTLS(cert, key, challenges)

    def over_socketpair(front: ssl.SSLContext):
        a, z = socket.socketpair()
        client = client_tls()
        client.set_alpn_protocols(["acme-tls/1"])
        out = {}

        def serve():
            try:
                with front.wrap_socket(z, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        t = threading.Thread(target=serve)
        t.start()
        with client.wrap_socket(a, server_hostname=HOSTNAME) as tls:
            out["serial"] = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
            out["alpn"] = tls.selected_alpn_protocol()
        t.join(5)
        return out["serial"], out["alpn"]

    real = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    serial, alpn = over_socketpair(holder.front_context(acme=True))
    assert serial != real and alpn == "acme-tls/1"
    serial, alpn = over_socketpair(holder.front_context())
    assert serial == real and alpn is None
    challenges.remove_tls_alpn(HOSTNAME)
    serial, _ = over_socketpair(holder.front_context(acme=True))
    assert serial == real


@pytest.mark.asyncio
async def test_a_dkim_key_file_broken_in_place_keeps_signing_with_the_key_loaded_before(tmp_path, capsys, caplog):
    """A key file rewritten in place (a copy half done) used to make every submission 451; the
    loaded key keeps signing, one warning says why, and reload() refuses the file."""
    toml, records = dkim_tables(tmp_path, capsys, "dkim")
    cfg = write_config(tmp_path, listener_block("sub", "submission", auth_failure_delay=0), extra=toml)
    key_file = next((tmp_path / "dkim").iterdir())
    async with running_backend(cfg) as b:
        port = b.bound_port("sub")

        async def submit_one(subject: str) -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=client_tls()) as smtp:
                await smtp.login(ALICE, ALICE_PW)
                await smtp.sendmail(ALICE, [BOB], f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nbody\r\n")

        await submit_one("before")
        key_file.write_text("-----BEGIN PRIVATE KEY-----\ncut short\n")
        with caplog.at_level(logging.WARNING):
            await submit_one("after 1")
            await submit_one("after 2")
        delivered = await wait_for(lambda: len(maildir_files(tmp_path, BOB)) == 3 and maildir_files(tmp_path, BOB))
        for path in delivered:  # all three signed by the key that was loaded, and they verify
            assert dkimpy.verify(path.read_bytes().replace(b"\n", b"\r\n"), dnsfunc=lambda name, timeout=5: records.get(name))
        assert len([r for r in caplog.records if str(key_file) in r.getMessage()]) == 1
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert b.reload() is False
        [line] = [r.getMessage() for r in caplog.records if "reload" in r.getMessage()]
        assert "dkim: kept 1 keys" in line and str(key_file) in line


# ---------------------------------------------------------------- SIGHUP to a real daemon


def dkim_tables(tmp_path, capsys, directory: str) -> tuple[str, dict[bytes, bytes]]:
    """``dkim keygen`` for example.org (RSA only): the [[dkim]] TOML it prints and its TXT records."""
    keydir = tmp_path / directory
    assert run_dkim_cli(["dkim", "keygen", "--domain", "example.org", "--algorithm", "rsa", "--dir", str(keydir)]) == 0
    out = capsys.readouterr().out
    zone, _, toml = out.partition("# backend.toml: add these tables")
    records = {}
    for line in zone.splitlines():
        if "\tIN\tTXT\t" in line:
            records[line.split("\t")[0].encode()] = "".join(re.findall(r'"([^"]*)"', line)).encode()
    return toml, records


def submit(port: int, user: str, password: str, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.starttls(context=client_tls())
        s.login(user, password)
        s.sendmail(user, [rcpt], f"From: {user}\r\nTo: {rcpt}\r\nSubject: after sighup\r\n\r\nbody\r\n")


def tls_serial(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.starttls(context=client_tls())
        return x509.load_der_x509_certificate(s.sock.getpeercert(binary_form=True)).serial_number


def test_sighup_reloads_certificate_users_and_dkim_keys_without_a_restart(tmp_path, daemons, capsys):
    port = free_port()
    old_toml, old_records = dkim_tables(tmp_path, capsys, "dkim-old")
    cfg = write_config(tmp_path, listener_block("sub", "submission", f"127.0.0.1:{port}", auth_failure_delay=0), extra=old_toml)
    d = Daemon(cfg).start(port)
    daemons.append(d)
    pid = d.proc.pid
    old_serial = tls_serial(port)

    # A renewal, a new user and a DKIM rotation (docs/dkim.md: a new selector in the config).
    write_self_signed(tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem", HOSTNAME)
    new_serial = current_serial(tmp_path)
    passwd = tmp_path / "passwd"
    passwd.write_text(passwd.read_text() + f"carol@example.org:{hash_password('carol-pass-123', rounds=4)}::::::\n")
    new_toml, new_records = dkim_tables(tmp_path, capsys, "dkim-new")
    cfg.write_text(cfg.read_text().replace(old_toml, new_toml))
    assert new_toml in cfg.read_text()

    os.kill(pid, signal.SIGHUP)
    wait_for_sync(lambda: "reload:" in d.log.read_text(), 10)
    assert d.proc.poll() is None  # SIGHUP's default action would have ended it
    [line] = [l for l in d.log.read_text().splitlines() if "reload" in l]
    assert f"{old_serial:x} -> {new_serial:x}" in line and "users: 3" in line and "dkim: 1 keys (+example.org/" in line

    assert tls_serial(port) == new_serial
    submit(port, "carol@example.org", "carol-pass-123", BOB)  # AUTH as the new user
    [delivered] = wait_for_sync(lambda: maildir_files(tmp_path, BOB), 10)
    signed = delivered.read_bytes().replace(b"\n", b"\r\n")
    new_selector = next(iter(new_records)).split(b".")[0].decode()
    assert [t["s"] for t in sig_tags(signed)] == [new_selector]
    assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: new_records.get(name))  # the new key signed

    # A broken certificate next: the running one stays, one line says why.
    (tmp_path / "tls" / "cert.pem").write_text("garbage\n")
    os.kill(pid, signal.SIGHUP)
    wait_for_sync(lambda: "some parts kept" in d.log.read_text(), 10)
    failed = [l for l in d.log.read_text().splitlines() if "some parts kept" in l]
    assert len(failed) == 1 and str(tmp_path / "tls" / "cert.pem") in failed[0]
    assert tls_serial(port) == new_serial
    assert d.proc.poll() is None
