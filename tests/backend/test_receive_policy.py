"""Reception policy over real sockets: aiosmtpd's per-command call limit, catch-all, sub-addressing, alias loops, the From header and the null sender on submission.

The backend runs in-process (tests.backend.helpers.running_backend), except for alias loops: a
loop that hangs the event loop must fail this test on the client's own timeout, so there the
backend is a separate `homemx-backend run` process.
"""

from __future__ import annotations

import base64
import smtplib
import time

import pytest

from backend.queue.store import Queue
from tests.backend.helpers import (
    ALICE,
    ALICE_PW,
    BOB,
    RawSMTP,
    listener_block,
    maildir_files,
    running_backend,
    wait_for,
    wait_for_sync,
    write_config,
)
from tests.lab.ports import free_port
from tests.lab.backend import Daemon

REMOTE_MSG = b"From: Carol <carol@remote.example>\r\nSubject: in\r\n\r\nHello.\r\n"


def listeners() -> str:
    return (
        listener_block("mx", "mx")
        + listener_block("submission", "submission", auth_failure_delay=0)
        + listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"])
    )


def queued(b) -> list:
    return Queue(b.config.queue_db, group_commit=False).list(None)


async def session(port: int, helo: str = "client.example") -> RawSMTP:
    c = await RawSMTP.connect(port)
    assert (await c.reply()).startswith("220")
    assert (await c.cmd(f"EHLO {helo}")).startswith("250")
    return c


async def submission_session(port: int) -> RawSMTP:
    """Logged in as alice on the submission listener (STARTTLS, then AUTH PLAIN)."""
    c = await session(port, "phone")
    assert (await c.cmd("STARTTLS")).startswith("220")
    await c.starttls()
    await c.cmd("EHLO phone")
    blob = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
    assert (await c.cmd(f"AUTH PLAIN {blob}")).startswith("235")
    return c


async def transaction(c: RawSMTP, sender: str, rcpts: list[str], content: bytes) -> str:
    """MAIL, RCPT..., DATA; returns the reply to the final dot."""
    assert (await c.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
    for r in rcpts:
        reply = await c.cmd(f"RCPT TO:<{r}>")
        assert reply.startswith("250"), (r, reply)
    assert (await c.cmd("DATA")).startswith("354")
    return await c.cmd(content + b".\r\n")


# ---------------------------------------------------------------- aiosmtpd's command_call_limit


@pytest.mark.asyncio
async def test_commands_missing_from_the_call_limit_table_are_not_capped_at_twenty(tmp_path):
    """aiosmtpd caps every command absent from a ``command_call_limit`` dict at 20 per session
    unless the dict has "*" (a known trap): a client that resets between messages would be cut."""
    async with running_backend(write_config(tmp_path, listeners())) as b:
        c = await session(b.bound_port("mx"))
        for _ in range(30):
            assert (await c.cmd("RSET")).startswith("250 2.0.0"), "RSET capped"
        for _ in range(25):
            assert (await c.cmd("HELP")).startswith("250"), "HELP capped"
        for _ in range(25):
            assert (await c.cmd("VRFY postmaster")).startswith("252"), "VRFY capped"
        reply = await transaction(c, "carol@remote.example", [ALICE], REMOTE_MSG)
        assert reply.startswith("250 2.0.0 OK: queued as"), reply
        assert (await c.cmd("QUIT")).startswith("221")
        assert len(queued(b)) == 1


# ---------------------------------------------------------------- who receives


@pytest.mark.asyncio
async def test_catch_all_takes_unknown_local_parts_without_becoming_a_relay(tmp_path):
    async with running_backend(write_config(tmp_path, listeners(), catch_all=ALICE)) as b:
        c = await session(b.bound_port("mx"))
        assert (await transaction(c, "carol@remote.example", ["no.such.user@example.org"], REMOTE_MSG)).startswith("250")
        assert (await transaction(c, "carol@remote.example", [BOB], REMOTE_MSG)).startswith("250")  # users keep theirs
        assert (await c.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
        assert (await c.cmd("RCPT TO:<someone@remote.example>")).startswith("554 5.7.1")  # still no relay
        [alice_file] = await wait_for(lambda: maildir_files(tmp_path, ALICE))
        await wait_for(lambda: maildir_files(tmp_path, BOB))
        assert "Delivered-To: alice@example.org\n" in alice_file.read_text()
        rows = {r.orig_address: r.address for e in queued(b) for r in e.recipients}
        assert rows == {"no.such.user@example.org": ALICE, BOB: BOB}


@pytest.mark.asyncio
async def test_sub_addresses_reach_the_mailbox_or_alias_and_keep_the_original_recipient(tmp_path):
    cfg = write_config(tmp_path, listeners(), aliases={"team": [ALICE, BOB]})
    async with running_backend(cfg) as b:
        c = await session(b.bound_port("mx"))
        assert (await transaction(c, "carol@remote.example", ["alice+news@example.org"], REMOTE_MSG)).startswith("250")
        assert (await transaction(c, "carol@remote.example", ["team+party@example.org"], REMOTE_MSG)).startswith("250")
        assert (await c.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
        assert (await c.cmd("RCPT TO:<nobody+tag@example.org>")).startswith("550 5.1.1")  # no catch-all here
        await wait_for(lambda: len(maildir_files(tmp_path, ALICE)) == 2 and maildir_files(tmp_path, BOB))
        rows = sorted((r.orig_address, r.address) for e in queued(b) for r in e.recipients)
        assert rows == [("alice+news@example.org", ALICE), ("team+party@example.org", ALICE),
                        ("team+party@example.org", BOB)]


ALIAS_WEB = {f"web{i}": [f"web{j}@example.org" for j in range(8)] for i in range(8)}  # every alias names all 8


def test_alias_loops_answer_at_once_and_deliver_once(tmp_path):
    """a → b → a is refused with 550 (nobody receives); a ring through a mailbox delivers once;
    eight aliases naming each other (8^9 expansions if each path were followed) answer at once."""
    port = free_port()
    aliases = {
        "loopa": ["loopb@example.org"], "loopb": ["loopa@example.org"],
        "ring1": ["ring2@example.org", ALICE], "ring2": ["ring1@example.org"],
        **ALIAS_WEB, "webhome": ["web0@example.org", BOB], "web7": [*ALIAS_WEB["web7"], BOB],
    }
    cfg = write_config(tmp_path, listener_block("lan", "lan", f"127.0.0.1:{port}", trusted_networks=["127.0.0.0/8"]),
                       aliases=aliases)
    d = Daemon(cfg)
    try:
        d.start(port)
        # The client's own timeout bounds each reply: a daemon stuck expanding aliases fails here.
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("app")
            s.mail(ALICE)
            t0 = time.monotonic()
            assert s.rcpt("loopa@example.org")[0] == 550
            assert s.rcpt("web3@example.org")[0] == 250  # reaches bob through web7
            assert s.rcpt("ring1@example.org")[0] == 250
            assert time.monotonic() - t0 < 5  # liveness bound, not a benchmark
            code, _ = s.data(f"From: {ALICE}\r\nSubject: loops\r\n\r\nx\r\n")
            assert code == 250
        wait_for_sync(lambda: maildir_files(tmp_path, ALICE) and maildir_files(tmp_path, BOB), 20)
        assert len(maildir_files(tmp_path, ALICE)) == 1 and len(maildir_files(tmp_path, BOB)) == 1
    finally:
        d.stop()


# ---------------------------------------------------------------- the From header and the null sender


@pytest.mark.asyncio
async def test_submission_without_from_or_with_a_second_foreign_from_is_refused(tmp_path):
    async with running_backend(write_config(tmp_path, listeners())) as b:
        for listener in ("submission", "lan"):
            port = b.bound_port(listener)
            c = await (submission_session(port) if listener == "submission" else session(port))
            no_from = b"To: friend@remote.example\r\nSubject: no From\r\n\r\nx\r\n"
            reply = await transaction(c, ALICE, ["friend@remote.example"], no_from)
            assert reply.startswith("550 5.6.0"), (listener, reply)
            # RFC 5322 3.6 allows one From; a second one naming someone else is the spoof a reader may see.
            two = f"From: {ALICE}\r\nFrom: ceo@bank.example\r\nSubject: two\r\n\r\nx\r\n".encode()
            reply = await transaction(c, ALICE, ["friend@remote.example"], two)
            assert reply.startswith("553 5.7."), (listener, reply)
            one_field_two_addresses = f"From: {ALICE}, ceo@bank.example\r\nSubject: two\r\n\r\nx\r\n".encode()
            reply = await transaction(c, ALICE, ["friend@remote.example"], one_field_two_addresses)
            assert reply.startswith("553 5.7."), (listener, reply)
            # The session goes on: a proper message is accepted.
            ok = f"From: {ALICE}\r\nSubject: fine\r\n\r\nx\r\n".encode()
            assert (await transaction(c, ALICE, ["friend@remote.example"], ok)).startswith("250 2.0.0")
            c.close()
        assert len(queued(b)) == 2


@pytest.mark.asyncio
async def test_null_sender_is_refused_on_submission_and_lan_but_not_on_mx(tmp_path):
    async with running_backend(write_config(tmp_path, listeners())) as b:
        sub = await submission_session(b.bound_port("submission"))
        lan = await session(b.bound_port("lan"))
        for c in (sub, lan):
            reply = await c.cmd("MAIL FROM:<>")
            assert reply.startswith("553 5.7.1"), reply
            assert (await c.cmd("RCPT TO:<friend@remote.example>")).startswith("503")  # no transaction began
        mx = await session(b.bound_port("mx"))
        bounce = b"From: MAILER-DAEMON@remote.example\r\nSubject: Undelivered\r\n\r\nx\r\n"
        assert (await transaction(mx, "", [ALICE], bounce)).startswith("250 2.0.0")  # DSNs arrive from <>
        [entry] = queued(b)
        assert entry.sender == "" and entry.listener == "mx"
