"""RFC 5322 message bytes (pure): CRLF canonical form, the header block, trace and From fields."""

from __future__ import annotations

import datetime
import email.utils
import re
import time

_LINE_END_RE = re.compile(rb"\r\n|\r|\n")
_FROM_RE = re.compile(rb"^From[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)
# RFC 5322 4.5 (obs-optional): white space may stand between a field name and its colon.
_RECEIVED_RE = re.compile(rb"^Received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def crlf_canonical(data: bytes) -> bytes:
    """Every lone CR, lone LF and CRLF becomes CRLF, with a final CRLF (RFC 5322 2.1).

    Stored messages are in this form, and DKIM signs this form: it is also what aiosmtplib's
    line-ending normalisation and dot-stuffing produce, so nothing downstream changes the bytes a
    body hash covers.
    """
    # Fast path for the usual, already canonical message: when every CR and every LF belongs to a
    # CRLF the substitution is the identity. Three C-level counts take ~40 ms on 25 MB where the
    # regex took ~280 ms, all of it on the event loop (docs/benchmarks.md, B6).
    if data.count(b"\r\n") == data.count(b"\r") == data.count(b"\n"):
        out = data
    else:
        out = _LINE_END_RE.sub(b"\r\n", data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def split_header(message: bytes) -> tuple[bytes, bytes]:
    """(header block incl. the blank line, body) of a CRLF message."""
    header = header_block(message)
    return header, message[len(header) :]


def header_block(message: bytes) -> bytes:
    """The header block (incl. the blank line) of a CRLF message: ``split_header`` without the
    copy of the body (~2.5 ms of the event loop for a 25 MB message, to read a few KB)."""
    i = message.find(b"\r\n\r\n")
    return message if i < 0 else message[: i + 4]


def count_received(header: bytes) -> int:
    """Received fields in a CRLF header block (loop detection, RFC 5321 6.3)."""
    return len(_RECEIVED_RE.findall(header))


def has_field(header: bytes, name: bytes) -> bool:
    """Whether a CRLF header block has a field ``name`` (case-insensitive, obsolete white space
    before the colon allowed)."""
    return re.search(rb"^" + re.escape(name) + rb"[ \t]*:", header, re.IGNORECASE | re.MULTILINE) is not None


def rfc5322_date(when: float | None = None) -> str:
    """A date-time in RFC 5322 3.3 form with a numeric zone (``+0000``), never the obsolete ``GMT``
    (4.3), for Date and Received fields."""
    moment = datetime.datetime.fromtimestamp(time.time() if when is None else when, datetime.timezone.utc)
    return email.utils.format_datetime(moment)


def from_addresses(header: bytes) -> list[str] | None:
    """Addresses in the From header(s) of a CRLF header block; None if missing or unparsable.
    (A regex for the field plus email.utils for the addresses: the full email parser costs ten
    times more and this runs for every submitted message.)"""
    values = [
        m.group(1).replace(b"\r\n", b"").decode("utf-8", "surrogateescape") for m in _FROM_RE.finditer(header)
    ]
    if not values:
        return None
    addrs = [a for _, a in email.utils.getaddresses(values) if a]
    return addrs or None
