"""TLS-RPT (RFC 8460, backend/reports/tlsrpt.py) on loopback: a real nsd publishes remote.test with
an MTA-STS enforce policy and ``_smtp._tls`` rua=mailto:tlsrpt@remote.test; of its MX hosts the
first does not offer STARTTLS, the second shows a certificate for another name, the third an
expired one, the fourth is good. After the delivery the day's report job queues one DKIM-signed
message to tlsrpt@remote.test whose gzip JSON attachment has RFC 8460's structure (checked field
by field against the RFC's list) and counts those sessions; a domain with an https:-only rua gets
no report. Failed MTA-STS policy fetches are reported with their own types."""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import ipaddress
import json
import re
import sqlite3
import ssl

import pytest
import pytest_asyncio

from backend.deliver import outbound
from backend.dns.resolver import make_resolver
from backend.metrics import BackendMetrics
from backend.queue.model import DELIVERED
from backend.reports import db, tlsrpt
from tests.backend.test_dsn_dkim import keys  # noqa: F401 - fixture (an RSA and an Ed25519 key of example.org)
from tests.conftest import require_tool
from tests.lab.delivery import Harness, PolicyServer, Sink, backend_config, run_blocking
from tests.lab.delivery_fixtures import SOURCE, ca, receivers  # noqa: F401 - fixtures
from tests.lab.dkim import verify_all
from tests.lab.nsd import NSD, zone_text

ZONE = """
remote.test.              IN MX 10 mx1.remote.test.
remote.test.              IN MX 20 mx2.remote.test.
remote.test.              IN MX 25 mx4.remote.test.
remote.test.              IN MX 30 mx3.remote.test.
mx4.remote.test.          IN A  127.0.0.30
mx1.remote.test.          IN A  127.0.0.31
mx2.remote.test.          IN A  127.0.0.32
mx3.remote.test.          IN A  127.0.0.33
_mta-sts.remote.test.     IN TXT "v=STSv1; id=1"
mta-sts.remote.test.      IN A  127.0.0.1
_smtp._tls.remote.test.   IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@remote.test"
plain.test.               IN MX 10 mx.plain.test.
mx.plain.test.            IN A  127.0.0.34
_smtp._tls.plain.test.    IN TXT "v=TLSRPTv1;rua=https://tlsrpt.plain.test/v1,mailto:tls%2Brpt@plain.test"
quiet.test.               IN MX 10 mx.quiet.test.
mx.quiet.test.            IN A  127.0.0.35
_smtp._tls.quiet.test.    IN TXT "v=TLSRPTv1; rua=https://tlsrpt.quiet.test/v1"
webpki.test.              IN MX 10 mx.webpki.test.
mx.webpki.test.           IN A  127.0.0.36
_mta-sts.webpki.test.     IN TXT "v=STSv1; id=1"
mta-sts.webpki.test.      IN A  127.0.0.1
_smtp._tls.webpki.test.   IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@webpki.test"
nohttps.test.             IN MX 10 mx.nohttps.test.
mx.nohttps.test.          IN A  127.0.0.37
_mta-sts.nohttps.test.    IN TXT "v=STSv1; id=1"
mta-sts.nohttps.test.     IN A  127.0.0.38
_smtp._tls.nohttps.test.  IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@nohttps.test"
badpolicy.test.           IN MX 10 mx.badpolicy.test.
mx.badpolicy.test.        IN A  127.0.0.39
_mta-sts.badpolicy.test.  IN TXT "v=STSv1; id=1"
mta-sts.badpolicy.test.   IN A  127.0.0.1
_smtp._tls.badpolicy.test. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@badpolicy.test"
"""
def expired_context(ca, name: str):
    """A server context whose certificate (from the lab CA, for the right name) expired an hour ago."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now - datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = ca.dir / f"expired-{name}.crt", ca.dir / f"expired-{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


POLICY = "version: STSv1\r\nmode: enforce\r\nmx: *.remote.test\r\nmax_age: 86400\r\n"


@pytest.fixture(scope="module")
def dns_server():
    require_tool("/usr/sbin/nsd", "dig")
    with NSD({"test": zone_text("test", ZONE)}) as ns:
        yield ns


@pytest_asyncio.fixture
async def policy_server(ca):  # noqa: F811
    # Its certificate names remote.test's and badpolicy.test's policy hosts, not webpki.test's.
    srv = await PolicyServer(ca.server_context("mta-sts.remote.test", "mta-sts.badpolicy.test"),
                             {"mta-sts.remote.test": POLICY, "mta-sts.badpolicy.test": "this is no policy\n"}).start()
    try:
        yield srv
    finally:
        await srv.close()


# ---------------------------------------------------------------- RFC 8460 4.4, as a checker

RESULT_TYPES = {  # RFC 8460 4.3
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
    "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
    "sts-policy-invalid", "sts-webpki-invalid",
}


def _rfc3339(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", v) is not None


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def check_object(obj, required: dict, optional: dict, where: str) -> None:
    assert isinstance(obj, dict), where
    assert set(required) <= set(obj), f"{where}: missing {set(required) - set(obj)}"
    assert set(obj) <= set(required) | set(optional), f"{where}: unknown {set(obj) - set(required) - set(optional)}"
    for k, ok in {**required, **optional}.items():
        if k in obj:
            assert ok(obj[k]), f"{where}.{k} = {obj[k]!r}"


def check_report(r: dict) -> None:
    """RFC 8460 4.4's field list: required and optional members, their types, nothing else."""
    check_object(r, {
        "organization-name": lambda v: isinstance(v, str) and v,
        "date-range": lambda v: isinstance(v, dict),
        "contact-info": lambda v: isinstance(v, str) and v,
        "report-id": lambda v: isinstance(v, str) and v,
        "policies": lambda v: isinstance(v, list) and v,
    }, {}, "report")
    check_object(r["date-range"], {"start-datetime": _rfc3339, "end-datetime": _rfc3339}, {}, "date-range")
    for i, p in enumerate(r["policies"]):
        check_object(p, {"policy": lambda v: isinstance(v, dict), "summary": lambda v: isinstance(v, dict)},
                     {"failure-details": lambda v: isinstance(v, list)}, f"policies[{i}]")
        check_object(p["policy"], {
            "policy-type": lambda v: v in ("tlsa", "sts", "no-policy-found"),
            "policy-domain": lambda v: isinstance(v, str) and v,
        }, {"policy-string": _strings, "mx-host": _strings}, f"policies[{i}].policy")
        check_object(p["summary"], {"total-successful-session-count": _count, "total-failure-session-count": _count},
                     {}, f"policies[{i}].summary")
        for j, f in enumerate(p.get("failure-details", [])):
            check_object(f, {"result-type": lambda v: v in RESULT_TYPES, "failed-session-count": _count}, {
                "sending-mta-ip": lambda v: ipaddress.ip_address(v) is not None,
                "receiving-ip": lambda v: ipaddress.ip_address(v) is not None,
                "receiving-mx-hostname": lambda v: isinstance(v, str),
                "receiving-mx-helo": lambda v: isinstance(v, str),
                "additional-information": lambda v: isinstance(v, str),
                "failure-reason-code": lambda v: isinstance(v, str),
            }, f"policies[{i}].failure-details[{j}]")
        assert p["summary"]["total-failure-session-count"] == sum(
            f["failed-session-count"] for f in p.get("failure-details", []))


def report_of(content: bytes) -> tuple[email.message.Message, str, dict]:
    """(message, attachment filename, JSON report) of an RFC 8460 5.3 mail."""
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    parts = [p for p in msg.iter_parts()]
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    return msg, parts[1].get_filename(), json.loads(gzip.decompress(parts[1].get_content()))


# ---------------------------------------------------------------- the test


@pytest.mark.asyncio
async def test_failed_starttls_and_certificate_mismatch_are_reported_to_the_rua(
    tmp_path, dns_server, ca, receivers, policy_server, keys  # noqa: F811
):
    nostarttls = await receivers.start("127.0.0.31", Sink(), hostname="mx1.remote.test")
    mismatch = await receivers.start("127.0.0.32", Sink(), tls_context=ca.server_context("mx.elsewhere.test"))
    expired = await receivers.start("127.0.0.30", Sink(), tls_context=expired_context(ca, "mx4.remote.test"))
    good = await receivers.start("127.0.0.33", Sink(), tls_context=ca.server_context("mx3.remote.test"))
    cleartext = await receivers.start("127.0.0.34", Sink(), hostname="mx.plain.test")
    await receivers.start("127.0.0.35", Sink(), tls_context=ca.server_context("mx.quiet.test"))
    config = backend_config(tmp_path, delivery={
        "nameservers": [dns_server.address], "dns_port": dns_server.port, "remote_port": receivers.port,
        "source_address": SOURCE, "mta_sts": True, "connect_timeout": "5s", "command_timeout": "10s",
    })
    signer = outbound.make_signer(tuple(k for k, _ in keys.values()), BackendMetrics())
    h = Harness(tmp_path, config, ca_file=ca.ca_file, mtasts_port=policy_server.port, signer=signer)
    try:
        q1 = h.submit("alice@example.org", ["bob@remote.test"])
        q2 = h.submit("alice@example.org", ["carol@plain.test", "dave@quiet.test"])
        await h.round()
        assert h.states(q1)["bob@remote.test"][0] == DELIVERED
        assert {a: s for a, (s, _) in h.states(q2).items()} == {"carol@plain.test": DELIVERED, "dave@quiet.test": DELIVERED}
        # Under enforce neither failing MX got the message; the cleartext one did (opportunistic).
        assert (nostarttls.mail_commands, mismatch.mail_commands, expired.mail_commands, len(good.messages)) == (0, 0, 0, 1)
        assert [m.tls for m in cleartext.messages] == [False]
        assert h.metric("homemx_backend_tls_sessions_total", {"result": "certificate-host-mismatch"}) == 1
        assert h.metric("homemx_backend_tls_sessions_total", {"result": "starttls-not-supported"}) == 2

        resolver = make_resolver(config.delivery.nameservers, config.delivery.dns_port, timeout=3.0)
        reporter = tlsrpt.Reporter(config, h.queue, h.metrics, run_blocking, resolver, signer, now=h.clock)
        assert await reporter.run_once() == []  # the day is not over yet
        h.clock.advance(86400)
        day = tlsrpt.day_of(h.clock.t - 86400)
        outcomes = {dom: out for _, dom, out in await reporter.run_once()}
        assert set(outcomes) == {"remote.test", "plain.test", "quiet.test"}
        assert outcomes["quiet.test"] == "only https: rua (not supported)"
        assert await reporter.run_once() == []  # each day and domain once

        reports = {e.recipients[0].address: e for e in h.others(q1) if e.id != q2}
        assert set(reports) == {"tlsrpt@remote.test", "tls+rpt@plain.test"}
        entry = reports["tlsrpt@remote.test"]
        assert entry.sender == "" and entry.listener == "tlsrpt"
        content = h.queue.content(entry.id)
        assert verify_all(content, keys) == [True, True]  # DKIM-signed by example.org's keys
        msg, filename, report = report_of(content)
        start = int(datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc).timestamp())
        # RFC 8460 5.3 headers, 5.1 file name.
        assert msg["From"] == "postmaster@example.org" and msg["To"] == "tlsrpt@remote.test"
        assert msg["TLS-Report-Domain"] == "remote.test" and msg["TLS-Report-Submitter"] == "mail.example.org"
        assert msg["Subject"] == f"Report Domain: remote.test Submitter: mail.example.org Report-ID: <{report['report-id']}>"
        assert filename == f"mail.example.org!remote.test!{start}!{start + 86399}.json.gz"
        check_report(report)
        assert report["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
        (policy,) = report["policies"]
        assert policy["policy"] == {
            "policy-type": "sts", "policy-domain": "remote.test", "mx-host": ["*.remote.test"],
            "policy-string": ["version: STSv1", "mode: enforce", "mx: *.remote.test", "max_age: 86400"],
        }
        assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 3}
        assert policy["failure-details"] == [
            {"result-type": "certificate-expired", "receiving-mx-hostname": "mx4.remote.test",
             "receiving-ip": "127.0.0.30", "failed-session-count": 1},
            {"result-type": "certificate-host-mismatch", "receiving-mx-hostname": "mx2.remote.test",
             "receiving-ip": "127.0.0.32", "failed-session-count": 1},
            {"result-type": "starttls-not-supported", "receiving-mx-hostname": "mx1.remote.test",
             "receiving-ip": "127.0.0.31", "failed-session-count": 1},
        ]

        _, _, plain = report_of(h.queue.content(reports["tls+rpt@plain.test"].id))
        check_report(plain)
        assert plain["policies"] == [{
            "policy": {"policy-type": "no-policy-found", "policy-domain": "plain.test"},
            "summary": {"total-successful-session-count": 0, "total-failure-session-count": 1},
            "failure-details": [{"result-type": "starttls-not-supported", "receiving-mx-hostname": "mx.plain.test",
                                 "receiving-ip": "127.0.0.34", "failed-session-count": 1}],
        }]
        assert h.metric("homemx_backend_tlsrpt_reports_total", {"outcome": "queued"}) == 2
        assert h.metric("homemx_backend_tlsrpt_reports_total", {"outcome": "skipped"}) == 1
    finally:
        await h.close()


@pytest.mark.asyncio
async def test_failed_policy_fetches_are_reported(tmp_path, dns_server, ca, receivers, policy_server):  # noqa: F811
    """RFC 8460 4.3.2.2: a policy host whose certificate does not verify, one that cannot be
    reached, and one that serves no policy: each delivery (opportunistic then, RFC 8461 5.1) adds
    one failed session of its type beside the successful SMTP session."""
    for i, name in ((36, "webpki"), (37, "nohttps"), (39, "badpolicy")):
        await receivers.start(f"127.0.0.{i}", Sink(), tls_context=ca.server_context(f"mx.{name}.test"))
    config = backend_config(tmp_path, delivery={
        "nameservers": [dns_server.address], "dns_port": dns_server.port, "remote_port": receivers.port,
        "source_address": SOURCE, "mta_sts": True, "connect_timeout": "5s", "command_timeout": "10s",
    })
    h = Harness(tmp_path, config, ca_file=ca.ca_file, mtasts_port=policy_server.port)
    try:
        qid = h.submit("alice@example.org", ["a@webpki.test", "b@nohttps.test", "c@badpolicy.test"])
        await h.round()
        assert {s for s, _ in h.states(qid).values()} == {DELIVERED}
        resolver = make_resolver(config.delivery.nameservers, config.delivery.dns_port, timeout=3.0)
        reporter = tlsrpt.Reporter(config, h.queue, h.metrics, run_blocking, resolver, None, now=h.clock)
        h.clock.advance(86400)
        assert len(await reporter.run_once()) == 3
        got = {}
        for e in h.others(qid):
            _, _, report = report_of(h.queue.content(e.id))
            check_report(report)
            got[e.recipients[0].address] = {
                (p["policy"]["policy-type"], p["summary"]["total-successful-session-count"],
                 tuple(f["result-type"] for f in p.get("failure-details", [])))
                for p in report["policies"]
            }
        assert got == {
            "tlsrpt@webpki.test": {("sts", 0, ("sts-webpki-invalid",)), ("no-policy-found", 1, ())},
            "tlsrpt@nohttps.test": {("sts", 0, ("sts-policy-fetch-error",)), ("no-policy-found", 1, ())},
            "tlsrpt@badpolicy.test": {("sts", 0, ("sts-policy-invalid",)), ("no-policy-found", 1, ())},
        }
    finally:
        await h.close()


def test_result_types_of_tls_failures():
    from backend.deliver.transaction import R_TLS_NOT_OFFERED, HostFailure

    prefix = R_TLS_NOT_OFFERED.partition("{")[0]
    assert tlsrpt.failure_type(HostFailure(R_TLS_NOT_OFFERED.format(host="mx")), prefix) == "starttls-not-supported"
    assert tlsrpt.failure_type(HostFailure("421 4.4.1 Cannot connect to mx: refused"), prefix) is None

    def raised_during(err):
        try:
            try:
                raise err
            except Exception:
                raise HostFailure("421 4.7.5 TLS handshake with mx failed") from None
        except HostFailure as e:
            return e

    for code, want in ((10, "certificate-expired"), (62, "certificate-host-mismatch"), (20, "certificate-not-trusted"),
                       (18, "certificate-not-trusted"), (999, "validation-failure")):
        err = ssl.SSLCertVerificationError(1, "certificate verify failed")
        err.verify_code = code
        assert tlsrpt.failure_type(raised_during(err), prefix) == want
    assert tlsrpt.failure_type(raised_during(ssl.SSLError(1, "wrong version number")), prefix) == "validation-failure"


def test_tlsrpt_record_parsing():
    assert tlsrpt.parse_tlsrpt(["v=TLSRPTv1; rua=mailto:a@b.test,https://r.test/x"]) == ["mailto:a@b.test", "https://r.test/x"]
    assert tlsrpt.parse_tlsrpt(["v=spf1 -all"]) is None
    assert tlsrpt.parse_tlsrpt(["v=TLSRPTv1; rua=mailto:a@b.test", "v=TLSRPTv1; rua=mailto:c@b.test"]) is None  # RFC 8460 3
    assert tlsrpt.mailto_addresses(["mailto:tls%2Brpt@x.test?subject=hi", "https://x.test/"]) == ["tls+rpt@x.test"]


def test_reports_db_keeps_a_month(tmp_path):
    path = db.db_path(tmp_path)
    info = tlsrpt.PolicyInfo("old.test", tlsrpt.NO_POLICY)
    tlsrpt.record(path, "2020-01-01", info, tlsrpt.SUCCESS, "mx.old.test", "192.0.2.1")
    tlsrpt.record(path, "2020-02-15", info, tlsrpt.SUCCESS, "mx.old.test", "192.0.2.1")
    r = tlsrpt.Reporter.__new__(tlsrpt.Reporter)
    r.path = path
    r._purge("2020-02-16")
    with sqlite3.connect(path) as conn:
        assert [d for (d,) in conn.execute("SELECT day FROM tls_policy")] == ["2020-02-15"]


@pytest.mark.asyncio
async def test_the_daemon_sends_reports_of_finished_days_at_start(tmp_path, dns_server):
    """Backend.start runs the report job: a day recorded before (yesterday) is reported at once."""
    from tests.backend.helpers import listener_block, running_backend, wait_for, write_config

    extra = (f'[delivery]\nnameservers = ["{dns_server.address}"]\ndns_port = {dns_server.port}\nmta_sts = false\n'
             f'remote_port = 9\n')
    cfg = write_config(tmp_path, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]), extra=extra)
    (tmp_path / "data").mkdir()
    yesterday = tlsrpt.day_of(datetime.datetime.now(datetime.timezone.utc).timestamp() - 86400)
    tlsrpt.record(db.db_path(tmp_path / "data"), yesterday, tlsrpt.PolicyInfo("remote.test", tlsrpt.NO_POLICY),
                  tlsrpt.STARTTLS_NOT_SUPPORTED, "mx1.remote.test", "127.0.0.31")
    async with running_backend(cfg) as b:
        entries = await wait_for(lambda: [e for e in b.queue.list() if e.listener == "tlsrpt"], timeout=20)
        (entry,) = entries
        assert entry.recipients[0].address == "tlsrpt@remote.test"
        _, _, report = report_of(b.queue.content(entry.id))
        check_report(report)
        assert report["policies"][0]["failure-details"][0]["result-type"] == "starttls-not-supported"
