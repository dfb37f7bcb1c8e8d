"""SMTP path parsing and the relay-disguise checks (pure, no I/O).

RFC 5321 4.1.2 grammar, applied strictly to what follows ``MAIL FROM:`` / ``RCPT TO:``. Anything that
could make a downstream MTA route the mail somewhere other than the domain we checked (source routes,
the %-hack, bang paths, quoted local parts hiding an '@', address literals, trailing dots) is refused
here with a 5xx, before any policy runs, so a disguised relay attempt never reaches the queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backend.smtp import replies as R

# RFC 5321 4.1.2 atext (RFC 5322 3.2.3), without the characters we refuse in local parts.
_ATEXT = r"[A-Za-z0-9!#$&'*+\-/=?^_`{|}~]"
_DOT_STRING_RE = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# Internationalised labels arrive as UTF-8 with SMTPUTF8; accept non-ASCII letters in labels.
_ULABEL_RE = re.compile(r"^(?!-)[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]{1,63}(?<!-)$")

_NOT_UTF8_RE = re.compile("[\ud800-\udfff]")  # lone surrogates: bytes that were not UTF-8

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3


class PathError(ValueError):
    """The path is refused; ``reply`` is the full SMTP reply to send."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class Address:
    local: str
    domain: str  # lower-cased

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """Case-folded form used for lookups (local parts are treated case-insensitively, like most MTAs)."""
        return f"{self.local.lower()}@{self.domain}"


def split_path_and_params(arg: str) -> tuple[str, str]:
    """Split ``<path> PARAMS`` into the bracketed path (brackets kept) and the parameter string."""
    arg = arg.strip()
    if not arg.startswith("<"):
        raise PathError(R.R501_PATH_SYNTAX)
    # A '>' inside a quoted local part does not close the path.
    in_quote = escaped = False
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return arg[: i + 1], arg[i + 1 :].strip()
    raise PathError(R.R501_PATH_UNCLOSED)


def parse_path(path: str, allow_null: bool = False) -> Address | None:
    """Parse ``<local@domain>`` (brackets included). Returns None for ``<>`` when allowed."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise PathError(R.R501_PATH_CONTROL)
    if _NOT_UTF8_RE.search(path):
        # RFC 6531 3.3: a non-ASCII address is UTF-8. aiosmtpd decodes command arguments with
        # surrogateescape, so other bytes arrive as lone surrogates, which nothing downstream
        # (the queue database, a remote's MAIL/RCPT) can encode.
        raise PathError(R.R501_PATH_NOT_UTF8)
    if not (path.startswith("<") and path.endswith(">")):
        raise PathError(R.R501_PATH_UNCLOSED)
    inner = path[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise PathError(R.R501_PATH_SYNTAX)
    if len(inner) > MAX_PATH:
        raise PathError(R.R501_PATH_TOO_LONG)
    if inner.startswith("@"):
        # RFC 5321 4.1.2 A-d-l: source routes. 3.6.1 says they SHOULD be ignored; we refuse them so
        # that nobody can test whether we would route by them.
        raise PathError(R.R550_SOURCE_ROUTE)
    local, domain = _split_mailbox(inner)
    if not domain:
        if "!" in local:
            raise PathError(R.R550_BANG_PATH)
        raise PathError(R.R501_PATH_SYNTAX)
    _check_local(local)
    return Address(local, _check_domain(domain))


def _split_mailbox(inner: str) -> tuple[str, str]:
    if inner.startswith('"'):
        i, escaped = 1, False
        while i < len(inner):
            ch = inner[i]
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                break
            i += 1
        else:
            raise PathError(R.R501_PATH_SYNTAX)
        local, rest = inner[: i + 1], inner[i + 1 :]
        if not rest.startswith("@"):
            raise PathError(R.R501_PATH_SYNTAX)
        return local, rest[1:]
    local, at, domain = inner.rpartition("@")
    if not at:
        return inner, ""
    return local, domain


def _check_local(local: str) -> None:
    if not local:
        raise PathError(R.R501_PATH_SYNTAX)
    if len(local) > MAX_LOCAL_PART:
        raise PathError(R.R501_PATH_TOO_LONG)
    if local.startswith('"'):
        content = local[1:-1]
        unquoted = re.sub(r"\\(.)", r"\1", content)
        # A quoted local part that hides routing characters is the classic way to smuggle a remote
        # address past a naive "ends with @ourdomain" check.
        if any(c in unquoted for c in "@%!"):
            raise PathError(R.R550_QUOTED_ROUTE)
        return
    if "@" in local:
        raise PathError(R.R550_MULTIPLE_AT)
    if "%" in local:
        raise PathError(R.R550_PERCENT_HACK)
    if "!" in local:
        raise PathError(R.R550_BANG_PATH)
    if not _DOT_STRING_RE.match(local) and not _is_utf8_dot_string(local):
        raise PathError(R.R501_PATH_SYNTAX)


def _is_utf8_dot_string(local: str) -> bool:
    # RFC 6531 3.3: with SMTPUTF8, atext is extended by UTF8-non-ascii.
    if all(ord(c) < 128 for c in local):
        return False
    return all(part and not any(ord(c) < 33 or c in '"(),:;<>@[\\]%!' for c in part) for part in local.split("."))


def _check_domain(domain: str) -> str:
    if domain.startswith("["):
        # Address literals would let a sender name any host directly; we only deliver by domain.
        raise PathError(R.R550_ADDRESS_LITERAL)
    if domain.endswith("."):
        raise PathError(R.R501_TRAILING_DOT)
    if len(domain) > MAX_DOMAIN:
        raise PathError(R.R501_PATH_TOO_LONG)
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL_RE.match(lb) or _ULABEL_RE.match(lb) for lb in labels):
        raise PathError(R.R501_BAD_DOMAIN)
    return domain.lower()


def is_bare_postmaster(path: str) -> bool:
    """``<Postmaster>`` without a domain (any case): RFC 5321 4.5.1 requires accepting it as a
    recipient, meaning the postmaster of the receiving server."""
    return path.lower() == "<postmaster>"


def parse_address(text: str) -> Address:
    """Parse a bare ``local@domain`` (config files, CLI arguments, header addresses)."""
    return parse_path(f"<{text.strip()}>")  # type: ignore[return-value]
