"""Inbound DKIM verification (backend/auth/dkim.py): a verdict per signature, key records served by a
real nsd on loopback and fetched through the backend's AsyncDNSLookup; signatures made by dkimpy's
signer (and ours) with keys generated here."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from types import SimpleNamespace

import dkim as dkimpy
import pytest
from dkim.canonicalization import Relaxed, Simple

from backend.auth.dkim import MAX_SIGNATURES, canonical_body, verify_dkim
from backend.dkim import keys as our_keys
from backend.dns.lookup import DNSLookup
from backend.dkim import sign as our_signer
from backend.dkim.keys import zone_txt_rdata
from tests.conftest import require_tool
from tests.lab.dkim_inbound import MESSAGE, CountingLookup, ed25519_key, nsd_lookup, rsa_key
from tests.lab.nsd import NSD, zone_text


@pytest.fixture(scope="module")
def sender(tmp_path_factory):
    """example.org's keys, published by nsd: rsa1 (2048), ed1, small (512 bits), revoked (p=), and
    rsa1's public key again under sha1only (h=sha1) and strict (t=s)."""
    require_tool("/usr/sbin/nsd", "dig", "openssl")
    keys = SimpleNamespace(
        rsa=rsa_key("example.org", "rsa1"),
        ed=ed25519_key("example.org", "ed1"),
        small=rsa_key("example.org", "small", bits=512),
        revoked=rsa_key("example.org", "revoked"),
    )
    ours = our_keys.generate_key("example.org", "ours", "rsa", tmp_path_factory.mktemp("dkimkeys"))
    keys.ours = SimpleNamespace(domain="example.org", selector="ours", algorithm="rsa", private_key=ours.path)
    records = "\n".join(
        [keys.rsa.zone_line(), keys.ed.zone_line(), keys.small.zone_line(), ours.zone_line(),
         f'{keys.revoked.record_name}\tIN\tTXT\t"v=DKIM1; k=rsa; p="',
         f'sha1only._domainkey.example.org.\tIN\tTXT\t{zone_txt_rdata(keys.rsa.txt.replace("k=rsa;", "h=sha1; k=rsa;"))}',
         f'strict._domainkey.example.org.\tIN\tTXT\t{zone_txt_rdata(keys.rsa.txt.replace("k=rsa;", "t=s; k=rsa;"))}']
    )  # fmt: skip
    with NSD({"example.org": zone_text("example.org", records)}) as ns:
        keys.ns = ns
        yield keys


def _only(verdicts):
    assert len(verdicts) == 1, verdicts
    return verdicts[0]


def _b_tag(signed: bytes) -> str:
    return re.sub(r"\s+", "", re.search(rb"\bb=([^;]+)", signed.split(b"bh=", 1)[1]).group(1).decode())


@pytest.mark.asyncio
async def test_rsa_2048_signature_passes(sender):
    signed = sender.rsa.sign(MESSAGE)
    v = _only(await verify_dkim(signed, nsd_lookup(sender.ns)))
    assert (v.result, v.domain, v.selector, v.algorithm, v.key_bits) == ("pass", "example.org", "rsa1", "rsa-sha256", 2048)
    assert v.identity == "@example.org"
    assert v.header_b == _b_tag(signed)[:8] and len(v.header_b) == 8
    assert v.body_length is None


@pytest.mark.asyncio
async def test_ed25519_signature_passes(sender):
    # RFC 8463: Ed25519 over the SHA-256 of the canonical header, key record k=ed25519.
    v = _only(await verify_dkim(sender.ed.sign(MESSAGE, identity=b"alice@example.org"), nsd_lookup(sender.ns)))
    assert (v.result, v.algorithm, v.key_bits, v.identity) == ("pass", "ed25519-sha256", 256, "alice@example.org")


@pytest.mark.asyncio
async def test_our_signer_output_verifies(sender):
    # What our outbound signer writes (relaxed/relaxed, From oversigned) verifies on the way in.
    signed = our_signer.sign_message(MESSAGE, [sender.ours])
    assert _only(await verify_dkim(signed, nsd_lookup(sender.ns))).result == "pass"


@pytest.mark.asyncio
async def test_every_signature_is_verified_in_header_order(sender):
    # The topmost signature claims ed1 but was made with another key: fail. dkimpy's verify checks
    # one signature per call; the RSA one below must still be checked and pass.
    imposter = ed25519_key("example.org", "ed1")
    signed = imposter.sign(sender.rsa.sign(MESSAGE))
    verdicts = await verify_dkim(signed, nsd_lookup(sender.ns))
    assert [(v.selector, v.result) for v in verdicts] == [("ed1", "fail"), ("rsa1", "pass")]
    assert verdicts[0].reason == "signature (b=) mismatch"


@pytest.mark.asyncio
async def test_a_512_bit_rsa_key_is_not_a_pass(sender):
    # RFC 8301 3.2: verifiers MUST NOT consider signatures with RSA keys under 1024 bits valid.
    v = _only(await verify_dkim(sender.small.sign(MESSAGE), nsd_lookup(sender.ns)))
    assert (v.result, v.key_bits) == ("policy", 512)
    assert "key too small" in v.reason


@pytest.mark.asyncio
async def test_rsa_sha1_is_not_a_pass(sender):
    # RFC 8301 3.1: rsa-sha1 signatures are not valid, however good the key.
    sha1 = dataclasses.replace(sender.rsa, algorithm="rsa-sha1")
    v = _only(await verify_dkim(sha1.sign(MESSAGE), nsd_lookup(sender.ns)))
    assert (v.result, v.algorithm) == ("policy", "rsa-sha1")


@pytest.mark.asyncio
async def test_a_message_with_bare_lf_line_ends_verifies(sender):
    # As a message stored or handed over by a local app may look: the signature covers its CRLF form.
    signed = sender.rsa.sign(sender.ed.sign(MESSAGE + b"two spaces  and a tab\there  \r\n\r\n"))
    verdicts = await verify_dkim(signed.replace(b"\r\n", b"\n"), nsd_lookup(sender.ns))
    assert [v.result for v in verdicts] == ["pass", "pass"]


@pytest.mark.asyncio
async def test_simple_and_relaxed_body_canonicalisation_both_verify(sender):
    # Both c= body algorithms on one message (each canonicalised once), on a body where they differ.
    body_wsp = MESSAGE + b"trailing   \r\n\tindented  line\r\n\r\n\r\n"
    signed = sender.rsa.sign(sender.ed.sign(body_wsp, canonicalize=(b"simple", b"simple")))
    verdicts = await verify_dkim(signed, nsd_lookup(sender.ns))
    assert [v.result for v in verdicts] == ["pass", "pass"]
    altered = signed.replace(b"trailing   \r\n", b"trailing \r\n")  # invisible to relaxed only
    assert [(v.selector, v.result) for v in await verify_dkim(altered, nsd_lookup(sender.ns))] == [("rsa1", "pass"), ("ed1", "fail")]


@pytest.mark.asyncio
async def test_a_body_altered_after_signing_fails_on_the_body_hash(sender):
    signed = sender.rsa.sign(sender.ed.sign(MESSAGE))
    altered = signed.replace(b"quarterly numbers", b"new bank details")
    verdicts = await verify_dkim(altered, nsd_lookup(sender.ns))
    assert [(v.result, v.reason) for v in verdicts] == [("fail", "body hash mismatch")] * 2


@pytest.mark.asyncio
async def test_an_altered_signed_header_fails_on_the_signature(sender):
    altered = sender.rsa.sign(MESSAGE).replace(b"Subject: inbound verification", b"Subject: urgent wire transfer")
    v = _only(await verify_dkim(altered, nsd_lookup(sender.ns)))
    assert (v.result, v.reason) == ("fail", "signature (b=) mismatch")


@pytest.mark.asyncio
async def test_no_key_record_is_a_permerror(sender):
    gone = rsa_key("example.org", "gone")  # never published
    v = _only(await verify_dkim(gone.sign(MESSAGE), nsd_lookup(sender.ns)))
    assert v.result == "permerror"
    assert v.reason == "no key record at gone._domainkey.example.org."


@pytest.mark.asyncio
async def test_a_revoked_key_is_a_permerror(sender):
    # RFC 6376 3.6.1: an empty p= means the key was revoked.
    v = _only(await verify_dkim(sender.revoked.sign(MESSAGE), nsd_lookup(sender.ns)))
    assert (v.result, v.reason) == ("permerror", "key revoked (empty p=)")


@pytest.mark.asyncio
async def test_key_record_flags_are_obeyed(sender):
    # RFC 6376 3.6.1: h= lists the hashes the key may sign with; t=s forbids i= in a subdomain of d=.
    sha1only = dataclasses.replace(sender.rsa, selector="sha1only")
    v = _only(await verify_dkim(sha1only.sign(MESSAGE), nsd_lookup(sender.ns)))
    assert (v.result, v.reason) == ("permerror", "key record h= excludes sha256")
    strict = dataclasses.replace(sender.rsa, selector="strict")
    assert _only(await verify_dkim(strict.sign(MESSAGE), nsd_lookup(sender.ns))).result == "pass"
    v = _only(await verify_dkim(strict.sign(MESSAGE, identity=b"alice@mail.example.org"), nsd_lookup(sender.ns)))
    assert (v.result, v.reason) == ("permerror", "key t=s forbids an i= subdomain")


@pytest.mark.asyncio
async def test_a_key_of_the_wrong_type_is_a_permerror(sender):
    # An Ed25519 signature pointing at the RSA key record (RFC 6376 6.1.2: unsuitable key).
    wrong = ed25519_key("example.org", "rsa1")
    v = _only(await verify_dkim(wrong.sign(MESSAGE), nsd_lookup(sender.ns)))
    assert v.result == "permerror" and "does not match" in v.reason


@pytest.mark.asyncio
async def test_an_unserved_domain_is_a_temperror(sender):
    # nsd answers REFUSED for a zone it does not serve: the key's answer is unknown, not absent.
    other = rsa_key("unserved.test", "s1")
    msg = MESSAGE.replace(b"alice@example.org", b"alice@unserved.test")
    v = _only(await verify_dkim(other.sign(msg), nsd_lookup(sender.ns, timeout=2.0)))
    assert (v.result, v.domain) == ("temperror", "unserved.test")
    assert "s1._domainkey.unserved.test" in v.reason


@pytest.mark.asyncio
async def test_a_malformed_signature_is_neutral_and_the_next_still_checked(sender):
    # RFC 8601 2.7.1: neutral for a signature with syntax errors (here: no bh=).
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=rsa1; h=from; b=AAAA\r\n"
    verdicts = await verify_dkim(broken + sender.rsa.sign(MESSAGE), nsd_lookup(sender.ns))
    assert [v.result for v in verdicts] == ["neutral", "pass"]
    assert (verdicts[0].reason, verdicts[0].domain) == ("signature syntax: missing bh=", "example.org")


@pytest.mark.asyncio
async def test_an_unparseable_header_gives_neutral_not_an_exception(sender):
    # dkimpy refuses a header line that is no field; each signature is reported, none raises.
    signed = sender.rsa.sign(MESSAGE).replace(b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\nthis is no header field\r\n")
    v = _only(await verify_dkim(signed, nsd_lookup(sender.ns)))
    assert v.result == "neutral" and "unparseable" in v.reason


@pytest.mark.asyncio
async def test_body_length_is_recorded_and_unsigned_bytes_reported(sender):
    # RFC 6376 8.2: l= leaves the rest of the body unsigned; the pass says how much.
    signed = sender.rsa.sign(MESSAGE, length=True)
    length = len(MESSAGE.partition(b"\r\n\r\n")[2])
    v = _only(await verify_dkim(signed, nsd_lookup(sender.ns)))
    assert (v.result, v.body_length, v.reason) == ("pass", length, "")
    appended = signed + b"Click here: https://phish.test/\r\n"
    v = _only(await verify_dkim(appended, nsd_lookup(sender.ns)))
    assert (v.result, v.body_length) == ("pass", length)
    assert v.reason == f"l={length}, 33 body bytes unsigned"


@pytest.mark.asyncio
async def test_a_message_without_signature_has_no_verdict(sender):
    assert await verify_dkim(MESSAGE, nsd_lookup(sender.ns)) == ()


@pytest.mark.asyncio
async def test_only_the_first_signatures_are_verified(sender):
    # Every signature costs a lookup and a hash of the body: the count is bounded (RFC 6376 6.1).
    signed = MESSAGE
    for _ in range(MAX_SIGNATURES + 3):
        signed = sender.ed.sign(signed)
    lookup = CountingLookup(nsd_lookup(sender.ns))
    verdicts = await verify_dkim(signed, lookup)
    assert len(verdicts) == MAX_SIGNATURES
    assert {v.result for v in verdicts} == {"pass"}
    # One key record, fetched once however many signatures name it.
    assert lookup.asked == ["ed1._domainkey.example.org."]


@pytest.mark.asyncio
async def test_the_crypto_runs_in_run_blocking_after_every_key_is_fetched(sender):
    # The CPU part goes through run_blocking (the backend's thread pool) once per message, and
    # by then every key lookup has finished: no DNS from inside a worker thread.
    signed = sender.rsa.sign(sender.ed.sign(MESSAGE))
    lookup = CountingLookup(nsd_lookup(sender.ns))
    seen = []

    async def run_blocking(fn, *args):
        seen.append(sorted(lookup.asked))
        return await asyncio.to_thread(fn, *args)

    verdicts = await verify_dkim(signed, lookup, run_blocking)
    assert [v.result for v in verdicts] == ["pass", "pass"]
    assert seen == [["ed1._domainkey.example.org.", "rsa1._domainkey.example.org."]]


BODIES = [
    b"", b"\r\n", b"\r\n\r\n", b"x", b"x\r\n", b"x\r\n\r\n\r\n", b" \t \r\n", b"a \t b  \r\n\tc\r\n \r\n",
    b"line  \r\nnext\t\r\n\r\nend   ", b"bare\nlf  \n\n", b"mixed\r\nends\n \n\r\n", b"lone\rcr \r\n",
    b"".join(b"%d  spaced\t line %s\r\n" % (i, b" " * (i % 4)) for i in range(200)) + b"\r\n\r\n",
]  # fmt: skip


@pytest.mark.parametrize("slice_size", [1, 3, 7, 64, 256 * 1024])
def test_canonical_body_is_dkimpys_in_any_slices(slice_size):
    # The sliced canonicalisation must give the bytes dkimpy would hash (its parse, then Simple or
    # Relaxed), wherever the slices are cut: else every large message would fail on bh=.
    for body in BODIES:
        _, dkimpy_body = dkimpy.rfc822_parse(b"A: b\r\n\r\n" + body)
        assert canonical_body(body, relaxed=False, slice_size=slice_size) == Simple.canonicalize_body(dkimpy_body), body
        assert canonical_body(body, relaxed=True, slice_size=slice_size) == Relaxed.canonicalize_body(dkimpy_body), body


SIGNED = {
    "rsa and ed25519": lambda k: k.rsa.sign(k.ed.sign(MESSAGE)),
    "simple/simple with whitespace": lambda k: k.rsa.sign(MESSAGE + b" a  b \t\r\n\r\n", canonicalize=(b"simple", b"simple")),
    "relaxed body whitespace changed": lambda k: k.ed.sign(MESSAGE + b"a  b\r\n").replace(b"a  b\r\n", b"a \t b  \r\n\r\n"),
    "simple body whitespace changed": lambda k: k.ed.sign(MESSAGE + b"a  b\r\n", canonicalize=(b"relaxed", b"simple")).replace(b"a  b", b"a b"),
    "bare LF": lambda k: k.rsa.sign(k.ed.sign(MESSAGE)).replace(b"\r\n", b"\n"),
    "header folded differently": lambda k: k.rsa.sign(MESSAGE).replace(b"Subject: inbound", b"Subject:\r\n  inbound"),
    "body altered": lambda k: k.rsa.sign(MESSAGE).replace(b"numbers", b"Numbers"),
    "l= with text appended": lambda k: k.ed.sign(MESSAGE, length=True) + b"appended\r\n",
    "empty body": lambda k: k.rsa.sign(MESSAGE.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"),
}  # fmt: skip


@pytest.mark.parametrize("case", SIGNED)
@pytest.mark.asyncio
async def test_pass_or_not_is_dkimpys_verify(sender, case):
    # We hash the body ourselves (once per message, in slices) and let dkimpy check b=: for every
    # signature, pass exactly when dkimpy's own verify(idx) passes it, resolving the same nsd.
    message = SIGNED[case](sender)
    blocking = DNSLookup(sender.ns.resolver())

    def dnsfunc(name, timeout=5):
        records = blocking.txt(name.decode())
        return records[0].encode() if records else None

    verdicts = await verify_dkim(message, nsd_lookup(sender.ns))
    theirs = dkimpy.DKIM(message)
    expected = []
    for i in range(len(verdicts)):
        try:
            expected.append(theirs.verify(idx=i, dnsfunc=dnsfunc))
        except dkimpy.ValidationError:  # dkimpy raises on a body hash mismatch
            expected.append(False)
    assert expected and [v.result == "pass" for v in verdicts] == expected
