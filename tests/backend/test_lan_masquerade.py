"""lan listener masquerading (backend/smtp/masquerade.py): ``MAIL FROM:<root>`` and ``root@nas`` from a
homelab machine are accepted and rewritten to our domain — envelope, From header — and signed for it,
over real sockets against an in-process backend; mx and submission still answer 501 5.1.3."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest

from backend.config import ConfigError, load_config
from backend.dkim import keys as dkim_keys
from backend.queue.store import Queue
from backend.smtp.masquerade import masquerade_header, needs_masquerade
from tests.backend.helpers import (
    ALICE,
    ALICE_PW,
    RawSMTP,
    listener_block,
    maildir_files,
    running_backend,
    wait_for,
    write_config,
)
from tests.lab.dkim import verify_all

CRON_MSG = b"From: root (Cron Daemon)\r\nTo: root\r\nSubject: Cron <root@nas> backup\r\n\r\nbackup done\r\n"


def fields(message: bytes, name: str) -> list[str]:
    header = message.partition(b"\r\n\r\n")[0].decode()
    unfolded = header.replace("\r\n ", " ").replace("\r\n\t", " ")
    return [ln.split(":", 1)[1].strip() for ln in unfolded.split("\r\n") if ln.lower().startswith(name.lower() + ":")]


@pytest.fixture
def dkim_setup(tmp_path):
    g = dkim_keys.generate_key("example.org", "s1", "ed25519", tmp_path)
    keys = {"ed25519": (SimpleNamespace(domain="example.org", selector="s1", algorithm="ed25519", private_key=g.path),
                        g.txt_value)}
    extra = f'[[dkim]]\ndomain = "example.org"\nselector = "s1"\nalgorithm = "ed25519"\nprivate_key = "{g.path}"\n'
    return keys, extra


async def session(port: int) -> RawSMTP:
    c = await RawSMTP.connect(port)
    assert (await c.reply()).startswith("220")
    assert (await c.cmd("EHLO nas")).startswith("250")
    return c


@pytest.mark.asyncio
async def test_lan_root_and_root_at_nas_are_rewritten_to_our_domain_stored_and_signed(tmp_path, dkim_setup):
    keys, extra = dkim_setup
    cfg = write_config(
        tmp_path,
        listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"], local_hostnames=["nas.home.arpa"]),
        aliases={"root": [ALICE]}, extra=extra,
    )
    async with running_backend(cfg) as b:
        c = await session(b.bound_port("lan"))
        # MAIL FROM:<root>, RCPT TO:<root> (cron's defaults), From: root (Cron Daemon)
        assert (await c.cmd("MAIL FROM:<root>")).startswith("250"), "bare local part refused"
        assert (await c.cmd("RCPT TO:<root>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(CRON_MSG + b".\r\n")).startswith("250 2.0.0")
        # root@nas (single label) and root@nas.home.arpa (a listed host name), From the same
        for sender in ("root@nas", "backup@NAS.home.arpa"):
            assert (await c.cmd(f"MAIL FROM:<{sender}> BODY=8BITMIME")).startswith("250"), sender
            assert (await c.cmd(f"RCPT TO:<{ALICE}>")).startswith("250")
            assert (await c.cmd("DATA")).startswith("354")
            msg = f"From: NAS <{sender}>\r\nSubject: smart\r\n\r\ndisk ok\r\n".encode()
            assert (await c.cmd(msg + b".\r\n")).startswith("250 2.0.0")
        await c.cmd("QUIT")
        entries = sorted(Queue(b.config.queue_db, group_commit=False).list(None), key=lambda e: e.created)
        q = Queue(b.config.queue_db, group_commit=False)
        stored = [q.content(e.id) for e in entries]
        await wait_for(lambda: len(maildir_files(tmp_path, ALICE)) == 3)
    assert [e.sender for e in entries] == ["root@example.org", "root@example.org", "backup@example.org"]
    assert [r.orig_address for r in entries[0].recipients] == ["root@example.org"]
    assert [r.address for r in entries[0].recipients] == [ALICE]
    assert fields(stored[0], "From") == ["Cron Daemon <root@example.org>"]
    assert fields(stored[0], "To") == ["root@example.org"]  # cron's "To: root": an address a reader can answer
    assert fields(stored[1], "From") == ["NAS <root@example.org>"]
    assert fields(stored[2], "From") == ["NAS <backup@example.org>"]
    for m in stored:
        assert verify_all(m, keys) == [True]
        assert "d=example.org" in fields(m, "DKIM-Signature")[0].replace(" ", "")


@pytest.mark.asyncio
async def test_lan_masquerade_domain_is_configurable(tmp_path):
    cfg = write_config(
        tmp_path,
        listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"], masquerade_domain="home.example"),
        extra='[domain."home.example"]\naliases = { root = ["alice@example.org"] }\n',
    )
    async with running_backend(cfg) as b:
        c = await session(b.bound_port("lan"))
        assert (await c.cmd("MAIL FROM:<root@localhost>")).startswith("250")
        assert (await c.cmd("RCPT TO:<root>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(b"From: root@localhost\r\n\r\nx\r\n.\r\n")).startswith("250 2.0.0")
        [e] = Queue(b.config.queue_db, group_commit=False).list(None)
        content = Queue(b.config.queue_db, group_commit=False).content(e.id)
    assert e.sender == "root@home.example" and e.recipients[0].orig_address == "root@home.example"
    assert fields(content, "From") == ["root@home.example"]


@pytest.mark.asyncio
async def test_mx_and_submission_keep_refusing_unqualified_senders(tmp_path):
    cfg = write_config(
        tmp_path,
        listener_block("mx", "mx") + listener_block("submission", "submission", auth_failure_delay=0)
        + listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]),
        aliases={"root": [ALICE]},
    )
    async with running_backend(cfg) as b:
        mx = await session(b.bound_port("mx"))
        for sender in ("root", "root@nas"):
            assert (await mx.cmd(f"MAIL FROM:<{sender}>")).startswith("501 5.1.3"), sender
        assert (await mx.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
        assert (await mx.cmd("RCPT TO:<root>")).startswith("501 5.1.3")
        sub = await session(b.bound_port("submission"))
        assert (await sub.cmd("STARTTLS")).startswith("220")
        await sub.starttls()
        await sub.cmd("EHLO phone")
        blob = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
        assert (await sub.cmd(f"AUTH PLAIN {blob}")).startswith("235")
        for sender in ("alice", "alice@nas"):
            assert (await sub.cmd(f"MAIL FROM:<{sender}>")).startswith("501 5.1.3"), sender
        assert (await sub.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250")
        assert (await sub.cmd("RCPT TO:<root>")).startswith("501 5.1.3")
        # relay disguises stay refused on lan too: the rewrite never makes them an address of ours
        lan = await session(b.bound_port("lan"))
        assert (await lan.cmd("MAIL FROM:<a!b>")).startswith("550 5.7.1")
        assert (await lan.cmd("MAIL FROM:<root@nas.>")).startswith("501 5.1.3")
        assert (await lan.cmd("MAIL FROM:<root@other.example>")).startswith("553 5.7.1")
        for c in (mx, sub, lan):
            c.close()


def test_masquerade_keys_only_on_lan_and_only_to_our_domains(tmp_path):
    base = listener_block("mx", "mx", masquerade_domain="example.org", local_hostnames=["nas"])
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, base))
    assert "listener[0].masquerade_domain" in str(e.value) and "only a lan listener" in str(e.value)
    assert "listener[0].local_hostnames" in str(e.value)
    lan = listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"], masquerade_domain="other.example",
                         local_hostnames=["example.org", "nas"])
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, lan))
    assert str(e.value).count("\n") == 1
    assert "listener[0].masquerade_domain: other.example is not one of the [domain] tables" in str(e.value)
    assert "listener[0].local_hostnames: example.org is a mail domain of ours, not a host" in str(e.value)
    bad = listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"], local_hostnames=["bad_host"])
    with pytest.raises(ConfigError, match=r"listener\[0\]\.local_hostnames: expected a host name .* 'bad_host'"):
        load_config(write_config(tmp_path, bad))


@pytest.mark.parametrize("address, expected", [
    ("root", True), ("root@nas", True), ("root@LOCALHOST", True), ("root@nas.home.arpa", True),
    ("root@example.org", False), ("", False), ("@nas:root@x", False), ("root@mail.example.org", False),
])
def test_needs_masquerade(address, expected):
    assert needs_masquerade(address, ["nas.home.arpa"]) is expected


def test_masquerade_header_rewrites_the_address_fields_only_when_needed():
    header = (b"From: root (Cron Daemon)\r\nSender:\r\n \"Backup, Job\" <backup@nas>\r\nTo: root\r\n"
              b"Reply-To: root\r\nCc: ops@nas, Bob <bob@elsewhere.example>\r\nX-Origin: root@nas\r\n\r\n")
    out = masquerade_header(header, "example.org")
    assert out == (b"From: Cron Daemon <root@example.org>\r\nSender: \"Backup, Job\" <backup@example.org>\r\n"
                   b"To: root@example.org\r\nReply-To: root@example.org\r\n"
                   b"Cc: ops@example.org, Bob <bob@elsewhere.example>\r\nX-Origin: root@nas\r\n\r\n")
    # Nothing to do, a field that does not parse, a group: as written, byte for byte.
    untouched = (b"From: Alice <alice@example.org>\r\nSender: garbage <<\r\nTo: undisclosed-recipients:;\r\n"
                 b"Cc: Bob <bob@elsewhere.example>\r\n\r\n")
    assert masquerade_header(untouched, "example.org") == untouched
