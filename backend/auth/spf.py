"""The SPF check of an inbound message (RFC 7208): a verdict for the MAIL FROM identity and one for
the HELO identity of the client at its real address (from PROXY v2), by the SPF engine
(backend/dns/spf.py) over the event loop's DNS (backend/dns/lookup.py AsyncDNSLookup)."""

from __future__ import annotations

import asyncio
import dataclasses

from backend.auth.results import SPFVerdict
from backend.dns.spf import check_host, is_domain_name


async def _verdict(identity: str, lookup, ip: str, domain: str, sender: str, helo: str) -> SPFVerdict:
    r = await check_host(lookup, ip, domain, sender, helo)
    return SPFVerdict(identity, domain, r.result, r.reason, r.explanation)


async def _helo_verdict(lookup, ip: str, helo: str) -> SPFVerdict:
    # RFC 7208 2.3: the HELO identity is checked only when the HELO is a domain name; an address
    # literal ("[192.0.2.1]") or a bare host name has no SPF record to ask for.
    if not is_domain_name(helo):
        return SPFVerdict("helo", helo, "none", f"HELO {helo!r} is not a domain name (RFC 7208 2.3)")
    return await _verdict("helo", lookup, ip, helo, f"postmaster@{helo}", helo)


async def verify_spf(lookup, ip: str, helo: str, mail_from: str) -> tuple[SPFVerdict, SPFVerdict]:
    """(MAIL FROM verdict, HELO verdict) for the client at ``ip`` that greeted with ``helo`` and gave
    the reverse-path ``mail_from`` ("" for the null sender). ``lookup`` has the AsyncDNSLookup
    interface. An IPv4-mapped IPv6 address is evaluated as the IPv4 client (RFC 7208 5, in check_host)."""
    if not mail_from:
        # RFC 7208 2.4: for the null reverse-path the MAIL FROM identity is postmaster@HELO, which
        # is exactly the HELO check: made once, reported for both identities.
        helo_verdict = await _helo_verdict(lookup, ip, helo)
        return dataclasses.replace(helo_verdict, identity="mailfrom"), helo_verdict
    domain = mail_from.rpartition("@")[2]
    mailfrom_verdict, helo_verdict = await asyncio.gather(
        _verdict("mailfrom", lookup, ip, domain, mail_from, helo), _helo_verdict(lookup, ip, helo)
    )
    return mailfrom_verdict, helo_verdict
