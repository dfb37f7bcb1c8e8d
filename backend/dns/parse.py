"""Pure parsers of the TXT records a mail domain publishes: SPF (RFC 7208), DKIM keys (RFC 6376,
RFC 8463), DMARC (RFC 7489), and the tag=value lists that MTA-STS (RFC 8461) and TLS-RPT (RFC 8460)
records share with DKIM. No lookups here: text in, a record or ParseError out."""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass


class ParseError(ValueError):
    """The record does not parse; the message says where (for SPF: a permerror)."""


def parse_tags(text: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 3.2; DMARC and MTA-STS use the same shape). Duplicate tags are errors."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise ParseError(f"{part!r} is not tag=value")
        name = name.strip()
        if name in tags:
            raise ParseError(f"duplicate tag {name!r}")
        tags[name] = re.sub(r"\s+", "", value) if name == "p" else value.strip()
    return tags


@dataclass(frozen=True)
class DKIMKeyRecord:
    key_type: str  # rsa | ed25519
    public_key: bytes  # decoded p=; empty means revoked (RFC 6376 3.6.1)


def parse_dkim_txt(text: str) -> DKIMKeyRecord:
    """A DKIM key record (RFC 6376 3.6.1, RFC 8463): v=DKIM1 (optional, first), k= (default rsa), p=."""
    tags = parse_tags(text)
    if "v" in tags and (tags["v"] != "DKIM1" or not text.lstrip().startswith("v")):
        raise ParseError("v= must be DKIM1 and come first")
    if "p" not in tags:
        raise ParseError("no p= tag")
    k = tags.get("k", "rsa").lower()
    if k not in ("rsa", "ed25519"):
        raise ParseError(f"unknown key type k={k}")
    try:
        p = base64.b64decode(tags["p"], validate=True)
    except ValueError:
        raise ParseError("p= is not base64") from None
    return DKIMKeyRecord(k, p)


DMARC_POLICIES = ("none", "quarantine", "reject")
# RFC 7489 6.4: dmarc-version = "v" *WSP "=" *WSP %x44 %x4d %x41 %x52 %x43 %x31 ("DMARC1", case-sensitive).
_DMARC_V_RE = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")
# RFC 7489 6.4: dmarc-uri = URI [ "!" 1*DIGIT [ "k" / "m" / "g" / "t" ] ], the URI with a scheme (RFC 3986 3).
_DMARC_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s!]+(?:![0-9]+[kmgtKMGT]?)?$")


@dataclass(frozen=True)
class DMARCRecord:
    policy: str
    subdomain_policy: str | None
    adkim: str
    aspf: str
    pct: int
    rua: tuple[str, ...]
    notes: tuple[str, ...] = ()  # what a receiver-side parse discarded or replaced, for the verdict's reason


def is_dmarc_record(text: str) -> bool:
    """Whether a TXT string at _dmarc.DOMAIN is a DMARC record at all (RFC 7489 6.6.3 step 3: the
    others are discarded before the records are counted)."""
    return _DMARC_V_RE.match(text) is not None


def parse_dmarc(text: str, *, receiver: bool = False) -> DMARCRecord:
    """A DMARC record (RFC 7489 6.3, 6.4): v=DMARC1 first, then p= and the rest.

    By default every error raises (``dns check`` judging the record we publish). ``receiver=True``
    reads someone else's record as a Mail Receiver must: a missing or invalid p=, or an invalid sp=,
    with at least one valid rua= URI reads as p=none (6.6.3), and without one raises (no DMARC
    processing); an invalid adkim=, aspf= or pct= falls back to its default (6.3: syntax errors in
    the remainder are discarded in favour of default values), named in ``notes``. Either way tag
    values are case-insensitive (ABNF strings, RFC 5234 2.3) and unknown tags are ignored (6.3)."""
    if not is_dmarc_record(text):
        raise ParseError("does not start with v=DMARC1")
    tags = parse_tags(text)
    notes: list[str] = []
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if u.strip())
    p = tags["p"].lower() if "p" in tags else None
    sp = tags["sp"].lower() if "sp" in tags else None
    problem = None
    if p is None:
        problem = "no p= policy"
    elif p not in DMARC_POLICIES:
        problem = f"p={tags['p']} is not none, quarantine or reject"
    elif sp is not None and sp not in DMARC_POLICIES:
        problem = f"sp={tags['sp']} is not none, quarantine or reject"
    if problem:
        if not (receiver and any(_DMARC_URI_RE.match(u) for u in rua)):
            raise ParseError(problem)
        notes.append(f"{problem}: read as p=none (RFC 7489 6.6.3, rua= given)")
        p, sp = "none", None
    modes = {}
    for name in ("adkim", "aspf"):
        value = tags.get(name, "r").lower()
        if value not in ("r", "s"):
            if not receiver:
                raise ParseError(f"{name}={value} is not r or s")
            notes.append(f"{name}={value} ignored (not r or s)")
            value = "r"
        modes[name] = value
    raw_pct = tags.get("pct", "100")
    pct = int(raw_pct) if re.fullmatch(r"[0-9]{1,3}", raw_pct) else 101
    if pct > 100:
        if not receiver:
            raise ParseError(f"pct={raw_pct} is not a number from 0 to 100")
        notes.append(f"pct={raw_pct} ignored (not 0 to 100)")
        pct = 100
    return DMARCRecord(p, sp, modes["adkim"], modes["aspf"], pct, rua, tuple(notes))


# SPF (RFC 7208 4.6.1, 12): term = directive / modifier
SPF_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECH_RE = re.compile(r"^([+\-~?]?)([a-z0-9]+)(?::([^/]+))?(?:/(\d+))?(?://(\d+))?$", re.IGNORECASE)
_IP_MECH_RE = re.compile(r"^([+\-~?]?)(ip4|ip6):([^/]+)(?:/(\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class SPFTerm:
    qualifier: str  # pass/fail/softfail/neutral
    mechanism: str
    domain_spec: str | None = None
    cidr4: int | None = None
    cidr6: int | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@dataclass(frozen=True)
class SPFRecord:
    terms: tuple[SPFTerm, ...]
    redirect: str | None = None
    exp: str | None = None


def parse_spf(text: str) -> SPFRecord:
    """Parse one SPF record (RFC 7208 4.5, 12). Syntax errors raise ParseError (permerror)."""
    words = text.split()
    if not words or words[0].lower() != "v=spf1":
        raise ParseError("does not start with v=spf1")
    terms: list[SPFTerm] = []
    redirect = exp = None
    for w in words[1:]:
        m_name = re.match(r"^([a-z][a-z0-9_.\-]*)=(.*)$", w, re.IGNORECASE)
        if m_name:
            name, value = m_name.group(1).lower(), m_name.group(2)
            # RFC 7208 6: redirect and exp at most once each; unknown modifiers are ignored.
            if name == "redirect":
                if redirect is not None:
                    raise ParseError("redirect= appears twice")
                redirect = value
            elif name == "exp":
                if exp is not None:
                    raise ParseError("exp= appears twice")
                exp = value
            continue
        m_ip = _IP_MECH_RE.match(w)
        if m_ip:
            q, mech, addr, plen = m_ip.groups()
            try:
                ip = ipaddress.ip_address(addr)
                if (ip.version == 4) != (mech.lower() == "ip4"):
                    raise ValueError
                net = ipaddress.ip_network(f"{addr}/{plen or ip.max_prefixlen}", strict=False)
            except ValueError:
                raise ParseError(f"bad address in {w!r}") from None
            terms.append(SPFTerm(_QUALIFIERS.get(q, "pass"), mech.lower(), network=net))
            continue
        m = _MECH_RE.match(w)
        if not m or m.group(2).lower() not in SPF_MECHANISMS:
            raise ParseError(f"unknown mechanism {w!r}")
        q, mech, spec, c4, c6 = m.groups()
        mech = mech.lower()
        if mech in ("include", "exists") and not spec:
            raise ParseError(f"{mech} needs a domain")
        if mech == "all" and (spec or c4 or c6):
            raise ParseError(f"bad {w!r}")
        if c4 is not None and int(c4) > 32 or c6 is not None and int(c6) > 128:
            raise ParseError(f"bad prefix length in {w!r}")
        terms.append(SPFTerm(_QUALIFIERS.get(q, "pass"), mech, spec, int(c4) if c4 else None, int(c6) if c6 else None))
    return SPFRecord(tuple(terms), redirect, exp)
