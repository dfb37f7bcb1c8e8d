"""The Junk folder as a user sees it: a real Dovecot (tests/lab/dovecot.py, configured with the very
files provisioning gives a user: provision.render.dovecot_junk_conf) over the Maildirs the backend
writes, and a real rspamd (tests/lab/rspamd.py) that learns from the user's moves.

The backend files spam into the Maildir++ folder ``.Junk`` (backend.local.maildir.folder_path);
Dovecot must show it as the special-use \\Junk mailbox (RFC 6154), and IMAPSieve must teach rspamd
spam when a message is moved into Junk and ham when it is moved out (but not into the Trash).
IMAPSieve runs the learning program inside the MOVE command, so its tagged OK is the event after
which rspamd has learned: no waiting.
"""

from __future__ import annotations

import imaplib
import shutil
import ssl
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.backend.helpers import write_cert, write_users
from tests.conftest import require_root, require_tool
from tests.lab.dovecot import Dovecot
from tests.lab.ports import free_port

MAIL_UID = 65534  # nobody: the backend's user; Dovecot's userdb maps every user to it (as in the lab)
USERS = {"alice@example.org": "alice-junk-pw", "bob@example.org": "bob-junk-pw"}

# The backend's own delivery code, run as the mail user like the daemon (Dovecot then reads what it wrote).
DELIVER = """
import sys
from pathlib import Path
from backend.local.maildir import deliver, folder_path
folder = sys.argv[2] or None
deliver(folder_path(Path(sys.argv[1]), folder), sys.stdin.buffer.read(), sys.argv[3])
"""


def message_id(message: bytes) -> str:
    return message.split(b"Message-ID: <", 1)[1].split(b">", 1)[0].decode()


def _message(subject: str) -> bytes:
    # Bayes learns only from messages with enough words (rspamd's min_tokens); every message differs
    # so rspamd's learn cache never answers "already learned".
    words = " ".join(f"{w}{uuid.uuid4().hex[:6]}" for w in ("cheap", "watches", "offer", "today", "click",
                                                              "here", "limited", "deal", "friend", "money",
                                                              "free", "prize", "winner", "claim", "now"))
    return (f"From: Sender <sender@remote.example>\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@remote.example>\r\nDate: Thu, 03 Dec 2026 09:00:00 +0000\r\n"
            f"\r\n{words}\r\n{words}\r\n").encode()


@pytest.fixture(scope="module")
def home():
    require_root()
    require_tool("dovecot", "sievec", "rspamd", "rspamc")
    from tests.lab.rspamd import Rspamd

    work = Path(tempfile.mkdtemp(prefix="homemx-junk-"))
    work.chmod(0o711)  # Dovecot's mail processes (nobody) traverse it; secrets inside are 0600
    try:
        with Rspamd() as rs:
            cert, key = write_cert(work / "tls")
            passwd = work / "passwd"
            write_users(passwd, USERS)
            shutil.chown(passwd, MAIL_UID, "dovecot")
            passwd.chmod(0o640)
            root = work / "mail"
            root.mkdir()
            shutil.chown(root, MAIL_UID, MAIL_UID)
            port = free_port()
            dc = Dovecot(None, work / "dovecot", address="127.0.0.1", port=port, cert=cert, key=key,
                         passwd=passwd, maildir_root=root, trusted="127.0.0.2/32", mail_uid=MAIL_UID,
                         haproxy=False, rspamd_controller=rs.controller).start()
            try:
                yield {"rspamd": rs, "dovecot": dc, "port": port, "root": root}
            finally:
                dc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def maildir(home, user: str) -> Path:
    local, domain = user.split("@")
    return home["root"] / domain / local / "Maildir"


def deliver(home, user: str, message: bytes, folder: str | None) -> None:
    """Deliver as the backend does (its Maildir code, as the mail user)."""
    r = subprocess.run(["setpriv", f"--reuid={MAIL_UID}", f"--regid={MAIL_UID}", "--clear-groups", sys.executable,
                        "-c", DELIVER, str(maildir(home, user)), folder or "", uuid.uuid4().hex],
                       input=message, capture_output=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr.decode()


def imap(home, user: str) -> imaplib.IMAP4_SSL:
    m = imaplib.IMAP4_SSL("127.0.0.1", home["port"], ssl_context=ssl._create_unverified_context())
    m.login(user, USERS[user])
    return m


def subjects(m: imaplib.IMAP4_SSL, mailbox: str) -> list[str]:
    typ, _ = m.select(mailbox)
    assert typ == "OK", mailbox
    typ, data = m.uid("SEARCH", "ALL")
    uids = data[0].split()
    out = []
    for uid in uids:
        typ, parts = m.uid("FETCH", uid, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out.append(parts[0][1].decode().strip().removeprefix("Subject: "))
    return out


def move(m: imaplib.IMAP4_SSL, source: str, subject: str, target: str) -> None:
    """MOVE (RFC 6851) the one message with ``subject`` from ``source`` to ``target``."""
    m.select(source)
    typ, data = m.uid("SEARCH", "SUBJECT", f'"{subject}"')
    uids = data[0].split()
    assert len(uids) == 1, (source, subject, uids)
    typ, data = m.uid("MOVE", uids[0], target)
    assert typ == "OK", data


def learned(rs) -> int:
    """How many messages rspamd's controller has learned (its /stat)."""
    return rs.stat()["learned"]


def learns(rs, message_id: str) -> list[str]:
    """What rspamd's controller learned this message as, in order ("spam", "ham"), from its log."""
    out = []
    for line in rs.log().splitlines():
        if "rspamd_controller_learn_fin_task" in line and line.endswith(f" learned message as spam: {message_id}"):
            out.append("spam")
        elif "rspamd_controller_learn_fin_task" in line and line.endswith(f" learned message as ham: {message_id}"):
            out.append("ham")
    return out


def test_junk_is_the_special_use_junk_mailbox(home):
    """Listed with \\Junk (RFC 6154) and subscribed, for a user whose .Junk the backend made first."""
    deliver(home, "alice@example.org", _message("first spam"), "Junk")
    with imap(home, "alice@example.org") as m:
        typ, lines = m.list()
        assert typ == "OK"
        junk = [line for line in lines if line.endswith(b'"." Junk')]
        assert len(junk) == 1 and b"\\Junk" in junk[0], lines
        typ, lines = m.lsub()
        assert any(line.endswith(b" Junk") for line in lines), lines
        # RFC 6154 5.1: LIST (SPECIAL-USE) returns only the special-use mailboxes (the provisioned
        # configuration makes Drafts, Sent and Trash too)
        typ, lines = m.list('(SPECIAL-USE) ""', "*")
        assert b'(\\Junk) "." Junk' in lines and sorted(line.split()[-1] for line in lines) == [
            b"Drafts", b"Junk", b"Sent", b"Trash"], lines


def test_mail_the_backend_files_into_junk_is_in_junk_over_imap(home):
    deliver(home, "alice@example.org", _message("quarantined by dmarc"), "Junk")
    deliver(home, "alice@example.org", _message("an honest letter"), None)
    with imap(home, "alice@example.org") as m:
        assert "quarantined by dmarc" in subjects(m, "Junk")
        inbox = subjects(m, "INBOX")
        assert "an honest letter" in inbox and "quarantined by dmarc" not in inbox


def test_junk_dovecot_made_first_takes_the_backends_delivery(home):
    """A user who logs in before any spam arrives: Dovecot creates Junk (auto = subscribe), and the
    backend's first spam lands in that same folder."""
    user = "bob@example.org"
    with imap(home, user) as m:
        assert subjects(m, "Junk") == []
    assert (maildir(home, user) / ".Junk" / "maildirfolder").exists()
    deliver(home, user, _message("spam after login"), "Junk")
    with imap(home, user) as m:
        assert subjects(m, "Junk") == ["spam after login"]


def test_moving_into_junk_learns_spam_and_out_of_junk_learns_ham(home):
    rs = home["rspamd"]
    message = _message("missed spam")
    deliver(home, "alice@example.org", message, None)
    with imap(home, "alice@example.org") as m:
        before = learned(rs)
        move(m, "INBOX", "missed spam", "Junk")
        assert learns(rs, message_id(message)) == ["spam"], home["dovecot"].log()
        assert learned(rs) == before + 1
        assert "missed spam" in subjects(m, "Junk")

        move(m, "Junk", "missed spam", "INBOX")
        assert learns(rs, message_id(message)) == ["spam", "ham"], home["dovecot"].log()
        assert learned(rs) == before + 2
        assert "missed spam" in subjects(m, "INBOX")
    # the scripts ran compiled ahead (else Dovecot logs an error at each move: it cannot save the binary)
    assert "Error:" not in home["dovecot"].log(), home["dovecot"].log()


def test_deleting_from_junk_teaches_nothing(home):
    """Moving spam to the Trash is cleaning up, not "this is ham"."""
    rs = home["rspamd"]
    message = _message("spam to delete")
    deliver(home, "alice@example.org", message, "Junk")
    with imap(home, "alice@example.org") as m:
        m.create("Trash")
        before = learned(rs)
        move(m, "Junk", "spam to delete", "Trash")
        assert "spam to delete" in subjects(m, "Trash")
        assert learns(rs, message_id(message)) == [] and learned(rs) == before
