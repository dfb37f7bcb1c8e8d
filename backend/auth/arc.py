"""Inbound ARC verification (RFC 8617 5.2): the result of the chain of ARC sets a received message
carries, for Authentication-Results (``arc=``) and for a DMARC override on forwarded mail.

Same two steps as backend/auth/dkim.py (see its theory of operation): every key record the chain
names (the s=/d= of each ARC-Seal and ARC-Message-Signature) is fetched on the event loop at
once, then dkimpy's ``ARC.verify`` runs in ``run_blocking`` with a ``dnsfunc`` answering from
those records. Sealing is not done here.

Results (RFC 8617 4.4, RFC 8601 2.7.8): none (no ARC sets), pass, fail. RFC 8617 has no
temperror: a chain that fails while one of its keys could not be looked up is a fail whose
reason says so.
"""

from __future__ import annotations

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value

from backend.auth.dkim import DKIMPY_LOG, MIN_RSA_BITS, RunBlocking, dnsfunc_from, header_fields, key_name, prefetch_txt, run_inline
from backend.auth.results import ARCVerdict
from backend.dns.lookup import DNSTempError

# RFC 8617 4.2.1: instance values are 1 to 50; a message with more sets is a fail.
MAX_INSTANCES = 50
_ARC_HEADERS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_SIGNED = (b"arc-seal", b"arc-message-signature")


def _check_chain(message: bytes, table) -> tuple[str, int, str]:
    """The CPU part (a worker thread): (result, highest instance, reason) from dkimpy."""
    try:
        arc = dkimpy.ARC(message, logger=DKIMPY_LOG, minkey=MIN_RSA_BITS)
        instances = arc.sorted_arc_headers()[0]
        cv, _, reason = arc.verify(dnsfunc=dnsfunc_from(table))
    except dkimpy.DKIMException as e:
        return "fail", 0, str(e)
    except IndexError:
        # dkimpy finds the AMS of an instance by the text " i=N;" and indexes the match: an
        # ARC-Message-Signature written "i=N;" right after the colon (no space) is not found.
        return "fail", 0, "ARC-Message-Signature not found for its instance"
    if cv == dkimpy.CV_Pass:
        return "pass", instances, ""
    # cv None: an ARC-Seal said cv=fail, the chain ended there (RFC 8617 5.2 step 2): a fail.
    return "fail", instances, reason


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
