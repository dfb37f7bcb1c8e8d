"""The outbound-delivery world shared by the delivery tests: nsd serving the test zone (with a SERVFAIL zone),
a test CA, receivers on 127.x addresses, MTA-STS policies over HTTPS, and ``make`` for a queue/runner harness
pointed at them; plus readers of what was delivered (Maildir messages, RFC 3464 reports). Fixtures are
imported by the test modules that use them."""

from __future__ import annotations

import email
import email.policy

import pytest
import pytest_asyncio

from tests.conftest import require_tool
from tests.lab.delivery import Harness, LabCA, PolicyServer, Receivers, ServfailNSD, backend_config
from tests.lab.nsd import zone_text

SOURCE = "127.0.0.2"

ZONE = """
dest.test.            IN MX 10 mx1.dest.test.
mx1.dest.test.        IN A  127.0.0.11
two.test.             IN MX 10 mxdown.two.test.
two.test.             IN MX 20 mxup.two.test.
mxdown.two.test.      IN A  127.0.0.12
mxup.two.test.        IN A  127.0.0.13
nullmx.test.          IN MX 0 .
amx.test.             IN A  127.0.0.14
notls.test.           IN MX 10 mx.notls.test.
mx.notls.test.        IN A  127.0.0.15
badcert.test.         IN MX 10 mx.badcert.test.
mx.badcert.test.      IN A  127.0.0.16
good.test.            IN MX 10 mx.good.test.
mx.good.test.         IN A  127.0.0.18
sts.test.             IN MX 10 mx.sts.test.
mx.sts.test.          IN A  127.0.0.17
_mta-sts.sts.test.    IN TXT "v=STSv1; id=20240601"
mta-sts.sts.test.     IN A  127.0.0.1
stsgood.test.         IN MX 10 mx.stsgood.test.
mx.stsgood.test.      IN A  127.0.0.19
_mta-sts.stsgood.test. IN TXT "v=STSv1; id=1"
mta-sts.stsgood.test. IN A  127.0.0.1
stswrong.test.        IN MX 10 mx.stswrong.test.
mx.stswrong.test.     IN A  127.0.0.21
_mta-sts.stswrong.test. IN TXT "v=STSv1; id=1"
mta-sts.stswrong.test. IN A  127.0.0.1
"""

POLICIES = {
    "mta-sts.sts.test": "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n",
    "mta-sts.stsgood.test": "version: STSv1\r\nmode: enforce\r\nmx: *.stsgood.test\r\nmax_age: 86400\r\n",
    "mta-sts.stswrong.test": "version: STSv1\nmode: enforce\nmx: mail.elsewhere.test\nmax_age: 86400\n",
}


@pytest.fixture(scope="module")
def dns_server():
    require_tool("/usr/sbin/nsd", "dig")
    with ServfailNSD({"test": zone_text("test", ZONE)}, servfail_zones=["broken.test"]) as ns:
        yield ns


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return LabCA(tmp_path_factory.mktemp("ca"))


@pytest_asyncio.fixture
async def receivers():
    r = Receivers()
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
def make(tmp_path, dns_server, ca, receivers):
    """Build a harness whose delivery config points at the test DNS and the receivers' port."""
    harnesses = []

    def _make(mta_sts_port=None, signer=None, deliverer_options=None, **delivery):
        d = {
            "nameservers": [dns_server.address],
            "dns_port": dns_server.port,
            "remote_port": receivers.port,
            "source_address": SOURCE,
            "retry_schedule": ["5m", "15m", "1h"],
            "mta_sts": False,
            "connect_timeout": "5s",
            "command_timeout": "10s",
        }
        d.update(delivery)
        h = Harness(
            tmp_path, backend_config(tmp_path, delivery=d), ca_file=ca.ca_file, mtasts_port=mta_sts_port, signer=signer,
            deliverer_options=deliverer_options,
        )
        harnesses.append(h)
        return h

    yield _make
    for h in harnesses:
        h.queue.close()


def maildir_messages(h, address):
    box = h.config.maildir_for(address) / "new"
    return [p.read_bytes() for p in sorted(box.iterdir())] if box.exists() else []


def parse_dsn(raw: bytes):
    """(message, per-message fields, [per-recipient fields], returned headers text) of an RFC 3464 report."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    groups = parts[1].get_payload()
    return msg, groups[0], groups[1:], parts[2].get_payload()


@pytest_asyncio.fixture
async def policy_server(ca):
    ctx = ca.server_context(*POLICIES)
    srv = await PolicyServer(ctx, POLICIES).start("127.0.0.1")
    try:
        yield srv
    finally:
        await srv.close()
