"""The verdicts of the inbound checks, as the checks return them and Authentication-Results
(RFC 8601) reports them: one small record per method, no behaviour.

Results use RFC 8601 2.7 / RFC 7208 2.6 / RFC 6376 / RFC 7489 / RFC 8617 names, lower case:
  spf:   pass fail softfail neutral none temperror permerror
  dkim:  pass fail neutral policy none temperror permerror
  dmarc: pass fail none temperror permerror
  arc:   pass fail none
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SPFVerdict:
    """check_host for one identity: ``identity`` is "mailfrom" or "helo"; ``domain`` the domain
    checked (the MAIL FROM domain, or the HELO name); ``explanation`` the exp= text on fail."""

    identity: str
    domain: str
    result: str
    reason: str = ""
    explanation: str | None = None


@dataclass(frozen=True)
class DKIMVerdict:
    """One DKIM-Signature: its d= and s=, the algorithm, the first bytes of b= (RFC 8601 header.b,
    to tell two signatures of one domain apart), the key size, and the result with a reason."""

    domain: str
    selector: str
    result: str
    reason: str = ""
    algorithm: str = ""
    header_b: str = ""
    key_bits: int | None = None
    identity: str = ""  # i= (or @d when absent)
    body_length: int | None = None  # l=: the signature covers only this much of the body (RFC 6376 8.2)


@dataclass(frozen=True)
class ARCVerdict:
    """The ARC chain (RFC 8617 5.2): its result, the highest instance, and why on fail."""

    result: str
    instances: int = 0
    reason: str = ""


@dataclass(frozen=True)
class DMARCVerdict:
    """RFC 7489 for the RFC5322.From domain: ``result`` pass/fail/none/temperror/permerror;
    ``policy`` the published policy that applies (p, or sp for a subdomain), ``disposition`` what
    the receiver does after pct and local overrides ("none", "quarantine" or "reject");
    ``aligned_spf``/``aligned_dkim`` which identifiers passed and aligned."""

    result: str
    from_domain: str
    org_domain: str = ""
    policy: str = "none"
    disposition: str = "none"
    aligned_spf: bool = False
    aligned_dkim: bool = False
    reason: str = ""
    override: str | None = None  # the local per-domain override that applied, if any


@dataclass(frozen=True)
class SpamVerdict:
    """What the spam filter (rspamd) said: its action ("no action", "add header", "rewrite subject",
    "greylist", "soft reject", "reject"), score, symbols, and whether it was reachable at all."""

    action: str
    score: float = 0.0
    required_score: float = 0.0
    symbols: tuple[str, ...] = ()
    available: bool = True
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = field(default=())  # headers the filter asks us to add


@dataclass(frozen=True)
class Envelope:
    """What the checks need to know of the message besides its bytes."""

    listener: str
    client_ip: str
    helo: str
    sender: str
    recipients: tuple[str, ...]
    auth_user: str | None
    queue_id: str
