"""Typed DNS lookups (TXT, A, AAAA, MX, PTR, SRV) over a dnspython resolver, blocking and async: the interface the
SPF engine and the installation checks query through: tests give them a table of records or a real
nsd, the CLI the configured (or system) nameservers."""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.resolver
import dns.reversename

from backend.dns.resolver import ASYNCIO


class DNSTempError(Exception):
    """SERVFAIL, timeout or similar: the answer is unknown (SPF temperror)."""


def _temp_error(rdtype: str, name: str, e: Exception) -> DNSTempError:
    """Any answer other than NXDOMAIN/NODATA leaves the records unknown: SERVFAIL, a timeout, no
    server reachable (named by class: their messages list every server tried) or a bad reply."""
    quiet = (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout)
    return DNSTempError(f"{rdtype} {name}: {e.__class__.__name__ if isinstance(e, quiet) else e}")


class DNSLookup:
    """Typed lookups over a dnspython resolver. NXDOMAIN and NODATA give ``[]`` (a void lookup)."""

    def __init__(self, resolver: dns.resolver.Resolver):
        self.resolver = resolver

    def _query(self, name: str, rdtype: str):
        try:
            return list(self.resolver.resolve(name, rdtype, search=False))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise _temp_error(rdtype, name, e) from None

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

    def srv(self, name: str) -> list[tuple[int, int, int, str]]:
        """(priority, weight, port, target) of each SRV record, sorted; a "not offered" target is "."."""
        return sorted((r.priority, r.weight, r.port, r.target.to_text().lower()) for r in self._query(name, "SRV"))


class AsyncDNSLookup:
    """The same typed lookups for the event loop (the inbound checks in backend/auth/), over
    dnspython's async resolver (backend/dns/resolver.py make_resolver). Same contract: NXDOMAIN
    and NODATA give ``[]``, anything else that leaves the answer unknown raises DNSTempError."""

    def __init__(self, resolver):
        self.resolver = resolver

    async def _query(self, name: str, rdtype: str):
        try:
            return list(await self.resolver.resolve(name, rdtype, search=False, backend=ASYNCIO))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise _temp_error(rdtype, name, e) from None

    async def txt(self, name: str) -> list[str]:
        return [b"".join(r.strings).decode("utf-8", "replace") for r in await self._query(name, "TXT")]

    async def a(self, name: str) -> list[str]:
        return [r.address for r in await self._query(name, "A")]

    async def aaaa(self, name: str) -> list[str]:
        return [str(ipaddress.ip_address(r.address)) for r in await self._query(name, "AAAA")]

    async def addresses(self, name: str) -> list[str]:
        return await self.a(name) + await self.aaaa(name)

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return sorted((r.preference, r.exchange.to_text().lower()) for r in await self._query(name, "MX"))

    async def ptr(self, address: str) -> list[str]:
        name = dns.reversename.from_address(address).to_text()
        return [r.target.to_text().lower() for r in await self._query(name, "PTR")]


class AsyncOverBlocking:
    """An AsyncDNSLookup face on a blocking DNSLookup, for code that runs the async checks outside
    a server (the ``dns check`` command under asyncio.run, tests with a table of records): each
    lookup blocks the loop, which there has nothing else to do."""

    def __init__(self, lookup: DNSLookup):
        self.lookup = lookup

    async def txt(self, name: str) -> list[str]:
        return self.lookup.txt(name)

    async def a(self, name: str) -> list[str]:
        return self.lookup.a(name)

    async def aaaa(self, name: str) -> list[str]:
        return self.lookup.aaaa(name)

    async def addresses(self, name: str) -> list[str]:
        return self.lookup.addresses(name)

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return self.lookup.mx(name)

    async def ptr(self, address: str) -> list[str]:
        return self.lookup.ptr(address)
