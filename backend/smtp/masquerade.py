"""Sender masquerading for the lan listener (pure, no I/O): unqualified and host-local addresses of
homelab machines (``root``, ``root@nas``) become addresses of a mail domain of ours.

What Postfix does, and what we take from it. Postfix's ``append_at_myorigin`` gives an address
without a domain ``@$myorigin``; ``masquerade_domains`` strips host names below a listed domain
(``root@nas.example.org`` → ``root@example.org``); both apply to the envelope and, for local clients
(``local_header_rewrite_clients``), to the addresses in the header (cleanup(8), ``masquerade_classes``).
homemx does the same on the lan listener only, and to a smaller set of addresses, so that nothing
an internet client sends is ever rewritten:

- the address has no domain (``root``), or its domain is a single label (``root@nas``,
  ``root@localhost``), or it is one of the listener's ``local_hostnames`` (``root@nas.home.arpa``):
  the domain becomes the listener's masquerade domain (default: the first configured domain);
- envelope: MAIL FROM and RCPT TO (so ``sendmail root`` reaches root@<domain>, usually an alias);
- header: the addresses of the From, Sender and Reply-To fields (Postfix's ``header_sender``
  class; From is what DKIM and DMARC care about) and of To and Cc (``header_recipient``: cron's
  ``To: root`` would otherwise reach the reader as an address no one can answer); a field is
  rewritten only when one of its addresses needs it, and then re-written whole from its parsed
  addresses (``root (Cron Daemon)`` → ``Cron Daemon <root@example.org>``). Other fields, and a
  field that does not parse (a group such as ``undisclosed-recipients:;``), are left as written.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable

_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ADDRESS_FIELD_RE = re.compile(
    rb"^(From|Sender|Reply-To|To|Cc)([ \t]*):([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n", re.IGNORECASE | re.MULTILINE
)


def needs_masquerade(address: str, local_hostnames: Iterable[str] = ()) -> bool:
    """Whether ``address`` (no angle brackets) is unqualified or names a host of the LAN."""
    if not address or address.startswith("@"):
        return False  # the null sender, a source route: not ours to fix
    local, at, domain = address.rpartition("@")
    if not at:
        return True  # "root"
    if not local:
        return False
    domain = domain.lower()
    return bool(_LABEL_RE.match(domain)) or domain in {h.lower() for h in local_hostnames}


def masquerade(address: str, domain: str, local_hostnames: Iterable[str] = ()) -> str:
    """``address`` with its domain replaced by ``domain`` when it needs masquerading, else unchanged."""
    if not needs_masquerade(address, local_hostnames):
        return address
    local = address.rpartition("@")[0] if "@" in address else address
    return f"{local}@{domain}"


def masquerade_path(path: str, domain: str, local_hostnames: Iterable[str] = ()) -> str:
    """The same for an SMTP path with its brackets (``<root>`` → ``<root@example.org>``)."""
    if not (path.startswith("<") and path.endswith(">")):
        return path
    return f"<{masquerade(path[1:-1], domain, local_hostnames)}>"


def masquerade_header(header: bytes, domain: str, local_hostnames: Iterable[str] = ()) -> bytes:
    """A CRLF header block with the From, Sender, Reply-To, To and Cc addresses masqueraded (see
    the module's doc)."""
    hostnames = tuple(local_hostnames)

    def rewrite(m: re.Match) -> bytes:
        value = m.group(3).replace(b"\r\n", b"").decode("utf-8", "surrogateescape")
        pairs = email.utils.getaddresses([value])
        if not pairs or any(not addr for _, addr in pairs):
            return m.group(0)  # unparsable (or a group): left as written, for the From policy to judge
        if not any(needs_masquerade(addr, hostnames) for _, addr in pairs):
            return m.group(0)
        out = ", ".join(
            email.utils.formataddr((name, masquerade(addr, domain, hostnames)), charset="utf-8") for name, addr in pairs
        )
        return m.group(1) + b": " + out.encode("utf-8", "surrogateescape") + b"\r\n"

    return _ADDRESS_FIELD_RE.sub(rewrite, header)
