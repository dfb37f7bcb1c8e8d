"""The DNS records a homemx installation needs, built from the backend config and rendered as zone-file lines.

Pure: no lookups. ``dns check`` (backend/dns/check.py) uses the same expectations (SPF mechanisms,
DKIM values, MTA-STS policy, client SRV records, the names of the HTTPS face) to check what is
live, so what we tell the user to publish and what we check never drift.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from backend.config import BackendConfig
from backend.dkim.keys import dkim_txt_record, zone_txt_rdata
from backend.http.clientconfig import IMAPS_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT, client_services

DEFAULT_TTL = 3600
MX_PREFERENCE = 10
MTA_STS_MAX_AGE = 604800  # RFC 8461 3.2: one week is the common choice; the RFC advises weeks


@dataclass(frozen=True)
class Record:
    """One resource record (absolute owner name) with an optional comment line above it."""

    name: str
    rtype: str
    rdata: str
    comment: str | None = None

    def zone_line(self, ttl: int = DEFAULT_TTL) -> str:
        return f"{self.name}\t{ttl}\tIN\t{self.rtype}\t{self.rdata}"


def fqdn(name: str) -> str:
    return name.rstrip(".").lower() + "."


def txt(value: str) -> str:
    return zone_txt_rdata(value)


def spf_value(config: BackendConfig) -> str:
    """The SPF policy for our domains and the mail host: the gateway's addresses, nothing else.

    RFC 7208 5.6: ip4/ip6 cost no DNS lookup, so the record can never hit the 10-lookup limit.
    Without configured gateway addresses it falls back to ``mx`` (one lookup).
    """
    mechs = [f"ip4:{a}" for a in config.gateway.public_ipv4] + [f"ip6:{a}" for a in config.gateway.public_ipv6]
    if not mechs:
        mechs = ["mx"]
    return "v=spf1 " + " ".join(mechs) + " -all"


def dmarc_rua(config: BackendConfig, domain: str) -> str:
    """Where aggregate reports go: [dns] dmarc_rua, else postmaster@DOMAIN, which always exists
    (RFC 5321 4.5.1; backend/receive/directory.py delivers it with no configuration) and whose
    reports backend/reports/dmarc.py reads for ``homemx-backend dmarc report``."""
    return config.dns.dmarc_rua or f"postmaster@{domain}"


def dmarc_value(config: BackendConfig, domain: str) -> str:
    """RFC 7489 6.3. p=none by default: a new installation monitors first (reports arrive at the rua,
    nothing of ours is junked while SPF/DKIM are being set up); moving to quarantine is the
    documented next step (docs/dns.md) and ``dns check`` says so."""
    return f"v=DMARC1; p={config.dns.dmarc_policy}; rua=mailto:{dmarc_rua(config, domain)}"


def mta_sts_policy(config: BackendConfig, domain: str) -> str:
    """The policy file to serve at https://mta-sts.DOMAIN/.well-known/mta-sts.txt (RFC 8461 3.2, CRLF lines)."""
    lines = [
        "version: STSv1",
        f"mode: {config.dns.mta_sts_mode or 'testing'}",
        f"mx: {config.server.hostname}",
        f"max_age: {MTA_STS_MAX_AGE}",
    ]
    return "\r\n".join(lines) + "\r\n"


def mta_sts_id(config: BackendConfig, domain: str) -> str:
    """The id= of the _mta-sts record: the configured one, else derived from the policy text.

    RFC 8461 3.1: senders refetch the policy when id changes; deriving it from the policy makes it
    change exactly when the policy does. 1-32 alphanumerics.
    """
    if config.dns.mta_sts_id:
        return config.dns.mta_sts_id
    return hashlib.sha256(mta_sts_policy(config, domain).encode()).hexdigest()[:20]


def tlsrpt_rua(config: BackendConfig) -> str | None:
    rua = config.dns.tlsrpt_rua
    if not rua:
        return None
    # RFC 8460 3: rua is a URI (mailto: or https:); accept a bare address for convenience.
    return rua if rua.startswith(("mailto:", "https:")) else f"mailto:{rua}"


@dataclass(frozen=True)
class MailSRV:
    """One RFC 6186 service label and what we publish at it for a domain: the mail host and the
    public port, or "not offered" (port 0)."""

    label: str  # "_submissions._tcp"
    port: int  # the public port; 0: not offered
    priority: int = 0
    implicit_tls: bool = False  # TLS from the first byte (RFC 8314): what ``dns check`` connects to

    @property
    def offered(self) -> bool:
        return self.port != 0

    def owner(self, domain: str) -> str:
        return f"{self.label}.{fqdn(domain)}"

    def rdata(self, host: str) -> str:
        # RFC 2782: a target of "." means the service is decidedly not available at this domain,
        # so a client asking RFC 6186's labels stops there instead of guessing host names.
        return f"{self.priority} 1 {self.port} {fqdn(host)}" if self.offered else "0 0 0 ."


def mail_srv(config: BackendConfig) -> list[MailSRV]:
    """The client SRV records (RFC 6186, RFC 8314 for ``_submissions``), from the same list of
    offered services the autoconfig and autodiscover documents are built from
    (backend/http/clientconfig.py ``client_services``), so the three never disagree: IMAP over TLS
    through Dovecot; submission on 465 and 587 when the home has that listener kind. Cleartext
    IMAP and POP3 are never offered (RFC 8314 4.1), so their labels say "not offered".

    RFC 6186 3.4: a client compares priorities across labels; RFC 8314 prefers implicit TLS, so
    465 and 993 get priority 0 and STARTTLS on 587 gets 10.
    """
    offered = {(s.kind, s.port) for s in client_services(config)}

    def srv(label: str, kind: str, port: int, priority: int, implicit: bool) -> MailSRV:
        return MailSRV(label, port if (kind, port) in offered else 0, priority, implicit)

    return [
        srv("_submissions._tcp", "smtp", SUBMISSIONS_PORT, 0, True),
        srv("_submission._tcp", "smtp", SUBMISSION_PORT, 10, False),
        srv("_imaps._tcp", "imap", IMAPS_PORT, 0, True),
        MailSRV("_imap._tcp", 0),
        MailSRV("_pop3s._tcp", 0),
        MailSRV("_pop3._tcp", 0),
    ]


def https_names(config: BackendConfig, domain: str) -> list[str]:
    """The names of ``domain`` the home's HTTPS face answers for, published as CNAMEs to the mail
    host name: mta-sts.D (when MTA-STS is on) and autoconfig.D, only when [http] is enabled (else
    nothing at home answers them; an MTA-STS policy hosted elsewhere gets its own A/CNAME).

    CNAME rather than A/AAAA: these names are served exactly where the mail host is (the same
    gateway, its 443 passthrough), so they follow the host's A/AAAA, one place to change when the
    gateway moves, and correct even when the mail host's name lives in another zone. Browsers,
    senders fetching a policy and ACME CAs all follow it; the certificate must still name
    mta-sts.D and autoconfig.D themselves (TLS checks the name asked for, not the CNAME target).
    """
    if not config.http.enabled:
        return []
    names = [f"mta-sts.{domain}"] if config.dns.mta_sts_mode else []
    names.append(f"autoconfig.{domain}")
    host = fqdn(config.server.hostname)
    # A CNAME cannot sit beside the host's own A/AAAA (RFC 1034 3.6.2).
    return [n for n in names if fqdn(n) != host]


def ptr_name(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer + "."


def build_records(config: BackendConfig) -> list[Record]:
    """Every forward record to publish, in the order an operator reads them."""
    host = fqdn(config.server.hostname)
    out: list[Record] = []
    first = True
    for a in config.gateway.public_ipv4:
        out.append(Record(host, "A", a, "mail host = the gateway's public address" if first else None))
        first = False
    for a in config.gateway.public_ipv6:
        out.append(Record(host, "AAAA", a, "mail host = the gateway's public address" if first else None))
        first = False
    out.append(Record(host, "TXT", txt(spf_value(config)), "SPF for the mail host's own name (HELO identity, RFC 7208 2.3)"))
    for domain in sorted(config.domains):
        d = fqdn(domain)
        out.append(Record(d, "MX", f"{MX_PREFERENCE} {host}", f"--- {domain} ---"))
        out.append(Record(d, "TXT", txt(spf_value(config)), "SPF: only the gateway may send for this domain"))
        for key in config.dkim:
            if key.domain != domain:
                continue
            value = dkim_txt_record(key.private_key, key.algorithm)
            out.append(Record(f"{key.selector}._domainkey.{d}", "TXT", txt(value), f"DKIM {key.algorithm} selector {key.selector}"))
        out.append(Record(f"_dmarc.{d}", "TXT", txt(dmarc_value(config, domain)), "DMARC"))
        if config.dns.mta_sts_mode:
            out.append(
                Record(
                    f"_mta-sts.{d}",
                    "TXT",
                    txt(f"v=STSv1; id={mta_sts_id(config, domain)}"),
                    f"MTA-STS (RFC 8461): also serve the policy below at https://mta-sts.{domain}/.well-known/mta-sts.txt",
                )
            )
        rua = tlsrpt_rua(config)
        if rua:
            out.append(Record(f"_smtp._tls.{d}", "TXT", txt(f"v=TLSRPTv1; rua={rua}"), "TLS-RPT (RFC 8460)"))
        note = "mail clients find their servers (RFC 6186, RFC 8314); 0 0 0 . = not offered (RFC 2782)"
        for i, srv in enumerate(mail_srv(config)):
            out.append(Record(srv.owner(domain), "SRV", srv.rdata(host), None if i else note))
        for name in https_names(config, domain):
            what = "MTA-STS policy" if name.startswith("mta-sts.") else "Thunderbird autoconfig"
            out.append(Record(fqdn(name), "CNAME", host, f"{what}, served by the home's HTTPS face through the gateway"))
    # DKIM keys for a domain that is not a [domain] (e.g. a sending-only subdomain).
    for key in config.dkim:
        if key.domain not in config.domains:
            value = dkim_txt_record(key.private_key, key.algorithm)
            out.append(Record(f"{key.selector}._domainkey.{fqdn(key.domain)}", "TXT", txt(value), f"DKIM {key.algorithm} selector {key.selector}"))
    return out


def build_ptr_records(config: BackendConfig) -> list[Record]:
    """The reverse records the VPS provider must set (the address block's owner holds the zone)."""
    host = fqdn(config.server.hostname)
    return [Record(ptr_name(a), "PTR", host) for a in (*config.gateway.public_ipv4, *config.gateway.public_ipv6)]


def render_records(config: BackendConfig, ttl: int = DEFAULT_TTL) -> str:
    """The ``dns records`` output: forward zone lines (loadable as-is) and commented notes."""
    lines = [
        f"; homemx DNS records for {', '.join(sorted(config.domains))} — paste into the zone(s).",
        "; Names are absolute (trailing dot), so each line works in any zone file.",
    ]
    for r in build_records(config):
        if r.comment:
            lines.append(f"; {r.comment}")
        lines.append(r.zone_line(ttl))
    if config.dns.mta_sts_mode:
        for domain in sorted(config.domains):
            if config.http.enabled:
                lines.append(f"; MTA-STS policy for {domain}: the home's HTTPS face serves it (certificate for mta-sts.{domain})")
            else:
                lines.append(f"; MTA-STS policy for {domain}: serve over HTTPS (valid certificate for mta-sts.{domain}),")
                lines.append(f";   with an A/CNAME for mta-sts.{domain} pointing at that server (or set [http] enabled = true)")
            lines.append(f";   https://mta-sts.{domain}/.well-known/mta-sts.txt")
            for pl in mta_sts_policy(config, domain).splitlines():
                lines.append(f";     {pl}")
    ptrs = build_ptr_records(config)
    if ptrs:
        lines.append("; PTR: ask your VPS provider to set the reverse DNS of the gateway's address(es) to")
        lines.append(f"; {fqdn(config.server.hostname)} (receivers check it; it must match the A/AAAA above):")
        for r in ptrs:
            lines.append(f"; {r.zone_line(ttl)}")
        lines.append("; (`homemx-backend dns records --ptr` prints these as reverse-zone lines)")
    return "\n".join(lines) + "\n"


def render_ptr_records(config: BackendConfig, ttl: int = DEFAULT_TTL) -> str:
    """Reverse-zone lines only (``dns records --ptr``), for whoever holds the reverse zone."""
    return "".join(r.zone_line(ttl) + "\n" for r in build_ptr_records(config))
