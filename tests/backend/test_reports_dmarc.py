"""DMARC aggregate reports at the rua address (backend/reports/dmarc.py): reports in the formats big
receivers send (Google: a zip as the whole message; Microsoft: a gzip attachment; Yahoo: plain XML)
are parsed into reports.sqlite3 when the queue runner delivers them to the rua Maildir; hostile
ones (zip and gzip bombs, billion laughs, external entities, huge XML, not a report at all) are
refused with one log line and stored nothing, within bounded time and memory; the delivery
succeeds for every one of them. ``homemx-backend dmarc report`` summarises what was stored."""

from __future__ import annotations

import asyncio
import email.message
import email.policy
import gzip
import io
import json
import logging
import random
import sqlite3
import subprocess
import time
import tracemalloc
import zipfile
import zlib

import pytest

from backend.config import load_config
from backend.metrics import BackendMetrics
from backend.queue.model import NewMessage, NewRecipient
from backend.queue.runner import QueueRunner
from backend.queue.store import Queue
from backend.reports import db, dmarc
from tests.backend.helpers import BACKEND_CLI, listener_block, maildir_files, write_config

RUA = "postmaster@example.org"
GATEWAY4, GATEWAY6 = "192.0.2.25", "2001:db8::25"
NOW = int(time.time())
DAY = 86400


# ---------------------------------------------------------------- fixture generators


def record(ip, count, *, dkim="pass", spf="pass", header_from="example.org", envelope_from="example.org",
           disposition="none", auth_dkim=(("example.org", "s1", "pass"),), auth_spf=(("example.org", "mfrom", "pass"),)):
    return dict(ip=ip, count=count, dkim=dkim, spf=spf, header_from=header_from, envelope_from=envelope_from,
                disposition=disposition, auth_dkim=auth_dkim, auth_spf=auth_spf)


def report_xml(org, report_id, records, *, domain="example.org", begin=NOW - DAY, end=NOW - 1, namespace=False) -> bytes:
    """An aggregate report as RFC 7489 appendix C describes it (``namespace``: the DMARCbis form)."""
    rows = []
    for r in records:
        dk = "".join(f"<dkim><domain>{d}</domain><selector>{s}</selector><result>{res}</result></dkim>"
                     for d, s, res in r["auth_dkim"])
        sp = "".join(f"<spf><domain>{d}</domain><scope>{s}</scope><result>{res}</result></spf>"
                     for d, s, res in r["auth_spf"])
        rows.append(
            f"<record><row><source_ip>{r['ip']}</source_ip><count>{r['count']}</count>"
            f"<policy_evaluated><disposition>{r['disposition']}</disposition><dkim>{r['dkim']}</dkim>"
            f"<spf>{r['spf']}</spf></policy_evaluated></row>"
            f"<identifiers><envelope_from>{r['envelope_from']}</envelope_from>"
            f"<header_from>{r['header_from']}</header_from></identifiers>"
            f"<auth_results>{dk}{sp}</auth_results></record>"
        )
    ns = ' xmlns="urn:ietf:params:xml:ns:dmarc-2.0"' if namespace else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8" ?>\n<feedback{ns}><version>1.0</version>'
        f"<report_metadata><org_name>{org}</org_name><email>noreply-dmarc@{org}</email>"
        f"<report_id>{report_id}</report_id><date_range><begin>{begin}</begin><end>{end}</end></date_range>"
        f"</report_metadata><policy_published><domain>{domain}</domain><adkim>r</adkim><aspf>r</aspf>"
        f"<p>quarantine</p><sp>quarantine</sp><pct>100</pct></policy_published>{''.join(rows)}</feedback>\n"
    ).encode()


def _headers(msg, org, report_id, domain="example.org"):
    msg["From"] = f"noreply-dmarc-support@{org}"
    msg["To"] = RUA
    msg["Subject"] = f"Report domain: {domain} Submitter: {org} Report-ID: <{report_id}>"
    msg["Message-ID"] = f"<{report_id}@{org}>"
    msg["Date"] = "Thu, 03 Dec 2026 00:00:00 +0000"


def zip_bytes(name: str, xml: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, xml)
    return buf.getvalue()


def google_style(report_id: str, records) -> bytes:
    """Google: the whole message is the zip (Content-Type application/zip), no text part."""
    xml = report_xml("google.com", report_id, records)
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    _headers(msg, "google.com", report_id)
    name = f"google.com!example.org!{NOW - DAY}!{NOW - 1}.zip"
    msg.set_content(zip_bytes(name[:-4] + ".xml", xml), maintype="application", subtype="zip", filename=name)
    return msg.as_bytes()


def microsoft_style(report_id: str, records, *, attachment: bytes | None = None) -> bytes:
    """Microsoft: multipart/mixed, a text part and an application/gzip attachment."""
    org = "enterprise.protection.outlook.com"
    xml = report_xml(org, report_id, records, namespace=True)
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    _headers(msg, org, report_id)
    msg.set_content("This is a DMARC aggregate report from Microsoft Corporation.\n")
    msg.add_attachment(attachment if attachment is not None else gzip.compress(xml), maintype="application",
                       subtype="gzip", filename=f"{org}!example.org!{NOW - DAY}!{NOW - 1}.xml.gz")
    return msg.as_bytes()


def yahoo_style(report_id: str, records=None, *, xml: bytes | None = None) -> bytes:
    """Yahoo-style plain XML attachment."""
    xml = xml if xml is not None else report_xml("yahoo.com", report_id, records)
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    _headers(msg, "yahoo.com", report_id)
    msg.set_content("Aggregate report attached.\n")
    msg.add_attachment(xml, maintype="application", subtype="xml", filename=f"yahoo.com!example.org!{NOW}.xml")
    return msg.as_bytes()


def zip_bomb(megabytes: int) -> bytes:
    """A zip whose one member expands to ``megabytes`` MB of zeros (about 1 KB compressed per MB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("report.xml", "w", force_zip64=True) as f:
        f.write(b"<feedback>")
        for _ in range(megabytes):
            f.write(bytes(1 << 20))
    return buf.getvalue()


def lying_zip_bomb() -> bytes:
    """A zip bomb whose headers (local and central) claim 1,000 bytes: the reader must not trust them."""
    blob = bytearray(zip_bomb(15))
    real = (15 << 20) + len(b"<feedback>")
    for old in (real.to_bytes(8, "little"), real.to_bytes(4, "little")):  # zip64 extra fields, then 32-bit fields
        blob = blob.replace(old, (1000).to_bytes(len(old), "little"))
    return bytes(blob)


def gzip_bomb(megabytes: int) -> bytes:
    """A gzip expanding to ``megabytes`` MB of zeros."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    out = [comp.compress(b"<feedback>")]
    out += [comp.compress(bytes(1 << 20)) for _ in range(megabytes)]
    return b"".join(out) + comp.flush()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE feedback [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<feedback><report_metadata><org_name>&lol9;</org_name><report_id>1</report_id></report_metadata></feedback>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE feedback [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<feedback><report_metadata><org_name>&xxe;</org_name><report_id>1</report_id></report_metadata></feedback>
"""


def huge_xml() -> bytes:
    """A well-formed report of about 21 MB whose gzip (about 3 MB) stays under both the attachment
    bound and the ratio bound: only the XML size bound refuses it."""
    rnd = random.Random(7)
    rows = [record(f"198.51.{rnd.randrange(256)}.{rnd.randrange(256)}", rnd.randrange(1, 10**6),
                   header_from=f"h{rnd.getrandbits(40):x}.example.org") for _ in range(45_000)]
    return report_xml("huge.example", "huge-1", rows)


# ---------------------------------------------------------------- the runner delivering to the rua


@pytest.fixture
def cfg_path(tmp_path):
    extra = f'[gateway]\npublic_ipv4 = ["{GATEWAY4}"]\npublic_ipv6 = ["{GATEWAY6}"]\n'
    return write_config(tmp_path, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]), extra=extra)


class Runner:
    """The real queue and queue runner (local delivery only) of the config at ``path``."""

    def __init__(self, path):
        self.config = load_config(path)
        self.config.server.data_dir.mkdir(parents=True, exist_ok=True)
        self.queue = Queue(self.config.queue_db)
        self.metrics = BackendMetrics()
        self.runner = QueueRunner(self.config, self.queue, self.metrics, lambda fn, *a: asyncio.to_thread(fn, *a))

    async def deliver(self, content: bytes, rcpt: str = RUA, folder: str | None = None) -> str:
        qid = self.queue.enqueue(NewMessage(sender="noreply@reporter.test", recipients=(NewRecipient(rcpt, rcpt, True),),
                                            content=content, listener="mx", folder=folder))
        await self.runner.run_once()
        await self.runner.drain(60)  # the report is read beside the runner
        return qid

    def state(self, qid: str) -> str:
        return self.queue.get(qid).recipients[0].state

    def metric(self, name, labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self):
        self.queue.close()


@pytest.fixture
def runner(cfg_path):
    r = Runner(cfg_path)
    yield r
    r.close()


def stored(tmp_path) -> tuple[list, list]:
    path = db.db_path(tmp_path / "data")
    if not path.exists():
        return [], []
    with sqlite3.connect(path) as conn:
        return (conn.execute("SELECT org, report_id, domain FROM dmarc_report ORDER BY org").fetchall(),
                conn.execute("SELECT source_ip, count, disposition, dkim, spf, header_from, envelope_from, auth_dkim,"
                             " auth_spf FROM dmarc_record ORDER BY source_ip").fetchall())


GOOD = [record(GATEWAY4, 12)]
MIXED = [
    record(GATEWAY6, 30),
    record("2001:db8:bad::7", 5, dkim="fail", spf="fail", disposition="quarantine", envelope_from="forger.test",
           auth_dkim=(), auth_spf=(("forger.test", "mfrom", "pass"),)),
    record("203.0.113.9", 2, dkim="pass", spf="fail", header_from="example.org",
           auth_dkim=(("example.org", "s1", "pass"),), auth_spf=(("newsletter.test", "mfrom", "pass"),)),
]


@pytest.mark.asyncio
async def test_reports_of_big_receivers_are_parsed_into_the_database(tmp_path, runner, caplog):
    caplog.set_level(logging.INFO, "homemx.reports")
    g = await runner.deliver(google_style("g-1", GOOD))
    m = await runner.deliver(microsoft_style("m-1", MIXED))
    y = await runner.deliver(yahoo_style("y-1", [record("192.0.2.99", 1, dkim="fail", spf="fail",
                                                        header_from="other.test")]))
    assert [runner.state(q) for q in (g, m, y)] == ["delivered"] * 3
    assert len(maildir_files(tmp_path, RUA)) == 3  # the reports stay in the mailbox too
    reports, records = stored(tmp_path)
    assert reports == [("enterprise.protection.outlook.com", "m-1", "example.org"), ("google.com", "g-1", "example.org"),
                       ("yahoo.com", "y-1", "example.org")]
    by_ip = {r[0]: r for r in records}
    assert set(by_ip) == {GATEWAY4, GATEWAY6, "2001:db8:bad::7", "203.0.113.9", "192.0.2.99"}  # IPv6 compressed
    bad = by_ip["2001:db8:bad::7"]
    assert bad[1:7] == (5, "quarantine", "fail", "fail", "example.org", "forger.test")
    assert json.loads(bad[7]) == [] and json.loads(bad[8]) == [{"domain": "forger.test", "scope": "mfrom", "result": "pass"}]
    assert json.loads(by_ip[GATEWAY4][7]) == [{"domain": "example.org", "selector": "s1", "result": "pass"}]
    assert runner.metric("homemx_backend_dmarc_reports_total", {"outcome": "ingested"}) == 3
    # pass: 12 + 30 + 2 (DKIM aligned); fail: 5 + 1
    assert runner.metric("homemx_backend_dmarc_report_messages_total", {"result": "pass"}) == 44
    assert runner.metric("homemx_backend_dmarc_report_messages_total", {"result": "fail"}) == 6
    assert sum("dmarc report" in r.getMessage() and "records" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.asyncio
async def test_duplicate_report_is_ignored(tmp_path, runner, caplog):
    caplog.set_level(logging.INFO, "homemx.reports")
    first = await runner.deliver(google_style("dup-1", MIXED))
    again = await runner.deliver(google_style("dup-1", MIXED))
    assert runner.state(first) == runner.state(again) == "delivered"
    assert len(maildir_files(tmp_path, RUA)) == 2
    reports, records = stored(tmp_path)
    assert len(reports) == 1 and len(records) == 3
    assert runner.metric("homemx_backend_dmarc_reports_total", {"outcome": "duplicate"}) == 1
    assert runner.metric("homemx_backend_dmarc_report_messages_total", {"result": "fail"}) == 5  # counted once
    assert sum("already stored" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.asyncio
async def test_mail_to_other_addresses_is_not_read_as_a_report(tmp_path, runner):
    qid = await runner.deliver(google_style("not-rua", GOOD), rcpt="alice@example.org")
    assert runner.state(qid) == "delivered"
    assert stored(tmp_path) == ([], [])


@pytest.mark.asyncio
async def test_a_report_the_inbound_checks_filed_as_junk_is_not_read(tmp_path, runner):
    """A forged "report" (failing DMARC, filed as Junk) must not make up sources and verdicts."""
    qid = await runner.deliver(google_style("junk-1", MIXED), folder="Junk")
    assert runner.state(qid) == "delivered"
    assert stored(tmp_path) == ([], [])
    qid = await runner.deliver(google_style("inbox-1", MIXED))
    assert len(stored(tmp_path)[0]) == 1


HOSTILE = {
    # 15 MB from about 15 KB: under the size bound, over the ratio bound.
    "zip bomb": (lambda: google_style_blob(zip_bomb(15), "application", "zip", "bomb.zip"), "expands more than 200 times"),
    "zip bomb, declared": (lambda: google_style_blob(zip_bomb(200), "application", "zip", "bomb.zip"),
                           "zip member declares 209715210 bytes"),
    "zip bomb, lying headers": (lambda: google_style_blob(lying_zip_bomb(), "application", "zip", "bomb.zip"),
                                "bad zip: Bad CRC-32"),
    "gzip bomb": (lambda: microsoft_style("gz", [], attachment=gzip_bomb(15)), "expands more than 200 times"),
    "gzip bomb, 200 MB": (lambda: microsoft_style("gz", [], attachment=gzip_bomb(200)), "gzip expands past 20971520 bytes"),
    "billion laughs": (lambda: yahoo_style("bl", xml=BILLION_LAUGHS), "XML refused: DTDForbidden"),
    "external entity": (lambda: yahoo_style("xxe", xml=EXTERNAL_ENTITY), "XML refused: DTDForbidden"),
    "huge xml": (lambda: microsoft_style("huge", [], attachment=gzip.compress(huge_xml(), 6)),
                 f"gzip expands past {dmarc.MAX_XML} bytes"),
    "not a report": (lambda: b"From: a@b.test\r\nTo: postmaster@example.org\r\nSubject: hi\r\n\r\nhello\r\n",
                     "no report attachment"),
    "zip member not XML": (lambda: google_style_blob(zip_bytes("x.xml", b"not xml at all"), "application", "zip", "x.zip"),
                           "XML not well-formed"),
}


def google_style_blob(blob: bytes, maintype: str, subtype: str, name: str) -> bytes:
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    _headers(msg, "bomb.test", "b-1")
    msg.set_content(blob, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.asyncio
async def test_hostile_reports_are_refused_within_bounds_and_still_delivered(tmp_path, runner, caplog, kind):
    make, reason = HOSTILE[kind]
    content = make()
    assert len(content) < 6 * 1024 * 1024  # the message itself is small: the bound is what stops it
    caplog.set_level(logging.INFO, "homemx.reports")
    tracemalloc.start()
    started = time.monotonic()
    try:
        outcome = dmarc.ingest(tmp_path / "data", content, runner.metrics, "direct")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome == "refused"
    assert time.monotonic() - started < 30  # liveness bound, not a benchmark
    # Memory: the content, its decoded copy and at most MAX_XML of expansion (a bomb never fully inflates).
    assert peak < 3 * len(content) + 2 * dmarc.MAX_XML + (8 << 20), peak
    lines = [r.getMessage() for r in caplog.records if r.name == "homemx.reports"]
    assert len(lines) == 1 and "dmarc report refused: " in lines[0] and reason in lines[0], lines
    assert "Traceback" not in caplog.text
    # Through the runner: the Maildir delivery succeeds, nothing is stored, one more line.
    caplog.clear()
    qid = await runner.deliver(content)
    assert runner.state(qid) == "delivered"
    assert len(maildir_files(tmp_path, RUA)) == 1
    assert stored(tmp_path)[1] == []
    assert sum(reason in r.getMessage() for r in caplog.records) == 1
    assert runner.metric("homemx_backend_dmarc_reports_total", {"outcome": "refused"}) == 2


def test_zip_bounds_members_and_declared_size():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(dmarc.MAX_MEMBERS + 1):
            zf.writestr(f"r{i}.xml", b"<feedback/>")
    with pytest.raises(dmarc.ReportRefused, match="members"):
        dmarc.report_documents(google_style_blob(buf.getvalue(), "application", "zip", "r.zip"))


# ---------------------------------------------------------------- the CLI


def run_cli(cfg_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([BACKEND_CLI, "dmarc", "report", "-c", str(cfg_path), *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.asyncio
async def test_dmarc_report_cli_summarises_and_highlights_unknown_sources(tmp_path, cfg_path, runner):
    await runner.deliver(google_style("g-1", GOOD + [record("2001:db8:bad::7", 4, dkim="fail", spf="fail")]))
    await runner.deliver(microsoft_style("m-1", MIXED))
    # A report whose period ended 40 days ago: outside the default 30 days.
    old = report_xml("old.example", "o-1", [record("198.51.100.1", 1000)], begin=NOW - 41 * DAY, end=NOW - 40 * DAY)
    await runner.deliver(yahoo_style("o-1", xml=old))

    out = run_cli(cfg_path, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [(o["org"], o["reports"], o["messages"], o["dmarc_pass"], o["dmarc_fail"]) for o in data["orgs"]] == [
        ("enterprise.protection.outlook.com", 1, 37, 32, 5), ("google.com", 1, 16, 12, 4)]
    src = {s["source_ip"]: s for s in data["sources"]}
    assert set(src) == {GATEWAY4, GATEWAY6, "2001:db8:bad::7", "203.0.113.9"}
    bad = src["2001:db8:bad::7"]
    assert (bad["messages"], bad["spf_fail"], bad["dkim_fail"], bad["dmarc_fail"], bad["unknown"]) == (9, 9, 9, 9, True)
    assert bad["orgs"] == ["enterprise.protection.outlook.com", "google.com"]
    assert data["sources"][0]["source_ip"] == "2001:db8:bad::7"  # unknown sources first
    # DKIM-aligned third party: passes DMARC, not unknown; our gateway addresses never are.
    assert (src["203.0.113.9"]["dmarc_pass"], src["203.0.113.9"]["unknown"]) == (2, False)
    assert src[GATEWAY4]["gateway"] and not src[GATEWAY4]["unknown"]

    text = run_cli(cfg_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    unknown = [l for l in lines if "UNKNOWN SOURCE" in l]
    assert len(unknown) == 1 and unknown[0].startswith("2001:db8:bad::7 ") and "example.org" in unknown[0]
    assert any(l.startswith(GATEWAY4) and "(our gateway)" in l for l in lines)
    assert "1 unknown source(s)" in text.stdout
    assert "old.example" not in text.stdout

    wide = json.loads(run_cli(cfg_path, "--json", "--days", "60").stdout)
    assert "old.example" in [o["org"] for o in wide["orgs"]]


def test_dmarc_report_cli_without_reports(cfg_path):
    out = run_cli(cfg_path)
    assert out.returncode == 0, out.stderr
    assert "no reports" in out.stdout


def test_out_of_range_numbers_are_refused():
    xml = report_xml("big.test", "n-1", [record("192.0.2.1", 10**30)])
    with pytest.raises(dmarc.ReportRefused, match="record count out of range"):
        dmarc.parse_report(xml)
    many = report_xml("many.test", "m-1", [record(f"2001:db8::{i:x}", i + 1) for i in range(3000)])
    report = dmarc.parse_report(many)  # streamed: every record kept, in order
    assert [r.count for r in report.records] == list(range(1, 3001))
    assert report.records[-1].source_ip == "2001:db8::bb7"
