"""Live DNS check of a homemx installation: MX, A/AAAA, PTR, SPF, DKIM, DMARC, MTA-STS and TLS-RPT.

Pure parsers (``parse_spf``, ``parse_dmarc``, ``parse_dkim_txt``, ``parse_tags``) sit apart from
lookups; every lookup goes through a ``DNSLookup`` built on an injectable dnspython resolver, so
tests point it at a real nsd and the CLI at the configured (or system) nameservers.

SPF is evaluated by our own RFC 7208 check_host subset rather than pyspf: pyspf sends every query
through a module-global lookup function (no per-check resolver, not safe to repoint per call) and
our need is narrow (ip4/ip6/a/mx/include/redirect/exists/all, lookup and void limits).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import dns.exception
import dns.name
import dns.resolver
import dns.reversename

from backend.config import BackendConfig
from backend.dkim.keys import DKIMKeyError, load_private_key, public_key_bytes
from backend.dns.records import fqdn, mta_sts_id, tlsrpt_rua


# ---------------------------------------------------------------- lookups


class DNSTempError(Exception):
    """SERVFAIL, timeout or similar: the answer is unknown (SPF temperror)."""


class DNSLookup:
    """Typed lookups over a dnspython resolver. NXDOMAIN and NODATA give ``[]`` (a void lookup)."""

    def __init__(self, resolver: dns.resolver.Resolver):
        self.resolver = resolver

    def _query(self, name: str, rdtype: str):
        try:
            return list(self.resolver.resolve(name, rdtype, search=False))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as e:
            raise DNSTempError(f"{rdtype} {name}: {e.__class__.__name__}") from None
        except dns.exception.DNSException as e:
            raise DNSTempError(f"{rdtype} {name}: {e}") from None

    def txt(self, name: str) -> list[str]:
        # RFC 7208 3.3 / RFC 6376 3.6.2.2: the strings of one TXT record are concatenated.
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self._query(name, "TXT")]

    def a(self, name: str) -> list[str]:
        return [r.address for r in self._query(name, "A")]

    def aaaa(self, name: str) -> list[str]:
        return [str(ipaddress.ip_address(r.address)) for r in self._query(name, "AAAA")]

    def addresses(self, name: str) -> list[str]:
        return self.a(name) + self.aaaa(name)

    def mx(self, name: str) -> list[tuple[int, str]]:
        return sorted((r.preference, r.exchange.to_text().lower()) for r in self._query(name, "MX"))

    def ptr(self, address: str) -> list[str]:
        return [r.target.to_text().lower() for r in self._query(dns.reversename.from_address(address).to_text(), "PTR")]


def resolver_for(config: BackendConfig, timeout: float = 5.0) -> dns.resolver.Resolver:
    """A resolver using delivery.nameservers/dns_port when configured, else /etc/resolv.conf."""
    if config.delivery.nameservers:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = list(config.delivery.nameservers)
        r.port = config.delivery.dns_port
    else:
        r = dns.resolver.Resolver()
    r.timeout = r.lifetime = timeout
    return r


# ---------------------------------------------------------------- pure parsers


class ParseError(ValueError):
    pass


def parse_tags(text: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 3.2; DMARC and MTA-STS use the same shape). Duplicate tags are errors."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise ParseError(f"{part!r} is not tag=value")
        name = name.strip()
        if name in tags:
            raise ParseError(f"duplicate tag {name!r}")
        tags[name] = re.sub(r"\s+", "", value) if name == "p" else value.strip()
    return tags


@dataclass(frozen=True)
class DKIMKeyRecord:
    key_type: str  # rsa | ed25519
    public_key: bytes  # decoded p=; empty means revoked (RFC 6376 3.6.1)


def parse_dkim_txt(text: str) -> DKIMKeyRecord:
    """A DKIM key record (RFC 6376 3.6.1, RFC 8463): v=DKIM1 (optional, first), k= (default rsa), p=."""
    tags = parse_tags(text)
    if "v" in tags and (tags["v"] != "DKIM1" or not text.lstrip().startswith("v")):
        raise ParseError("v= must be DKIM1 and come first")
    if "p" not in tags:
        raise ParseError("no p= tag")
    k = tags.get("k", "rsa").lower()
    if k not in ("rsa", "ed25519"):
        raise ParseError(f"unknown key type k={k}")
    try:
        p = base64.b64decode(tags["p"], validate=True)
    except ValueError:
        raise ParseError("p= is not base64") from None
    return DKIMKeyRecord(k, p)


@dataclass(frozen=True)
class DMARCRecord:
    policy: str
    subdomain_policy: str | None
    adkim: str
    aspf: str
    pct: int
    rua: tuple[str, ...]


def parse_dmarc(text: str) -> DMARCRecord:
    """A DMARC record (RFC 7489 6.3, 6.4): v=DMARC1 first, then p= (required here) and the rest."""
    if not re.match(r"^\s*v\s*=\s*DMARC1\s*(;|$)", text):
        raise ParseError("does not start with v=DMARC1")
    tags = parse_tags(text)
    p = tags.get("p")
    if p is None:
        raise ParseError("no p= policy")
    if p not in ("none", "quarantine", "reject"):
        raise ParseError(f"p={p} is not none, quarantine or reject")
    sp = tags.get("sp")
    if sp is not None and sp not in ("none", "quarantine", "reject"):
        raise ParseError(f"sp={sp} is not none, quarantine or reject")
    adkim, aspf = tags.get("adkim", "r"), tags.get("aspf", "r")
    for n, v in (("adkim", adkim), ("aspf", aspf)):
        if v not in ("r", "s"):
            raise ParseError(f"{n}={v} is not r or s")
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        raise ParseError("pct= is not a number") from None
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if u.strip())
    return DMARCRecord(p, sp, adkim, aspf, pct, rua)


# SPF (RFC 7208 4.6.1, 12): term = directive / modifier
SPF_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECH_RE = re.compile(r"^([+\-~?]?)([a-z0-9]+)(?::([^/]+))?(?:/(\d+))?(?://(\d+))?$", re.IGNORECASE)
_IP_MECH_RE = re.compile(r"^([+\-~?]?)(ip4|ip6):([^/]+)(?:/(\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class SPFTerm:
    qualifier: str  # pass/fail/softfail/neutral
    mechanism: str
    domain_spec: str | None = None
    cidr4: int | None = None
    cidr6: int | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@dataclass(frozen=True)
class SPFRecord:
    terms: tuple[SPFTerm, ...]
    redirect: str | None = None
    exp: str | None = None


def parse_spf(text: str) -> SPFRecord:
    """Parse one SPF record (RFC 7208 4.5, 12). Syntax errors raise ParseError (permerror)."""
    words = text.split()
    if not words or words[0].lower() != "v=spf1":
        raise ParseError("does not start with v=spf1")
    terms: list[SPFTerm] = []
    redirect = exp = None
    for w in words[1:]:
        m_name = re.match(r"^([a-z][a-z0-9_.\-]*)=(.*)$", w, re.IGNORECASE)
        if m_name:
            name, value = m_name.group(1).lower(), m_name.group(2)
            # RFC 7208 6: redirect and exp at most once each; unknown modifiers are ignored.
            if name == "redirect":
                if redirect is not None:
                    raise ParseError("redirect= appears twice")
                redirect = value
            elif name == "exp":
                if exp is not None:
                    raise ParseError("exp= appears twice")
                exp = value
            continue
        m_ip = _IP_MECH_RE.match(w)
        if m_ip:
            q, mech, addr, plen = m_ip.groups()
            try:
                ip = ipaddress.ip_address(addr)
                if (ip.version == 4) != (mech.lower() == "ip4"):
                    raise ValueError
                net = ipaddress.ip_network(f"{addr}/{plen or ip.max_prefixlen}", strict=False)
            except ValueError:
                raise ParseError(f"bad address in {w!r}") from None
            terms.append(SPFTerm(_QUALIFIERS.get(q, "pass"), mech.lower(), network=net))
            continue
        m = _MECH_RE.match(w)
        if not m or m.group(2).lower() not in SPF_MECHANISMS:
            raise ParseError(f"unknown mechanism {w!r}")
        q, mech, spec, c4, c6 = m.groups()
        mech = mech.lower()
        if mech in ("include", "exists") and not spec:
            raise ParseError(f"{mech} needs a domain")
        if mech == "all" and (spec or c4 or c6):
            raise ParseError(f"bad {w!r}")
        if c4 is not None and int(c4) > 32 or c6 is not None and int(c6) > 128:
            raise ParseError(f"bad prefix length in {w!r}")
        terms.append(SPFTerm(_QUALIFIERS.get(q, "pass"), mech, spec, int(c4) if c4 else None, int(c6) if c6 else None))
    return SPFRecord(tuple(terms), redirect, exp)


def expand_macros(spec: str, *, ip: str, domain: str, sender: str) -> str:
    """RFC 7208 7: macro expansion for domain-specs (s l o d i h v, digits and r transformers)."""
    if "%" not in spec:
        return spec
    local, _, sdomain = sender.rpartition("@")
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        i_value = str(addr)
    else:
        i_value = ".".join(addr.exploded.replace(":", ""))
    values = {
        "s": sender, "l": local or "postmaster", "o": sdomain or domain, "d": domain,
        "i": i_value, "h": domain, "v": "in-addr" if addr.version == 4 else "ip6",
    }  # fmt: skip

    def repl(m: re.Match) -> str:
        if m.group(0) == "%%":
            return "%"
        if m.group(0) == "%_":
            return " "
        if m.group(0) == "%-":
            return "%20"
        letter, digits, rev, delims = m.group(1).lower(), m.group(2), m.group(3), m.group(4) or "."
        if letter not in values:
            raise ParseError(f"unknown macro letter {letter!r}")
        parts = re.split("[" + re.escape(delims) + "]", values[letter])
        if rev:
            parts.reverse()
        if digits:
            n = int(digits)
            if n == 0:
                raise ParseError("macro digit 0")
            parts = parts[-n:]
        return ".".join(parts)

    try:
        return re.sub(r"%\{([a-zA-Z])(\d*)(r?)([.\-+,/_=]*)\}|%%|%_|%-", repl, spec)
    except ParseError:
        raise


# ---------------------------------------------------------------- SPF evaluation (RFC 7208 4)

SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4
SPF_VOID_LIMIT = 2  # RFC 7208 4.6.4
SPF_MX_LIMIT = 10  # RFC 7208 4.6.4: at most 10 MX (or PTR) names looked up per mechanism


@dataclass
class SPFResult:
    result: str
    reason: str
    lookups: int = 0


class _SPFPermError(Exception):
    pass


class _SPFTempError(Exception):
    pass


class _SPFState:
    def __init__(self, lookup: DNSLookup):
        self.lookup = lookup
        self.lookups = 0
        self.voids = 0

    def count(self, what: str) -> None:
        self.lookups += 1
        if self.lookups > SPF_LOOKUP_LIMIT:
            raise _SPFPermError(f"more than {SPF_LOOKUP_LIMIT} DNS lookups (RFC 7208 4.6.4), at {what}")

    def void(self, got: list, what: str) -> list:
        if not got:
            self.voids += 1
            if self.voids > SPF_VOID_LIMIT:
                raise _SPFPermError(f"more than {SPF_VOID_LIMIT} void lookups (RFC 7208 4.6.4), at {what}")
        return got

    def q(self, fn: Callable[[str], list], name: str, what: str) -> list:
        try:
            return self.void(fn(name), what)
        except DNSTempError as e:
            raise _SPFTempError(str(e)) from None


def _ip_in(ip: ipaddress._BaseAddress, addresses: list[str], c4: int | None, c6: int | None) -> bool:
    plen = (c4 if c4 is not None else 32) if ip.version == 4 else (c6 if c6 is not None else 128)
    for a in addresses:
        addr = ipaddress.ip_address(a)
        if addr.version == ip.version and ip in ipaddress.ip_network(f"{addr}/{plen}", strict=False):
            return True
    return False


def _fetch_spf(state: _SPFState, domain: str) -> SPFRecord | None:
    # RFC 7208 4.4/4.5: records are TXT strings starting "v=spf1" (then space or end); none → None;
    # more than one → permerror.
    try:
        txts = state.lookup.txt(domain)
    except DNSTempError as e:
        raise _SPFTempError(str(e)) from None
    recs = [t for t in txts if re.match(r"^v=spf1(\s|$)", t, re.IGNORECASE)]
    if not recs:
        return None
    if len(recs) > 1:
        raise _SPFPermError(f"{domain} publishes {len(recs)} SPF records (RFC 7208 4.5)")
    try:
        return parse_spf(recs[0])
    except ParseError as e:
        raise _SPFPermError(f"{domain}: {e}") from None


def _check_host(state: _SPFState, ip: ipaddress._BaseAddress, domain: str, sender: str, depth: int) -> tuple[str, str]:
    if depth > 20:
        raise _SPFPermError("include/redirect loop")
    record = _fetch_spf(state, domain)
    if record is None:
        return "none", f"no SPF record at {domain}"
    ips = str(ip)

    def target(term: SPFTerm) -> str:
        return expand_macros(term.domain_spec, ip=ips, domain=domain, sender=sender) if term.domain_spec else domain

    for term in record.terms:
        m = term.mechanism
        matched = False
        if m == "all":
            matched = True
        elif m in ("ip4", "ip6"):
            matched = ip in term.network if term.network.version == ip.version else False
        elif m == "a":
            state.count(f"a:{target(term)}")
            name = target(term)
            addrs = state.q(state.lookup.a if ip.version == 4 else state.lookup.aaaa, name, f"a {name}")
            matched = _ip_in(ip, addrs, term.cidr4, term.cidr6)
        elif m == "mx":
            name = target(term)
            state.count(f"mx:{name}")
            try:
                mxs = state.void(state.lookup.mx(name), f"mx {name}")
            except DNSTempError as e:
                raise _SPFTempError(str(e)) from None
            if len(mxs) > SPF_MX_LIMIT:
                raise _SPFPermError(f"mx:{name} has more than {SPF_MX_LIMIT} MX names")
            for _, host in mxs:
                if host == ".":
                    continue  # RFC 7505 null MX
                addrs = state.q(state.lookup.a if ip.version == 4 else state.lookup.aaaa, host, f"a {host}")
                if _ip_in(ip, addrs, term.cidr4, term.cidr6):
                    matched = True
                    break
        elif m == "exists":
            name = target(term)
            state.count(f"exists:{name}")
            matched = bool(state.q(state.lookup.a, name, f"exists {name}"))
        elif m == "ptr":
            # RFC 7208 5.5 (deprecated): validated names of the client that end in the target.
            name = target(term)
            state.count(f"ptr:{name}")
            try:
                names = state.lookup.ptr(ips)[:SPF_MX_LIMIT]
                for n in names:
                    n = n.rstrip(".")
                    if (n == name or n.endswith("." + name)) and ips in [
                        str(ipaddress.ip_address(a)) for a in state.lookup.addresses(n)
                    ]:
                        matched = True
                        break
            except DNSTempError:
                matched = False  # RFC 7208 5.5: a PTR lookup error means no match
        elif m == "include":
            name = target(term)
            state.count(f"include:{name}")
            res, why = _check_host(state, ip, name, sender, depth + 1)
            # RFC 7208 5.2 table
            if res == "pass":
                matched = True
            elif res == "temperror":
                raise _SPFTempError(why)
            elif res in ("permerror", "none"):
                raise _SPFPermError(f"include:{name} gave {res}: {why}")
        if matched:
            return term.qualifier, f"matched {_term_text(term)} in the record of {domain}"
    if record.redirect:
        name = expand_macros(record.redirect, ip=ips, domain=domain, sender=sender)
        state.count(f"redirect={name}")
        res, why = _check_host(state, ip, name, sender, depth + 1)
        if res == "none":
            # RFC 7208 6.1: a redirect to a domain without SPF is a permerror.
            raise _SPFPermError(f"redirect={name} has no SPF record")
        return res, why
    return "neutral", f"no mechanism matched in the record of {domain} (default ?all)"


def _term_text(t: SPFTerm) -> str:
    q = {"pass": "", "fail": "-", "softfail": "~", "neutral": "?"}[t.qualifier]
    if t.network is not None:
        return f"{q}{t.mechanism}:{t.network}"
    s = f"{q}{t.mechanism}"
    if t.domain_spec:
        s += f":{t.domain_spec}"
    if t.cidr4 is not None:
        s += f"/{t.cidr4}"
    if t.cidr6 is not None:
        s += f"//{t.cidr6}"
    return s


def check_host(lookup: DNSLookup, ip: str, domain: str, sender: str | None = None) -> SPFResult:
    """RFC 7208 4: the SPF result for mail from ``sender`` (default postmaster@domain) sent by ``ip``."""
    state = _SPFState(lookup)
    try:
        res, why = _check_host(state, ipaddress.ip_address(ip), domain.rstrip(".").lower(), sender or f"postmaster@{domain}", 0)
    except _SPFPermError as e:
        return SPFResult("permerror", str(e), state.lookups)
    except _SPFTempError as e:
        return SPFResult("temperror", str(e), state.lookups)
    except ParseError as e:
        return SPFResult("permerror", str(e), state.lookups)
    return SPFResult(res, why, state.lookups)


# ---------------------------------------------------------------- the checks


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
    for ip in addresses:
        r = check_host(lookup, ip, domain)
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


def _aligned(signing_domain: str, from_domain: str, mode: str) -> bool:
    # RFC 7489 3.1.1. Relaxed: same organizational domain. Without the Public Suffix List we accept
    # parent/child relations, which is what a homemx installation produces.
    if mode == "s":
        return signing_domain == from_domain
    return signing_domain == from_domain or from_domain.endswith("." + signing_domain) or signing_domain.endswith("." + from_domain)


def check_dmarc(config: BackendConfig, lookup: DNSLookup, domain: str) -> tuple[bool, str]:
    name = f"_dmarc.{domain}"
    recs = [t for t in lookup.txt(name) if t.lstrip().lower().startswith("v=dmarc1")]
    if not recs:
        return False, f"no DMARC record at {name}"
    if len(recs) > 1:
        return False, f"{len(recs)} DMARC records at {name} (RFC 7489 6.6.3: then none applies)"
    try:
        rec = parse_dmarc(recs[0])
    except ParseError as e:
        return False, f"record does not parse: {e}"
    signing = [k.domain for k in config.dkim]
    if not any(_aligned(d, domain, rec.adkim) for d in signing):
        return False, f"no configured DKIM key aligns with {domain} (adkim={rec.adkim})"
    # SPF alignment: our envelope senders are addresses of our own domains.
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
