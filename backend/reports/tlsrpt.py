"""TLS-RPT (RFC 8460): the outcome of every new outbound SMTP session recorded per policy domain and
UTC day (successful TLS sessions, failures by result type), and once a day the report of each
finished day sent to the ``rua=mailto:`` of every domain that publishes ``_smtp._tls``.

Theory of operation. Delivery (``deliver/remote.py``) calls ``Recorder.session`` for each session
it opens to a destination's MX (a session reused from the pool is not a new TLS negotiation and is
not counted again) and for each that failed during STARTTLS: the result type comes from
``result_type`` (below). Rows live in reports.sqlite3 (``db``). ``Reporter`` wakes every
CHECK_INTERVAL, and for each (day, policy domain) of a finished day not yet reported looks up the
domain's TLSRPT record: with a mailto: rua it builds the RFC 8460 4.4 JSON, gzips it into an RFC
8460 5.3 message from the postmaster of our first domain, signs it with the outbound DKIM signer
and queues it (from ``<>``, like a DSN: a report that cannot be delivered never bounces back to us
every day). https: rua (RFC 8460 5.4) is not supported: such domains are skipped with a log line.
A report is marked sent after it is queued: a crash in between sends it twice, never not at all.

A failed MTA-STS policy fetch (deliver/mtasts.py) counts as one failed session of its domain
(sts-policy-fetch-error, sts-policy-invalid or sts-webpki-invalid). Not recorded: destinations
whose MX hosts no MTA-STS policy allows (no session is opened; the deferral names it).
"""

from __future__ import annotations

import asyncio
import datetime
import email.message
import email.policy
import email.utils
import gzip
import json
import logging
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from backend.dns.lookup import AsyncDNSLookup, DNSTempError
from backend.queue.model import NewMessage, NewRecipient
from backend.reports import db

log = logging.getLogger("homemx.reports")

CHECK_INTERVAL = 3600.0  # look for finished days this often (a restart mid-day loses nothing)
KEEP_DAYS = 30  # recorded sessions older than this are deleted
GIVE_UP_DAYS = 3  # a day whose report could not be sent (DNS failing) is dropped after this

# RFC 8460 4.3 result types we detect.
SUCCESS = "success"
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"

STS, NO_POLICY = "sts", "no-policy-found"

# OpenSSL verify codes (x509_vfy.h) and the RFC 8460 result type each one is.
_VERIFY_CODES = {
    10: CERTIFICATE_EXPIRED,  # X509_V_ERR_CERT_HAS_EXPIRED
    9: VALIDATION_FAILURE,  # X509_V_ERR_CERT_NOT_YET_VALID
    18: CERTIFICATE_NOT_TRUSTED,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19: CERTIFICATE_NOT_TRUSTED,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20: CERTIFICATE_NOT_TRUSTED,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: CERTIFICATE_NOT_TRUSTED,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    62: CERTIFICATE_HOST_MISMATCH,  # X509_V_ERR_HOSTNAME_MISMATCH
}


def day_of(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d")


def day_bounds(day: str) -> tuple[int, int]:
    """(first second, last second) of a UTC day, as RFC 8460 4.4 date-range uses them."""
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
    return int(start.timestamp()), int(start.timestamp()) + 86399


# ---------------------------------------------------------------- what happened in a session


@dataclass(frozen=True)
class PolicyInfo:
    """The policy a session was made under (RFC 8460 4.4 "policy")."""

    domain: str
    type: str  # STS | NO_POLICY
    strings: tuple[str, ...] = ()  # the policy's lines (policy-string)
    mx: tuple[str, ...] = ()  # the policy's mx patterns (mx-host)


def policy_info(domain: str, policy) -> PolicyInfo:
    """From an MTA-STS ``Policy`` in force for ``domain`` (None: no policy). A policy in mode
    "none" is not applied (RFC 8461 5), so sessions under it count as no-policy-found."""
    if policy is None or policy.mode == "none":
        return PolicyInfo(domain, NO_POLICY)
    lines = ("version: STSv1", f"mode: {policy.mode}", *(f"mx: {m}" for m in policy.mx), f"max_age: {policy.max_age}")
    return PolicyInfo(domain, STS, lines, tuple(policy.mx))


def _ssl_cause(e: BaseException | None) -> ssl.SSLError | None:
    seen = 0
    while e is not None and seen < 8:  # the HostFailure, then what it was raised from or while handling
        if isinstance(e, ssl.SSLError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def failure_type(failure: BaseException, not_offered_prefix: str) -> str | None:
    """The RFC 8460 result type of a session that failed, or None when TLS was never tried (the
    host was unreachable, refused us before STARTTLS): those are no TLS session at all."""
    if getattr(failure, "reply", "").startswith(not_offered_prefix):
        return STARTTLS_NOT_SUPPORTED
    err = _ssl_cause(failure)
    if err is None:
        return None
    if isinstance(err, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(err.verify_code, VALIDATION_FAILURE)
    return VALIDATION_FAILURE  # a handshake that failed for another reason (protocol, cipher)


def session_type(tls: str, starttls_offered: bool, tls_none: str) -> str:
    """A session that opened: SUCCESS with TLS; without TLS (opportunistic, RFC 7435), whether
    the server did not offer STARTTLS or its handshake failed and we went on in cleartext."""
    if tls != tls_none:
        return SUCCESS
    return VALIDATION_FAILURE if starttls_offered else STARTTLS_NOT_SUPPORTED


# ---------------------------------------------------------------- recording


def record(path: Path, day: str, info: PolicyInfo, result: str, mx: str, ip: str) -> None:
    """Count one session (blocking)."""
    key = (day, info.domain, info.type, json.dumps(list(info.strings)))
    with db.connect(path) as conn:
        conn.execute(
            "INSERT INTO tls_policy (day, policy_domain, policy_type, policy_string, mx_host) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (*key, json.dumps(list(info.mx))),
        )
        if result == SUCCESS:
            conn.execute(
                "UPDATE tls_policy SET successes = successes + 1 WHERE day = ? AND policy_domain = ?"
                " AND policy_type = ? AND policy_string = ?", key,
            )
        else:
            conn.execute(
                "INSERT INTO tls_failure (day, policy_domain, policy_type, policy_string, result_type, receiving_mx,"
                " receiving_ip, failures) VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT DO UPDATE SET failures = failures + 1",
                (*key, result, mx.lower().rstrip("."), ip),
            )


class Recorder:
    """What delivery calls; never raises (a report must not cost a delivery)."""

    def __init__(self, data_dir: Path, metrics, run_blocking: Callable[..., Awaitable], now: Callable[[], float]):
        self.path = db.db_path(data_dir)
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.now = now
        self._failing = False

    async def session(self, info: PolicyInfo, result: str, mx: str, ip: str) -> None:
        try:
            self.metrics.tls_sessions.labels(result).inc()
            await self.run_blocking(record, self.path, day_of(self.now()), info, result, mx, ip)
        except Exception as e:  # noqa: BLE001 - logged once until it works again
            if not self._failing:
                log.error("tls-rpt: cannot record sessions in %s: %s: %s", self.path, type(e).__name__, e)
            self._failing = True
        else:
            self._failing = False


def policy_failure_type(kind: str, error: BaseException) -> str:
    """RFC 8460 4.3.2.2: the result type of a failed MTA-STS policy fetch (deliver/mtasts.py's
    kind: "invalid" when a body came that is no policy, "fetch" otherwise)."""
    if kind == "invalid":
        return STS_POLICY_INVALID
    err = _ssl_cause(error) or getattr(error, "certificate_error", None)  # aiohttp keeps it there
    if isinstance(err, ssl.SSLCertVerificationError):
        return STS_WEBPKI_INVALID  # the policy host's certificate did not verify (RFC 8461 3.3)
    return STS_POLICY_FETCH_ERROR


class PolicyMemo:
    """The MTA-STS lookups of delivery, remembering the policy last in force per domain, so the
    sessions to its MX hosts are recorded under it (no second lookup); a failed policy fetch is
    recorded as one failed session of the domain (RFC 8460 4.3.2.2)."""

    def __init__(self, mtasts, recorder: "Recorder | None" = None):
        self.mtasts = mtasts
        self.recorder = recorder
        self.last: dict[str, object] = {}

    async def policy(self, domain: str):
        domain = domain.lower().rstrip(".")
        pol = await self.mtasts.policy(domain)
        self.last[domain] = pol
        # Several deliveries may share one fetch: the first to look takes its failure.
        failed = getattr(self.mtasts, "failures", {}).pop(domain, None)
        if failed is not None and self.recorder is not None:
            info = policy_info(domain, pol) if pol is not None else PolicyInfo(domain, STS)
            await self.recorder.session(info, policy_failure_type(*failed), "", "")
        return pol

    def info(self, domain: str) -> PolicyInfo:
        return policy_info(domain, self.last.get(domain.lower().rstrip(".")))


# ---------------------------------------------------------------- the report (RFC 8460 4.4, 5.3)


def parse_tlsrpt(records: list[str]) -> list[str] | None:
    """The rua URIs of a domain's ``_smtp._tls`` TXT records; None when it publishes none.

    RFC 8460 3: records not starting with v=TLSRPTv1 are ignored; not exactly one left means no
    TLSRPT; rua is a comma-separated list of URIs.
    """
    found = [r for r in records if r.replace(" ", "").startswith("v=TLSRPTv1;") or r.strip() == "v=TLSRPTv1"]
    if len(found) != 1:
        return None
    for part in found[0].split(";"):
        k, eq, v = part.strip().partition("=")
        if eq and k.strip() == "rua":
            return [u.strip() for u in v.split(",") if u.strip()]
    return None


def mailto_addresses(uris: list[str]) -> list[str]:
    out = []
    for u in uris:
        if u.lower().startswith("mailto:"):
            addr = urllib.parse.unquote(u[7:].partition("?")[0]).strip()
            if "@" in addr and addr not in out:
                out.append(addr)
    return out


def report_json(conn, day: str, domain: str, organization: str, contact: str, report_id: str) -> dict:
    """The RFC 8460 4.4 report of one policy domain and day from the recorded rows."""
    start, end = day_bounds(day)
    policies = []
    for ptype, pstring, mx_host, successes in conn.execute(
        "SELECT policy_type, policy_string, mx_host, successes FROM tls_policy WHERE day = ? AND policy_domain = ?"
        " ORDER BY policy_type, policy_string", (day, domain),
    ):
        failures = conn.execute(
            "SELECT result_type, receiving_mx, receiving_ip, failures FROM tls_failure WHERE day = ?"
            " AND policy_domain = ? AND policy_type = ? AND policy_string = ? ORDER BY result_type, receiving_mx",
            (day, domain, ptype, pstring),
        ).fetchall()
        policy = {"policy-type": ptype, "policy-domain": domain}
        if ptype == STS and json.loads(pstring):  # none when the policy could not be fetched
            policy["policy-string"] = json.loads(pstring)
            policy["mx-host"] = json.loads(mx_host)
        entry = {
            "policy": policy,
            "summary": {
                "total-successful-session-count": successes,
                "total-failure-session-count": sum(f[3] for f in failures),
            },
        }
        if failures:
            # A policy fetch failure has no MX: its receiving-* fields are left out (they are optional).
            entry["failure-details"] = [
                {"result-type": rt, **({"receiving-mx-hostname": mx} if mx else {}),
                 **({"receiving-ip": ip} if ip else {}), "failed-session-count": n}
                for rt, mx, ip, n in failures
            ]
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {
            "start-datetime": datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end-datetime": datetime.datetime.fromtimestamp(end, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def report_message(report: dict, *, submitter: str, sender: str, recipient: str, domain: str, now: float) -> bytes:
    """The RFC 8460 5.3 message carrying ``report`` gzipped (application/tlsrpt+gzip)."""
    start, end = day_bounds(report["date-range"]["start-datetime"][:10])
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = email.utils.make_msgid("tlsrpt", submitter)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain}, "
        f"{report['date-range']['start-datetime']} to {report['date-range']['end-datetime']}.\n"
    )
    # RFC 8460 5.1: submitter!policy-domain!begin-timestamp!end-timestamp.json.gz
    filename = f"{submitter}!{domain}!{start}!{end}.json.gz"
    body = gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)
    msg.add_attachment(body, maintype="application", subtype="tlsrpt+gzip", filename=filename)
    # RFC 8460 5.3: multipart/report with report-type "tlsrpt".
    msg.replace_header("Content-Type", f'multipart/report; report-type="tlsrpt"; boundary="{msg.get_boundary()}"')
    return msg.as_bytes()


class Reporter:
    """The daily TLS-RPT job of the daemon (started by Backend.start)."""

    def __init__(self, config, queue, metrics, run_blocking, resolver, signer=None, now: Callable[[], float] = time.time,
                 interval: float = CHECK_INTERVAL):
        self.config = config
        self.queue = queue
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.dns = AsyncDNSLookup(resolver)
        self.signer = signer
        self.now = now
        self.interval = interval
        self.path = db.db_path(config.server.data_dir)
        first = next(iter(config.domains))
        self.sender = f"postmaster@{first}"
        self.organization = first
        self.submitter = config.server.hostname

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as e:  # noqa: BLE001 - the next round tries again; the daemon goes on
                log.error("tls-rpt: report round failed: %s: %s", type(e).__name__, e, exc_info=e)
            await asyncio.sleep(self.interval)

    def _pending(self, today: str) -> list[tuple[str, str]]:
        with db.connect(self.path) as conn:
            return conn.execute(
                "SELECT DISTINCT day, policy_domain FROM tls_policy p WHERE day < ? AND NOT EXISTS"
                " (SELECT 1 FROM tls_report_sent s WHERE s.day = p.day AND s.policy_domain = p.policy_domain)"
                " ORDER BY day, policy_domain", (today,),
            ).fetchall()

    def _mark(self, day: str, domain: str, outcome: str) -> None:
        with db.connect(self.path) as conn:
            conn.execute("INSERT OR REPLACE INTO tls_report_sent (day, policy_domain, outcome) VALUES (?, ?, ?)",
                         (day, domain, outcome))

    def _purge(self, today: str) -> None:
        cutoff = day_of(day_bounds(today)[0] - KEEP_DAYS * 86400)
        with db.connect(self.path) as conn:
            for table in ("tls_policy", "tls_failure", "tls_report_sent"):
                conn.execute(f"DELETE FROM {table} WHERE day < ?", (cutoff,))  # noqa: S608 - fixed names

    def _report(self, day: str, domain: str) -> dict:
        with db.connect(self.path) as conn:
            return report_json(conn, day, domain, self.organization, self.sender,
                               f"{day}T00:00:00Z_{domain}@{self.submitter}")

    async def run_once(self) -> list[tuple[str, str, str]]:
        """Report every finished day not reported yet; returns (day, domain, outcome) of each."""
        if not self.path.exists():
            return []
        today = day_of(self.now())
        done = []
        for day, domain in await self.run_blocking(self._pending, today):
            outcome = await self._send(day, domain, today)
            if outcome is not None:
                done.append((day, domain, outcome))
        await self.run_blocking(self._purge, today)
        return done

    async def _send(self, day: str, domain: str, today: str) -> str | None:
        try:
            uris = parse_tlsrpt(await self.dns.txt(f"_smtp._tls.{domain}"))
        except DNSTempError as e:
            if day_bounds(today)[0] - day_bounds(day)[0] < GIVE_UP_DAYS * 86400:
                log.info("tls-rpt: %s %s: TLSRPT lookup failed (%s), trying again later", day, domain, e)
                return None
            uris, outcome = None, f"given up: {e}"
        else:
            outcome = "no TLSRPT record"
        addresses = mailto_addresses(uris or [])
        if uris and not addresses:
            outcome = "only https: rua (not supported)"
        if not addresses:
            await self.run_blocking(self._mark, day, domain, outcome)
            self.metrics.tlsrpt_reports.labels("skipped").inc()
            log.info("tls-rpt: %s %s: no report sent (%s)", day, domain, outcome)
            return outcome
        report = await self.run_blocking(self._report, day, domain)
        queued = []
        for rcpt in addresses:
            content = report_message(report, submitter=self.submitter, sender=self.sender, recipient=rcpt,
                                     domain=domain, now=self.now())
            if self.signer is not None:
                try:
                    content = await self.run_blocking(self.signer, content, "")
                except Exception as e:  # noqa: BLE001 - an unsigned report still beats none
                    log.error("tls-rpt: report for %s left unsigned: DKIM signing failed: %s", domain, e)
            local = rcpt.rpartition("@")[2].lower() in self.config.domains
            qid = await self.run_blocking(self.queue.enqueue, NewMessage(
                sender="", recipients=(NewRecipient(rcpt, rcpt, local),), content=content, listener="tlsrpt",
            ))
            queued.append(qid)
            log.info("tls-rpt: %s %s: report %s queued as %s to <%s>", day, domain, report["report-id"], qid, rcpt)
        outcome = "queued " + " ".join(queued)
        await self.run_blocking(self._mark, day, domain, outcome)
        self.metrics.tlsrpt_reports.labels("queued").inc()
        return outcome
