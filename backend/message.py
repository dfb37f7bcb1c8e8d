"""RFC 5322 message bytes (pure): CRLF canonical form, the header block, trace and From fields."""

from __future__ import annotations

import email.utils
import re

_LINE_END_RE = re.compile(rb"\r\n|\r|\n")
_FROM_RE = re.compile(rb"^From[ \t]*:(.*(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


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
    i = message.find(b"\r\n\r\n")
    if i < 0:
        return message, b""
    return message[: i + 4], message[i + 4 :]


def count_received(header: bytes) -> int:
    return sum(1 for line in header.split(b"\r\n") if line[:9].lower() == b"received:")


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
