"""Where mail for a domain goes: MX lookup in preference order, the implicit MX (A/AAAA of the
domain itself), null MX, and the failures that decide a whole destination (NXDOMAIN, SERVFAIL)."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass

import dns.exception
import dns.resolver

from backend.dns.resolver import ASYNCIO

# Replies we record for failures no remote server spoke (RFC 3463 enhanced codes).
R_NULL_MX = "556 5.1.10 Recipient domain does not accept mail (null MX, RFC 7505)"
R_NO_DOMAIN = "550 5.1.2 Recipient domain does not exist (NXDOMAIN)"
R_NO_HOST = "550 5.4.4 Recipient domain has no MX and no address"
R_MX_NO_ADDRESS = "550 5.4.4 No MX host of the recipient domain has an address"
R_DNS_TEMP = "451 4.4.3 DNS lookup failed for {domain}: {error}"


class TemporaryFailure(Exception):
    """A failure that defers every recipient of a destination (DNS timeout/SERVFAIL, MTA-STS
    allows no MX, smarthost credentials missing)."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


class PermanentFailure(Exception):
    """A failure that bounces every recipient of a destination (null MX, NXDOMAIN)."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class MXHost:
    name: str
    preference: int
    addresses: tuple[str, ...]


def _expiry(ans, expires: list[float] | None) -> None:
    if expires is not None:
        expires.append(getattr(ans, "expiration", 0.0))  # absolute (time.time()), from the TTL


async def _addresses(resolver, host: str, families: tuple[int, ...], expires: list[float] | None = None) -> tuple[list[str], str | None]:
    """(addresses, temporary error or None). A and/or AAAA in the order of ``families``."""
    out: list[str] = []
    temp: str | None = None
    for fam in families:
        rtype = "A" if fam == 4 else "AAAA"
        try:
            ans = await resolver.resolve(host, rtype, backend=ASYNCIO)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as e:
            temp = f"{rtype} {host}: {e.__class__.__name__}"
            continue
        _expiry(ans, expires)
        out.extend(r.address for r in ans)
    return out, temp


async def resolve_destination(
    resolver, domain: str, families: tuple[int, ...] = (4, 6), expires: list[float] | None = None
) -> list[MXHost]:
    """The hosts to try for ``domain``, best first, each with its addresses.

    RFC 5321 5.1: MX records in preference order (equal preferences shuffled); with no MX the
    domain itself is the host (implicit MX). RFC 7505: a null MX ("0 .") means no mail at all.
    Raises PermanentFailure (null MX, NXDOMAIN, nothing to connect to) or TemporaryFailure
    (SERVFAIL, timeout). ``expires`` (optional) gets the expiry time of every positive answer used.
    """
    try:
        ans = await resolver.resolve(domain, "MX", backend=ASYNCIO)
        _expiry(ans, expires)
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in ans]
    except dns.resolver.NXDOMAIN:
        raise PermanentFailure(R_NO_DOMAIN) from None
    except dns.resolver.NoAnswer:
        return await _implicit_mx(resolver, domain, families, expires)
    except dns.exception.DNSException as e:
        # NoNameservers is what dnspython raises for SERVFAIL; Timeout/LifetimeTimeout for silence.
        raise TemporaryFailure(R_DNS_TEMP.format(domain=domain, error=e.__class__.__name__)) from None

    real = [(p, h) for p, h in records if h not in ("", ".")]
    if not real:
        raise PermanentFailure(R_NULL_MX)
    by_pref: dict[int, list[str]] = defaultdict(list)
    for p, h in real:
        by_pref[p].append(h)
    hosts: list[MXHost] = []
    temps: list[str] = []
    for pref in sorted(by_pref):
        names = by_pref[pref]
        random.shuffle(names)  # RFC 5321 5.1: spread load among equal preferences
        for name in names:
            addrs, temp = await _addresses(resolver, name, families, expires)
            if temp:
                temps.append(temp)
            if addrs:
                hosts.append(MXHost(name, pref, tuple(addrs)))
    if hosts:
        if temps and expires is not None:
            expires.append(0.0)  # some host's addresses are missing: not an answer to keep
        return hosts
    if temps:
        raise TemporaryFailure(R_DNS_TEMP.format(domain=domain, error="; ".join(temps)))
    raise PermanentFailure(R_MX_NO_ADDRESS)


async def _implicit_mx(resolver, domain: str, families: tuple[int, ...], expires: list[float] | None = None) -> list[MXHost]:
    # RFC 5321 5.1: no MX records, so the domain's own address is the one host (preference 0).
    addrs, temp = await _addresses(resolver, domain, families, expires)
    if addrs:
        if temp and expires is not None:
            expires.append(0.0)  # one address family failed: not an answer to keep
        return [MXHost(domain, 0, tuple(addrs))]
    if temp:
        raise TemporaryFailure(R_DNS_TEMP.format(domain=domain, error=temp))
    raise PermanentFailure(R_NO_HOST)


class DestinationCache:
    """``resolve_destination``'s hosts per destination for a burst of mail to one domain.

    dnspython's cache already spares the network, but asking it for MX, A and AAAA again costs
    ~90 us of CPU per delivery attempt (docs/benchmarks.md "Round 3 — backend CPU per message").
    An answer is kept until the earliest expiry of the DNS records it came from (their TTL) and
    never longer than ``hold`` seconds, which also bounds how long a negative part of it (an
    AAAA with no records) outlives its own TTL. Failures are never kept: they are asked again.
    Equal-preference MX hosts keep the order of the first answer while it is kept.
    """

    def __init__(self, hold: float = 5.0, now=time.time, size: int = 1024):
        self.hold = hold
        self.now = now
        self.size = size
        self._hosts: dict[tuple[str, tuple[int, ...]], tuple[float, list[MXHost]]] = {}

    async def resolve(self, resolver, domain: str, families: tuple[int, ...] = (4, 6)) -> list[MXHost]:
        key = (domain, families)
        hit = self._hosts.get(key)
        now = self.now()
        if hit is not None and now < hit[0]:
            return list(hit[1])
        expires: list[float] = []
        hosts = await resolve_destination(resolver, domain, families, expires)
        until = min([now + self.hold, *expires])
        if until > now:
            if len(self._hosts) >= self.size:
                self._hosts.clear()  # a burst to many domains: start over rather than grow
            self._hosts[key] = (until, hosts)
        else:
            self._hosts.pop(key, None)
        return hosts
