"""The header fields the inbound checks write and remove: Authentication-Results (RFC 8601) from
the verdicts, and the removal of fields an outsider must not be able to forge (an
Authentication-Results that claims our authserv-id, spam-filter verdict fields).

Pure functions over the CRLF header block (smtp/message.split_header).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from backend.auth.results import ARCVerdict, DKIMVerdict, DMARCVerdict, SPFVerdict

# One header field: its first line and every continuation line (RFC 5322 2.2.3).
_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n", re.MULTILINE)
# RFC 2045 token: what a property value may be without quoting (RFC 8601 2.2, "value").
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
# The fields our spam filter writes; one from outside would tell a user's filters (or a sieve rule)
# "not spam" on a message we never scanned.
SPAM_FIELDS = (b"x-spam", b"x-spam-flag", b"x-spam-status", b"x-spam-level", b"x-spamd-result", b"x-spamd-bar",
               b"x-rspamd-action", b"x-rspamd-score", b"x-rspamd-server", b"x-rspamd-queue-id")


def remove_fields(header: bytes, keep) -> tuple[bytes, int]:
    """The header block without the fields for which ``keep(name_lower, field_bytes)`` is false,
    and how many were removed."""
    removed = 0

    def repl(m: re.Match) -> bytes:
        nonlocal removed
        if keep(m.group(1).lower(), m.group(0)):
            return m.group(0)
        removed += 1
        return b""

    return _FIELD_RE.sub(repl, header), removed


def claims_authserv_id(field: bytes, authserv_id: str) -> bool:
    """Whether an Authentication-Results field names ``authserv_id`` (RFC 8601 2.5: the first
    token of the value, compared case-insensitively; RFC 8601 5: such fields from outside are
    removed before ours is added). Comments and a version number after the id are allowed."""
    value = field.split(b":", 1)[1].decode("utf-8", "replace")
    value = re.sub(r"\([^()]*\)", " ", value.replace("\r\n", ""))  # CFWS (no nested comments in practice)
    first = re.split(r"[\s;]+", value.strip(), maxsplit=1)[0] if value.strip() else ""
    return first.lower().rstrip(".") == authserv_id.lower().rstrip(".")


def strip_untrusted(header: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Remove forged Authentication-Results for our authserv-id and spam-verdict fields."""
    def keep(name: bytes, field: bytes) -> bool:
        if name == b"authentication-results":
            return not claims_authserv_id(field, authserv_id)
        return name not in SPAM_FIELDS

    return remove_fields(header, keep)


def _value(text: str) -> str:
    text = text.replace("\\", "").replace('"', "").replace("\r", "").replace("\n", "")
    return text if _TOKEN_RE.match(text) else f'"{text}"'


def _reason(text: str) -> str:
    text = re.sub(r"[\x00-\x1f\x7f\"\\]", " ", text)[:200]
    return f' reason="{text}"' if text else ""


def authentication_results(
    authserv_id: str,
    spf: Sequence[SPFVerdict] = (),
    dkim: Sequence[DKIMVerdict] = (),
    dmarc: DMARCVerdict | None = None,
    arc: ARCVerdict | None = None,
    extra: Iterable[str] = (),
) -> bytes:
    """An RFC 8601 Authentication-Results field (folded, CRLF-terminated).

    spf: smtp.mailfrom (the address, or the domain for <> checked as postmaster@helo) and
    smtp.helo; dkim: one resinfo per signature with header.d, header.s, header.a and header.b
    (RFC 6008, to tell signatures apart), "dkim=none" when unsigned; dmarc: header.from and the
    policy (RFC 7489 11.2's ``policy.dmarc``, the disposition applied); arc: RFC 8617 ``arc=``.
    """
    parts: list[str] = []
    for v in spf:
        prop = "smtp.mailfrom" if v.identity == "mailfrom" else "smtp.helo"
        parts.append(f"spf={v.result} {prop}={_value(v.domain)}")
    if dkim:
        for d in dkim:
            props = f" header.d={_value(d.domain)}" if d.domain else ""
            if d.selector:
                props += f" header.s={_value(d.selector)}"
            if d.algorithm:
                props += f" header.a={_value(d.algorithm)}"
            if d.header_b:
                props += f" header.b={_value(d.header_b)}"
            reason = _reason(d.reason) if d.result != "pass" else ""
            parts.append(f"dkim={d.result}{reason}{props}")
    else:
        parts.append("dkim=none")
    if dmarc is not None:
        props = f" header.from={_value(dmarc.from_domain)}" if dmarc.from_domain else ""
        if dmarc.result in ("pass", "fail"):
            props += f" policy.dmarc={dmarc.disposition}"
        parts.append(f"dmarc={dmarc.result}{props}")
    if arc is not None:
        parts.append(f"arc={arc.result}" + (_reason(arc.reason) if arc.result == "fail" else ""))
    parts.extend(extra)
    body = ";\r\n\t".join([authserv_id] + parts) if parts else f"{authserv_id}; none"
    return f"Authentication-Results: {body}\r\n".encode("utf-8", "replace")
