"""Inbound DKIM verification (RFC 6376, RFC 8301, RFC 8463): a verdict for each DKIM-Signature of a
received message, for Authentication-Results (RFC 8601 2.7.1) and DMARC.

Theory of operation. dkimpy parses the signatures and keys and checks b= over the canonical
header, but its ``DKIM.verify`` looks the key up itself through a blocking ``dnsfunc``, checks
one signature per call, and hashes the whole body again for each. So verification runs in two
steps:
  1. on the event loop: parse the DKIM-Signature fields (cheap), and fetch every key record
     ``s._domainkey.d`` through the async lookup, all at once (``asyncio.gather``);
  2. in ``run_blocking`` (the backend's worker threads; CPU work: body canonicalisation, RSA and
     Ed25519): for each signature what dkimpy's ``DKIM.verify(idx=i, dnsfunc=...)`` does, its
     ``dnsfunc`` answering from the records fetched in step 1, except that the body hash is
     checked once per message rather than once per signature (``_check_signatures`` says why).
     No dkimpy function or module global is replaced, so the signer (backend/dkim/) and anyone
     else see dkimpy as installed.
What dkimpy folds into one ``False`` (no key, revoked key, small key, bad signature) is told
apart here first, because RFC 8601 gives each its own result.

Results (RFC 8601 2.7.1):
  pass       the signature verified
  fail       it did not: the body hash (bh=) or the header signature (b=) mismatched; reason says which
  neutral    the signature field has a syntax error, lacks a required tag or has expired (x=),
             or the message header cannot be parsed at all. RFC 8601 2.7.1 names syntax errors
             ("the signature or signatures contained syntax errors") under neutral, and other
             failures not listed; permerror is kept for a parsed signature whose key is unusable.
  policy     verifiable, but not acceptable to us: rsa-sha1 (RFC 8301 3.1: verifiers MUST NOT
             consider it valid) and RSA keys under 1024 bits (RFC 8301 3.2). RFC 8601 2.7.1
             "policy": the signature was fine as far as DKIM goes, "some aspect of [it] was not
             acceptable to the ADMD"; fail would tell a reader the signature was forged or broken.
  temperror  the key lookup failed temporarily (SERVFAIL, timeout): a later try may succeed
  permerror  no key record, a revoked key (empty p=), a key record that does not parse, or a
             key that does not fit the signature (k= against a=, the key's h=, t=s)
Neither neutral, policy, temperror nor permerror counts as a pass anywhere (DMARC included).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import dkim as dkimpy
import dns.exception
import dns.name
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError, Relaxed
from dkim.crypto import HASH_ALGORITHMS
from dkim.util import InvalidTagValueList, parse_tag_value

from backend.auth.results import DKIMVerdict
from backend.dkim.canon import BODY_SLICE, canonical_body  # noqa: F401  (BODY_SLICE: part of this API)
from backend.dns.lookup import DNSTempError

# A message may carry any number of signatures, and each costs a key lookup and a hash of the whole
# body: a sender could make one message cost us hundreds of lookups. Real mail carries one to three
# (author domain, ESP, mailing list); we verify the first ten in header order (the newest first)
# and report only those, as RFC 6376 6.1 allows (KumoMTA stops at ten as well).
MAX_SIGNATURES = 10
# Concurrent key lookups of one message (ARC may need up to 100 names: 50 sets, two keys each).
MAX_PARALLEL_LOOKUPS = 10
# RFC 8301 3.2: "Verifiers MUST NOT consider signatures using RSA keys of less than 1024 bits as
# valid signatures."
MIN_RSA_BITS = 1024
# RFC 6008 / RFC 8601 2.7.1 header.b: enough of b= to tell two signatures of one domain apart.
HEADER_B_CHARS = 8

# dkimpy logs every bad signature and missing key at ERROR. Those are ordinary Internet mail, and
# the verdict carries them to the accept pipeline's one log line per message; its own logger
# stays quiet.
DKIMPY_LOG = logging.getLogger("homemx.auth.dkimpy")
DKIMPY_LOG.addHandler(logging.NullHandler())
DKIMPY_LOG.propagate = False

_FIELD_NAME_RE = re.compile(rb"([\x21-\x7e]+?):")
_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
_WSP_RE = re.compile(rb"\s+")

RunBlocking = Callable[..., Awaitable]


def header_fields(message: bytes) -> list[tuple[bytes, bytes]]:
    """(name, raw value incl. folding) of each header field, split as dkimpy's ``rfc822_parse``
    splits them, so the n-th DKIM-Signature here is dkimpy's ``idx=n``. Unlike dkimpy this never
    raises: a line that is neither a field nor a continuation is skipped (dkimpy then refuses
    the message, and every signature gets neutral)."""
    if message.startswith((b"\n", b"\r\n")):
        return []
    m = _HEADER_END_RE.search(message)
    head = message[: m.start()] if m else message
    fields: list[list[bytes]] = []
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1] += b"\r\n" + line
        elif (f := _FIELD_NAME_RE.match(line)) is not None:
            fields.append([f.group(1), line[f.end() :]])
    return [(name, value) for name, value in fields]


async def prefetch_txt(lookup, names: Sequence[bytes]) -> dict[bytes, str | None | DNSTempError]:
    """The TXT record at each name (the first, see ``_first_record``), None where there is none,
    the DNSTempError where the answer is unknown: all names at once, at most
    MAX_PARALLEL_LOOKUPS in flight. Keys are the names exactly as dkimpy asks for them."""
    limit = asyncio.Semaphore(MAX_PARALLEL_LOOKUPS)

    async def one(name: bytes):
        try:
            # A d= or s= that is no domain name is the signer's error, not the DNS's: refuse it
            # here (dnspython would raise, and the lookup would report a temporary error).
            text = name.decode("ascii")
            dns.name.from_text(text)
        except (UnicodeDecodeError, dns.exception.DNSException):
            return None
        async with limit:
            try:
                return _first_record(await lookup.txt(text))
            except DNSTempError as e:
                return e

    unique = list(dict.fromkeys(names))
    return dict(zip(unique, await asyncio.gather(*(one(n) for n in unique))))


def _first_record(records: list[str]) -> str | None:
    # RFC 6376 3.6.2.2: several TXT records at one key name give undefined results; we use the
    # first, as dkimpy's own lookup does.
    return records[0] if records else None


def key_name(tags: dict[bytes, bytes]) -> bytes:
    """The key record name of a signature (RFC 6376 3.6.2.1), spelt as dkimpy's verify_sig asks."""
    return tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."


def dnsfunc_from(table: dict[bytes, str | None | DNSTempError]):
    """A dkimpy ``dnsfunc`` answering from prefetched records (never the network)."""

    def dnsfunc(name, timeout=5):
        record = table.get(name)
        return record.encode("utf-8") if isinstance(record, str) else None

    return dnsfunc


async def run_inline(fn, *args):
    """``run_blocking`` when none is given: the CPU part on the caller's thread."""
    return fn(*args)


@dataclass
class _Signature:
    """One DKIM-Signature as far as it could be read on the loop."""

    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    header_b: str = ""
    identity: str = ""
    body_length: int | None = None
    tags: dict[bytes, bytes] | None = None  # None: unusable, see result/reason
    result: str = ""
    reason: str = ""


def _text(value: bytes | None) -> str:
    return _WSP_RE.sub(b"", value or b"").decode("utf-8", "replace")


def _read_signature(value: bytes) -> _Signature:
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as e:
        return _Signature(result="neutral", reason=f"signature syntax: {e.__class__.__name__} {e}".strip())
    sig = _Signature(
        domain=_text(tags.get(b"d")).lower(),
        selector=_text(tags.get(b"s")),
        algorithm=_text(tags.get(b"a")).lower(),
        header_b=_text(tags.get(b"b"))[:HEADER_B_CHARS],
    )
    sig.identity = _text(tags.get(b"i")) or (f"@{sig.domain}" if sig.domain else "")
    try:
        # Required tags, base64, i= within d=, t=/x= (expired signatures), c=, q=, v=.
        dkimpy.validate_signature_fields(tags)
        CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        if b"l" in tags and not tags[b"l"].isdigit():
            raise dkimpy.ValidationError("l= is empty")  # dkimpy's check lets "l=" through
    except (dkimpy.ValidationError, InvalidCanonicalizationPolicyError) as e:
        # dkimpy's messages name tags as bytes ("missing b'bh'="): say "missing bh=".
        sig.result, sig.reason = "neutral", "signature syntax: " + re.sub(r"\bb'([^']*)'", r"\1", str(e))
        return sig
    except IndexError:
        # dkimpy's i= check indexes before the d= suffix: i=example.org with d=example.org.
        sig.result, sig.reason = "neutral", "signature syntax: i= has no @"
        return sig
    if b"l" in tags:
        # RFC 6376 8.2: l= lets anyone append to the body; accepted, as dkimpy does, and recorded.
        sig.body_length = int(tags[b"l"])
    if tags[b"a"] == b"rsa-sha1":
        sig.result, sig.reason = "policy", "rsa-sha1 is not accepted (RFC 8301)"
        return sig
    sig.tags = tags
    return sig


def _key_problem(tags: dict[bytes, bytes], record: str) -> tuple[str, str, int | None]:
    """(result, reason, key bits) for a key record, result "" when the key fits the signature."""
    raw = record.encode("utf-8")
    try:
        _, bits, ktag, tlsrpt_only = dkimpy.evaluate_pk(key_name(tags), raw)
        key_tags = parse_tag_value(raw)
    except (dkimpy.KeyFormatError, InvalidTagValueList, binascii.Error, ValueError) as e:
        if re.search(rb"(^|;)\s*p\s*=\s*(;|$)", raw):
            return "permerror", "key revoked (empty p=)", None  # RFC 6376 3.6.1
        return "permerror", f"key record unusable: {e}", None
    if ktag is None or tlsrpt_only:
        return "permerror", "key record is not for email (s=)", None
    wanted = b"ed25519" if tags[b"a"].startswith(b"ed25519") else b"rsa"
    if ktag != wanted:
        # RFC 6376 6.1.2: a key unsuitable for a= is a permanent failure.
        return "permerror", f"key type {ktag.decode()} does not match a={tags[b'a'].decode()}", bits
    hashes = key_tags.get(b"h")
    if hashes is not None and b"sha256" not in [h.strip() for h in hashes.split(b":")]:
        return "permerror", "key record h= excludes sha256", bits
    flags = [t.strip() for t in key_tags.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in tags and tags[b"i"].rpartition(b"@")[2].lower() != tags[b"d"].lower():
        return "permerror", "key t=s forbids an i= subdomain", bits
    if ktag == b"rsa" and bits < MIN_RSA_BITS:
        return "policy", f"key too small ({bits} bits, RFC 8301)", bits
    return "", "", bits


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(the header block with a blank line, for dkimpy; the body as received: after the first
    empty line, line ends as they are)."""
    m = _HEADER_END_RE.search(message)
    if m is None:
        return message + b"\r\n\r\n", b""
    return message[: m.start()] + b"\r\n\r\n", message[m.end() :]


def body_hash_matches(sig: dict[bytes, bytes], body: bytes, canonical: dict[bool, bytes]) -> tuple[bool, int]:
    """Whether a signature's bh= is the hash of ``body`` canonicalised per its c= (and cut at l=),
    and how many canonical body bytes l= leaves unsigned. ``canonical`` caches the canonical
    bodies of one message (key: relaxed?). Raises binascii.Error when bh= is no base64."""
    relaxed = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple")).body_algorithm is Relaxed
    if relaxed not in canonical:
        canonical[relaxed] = canonical_body(body, relaxed)
    signed = canonical[relaxed]
    if b"l" in sig:
        signed = signed[: int(sig[b"l"])]
    expected = base64.b64decode(_WSP_RE.sub(b"", sig[b"bh"]), validate=True)
    return HASH_ALGORITHMS[sig[b"a"]](signed).digest() == expected, len(canonical[relaxed]) - len(signed)


def _check_signatures(message: bytes, work: list[int], table) -> dict[int, tuple[str, str, int | None, str]]:
    """The CPU part (runs in a worker thread): {index: (result, reason, key bits, coverage note)}.

    What dkimpy's ``DKIM.verify(idx)`` does (``verify_headerprep`` + ``verify_sig``), with the
    body hash checked here: dkimpy canonicalises the whole body again for every signature, with a
    regex substitution per space that holds the GIL (about 55 ms per MB of text; ten signatures
    on a 25 MB message would stall the event loop for seconds). Here the body is canonicalised
    once per algorithm (simple, relaxed) and message, in slices (``canonical_body``), and dkimpy
    gets only the header block, to check b= over the headers (bh= included).
    """
    head, body = split_message(message)
    try:
        parsed = dkimpy.DKIM(head, logger=DKIMPY_LOG, minkey=MIN_RSA_BITS)
    except (dkimpy.MessageFormatError, IndexError) as e:
        # dkimpy cannot split the header (a line that is no field; IndexError: a continuation
        # line before the first field). Nothing it could verify.
        return {i: ("neutral", f"message header unparseable: {e}", None, "") for i in work}
    dnsfunc = dnsfunc_from(table)
    canonical: dict[bool, bytes] = {}  # relaxed? -> the canonical body
    out: dict[int, tuple[str, str, int | None, str]] = {}
    for idx in work:
        try:
            sig, include_headers, sigheaders = parsed.verify_headerprep(idx)
        except (dkimpy.DKIMException, IndexError) as e:  # read on the loop already; never expected
            out[idx] = ("neutral", f"signature syntax: {e}", None, "")
            continue
        result, reason, bits = _key_problem(sig, table[key_name(sig)])
        if result:
            out[idx] = (result, reason, bits, "")
            continue
        try:
            matches, unsigned = body_hash_matches(sig, body, canonical)
        except binascii.Error:
            out[idx] = ("neutral", "signature syntax: bh= is not base64", bits, "")
            continue
        if not matches:
            out[idx] = ("fail", "body hash mismatch", bits, "")
            continue
        try:
            # sig without bh=: dkimpy skips its own body check; b= still covers the bh= text.
            del sig[b"bh"]
            ok = parsed.verify_sig(sig, include_headers, sigheaders[idx], dnsfunc)
        except dkimpy.KeyFormatError as e:
            out[idx] = ("permerror", f"key unusable: {e}", bits, "")
            continue
        except dkimpy.DKIMException as e:
            out[idx] = ("neutral", f"signature syntax: {e}", bits, "")
            continue
        if not ok:
            out[idx] = ("fail", "signature (b=) mismatch", bits, "")
            continue
        # RFC 6376 8.2: with l= the rest of the body is not signed; say how much that is.
        out[idx] = ("pass", "", bits, f"l={int(sig[b'l'])}, {unsigned} body bytes unsigned" if unsigned > 0 else "")
    return out


async def verify_dkim(message: bytes, lookup, run_blocking: RunBlocking | None = None) -> tuple[DKIMVerdict, ...]:
    """A verdict per DKIM-Signature of ``message`` (the first MAX_SIGNATURES), in header order.

    ``lookup`` has the AsyncDNSLookup interface (``await txt(name)``, DNSTempError when the
    answer is unknown); ``run_blocking(fn, *args)`` runs the CPU-bound part off the event loop
    (the backend's thread pool), inline when None. No signature: ``()``.
    """
    values = [v for name, v in header_fields(message) if name.lower() == b"dkim-signature"][:MAX_SIGNATURES]
    if not values:
        return ()
    signatures = [_read_signature(v) for v in values]
    table = await prefetch_txt(lookup, [key_name(s.tags) for s in signatures if s.tags is not None])
    work = []
    for idx, sig in enumerate(signatures):
        if sig.tags is None:
            continue
        record = table[key_name(sig.tags)]
        if isinstance(record, DNSTempError):
            sig.result, sig.reason = "temperror", f"key lookup: {record}"
        elif record is None:
            sig.result, sig.reason = "permerror", f"no key record at {key_name(sig.tags).decode('ascii', 'replace')}"
        else:
            work.append(idx)
    checked = await (run_blocking or run_inline)(_check_signatures, message, work, table) if work else {}
    verdicts = []
    for idx, sig in enumerate(signatures):
        bits, note = None, ""
        if idx in checked:
            sig.result, sig.reason, bits, note = checked[idx]
        verdicts.append(
            DKIMVerdict(
                domain=sig.domain,
                selector=sig.selector,
                result=sig.result,
                reason=sig.reason or note,
                algorithm=sig.algorithm,
                header_b=sig.header_b,
                key_bits=bits,
                identity=sig.identity,
                body_length=sig.body_length,
            )
        )
    return tuple(verdicts)
