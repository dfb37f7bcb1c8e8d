"""Inbound ARC verification (backend/auth/arc.py): chains sealed by dkimpy's arc_sign as two
forwarders, their keys served by a real nsd on loopback and fetched through the backend's
AsyncDNSLookup."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import dkim as dkimpy
import pytest

from backend.auth.arc import MAX_INSTANCES, verify_arc
from backend.dns.lookup import DNSLookup
from tests.conftest import require_tool
from tests.lab.dkim_inbound import MESSAGE, CountingLookup, nsd_lookup, rsa_key
from tests.lab.nsd import NSD, zone_text


@pytest.fixture(scope="module")
def forwarders():
    """Two forwarders' sealing keys (list.test, relay.test) and the sender's DKIM key, published by nsd."""
    require_tool("/usr/sbin/nsd", "dig")
    fw = SimpleNamespace(
        sender=rsa_key("example.org", "rsa1"),
        hop1=rsa_key("list.test", "arc1"),
        hop2=rsa_key("relay.test", "arc2"),
        unpublished=rsa_key("list.test", "gone"),
    )
    zones = {d: zone_text(d, k.zone_line()) for d, k in (("example.org", fw.sender), ("list.test", fw.hop1), ("relay.test", fw.hop2))}
    with NSD(zones) as ns:
        fw.ns = ns
        yield fw


def _hop(message: bytes, key, authserv_id: str, results: str) -> bytes:
    """What a forwarder does: record its checks in Authentication-Results, then seal."""
    return key.seal(f"Authentication-Results: {authserv_id}; {results}\r\n".encode() + message, authserv_id)


def one_hop(fw) -> bytes:
    signed = fw.sender.sign(MESSAGE)
    return _hop(signed, fw.hop1, "mx.list.test", "dkim=pass header.d=example.org; spf=pass smtp.mailfrom=example.org")


def two_hops(fw) -> bytes:
    # The second forwarder verified the first one's chain: its A-R says arc=pass, so it seals cv=pass.
    return _hop(one_hop(fw), fw.hop2, "mx.relay.test", "arc=pass; dkim=pass header.d=example.org")


@pytest.mark.asyncio
async def test_a_one_hop_chain_passes(forwarders):
    sealed = one_hop(forwarders)
    assert re.search(rb"ARC-Seal: i=1; cv=none", sealed.replace(b"\r\n ", b" "))
    v = await verify_arc(sealed, nsd_lookup(forwarders.ns))
    assert (v.result, v.instances, v.reason) == ("pass", 1, "")


@pytest.mark.asyncio
async def test_a_two_hop_chain_passes(forwarders):
    sealed = two_hops(forwarders)
    lookup = CountingLookup(nsd_lookup(forwarders.ns))
    v = await verify_arc(sealed, lookup, lambda fn, *args: asyncio.to_thread(fn, *args))
    assert (v.result, v.instances) == ("pass", 2)
    # Both forwarders' keys, each fetched once (AS and AMS of a set share the key).
    assert sorted(lookup.asked) == ["arc1._domainkey.list.test.", "arc2._domainkey.relay.test."]


@pytest.mark.asyncio
async def test_a_body_changed_after_the_last_seal_fails(forwarders):
    tampered = two_hops(forwarders).replace(b"quarterly numbers", b"new bank details")
    v = await verify_arc(tampered, nsd_lookup(forwarders.ns))
    assert (v.result, v.instances) == ("fail", 2)
    assert "ARC-Message-Signature" in v.reason


@pytest.mark.asyncio
async def test_a_header_changed_after_the_last_seal_fails(forwarders):
    tampered = two_hops(forwarders).replace(b"Subject: inbound verification", b"Subject: urgent wire transfer")
    v = await verify_arc(tampered, nsd_lookup(forwarders.ns))
    assert (v.result, v.reason) == ("fail", "Most recent ARC-Message-Signature did not validate")


@pytest.mark.asyncio
async def test_a_forwarder_that_changed_the_body_before_sealing_still_passes(forwarders):
    # What ARC is for: a mailing list adds a footer (breaking the first set's AMS and the DKIM
    # signature), then seals. Only the newest AMS must validate (RFC 8617 5.2); the seals chain.
    footed = one_hop(forwarders) + b"-- \r\nlist footer: unsubscribe at https://list.test/\r\n"
    sealed = _hop(footed, forwarders.hop2, "mx.relay.test", "arc=pass; dkim=fail header.d=example.org")
    v = await verify_arc(sealed, nsd_lookup(forwarders.ns))
    assert (v.result, v.instances) == ("pass", 2)


@pytest.mark.asyncio
async def test_a_forged_earlier_set_fails_the_seal(forwarders):
    # The first forwarder's Authentication-Results rewritten after sealing: the newest AMS still
    # verifies, but ARC-Seal 2 covers set 1 (RFC 8617 5.1.1): the chain fails.
    sealed = two_hops(forwarders)
    forged = sealed.replace(b"ARC-Authentication-Results: i=1; mx.list.test;", b"ARC-Authentication-Results: i=1; mx.list.test; arc=pass;")
    assert forged != sealed
    v = await verify_arc(forged, nsd_lookup(forwarders.ns))
    assert v.result == "fail" and "ARC-Seal" in v.reason


@pytest.mark.asyncio
async def test_a_chain_a_forwarder_sealed_as_failed_fails(forwarders):
    # The second forwarder found the chain broken and sealed cv=fail (RFC 8617 5.1.2): it ends there.
    sealed = _hop(one_hop(forwarders), forwarders.hop2, "mx.relay.test", "arc=fail")
    assert b"cv=fail" in sealed
    v = await verify_arc(sealed, nsd_lookup(forwarders.ns))
    assert (v.result, v.instances, v.reason) == ("fail", 2, "ARC-Seal[2] reported failure, the chain is terminated")


@pytest.mark.asyncio
async def test_a_chain_sealed_with_an_unpublished_key_fails(forwarders):
    sealed = _hop(forwarders.sender.sign(MESSAGE), forwarders.unpublished, "mx.list.test", "dkim=pass header.d=example.org")
    v = await verify_arc(sealed, nsd_lookup(forwarders.ns))
    assert (v.result, v.instances) == ("fail", 1)


@pytest.mark.asyncio
async def test_a_key_that_cannot_be_looked_up_fails_and_says_so(forwarders):
    # nsd refuses a zone it does not serve (RFC 8617 has no temperror for arc=).
    stranger = rsa_key("unserved.test", "arc9")
    sealed = _hop(MESSAGE, stranger, "mx.unserved.test", "spf=pass smtp.mailfrom=example.org")
    v = await verify_arc(sealed, nsd_lookup(forwarders.ns, timeout=2.0))
    assert v.result == "fail"
    assert "key lookup failed temporarily: arc9._domainkey.unserved.test." in v.reason


@pytest.mark.asyncio
async def test_no_arc_headers_is_none(forwarders):
    lookup = CountingLookup(nsd_lookup(forwarders.ns))
    v = await verify_arc(forwarders.sender.sign(MESSAGE), lookup)
    assert (v.result, v.instances) == ("none", 0)
    assert lookup.asked == []


@pytest.mark.asyncio
async def test_an_ams_written_without_space_before_i_fails_instead_of_raising(forwarders):
    # dkimpy looks the raw AMS up by the text " i=1;" and indexes the hit: "ARC-Message-Signature:i=1;"
    # (legal: RFC 5322 needs no space after the colon) made it raise IndexError.
    sealed = one_hop(forwarders).replace(b"ARC-Message-Signature: i=1;", b"ARC-Message-Signature:i=1;")
    v = await verify_arc(sealed, nsd_lookup(forwarders.ns))
    assert v.result == "fail"


@pytest.mark.asyncio
async def test_an_instance_over_50_fails_without_a_lookup(forwarders):
    # RFC 8617 4.2.1: instances run from 1 to 50.
    n = MAX_INSTANCES + 1
    sealed = one_hop(forwarders)
    forged = sealed.replace(b"i=1;", f"i={n};".encode())
    lookup = CountingLookup(nsd_lookup(forwarders.ns))
    v = await verify_arc(forged, lookup)
    assert (v.result, v.instances) == ("fail", n)
    assert lookup.asked == []


CHAINS = {
    "one hop": lambda fw: one_hop(fw),
    "two hops": lambda fw: two_hops(fw),
    "footer added before the second seal": lambda fw: _hop(one_hop(fw) + b"footer\r\n", fw.hop2, "mx.relay.test", "arc=pass"),
    "body changed": lambda fw: two_hops(fw).replace(b"quarterly numbers", b"new bank details"),
    "earlier AAR forged": lambda fw: two_hops(fw).replace(b"i=1; mx.list.test;", b"i=1; mx.list.test; arc=pass;"),
    "bare LF line ends": lambda fw: two_hops(fw).replace(b"\r\n", b"\n"),
    "trailing whitespace and empty lines added": lambda fw: two_hops(fw).replace(b"attached.\r\n", b"attached.  \t\r\n\r\n\r\n"),
    "sealed as failed": lambda fw: _hop(one_hop(fw), fw.hop2, "mx.relay.test", "arc=fail"),
    "not sealed": lambda fw: fw.sender.sign(MESSAGE),
}


@pytest.mark.parametrize("case", CHAINS)
@pytest.mark.asyncio
async def test_the_verdict_is_dkimpys_arc_verify(forwarders, case):
    # We run dkimpy's ARC checks on the header block and check the newest AMS body ourselves
    # (backend/auth/arc.py says why): the verdict must still be the one dkimpy's own arc_verify
    # gives, which here resolves the same nsd with a blocking resolver.
    message = CHAINS[case](forwarders)
    blocking = DNSLookup(forwarders.ns.resolver())

    def dnsfunc(name, timeout=5):
        records = blocking.txt(name.decode())
        return records[0].encode() if records else None

    cv, _, reason = dkimpy.arc_verify(message, dnsfunc=dnsfunc)
    expected = {dkimpy.CV_Pass: "pass", dkimpy.CV_None: "none"}.get(cv, "fail")
    v = await verify_arc(message, nsd_lookup(forwarders.ns))
    assert (v.result, v.reason) == (expected, "" if expected != "fail" else reason)
