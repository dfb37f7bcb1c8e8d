"""Typed blocking DNS lookups (TXT, A, AAAA, MX, PTR) over a dnspython resolver, the interface the
SPF engine and the installation checks query through: tests give them a table of records or a real
nsd, the CLI the configured (or system) nameservers."""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.resolver
import dns.reversename


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
