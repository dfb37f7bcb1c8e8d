"""DKIM key rotation as docs/dkim.md describes it: ``dkim keygen`` again, publish, switch the config,
restart; mail queued before the switch leaves with its original signature.

Keys, TXT records and ``[[dkim]]`` tables all come from the keygen command's own output; the
signer is the daemon's (``outbound.make_signer`` on keys loaded by the config loader); messages
cross a real queue and real delivery to an aiosmtpd receiver, and dkimpy verifies what the
receiver got against a TXT lookup serving the published records.
"""

from __future__ import annotations

import re
import tomllib

import dkim as dkimpy
import pytest

from backend.metrics import BackendMetrics
from backend.deliver.outbound import make_signer
from backend.queue.model import BOUNCED, DEFERRED, DELIVERED
from tests.lab.delivery_fixtures import ca, dns_server, maildir_messages, make, receivers  # noqa: F401 - fixtures
from tests.lab.delivery import Sink, backend_config
from tests.lab.dkim import run_dkim_cli, sig_tags


def keygen(keydir, capsys):
    """Run ``dkim keygen`` with its default selectors: ({TXT name: value} to publish, [[dkim]] tables)."""
    assert run_dkim_cli(["dkim", "keygen", "--domain", "example.org", "--dir", str(keydir)]) == 0
    out = capsys.readouterr().out
    zone, _, toml = out.partition("# backend.toml: add these tables")
    records = {}
    for line in zone.splitlines():
        if "\tIN\tTXT\t" in line:
            records[line.split("\t")[0].encode()] = "".join(re.findall(r'"([^"]*)"', line)).encode()
    return records, tomllib.loads(toml)["dkim"]


def signer_for(tmp_path, tables):
    """The daemon's signer for a backend.toml holding these [[dkim]] tables."""
    cfg = backend_config(tmp_path, delivery={}, extra={"dkim": tables})
    return make_signer(cfg.dkim, BackendMetrics())


def verify(message: bytes, published: dict[bytes, bytes]) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of ``message`` with only ``published`` in DNS."""
    d = dkimpy.DKIM(message)
    n = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    out = []
    for i in range(n):
        try:
            out.append(d.verify(idx=i, dnsfunc=lambda name, timeout=5: published.get(name)))
        except dkimpy.ValidationError:
            out.append(False)
    return out


def selectors(message: bytes) -> set[str]:
    return {t["s"] for t in sig_tags(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))}


def message(n: int) -> bytes:
    return (
        f"From: Alice <alice@example.org>\r\nTo: <rcpt{n}@dest.test>\r\nSubject: rotation {n}\r\n"
        f"Date: Mon, 03 Jun 2024 10:00:00 +0000\r\nMessage-ID: <rot-{n}@example.org>\r\n\r\nBody {n}.\r\n"
    ).encode()


@pytest.mark.asyncio
async def test_rotation_signs_new_mail_with_the_new_selector_and_leaves_queued_mail_as_signed(
    make, receivers, tmp_path, capsys
):
    keydir = tmp_path / "dkim"
    old_records, old_tables = keygen(keydir, capsys)
    sink = await receivers.start(
        "127.0.0.11", Sink(data_replies=["451 4.7.1 Greylisted, try later"], rcpt_replies={"nobody@dest.test": "550 5.1.1 No such user"})
    )

    # Before the rotation: a message is signed at acceptance and queued; its first attempt defers.
    old_signer = signer_for(tmp_path, old_tables)
    before = make(signer=old_signer)
    queued = old_signer(message(1), "alice@example.org")
    q1 = before.submit("alice@example.org", ["bob@dest.test"], content=queued)
    await before.round()
    assert before.states(q1)["bob@dest.test"][0] == DEFERRED
    before.queue.close()

    # Rotation: a new key under the next selector, both records published, the config switched to
    # the new tables only, the daemon restarted (a new harness on the same queue).
    new_records, new_tables = keygen(keydir, capsys)
    old_selectors = {t["selector"] for t in old_tables}
    new_selectors = {t["selector"] for t in new_tables}
    assert len(old_selectors) == len(new_selectors) == 2 and not old_selectors & new_selectors
    published = {**old_records, **new_records}
    new_signer = signer_for(tmp_path, new_tables)
    after = make(signer=new_signer)
    q2 = after.submit("alice@example.org", ["carol@dest.test"], content=new_signer(message(2), "alice@example.org"))
    q3 = after.submit("alice@example.org", ["nobody@dest.test"], content=new_signer(message(3), "alice@example.org"))
    after.clock.advance(300)  # q1's retry is due
    await after.round()
    await after.round()  # q3's bounce report reaches alice's Maildir
    assert after.states(q1)["bob@dest.test"][0] == DELIVERED
    assert after.states(q2)["carol@dest.test"][0] == DELIVERED
    assert after.states(q3)["nobody@dest.test"][0] == BOUNCED
    got = {m.rcpts[0]: m.content for m in sink.messages}

    # Queued before the rotation: delivered after it exactly as signed (old selectors only), and it
    # verifies while the old records stay published...
    old_copy = got["bob@dest.test"]
    assert old_copy == queued
    assert selectors(old_copy) == old_selectors
    assert verify(old_copy, published) == [True, True]
    # ...which is why docs/dkim.md keeps them for max_queue_age: without them it fails.
    assert verify(old_copy, new_records) == [False, False]

    # Signed after the rotation: the new selectors only, verified by the new records.
    new_copy = got["carol@dest.test"]
    assert selectors(new_copy) == new_selectors
    assert verify(new_copy, published) == [True, True]
    assert verify(new_copy, new_records) == [True, True]

    # The daemon's own reports are signed with the new key too.
    (report,) = maildir_messages(after, "alice@example.org")
    assert b"multipart/report" in report
    report = report.partition(b"\n")[2].replace(b"\n", b"\r\n")  # drop the Maildir's Return-Path, CRLF again
    assert selectors(report) == new_selectors
    assert verify(report, new_records) == [True, True]
