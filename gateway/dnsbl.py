"""DNSBL lookups for MX clients: query-name construction and answer interpretation (pure) apart from the lookup through dnspython under trio, with a bounded TTL cache.

RFC 5782 2.1 (IPv4: reversed octets) and 2.4 (IPv6: reversed nibbles) under the list's zone; an A
record in 127.0.0.0/8 means "listed" (2.3). Answers in 127.255.255.0/24 are Spamhaus-style error
codes ("you are querying through an open resolver", "rate limited") and must not reject mail.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from typing import Awaitable, Callable

import trio

log = logging.getLogger("homemx.gateway.dnsbl")

# A lookup returns the A records for a name ([] for NXDOMAIN / no answer) and raises on failure.
Lookup = Callable[[str], Awaitable[list[str]]]


def query_name(address: str, zone: str) -> str:
    """The DNSBL query name for ``address`` under ``zone`` (RFC 5782 2.1 and 2.4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        labels = reversed(str(ip).split("."))
    else:
        labels = reversed(ip.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone.rstrip(".")


def is_listing(answers: list[str]) -> bool:
    """Whether DNSBL answers mean "listed" (RFC 5782 2.3), ignoring 127.255.255.x error codes."""
    for a in answers:
        try:
            ip = ipaddress.IPv4Address(a)
        except ValueError:
            continue
        if ip in ipaddress.IPv4Network("127.0.0.0/8") and ip not in ipaddress.IPv4Network("127.255.255.0/24"):
            return True
    return False


def dnspython_lookup(nameservers: tuple[str, ...], port: int, timeout: float) -> Lookup:
    """A Lookup using dnspython's async resolver, which runs on trio through its trio backend."""
    import dns.asyncbackend
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    # Name the trio backend: dnspython otherwise sniffs the running library once and caches the
    # answer process-wide, so whatever async library touched it first would win.
    backend = dns.asyncbackend.get_backend("trio")
    resolver = dns.asyncresolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = list(nameservers)
    resolver.port = port
    resolver.lifetime = timeout

    async def lookup(name: str) -> list[str]:
        try:
            answer = await resolver.resolve(name, "A", search=False, backend=backend)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [r.address for r in answer]

    return lookup


class DnsblChecker:
    """Checks a client against every zone concurrently; results cached per (address, zone).

    A lookup that fails (timeout, SERVFAIL) counts as "not listed" and is not cached: a DNSBL outage
    must not turn into rejected mail.
    """

    def __init__(
        self,
        zones: tuple[str, ...],
        lookup: Lookup,
        timeout: float,
        cache_ttl: float,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.zones = zones
        self.lookup = lookup
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.clock = clock
        self.cache: OrderedDict[tuple[str, str], tuple[float, bool]] = OrderedDict()
        self.errors = 0

    def _cached(self, key: tuple[str, str]) -> bool | None:
        hit = self.cache.get(key)
        if hit is None:
            return None
        expires, listed = hit
        if self.clock() >= expires:
            del self.cache[key]
            return None
        self.cache.move_to_end(key)
        return listed

    def _store(self, key: tuple[str, str], listed: bool) -> None:
        self.cache[key] = (self.clock() + self.cache_ttl, listed)
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    async def _check_zone(self, address: str, zone: str) -> bool:
        key = (address, zone)
        cached = self._cached(key)
        if cached is not None:
            return cached
        try:
            with trio.fail_after(self.timeout):
                answers = await self.lookup(query_name(address, zone))
        except Exception as e:  # any resolver failure: fail open, see class docstring
            self.errors += 1
            log.warning("dnsbl lookup of %s in %s failed: %s", address, zone, e or type(e).__name__)
            return False
        listed = is_listing(answers)
        self._store(key, listed)
        return listed

    async def listed_in(self, address: str) -> str | None:
        """The first zone (in configured order) that lists ``address``, or None."""
        results: dict[str, bool] = {}

        async def one(zone: str) -> None:
            results[zone] = await self._check_zone(address, zone)

        async with trio.open_nursery() as nursery:
            for zone in self.zones:
                nursery.start_soon(one, zone)
        for zone in self.zones:
            if results.get(zone):
                return zone
        return None
