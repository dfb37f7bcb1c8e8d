"""Delivery status notifications: build RFC 3464 bounce and delay reports (pure, no I/O).

A DSN is ``multipart/report; report-type=delivery-status`` (RFC 6522) with three parts: a text
for people, the machine-readable ``message/delivery-status`` (RFC 3464 2.2 per-message fields,
2.3 per-recipient fields) and the original headers as ``text/rfc822-headers`` (RFC 3464 2.4,
returning the headers only keeps the bounce small and does not re-send the body). It is sent from
the null reverse-path ``<>`` (RFC 5321 4.5.5) and is never generated for a message whose own
sender is ``<>``, which is what stops bounce loops.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import secrets
from dataclasses import dataclass

FAILED, DELAYED = "failed", "delayed"  # RFC 3464 2.3.3 Action values we generate

_ENHANCED_RE = re.compile(r"^\s*\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_CODE_RE = re.compile(r"^\s*([245])\d\d\b")

# Generic status codes (RFC 3463) for failures that have no remote reply to quote.
STATUS_PERMANENT_DEFAULT = "5.0.0"
STATUS_TEMPORARY_DEFAULT = "4.0.0"


@dataclass(frozen=True)
class DSNRecipient:
    """One recipient in a report: what happened to it and, when a server answered, what it said."""

    final_recipient: str  # the address we tried (after alias expansion)
    original_recipient: str | None  # the RCPT TO the sender gave, when different (RFC 3464 2.3.1)
    action: str  # failed | delayed
    status: str  # RFC 3463 enhanced code, e.g. 5.1.1
    diagnostic: str | None  # the remote reply, "smtp; 550 5.1.1 ..." (RFC 3464 2.3.6)
    remote_mta: str | None = None  # "dns; mx.example.net" (RFC 3464 2.3.5)
    last_attempt: float | None = None
    will_retry_until: float | None = None  # delayed only (RFC 3464 2.3.9)


def should_send(sender: str) -> bool:
    """Never a DSN to the null reverse-path (RFC 5321 4.5.5, RFC 3464 1)."""
    return bool(sender) and sender != "<>"


def status_from_reply(reply: str | None, permanent: bool) -> str:
    """The enhanced status code of an SMTP reply, or a generic one of the right class (RFC 3463).

    A reply whose enhanced code class disagrees with the outcome (a 5.x.x we are only deferring,
    say) gets the generic code of the outcome's class, so Action and Status never contradict.
    """
    want = "5" if permanent else "4"
    if reply:
        m = _ENHANCED_RE.match(reply)
        if m and m.group(1)[0] == want:
            return m.group(1)
        m = _CODE_RE.match(reply)
        if m and m.group(1) == want:
            return f"{want}.0.0"
    return STATUS_PERMANENT_DEFAULT if permanent else STATUS_TEMPORARY_DEFAULT


def rfc5322_date(ts: float) -> str:
    """A date-time as RFC 5322 3.3 writes it, in UTC: "Tue, 14 Nov 2023 22:13:20 +0000".

    Never the obsolete zone name "GMT" (RFC 5322 4.3, what ``formatdate(usegmt=True)`` writes)
    nor "-0000" (RFC 5322 3.3: "no information about the local time zone").
    """
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(ts, datetime.timezone.utc))


def _xtext_free(value: str) -> str:
    # Header values we write must be one line of printable ASCII: anything else (a reply with a
    # CR/LF in it, UTF-8 from a remote) is replaced rather than allowed to break the structure.
    return re.sub(r"[^\x20-\x7e]", "?", value)


def _xtext_free_header(text: str) -> str:
    # Control characters never reach a header; UTF-8 letters (an internationalised sender) may.
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "?", text)


def _utf8_addr_xtext(addr: str) -> str:
    # RFC 6533 3: in a message/delivery-status body a utf-8 address is written as
    # utf-8-addr-xtext: printable ASCII except "\\", "+" and "=" stays, anything else becomes
    # EmbeddedUnicodeChar "\\x{HEX}", so the report stays 7-bit (the form for RFC 3464 parsers).
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in addr)


def _address_field(addr: str) -> str:
    # RFC 3464 2.3.2: address-type "rfc822", or "utf-8" for an internationalised address (RFC 6533).
    if addr.isascii():
        return f"rfc822;{_xtext_free(addr)}"
    return f"utf-8;{_utf8_addr_xtext(addr)}"


def original_headers(message: bytes) -> bytes:
    """The header block of a stored message (CRLF, no trailing blank line)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
        head = message if end < 0 else message[:end]
        return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return message[:end]


SUBJECTS = {FAILED: "Undelivered Mail Returned to Sender", DELAYED: "Delayed Mail (still being retried)"}


def _human_text(action: str, reporting_mta: str, recipients: list[DSNRecipient]) -> str:
    """The report's first part, for people (RFC 3462 / RFC 6522: text/plain)."""
    if action == FAILED:
        intro = (
            f"This is the mail system at {reporting_mta}.\r\n\r\n"
            "Your message could not be delivered to one or more recipients.\r\n"
            "It will not be retried for them. The details follow.\r\n"
        )
    else:
        intro = (
            f"This is the mail system at {reporting_mta}.\r\n\r\n"
            "Your message has not been delivered yet to one or more recipients.\r\n"
            "It is still in the queue and will be retried; you do not need to resend it.\r\n"
        )
    lines_human = [intro]
    for r in recipients:
        shown = r.final_recipient if r.final_recipient.isascii() else _utf8_addr_xtext(r.final_recipient)
        lines_human.append(f"\r\n<{_xtext_free(shown)}>: {_xtext_free(r.diagnostic or r.status)}\r\n")
    return "".join(lines_human)


def _delivery_status(reporting_mta: str, queue_id: str, arrival: float, recipients: list[DSNRecipient]) -> str:
    """The message/delivery-status part (RFC 3464 2.2: per-message fields, then a blank line
    before each recipient's fields)."""
    status_lines = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Homemx-Queue-ID: {queue_id}",  # extension field (RFC 3464 2.2: X- fields allowed)
        f"Arrival-Date: {rfc5322_date(arrival)}",
    ]
    for r in recipients:
        status_lines.append("")
        if r.original_recipient and r.original_recipient.lower() != r.final_recipient.lower():
            status_lines.append(f"Original-Recipient: {_address_field(r.original_recipient)}")
        status_lines.append(f"Final-Recipient: {_address_field(r.final_recipient)}")
        status_lines.append(f"Action: {r.action}")
        status_lines.append(f"Status: {r.status}")
        if r.remote_mta:
            status_lines.append(f"Remote-MTA: {_xtext_free(r.remote_mta)}")
        if r.diagnostic:
            status_lines.append(f"Diagnostic-Code: smtp; {_xtext_free(r.diagnostic)}")
        if r.last_attempt is not None:
            status_lines.append(f"Last-Attempt-Date: {rfc5322_date(r.last_attempt)}")
        if r.will_retry_until is not None and r.action == DELAYED:
            status_lines.append(f"Will-Retry-Until: {rfc5322_date(r.will_retry_until)}")
    return "\r\n".join(status_lines) + "\r\n"


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival: float,
    recipients: list[DSNRecipient],
    headers: bytes,
    now: float,
) -> bytes:
    """A complete RFC 3464 report message (CRLF line endings), addressed to ``sender``.

    ``recipients`` must all share one action (a bounce lists failures, a delay notice lists
    delays); the subject and text follow from it.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if not should_send(sender):
        raise ValueError("no DSN to the null reverse-path")
    actions = {r.action for r in recipients}
    if len(actions) != 1 or not actions <= {FAILED, DELAYED}:
        raise ValueError(f"one action per report, got {sorted(actions)}")
    action = actions.pop()
    boundary = f"=_homemx_{secrets.token_hex(12)}"
    msgid = f"<{queue_id}.{secrets.token_hex(6)}.dsn@{reporting_mta}>"
    subject = SUBJECTS[action]
    human = _human_text(action, reporting_mta, recipients)
    delivery_status = _delivery_status(reporting_mta, queue_id, arrival, recipients)

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: {msgid}",
        # RFC 3834 5: an automatic response; RFC 3464 says nothing else should answer it.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
    ]
    orig = original_headers(headers)
    parts = [
        # A UTF-8 sender address stays UTF-8 in To (RFC 6532 3.2); delivery then asks for SMTPUTF8.
        _xtext_free_header("\r\n".join(head)).encode("utf-8") + b"\r\n\r\n",
        b"This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n".encode(),
        human.encode("ascii", "replace"),
        f"\r\n--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n".encode(),
        delivery_status.encode("utf-8"),
        f"\r\n--{boundary}\r\nContent-Description: Undelivered message headers\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode(),
        orig + b"\r\n",
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)
