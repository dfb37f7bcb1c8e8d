"""The SPF engine: RFC 7208 check_host over a DNSLookup, with macro expansion and the lookup limits.

Our own subset rather than pyspf: pyspf sends every query through a module-global lookup function
(no per-check resolver, not safe to repoint per call) and our need is narrow
(ip4/ip6/a/mx/ptr/include/redirect/exists/all, lookup and void limits).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

from backend.dns.lookup import DNSLookup, DNSTempError
from backend.dns.parse import ParseError, SPFRecord, SPFTerm, parse_spf


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
    for term in record.terms:
        if _matches(state, term, ip, domain, sender, depth):
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


def _matches(state: _SPFState, term: SPFTerm, ip: ipaddress._BaseAddress, domain: str, sender: str, depth: int) -> bool:
    """RFC 7208 5: does ``ip`` match this mechanism of the record of ``domain``?"""
    m = term.mechanism
    if m == "all":
        return True
    if m in ("ip4", "ip6"):
        return ip in term.network if term.network.version == ip.version else False
    # The other mechanisms name a domain: the term's domain-spec (macros expanded), else the domain.
    name = expand_macros(term.domain_spec, ip=str(ip), domain=domain, sender=sender) if term.domain_spec else domain
    state.count(f"{m}:{name}")
    if m == "a":
        addrs = state.q(state.lookup.a if ip.version == 4 else state.lookup.aaaa, name, f"a {name}")
        return _ip_in(ip, addrs, term.cidr4, term.cidr6)
    if m == "mx":
        return _mx_matches(state, term, ip, name)
    if m == "exists":
        return bool(state.q(state.lookup.a, name, f"exists {name}"))
    if m == "ptr":
        return _ptr_matches(state, ip, name)
    if m == "include":
        res, why = _check_host(state, ip, name, sender, depth + 1)
        # RFC 7208 5.2 table
        if res == "temperror":
            raise _SPFTempError(why)
        if res in ("permerror", "none"):
            raise _SPFPermError(f"include:{name} gave {res}: {why}")
        return res == "pass"
    return False


def _mx_matches(state: _SPFState, term: SPFTerm, ip: ipaddress._BaseAddress, name: str) -> bool:
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
            return True
    return False


def _ptr_matches(state: _SPFState, ip: ipaddress._BaseAddress, name: str) -> bool:
    # RFC 7208 5.5 (deprecated): validated names of the client that end in the target.
    ips = str(ip)
    try:
        for n in state.lookup.ptr(ips)[:SPF_MX_LIMIT]:
            n = n.rstrip(".")
            if (n == name or n.endswith("." + name)) and ips in [
                str(ipaddress.ip_address(a)) for a in state.lookup.addresses(n)
            ]:
                return True
    except DNSTempError:
        return False  # RFC 7208 5.5: a PTR lookup error means no match
    return False


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
