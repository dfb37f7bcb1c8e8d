"""DSNs and delay notices are DKIM-signed like other outbound mail (the signer of backend/deliver/outbound.py), verified with dkimpy.

The first test runs a real `homemx-backend run` with DKIM keys configured and a remote MX that
refuses the recipient: the bounce it queues must verify against the published keys. The second
drives the harness on an injected clock to a delay notice and a final bounce with the same signer.
"""

from __future__ import annotations

import smtplib
import sqlite3
from types import SimpleNamespace

import pytest

from backend.dkim import keys as dkim_keys

from backend.deliver import outbound
from backend.metrics import BackendMetrics
from backend.queue.model import BOUNCED, DEFERRED
from tests.backend.helpers import ALICE, wait_for_sync
from tests.lab.ports import free_port
from tests.lab.delivery_fixtures import ca, dns_server, make, parse_dsn, receivers  # noqa: F401 - fixtures
from tests.lab.refusing_mx import RefusingMX
from tests.lab.delivery import Sink
from tests.lab.dkim import verify_all
from tests.lab.backend import Daemon, daemons, lan_config, queue_db  # noqa: F401 - fixture
from tests.conftest import require_tool
from tests.lab.nsd import NSD, zone_text


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """An RSA and an Ed25519 key for example.org, with their TXT values (test_dkim's shape)."""
    d = tmp_path_factory.mktemp("dsnkeys")
    out = {}
    for alg, sel in (("rsa", "rsa1"), ("ed25519", "ed1")):
        g = dkim_keys.generate_key("example.org", sel, alg, d)
        out[alg] = (SimpleNamespace(domain="example.org", selector=sel, algorithm=alg, private_key=g.path), g.txt_value)
    return out


def dkim_config(keys) -> str:
    return "".join(
        f'[[dkim]]\ndomain = "{k.domain}"\nselector = "{k.selector}"\nalgorithm = "{k.algorithm}"\n'
        f'private_key = "{k.private_key}"\n'
        for k, _ in keys.values()
    )


def test_the_daemons_bounce_is_signed_and_verifies(tmp_path, daemons, keys):
    require_tool("/usr/sbin/nsd")
    remote = RefusingMX("127.0.0.42", 1)
    try:
        with NSD({"refuse.test": zone_text("refuse.test", "@ IN MX 10 mx\nmx IN A 127.0.0.42\n")}) as ns:
            port = free_port()
            cfg = lan_config(
                tmp_path,
                port,
                extra=(
                    f'[delivery]\nnameservers = ["{ns.address}"]\ndns_port = {ns.port}\n'
                    f"remote_port = {remote.port}\nmta_sts = false\n\n" + dkim_config(keys)
                ),
            )
            d = Daemon(cfg).start(port)
            daemons.append(d)
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.sendmail(ALICE, ["nobody@refuse.test"], f"From: {ALICE}\r\nSubject: hi\r\n\r\nbody\r\n")

            def bounce():
                with sqlite3.connect(f"file:{queue_db(tmp_path)}?mode=ro", uri=True) as db:
                    row = db.execute("SELECT content FROM message WHERE sender = ''").fetchone()
                return bytes(row[0]) if row else None

            report = wait_for_sync(bounce, 30)
    finally:
        remote.close()
    msg, per_message, (f,), _ = parse_dsn(report)
    assert msg["Date"].endswith(" +0000") and per_message["Arrival-Date"].endswith(" +0000")  # RFC 5322, not GMT
    assert f["Final-Recipient"] == "rfc822;nobody@refuse.test" and f["Action"] == "failed"
    # From: MAILER-DAEMON@mail.example.org; example.org's keys sign it (relaxed DMARC alignment).
    assert verify_all(report, keys) == [True, True]
    assert verify_all(report.replace(b"No such user here", b"No such user HERE"), keys) == [False, False]


@pytest.mark.asyncio
async def test_delay_notice_and_final_bounce_are_signed(make, receivers, keys):
    await receivers.start("127.0.0.11", Sink(data_replies=["452 4.2.2 Mailbox full"] * 10))
    signer = outbound.make_signer(tuple(k for k, _ in keys.values()), BackendMetrics())
    h = make(signer=signer, delay_notice_after="10m", max_queue_age="1h", retry_schedule=["15m"])
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    h.clock.advance(900)
    await h.round()  # deferred at 15 min: the delay notice
    assert h.states(qid)["bob@dest.test"][0] == DEFERRED
    h.clock.advance(2700)
    await h.round()  # expired at 60 min: the bounce
    assert h.states(qid)["bob@dest.test"][0] == BOUNCED
    reports = [h.queue.content(e.id) for e in h.others(qid)]
    assert sorted(parse_dsn(r)[2][0]["Action"] for r in reports) == ["delayed", "failed"]
    for r in reports:
        assert verify_all(r, keys) == [True, True]
