"""Inbound ARC verification (RFC 8617 5.2): the result of the chain of ARC sets a received message
carries, for Authentication-Results (``arc=``) and for a DMARC override on forwarded mail.

Same two steps as backend/auth/dkim.py (see its theory of operation): every key record the chain
names (the s=/d= of each ARC-Seal and ARC-Message-Signature) is fetched on the event loop at
once, then dkimpy's ARC checks run in ``run_blocking`` with a ``dnsfunc`` answering from those
records (``_check_chain`` says which parts, and why the body hash is ours). Sealing is not done
here.

Results: none (no ARC header field), pass, fail. The arc= method of Authentication-Results has
no temperror: a chain that fails while one of its keys could not be looked up is a fail whose
reason says so.
"""

from __future__ import annotations

import binascii
import re

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value

from backend.auth.dkim import (
    DKIMPY_LOG, MIN_RSA_BITS, RunBlocking, body_hash_matches, dnsfunc_from, header_fields, key_name, prefetch_txt,
    run_inline, split_message,
)  # fmt: skip
from backend.auth.results import ARCVerdict
from backend.dns.lookup import DNSTempError

# RFC 8617 4.2.1: instance values are 1 to 50; a message with more sets is a fail.
MAX_INSTANCES = 50
_ARC_HEADERS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_SIGNED = (b"arc-seal", b"arc-message-signature")


def _check_chain(message: bytes, table) -> tuple[str, int, str]:
    """The CPU part (a worker thread): (result, highest instance, reason).

    dkimpy's ``ARC.verify`` checks the ARC-Message-Signature of every instance, each with its own
    pass of body canonicalisation over the whole body (holding the GIL, as backend/auth/dkim.py
    explains), though only the newest AMS decides (RFC 8617 5.2): fifty sets on a large
    message would stall the backend for a minute. So dkimpy's ``verify_instance`` runs on the
    header block alone (every ARC-Seal checked in full; the AMS body checks fail on the empty body
    and are ignored), the newest AMS is checked here with the body canonicalised once, in slices,
    and dkimpy's decision over the sets (``ARC.verify``) is applied to the results.
    """
    head, body = split_message(message)
    dnsfunc = dnsfunc_from(table)
    instances = 0
    try:
        arc = dkimpy.ARC(head, logger=DKIMPY_LOG, minkey=MIN_RSA_BITS)
        instances, sets = arc.sorted_arc_headers()
        if instances == 0:
            return "fail", 0, "ARC header fields without an instance (i=)"
        seals = [arc.verify_instance(sets, i, dnsfunc=dnsfunc) for i in range(instances, 0, -1)]
        newest_ams_valid = _newest_ams_valid(arc, sets, instances, body, dnsfunc)
    except dkimpy.DKIMException as e:
        return "fail", instances, str(e)
    except IndexError:
        # dkimpy finds the AMS of an instance by the text " i=N;" and indexes the match: an
        # ARC-Message-Signature written "i=N;" right after the colon (no space) is not found.
        return "fail", instances, "ARC-Message-Signature not found for its instance"
    # dkimpy's ARC.verify from here on (RFC 8617 5.2), newest set first; same reasons.
    if not newest_ams_valid:
        return "fail", instances, "Most recent ARC-Message-Signature did not validate"
    for seal in seals:
        i, cv = seal["instance"], seal["cv"]
        if cv == dkimpy.CV_Fail:
            return "fail", instances, f"ARC-Seal[{i}] reported failure, the chain is terminated"
        if not seal["as-valid"]:
            return "fail", instances, f"ARC-Seal[{i}] did not validate"
        if (i == 1) != (cv == dkimpy.CV_None):
            return "fail", instances, f"ARC-Seal[{i}] reported invalid status {cv.decode(errors='replace')}"
    return "pass", instances, ""


def _newest_ams_valid(arc: dkimpy.ARC, sets, instance: int, body: bytes, dnsfunc) -> bool:
    """The AMS of ``instance`` verified as dkimpy's verify_instance does, except the body hash,
    which is ours (backend.auth.dkim.body_hash_matches) over the real body."""
    value = next(v for i, (name, v) in sets if i == instance and name.lower() == b"arc-message-signature")
    sig = parse_tag_value(value)
    dkimpy.validate_signature_fields(sig, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"], True)
    include_headers = [x.lower() for x in re.split(rb"\s*:\s*", sig[b"h"])]
    if b"arc-seal" in include_headers:
        return False  # as dkimpy: an AMS must not sign ARC-Seal (RFC 8617 4.1.2)
    raw = [(x, y) for x, y in arc.headers if x.lower() == b"arc-message-signature" and b" i=" + sig[b"i"] + b";" in y.lower()][0]
    sig.setdefault(b"c", b"relaxed/relaxed")  # as dkimpy's verify_instance, when c= is absent
    try:
        matches, _ = body_hash_matches(sig, body, {})
    except binascii.Error:
        return False
    if not matches:
        return False
    del sig[b"bh"]  # checked above; b= still covers the bh= text
    try:
        return bool(arc.verify_sig(sig, include_headers, raw, dnsfunc))
    except dkimpy.DKIMException:
        return False


async def verify_arc(message: bytes, lookup, run_blocking: RunBlocking | None = None) -> ARCVerdict:
    """The ARC chain verdict of ``message``: none when it carries no ARC header, else pass or fail
    with the highest instance number and, on fail, why.

    ``lookup`` and ``run_blocking`` as for backend.auth.dkim.verify_dkim.
    """
    fields = [(name.lower(), value) for name, value in header_fields(message) if name.lower() in _ARC_HEADERS]
    if not fields:
        return ARCVerdict(result="none")
    highest = max((int(m.group(1)) for _, v in fields if (m := dkimpy.ARC.INSTANCE_RE.search(v))), default=0)
    if highest > MAX_INSTANCES or sum(1 for name, _ in fields if name == b"arc-seal") > MAX_INSTANCES:
        # Checked before any lookup: a chain longer than RFC 8617 allows costs us nothing.
        return ARCVerdict(result="fail", instances=highest, reason=f"more than {MAX_INSTANCES} ARC sets")
    names = []
    for name, value in fields:
        if name not in _SIGNED:
            continue
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            continue  # dkimpy fails the chain on it; no key to fetch
        if b"s" in tags and b"d" in tags:
            names.append(key_name(tags))
    table = await prefetch_txt(lookup, names)
    result, instances, reason = await (run_blocking or run_inline)(_check_chain, message, table)
    if result == "fail":
        unknown = [n.decode("ascii", "replace") for n, r in table.items() if isinstance(r, DNSTempError)]
        if unknown:
            reason = f"{reason}; key lookup failed temporarily: {', '.join(unknown)}"
    return ARCVerdict(result=result, instances=instances, reason=reason)
