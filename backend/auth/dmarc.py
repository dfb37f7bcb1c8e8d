"""DMARC (RFC 7489) for the RFC5322.From domain of an inbound message: organizational domains from
the Public Suffix List, identifier alignment, policy discovery, and the disposition this receiver
applies (p/sp, pct, local per-domain overrides, own-domain protection).

``org_domain`` and ``aligned`` are plain functions (``dns check`` calls them outside any loop);
``evaluate_dmarc`` asks DNS through the async lookup interface (backend/dns/lookup.py).

Domains are compared in one form: lower case, no trailing dot, A-labels (a U-label From domain of
an SMTPUTF8 message aligns with the xn-- d= of its signature).
"""

from __future__ import annotations

import functools
import random
from typing import Collection, Mapping, Sequence

import dns.exception
import dns.name
from publicsuffixlist import PublicSuffixList

from backend.auth.results import DKIMVerdict, DMARCVerdict, SPFVerdict
from backend.dns.lookup import DNSTempError
from backend.dns.parse import DMARCRecord, ParseError, is_dmarc_record, parse_dmarc
from backend.smtp.message import from_addresses

# RFC 7489 6.6.4: a message left out of the pct sample gets the next policy down.
_STEP_DOWN = {"reject": "quarantine", "quarantine": "none", "none": "none"}


class MultipleFrom(ValueError):
    """The From header names addresses in more than one domain (RFC 7489 6.6.1): DMARC cannot say
    which one the reader trusts, so the message is refused as invalid rather than evaluated."""


@functools.cache
def _psl() -> PublicSuffixList:
    # One instance per process: building it parses the whole bundled list (tens of ms).
    return PublicSuffixList()


def normalize_domain(domain: str) -> str:
    """Lower case, no trailing dot, U-labels as A-labels (IDNA 2008 via dnspython). A name that is
    not valid IDNA is kept as given (lower-cased): it then aligns only with itself."""
    d = domain.strip().rstrip(".").lower()
    if d.isascii():
        return d
    try:
        return dns.name.from_unicode(d).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return d


def org_domain(domain: str) -> str:
    """The Organizational Domain (RFC 7489 3.2): the public suffix of ``domain`` plus one label, by
    the Public Suffix List (ICANN and private sections; a TLD unknown to the list counts as a public
    suffix, the list's "*" rule). A domain that is itself a public suffix is its own organizational
    domain. Returned normalized (see ``normalize_domain``)."""
    d = normalize_domain(domain)
    return _psl().privatesuffix(d) or d


def aligned(identifier_domain: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1.1, 3.1.2): strict ("s") needs the same domain, relaxed
    ("r", the default) the same organizational domain."""
    ident, frm = normalize_domain(identifier_domain), normalize_domain(from_domain)
    if not ident or not frm:
        return False
    if mode == "s":
        return ident == frm
    return ident == frm or org_domain(ident) == org_domain(frm)


def from_domain_of(header: bytes) -> str | None:
    """The RFC5322.From domain of a CRLF header block (RFC 7489 6.6.1), normalized.

    None when there is no From field or no address in it has a domain (RFC 5322 3.6 requires one;
    DMARC has nothing to evaluate). Raises MultipleFrom when the addresses of the From field(s) are
    in different domains. Several addresses in one domain give that domain (6.6.1 allows applying
    DMARC to it). The caller refuses both failures as an invalid RFC 5322 message.
    """
    domains = {normalize_domain(a.rpartition("@")[2]) for a in from_addresses(header) or () if "@" in a}
    domains.discard("")
    if len(domains) > 1:
        raise MultipleFrom(f"From names {len(domains)} domains: {', '.join(sorted(domains))}")
    return domains.pop() if domains else None


async def _discover(lookup, domain: str, org: str) -> tuple[str, list[str]]:
    """RFC 7489 6.6.3: the DMARC records at _dmarc.<From domain>, or, when there are none there, at
    _dmarc.<organizational domain>. Returns the domain asked last and the records found there.
    A From domain that is no DNS name raises ParseError (permerror): asking would only fail."""
    if not domain:
        raise ParseError("empty From domain")
    try:
        dns.name.from_text(f"_dmarc.{domain}")
    except dns.exception.DNSException as e:
        raise ParseError(f"From domain {domain!r} is not a DNS name ({e.__class__.__name__})") from None
    records = [t for t in await lookup.txt(f"_dmarc.{domain}") if is_dmarc_record(t)]
    if not records and org != domain:
        return org, [t for t in await lookup.txt(f"_dmarc.{org}") if is_dmarc_record(t)]
    return domain, records


def _policy_for(record: DMARCRecord, record_domain: str, domain: str) -> str:
    # RFC 7489 6.3 sp=: the policy for subdomains of the domain queried, not for the domain itself;
    # it applies only when the record came from the organizational domain fallback.
    if record_domain != domain and record.subdomain_policy is not None:
        return record.subdomain_policy
    return record.policy


async def evaluate_dmarc(
    lookup,
    from_domain: str,
    spf: SPFVerdict | None,
    dkim: Sequence[DKIMVerdict],
    *,
    overrides: Mapping[str, str] = {},
    local_domains: Collection[str] = (),
    rand=random.random,
) -> DMARCVerdict:
    """DMARC for one message: the verdict and what to do with it.

    ``spf`` is the SPF verdict of the MAIL FROM identity (identity "mailfrom"; for a null reverse-path
    RFC 7208 2.4 makes that postmaster@<HELO>, so its domain is the HELO name); a verdict of another
    identity never aligns. ``dkim`` holds every signature's verdict; a pass whose d= aligns counts.

    ``result``: pass (an aligned SPF or DKIM pass), fail, none (no record, or several, RFC 7489
    6.6.3), permerror (a record that does not parse) or temperror (DNS did not answer: ``lookup``
    raised DNSTempError). ``disposition`` is "none", "quarantine" or "reject":

    - on fail, the published policy (sp= for a subdomain when the record is the organizational
      domain's, else p=), sampled by pct= (6.6.4: ``rand() * 100 < pct`` applies it, otherwise the
      next policy down: reject → quarantine, quarantine → none);
    - on fail, a local override for the From domain or its organizational domain ("none",
      "quarantine" or "reject", for senders whose authentication is broken) replaces that, and is
      named in ``override``;
    - own-domain protection: when the From domain or its organizational domain is in
      ``local_domains`` and the message has no aligned pass (DMARC pass when our record was found;
      a relaxed-aligned SPF or DKIM pass when it was not), the disposition is "reject" whatever is
      published and whatever the overrides say, with a reason starting "own domain";
    - temperror gives "none": the caller decides. RFC 7489 names no reply for it; a caller that
      defers would use ``451 4.7.1`` (RFC 3463 3.8; RFC 7372 registers 4.7.24 for an SPF temperror
      and nothing for DMARC). homemx's inbound checks accept and record it (auth/inbound.py,
      docs/inbound-trust.md: a forger cannot make another domain's DNS fail, and a DNS outage at
      home must not hold all inbound mail).
      Own-domain protection still rejects a temperror without even a relaxed-aligned pass (no record
      could make such a message pass).
    """
    domain = normalize_domain(from_domain)
    org = org_domain(domain)

    def spf_aligned(mode: str) -> bool:
        return spf is not None and spf.identity == "mailfrom" and spf.result == "pass" and aligned(spf.domain, domain, mode)

    def dkim_aligned(mode: str) -> bool:
        return any(v.result == "pass" and aligned(v.domain, domain, mode) for v in dkim)

    relaxed = (spf_aligned("r"), dkim_aligned("r"))
    record: DMARCRecord | None = None
    policy = "none"
    try:
        record_domain, texts = await _discover(lookup, domain, org)
    except DNSTempError as e:
        result, reason = "temperror", f"DMARC record lookup: {e}"
    except ParseError as e:
        result, reason = "permerror", str(e)
    else:
        if not texts:
            result, reason = "none", f"no DMARC record at _dmarc.{domain}" + (f" or _dmarc.{org}" if org != domain else "")
        elif len(texts) > 1:
            result, reason = "none", f"{len(texts)} DMARC records at _dmarc.{record_domain} (RFC 7489 6.6.3: none applies)"
        else:
            try:
                record = parse_dmarc(texts[0], receiver=True)
            except ParseError as e:
                result, reason = "permerror", f"DMARC record at _dmarc.{record_domain}: {e}"
    if record is not None:
        spf_ok, dkim_ok = spf_aligned(record.aspf), dkim_aligned(record.adkim)
        result = "pass" if spf_ok or dkim_ok else "fail"
        policy = _policy_for(record, record_domain, domain)
        passed = [n for n, ok in (("spf", spf_ok), ("dkim", dkim_ok)) if ok]
        reason = f"aligned {' and '.join(passed)} pass" if passed else f"no aligned SPF (aspf={record.aspf}) or DKIM (adkim={record.adkim}) pass"
        reason += "".join(f"; {n}" for n in record.notes)
    else:
        spf_ok, dkim_ok = relaxed

    disposition, override = "none", None
    if result == "fail":
        disposition = policy
        if policy != "none" and record.pct < 100 and not rand() * 100 < record.pct:
            disposition = _STEP_DOWN[policy]
            reason += f"; outside pct={record.pct} sample: {policy} applied as {disposition}"
        local = {normalize_domain(k): v for k, v in overrides.items()}
        for key in (domain, org):
            if key in local:
                override = disposition = local[key]
                reason += f"; local override for {key}: {override}"
                break

    own = {normalize_domain(d) for d in local_domains}
    if domain in own or org in own:
        authenticated = result == "pass" if record is not None else any(relaxed)
        if not authenticated:
            disposition, override = "reject", None
            reason = f"own domain {domain} without an aligned SPF or DKIM pass ({reason})"

    return DMARCVerdict(
        result=result,
        from_domain=domain,
        org_domain=org,
        policy=policy,
        disposition=disposition,
        aligned_spf=spf_ok,
        aligned_dkim=dkim_ok,
        reason=reason,
        override=override,
    )
