"""Clear errors instead of tracebacks, and the small protocol promises: unusable DKIM keys and
certificates at start, failed TLS handshakes after STARTTLS, `users add` without a terminal,
client control bytes in the log, no command run after a closing reply, no aiosmtpd warnings per
connection, enhanced status codes on aiosmtpd's own replies, a bare <postmaster>, `Received :`
in loop detection, and Date/Message-ID added on submission (RFC 6409 8).

In-process backends on loopback ports chosen by the OS, except where the daemon's own start-up
and log formatting are what is tested: there a real `homemx-backend run` process."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import re
import socket
import struct
import subprocess
import warnings

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from backend.queue.store import Queue
from backend.receive.users import UserDB
from tests.backend.helpers import (
    ALICE,
    ALICE_PW,
    BACKEND_CLI,
    RawSMTP,
    client_tls,
    listener_block,
    running_backend,
    wait_for,
    wait_for_sync,
    write_config,
)
from tests.lab.ports import free_port
from tests.lab.backend import Daemon

REMOTE_MSG = b"From: Carol <carol@remote.example>\r\nSubject: in\r\n\r\nHello.\r\n"
GOOD = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()


def queued(b) -> list:
    return Queue(b.config.queue_db, group_commit=False).list(None)


def stored(b, qid: str) -> bytes:
    return Queue(b.config.queue_db, group_commit=False).content(qid)


def info_level(cfg):
    """The same config at log level info (no DEBUG lines on stderr)."""
    cfg.write_text(cfg.read_text().replace('log_level = "debug"', 'log_level = "info"'))
    return cfg


async def session(port: int, helo: str = "client.example") -> RawSMTP:
    c = await RawSMTP.connect(port)
    assert (await c.reply()).startswith("220 ")
    assert (await c.cmd(f"EHLO {helo}")).startswith("250")
    return c


async def logged_in(port: int) -> RawSMTP:
    c = await session(port, "phone")
    assert (await c.cmd("STARTTLS")).startswith("220")
    await c.starttls()
    assert (await c.cmd("EHLO phone")).startswith("250")
    assert (await c.cmd(f"AUTH PLAIN {GOOD}")).startswith("235")
    return c


async def send(c: RawSMTP, sender: str, rcpts: list[str], content: bytes) -> str:
    assert (await c.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
    for r in rcpts:
        assert (await c.cmd(f"RCPT TO:<{r}>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    return await c.cmd(content + b".\r\n")


# ---------------------------------------------------------------- unusable keys and certificates at start


def _start_failure(tmp_path, problem: str) -> tuple[str, str, str]:
    """Writes a config whose DKIM key or certificate is readable but unusable; returns the config,
    the file at fault and the reason expected in the message."""
    extra = ""
    fault, reason = "", ""
    if problem.startswith("dkim"):
        key = tmp_path / "dkim.pem"
        if problem == "dkim-garbage":
            key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
            reason = "not a readable rsa private key"
        else:  # an Ed25519 key where the config says RSA
            key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            reason = "not an rsa key"
        extra = f'[[dkim]]\ndomain = "example.org"\nselector = "s1"\nalgorithm = "rsa"\nprivate_key = "{key}"\n'
        fault = str(key)
    cfg = info_level(write_config(tmp_path, listener_block("lan", "lan", f"127.0.0.1:{free_port()}",
                                                           trusted_networks=["127.0.0.0/8"]), extra=extra))
    if problem == "cert-garbage":
        (tmp_path / "tls" / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        fault, reason = str(tmp_path / "tls" / "cert.pem"), ": not a PEM certificate"
    elif problem == "cert-other-key":
        other = ed25519.Ed25519PrivateKey.generate()
        (tmp_path / "tls" / "key.pem").write_bytes(other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        fault, reason = str(tmp_path / "tls" / "key.pem"), ": not the private key of the certificate"
    elif problem == "key-garbage":
        (tmp_path / "tls" / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        fault, reason = str(tmp_path / "tls" / "key.pem"), ": not a PEM private key"
    return str(cfg), fault, reason


@pytest.mark.parametrize("problem", ["dkim-garbage", "dkim-wrong-algorithm", "cert-garbage", "key-garbage", "cert-other-key"])
def test_unusable_dkim_key_or_certificate_is_one_line_naming_the_file(tmp_path, problem):
    """Issue 11 point 8: a readable but invalid DKIM key was a traceback at start. The DKIM key
    is found out when the daemon starts (exit 1, "cannot start"); the certificate already when the
    config is loaded (exit 2, "config error", like any other config problem), and the line says
    which of the two files is wrong (OpenSSL's own reason was "PEM lib" for either)."""
    cfg, fault, reason = _start_failure(tmp_path, problem)
    r = subprocess.run([BACKEND_CLI, "run", "-c", cfg], capture_output=True, text=True, timeout=30)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert fault in lines[0] and reason in lines[0], lines[0]
    if problem.startswith("dkim"):
        assert r.returncode == 1 and lines[0].startswith("homemx-backend: cannot start: ")
    else:
        assert r.returncode == 2 and lines[0].startswith("homemx-backend: config error: ")


# ---------------------------------------------------------------- TLS handshakes that fail after STARTTLS


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["not-tls", "reset", "fin", "silent"])
async def test_failed_starttls_handshake_is_one_info_line(tmp_path, caplog, how):
    """Issue 11 point 8: after "220 Ready to start TLS" a client that sends no TLS, resets or
    hangs up produced ERROR TLSSetupException and asyncio's SSLProtocol._abort TypeError. It is a
    normal network outcome: one INFO line, the connection's outcome, nothing louder. A client
    that stays silent is closed at the idle timeout, and its session ends too (asyncio does not
    report a connection lost mid-handshake: the session used to wait on its reader for ever)."""
    caplog.set_level(logging.DEBUG)
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx", timeout=1))) as b:
        port = b.bound_port("mx")
        c = await session(port)
        assert (await c.cmd("STARTTLS")).startswith("220 2.0.0")
        sock = c.writer.get_extra_info("socket")
        if how == "not-tls":
            await c.send(b"EHLO this is not a ClientHello\r\n" * 10)
        elif how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        elif how == "fin":
            c.writer.write_eof()
        await wait_for(lambda: "outcome=" in caplog.text)
        assert not b.sessions.sessions
        c.close()
        # The server goes on serving.
        c = await session(port)
        assert (await c.cmd("QUIT")).startswith("221")
        await wait_for(lambda: caplog.text.count("outcome=") == 2)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    assert "Traceback" not in caplog.text
    handshake = [r for r in caplog.records if "handshake failed" in r.getMessage()]
    assert len(handshake) == 1 and handshake[0].levelno == logging.INFO
    assert caplog.text.count("outcome=timeout" if how == "silent" else "outcome=tls-failed") == 1


# ---------------------------------------------------------------- users add without a terminal


@pytest.mark.parametrize("how", ["piped", "password-file-dash"])
def test_users_add_reads_a_piped_password(tmp_path, how):
    """Issue 11 point 8: `users add` with the password on a pipe and no terminal was an EOFError
    traceback (getpass read the first line, then "again:" found the pipe empty)."""
    cfg = write_config(tmp_path, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]))
    args = [BACKEND_CLI, "users", "add", "carol@example.org", "-c", str(cfg)]
    if how == "password-file-dash":
        args += ["--password-file", "-"]
    # A new session has no controlling terminal: getpass cannot fall back to /dev/tty.
    r = subprocess.run(args, input="carol-pass-123\n", capture_output=True, text=True, timeout=60,
                       start_new_session=True)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    db = UserDB(tmp_path / "passwd")
    assert db.authenticate(b"carol@example.org", b"carol-pass-123") == "carol@example.org"


def test_users_add_with_nothing_on_stdin_says_how(tmp_path):
    cfg = write_config(tmp_path, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]))
    r = subprocess.run([BACKEND_CLI, "users", "add", "carol@example.org", "-c", str(cfg)], input="",
                       capture_output=True, text=True, timeout=60, start_new_session=True)
    assert r.returncode != 0
    assert len(r.stderr.splitlines()) == 1 and "--password-file" in r.stderr, r.stderr
    assert UserDB(tmp_path / "passwd").authenticate(b"carol@example.org", b"") is None


# ---------------------------------------------------------------- client bytes in the log


def test_control_bytes_from_clients_are_escaped_in_the_log(tmp_path):
    """Issue 11 point 8: an unrecognised command was logged as sent, ANSI escape sequences and
    carriage returns included (a client could repaint the operator's terminal or forge a line)."""
    port = free_port()
    cfg = write_config(tmp_path, listener_block("mx", "mx", f"127.0.0.1:{port}"))
    d = Daemon(cfg)
    try:
        d.start(port)
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220")
            s.sendall(b"EHLO \x1b[2Jhost\x07\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"\x1b[31mEVIL\x1b[0m\rFAKE\r\n")
            assert f.readline().startswith(b"500 5.5.1")
            s.sendall(b"QUIT\r\n")
            assert f.readline().startswith(b"221")
        wait_for_sync(lambda: "outcome=closed" in d.log.read_text("utf-8", "replace"), 10)
    finally:
        d.stop()
    log = d.log.read_bytes()
    assert b"\\x1b[31MEVIL\\x1b[0M\\rFAKE" in log  # aiosmtpd upper-cases the command it names
    controls = set(re.findall(rb"[\x00-\x08\x0b-\x1f\x7f]", log))
    assert controls == set(), controls


# ---------------------------------------------------------------- nothing runs after a closing reply


@pytest.mark.asyncio
@pytest.mark.parametrize("closer", ["unrecognized", "call-limit"])
async def test_no_pipelined_command_runs_after_a_closing_reply(tmp_path, caplog, closer):
    """Issue 11 point 8: aiosmtpd closes after "502 too many unrecognized commands" (or a 421 for
    a command sent too often), but went on to read and execute what the client had pipelined."""
    caplog.set_level(logging.DEBUG)
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx"))) as b:
        c = await session(b.bound_port("mx"))
        provocation = b"BOGUS\r\n" * 5 if closer == "unrecognized" else b"NOOP\r\n" * 51
        await c.send(provocation + b"MAIL FROM:<carol@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
                     b"DATA\r\n" + REMOTE_MSG + b".\r\n")
        data = await asyncio.wait_for(c.reader.read(), 10)  # to the server's close
        last = data.decode().rstrip("\r\n").split("\r\n")[-1]
        if closer == "unrecognized":
            assert last.startswith("502 5.5.1 Too many unrecognized commands"), last
        else:
            assert last.startswith("421 4.7.0 NOOP sent too many times"), last
        await wait_for(lambda: "outcome=" in caplog.text)
    # aiosmtpd logs every line it reads (mail.log, at INFO): the MAIL line was never even read.
    assert "MAIL FROM" not in caplog.text
    assert "carol@remote.example" not in caplog.text
    assert queued(b) == []


# ---------------------------------------------------------------- aiosmtpd's per-connection warnings


@pytest.mark.asyncio
async def test_no_aiosmtpd_warnings_per_connection(tmp_path, caplog):
    """Issue 11 point 8: every 465 connection logged "auth_required == True but auth_require_tls
    == False" and every login "Session.login_data is deprecated"."""
    caplog.set_level(logging.DEBUG)
    cfg = write_config(tmp_path, listener_block("submission", "submission") + listener_block("smtps", "submissions"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with running_backend(cfg) as b:
            c = await logged_in(b.bound_port("submission"))
            assert (await c.cmd("QUIT")).startswith("221")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", b.bound_port("smtps"), ssl=client_tls(), server_hostname="x")
            s = RawSMTP(reader, writer)
            assert (await s.reply()).startswith("220")
            await s.cmd("EHLO phone")
            assert (await s.cmd(f"AUTH PLAIN {GOOD}")).startswith("235")
            assert (await s.cmd("QUIT")).startswith("221")
            await wait_for(lambda: caplog.text.count("outcome=") == 2)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == []
    assert [str(w.message) for w in caught if "aiosmtpd" in w.filename] == []


# ---------------------------------------------------------------- aiosmtpd's own replies


ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3} ")


async def _replies_to_provocations(tmp_path) -> dict[str, str]:
    cfg = write_config(tmp_path, listener_block("mx", "mx") + listener_block("submission", "submission"))
    notls = tmp_path / "notls"
    notls.mkdir()
    cfg2 = write_config(notls, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]))  # lan may run without TLS
    cfg2.write_text(re.sub(r"\[tls\]\ncert = .*\nkey = .*\n", "", cfg2.read_text()))
    out = {}
    async with running_backend(cfg) as b, running_backend(cfg2) as bare:
        mx, sub = b.bound_port("mx"), b.bound_port("submission")
        c = await RawSMTP.connect(mx)
        await c.reply()
        out["MAIL before HELO"] = await c.cmd("MAIL FROM:<carol@remote.example>")
        out["empty line"] = await c.cmd("")
        out["line too long"] = await c.cmd("NOOP " + "x" * 2000)
        await c.cmd("EHLO client.example")
        out["HELP"] = await c.cmd("HELP")
        out["HELP MAIL"] = await c.cmd("HELP MAIL")
        out["HELP BOGUS"] = await c.cmd("HELP BOGUS")
        out["EXPN"] = await c.cmd("EXPN staff")
        out["VRFY"] = await c.cmd("VRFY alice")
        out["DATA before MAIL"] = await c.cmd("DATA")
        out["RCPT before MAIL"] = await c.cmd("RCPT TO:<alice@example.org>")
        out["unknown command"] = await c.cmd("FROB")
        out["MAIL syntax"] = await c.cmd("MAIL carol@remote.example")
        c = await RawSMTP.connect(sub)
        await c.reply()
        out["AUTH before EHLO"] = await c.cmd(f"AUTH PLAIN {GOOD}")
        await c.cmd("EHLO phone")
        await c.cmd("STARTTLS")
        await c.starttls()
        await c.cmd("EHLO phone")
        out["AUTH without mechanism"] = await c.cmd("AUTH")
        out["AUTH with too many values"] = await c.cmd("AUTH PLAIN a b")
        out["AUTH unknown mechanism"] = await c.cmd("AUTH CRAM-MD5")
        out["second STARTTLS"] = await c.cmd("STARTTLS")
        c = await session(bare.bound_port("lan"))
        out["STARTTLS without certificate"] = await c.cmd("STARTTLS")
    return out


@pytest.mark.asyncio
async def test_aiosmtpd_replies_carry_enhanced_status_codes(tmp_path):
    """Issue 11 point 8 (RFC 2034: every reply after the greeting and EHLO carries one)."""
    replies = await _replies_to_provocations(tmp_path)
    bare = {k: v for k, v in replies.items() if not all(ENHANCED.match(line) for line in v.splitlines())}
    assert bare == {}
    assert replies["MAIL before HELO"].startswith("503 5.5.1")
    assert replies["AUTH with too many values"].startswith("501 5.5.4")
    assert replies["STARTTLS without certificate"].startswith("454 4.7.0")
    # TLS inside TLS is refused (aiosmtpd would stack a second SSLProtocol on the first).
    assert replies["second STARTTLS"].startswith("503 5.5.1")


# ---------------------------------------------------------------- <postmaster> and Received :


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
async def test_bare_postmaster_is_accepted(tmp_path, path):
    """RFC 5321 4.5.1: <Postmaster> without a domain MUST be accepted (it was 501)."""
    cfg = write_config(tmp_path, listener_block("mx", "mx"), aliases={"postmaster": [ALICE]})
    async with running_backend(cfg) as b:
        c = await session(b.bound_port("mx"))
        assert (await c.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
        assert (await c.cmd(f"RCPT TO:{path}")).startswith("250 2.")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(REMOTE_MSG + b".\r\n")).startswith("250 2.0.0")
        [entry] = queued(b)
        assert [(r.orig_address, r.address) for r in entry.recipients] == [("postmaster@example.org", ALICE)]


@pytest.mark.asyncio
async def test_received_fields_with_space_before_the_colon_count_for_loop_detection(tmp_path):
    """RFC 5322 4.5 allows white space before a field's colon; `Received :` fields were not
    counted, so a loop could hide its hops from the limit."""
    cfg = write_config(tmp_path, listener_block("mx", "mx", max_received_headers=5))
    async with running_backend(cfg) as b:
        c = await session(b.bound_port("mx"))
        hops = b"".join(b"Received" + sep + b": from hop%d by hop%d; Thu, 3 Dec 2026 05:00:00 +0000\r\n" % (i, i + 1)
                        for i, sep in enumerate([b" ", b"\t", b"  ", b" ", b""]))
        reply = await send(c, "carol@remote.example", [ALICE], hops + REMOTE_MSG)
        assert reply.startswith("554 5.4.6"), reply
        # Four hops are still below the limit.
        assert (await send(c, "carol@remote.example", [ALICE], hops.split(b"\r\n", 1)[1] + REMOTE_MSG)).startswith("250")
        assert len(queued(b)) == 1


# ---------------------------------------------------------------- submission hygiene (RFC 6409 8)


RFC5322_DATE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
    r"\d\d:\d\d:\d\d [+-]\d{4}$"
)


def fields(message: bytes, name: str) -> list[str]:
    header = message.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = re.sub(r"\r\n[ \t]+", " ", header)
    return [line.split(":", 1)[1].strip() for line in unfolded.split("\r\n") if line.lower().startswith(name.lower() + ":")]


@pytest.mark.asyncio
@pytest.mark.parametrize("listener", ["submission", "lan"])
async def test_submission_adds_date_and_message_id_when_missing_and_keeps_them_otherwise(tmp_path, listener):
    """Issue 11 point 9 (RFC 6409 8.2-8.3): rspamd scored their absence +3.5. The Date is in RFC
    5322 form with a numeric zone, never the obsolete GMT."""
    cfg = write_config(tmp_path, listener_block("submission", "submission")
                       + listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]))
    async with running_backend(cfg) as b:
        port = b.bound_port(listener)
        c = await (logged_in(port) if listener == "submission" else session(port))
        bare = f"From: {ALICE}\r\nTo: friend@remote.example\r\nSubject: bare\r\n\r\nx\r\n".encode()
        first = (await send(c, ALICE, ["friend@remote.example"], bare)).rsplit(" ", 1)[1]
        dated = (f"From: {ALICE}\r\nTo: friend@remote.example\r\nDate: Tue, 1 Dec 2026 10:00:00 +0100\r\n"
                 f"Message-ID: <mine@example.org>\r\nSubject: dated\r\n\r\nx\r\n").encode()
        second = (await send(c, ALICE, ["friend@remote.example"], dated)).rsplit(" ", 1)[1]
        added = stored(b, first)
        [date] = fields(added, "Date")
        assert RFC5322_DATE.match(date) and "GMT" not in date, date
        assert abs(email.utils.parsedate_to_datetime(date).timestamp() - queued(b)[0].created) < 120
        [mid] = fields(added, "Message-ID")
        assert re.fullmatch(r"<[^<>@\s]+@mail\.example\.org>", mid), mid
        kept = stored(b, second)
        assert fields(kept, "Date") == ["Tue, 1 Dec 2026 10:00:00 +0100"]
        assert fields(kept, "Message-ID") == ["<mine@example.org>"]
        # Every date the server writes itself (Received) has a numeric zone too.
        assert all("GMT" not in r and re.search(r"[+-]\d{4}$", r) for r in fields(added, "Received"))


@pytest.mark.asyncio
async def test_mx_leaves_a_message_without_date_as_it_came(tmp_path):
    """Only the submission server completes a message (RFC 6409 8); a relay or final MTA does not
    add header fields other than trace fields (RFC 5321 6.4)."""
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx"))) as b:
        c = await session(b.bound_port("mx"))
        qid = (await send(c, "carol@remote.example", [ALICE], REMOTE_MSG)).rsplit(" ", 1)[1]
        content = stored(b, qid)
        assert fields(content, "Date") == [] and fields(content, "Message-ID") == []


@pytest.mark.asyncio
async def test_added_date_and_message_id_are_covered_by_the_dkim_signature(tmp_path):
    """RFC 6409 8 fields are added before signing: a verifier sees them signed, and a receiver
    that changes the added Date breaks the signature."""
    from types import SimpleNamespace

    from backend.dkim import keys as dkim_keys
    from tests.lab.dkim import sig_tags, verify_all

    g = dkim_keys.generate_key("example.org", "s1", "ed25519", tmp_path)
    keys = {"ed25519": (SimpleNamespace(domain="example.org", selector="s1", algorithm="ed25519", private_key=g.path),
                        g.txt_value)}
    extra = f'[[dkim]]\ndomain = "example.org"\nselector = "s1"\nalgorithm = "ed25519"\nprivate_key = "{g.path}"\n'
    cfg = write_config(tmp_path, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]), extra=extra)
    async with running_backend(cfg) as b:
        c = await session(b.bound_port("lan"))
        bare = f"From: {ALICE}\r\nTo: friend@remote.example\r\nSubject: bare\r\n\r\nx\r\n".encode()
        qid = (await send(c, ALICE, ["friend@remote.example"], bare)).rsplit(" ", 1)[1]
        signed = stored(b, qid)
    [tags] = sig_tags(signed)
    signed_fields = [h.strip().lower() for h in tags["h"].split(":")]
    assert "date" in signed_fields and "message-id" in signed_fields
    assert verify_all(signed, keys) == [True]
    [date] = fields(signed, "Date")
    assert verify_all(signed.replace(date.encode(), b"Mon, 1 Jan 2024 00:00:00 +0000"), keys) == [False]
