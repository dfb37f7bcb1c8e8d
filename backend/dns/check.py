"""Live DNS check of a homemx installation: MX, A/AAAA, PTR, SPF, DKIM, DMARC, MTA-STS and TLS-RPT,
each a pass or a failure that says what to fix, gathered in a report (table or JSON).

Records are parsed by backend/dns/parse.py, SPF evaluated by backend/dns/spf.py and DMARC by
backend/auth/dmarc.py (the engines inbound mail is checked with); every lookup goes
through a DNSLookup (backend/dns/lookup.py) built on the resolver ``resolver_for`` gives.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import dns.resolver

from backend.config import BackendConfig
from backend.dkim.keys import DKIMKeyError, load_private_key, public_key_bytes
from backend.dns.lookup import AsyncOverBlocking, DNSLookup, DNSTempError
from backend.dns.parse import ParseError, is_dmarc_record, parse_dkim_txt, parse_dmarc, parse_tags
from backend.dns.records import fqdn, mta_sts_id, tlsrpt_rua
from backend.dns.resolver import make_blocking_resolver
from backend.dns.spf import check_host


def resolver_for(config: BackendConfig, timeout: float = 5.0) -> dns.resolver.Resolver:
    """A resolver using delivery.nameservers/dns_port when configured, else /etc/resolv.conf."""
    return make_blocking_resolver(config.delivery.nameservers, config.delivery.dns_port, timeout)


@dataclass
class CheckResult:
    name: str  # e.g. "MX example.org", "PTR 203.0.113.5", "DKIM rsa2025a._domainkey.example.org"
    ok: bool
    detail: str  # what was found (pass) or why it fails


@dataclass
class CheckReport:
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.results.append(CheckResult(name, ok, detail))

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    def to_json(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(r) for r in self.results]}

    def table(self) -> str:
        width = max((len(r.name) for r in self.results), default=10)
        lines = [f"{'check':<{width}}  result  detail"]
        for r in self.results:
            lines.append(f"{r.name:<{width}}  {'pass' if r.ok else 'FAIL':<6}  {r.detail}")
        bad = len(self.failures())
        lines.append(f"{len(self.results) - bad} passed, {bad} failed")
        return "\n".join(lines)


def _guard(report: CheckReport, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
    try:
        ok, detail = fn()
    except DNSTempError as e:
        ok, detail = False, f"DNS lookup failed: {e}"
    report.add(name, ok, detail)


def check_mx(config: BackendConfig, lookup: DNSLookup, domain: str) -> tuple[bool, str]:
    host = fqdn(config.server.hostname)
    mxs = lookup.mx(domain)
    if not mxs:
        return False, f"no MX record at {domain} (mail would go to the domain's A record)"
    hosts = [h for _, h in mxs]
    if host not in hosts:
        return False, f"MX points to {', '.join(hosts)}, not to {host}"
    best = mxs[0][1]
    if best != host:
        return False, f"{host} is listed but {best} has a better preference: mail goes there first"
    return True, f"{domain} MX {mxs[0][0]} {host}"


def check_host_addresses(config: BackendConfig, lookup: DNSLookup) -> list[tuple[str, bool, str]]:
    host = fqdn(config.server.hostname)
    out = []
    for rtype, want, got in (
        ("A", set(config.gateway.public_ipv4), set(lookup.a(host))),
        ("AAAA", {str(ipaddress.ip_address(a)) for a in config.gateway.public_ipv6}, set(lookup.aaaa(host))),
    ):
        if not want and not got:
            continue
        if got == want:
            out.append((f"{rtype} {host}", True, " ".join(sorted(got))))
        elif not got:
            out.append((f"{rtype} {host}", False, f"no {rtype} record; expected {' '.join(sorted(want))} (the gateway)"))
        elif not want:
            out.append((f"{rtype} {host}", False, f"{rtype} {' '.join(sorted(got))} published but no gateway address of that family is configured"))
        else:
            out.append((f"{rtype} {host}", False, f"{rtype} is {' '.join(sorted(got))}, expected {' '.join(sorted(want))} (the gateway)"))
    return out


def check_ptr(config: BackendConfig, lookup: DNSLookup, address: str) -> tuple[bool, str]:
    host = fqdn(config.server.hostname)
    names = lookup.ptr(address)
    if not names:
        return False, f"no PTR for {address}: ask the VPS provider to set it to {host}"
    if host not in names:
        return False, f"PTR of {address} is {', '.join(names)}, not {host}"
    # Forward-confirmed reverse DNS: the name must resolve back to the address.
    if str(ipaddress.ip_address(address)) not in lookup.addresses(host):
        return False, f"PTR is {host} but {host} does not resolve back to {address} (not forward-confirmed)"
    return True, f"{address} → {host} → {address}"


def check_spf(config: BackendConfig, lookup: DNSLookup, domain: str) -> list[tuple[str, bool, str]]:
    out = []
    addresses = (*config.gateway.public_ipv4, *config.gateway.public_ipv6)
    if not addresses:
        return [(f"SPF {domain}", False, "no gateway public address configured ([gateway] public_ipv4/public_ipv6)")]
    # The same engine as the inbound check (async); here nothing else runs, so its blocking lookups
    # may block the loop. HELO: the name our deliveries greet with, for %{h}.
    helo = fqdn(config.server.hostname).rstrip(".")
    for ip in addresses:
        r = asyncio.run(check_host(AsyncOverBlocking(lookup), ip, domain, helo=helo))
        label = f"SPF {domain} {ip}" if len(addresses) > 1 else f"SPF {domain}"
        if r.result == "pass":
            out.append((label, True, f"pass for {ip}: {r.reason} ({r.lookups} lookups)"))
        else:
            out.append((label, False, f"{r.result} for {ip}: {r.reason}"))
    return out


def check_dkim(config: BackendConfig, lookup: DNSLookup, key) -> tuple[bool, str]:
    name = f"{key.selector}._domainkey.{key.domain}"
    try:
        want = public_key_bytes(load_private_key(key.private_key, key.algorithm))
    except DKIMKeyError as e:
        return False, f"cannot read the configured key: {e}"
    txts = lookup.txt(name)
    if not txts:
        return False, f"no TXT record at {name}"
    if len(txts) > 1:
        return False, f"{len(txts)} TXT records at {name}: verifiers need exactly one"
    try:
        rec = parse_dkim_txt(txts[0])
    except ParseError as e:
        return False, f"record does not parse: {e}"
    if rec.key_type != key.algorithm:
        return False, f"published k={rec.key_type}, configured key is {key.algorithm}"
    if not rec.public_key:
        return False, "published key is revoked (empty p=)"
    if not _same_public_key(key.algorithm, rec.public_key, want):
        return False, "published p= does not match the configured private key (wrong or rotated key?)"
    return True, f"k={rec.key_type} matches {key.private_key.name}"


def _same_public_key(algorithm: str, published: bytes, want: bytes) -> bool:
    if algorithm == "ed25519":
        return published == want
    # Published RSA keys may be SubjectPublicKeyInfo or bare PKCS#1 RSAPublicKey: compare numbers.
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        a = load_der_public_key(published)
    except ValueError:
        return False
    b = load_der_public_key(want)
    return getattr(a, "public_numbers", lambda: None)() == b.public_numbers()


def check_dmarc(config: BackendConfig, lookup: DNSLookup, domain: str) -> tuple[bool, str]:
    """Our published DMARC record, judged by the same evaluation inbound mail gets
    (backend/auth/dmarc.py: discovery with the organizational-domain fallback, the Public Suffix
    List for relaxed alignment): would a message of ours that carries only our DKIM signature pass?
    The record itself is parsed strictly (a sender's mistake a receiver forgives is still reported)."""
    from backend.auth.dmarc import aligned, evaluate_dmarc
    from backend.auth.results import DKIMVerdict

    name = f"_dmarc.{domain}"
    recs = [t for t in lookup.txt(name) if is_dmarc_record(t)]
    if not recs:
        return False, f"no DMARC record at {name}"
    if len(recs) > 1:
        return False, f"{len(recs)} DMARC records at {name} (RFC 7489 6.6.3: then none applies)"
    try:
        rec = parse_dmarc(recs[0])
    except ParseError as e:
        return False, f"record does not parse: {e}"
    # Our signatures as a receiver would find them (every configured key verifying), no SPF.
    signatures = [DKIMVerdict(k.domain, k.selector, "pass") for k in config.dkim]
    verdict = asyncio.run(evaluate_dmarc(AsyncOverBlocking(lookup), domain, None, signatures))
    if verdict.result != "pass":
        if not any(aligned(d.domain, domain, rec.adkim) for d in signatures):
            return False, f"no configured DKIM key aligns with {domain} (adkim={rec.adkim})"
        return False, f"a message signed by our keys would get dmarc={verdict.result}: {verdict.reason}"
    notes = [f"p={rec.policy}", f"adkim={rec.adkim}"]
    if not rec.rua:
        notes.append("no rua (no aggregate reports)")
    if rec.policy == "none":
        notes.append("p=none only monitors")
    return True, ", ".join(notes)


def check_mta_sts(config: BackendConfig, lookup: DNSLookup, domain: str) -> tuple[bool, str]:
    """RFC 8461 3.1: one v=STSv1 record with id=, and a host mta-sts.DOMAIN to serve the policy.

    The HTTPS policy fetch is not done here (it needs a public certificate); docs/dns.md says
    how to check it with curl.
    """
    name = f"_mta-sts.{domain}"
    recs = [t for t in lookup.txt(name) if t.startswith("v=STSv1")]
    if len(recs) != 1:
        return False, f"{len(recs)} v=STSv1 records at {name}, need exactly one"
    try:
        tags = parse_tags(recs[0])
    except ParseError as e:
        return False, f"record does not parse: {e}"
    rid = tags.get("id", "")
    if not re.fullmatch(r"[A-Za-z0-9]{1,32}", rid):
        return False, f"id={rid!r} is not 1-32 letters/digits"
    want = mta_sts_id(config, domain)
    if rid != want:
        return False, f"id={rid} but the current policy's id is {want}: senders keep a stale policy"
    if not lookup.addresses(f"mta-sts.{domain}"):
        return False, f"mta-sts.{domain} has no address: nowhere to fetch the policy from"
    return True, f"id={rid}; policy host mta-sts.{domain} resolves"


def check_tlsrpt(config: BackendConfig, lookup: DNSLookup, domain: str) -> tuple[bool, str]:
    name = f"_smtp._tls.{domain}"
    recs = [t for t in lookup.txt(name) if t.startswith("v=TLSRPTv1")]
    if len(recs) != 1:
        return False, f"{len(recs)} v=TLSRPTv1 records at {name}, need exactly one (RFC 8460 3)"
    try:
        tags = parse_tags(recs[0])
    except ParseError as e:
        return False, f"record does not parse: {e}"
    if not tags.get("rua"):
        return False, "no rua="
    if tags["rua"] != tlsrpt_rua(config):
        return False, f"rua={tags['rua']}, configured {tlsrpt_rua(config)}"
    return True, f"rua={tags['rua']}"


def run_checks(config: BackendConfig, lookup: DNSLookup) -> CheckReport:
    """Every check, in the order a receiver meets them."""
    report = CheckReport()
    host = fqdn(config.server.hostname)
    for domain in sorted(config.domains):
        _guard(report, f"MX {domain}", lambda: check_mx(config, lookup, domain))
    try:
        for name, ok, detail in check_host_addresses(config, lookup):
            report.add(name, ok, detail)
    except DNSTempError as e:
        report.add(f"A/AAAA {host}", False, f"DNS lookup failed: {e}")
    if not (config.gateway.public_ipv4 or config.gateway.public_ipv6):
        report.add("gateway address", False, "no [gateway] public_ipv4/public_ipv6 configured: cannot check A, PTR, SPF")
    for ip in (*config.gateway.public_ipv4, *config.gateway.public_ipv6):
        _guard(report, f"PTR {ip}", lambda: check_ptr(config, lookup, ip))
    for domain in [*sorted(config.domains), host.rstrip(".")]:
        try:
            for name, ok, detail in check_spf(config, lookup, domain):
                report.add(name, ok, detail)
        except DNSTempError as e:
            report.add(f"SPF {domain}", False, f"DNS lookup failed: {e}")
    for key in config.dkim:
        _guard(report, f"DKIM {key.selector}._domainkey.{key.domain}", lambda: check_dkim(config, lookup, key))
    for domain in sorted(config.domains):
        _guard(report, f"DMARC {domain}", lambda: check_dmarc(config, lookup, domain))
        if config.dns.mta_sts_mode:
            _guard(report, f"MTA-STS {domain}", lambda: check_mta_sts(config, lookup, domain))
        if config.dns.tlsrpt_rua:
            _guard(report, f"TLS-RPT {domain}", lambda: check_tlsrpt(config, lookup, domain))
    return report
