"""What mail clients are told to configure: Thunderbird autoconfig and Microsoft autodiscover documents.

Pure: the documents are built from the backend config (which client ports the home offers) and,
for autodiscover, from the request body; no I/O. The servers named are the public mail host name
and the standard ports the gateway passes through: IMAP over TLS 993 (Dovecot at home), SMTP
submission over TLS 465 (RFC 8314 3.3) and with STARTTLS 587 (RFC 6409), each only when the home
has the listener for it.

XML is written with ElementTree (text and attributes escaped by it, never by string formatting)
and requests are read with defusedxml: an autodiscover body comes from anyone on the internet, and
the standard library's parser expands entities (billion laughs) and, with a DTD, could be led to
external ones.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import defusedxml
import defusedxml.ElementTree

from backend.config import BackendConfig
from backend.smtp.paths import Address, PathError, parse_address

IMAPS_PORT = 993  # RFC 8314 7.3: IMAP over implicit TLS
SUBMISSIONS_PORT = 465  # RFC 8314 7.3: message submission over implicit TLS
SUBMISSION_PORT = 587  # RFC 6409: message submission, STARTTLS (RFC 3207)

# Outlook's POX autodiscover (MS-OXDSCLI): what the request asks for and what we answer in.
AUTODISCOVER_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


class AutodiscoverRequestError(ValueError):
    """The autodiscover request body is not one we answer (malformed, with a DTD or entities, no
    usable address); the message says why, for the log."""


@dataclass(frozen=True)
class ClientService:
    """One server a mail client should use: ``kind`` imap or smtp, the public port, and
    ``socket`` SSL (TLS from the first byte) or STARTTLS."""

    kind: str
    port: int
    socket: str


def client_services(config: BackendConfig) -> list[ClientService]:
    """The servers a client is offered, best first: IMAP 993 (Dovecot through the gateway, always
    there in a homemx install), then SMTP 465 and 587 when the home has a submissions or a
    submission listener (RFC 8314 4.1: implicit TLS is preferred)."""
    kinds = {lc.kind for lc in config.listeners}
    services = [ClientService("imap", IMAPS_PORT, "SSL")]
    if "submissions" in kinds:
        services.append(ClientService("smtp", SUBMISSIONS_PORT, "SSL"))
    if "submission" in kinds:
        services.append(ClientService("smtp", SUBMISSION_PORT, "STARTTLS"))
    return services


def _xml(root: ET.Element) -> bytes:
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def autoconfig_xml(config: BackendConfig, domain: str) -> bytes:
    """Thunderbird's autoconfig document (clientConfig version 1.1) for ``domain``: every local
    domain is listed as served by the same servers; the login is the full address
    (%EMAILADDRESS%) with a password sent only inside TLS (password-cleartext)."""
    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider", id=domain)
    for d in [domain, *sorted(d for d in config.domains if d != domain)]:
        _sub(provider, "domain", d)
    _sub(provider, "displayName", f"{domain} mail")
    _sub(provider, "displayShortName", domain)
    host = config.server.hostname
    for s in client_services(config):
        server = _sub(provider, "incomingServer" if s.kind == "imap" else "outgoingServer", type=s.kind)
        _sub(server, "hostname", host)
        _sub(server, "port", str(s.port))
        _sub(server, "socketType", s.socket)
        _sub(server, "authentication", "password-cleartext")
        _sub(server, "username", "%EMAILADDRESS%")
    return _xml(root)


def autodiscover_address(body: bytes) -> tuple[Address, str | None]:
    """The e-mail address (and the AcceptableResponseSchema, if any) of an Outlook POX autodiscover
    request. Any namespace is accepted for the elements (clients differ). Raises
    AutodiscoverRequestError: a DTD is refused outright (a request never needs one; it is where
    entity bombs and external entities live)."""
    try:
        root = defusedxml.ElementTree.fromstring(body, forbid_dtd=True)
    except defusedxml.DefusedXmlException as e:
        raise AutodiscoverRequestError(f"refused XML: {type(e).__name__}") from None
    except ET.ParseError as e:
        raise AutodiscoverRequestError(f"malformed XML: {e}") from None
    found: dict[str, str] = {}
    for el in root.iter():
        name = el.tag.rpartition("}")[2] if isinstance(el.tag, str) else ""
        if name in ("EMailAddress", "AcceptableResponseSchema") and name not in found:
            found[name] = (el.text or "").strip()
    if not found.get("EMailAddress"):
        raise AutodiscoverRequestError("no EMailAddress in the request")
    try:
        address = parse_address(found["EMailAddress"])
    except PathError:
        raise AutodiscoverRequestError("EMailAddress is not an address") from None
    return address, found.get("AcceptableResponseSchema") or None


def autodiscover_xml(config: BackendConfig, address: Address) -> bytes:
    """The POX autodiscover answer (Outlook response schema 2006a) for ``address``: IMAP and SMTP
    on the mail host, logging in with the full address. The first SMTP server offered is the one
    Outlook uses."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE_NS)
    account = _sub(_sub(root, "Response", xmlns=OUTLOOK_SCHEMA), "Account")
    _sub(account, "AccountType", "email")
    _sub(account, "Action", "settings")
    for s in client_services(config):
        proto = _sub(account, "Protocol")
        _sub(proto, "Type", s.kind.upper())
        _sub(proto, "Server", config.server.hostname)
        _sub(proto, "Port", str(s.port))
        _sub(proto, "DomainRequired", "off")
        _sub(proto, "LoginName", str(address))
        _sub(proto, "SPA", "off")
        # MS-OXDSCLI (Encryption element): Encryption "SSL" is TLS from the first byte, "TLS" is STARTTLS;
        # SSL=on for older clients that read only that element.
        _sub(proto, "SSL", "on")
        _sub(proto, "Encryption", "SSL" if s.socket == "SSL" else "TLS")
        _sub(proto, "AuthRequired", "on")
    return _xml(root)


def autodiscover_error_xml(code: str, message: str) -> bytes:
    """A POX autodiscover error (what Exchange answers to a request it cannot use, e.g. a GET:
    600 Invalid Request)."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE_NS)
    error = _sub(_sub(root, "Response"), "Error")
    _sub(error, "ErrorCode", code)
    _sub(error, "Message", message)
    return _xml(root)
