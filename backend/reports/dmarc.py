"""DMARC aggregate reports received at the rua address (RFC 7489 7.2, appendix C schema): taken out
of the mail (zip, gzip or plain XML attachments), parsed with every bound a hostile sender could
abuse enforced, stored in the reports database (deduplicated by reporting org and report id) and
summarised for ``homemx-backend dmarc report``.

Theory of operation. The queue runner calls ``ingest`` after the report's Maildir delivery
succeeded (the report stays in the mailbox too). ``ingest`` never raises: a malformed or hostile
report is refused with one log line naming the reason and the refused counter; the delivery is
never affected. The bounds, each checked while reading (declared sizes in archive headers are not
trusted):

  - an attachment (compressed) of at most MAX_COMPRESSED bytes;
  - at most MAX_XML bytes of XML once decompressed, and at most MAX_RATIO times its compressed
    size (a zip or gzip bomb stops at the first chunk past either bound);
  - at most MAX_MEMBERS members in a zip file, and MAX_DOCUMENTS reports in one message;
  - XML without a DTD or entity declarations (defusedxml: billion laughs, external entities), at
    most MAX_RECORDS records per report; it is streamed, each record parsed and dropped as it ends.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import io
import ipaddress
import json
import logging
import sqlite3
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

from backend.reports import db

log = logging.getLogger("homemx.reports")

MAX_COMPRESSED = 10 * 1024 * 1024  # one attachment as received (after base64)
MAX_XML = 20 * 1024 * 1024  # one report's XML: the largest receivers' daily reports stay far below
MAX_RATIO = 200  # decompressed / compressed; real report XML compresses 10-40 times
MAX_MEMBERS = 4  # a zip report holds one XML file
MAX_DOCUMENTS = 4  # reports in one message
MAX_RECORDS = 100_000  # <record> elements in one report
MAX_TEXT = 255  # characters kept of any field
_CHUNK = 64 * 1024

# Attachment types receivers use (Google: application/zip, Microsoft: application/gzip, Yahoo: a
# plain XML or a zip); the content decides the format (magic bytes), the type only which parts to look at.
_REPORT_TYPES = {
    "application/zip", "application/x-zip-compressed", "application/x-zip", "application/gzip",
    "application/x-gzip", "application/xml", "text/xml", "application/octet-stream",
}
_REPORT_SUFFIXES = (".zip", ".gz", ".gzip", ".xml")


class ReportRefused(Exception):
    """This mail is not a report we accept; the message is the reason logged."""


@dataclass(frozen=True)
class Record:
    source_ip: str
    count: int
    disposition: str | None
    dkim: str | None  # policy_evaluated: the aligned DKIM result
    spf: str | None  # policy_evaluated: the aligned SPF result
    header_from: str | None
    envelope_from: str | None
    auth_dkim: tuple[dict, ...] = ()
    auth_spf: tuple[dict, ...] = ()

    @property
    def dmarc_pass(self) -> bool:
        """RFC 7489 4.2: DMARC passes when either aligned identifier passes."""
        return self.dkim == "pass" or self.spf == "pass"


@dataclass(frozen=True)
class Report:
    org: str
    report_id: str
    email: str | None
    begin: int
    end: int
    domain: str
    policy: str | None
    records: tuple[Record, ...] = field(default=())


# ---------------------------------------------------------------- taking the XML out of the mail


def _bounded_read(stream, compressed_size: int, what: str) -> bytes:
    """Read a decompressing stream in chunks, stopping at the first chunk past a bound."""
    limit = min(MAX_XML, max(compressed_size, 1) * MAX_RATIO)
    out = bytearray()
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > MAX_XML:
            raise ReportRefused(f"{what} expands past {MAX_XML} bytes")
        if len(out) > limit:
            raise ReportRefused(f"{what} expands more than {MAX_RATIO} times its {compressed_size} bytes")


def _unzip(data: bytes) -> list[bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            if len(members) > MAX_MEMBERS:
                raise ReportRefused(f"zip with {len(members)} members (at most {MAX_MEMBERS})")
            out = []
            for info in members:
                if info.file_size > MAX_XML:  # declared; the read below does not trust it
                    raise ReportRefused(f"zip member declares {info.file_size} bytes (at most {MAX_XML})")
                with zf.open(info) as f:
                    out.append(_bounded_read(f, info.compress_size, "zip member"))
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error, RuntimeError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: an unsupported compression method.
        raise ReportRefused(f"bad zip: {e}") from None


def _gunzip(data: bytes) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            return _bounded_read(f, len(data), "gzip")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ReportRefused(f"bad gzip: {e}") from None


def _documents(blob: bytes) -> list[bytes]:
    """The XML documents in one attachment, by its content (magic bytes)."""
    if len(blob) > MAX_COMPRESSED:
        raise ReportRefused(f"attachment of {len(blob)} bytes (at most {MAX_COMPRESSED})")
    if blob.startswith(b"PK\x03\x04"):
        return _unzip(blob)
    if blob.startswith(b"\x1f\x8b"):
        return [_gunzip(blob)]
    if blob.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return [blob]
    raise ReportRefused("attachment is neither zip, gzip nor XML")


def report_documents(message: bytes) -> list[bytes]:
    """The report XML documents of a message (RFC 7489 7.2.1.1: the report is an attachment,
    gzip or zip compressed, or the message itself is the XML). Raises ReportRefused."""
    msg = email.message_from_bytes(message, policy=email.policy.compat32)
    docs: list[bytes] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        name = (part.get_filename() or "").lower()
        if ctype not in _REPORT_TYPES and not name.endswith(_REPORT_SUFFIXES):
            continue
        blob = part.get_payload(decode=True)
        if not blob:
            continue
        docs.extend(_documents(blob))
        if len(docs) > MAX_DOCUMENTS:
            raise ReportRefused(f"more than {MAX_DOCUMENTS} reports in one message")
    if not docs:
        raise ReportRefused("no report attachment (zip, gzip or XML)")
    return docs


# ---------------------------------------------------------------- parsing (appendix C)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]  # DMARCbis reports carry a namespace; RFC 7489 ones do not


def _child(el, name: str):
    if el is None:
        return None
    for c in el:
        if _local(c.tag) == name:
            return c
    return None


def _children(el, name: str) -> list:
    return [] if el is None else [c for c in el if _local(c.tag) == name]


def _text(el, *path: str) -> str | None:
    for name in path:
        el = _child(el, name)
    if el is None or el.text is None:
        return None
    return el.text.strip()[:MAX_TEXT] or None


def _int(value: str | None, what: str) -> int:
    try:
        n = int(value or "")
    except ValueError:
        raise ReportRefused(f"{what} is not a number: {str(value)[:40]!r}") from None
    if not 0 <= n < 2**53:  # SQLite's INTEGER (and JSON numbers) hold it exactly
        raise ReportRefused(f"{what} out of range")
    return n


def _record(el) -> Record:
    row = _child(el, "row")
    raw_ip = _text(row, "source_ip")
    try:
        source_ip = ipaddress.ip_address(raw_ip or "").compressed
    except ValueError:
        raise ReportRefused(f"record source_ip {str(raw_ip)[:60]!r} is not an IP address") from None
    pe = _child(row, "policy_evaluated")
    ids = _child(el, "identifiers")
    auth = _child(el, "auth_results")
    return Record(
        source_ip=source_ip,
        count=_int(_text(row, "count"), "record count"),
        disposition=_text(pe, "disposition"),
        dkim=_text(pe, "dkim"),
        spf=_text(pe, "spf"),
        header_from=(_text(ids, "header_from") or "").lower() or None,
        envelope_from=(_text(ids, "envelope_from") or "").lower() or None,
        auth_dkim=tuple(
            {"domain": _text(d, "domain"), "selector": _text(d, "selector"), "result": _text(d, "result")}
            for d in _children(auth, "dkim")
        ),
        auth_spf=tuple(
            {"domain": _text(s, "domain"), "scope": _text(s, "scope"), "result": _text(s, "result")}
            for s in _children(auth, "spf")
        ),
    )


def _top_level(xml: bytes):
    """(root, [parsed records]): the document streamed, each <record> parsed and dropped as soon
    as it ends, so memory holds one record's elements at a time, not the whole tree."""
    # forbid_dtd: a report has no DOCTYPE, so any DTD (billion laughs, external entities) is refused.
    events = DET.iterparse(io.BytesIO(xml), events=("start", "end"), forbid_dtd=True, forbid_entities=True,
                           forbid_external=True)
    root, depth, records = None, 0, []
    for event, el in events:
        if event == "start":
            depth += 1
            if root is None:
                root = el
                if _local(el.tag) != "feedback":
                    raise ReportRefused(f"XML root is <{_local(el.tag)[:40]}>, not <feedback>")
            continue
        depth -= 1
        if depth == 1 and _local(el.tag) == "record":
            if len(records) >= MAX_RECORDS:
                raise ReportRefused(f"report with more than {MAX_RECORDS} records")
            records.append(_record(el))
            root.remove(el)  # the last child: found at once
    return root, records


def parse_report(xml: bytes) -> Report:
    """One aggregate report (RFC 7489 appendix C). Raises ReportRefused naming the problem."""
    if len(xml) > MAX_XML:
        raise ReportRefused(f"XML of {len(xml)} bytes (at most {MAX_XML})")
    try:
        root, records = _top_level(xml)
    except DefusedXmlException as e:
        raise ReportRefused(f"XML refused: {type(e).__name__}") from None
    except DET.ParseError as e:
        raise ReportRefused(f"XML not well-formed: {e}") from None
    meta = _child(root, "report_metadata")
    org, report_id = _text(meta, "org_name"), _text(meta, "report_id")
    if not org or not report_id:
        raise ReportRefused("report_metadata without org_name or report_id")
    if not records:
        raise ReportRefused("report without records")
    domain = _text(root, "policy_published", "domain")
    if not domain:
        raise ReportRefused("policy_published without domain")
    return Report(
        org=org,
        report_id=report_id,
        email=_text(meta, "email"),
        begin=_int(_text(meta, "date_range", "begin"), "date_range begin"),
        end=_int(_text(meta, "date_range", "end"), "date_range end"),
        domain=domain.lower(),
        policy=_text(root, "policy_published", "p"),
        records=tuple(records),
    )


# ---------------------------------------------------------------- storing


def store_report(path: Path, report: Report, now: float) -> bool:
    """Insert ``report`` and its records; False when (org, report_id) is already stored."""
    with db.connect(path) as conn:
        cur = conn.execute(
            "INSERT OR IGNORE INTO dmarc_report (org, report_id, email, begin, end, domain, policy, received)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (report.org, report.report_id, report.email, report.begin, report.end, report.domain, report.policy, now),
        )
        if cur.rowcount == 0:
            return False
        rid = cur.lastrowid
        conn.executemany(
            "INSERT INTO dmarc_record (report, source_ip, count, disposition, dkim, spf, header_from, envelope_from,"
            " auth_dkim, auth_spf) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (rid, r.source_ip, r.count, r.disposition, r.dkim, r.spf, r.header_from, r.envelope_from,
                 json.dumps(list(r.auth_dkim)), json.dumps(list(r.auth_spf)))
                for r in report.records
            ],
        )
        return True


def ingest(data_dir: Path, message: bytes, metrics=None, message_id: str = "-", now: float | None = None) -> str:
    """Store the reports of one message delivered to the rua address. Never raises: returns the
    outcome ("ingested", "duplicate" or "refused") after logging one line."""
    now = time.time() if now is None else now
    try:
        reports = [parse_report(doc) for doc in report_documents(message)]
        fresh = [r for r in reports if store_report(db.db_path(data_dir), r, now)]
    except ReportRefused as e:
        log.warning("queue=%s dmarc report refused: %s", message_id, e)
        _count(metrics, "refused")
        return "refused"
    except (sqlite3.Error, OSError) as e:
        log.error("queue=%s dmarc report not stored: %s: %s", message_id, type(e).__name__, e)
        _count(metrics, "refused")
        return "refused"
    except Exception as e:  # noqa: BLE001 - a report must never break delivery; a bug gets its traceback
        log.error("queue=%s dmarc report refused: unexpected %s", message_id, type(e).__name__, exc_info=e)
        _count(metrics, "refused")
        return "refused"
    if not fresh:
        log.info("queue=%s dmarc report %s from %s already stored", message_id, reports[0].report_id, reports[0].org)
        _count(metrics, "duplicate")
        return "duplicate"
    for r in fresh:
        messages = sum(rec.count for rec in r.records)
        if metrics is not None:
            passed = sum(rec.count for rec in r.records if rec.dmarc_pass)
            metrics.dmarc_report_messages.labels("pass").inc(passed)
            metrics.dmarc_report_messages.labels("fail").inc(messages - passed)
        log.info("queue=%s dmarc report %s from %s for %s: %d records, %d messages",
                 message_id, r.report_id, r.org, r.domain, len(r.records), messages)
    _count(metrics, "ingested")
    return "ingested"


def _count(metrics, outcome: str) -> None:
    if metrics is not None:
        metrics.dmarc_reports.labels(outcome).inc()


# ---------------------------------------------------------------- summary (the CLI)


def _ours(domain: str | None, our_domains) -> bool:
    d = (domain or "").lower().rstrip(".")
    return any(d == o or d.endswith("." + o) for o in our_domains)


def summarise(path: Path, since: float, our_domains, gateway_addresses) -> dict:
    """Reports whose period ended after ``since``, per reporting org and per source IP.

    An "unknown source" is an address that sent mail with one of our domains in From, is none of
    the gateway's public addresses, and failed DMARC (neither aligned SPF nor aligned DKIM passed):
    a forger, or a service sending for us that is not set up (SPF/DKIM) yet.
    """
    ours = {d.lower() for d in our_domains}
    gateway = {ipaddress.ip_address(a).compressed for a in gateway_addresses}
    if not Path(path).exists():  # no report has arrived yet: the CLI creates nothing
        return {"since": int(since), "orgs": [], "sources": []}
    with db.connect(path) as conn:
        rows = conn.execute(
            "SELECT r.org, r.id, c.source_ip, c.count, c.dkim, c.spf, c.disposition, c.header_from"
            " FROM dmarc_record c JOIN dmarc_report r ON r.id = c.report WHERE r.end >= ?"
            " ORDER BY r.org, c.source_ip",
            (int(since),),
        ).fetchall()
    orgs: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    for org, rid, ip, count, dkim, spf, disposition, header_from in rows:
        passed = dkim == "pass" or spf == "pass"
        o = orgs.setdefault(org, {"org": org, "reports": set(), "messages": 0, "dmarc_pass": 0, "dmarc_fail": 0})
        o["reports"].add(rid)
        o["messages"] += count
        o["dmarc_pass" if passed else "dmarc_fail"] += count
        s = sources.setdefault(ip, {
            "source_ip": ip, "messages": 0, "spf_pass": 0, "spf_fail": 0, "dkim_pass": 0, "dkim_fail": 0,
            "dmarc_pass": 0, "dmarc_fail": 0, "orgs": set(), "header_from": set(), "dispositions": {},
            "gateway": ip in gateway, "unknown": False,
        })
        s["messages"] += count
        s["spf_pass" if spf == "pass" else "spf_fail"] += count
        s["dkim_pass" if dkim == "pass" else "dkim_fail"] += count
        s["dmarc_pass" if passed else "dmarc_fail"] += count
        s["orgs"].add(org)
        if header_from:
            s["header_from"].add(header_from)
        if disposition:
            s["dispositions"][disposition] = s["dispositions"].get(disposition, 0) + count
        if not passed and ip not in gateway and _ours(header_from, ours):
            s["unknown"] = True
    for o in orgs.values():
        o["reports"] = len(o["reports"])
    for s in sources.values():
        s["orgs"] = sorted(s["orgs"])
        s["header_from"] = sorted(s["header_from"])
    return {
        "since": int(since),
        "orgs": sorted(orgs.values(), key=lambda o: o["org"]),
        "sources": sorted(sources.values(), key=lambda s: (not s["unknown"], -s["messages"], s["source_ip"])),
    }


def rua_addresses(config) -> frozenset[str]:
    """The addresses our published DMARC records ask reports to be sent to (``dns records``)."""
    from backend.dns.records import dmarc_rua

    return frozenset(dmarc_rua(config, d).lower() for d in config.domains)
