"""postmaster@ and abuse@ exist with no configuration (RFC 5321 4.5.1, RFC 2142), over a real SMTP session.

They reach the domain's first user, the first line of the passwd file (the first user added), in any
case of the local part; a user, an alias or a catch-all of the domain takes precedence.
"""

from __future__ import annotations

import asyncio
import smtplib

import pytest

from backend.receive.users import UserDB, hash_password
from tests.backend.helpers import ALICE, ALICE_PW, listener_block, maildir_files, running_backend, wait_for, write_config

ZOE = "zoe@example.org"  # the first user, though not the first in alphabetical order


def config(tmp_path, aliases=None):
    cfg = write_config(tmp_path, listener_block("mx", "mx"), users={ALICE: ALICE_PW}, aliases=aliases)
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{ZOE}:{hash_password('zoe-secret-pw', rounds=4)}::::::\n" + passwd.read_text())
    return cfg


def rcpt_only(port: int, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("remote.example")
        s.mail("carol@remote.example")
        return s.rcpt(rcpt)


def send(port: int, rcpts: list[str]) -> dict:
    """A blocking smtplib session (run it in a thread: the backend shares this event loop)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("remote.example")
        s.mail("carol@remote.example")
        replies = {r: s.rcpt(r) for r in rcpts}
        s.data(b"From: carol@remote.example\r\nSubject: complaint\r\n\r\nspam came from you\r\n")
    return replies


@pytest.mark.asyncio
async def test_postmaster_and_abuse_reach_the_first_user_with_no_alias_configured(tmp_path):
    async with running_backend(config(tmp_path)) as b:
        rcpts = ["Postmaster@example.org", "ABUSE@Example.Org", "abuse+bl@example.org"]
        replies = await asyncio.to_thread(send, b.bound_port("mx"), rcpts)
        assert {r: code for r, (code, _) in replies.items()} == dict.fromkeys(replies, 250), replies
        # one delivery per accepted recipient, each to the first user's mailbox
        files = await wait_for(lambda: len(maildir_files(tmp_path, ZOE)) == 3 and maildir_files(tmp_path, ZOE))
    for f in files:
        text = f.read_text()
        assert "Delivered-To: zoe@example.org\n" in text and "spam came from you" in text
    assert maildir_files(tmp_path, ALICE) == []


@pytest.mark.asyncio
async def test_unknown_local_parts_stay_unknown_and_an_explicit_alias_wins(tmp_path):
    async with running_backend(config(tmp_path, aliases={"abuse": [ALICE]})) as b:
        port = b.bound_port("mx")
        code, msg = await asyncio.to_thread(rcpt_only, port, "hostmaster@example.org")
        assert (code, msg[:5]) == (550, b"5.1.1"), (code, msg)  # RFC 2142 names more; only these two are made
        replies = await asyncio.to_thread(send, port, ["abuse@example.org", "postmaster@example.org"])
        assert all(code == 250 for code, _ in replies.values()), replies
        await wait_for(lambda: maildir_files(tmp_path, ALICE) and maildir_files(tmp_path, ZOE))
    assert "Delivered-To: alice@example.org\n" in maildir_files(tmp_path, ALICE)[0].read_text()  # the alias
    assert "Delivered-To: zoe@example.org\n" in maildir_files(tmp_path, ZOE)[0].read_text()  # the default
    assert len(maildir_files(tmp_path, ALICE)) == len(maildir_files(tmp_path, ZOE)) == 1


def test_users_added_later_go_last_so_the_first_user_stays(tmp_path):
    db = UserDB(tmp_path / "passwd")
    for address in ("zoe@example.org", "alice@example.org", "bob@example.net"):
        db.add(address, "pw-" + address)
    assert [line.split(":")[0] for line in (tmp_path / "passwd").read_text().splitlines()] == [
        "zoe@example.org", "alice@example.org", "bob@example.net"]
    assert db.first_user("example.org") == "zoe@example.org"
    assert db.first_user("Example.NET") == "bob@example.net"
    assert db.first_user("example.com") == "zoe@example.org"  # a domain with no user: the file's first
    assert [u.address for u in db.all()] == ["alice@example.org", "bob@example.net", "zoe@example.org"]  # listing sorted
