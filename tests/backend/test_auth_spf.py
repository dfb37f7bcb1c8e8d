"""Inbound SPF (backend/auth/spf.py): MAIL FROM and HELO verdicts for a client address, the records
served by a real nsd on loopback and asked through the backend's AsyncDNSLookup over dnspython's
async resolver (backend/dns/resolver.py make_resolver), as on the mx listener."""

from __future__ import annotations

import pytest

from backend.auth.spf import verify_spf
from backend.dns.lookup import AsyncDNSLookup
from backend.dns.resolver import make_resolver
from tests.conftest import require_tool
from tests.lab.nsd import NSD, zone_text

SENDER_IP = "192.0.2.10"  # the one address example.org authorises
OTHER_IP = "198.51.100.7"

RECORDS = "\n".join(
    [
        '@\tIN\tTXT\t"v=spf1 ip4:192.0.2.10 -all exp=why.example.org"',
        'why\tIN\tTXT\t"%{i} may not send mail from %{d}"',
        'soft\tIN\tTXT\t"v=spf1 ip4:192.0.2.10 ~all"',
        "nospf\tIN\tA\t192.0.2.10",
        # The sending host's HELO name authorises its own address.
        'mail\tIN\tTXT\t"v=spf1 a -all"',
        "mail\tIN\tA\t192.0.2.10",
    ]
)


@pytest.fixture(scope="module")
def nsd():
    require_tool("/usr/sbin/nsd", "/usr/sbin/nsd-checkzone", "dig")
    with NSD({"example.org": zone_text("example.org", RECORDS)}) as ns:
        yield ns


@pytest.fixture
def lookup(nsd):
    return AsyncDNSLookup(make_resolver((nsd.address,), nsd.port, timeout=3.0))


def outcome(verdict):
    return verdict.identity, verdict.domain, verdict.result


@pytest.mark.asyncio
async def test_authorised_client_passes_both_identities(lookup):
    mailfrom, helo = await verify_spf(lookup, SENDER_IP, "mail.example.org", "alice@example.org")
    assert outcome(mailfrom) == ("mailfrom", "example.org", "pass")
    assert outcome(helo) == ("helo", "mail.example.org", "pass")
    assert mailfrom.explanation is None


@pytest.mark.asyncio
async def test_unauthorised_client_fails_with_the_domains_explanation(lookup):
    mailfrom, helo = await verify_spf(lookup, OTHER_IP, "mail.example.org", "alice@example.org")
    assert outcome(mailfrom) == ("mailfrom", "example.org", "fail")
    assert mailfrom.explanation == f"{OTHER_IP} may not send mail from example.org"  # exp= (RFC 7208 6.2)
    assert outcome(helo) == ("helo", "mail.example.org", "fail")


@pytest.mark.asyncio
async def test_softfail_and_none(lookup):
    mailfrom, _ = await verify_spf(lookup, OTHER_IP, "mail.example.org", "bob@soft.example.org")
    assert outcome(mailfrom) == ("mailfrom", "soft.example.org", "softfail")
    mailfrom, _ = await verify_spf(lookup, OTHER_IP, "mail.example.org", "bob@nospf.example.org")
    assert outcome(mailfrom) == ("mailfrom", "nospf.example.org", "none")


@pytest.mark.asyncio
async def test_a_domain_the_server_refuses_is_a_temperror(lookup):
    # nsd answers REFUSED for a zone it does not serve: the answer is unknown (RFC 7208 4.4).
    mailfrom, helo = await verify_spf(lookup, SENDER_IP, "mail.example.org", "carol@unserved.test")
    assert outcome(mailfrom) == ("mailfrom", "unserved.test", "temperror")
    assert outcome(helo) == ("helo", "mail.example.org", "pass")


@pytest.mark.asyncio
@pytest.mark.parametrize("helo", ["[192.0.2.10]", "OEMCOMPUTER"])
async def test_a_helo_that_is_not_a_domain_name_is_not_checked(lookup, helo):
    # RFC 7208 2.3: an address literal or a bare host name gives "none" for the HELO identity.
    mailfrom, helo_verdict = await verify_spf(lookup, SENDER_IP, helo, "alice@example.org")
    assert outcome(helo_verdict) == ("helo", helo, "none")
    assert outcome(mailfrom) == ("mailfrom", "example.org", "pass")


@pytest.mark.asyncio
async def test_null_sender_checks_postmaster_at_the_helo(lookup):
    # RFC 7208 2.4: for MAIL FROM:<> the MAIL FROM identity is postmaster@HELO.
    mailfrom, helo = await verify_spf(lookup, SENDER_IP, "mail.example.org", "")
    assert outcome(mailfrom) == ("mailfrom", "mail.example.org", "pass")
    assert outcome(helo) == ("helo", "mail.example.org", "pass")
    mailfrom, helo = await verify_spf(lookup, OTHER_IP, "mail.example.org", "")
    assert (mailfrom.result, helo.result) == ("fail", "fail")
    mailfrom, _ = await verify_spf(lookup, SENDER_IP, "[192.0.2.10]", "")
    assert outcome(mailfrom) == ("mailfrom", "[192.0.2.10]", "none")


@pytest.mark.asyncio
async def test_ipv4_mapped_client_is_evaluated_as_ipv4(lookup):
    # A dual-stack listener reports an IPv4 client as ::ffff:a.b.c.d; ip4: and A records match it (RFC 7208 5).
    mailfrom, helo = await verify_spf(lookup, f"::ffff:{SENDER_IP}", "mail.example.org", "alice@example.org")
    assert (mailfrom.result, helo.result) == ("pass", "pass")
    mailfrom, _ = await verify_spf(lookup, f"::ffff:{OTHER_IP}", "mail.example.org", "alice@example.org")
    assert mailfrom.explanation == f"{OTHER_IP} may not send mail from example.org"
