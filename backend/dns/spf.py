"""The SPF engine: RFC 7208 check_host for one client address and identity, over an AsyncDNSLookup
(backend/dns/lookup.py), with macro expansion, exp= explanations and the lookup and void limits.
It serves the inbound checks (backend/auth/spf.py) and ``dns check`` (backend/dns/check.py, through
AsyncOverBlocking); records are parsed by backend/dns/parse.py (parse_spf).

Ours rather than pyspf: pyspf sends every query through its module-global ``spf.DNSLookup``, so
giving one check its own resolver (the configured nameservers, a test's nsd) means patching the
library process-wide, under every check running at the same time, and its lookups block where the
inbound checks run in the event loop. The engine is held to the RFC 7208 test suite that pyspf
passes (tests/backend/test_spf_rfc7208.py: all 203 cases).

Theory of operation: ``check_host`` builds one ``_Check`` (the client, the identity, the counters of
RFC 7208 4.6.4 shared by every record visited); ``_Check.evaluate`` fetches and parses one domain's
record (any syntax error: permerror, 4.6), tries its mechanisms in order, then its redirect. DNS
errors end the check with temperror (via _TempError), except where the RFC says a mechanism just
does not match (ptr) or the exp= text is dropped. Every include and redirect counts against the
limit of 10, which also bounds the recursion.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Mapping

from backend.dns.lookup import DNSTempError
from backend.dns.parse import SPF_TOPLABEL_RE, ParseError, SPFRecord, SPFTerm, is_spf_record, parse_macro_string, parse_spf

SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4: include, a, mx, ptr, exists and redirect
SPF_VOID_LIMIT = 2  # RFC 7208 4.6.4: terms whose query gave NXDOMAIN or no answer
SPF_MX_LIMIT = 10  # RFC 7208 4.6.4: at most 10 MX names per mx, 10 PTR names per ptr (and %{p})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class SPFResult:
    """check_host's answer: ``result`` is one of parse.SPF_RESULTS, ``reason`` the deciding term or
    the error, ``lookups`` the DNS-querying terms evaluated, ``explanation`` the exp= text of a fail
    (RFC 7208 6.2; None when the record has none or it could not be had)."""

    result: str
    reason: str
    lookups: int = 0
    explanation: str | None = None


def client_address(ip: str) -> IPAddress:
    """The address SPF evaluates: an IPv4-mapped IPv6 address (::ffff:192.0.2.1) is the IPv4 client
    it stands for, matched by ip4 and A records only (RFC 7208 5)."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _strip_dot(name: str) -> str:
    return name[:-1] if name.endswith(".") else name


def _askable(name: str) -> bool:
    """Whether a query can be made for ``name``: labels of 1 to 63 octets, 253 in all (RFC 1035 2.3.4).
    Any other target name is one that does not exist (RFC 7208 4.8): the term does not match."""
    name = _strip_dot(name)
    return 0 < len(name) <= 253 and all(0 < len(label) <= 63 for label in name.split("."))


def is_domain_name(name: str) -> bool:
    """RFC 7208 4.3: a well-formed, multi-label domain name ending in a possible top-level label, so
    not an address literal ("[192.0.2.1]") or a bare host name ("OEMCOMPUTER")."""
    name = _strip_dot(name)
    return _askable(name) and "." in name and SPF_TOPLABEL_RE.fullmatch(name.rsplit(".", 1)[1]) is not None


_ESCAPES = {"%": "%", "_": " ", "-": "%20"}  # RFC 7208 7.1: %% %_ %-


def macro_values(ip: IPAddress, sender: str, domain: str, helo: str, *, validated_name: str = "unknown") -> dict[str, str]:
    """The value of each macro letter (RFC 7208 7.2) for one check of ``domain``; ``sender`` is
    local@domain, ``validated_name`` the %{p} (only worked out when a record uses it)."""
    local, _, sender_domain = sender.rpartition("@")
    if ip.version == 4:
        dotted = str(ip)
    else:
        # 7.3: one nibble per label. Upper-case hex as the suite's v-macro-ip6 case expects (and
        # pyspf writes); DNS names are case-insensitive (RFC 4343), so queries are unaffected.
        dotted = ".".join(ip.exploded.replace(":", "").upper())
    return {
        "s": sender, "l": local, "o": sender_domain, "d": domain, "i": dotted, "p": validated_name,
        "h": helo, "v": "in-addr" if ip.version == 4 else "ip6",
        # c, r, t: explanation text only. r is the receiving host, which a check does not know.
        "c": str(ip), "r": "unknown", "t": str(int(time.time())),
    }  # fmt: skip


def expand_macros(spec: str, values: Mapping[str, str], *, explanation: bool = False) -> str:
    """RFC 7208 7.3: ``spec`` with each macro replaced: its value split on the delimiters (default
    "."), reversed on "r", cut to the rightmost DIGIT parts, joined with "."; URL-escaped when the
    letter is upper case. Raises ParseError on bad macro syntax."""
    out = []
    for token in parse_macro_string(spec, explanation=explanation):
        if isinstance(token, str):
            out.append(token)
            continue
        if token.letter in _ESCAPES:
            out.append(_ESCAPES[token.letter])
            continue
        parts = re.split("[" + re.escape(token.delimiters or ".") + "]", values[token.letter])
        if token.reverse:
            parts.reverse()
        if token.digits is not None:
            parts = parts[-token.digits :]
        value = ".".join(parts)
        # 7.3: upper-case macros escape every character outside RFC 3986's unreserved set.
        out.append(urllib.parse.quote(value, safe="~") if token.escape else value)
    return "".join(out)


def _target_name(expanded: str) -> str:
    """An expanded domain-spec as a name to ask: without its trailing dot, and cut from the left a
    label at a time while longer than 253 octets (RFC 7208 7.3)."""
    name = _strip_dot(expanded)
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


@dataclass
class _Outcome:
    """What one record decided, with that record's exp= and domain: RFC 7208 6.2 uses the exp= of
    the record that gave the result (a redirect target's, never an included record's)."""

    result: str
    reason: str
    exp: str | None = None
    domain: str = ""


class _Check:
    """One check_host run: the client and identity, and the counters (RFC 7208 4.6.4) that every
    record it visits shares."""

    def __init__(self, lookup, ip: IPAddress, sender: str, helo: str):
        self.lookup = lookup
        self.ip = ip
        self.sender = sender
        self.helo = helo
        self.lookups = 0
        self.voids = 0
        # 5: A records for an IPv4 client, AAAA for IPv6.
        self.addresses_of = lookup.a if ip.version == 4 else lookup.aaaa

    # ------------------------------------------------------------ records

    async def evaluate(self, domain: str) -> _Outcome:
        """check_host(<ip>, <domain>, <sender>) (RFC 7208 4): this domain's record, its mechanisms
        in order, then its redirect."""
        if not is_domain_name(domain):
            return _Outcome("none", f"{domain!r} is not a domain name (RFC 7208 4.3)")
        record = await self._record(domain)
        if record is None:
            return _Outcome("none", f"no SPF record at {domain}")
        for term in record.terms:
            if await self._matches(term, domain):
                return _Outcome(term.qualifier, f"matched {_term_text(term)} in the record of {domain}", record.exp, domain)
        if record.redirect is None:
            return _Outcome("neutral", f"no mechanism matched in the record of {domain} (default ?all)", record.exp, domain)
        # 6.1: only when no mechanism matched (an "all" anywhere makes it unused); the target's
        # result, and its exp=, replace ours; a target without a record is a permerror.
        self._count(f"redirect={record.redirect}")
        target = await self._target(record.redirect, domain)
        outcome = await self.evaluate(target)
        if outcome.result == "none":
            raise _PermError(f"redirect={target} in the record of {domain}: {outcome.reason} (RFC 7208 6.1)")
        return outcome

    async def _record(self, domain: str) -> SPFRecord | None:
        # 4.4: a DNS error is a temperror. 4.5: only TXT strings starting "v=spf1" count; two is a permerror.
        try:
            texts = await self.lookup.txt(domain)
        except DNSTempError as e:
            raise _TempError(f"SPF record of {domain}: {e}") from None
        records = [t for t in texts if is_spf_record(t)]
        if len(records) > 1:
            raise _PermError(f"{domain} publishes {len(records)} SPF records (RFC 7208 4.5)")
        if not records:
            return None
        try:
            return parse_spf(records[0])
        except ParseError as e:
            raise _PermError(f"the record of {domain}: {e}") from None

    # ------------------------------------------------------------ mechanisms (RFC 7208 5)

    async def _matches(self, term: SPFTerm, domain: str) -> bool:
        m = term.mechanism
        if m == "all":
            return True
        if m in ("ip4", "ip6"):
            return term.network.version == self.ip.version and self.ip in term.network
        self._count(_term_text(term))
        target = await self._target(term.domain_spec, domain) if term.domain_spec else domain
        what = f"{_term_text(term)} in the record of {domain}"
        if m == "include":
            return await self._include(target, what)
        if m == "a":
            return self._in_network(self._void(await self._ask(self.addresses_of, target), what), term)
        if m == "mx":
            return await self._mx(term, target, what)
        if m == "ptr":
            return await self._ptr(target)
        # exists (5.7): any A record, whatever the client's address family.
        return bool(self._void(await self._ask(self.lookup.a, target), what))

    async def _include(self, target: str, what: str) -> bool:
        # 5.2: pass matches; fail, softfail, neutral do not; temperror and permerror propagate
        # (raised from the inner evaluation); none is a permerror.
        outcome = await self.evaluate(target)
        if outcome.result == "none":
            raise _PermError(f"{what}: {outcome.reason} (RFC 7208 5.2)")
        return outcome.result == "pass"

    async def _mx(self, term: SPFTerm, target: str, what: str) -> bool:
        hosts = [_strip_dot(host) for _, host in self._void(await self._ask(self.lookup.mx, target), what)]
        hosts = [h for h in hosts if h]  # RFC 7505 null MX "." names no host
        if len(hosts) > SPF_MX_LIMIT:
            raise _PermError(f"{what}: {len(hosts)} MX names, more than {SPF_MX_LIMIT} (RFC 7208 4.6.4)")
        for host in hosts:
            if self._in_network(await self._ask(self.addresses_of, host), term):
                return True
        return False

    async def _ptr(self, target: str) -> bool:
        # 5.5: a validated name of the client that is the target or ends in it (case-insensitively).
        target = target.lower()
        for name in await self._ptr_names():
            if (name == target or name.endswith("." + target)) and await self._validates(name):
                return True
        return False

    async def _ptr_names(self) -> list[str]:
        """The client's PTR names, lower case, the first 10 (4.6.4). Not a void lookup when empty:
        the sender does not control the client's reverse zone. A DNS error means no names (5.5)."""
        try:
            names = await self.lookup.ptr(str(self.ip))
        except DNSTempError:
            return []
        return [_strip_dot(n).lower() for n in names][:SPF_MX_LIMIT]

    async def _validates(self, name: str) -> bool:
        """5.5: the name's A (AAAA) records include the client; a DNS error skips the name."""
        if not _askable(name):
            return False
        try:
            return self.ip in [ipaddress.ip_address(a) for a in await self.addresses_of(name)]
        except DNSTempError:
            return False

    def _in_network(self, addresses: list[str], term: SPFTerm) -> bool:
        # 5.3/5.4: the client is within cidr-length of one of the addresses (ip4-cidr / ip6-cidr).
        plen = term.cidr4 if self.ip.version == 4 else term.cidr6
        plen = self.ip.max_prefixlen if plen is None else plen
        return any(self.ip in ipaddress.ip_network(f"{a}/{plen}", strict=False) for a in addresses)

    # ------------------------------------------------------------ DNS and limits

    async def _ask(self, query, name: str) -> list:
        """One query for a term; a name that cannot be asked does not exist (RFC 7208 4.8): no answer."""
        if not _askable(name):
            return []
        try:
            return await query(name)
        except DNSTempError as e:
            raise _TempError(str(e)) from None

    def _count(self, what: str) -> None:
        self.lookups += 1
        if self.lookups > SPF_LOOKUP_LIMIT:
            raise _PermError(f"more than {SPF_LOOKUP_LIMIT} DNS lookups (RFC 7208 4.6.4), at {what}")

    def _void(self, answer: list, what: str) -> list:
        if not answer:
            self.voids += 1
            if self.voids > SPF_VOID_LIMIT:
                raise _PermError(f"more than {SPF_VOID_LIMIT} void lookups (RFC 7208 4.6.4), at {what}")
        return answer

    # ------------------------------------------------------------ macros and explanations

    async def _expand(self, spec: str, domain: str, *, explanation: bool = False) -> str:
        values = macro_values(self.ip, self.sender, domain, self.helo)
        if re.search(r"%\{p", spec, re.IGNORECASE):
            values["p"] = await self._validated_name(domain)
        return expand_macros(spec, values, explanation=explanation)

    async def _target(self, spec: str, domain: str) -> str:
        return _target_name(await self._expand(spec, domain))

    async def _validated_name(self, domain: str) -> str:
        """7.3 %{p}: a validated name of the client, <domain> itself first, then one of its
        subdomains, then any; "unknown" when none validates."""
        validated = [name for name in await self._ptr_names() if await self._validates(name)]
        domain = domain.lower()
        if domain in validated:
            return domain
        return next((n for n in validated if n.endswith("." + domain)), validated[0] if validated else "unknown")

    async def explanation(self, outcome: _Outcome) -> str | None:
        """6.2: the exp= text for a fail. Its lookup counts against no limit (4.6.4); a DNS error, no
        or several TXT records, or a bad explanation-string give no explanation."""
        try:
            name = await self._target(outcome.exp, outcome.domain)
            if not _askable(name):
                return None
            texts = await self.lookup.txt(name)
            if len(texts) != 1:
                return None
            return await self._expand(texts[0], outcome.domain, explanation=True)
        except (DNSTempError, ParseError):
            return None


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


async def check_host(lookup, ip: str, domain: str, sender: str | None = None, helo: str | None = None) -> SPFResult:
    """RFC 7208 4: the SPF result for mail from ``sender`` (default postmaster@``domain``) sent by
    ``ip``, asking ``lookup`` (the AsyncDNSLookup interface). ``helo`` is the client's HELO/EHLO
    name, for %{h} ("unknown" when not known). On fail, ``explanation`` carries the exp= text."""
    client = client_address(ip)
    domain = _strip_dot(domain)
    local, at, sender_domain = (sender or "").rpartition("@")
    if not at:
        local, sender_domain = "", domain
    # 4.3: a sender without a local-part is postmaster at its domain.
    check = _Check(lookup, client, f"{local or 'postmaster'}@{sender_domain}", helo or "unknown")
    try:
        outcome = await check.evaluate(domain)
    except _PermError as e:
        return SPFResult("permerror", str(e), check.lookups)
    except _TempError as e:
        return SPFResult("temperror", str(e), check.lookups)
    explanation = await check.explanation(outcome) if outcome.result == "fail" and outcome.exp else None
    return SPFResult(outcome.result, outcome.reason, check.lookups, explanation)
