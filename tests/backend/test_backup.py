"""``homemx-backend backup`` and ``restore`` (backend/backup.py) on real homes: a real daemon process (as the
unprivileged mail user) receiving mail and keeping a deferred message while the backup runs and more mail
is accepted, then a restore into a new, empty home where a real Dovecot serves the old mail over IMAP and
the message that was queued at backup time reaches a real SMTP sink once its MX answers."""

from __future__ import annotations

import asyncio
import email
import email.policy
import grp
import hashlib
import imaplib
import json
import os
import shutil
import smtplib
import sqlite3
import ssl
import stat
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from tests.backend.helpers import VENV_BIN, run_cli, wait_for, wait_for_sync, write_cert, write_users
from tests.conftest import require_root, require_tool
from tests.lab.backend import Daemon
from tests.lab.delivery import Receivers, Sink
from tests.lab.dovecot import Dovecot
from tests.lab.nsd import NSD, zone_text
from tests.lab.ports import free_port

MAIL_UID = 65534  # nobody: the backend runs as this user; Dovecot maps every user to it
ALICE, ALICE_PW = "alice@example.org", "alice-backup-pw"
MX_ADDR = "127.0.0.47"  # dest.test's MX: refused while the backup is made, a sink after the restore
AS_MAIL_USER = ["setpriv", f"--reuid={MAIL_UID}", f"--regid={MAIL_UID}", "--clear-groups"]
DATA = "server.data_dir"


def home_config(home: Path, *, lan_port: int, nameserver: tuple[str, int] | None, remote_port: int,
                owners: bool = True) -> Path:
    """A home like a provisioned one, but every path relative to the config's folder (so the
    restored config, put in another folder, names that folder's files). ``owners``: hand data
    and keys to the mail user (as root)."""
    write_cert(home / "tls")
    write_users(home / "passwd", {ALICE: ALICE_PW})
    r = run_cli("dkim", "keygen", "--domain", "example.org", "--selector", "s1", "--algorithm", "ed25519",
                "--dir", str(home / "dkim"))
    assert r.returncode == 0, r.stderr
    (key,) = (home / "dkim").iterdir()
    delivery = 'nameservers = ["127.0.0.1"]\ndns_port = 9\n'
    if nameserver:
        delivery = f'nameservers = ["{nameserver[0]}"]\ndns_port = {nameserver[1]}\n'
    cfg = home / "backend.toml"
    cfg.write_text(f"""[server]
hostname = "mail.example.org"
data_dir = "data"
log_level = "info"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"

[users]
passwd_file = "passwd"

[domain."example.org"]

[[listener]]
name = "lan"
kind = "lan"
listen = "127.0.0.1:{lan_port}"
trusted_networks = ["127.0.0.0/8"]

[[dkim]]
domain = "example.org"
selector = "s1"
algorithm = "ed25519"
private_key = "dkim/{key.name}"

[auth]
enabled = false

[dns]
self_check_interval = 0

[delivery]
{delivery}remote_port = {remote_port}
mta_sts = false
retry_schedule = ["1s"]
""")
    cfg.chmod(0o644)
    (home / "data").mkdir()
    if not owners:
        return cfg
    # As provisioning leaves them: the daemon's user owns its data and keys; Dovecot's group reads the users file.
    for p in (home / "data", home / "dkim", home / "tls" / "key.pem", key):
        shutil.chown(p, MAIL_UID, MAIL_UID)
    shutil.chown(home / "passwd", MAIL_UID, "dovecot")
    (home / "passwd").chmod(0o640)
    return cfg


def new_home(prefix: str) -> Path:
    home = Path(tempfile.mkdtemp(prefix=prefix))
    home.chmod(0o711)  # the mail user traverses it; what is secret inside is 0600
    return home


def message(subject: str, to: str, body: str = "") -> bytes:
    return (f"From: Alice <{ALICE}>\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@example.org>"
            f"\r\nDate: Thu, 03 Dec 2026 09:00:00 +0000\r\n\r\n{body or subject}\r\n").encode()


def big_body(tag: str) -> str:
    # Over the spool threshold (256 KiB): the body lives in spool/, not in the queue database.
    return "\r\n".join(f"{tag} line {i:06d} " + "x" * 60 for i in range(5000))


def send(port: int, to: str, content: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(ALICE, [to], content)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def queue_rows(db: Path) -> list[tuple]:
    """(id, spool, size, subject-bearing content or '', recipient state) of every remote recipient."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT m.id, m.spool, m.size, r.state, r.address FROM message m "
                            "JOIN recipient r ON r.message_id = m.id WHERE r.local = 0").fetchall()
    finally:
        conn.close()


def imap_subjects(port: int) -> list[str]:
    m = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ssl._create_unverified_context())
    try:
        m.login(ALICE, ALICE_PW)
        typ, _ = m.select("INBOX", readonly=True)
        assert typ == "OK"
        _, data = m.uid("SEARCH", "ALL")
        out = []
        for uid in data[0].split():
            _, parts = m.uid("FETCH", uid, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            out.append(parts[0][1].decode().strip().removeprefix("Subject: "))
        return out
    finally:
        m.logout()


@pytest.mark.netns
@pytest.mark.asyncio
async def test_backup_while_the_daemon_accepts_mail_then_restore_on_a_new_home_serves_old_mail_and_delivers_the_queue():
    require_root()
    require_tool("dovecot", "/usr/sbin/nsd", "setpriv")
    old, new, store = new_home("homemx-backup-old-"), new_home("homemx-backup-new-"), new_home("homemx-backup-dir-")
    backup = store / "snapshot"
    lan_port, sink_port = free_port(), free_port(MX_ADDR)
    receivers, daemons, dovecot = Receivers(), [], None
    zone = zone_text("dest.test", f"@ IN MX 10 mx1\nmx1 IN A {MX_ADDR}\n")
    try:
        with NSD({"dest.test": zone}) as ns:
            cfg = home_config(old, lan_port=lan_port, nameserver=(ns.address, ns.port), remote_port=sink_port)
            daemon = Daemon(cfg, wrapper=AS_MAIL_USER)
            daemons.append(daemon)
            daemon.start(lan_port)
            inbox = old / "data" / "mail" / "example.org" / "alice" / "Maildir"

            # Old mail in the Maildir, and a large outbound message whose MX refuses: deferred, in spool/.
            for i in range(3):
                send(lan_port, ALICE, message(f"old-{i}", ALICE))
            wait_for_sync(lambda: len(list((inbox / "new").glob("*"))) == 3, 20)
            queued_body = big_body("queued-at-backup")
            send(lan_port, "bob@dest.test", message("queued-at-backup", "bob@dest.test", queued_body))
            wait_for_sync(lambda: any(r[3] == "deferred" for r in queue_rows(old / "data" / "queue.sqlite3")), 20)

            # More mail (local, and large outbound) keeps arriving while the backup runs.
            stop, acked, errors = threading.Event(), [], []

            def keep_sending():
                n = 0
                while not stop.is_set():
                    try:
                        send(lan_port, ALICE, message(f"during-{n}", ALICE))
                        send(lan_port, "bob@dest.test",
                             message(f"during-remote-{n}", "bob@dest.test", big_body(f"during-remote-{n}")))
                        acked.append(n)
                    except Exception as e:  # noqa: BLE001 - reported by the assertion below
                        errors.append(repr(e))
                        return
                    n += 1

            sender = threading.Thread(target=keep_sending)
            sender.start()
            try:
                wait_for_sync(lambda: len(acked) >= 2 or errors, 60)
                before_backup = len(acked)
                r = await asyncio.to_thread(run_cli, "backup", str(backup), "-c", str(cfg), timeout=120)
                wait_for_sync(lambda: len(acked) >= before_backup + 2 or errors, 60)  # it went on accepting
            finally:
                stop.set()
                sender.join(60)
            assert not errors, errors
            assert r.returncode == 0, r.stderr
            assert "backup:" in r.stdout and "spooled" in r.stdout

            # The snapshot and the spool agree: every message in the queue snapshot that has a spool
            # file has exactly that file, whole; no spool file without its record; nothing half-written.
            manifest = json.loads((backup / "manifest.json").read_text())
            files = {e["path"]: e for e in manifest["files"]}
            snap = backup / DATA / "queue.sqlite3"
            rows = queue_rows(snap)
            spooled = {row[1]: row for row in rows if row[1]}
            assert rows and len(spooled) >= 2, rows
            backup_spool = {p.name for p in (backup / DATA / "spool").iterdir()}
            assert backup_spool == set(spooled)
            for name, row in spooled.items():
                path = backup / DATA / "spool" / name
                assert path.stat().st_size == row[2] == files[f"{DATA}/spool/{name}"]["size"]
                assert hashlib.sha256(path.read_bytes()).hexdigest() == files[f"{DATA}/spool/{name}"]["sha256"]
            assert not [p for p in backup.rglob("*") if p.name.endswith((".tmp", "-wal", "-shm", "-journal"))]
            assert not [p for p in backup.rglob("*") if p.parent.name == "tmp" and p.is_file()]
            assert mode(backup) == 0o700
            key_entry = next(e for e in manifest["files"] if e["path"].startswith("dkim.0.private_key/"))
            assert key_entry["mode"] == "0600" and mode(backup / key_entry["path"]) == 0o600
            assert mode(backup / "tls.key" / "key.pem") == 0o600
            # Remote messages of the snapshot, by subject: exactly these must be delivered after the restore.
            snap_conn = sqlite3.connect(snap)
            in_snapshot = {
                email.message_from_bytes(
                    (backup / DATA / "spool" / sp).read_bytes() if sp else content, policy=email.policy.default
                )["Subject"]
                for sp, content in snap_conn.execute(
                    "SELECT m.spool, m.content FROM message m JOIN recipient r ON r.message_id = m.id "
                    # deferred, or accepted just before the snapshot and not attempted yet (queued)
                    "WHERE r.local = 0 AND r.state IN ('deferred', 'queued')")
            }
            snap_conn.close()
            assert "queued-at-backup" in in_snapshot

            # Never under a running daemon, even forced.
            r = run_cli("restore", str(backup), "-c", str(cfg), "--force")
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and "daemon is running" in r.stderr, r.stderr
            daemon.stop()  # the old box is gone

            # A new, empty home: restore (as root), then the daemon as the mail user again.
            new_cfg = new / "backend.toml"
            r = run_cli("restore", str(backup), "-c", str(new_cfg))
            assert r.returncode == 0, r.stderr
            new_key = new / key_entry["path"].replace("dkim.0.private_key/", "dkim/")
            assert mode(new_key) == 0o600 and new_key.stat().st_uid == MAIL_UID
            assert mode(new / "tls" / "key.pem") == 0o600
            assert (new / "data").stat().st_uid == (new / "data" / "queue.sqlite3").stat().st_uid == MAIL_UID
            assert (new / "passwd").stat().st_gid == grp.getgrnam("dovecot").gr_gid and mode(new / "passwd") == 0o640

            receivers.port = sink_port
            sink = await receivers.start(MX_ADDR, Sink())
            new_daemon = Daemon(new_cfg, wrapper=AS_MAIL_USER)
            daemons.append(new_daemon)
            new_daemon.start(lan_port)

            imap_port = free_port()
            dovecot = Dovecot(None, new / "dovecot", address="127.0.0.1", port=imap_port, cert=new / "tls/cert.pem",
                              key=new / "tls/key.pem", passwd=new / "passwd", maildir_root=new / "data" / "mail",
                              trusted="127.0.0.2/32", mail_uid=MAIL_UID, haproxy=False).start()
            subjects = await asyncio.to_thread(imap_subjects, imap_port)
            assert {"old-0", "old-1", "old-2"} <= set(subjects)
            assert {f"during-{n}" for n in range(before_backup)} <= set(subjects)
            assert len(subjects) == len(set(subjects)), "a message restored twice"

            def delivered():
                return {email.message_from_bytes(m.content, policy=email.policy.default)["Subject"]
                        for m in sink.messages}

            await wait_for(lambda: delivered() >= in_snapshot, 60)
            assert delivered() == in_snapshot
            assert len(sink.messages) == len(in_snapshot), "a queued message delivered twice"
            got = next(m for m in sink.messages if b"Subject: queued-at-backup" in m.content)
            assert queued_body.encode() in got.content  # the whole body, from the restored spool file
    finally:
        if dovecot is not None:
            dovecot.stop()
        for d in daemons:
            d.stop()
        await receivers.close()
        for d in (old, new, store):
            shutil.rmtree(d, ignore_errors=True)


def test_restore_checks_every_checksum_refuses_a_non_empty_data_dir_and_keeps_secrets_0600(tmp_path):
    """No daemon here: the state a box accumulates (a Maildir message, an API key store, ACME account and
    certificate with its live symlink, DKIM and TLS keys) backed up and restored, and each refusal."""
    from backend.local.maildir import deliver
    from backend.tls import acme, certfiles
    from backend.tls.selfsigned import make_self_signed

    home = tmp_path / "home"
    home.mkdir()
    cfg = home_config(home, lan_port=free_port(), nameserver=None, remote_port=9, owners=False)
    maildir = home / "data" / "mail" / "example.org" / "alice" / "Maildir"
    deliver(maildir, message("kept", ALICE), uuid.uuid4().hex)
    r = run_cli("apikey", "create", "--name", "app", "--sender", ALICE, "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    acme_dir = home / "data" / "acme"
    certfiles.install(acme_dir, *make_self_signed("mail.example.org", days=30))
    acme.load_or_create_account_key(acme_dir)
    secrets = ["data/apikeys.sqlite3", "data/acme/account.key", "tls/key.pem",
               f"dkim/{next((home / 'dkim').iterdir()).name}"]
    for rel in secrets:
        assert mode(home / rel) == 0o600, rel

    backup = tmp_path / "backup"
    r = run_cli("backup", str(backup), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert mode(backup) == 0o700
    entries = {e["path"]: e for e in json.loads((backup / "manifest.json").read_text())["files"]}
    assert entries[f"{DATA}/apikeys.sqlite3"]["mode"] == entries[f"{DATA}/acme/account.key"]["mode"] == "0600"
    assert entries[f"{DATA}/acme/live"]["type"] == "symlink"

    # Into a new home: every secret 0600 again, the live certificate found through its symlink, the key store usable.
    new_cfg = tmp_path / "new" / "backend.toml"
    r = run_cli("restore", str(backup), "-c", str(new_cfg))
    assert r.returncode == 0, r.stderr
    for rel in secrets:
        assert mode(new_cfg.parent / rel) == 0o600, rel
        if not rel.endswith(".sqlite3"):  # a database is a snapshot (its header says rollback journal, not WAL)
            assert (new_cfg.parent / rel).read_bytes() == (home / rel).read_bytes(), rel
    live_key = certfiles.live_paths(new_cfg.parent / "data" / "acme")[1]
    assert live_key.read_bytes() == certfiles.live_paths(acme_dir)[1].read_bytes() and mode(live_key.resolve()) == 0o600
    r = run_cli("apikey", "list", "--json", "-c", str(new_cfg))
    assert r.returncode == 0 and "app" in r.stdout, r.stderr
    restored = new_cfg.parent / "data" / "mail" / "example.org" / "alice" / "Maildir" / "new"
    assert [p.read_bytes() for p in restored.iterdir()] == [p.read_bytes() for p in (maildir / "new").iterdir()]

    # The same target again: refused, one line naming the data directory; --force writes over it.
    r = run_cli("restore", str(backup), "-c", str(new_cfg))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and str(new_cfg.parent / "data") in r.stderr and "not empty" in r.stderr, r.stderr
    r = run_cli("restore", str(backup), "-c", str(new_cfg), "--force")
    assert r.returncode == 0, r.stderr

    # One byte changed in a copy of the backup: refused before anything is written, one line naming the file.
    tampered = tmp_path / "tampered"
    shutil.copytree(backup, tampered, symlinks=True)
    (victim,) = (tampered / DATA / "mail" / "example.org" / "alice" / "Maildir" / "new").iterdir()
    content = bytearray(victim.read_bytes())
    content[-3] ^= 0x01
    victim.write_bytes(bytes(content))
    third = tmp_path / "third" / "backend.toml"
    r = run_cli("restore", str(tampered), "-c", str(third))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and str(victim) in r.stderr and "checksum mismatch" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not third.parent.exists()

    # A backup never goes into a folder that holds something (an older backup, say).
    r = run_cli("backup", str(backup), "-c", str(cfg))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(backup) in r.stderr, r.stderr


def test_backup_copies_exactly_the_spool_files_its_queue_snapshot_names(tmp_path):
    """What the backup sees when the daemon deletes a message (record first, then its spool file) between
    the queue snapshot and the spool copy, and when it spools a body whose record is not committed yet:
    the backup holds no record without its body and no body without its record."""
    from backend.queue.model import NewMessage, NewRecipient
    from backend.queue.store import Queue

    home = tmp_path / "home"
    home.mkdir()
    cfg = home_config(home, lan_port=free_port(), nameserver=None, remote_port=9, owners=False)
    q = Queue(home / "data" / "queue.sqlite3", group_commit=False)
    ids = {}
    for name in ("kept", "deleted"):
        big = NewMessage(ALICE, (NewRecipient("bob@dest.test", "bob@dest.test", False),),
                         message(name, "bob@dest.test", big_body(name)), "lan")
        ids[name] = q.enqueue(q.spool_large(big))
    spool = home / "data" / "spool"
    conn = sqlite3.connect(home / "data" / "queue.sqlite3")
    names = dict(conn.execute("SELECT id, spool FROM message"))
    conn.close()
    q.close()
    (spool / names[ids["deleted"]]).unlink()  # its record is still in the database the backup copies
    (spool / "ACCEPTED-LATER").write_bytes(b"a body whose record is not committed yet")
    (spool / "HALF.tmp").write_bytes(b"half written")

    backup = tmp_path / "backup"
    r = run_cli("backup", str(backup), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "1 deleted while it ran left out" in r.stdout
    snap = sqlite3.connect(backup / DATA / "queue.sqlite3")
    assert dict(snap.execute("SELECT id, spool FROM message")) == {ids["kept"]: names[ids["kept"]]}
    assert snap.execute("SELECT count(*) FROM recipient WHERE message_id = ?", (ids["deleted"],)).fetchone()[0] == 0
    assert snap.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    snap.close()
    assert sorted(p.name for p in (backup / DATA / "spool").iterdir()) == [names[ids["kept"]]]
    assert (backup / DATA / "spool" / names[ids["kept"]]).read_bytes() == (spool / names[ids["kept"]]).read_bytes()


def test_backup_and_restore_refuse_with_one_line(tmp_path):
    """A backup into the data directory it copies; a restore of a folder that is no (finished) backup."""
    home = tmp_path / "home"
    home.mkdir()
    cfg = home_config(home, lan_port=free_port(), nameserver=None, remote_port=9, owners=False)
    r = run_cli("backup", str(home / "data" / "backups" / "one"), "-c", str(cfg))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "inside" in r.stderr, r.stderr
    assert not (home / "data" / "backups").exists()

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    r = run_cli("restore", str(unfinished), "-c", str(tmp_path / "new" / "backend.toml"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert str(unfinished / "manifest.json") in r.stderr and "missing" in r.stderr
    (unfinished / "manifest.json").write_text('{"format": "homemx-backup", "version": 1, "roles": []}')
    r = run_cli("restore", str(unfinished), "-c", str(tmp_path / "new" / "backend.toml"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "incomplete manifest" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()


def test_a_backup_that_cannot_read_a_file_says_which_and_leaves_no_half_backup():
    """Run as a user who can read the config and what it names, but not the ACME account key (0600, root's)."""
    require_root()
    require_tool("setpriv")
    from backend.tls import acme

    home = new_home("homemx-backup-perm-")
    try:
        cfg = home_config(home, lan_port=free_port(), nameserver=None, remote_port=9, owners=False)
        for p in (home / "data", home / "tls", home / "dkim"):
            p.chmod(0o755)
        for p in (home / "passwd", home / "tls" / "key.pem", *(home / "dkim").iterdir()):
            p.chmod(0o644)  # throwaway keys: readable, so that only the account key is not
        (home / "data" / "acme").mkdir()
        acme.load_or_create_account_key(home / "data" / "acme")
        (home / "data" / "acme").chmod(0o755)
        out = home / "out"
        out.mkdir()
        out.chmod(0o777)
        r = subprocess.run([*AS_MAIL_USER, str(VENV_BIN / "homemx-backend"), "backup", str(out / "b"), "-c", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "permission denied" in r.stderr and "account.key" in r.stderr, r.stderr
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(home, ignore_errors=True)
