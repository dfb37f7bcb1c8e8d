"""Live check of a homemx installation as the internet sees it: the DNS records (MX, A/AAAA, PTR,
SPF, DKIM, DMARC, MTA-STS, TLS-RPT, the client SRV records and the names of the HTTPS face) and,
unless asked for DNS only, what answers through the gateway: the MTA-STS policy fetched over
HTTPS and the certificates on the implicit-TLS ports (465, 993). Each check is a pass, a failure
that says what to fix, or a pass with a warning, gathered in a report (table or JSON).

Records are parsed by backend/dns/parse.py, SPF evaluated by backend/dns/spf.py and DMARC by
backend/auth/dmarc.py (the engines inbound mail is checked with), the MTA-STS policy fetched and
parsed by backend/deliver/mtasts.py (the code our own deliveries use); every lookup goes
through a DNSLookup (backend/dns/lookup.py) built on the resolver ``resolver_for`` gives.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import aiohttp
import dns.exception
import dns.resolver
from cryptography import x509
from cryptography.x509.oid import NameOID

from backend.config import BackendConfig
from backend.dkim.keys import DKIMKeyError, load_private_key, public_key_bytes
from backend.dns.lookup import AsyncOverBlocking, DNSLookup, DNSTempError
from backend.dns.parse import ParseError, is_dmarc_record, parse_dkim_txt, parse_dmarc, parse_tags
from backend.dns.records import MailSRV, fqdn, https_names, mail_srv, mta_sts_id, mta_sts_policy, tlsrpt_rua
from backend.dns.resolver import make_blocking_resolver, make_resolver
from backend.dns.spf import check_host

HTTPS_PORT = 443
CERT_WARN_DAYS = 14  # ACME renews at about two thirds of the lifetime (30 days left of 90): 14 means it is late
CERT_FAIL_DAYS = 3  # clients refuse it within days; renewal has failed for weeks


def resolver_for(config: BackendConfig, timeout: float = 5.0) -> dns.resolver.Resolver:
    """A resolver using delivery.nameservers/dns_port when configured, else /etc/resolv.conf."""
    return make_blocking_resolver(config.delivery.nameservers, config.delivery.dns_port, timeout)


@dataclass
class CheckResult:
    name: str  # e.g. "MX example.org", "PTR 203.0.113.5", "DKIM rsa2025a._domainkey.example.org"
    ok: bool
    detail: str  # what was found (pass) or why it fails
    warn: bool = False  # a pass that needs attention soon (a certificate close to expiry)


@dataclass
class CheckReport:
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def add(self, name: str, ok: bool, detail: str, warn: bool = False) -> None:
        self.results.append(CheckResult(name, ok, detail, warn and ok))

    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if r.warn]

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    def to_json(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(r) for r in self.results]}

    def table(self) -> str:
        width = max((len(r.name) for r in self.results), default=10)
        lines = [f"{'check':<{width}}  result  detail"]
        for r in self.results:
            result = "FAIL" if not r.ok else "warn" if r.warn else "pass"
            lines.append(f"{r.name:<{width}}  {result:<6}  {r.detail}")
        bad, warned = len(self.failures()), len(self.warnings())
        lines.append(f"{len(self.results) - bad} passed, {bad} failed" + (f", {warned} with a warning" if warned else ""))
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
        # The default, not a fault: a pass without a warning, with the next step named.
        notes.append("p=none only monitors: move to p=quarantine once `homemx-backend dmarc report` "
                     "shows no unknown source (docs/dns.md)")
    return True, ", ".join(notes)


def check_mta_sts(config: BackendConfig, lookup: DNSLookup, domain: str) -> tuple[bool, str]:
    """RFC 8461 3.1: one v=STSv1 record with id=, and a host mta-sts.DOMAIN to serve the policy
    (when the home serves it, ``check_https_name`` checks that name instead: one line per fault).

    The HTTPS policy fetch is ``check_mta_sts_policy``.
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
    if f"mta-sts.{domain}" in https_names(config, domain):
        return True, f"id={rid}"
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


def check_srv(config: BackendConfig, lookup: DNSLookup, domain: str, srv: MailSRV) -> tuple[bool, str]:
    """An RFC 6186 label of ``domain``: offered services point at the mail host and the public
    port (priority and weight are the operator's choice); the others say "not offered" with the
    target "." (RFC 2782), so clients skip them instead of trying guessed names."""
    host = fqdn(config.server.hostname)
    name = srv.owner(domain).rstrip(".")
    want = f"{name}. SRV {srv.rdata(host)}"
    found = lookup.srv(name)
    shown = ", ".join(f"{p} {w} {port} {t}" for p, w, port, t in found)
    if srv.offered:
        if not found:
            return False, f"no SRV record at {name}: publish {want}"
        wrong = [(port, t) for _, _, port, t in found if (port, t) != (srv.port, host)]
        if wrong:
            return False, f"{name} is {shown}: clients would connect there; publish {want}"
        return True, shown
    if not found:
        return False, f"no SRV record at {name}: publish {want} (not offered) so clients do not guess"
    if any(t != "." for _, _, _, t in found):
        return False, f"{name} is {shown}, but homemx offers no such service: publish {want}"
    return True, f"{shown} (not offered)"


def _gateway_addresses(config: BackendConfig) -> set[str]:
    return {str(ipaddress.ip_address(a)) for a in (*config.gateway.public_ipv4, *config.gateway.public_ipv6)}


def check_https_name(config: BackendConfig, lookup: DNSLookup, name: str) -> tuple[bool, str]:
    """A name the home's HTTPS face serves (mta-sts.D, autoconfig.D) resolves to exactly the
    gateway's addresses (``dns records`` publishes it as a CNAME to the mail host; an A/AAAA with
    the same addresses is as good)."""
    host = fqdn(config.server.hostname)
    want = _gateway_addresses(config) or set(lookup.addresses(host))
    got = set(lookup.addresses(name))
    if not got:
        return False, f"{name} has no address: publish {name}. CNAME {host}"
    if got != want:
        return False, (f"{name} resolves to {' '.join(sorted(got))}, not the gateway ({' '.join(sorted(want))}): "
                       f"publish {name}. CNAME {host}")
    return True, " ".join(sorted(got))


@dataclass(frozen=True)
class ConnectOptions:
    """How the checks that connect (the MTA-STS policy fetch, the certificates) reach the gateway."""

    ca_file: str | None = None  # trust only this CA file (a lab's); None: the system's trust store
    timeout: float = 5.0  # per connection (connect, handshake, the policy's whole request)
    # Test seam: where a public port (443, 465, 993) really listens (a test's loopback port).
    ports: Mapping[int, int] = field(default_factory=dict)

    def port(self, public: int) -> int:
        return self.ports.get(public, public)


def _describe_fetch_error(e: BaseException, timeout: float) -> str:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert = e.certificate_error
        return f"certificate not accepted: {getattr(cert, 'verify_message', None) or cert}"
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return "the host has no address"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect to {e.host}:{e.port}: {e.os_error.strerror or e.os_error}"
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {timeout:g} s"
    return str(e) or e.__class__.__name__


async def _fetch_policy(config: BackendConfig, domain: str, opts: ConnectOptions) -> str:
    """GET the policy as a sender would (backend/deliver/mtasts.py: verified TLS, no redirects,
    text/plain, size cap), resolving mta-sts.DOMAIN through the configured nameservers."""
    from backend.deliver.mtasts import MTASTS

    resolver = make_resolver(config.delivery.nameservers, config.delivery.dns_port, opts.timeout)
    sts = MTASTS(resolver, https_port=opts.port(HTTPS_PORT), ca_file=opts.ca_file, timeout=opts.timeout)
    try:
        return await asyncio.wait_for(sts.fetch_https(domain), opts.timeout)
    finally:
        await sts.close()


def check_mta_sts_policy(config: BackendConfig, lookup: DNSLookup, domain: str, opts: ConnectOptions) -> tuple[bool, str]:
    """RFC 8461 3.3: the policy at https://mta-sts.DOMAIN/.well-known/mta-sts.txt is served with a
    valid certificate and parses (3.2); its mx lines cover our MX host (4.1); and it is the policy
    the published id names: the same policy ``dns records`` prints (whose id is derived from it,
    or pinned), announced by the _mta-sts TXT record with that id. A sender that cached a policy
    under an id refetches only when the id changes (3.1): a served policy that changed under the
    same id reaches nobody until their cache expires."""
    from backend.deliver.mtasts import POLICY_PATH, MTASTSError, parse_policy, parse_txt

    url = f"https://mta-sts.{domain}{POLICY_PATH}"
    try:
        text = asyncio.run(_fetch_policy(config, domain, opts))
    except (MTASTSError, aiohttp.ClientError, OSError, asyncio.TimeoutError, dns.exception.DNSException) as e:
        return False, f"cannot fetch {url}: {_describe_fetch_error(e, opts.timeout)}"
    try:
        served = parse_policy(text)
    except MTASTSError as e:
        return False, f"{url} does not parse (RFC 8461 3.2): {e}"
    host = config.server.hostname
    mx = ", ".join(served.mx) or "none"
    if not served.allows(host):
        return False, f"the policy's mx ({mx}) does not cover {host}: senders enforcing it would not deliver to us"
    current = parse_policy(mta_sts_policy(config, domain))
    want_id = mta_sts_id(config, domain)
    if (served.mode, set(served.mx), served.max_age) != (current.mode, set(current.mx), current.max_age):
        return False, (f"served policy (mode={served.mode}, mx {mx}, max_age={served.max_age}) is not the current "
                       f"one (mode={current.mode}, mx {', '.join(current.mx)}, max_age={current.max_age}) "
                       f"that id={want_id} stands for: serve the policy `dns records` prints")
    published = parse_txt(lookup.txt(f"_mta-sts.{domain}"))
    if published != want_id:
        return False, (f"_mta-sts.{domain} announces id={published or 'none'} but the served policy's id is "
                       f"{want_id}: publish id={want_id}, or senders keep the policy they cached")
    return True, f"mode={served.mode}, mx {mx}, max_age={served.max_age}, id={want_id}"


# OpenSSL verify codes (include/openssl/x509_vfy.h) that have a clearer fix than OpenSSL's words.
_X509_NOT_YET_VALID, _X509_EXPIRED, _X509_HOSTNAME_MISMATCH = 9, 10, 62
_X509_UNTRUSTED = {18, 19, 20, 21}  # self-signed leaf or chain, issuer unknown, leaf alone not verifiable


def _peer_certificate(address: str, port: int, host: str, timeout: float) -> x509.Certificate | None:
    """The server's certificate without verifying it (to say what it names and when it expired,
    once verification has failed), or None."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _cert_names(cert: x509.Certificate) -> str:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    return ", ".join(names) or "no DNS names"


def _issuer(cert: x509.Certificate) -> str:
    cn = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    org = cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str((cn or org)[0].value) if (cn or org) else cert.issuer.rfc4514_string()


def check_certificate(
    config: BackendConfig, address: str, public_port: int, opts: ConnectOptions, now: Callable[[], float] = time.time
) -> tuple[bool, str, bool]:
    """(ok, detail, warn) for the certificate a client gets on ``public_port`` (implicit TLS, RFC
    8314) through the gateway address: a chain that verifies against the system trust (or
    ``opts.ca_file``) and names the mail host, as a mail client checks it (RFC 8314 5.3, RFC
    6125); then the days left: a warning under CERT_WARN_DAYS, a failure under CERT_FAIL_DAYS."""
    host = config.server.hostname
    port = opts.port(public_port)
    where = _hostport(address, public_port)
    ctx = ssl.create_default_context(cafile=opts.ca_file)
    try:
        with socket.create_connection((address, port), timeout=opts.timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        cert = _peer_certificate(address, port, host, opts.timeout)
        if e.verify_code == _X509_HOSTNAME_MISMATCH:
            names = _cert_names(cert) if cert is not None else "other names"
            return False, f"certificate is not valid for {host} (it names {names}): include {host} in it", False
        if e.verify_code == _X509_EXPIRED:
            when = f" on {cert.not_valid_after_utc:%Y-%m-%d}" if cert is not None else ""
            return False, f"certificate expired{when}: renewal is failing (see `homemx-backend cert status`)", False
        if e.verify_code == _X509_NOT_YET_VALID:
            return False, "certificate is not valid yet: is this host's clock right?", False
        if e.verify_code in _X509_UNTRUSTED:
            issuer = f" (issuer {_issuer(cert)})" if cert is not None else ""
            return False, (f"certificate chain does not verify{issuer}: {e.verify_message}; serve a CA-issued "
                           "certificate with its intermediates"), False
        return False, f"certificate does not verify: {e.verify_message}", False
    except ssl.SSLError as e:
        return False, f"TLS handshake with {where} failed: {e.reason or e}", False
    except ConnectionRefusedError:
        return False, (f"connection to {where} refused: the gateway does not pass {public_port} home, "
                       "or nothing listens there"), False
    except (TimeoutError, socket.timeout):
        return False, f"no TLS answer from {where} within {opts.timeout:g} s: is {public_port} open on the gateway?", False
    except OSError as e:
        return False, f"cannot connect to {where}: {e.strerror or e}", False
    cert = x509.load_der_x509_certificate(der)
    expires = cert.not_valid_after_utc
    days = (expires.timestamp() - now()) / 86400
    summary = f"valid for {host}, issuer {_issuer(cert)}, expires {expires:%Y-%m-%d} ({days:.0f} days left)"
    if days < CERT_FAIL_DAYS:
        return False, (f"certificate for {host} expires {expires:%Y-%m-%d %H:%M} UTC ({days:.1f} days left): "
                       "renewal is failing (see `homemx-backend cert status`)"), False
    if days < CERT_WARN_DAYS:
        return True, f"{summary}: renewal is overdue (see `homemx-backend cert status`)", True
    return True, summary, False


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def run_checks(config: BackendConfig, lookup: DNSLookup, connect: ConnectOptions | None = None) -> CheckReport:
    """Every check, in the order a receiver meets them; with ``connect``, also the ones that
    connect through the gateway (the MTA-STS policy over HTTPS, the certificates on 465/993)."""
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
        for srv in mail_srv(config):
            _guard(report, f"SRV {srv.owner(domain).rstrip('.')}", lambda: check_srv(config, lookup, domain, srv))
        for name in https_names(config, domain):
            _guard(report, f"A/AAAA {name}", lambda: check_https_name(config, lookup, name))
    if connect is None:
        return report
    if config.dns.mta_sts_mode:
        for domain in sorted(config.domains):
            _guard(report, f"MTA-STS policy {domain}", lambda: check_mta_sts_policy(config, lookup, domain, connect))
    tls_ports = [s.port for s in mail_srv(config) if s.offered and s.implicit_tls]
    for address in (*config.gateway.public_ipv4, *config.gateway.public_ipv6):
        for port in tls_ports:
            ok, detail, warn = check_certificate(config, address, port, connect)
            report.add(f"TLS {_hostport(address, port)}", ok, detail, warn)
    return report
