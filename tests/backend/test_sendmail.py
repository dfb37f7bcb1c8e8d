"""``homemx-sendmail`` (backend/cli/sendmail.py) as cron, smartd, mdadm and backup scripts run it: the
real command in a subprocess, a message on its stdin, submitted over real sockets to the lan listener
of a real backend (in-process), and read back from the Maildir; failures give sysexits codes and one
line on stderr."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from backend.cli.sendmail import Options, UsageError, parse_args, parse_message, prepare
from backend.queue.store import Queue
from tests.backend.helpers import (
    ALICE,
    BOB,
    VENV_BIN,
    listener_block,
    maildir_files,
    running_backend,
    wait_for,
    write_config,
)
from tests.lab.ports import free_port

SENDMAIL = str(VENV_BIN / "homemx-sendmail")


def lan_cfg(tmp_path):
    # a real port in the file: the command reads the listener's address from it
    lan = listener_block("lan", "lan", f"127.0.0.1:{free_port()}", trusted_networks=["127.0.0.0/8"])
    return write_config(tmp_path, lan, aliases={"root": [ALICE]})


async def sendmail(cfg, *args: str, stdin: bytes, env: dict | None = None) -> tuple[int, str]:
    argv = [SENDMAIL, *args] if env else [SENDMAIL, "--config", str(cfg), *args]
    p = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    _, err = await asyncio.wait_for(p.communicate(stdin), 60)
    return p.returncode, err.decode()


def header(text: str, name: str) -> list[str]:
    head = re.sub(r"\n[ \t]+", " ", text.partition("\n\n")[0])
    return [ln.split(":", 1)[1].strip() for ln in head.split("\n") if ln.lower().startswith(name.lower() + ":")]


def body(text: str) -> str:
    return text.partition("\n\n")[2]


@pytest.mark.asyncio
async def test_dash_t_reads_recipients_from_the_header_removes_bcc_and_adds_from_date_message_id(tmp_path):
    cfg = lan_cfg(tmp_path)
    msg = b"To: Alice <alice@example.org>\nBcc: bob@example.org\nSubject: mdadm: DegradedArray\n\nmd0 lost a disk\n"
    async with running_backend(cfg) as b:
        rc, err = await sendmail(None, "-t", "-f", "backup@nas", "-F", "Backup Job", stdin=msg,
                                 env={"HOMEMX_CONFIG": str(cfg)})
        assert (rc, err) == (0, "")
        [a] = await wait_for(lambda: maildir_files(tmp_path, ALICE))
        [bb] = await wait_for(lambda: maildir_files(tmp_path, BOB))
        [entry] = Queue(b.config.queue_db, group_commit=False).list(None)
    assert entry.sender == "backup@example.org"  # -f root@nas, masqueraded by the lan listener
    for f in (a, bb):
        text = f.read_text()
        head = text.partition("\n\n")[0].split("\n")
        assert header(text, "Bcc") == []
        assert [ln for ln in head if "bob@" in ln and not ln.startswith("Delivered-To:")] == []
        assert header(text, "From") == ["Backup Job <backup@example.org>"]
        assert header(text, "Subject") == ["mdadm: DegradedArray"]
        assert len(header(text, "Date")) == 1 and len(header(text, "Message-ID")) == 1
        assert header(text, "Message-ID")[0].endswith("@mail.example.org>")
        assert body(text) == "md0 lost a disk\n"


@pytest.mark.asyncio
async def test_cron_style_arguments_recipient_args_and_a_bare_from(tmp_path):
    """Debian cron runs `sendmail -FCronDaemon -i -B8BITMIME -oem root` with `From: root (Cron Daemon)`."""
    cfg = lan_cfg(tmp_path)
    msg = "From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@nas> backup\n" \
          "Content-Type: text/plain; charset=UTF-8\n\nsauvegarde terminée\n.\nstill the body (-i)\n..\n"
    async with running_backend(cfg) as b:
        rc, err = await sendmail(cfg, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-odi", "-bm", "--", "root",
                                 stdin=msg.encode())
        assert (rc, err) == (0, "")
        [f] = await wait_for(lambda: maildir_files(tmp_path, ALICE))
        [entry] = Queue(b.config.queue_db, group_commit=False).list(None)
    text = f.read_bytes().decode()
    assert entry.sender == "root@example.org" and [r.orig_address for r in entry.recipients] == ["root@example.org"]
    assert header(text, "From") == ["Cron Daemon <root@example.org>"]  # the message's own From, masqueraded
    assert body(text) == "sauvegarde terminée\n.\nstill the body (-i)\n..\n"


@pytest.mark.asyncio
@pytest.mark.parametrize("flags, expected", [
    ((), "first part\n"),  # a lone "." ends the message, what follows is not read
    (("-oi",), "first part\n.\nsecond part\n"),
    (("-i",), "first part\n.\nsecond part\n"),
])
async def test_a_lone_dot_ends_the_message_unless_dash_i(tmp_path, flags, expected):
    cfg = lan_cfg(tmp_path)
    async with running_backend(cfg):
        rc, err = await sendmail(cfg, *flags, ALICE, stdin=b"Subject: dots\n\nfirst part\n.\nsecond part\n")
        assert (rc, err) == (0, "")
        [f] = await wait_for(lambda: maildir_files(tmp_path, ALICE))
    text = f.read_text()
    assert body(text) == expected
    pw = __import__("pwd").getpwuid(os.getuid())  # no -f, no From: the login name, with its GECOS name
    name = pw.pw_gecos.split(",")[0]
    assert header(text, "From") == [f"{name} <{pw.pw_name}@example.org>" if name else f"{pw.pw_name}@example.org"]


@pytest.mark.asyncio
async def test_failures_exit_with_sysexits_codes_and_one_line_naming_server_and_reply(tmp_path):
    cfg = lan_cfg(tmp_path)
    msg = b"Subject: x\n\nx\n"
    async with running_backend(cfg) as b:
        port = b.bound_port("lan")
        rc, err = await sendmail(cfg, "nobody@example.org", stdin=msg)
        assert rc == 67 and err.count("\n") == 1, err  # EX_NOUSER
        assert f"127.0.0.1:{port}" in err and "<nobody@example.org>: 550 5.1.1" in err and "not sent" in err
        rc, err = await sendmail(cfg, "-f", "someone@other.example", ALICE, stdin=msg)
        assert rc == 69 and err.count("\n") == 1 and "553 5.7.1" in err, err  # EX_UNAVAILABLE
        rc, err = await sendmail(cfg, ALICE, "nobody@example.org", stdin=msg)
        assert rc == 67
        assert Queue(b.config.queue_db, group_commit=False).list(None) == []  # all or nothing
    # the backend is down: EX_TEMPFAIL
    rc, err = await sendmail(cfg, ALICE, stdin=msg)
    assert rc == 75 and err.count("\n") == 1, err
    assert err.startswith("homemx-sendmail: cannot connect to 127.0.0.1:") and "Connection refused" in err
    # usage and config
    rc, err = await sendmail(cfg, "-bp", stdin=b"")
    assert rc == 64 and "-bp is not supported" in err and "queue list" in err
    rc, err = await sendmail(cfg, "-t", stdin=b"Subject: none\n\nx\n")
    assert rc == 64 and "no recipient" in err
    rc, err = await sendmail(None, ALICE, stdin=msg, env={"HOMEMX_CONFIG": str(tmp_path / "missing.toml")})
    assert rc == 78 and err.count("\n") == 1 and "missing.toml: cannot read" in err


def test_option_parsing_like_sendmail():
    o = parse_args(["-ti", "-fme@nas", "-F", "Me", "-oem", "-odi", "-N", "never", "-v", "a@x.org", "-oi", "--", "-b"])
    assert (o.from_headers, o.dot_ends, o.sender, o.full_name) == (True, False, "me@nas", "Me")
    assert o.recipients == ["a@x.org", "-b"]
    assert parse_args(["-t"]).dot_ends is True
    for bad in (["-bs"], ["-q"], ["-Z"], ["--nope"], ["-f"]):
        with pytest.raises(UsageError):
            parse_args(bad)


def test_prepare_keeps_existing_fields_and_takes_arguments_with_dash_t():
    lines = [b"From alice Thu Dec  3 10:00:00 2026", b"From: Alice <alice@example.org>", b"To: a@example.org,",
             b"  b@example.org", b"Date: Thu, 3 Dec 2026 10:00:00 +0000", b"Message-ID: <1@x>", b"", b"hi"]
    s = prepare(Options(recipients=["c@example.org"], from_headers=True), lines, "root", "", "mail.example.org")
    assert s.recipients == ["c@example.org", "a@example.org", "b@example.org"]
    assert s.sender == "root"
    assert s.content == (b"From: Alice <alice@example.org>\r\nTo: a@example.org,\r\n  b@example.org\r\n"
                         b"Date: Thu, 3 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\nhi\r\n")
    # no header at all: the first line is body, a blank line is put before it
    m = parse_message([b"just text", b"more"])
    assert m.fields == [] and m.body == [b"just text", b"more"]


def test_a_file_with_only_the_lan_listener_is_enough_and_a_wildcard_means_this_host(tmp_path):
    """What the operator guide offers users who cannot read backend.toml (0640 root:homemx)."""
    from backend.cli.sendmail import ConfigProblem, lan_server

    p = tmp_path / "lan.toml"
    p.write_text('[server]\nhostname = "mail.example.org"\n\n[[listener]]\nname = "home"\nkind = "lan"\n'
                 'listen = "0.0.0.0:2525"\n')
    s = lan_server(str(p))
    assert (s.host, s.port, s.hostname, str(s)) == ("127.0.0.1", 2525, "mail.example.org", "127.0.0.1:2525")
    p.write_text('[[listener]]\nname = "mx"\nkind = "mx"\nlisten = "[::]:25"\n')
    with pytest.raises(ConfigProblem, match='no \\[\\[listener\\]\\] with kind = "lan"'):
        lan_server(str(p))
