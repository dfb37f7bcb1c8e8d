"""End to end through the real daemon: AUTH submission → DKIM signing → queue → MX lookup → remote MX, with the
receiver's copy verified by OpenDKIM against the published TXT records.

The backend (backend.run.Backend, in process) resolves the MX through an nsd on loopback; the DKIM
keys and their TXT records come from the namespace fixture of tests.lab.dkim, whose nsd serves them to
opendkim-testmsg inside a throwaway network namespace.
"""

from __future__ import annotations

import asyncio
import ssl

import aiosmtplib
import pytest

from backend.tls.selfsigned import write_self_signed
from backend.run import Backend
from backend.receive.users import UserDB
from tests.lab.delivery import Receivers, Sink, backend_config
from tests.lab.dkim import netns_dns, only_signature, opendkim  # noqa: F401 - fixture reused
from tests.conftest import require_tool
from tests.lab.nsd import NSD, zone_text

pytestmark = pytest.mark.netns

SOURCE = "127.0.0.3"
MESSAGE = (
    "From: Alice <alice@example.org>\r\n"
    "To: Bob <bob@dest.test>\r\n"
    "Subject: end to end\r\n"
    "Date: Mon, 03 Jun 2024 10:00:00 +0000\r\n"
    "Message-ID: <e2e-1@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Hello Bob,\r\n.a line with a leading dot\r\nLF only line follows\n"
    "trailing spaces   \r\n"
)


@pytest.mark.asyncio
async def test_submitted_message_reaches_the_zones_mx_with_both_dkim_signatures_verified(netns_dns, tmp_path):  # noqa: F811
    require_tool("/usr/sbin/nsd", "opendkim-testmsg")
    receivers = Receivers()
    backend = None
    with NSD({"dest.test": zone_text("dest.test", "@ IN MX 10 mx1\nmx1 IN A 127.0.0.31\n")}) as ns:
        try:
            sink = await receivers.start("127.0.0.31", Sink())
            (tmp_path / "tls").mkdir()
            write_self_signed(tmp_path / "tls/cert.pem", tmp_path / "tls/key.pem", "mail.example.org")
            password = "correct horse battery staple"
            UserDB(tmp_path / "passwd").add("alice@example.org", password)
            cfg = backend_config(
                tmp_path,
                delivery={
                    "nameservers": [ns.address],
                    "dns_port": ns.port,
                    "remote_port": receivers.port,
                    "source_address": SOURCE,
                    "mta_sts": True,  # dest.test publishes no policy: delivery goes ahead
                },
                extra={
                    "tls": {"cert": str(tmp_path / "tls/cert.pem"), "key": str(tmp_path / "tls/key.pem")},
                    "listener": [{"name": "submission", "kind": "submission", "listen": "127.0.0.1:0"}],
                    "dkim": [
                        {"domain": k.domain, "selector": k.selector, "algorithm": k.algorithm, "private_key": str(k.private_key)}
                        for k in netns_dns.keys
                    ],
                },
            )
            backend = Backend(cfg)
            await backend.start()
            client_tls = ssl.create_default_context()
            client_tls.check_hostname = False
            client_tls.verify_mode = ssl.CERT_NONE
            await aiosmtplib.send(
                MESSAGE.encode(),
                sender="alice@example.org",
                recipients=["bob@dest.test"],
                hostname="127.0.0.1",
                port=backend.bound_port("submission"),
                start_tls=True,
                tls_context=client_tls,
                username="alice@example.org",
                password=password,
            )
            await asyncio.wait_for(sink.arrived.wait(), 60)
        finally:
            if backend is not None:
                if backend.remote is not None:
                    await backend.remote.close()
                await backend.stop()
            await receivers.close()

    (got,) = sink.messages
    assert got.peer == SOURCE
    assert got.sender == "alice@example.org" and got.rcpts == ["bob@dest.test"]
    signed = got.content
    assert signed.count(b"DKIM-Signature:") == 2
    for alg in ("rsa-sha256", "ed25519-sha256"):
        alone = only_signature(signed, alg)
        assert alone.count(b"DKIM-Signature:") == 1 and f"a={alg};".encode() in alone
        r = opendkim(netns_dns, alone)
        assert r.returncode == 0, (alg, r.stdout, r.stderr)
    # The verifier can fail: the same signatures over a changed body do not verify.
    r = opendkim(netns_dns, only_signature(signed.replace(b"Hello Bob", b"Hello Eve"), "ed25519-sha256"))
    assert r.returncode != 0
    samples = {
        s.labels["algorithm"]: s.value
        for m in backend.metrics.registry.collect()
        if m.name == "homemx_backend_dkim_signatures"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert samples == {"rsa-sha256": 1.0, "ed25519-sha256": 1.0}
