"""DMARC (backend/auth/dmarc.py): organizational domains from the Public Suffix List, alignment, the
From domain of a header, the receiver-side record parse, and evaluate_dmarc against records a real
nsd serves on loopback (discovery, p/sp, pct, overrides, own-domain protection, DNS failures)."""

from __future__ import annotations

import pytest

from backend.auth.dmarc import MultipleFrom, aligned, evaluate_dmarc, from_domain_of, org_domain
from backend.auth.results import DKIMVerdict, SPFVerdict
from backend.dns.lookup import AsyncDNSLookup
from backend.dns.parse import ParseError, is_dmarc_record, parse_dmarc
from backend.dns.resolver import make_resolver
from tests.conftest import require_tool
from tests.lab.nsd import NSD, zone_text

# ------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(
    "domain, org",
    [
        ("example.co.uk", "example.co.uk"),
        ("mail.example.co.uk", "example.co.uk"),
        ("a.b.example.com", "example.com"),
        ("A.B.Example.COM.", "example.com"),  # case and the root dot do not matter
        ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
        ("com", "com"),
        ("foo.github.io", "foo.github.io"),  # the PSL's private section counts (github.io is a suffix)
        ("mail.bücher.de", "xn--bcher-kva.de"),  # U-labels come out as A-labels
        ("mail.xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("例子.中国", "xn--fsqu00a.xn--fiqs8s"),  # an IDN TLD
        ("公司.cn", "xn--55qx5d.cn"),  # an IDN public suffix, itself
        ("a.b.公司.cn", "b.xn--55qx5d.cn"),
        ("a.example.test", "example.test"),  # a TLD unknown to the list is a public suffix ("*" rule)
    ],
)
def test_org_domain(domain, org):
    assert org_domain(domain) == org


def test_aligned_strict_and_relaxed():
    assert aligned("example.org", "example.org", "s")
    assert aligned("EXAMPLE.org.", "example.ORG", "s")
    assert not aligned("mail.example.org", "example.org", "s")
    assert aligned("mail.example.org", "example.org", "r")
    assert aligned("a.example.org", "b.example.org", "r")  # siblings share the organizational domain
    assert not aligned("example.net", "example.org", "r")
    # Relaxed alignment goes by the PSL, not by parent/child: two registrants under co.uk never align,
    # nor does a domain with its public suffix.
    assert not aligned("evil.co.uk", "bank.co.uk", "r")
    assert not aligned("co.uk", "bank.co.uk", "r")
    assert not aligned("a.github.io", "b.github.io", "r")
    assert aligned("xn--bcher-kva.de", "mail.bücher.de", "r")
    assert not aligned("", "example.org", "r")


def test_from_domain_of():
    assert from_domain_of(b"Subject: x\r\nFrom: Alice <alice@Example.ORG>\r\n\r\n") == "example.org"
    assert from_domain_of(b"From: a@example.org, b@EXAMPLE.org\r\n\r\n") == "example.org"  # one domain: evaluated
    assert from_domain_of("From: =?utf-8?q?x?= <a@bücher.de>\r\n\r\n".encode()) == "xn--bcher-kva.de"
    with pytest.raises(MultipleFrom):
        from_domain_of(b"From: a@example.org, b@example.net\r\n\r\n")
    with pytest.raises(MultipleFrom):  # two From fields (RFC 5322 3.6 allows one)
        from_domain_of(b"From: a@example.org\r\nTo: x@y.test\r\nFrom: b@example.net\r\n\r\n")
    assert from_domain_of(b"To: x@y.test\r\n\r\n") is None  # no From at all
    assert from_domain_of(b"From: undisclosed:;\r\n\r\n") is None  # a group with no address
    assert from_domain_of(b"From: alice\r\n\r\n") is None  # an address without a domain


def test_receiver_parse_follows_rfc7489_6_6_3():
    assert is_dmarc_record("v=DMARC1; p=none") and is_dmarc_record(" v = DMARC1")
    assert not is_dmarc_record("v=spf1 -all") and not is_dmarc_record("v=DMARC10; p=none")
    # An invalid p= with a valid rua= reads as p=none for a receiver; the strict parse (dns check) refuses it.
    r = parse_dmarc("v=DMARC1; p=block; sp=reject; rua=mailto:d@example.org", receiver=True)
    assert (r.policy, r.subdomain_policy, r.rua) == ("none", None, ("mailto:d@example.org",))
    assert r.notes and "6.6.3" in r.notes[0]
    r = parse_dmarc("v=DMARC1; p=reject; sp=bogus; rua=mailto:d@example.org", receiver=True)
    assert (r.policy, r.subdomain_policy) == ("none", None)
    with pytest.raises(ParseError):
        parse_dmarc("v=DMARC1; p=block; rua=mailto:d@example.org")
    # Without a valid rua= there is no DMARC processing at all.
    for text in ("v=DMARC1; p=block", "v=DMARC1; rua=not-a-uri", "v=DMARC1; adkim=s"):
        with pytest.raises(ParseError):
            parse_dmarc(text, receiver=True)
    # Errors in the other tags fall back to their defaults for a receiver (6.3), and raise in the strict parse.
    r = parse_dmarc("v=DMARC1; p=reject; adkim=x; aspf=S; pct=150", receiver=True)
    assert (r.policy, r.adkim, r.aspf, r.pct) == ("reject", "r", "s", 100)
    assert len(r.notes) == 2
    for bad in ("v=DMARC1; p=reject; pct=150", "v=DMARC1; p=reject; pct=-1", "v=DMARC1; p=reject; pct=x"):
        with pytest.raises(ParseError):
            parse_dmarc(bad)
    # Tag values are case-insensitive (ABNF strings); unknown tags are ignored.
    r = parse_dmarc("v=DMARC1; p=Reject; fo=1; pct=0")
    assert (r.policy, r.pct) == ("reject", 0)


# ------------------------------------------------------------------ against a real nsd

TEST_ZONE = """
_dmarc.reject             IN TXT "v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc@reject.test"
_dmarc.shop.reject        IN TXT "v=DMARC1; p=none"
_dmarc.dup.reject         IN TXT "v=DMARC1; p=none"
_dmarc.dup.reject         IN TXT "v=DMARC1; p=none; pct=50"
_dmarc.nosp               IN TXT "v=DMARC1; p=reject"
_dmarc.quarantine         IN TXT "v=DMARC1; p=quarantine"
_dmarc.strict             IN TXT "v=DMARC1; p=reject; adkim=s; aspf=s"
_dmarc.pct0               IN TXT "v=DMARC1; p=reject; pct=0"
_dmarc.pct50              IN TXT "v=DMARC1; p=quarantine; pct=50"
_dmarc.two                IN TXT "v=DMARC1; p=reject"
_dmarc.two                IN TXT "v=DMARC1; p=none"
_dmarc.one                IN TXT "v=DMARC1; p=reject"
_dmarc.one                IN TXT "some unrelated text"
_dmarc.badp               IN TXT "v=DMARC1; p=block; rua=mailto:dmarc@badp.test"
_dmarc.broken             IN TXT "v=DMARC1; p=block"
_dmarc.home               IN TXT "v=DMARC1; p=none"
_dmarc.xn--bcher-kva      IN TXT "v=DMARC1; p=reject"
"""
# A record at the public suffix itself must never be found for a domain under it (its own org domain).
CO_UK_ZONE = """
_dmarc                    IN TXT "v=DMARC1; p=reject"
_dmarc.example            IN TXT "v=DMARC1; p=quarantine"
"""


@pytest.fixture(scope="module")
def nsd():
    require_tool("/usr/sbin/nsd", "/usr/sbin/nsd-checkzone", "dig")
    zones = {"test": zone_text("test", TEST_ZONE), "co.uk": zone_text("co.uk", CO_UK_ZONE)}
    with NSD(zones) as ns:
        yield ns


def lookup_at(ns, timeout: float = 3.0) -> AsyncDNSLookup:
    return AsyncDNSLookup(make_resolver((ns.address,), ns.port, timeout=timeout))


def spf_pass(domain: str) -> SPFVerdict:
    return SPFVerdict("mailfrom", domain, "pass")


def dkim_pass(domain: str) -> DKIMVerdict:
    return DKIMVerdict(domain, "s1", "pass")


def never(*_):  # rand for tests where pct must not be consulted
    raise AssertionError("pct sampled")


@pytest.mark.asyncio
@pytest.mark.parametrize("domain, policy", [("quarantine.test", "quarantine"), ("reject.test", "reject")])
async def test_aligned_spf_or_dkim_pass_passes_and_unaligned_fails(nsd, domain, policy):
    lookup = lookup_at(nsd)
    spf_only = await evaluate_dmarc(lookup, domain, spf_pass(f"bounces.{domain}"), [], rand=never)
    assert (spf_only.result, spf_only.aligned_spf, spf_only.aligned_dkim, spf_only.disposition) == ("pass", True, False, "none")
    dkim_only = await evaluate_dmarc(lookup, domain, SPFVerdict("mailfrom", domain, "softfail"), [dkim_pass(domain)], rand=never)
    assert (dkim_only.result, dkim_only.aligned_spf, dkim_only.aligned_dkim) == ("pass", False, True)
    # Passes for other domains (a DKIM signature of the mailing list, the list's SPF) do not count,
    # nor does a DKIM fail for the From domain.
    forged = await evaluate_dmarc(
        lookup, domain, spf_pass("lists.example.net"),
        [dkim_pass("example.net"), DKIMVerdict(domain, "s1", "fail", "body hash mismatch")], rand=never,
    )  # fmt: skip
    assert (forged.result, forged.policy, forged.disposition, forged.override) == ("fail", policy, policy, None)
    assert forged.org_domain == domain and not forged.aligned_spf and not forged.aligned_dkim
    # A HELO verdict is not the MAIL FROM identity DMARC aligns (RFC 7489 4.1).
    helo = await evaluate_dmarc(lookup, domain, SPFVerdict("helo", domain, "pass"), [], rand=never)
    assert helo.result == "fail"


@pytest.mark.asyncio
async def test_strict_alignment_needs_the_same_domain(nsd):
    lookup = lookup_at(nsd)
    sub = await evaluate_dmarc(lookup, "strict.test", spf_pass("mail.strict.test"), [dkim_pass("mail.strict.test")], rand=never)
    assert (sub.result, sub.disposition) == ("fail", "reject")
    same = await evaluate_dmarc(lookup, "strict.test", None, [dkim_pass("strict.test")], rand=never)
    assert same.result == "pass"


@pytest.mark.asyncio
async def test_discovery_falls_back_to_the_org_domain_and_sp_applies_to_subdomains(nsd):
    lookup = lookup_at(nsd)
    # news.reject.test has no record: the org domain's applies, with its sp=.
    news = await evaluate_dmarc(lookup, "news.reject.test", None, [], rand=never)
    assert (news.result, news.org_domain, news.policy, news.disposition) == ("fail", "reject.test", "quarantine", "quarantine")
    # The org domain itself gets p=, not sp=.
    org = await evaluate_dmarc(lookup, "reject.test", None, [], rand=never)
    assert (org.policy, org.disposition) == ("reject", "reject")
    # A record at the subdomain itself wins over the org domain's (no fallback, sp= not consulted).
    shop = await evaluate_dmarc(lookup, "shop.reject.test", None, [], rand=never)
    assert (shop.result, shop.policy, shop.disposition) == ("fail", "none", "none")
    # Without sp= the subdomain gets p=.
    deep = await evaluate_dmarc(lookup, "a.b.nosp.test", None, [], rand=never)
    assert (deep.result, deep.policy, deep.disposition) == ("fail", "reject", "reject")
    # An aligned pass from a sibling of the subdomain passes under relaxed alignment.
    sibling = await evaluate_dmarc(lookup, "news.reject.test", None, [dkim_pass("mail.reject.test")], rand=never)
    assert sibling.result == "pass"
    # The public suffix's own record is never consulted: other.co.uk is its own org domain and has none.
    other = await evaluate_dmarc(lookup, "shop.other.co.uk", None, [], rand=never)
    assert (other.result, other.org_domain, other.disposition) == ("none", "other.co.uk", "none")
    under = await evaluate_dmarc(lookup, "www.example.co.uk", None, [], rand=never)
    assert (under.result, under.org_domain, under.policy) == ("fail", "example.co.uk", "quarantine")


@pytest.mark.asyncio
async def test_idn_from_domain_finds_the_a_label_record_and_aligns(nsd):
    lookup = lookup_at(nsd)
    ok = await evaluate_dmarc(lookup, "bücher.test", None, [dkim_pass("xn--bcher-kva.test")], rand=never)
    assert (ok.result, ok.from_domain) == ("pass", "xn--bcher-kva.test")
    bad = await evaluate_dmarc(lookup, "BÜCHER.test", None, [dkim_pass("example.net")], rand=never)
    assert (bad.result, bad.disposition) == ("fail", "reject")


@pytest.mark.asyncio
async def test_pct_samples_with_the_given_rand(nsd):
    lookup = lookup_at(nsd)
    # pct=0: never sampled, reject → quarantine (RFC 7489 6.6.4), whatever rand says.
    v = await evaluate_dmarc(lookup, "pct0.test", None, [], rand=lambda: 0.0)
    assert (v.result, v.policy, v.disposition) == ("fail", "reject", "quarantine")
    assert "pct=0" in v.reason
    # pct=50: rand()*100 below 50 applies the policy, from 50 on it steps down (quarantine → none).
    assert (await evaluate_dmarc(lookup, "pct50.test", None, [], rand=lambda: 0.49)).disposition == "quarantine"
    assert (await evaluate_dmarc(lookup, "pct50.test", None, [], rand=lambda: 0.5)).disposition == "none"
    # pct=100 (the default): always applied, even with the highest rand.
    assert (await evaluate_dmarc(lookup, "reject.test", None, [], rand=lambda: 0.9999)).disposition == "reject"


@pytest.mark.asyncio
async def test_record_count_and_syntax(nsd):
    lookup = lookup_at(nsd)
    two = await evaluate_dmarc(lookup, "two.test", None, [], rand=never)
    assert (two.result, two.policy, two.disposition) == ("none", "none", "none")
    assert "2 DMARC records" in two.reason
    # Two records at a subdomain stop discovery there: no fallback to the org domain's single record.
    dup = await evaluate_dmarc(lookup, "dup.reject.test", None, [], rand=never)
    assert (dup.result, dup.policy, dup.disposition) == ("none", "none", "none")
    # A TXT string that is not DMARC is discarded before counting.
    one = await evaluate_dmarc(lookup, "one.test", None, [], rand=never)
    assert (one.result, one.disposition) == ("fail", "reject")
    # p=block with a valid rua=: DMARC is evaluated as p=none (6.6.3); without rua=: permerror.
    badp = await evaluate_dmarc(lookup, "badp.test", None, [], rand=never)
    assert (badp.result, badp.policy, badp.disposition) == ("fail", "none", "none")
    assert "p=block" in badp.reason
    broken = await evaluate_dmarc(lookup, "broken.test", None, [], rand=never)
    assert (broken.result, broken.disposition) == ("permerror", "none")
    # A From domain that is no DNS name (a 64-octet label) is not looked up: permerror.
    bad = await evaluate_dmarc(lookup, "x" * 64 + ".test", None, [], rand=never)
    assert (bad.result, bad.disposition) == ("permerror", "none")
    # No record anywhere.
    none = await evaluate_dmarc(lookup, "norecord.test", spf_pass("norecord.test"), [], rand=never)
    assert (none.result, none.disposition) == ("none", "none")


@pytest.mark.asyncio
async def test_temperror_when_the_dns_server_fails(nsd, tmp_path):
    # nsd answers REFUSED for a zone it does not serve: the answer is unknown, not "no record".
    refused = await evaluate_dmarc(lookup_at(nsd), "example.org", None, [], rand=never)
    assert (refused.result, refused.disposition, refused.policy) == ("temperror", "none", "none")
    assert "_dmarc.example.org" in refused.reason
    # A server that is gone (stopped nsd, its port closed).
    gone = NSD({"test": zone_text("test", TEST_ZONE)}, workdir=tmp_path / "gone")
    with gone:
        lookup = lookup_at(gone, timeout=1.0)
        assert (await evaluate_dmarc(lookup, "reject.test", None, [], rand=never)).result == "fail"
        gone.stop()
        # (Another domain: the resolver caches the answer it already has, as in production.)
        down = await evaluate_dmarc(lookup, "nosp.test", None, [], rand=never)
    assert (down.result, down.disposition) == ("temperror", "none")


@pytest.mark.asyncio
async def test_local_overrides_replace_the_policy_on_fail(nsd):
    lookup = lookup_at(nsd)
    # Keyed by the From domain (in any case) ...
    v = await evaluate_dmarc(lookup, "reject.test", None, [], overrides={"Reject.TEST": "none"}, rand=never)
    assert (v.result, v.policy, v.disposition, v.override) == ("fail", "reject", "none", "none")
    # ... or by its organizational domain, and it can tighten as well as loosen.
    v = await evaluate_dmarc(lookup, "news.reject.test", None, [], overrides={"reject.test": "reject"}, rand=never)
    assert (v.policy, v.disposition, v.override) == ("quarantine", "reject", "reject")
    # The From domain's own entry wins over the org domain's.
    v = await evaluate_dmarc(
        lookup, "news.reject.test", None, [], overrides={"reject.test": "reject", "news.reject.test": "none"}, rand=never
    )
    assert (v.disposition, v.override) == ("none", "none")
    # It replaces the pct sampling too.
    v = await evaluate_dmarc(lookup, "pct0.test", None, [], overrides={"pct0.test": "reject"}, rand=lambda: 0.0)
    assert v.disposition == "reject"
    # A pass is untouched.
    v = await evaluate_dmarc(lookup, "reject.test", spf_pass("reject.test"), [], overrides={"reject.test": "reject"}, rand=never)
    assert (v.result, v.disposition, v.override) == ("pass", "none", None)


@pytest.mark.asyncio
async def test_own_domain_protection(nsd):
    lookup = lookup_at(nsd)
    own = ("home.test",)
    # We publish p=none, yet a forged From of our own domain is refused.
    forged = await evaluate_dmarc(lookup, "home.test", spf_pass("evil.example"), [], local_domains=own, rand=never)
    assert (forged.result, forged.policy, forged.disposition) == ("fail", "none", "reject")
    assert forged.reason.startswith("own domain")
    # Also for a subdomain of ours (org domain match), and an override cannot weaken it.
    sub = await evaluate_dmarc(
        lookup, "mail.home.test", None, [], local_domains=own, overrides={"home.test": "none"}, rand=never
    )
    assert (sub.disposition, sub.override) == ("reject", None) and sub.reason.startswith("own domain")
    # Our own authenticated mail passes.
    ok = await evaluate_dmarc(lookup, "home.test", None, [dkim_pass("home.test")], local_domains=own, rand=never)
    assert (ok.result, ok.disposition) == ("pass", "none")
    # Without a published record (result none) our domain is still protected; an aligned pass goes through.
    bare = ("norecord.test",)
    v = await evaluate_dmarc(lookup, "norecord.test", None, [], local_domains=bare, rand=never)
    assert (v.result, v.disposition) == ("none", "reject") and v.reason.startswith("own domain")
    v = await evaluate_dmarc(lookup, "norecord.test", spf_pass("norecord.test"), [], local_domains=bare, rand=never)
    assert (v.result, v.disposition) == ("none", "none")
    # Someone else's domain is not ours: published p=none stays none.
    other = await evaluate_dmarc(lookup, "shop.reject.test", None, [], local_domains=own, rand=never)
    assert other.disposition == "none"


@pytest.mark.asyncio
async def test_own_domain_protection_holds_when_dns_fails(nsd):
    # example.org is not served (REFUSED): temperror. Without even a relaxed-aligned pass no record
    # could make the message pass, so it is refused; with one, the caller decides (disposition none).
    lookup = lookup_at(nsd)
    own = ("example.org",)
    forged = await evaluate_dmarc(lookup, "example.org", None, [], local_domains=own, rand=never)
    assert (forged.result, forged.disposition) == ("temperror", "reject")
    ours = await evaluate_dmarc(lookup, "example.org", None, [dkim_pass("example.org")], local_domains=own, rand=never)
    assert (ours.result, ours.disposition) == ("temperror", "none")
