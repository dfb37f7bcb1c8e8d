"""Building dnspython resolvers: the one place that turns delivery.nameservers/dns_port and a
timeout into a resolver, and names the async backend every backend lookup runs on.

dnspython's async resolver sniffs the running async library once and caches that guess for the
whole process; a process that ever ran trio code (the test suite, for one) would then resolve on
the wrong library (commit d898ca0). So every ``await resolver.resolve(...)`` in the backend passes
``backend=ASYNCIO`` explicitly.
"""

from __future__ import annotations

import dns.asyncbackend
import dns.asyncresolver
import dns.resolver

ASYNCIO = dns.asyncbackend.get_backend("asyncio")


def _configure(r: dns.resolver.BaseResolver, nameservers: tuple[str, ...], port: int, timeout: float):
    if nameservers:
        r.nameservers = list(nameservers)
    r.port = port
    r.timeout = min(timeout, r.timeout)  # per server; a second server still gets its turn
    r.lifetime = timeout
    # Positive answers are cached for their TTL: a burst of mail to one domain costs one MX lookup,
    # not one per message (a local caching resolver would do the same; many homes have none).
    r.cache = dns.resolver.LRUCache(4096)
    return r


def make_resolver(nameservers: tuple[str, ...], port: int, timeout: float = 10.0) -> dns.asyncresolver.Resolver:
    """dnspython's async resolver on the configured nameservers (empty: /etc/resolv.conf).
    Pass ``backend=ASYNCIO`` to its ``resolve`` (see the module docstring)."""
    return _configure(dns.asyncresolver.Resolver(configure=not nameservers), nameservers, port, timeout)


def make_blocking_resolver(nameservers: tuple[str, ...], port: int, timeout: float = 10.0) -> dns.resolver.Resolver:
    """The same resolver for synchronous code outside the event loop (the ``dns check`` command)."""
    return _configure(dns.resolver.Resolver(configure=not nameservers), nameservers, port, timeout)
