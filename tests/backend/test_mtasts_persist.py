"""MTA-STS policies survive a restart (RFC 8461 5.1): a cached enforce policy still holds when the policy host is unreachable.

The sequence test runs the real pieces: nsd serving the TXT record, a loopback HTTPS policy server
with the test CA, an aiosmtpd MX without STARTTLS, and two harnesses on the same data directory
(the second one is the restarted backend: new queue, deliverer and MTA-STS objects, nothing shared
in memory).
"""

from __future__ import annotations

import sqlite3

import dns.resolver
import pytest

from backend.deliver import mtasts
from backend.queue.model import DEFERRED
from tests.lab.delivery_fixtures import ca, dns_server, make, policy_server, receivers  # noqa: F401 - fixtures
from tests.lab.delivery import Sink
from tests.lab.mtasts import POLICY, TableResolver


@pytest.mark.asyncio
async def test_enforce_policy_still_applies_after_a_restart_with_the_policy_host_unreachable(
    make, receivers, policy_server
):
    sink = await receivers.start("127.0.0.17", Sink())  # mx.sts.test: named by the policy, no STARTTLS
    h = make(mta_sts=True, mta_sts_port=policy_server.port)
    qid = h.submit("alice@example.org", ["bob@sts.test"])
    await h.round()
    state, reply = h.states(qid)["bob@sts.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.10"), reply
    assert policy_server.requests == 1
    await h.close()

    await policy_server.close()  # the policy host is now unreachable (connection refused)
    restarted = make(mta_sts=True, mta_sts_port=policy_server.port)
    restarted.clock.advance(300)  # the first retry is due
    await restarted.round()
    state, reply = restarted.states(qid)["bob@sts.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.10"), reply  # still refused in cleartext
    assert restarted.queue.get(qid).recipients[0].attempts == 2  # it was attempted again, not skipped
    assert sink.mail_commands == 0 and sink.messages == []
    assert policy_server.requests == 1


def _rows(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT domain, policy_id, mode, mx, max_age, fetched, expires FROM policy").fetchall()


@pytest.mark.asyncio
async def test_stored_policy_is_applied_when_a_refresh_fails_and_dropped_at_max_age(tmp_path):
    store_path = tmp_path / mtasts.STORE_FILE
    now = [1000.0]
    res = TableResolver()
    res.txt = ["v=STSv1; id=1"]

    async def serve(domain):
        return POLICY

    first = mtasts.MTASTS(res, fetcher=serve, now=lambda: now[0], store=mtasts.PolicyStore(store_path))
    assert (await first.policy("Example.NET")).mode == "enforce"
    # Stored with what RFC 8461 5.1 needs to apply it later: id, mode, mx patterns, expiry.
    assert _rows(store_path) == [
        ("example.net", "1", "enforce", "mail.example.net\n*.example.net", 604800, 1000.0, 1000.0 + 604800)
    ]
    first.store.close()

    async def unreachable(domain):
        raise ConnectionRefusedError("policy host unreachable")

    # A restart, and the TXT id has changed, so a refresh is due; it fails.
    res.txt = ["v=STSv1; id=2"]
    now[0] += 3600
    second = mtasts.MTASTS(res, fetcher=unreachable, now=lambda: now[0], store=mtasts.PolicyStore(store_path))
    pol = await second.policy("example.net")
    assert (pol.mode, pol.id, pol.allows("mx1.example.net")) == ("enforce", "1", True)
    res.txt = dns.resolver.NoNameservers()  # DNS failing too: still the stored policy
    assert (await second.policy("example.net")).id == "1"
    second.store.close()

    now[0] = 1000.0 + 604800  # max_age reached: never applied after expiry, and removed
    res.txt = []
    third = mtasts.MTASTS(res, fetcher=unreachable, now=lambda: now[0], store=mtasts.PolicyStore(store_path))
    assert await third.policy("example.net") is None
    third.store.close()
    assert _rows(store_path) == []
