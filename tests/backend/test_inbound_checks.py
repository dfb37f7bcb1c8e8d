"""The inbound checks wired into a running backend: what an mx listener does with forged, quarantined,
rejected and signed mail, per-domain overrides, record-only mode, and that our own users' mail
(submission, lan) never meets them. DNS is a real nsd on loopback; SMTP real sockets.

The sender zones (client address 127.0.0.1):
  example.org      ours: SPF only for the gateway 203.0.113.5, DMARC p=none (own-domain protection
                   must refuse forgeries whatever we publish)
  quarantine.test  SPF -all elsewhere, p=quarantine          reject.test  the same, p=reject
  signed.test      SPF allows 127.0.0.1, a DKIM key, p=reject   pct0.test    p=reject; pct=0
"""

from __future__ import annotations

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import generate_latest

from backend.queue.store import Queue
from backend.smtp import replies as R
from tests.backend.helpers import ALICE, BOB, RawSMTP, listener_block, running_backend, wait_for, write_config
from tests.backend.test_receive_policy import session, submission_session, transaction
from tests.lab.nsd import NSD, zone_text

OWN = "example.org"


def _key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    import base64

    pub = base64.b64encode(key.public_key().public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    txt = f"v=DKIM1; k=rsa; p={pub}"
    return pem, " ".join(f'"{txt[i:i + 200]}"' for i in range(0, len(txt), 200))


@pytest.fixture(scope="module")
def dns():
    pem, txt = _key()
    spf_elsewhere = '@\tIN\tTXT\t"v=spf1 ip4:203.0.113.9 -all"\n'
    zones = {
        OWN: zone_text(OWN, '@\tIN\tTXT\t"v=spf1 ip4:203.0.113.5 -all"\n_dmarc\tIN\tTXT\t"v=DMARC1; p=none"\n'),
        "quarantine.test": zone_text("quarantine.test", spf_elsewhere + '_dmarc\tIN\tTXT\t"v=DMARC1; p=quarantine"\n'),
        "reject.test": zone_text("reject.test", spf_elsewhere + '_dmarc\tIN\tTXT\t"v=DMARC1; p=reject"\n'),
        "pct0.test": zone_text("pct0.test", spf_elsewhere + '_dmarc\tIN\tTXT\t"v=DMARC1; p=reject; pct=0"\n'),
        "signed.test": zone_text("signed.test", '@\tIN\tTXT\t"v=spf1 ip4:127.0.0.1 -all"\n'
                                 '_dmarc\tIN\tTXT\t"v=DMARC1; p=reject"\n'
                                 f"s1._domainkey\tIN\tTXT\t{txt}\n"),
    }
    with NSD(zones) as ns:
        yield ns, pem


def config(tmp_path, ns, auth: str = "") -> object:
    listeners = (listener_block("mx", "mx") + listener_block("submission", "submission", auth_failure_delay=0)
                 + listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]))
    extra = (f'[delivery]\nnameservers = ["{ns.address}"]\ndns_port = {ns.port}\n\n'
             f'[auth]\nenabled = true\ntimeout = "5s"\n{auth}\n')
    return write_config(tmp_path, listeners, extra=extra)


def message(from_header: str, subject: str, extra: str = "") -> bytes:
    return (f"From: {from_header}\r\nTo: {ALICE}\r\nSubject: {subject}\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject}@test>\r\n{extra}\r\nHello.\r\n").encode()


async def send_mx(b, sender: str, content: bytes, helo: str = "client.example") -> str:
    c = await session(b.bound_port("mx"), helo)
    try:
        return await transaction(c, sender, [ALICE], content)
    finally:
        c.close()


def stored(b) -> list:
    q = Queue(b.config.queue_db, group_commit=False)
    try:
        return [(e, q.content(e.id)) for e in q.list(None)]
    finally:
        q.close()


def folder_files(b, address: str, folder: str | None) -> list[bytes]:
    box = b.config.maildir_for(address)
    if folder:
        box = box / f".{folder}"
    return [p.read_bytes() for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir()]


def ar_of(content: bytes) -> str:
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    fields = [f for f in head.replace("\r\n\t", " ").split("\r\n") if f.lower().startswith("authentication-results:")]
    assert len(fields) == 1, fields
    return fields[0]


def metric(b, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(generate_latest(b.metrics.registry).decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.mark.asyncio
async def test_forged_from_of_our_own_domain_is_refused_even_though_we_publish_p_none(tmp_path, dns):
    ns, _ = dns
    async with running_backend(config(tmp_path, ns)) as b:
        reply = await send_mx(b, ALICE, message(f"Boss <{ALICE}>", "urgent wire transfer"))
        assert reply == R.R550_DMARC_OWN_DOMAIN
        assert stored(b) == []
        assert metric(b, "homemx_backend_messages_received_total", listener="mx", result="rejected") == 1
        assert metric(b, "homemx_backend_auth_verdicts_total", method="dmarc", result="fail") == 1


@pytest.mark.asyncio
async def test_quarantine_policy_files_into_junk_and_reject_policy_refuses(tmp_path, dns):
    ns, _ = dns
    async with running_backend(config(tmp_path, ns)) as b:
        reply = await send_mx(b, "news@quarantine.test", message("news@quarantine.test", "q1"))
        assert reply.startswith("250 2.0.0"), reply
        [junk] = await wait_for(lambda: folder_files(b, ALICE, "Junk"))
        assert folder_files(b, ALICE, None) == []
        ar = ar_of(junk.replace(b"\n", b"\r\n"))
        assert ar.startswith("Authentication-Results: mail.example.org;"), ar
        assert "spf=fail smtp.mailfrom=quarantine.test" in ar and "dmarc=fail header.from=quarantine.test" in ar

        reply = await send_mx(b, "news@reject.test", message("news@reject.test", "r1"))
        assert reply == R.R550_DMARC_REJECT
        # pct=0: the policy is sampled away one step (RFC 7489 6.6.4): reject → quarantine.
        reply = await send_mx(b, "news@pct0.test", message("news@pct0.test", "p1"))
        assert reply.startswith("250 2.0.0"), reply
        await wait_for(lambda: len(folder_files(b, ALICE, "Junk")) == 2)


@pytest.mark.asyncio
async def test_signed_aligned_mail_goes_to_the_inbox_with_pass_results(tmp_path, dns):
    ns, pem = dns
    async with running_backend(config(tmp_path, ns)) as b:
        raw = message("News <news@signed.test>", "s1")
        signed = dkimpy.sign(raw, b"s1", b"signed.test", pem, include_headers=[b"from", b"to", b"subject", b"date"]) + raw
        reply = await send_mx(b, "news@signed.test", signed, helo="mail.signed.test")
        assert reply.startswith("250 2.0.0"), reply
        [got] = await wait_for(lambda: folder_files(b, ALICE, None))
        ar = ar_of(got.replace(b"\n", b"\r\n"))
        assert "spf=pass smtp.mailfrom=signed.test" in ar
        assert "dkim=pass header.d=signed.test header.s=s1 header.a=rsa-sha256" in ar
        assert "dmarc=pass header.from=signed.test" in ar
        # The body altered after signing: the signature fails, SPF still aligns: still a DMARC pass.
        tampered = signed.replace(b"Hello.", b"Hello!")
        assert (await send_mx(b, "news@signed.test", tampered)).startswith("250")
        # Altered and sent from a sender SPF does not cover: nothing aligned passes → 550.
        assert await send_mx(b, "", tampered) == R.R550_DMARC_REJECT


@pytest.mark.asyncio
async def test_a_from_with_two_domains_is_refused(tmp_path, dns):
    ns, _ = dns
    async with running_backend(config(tmp_path, ns)) as b:
        reply = await send_mx(b, "x@remote.test", message("a@remote.test, b@bank.example", "two"))
        assert reply == R.R550_DMARC_MULTIPLE_FROM
        assert stored(b) == []


@pytest.mark.asyncio
async def test_override_and_record_only_mode_let_a_broken_sender_through(tmp_path, dns):
    ns, _ = dns
    async with running_backend(config(tmp_path, ns, 'dmarc_overrides = { "reject.test" = "none" }')) as b:
        reply = await send_mx(b, "news@reject.test", message("news@reject.test", "o1"))
        assert reply.startswith("250 2.0.0"), reply
        [got] = await wait_for(lambda: folder_files(b, ALICE, None))
        assert "dmarc=fail header.from=reject.test policy.dmarc=none" in ar_of(got.replace(b"\n", b"\r\n"))
        # Own-domain protection is not an override's to lift.
        assert await send_mx(b, ALICE, message(ALICE, "o2")) == R.R550_DMARC_OWN_DOMAIN
    (tmp_path / "data").rename(tmp_path / "data1")
    async with running_backend(config(tmp_path, ns, "dmarc_enforce = false")) as b:
        reply = await send_mx(b, "news@reject.test", message("news@reject.test", "o3"))
        assert reply.startswith("250 2.0.0"), reply
        [got] = await wait_for(lambda: folder_files(b, ALICE, None))
        assert "dmarc=fail" in ar_of(got.replace(b"\n", b"\r\n"))


@pytest.mark.asyncio
async def test_our_own_users_mail_never_meets_the_checks_hairpin_and_lan(tmp_path, dns):
    """Your own mail through your own server must not fail your own policy: alice submits (AUTH)
    to bob, a homelab app on the lan submits to alice; both land in the Inbox, unchecked."""
    ns, _ = dns
    async with running_backend(config(tmp_path, ns)) as b:
        c = await submission_session(b.bound_port("submission"))
        try:
            reply = await transaction(c, ALICE, [BOB], message(ALICE, "hairpin").replace(ALICE.encode(), ALICE.encode()))
        finally:
            c.close()
        assert reply.startswith("250 2.0.0"), reply
        c = await session(b.bound_port("lan"), "nas.lan")
        try:
            reply = await transaction(c, "nas@example.org", [ALICE], message("NAS <nas@example.org>", "lan app"))
        finally:
            c.close()
        assert reply.startswith("250 2.0.0"), reply
        await wait_for(lambda: folder_files(b, BOB, None) and folder_files(b, ALICE, None))
        assert folder_files(b, ALICE, "Junk") == [] and folder_files(b, BOB, "Junk") == []
        for raw in folder_files(b, BOB, None) + folder_files(b, ALICE, None):
            assert b"Authentication-Results:" not in raw
        assert metric(b, "homemx_backend_auth_verdicts_total") == 0


@pytest.mark.asyncio
async def test_dns_down_gives_temperror_results_and_the_message_is_accepted(tmp_path, dns):
    ns, _ = dns
    cfg = write_config(tmp_path, listener_block("mx", "mx"),
                       extra='[delivery]\nnameservers = ["127.0.0.1"]\ndns_port = 9\n\n[auth]\ntimeout = "1s"\n')
    async with running_backend(cfg) as b:
        reply = await send_mx(b, "news@quarantine.test", message("news@quarantine.test", "t1"))
        assert reply.startswith("250 2.0.0"), reply
        [got] = await wait_for(lambda: folder_files(b, ALICE, None))
        ar = ar_of(got.replace(b"\n", b"\r\n"))
        assert "spf=temperror" in ar and "dmarc=temperror" in ar, ar


@pytest.mark.asyncio
async def test_scan_listeners_by_kind_scans_a_lan_listener_whatever_its_name(tmp_path):
    """[rspamd] scan_listeners names listeners or kinds: a lan listener called "homelab" is scanned
    when "lan" is listed (GTUBE refused), though its mail is never SPF/DMARC-checked."""
    from tests.lab.rspamd import GTUBE_REJECT, Rspamd

    with Rspamd() as rs:
        cfg = write_config(tmp_path, listener_block("homelab", "lan", trusted_networks=["127.0.0.0/8"]),
                           extra=f'[rspamd]\nurl = "{rs.url}"\nscan_listeners = ["lan"]\n')
        async with running_backend(cfg) as b:
            c = await session(b.bound_port("homelab"), "nas.lan")
            try:
                reply = await transaction(c, "nas@example.org", [ALICE],
                                          message("NAS <nas@example.org>", "gtube") + GTUBE_REJECT + b"\r\n")
            finally:
                c.close()
            assert reply.startswith("550 5.7.1"), reply
            assert stored(b) == []
