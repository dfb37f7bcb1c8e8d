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


# SPF (RFC 7208 4.5, 4.6.1, 5, 6, 7.1, 12): record = version terms *SP; term = directive / modifier.
# Every syntax error anywhere in the record is a permerror, even after a matching mechanism (4.6).
SPF_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_SPF_VERSION_RE = re.compile(r"^v=spf1( |$)", re.IGNORECASE)  # 4.5: "v=spf1" then a space or the end
_MODIFIER_RE = re.compile(r"^([A-Za-z][A-Za-z0-9\-_.]*)=(.*)$")  # name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." )
_DIRECTIVE_RE = re.compile(r"^([+\-~?]?)([A-Za-z0-9]+)(.*)$")
# dual-cidr-length = [ ip4-cidr-length ] [ "/" ip6-cidr-length ], at the end of a (or mx) [":" domain-spec].
_DUAL_CIDR_RE = re.compile(r"^(.*?)(?:/(\d+))?(?://(\d+))?$", re.DOTALL)
_CIDR_RE = re.compile(r"^(?:0|[1-9][0-9]*)$")  # 5.6: no leading zeros (as in ip4-network)
_MACRO_EXPAND_RE = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
# toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
SPF_TOPLABEL_RE = re.compile(r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9])")
_DOMAIN_END_RE = re.compile(r"\." + SPF_TOPLABEL_RE.pattern + r"\.?$")
SPF_MACRO_LETTERS = "slodiphv"  # 7.2; c, r and t only in explanation text (7.3)
SPF_EXPLANATION_LETTERS = SPF_MACRO_LETTERS + "crt"


@dataclass(frozen=True)
class SPFMacro:
    """One macro-expand (RFC 7208 7.1): %{letter digits r delimiters}, or the escapes %% %_ %-
    (``letter`` is then "%", "_" or "-"). ``escape``: the letter was upper case, so the value is
    URL-escaped (7.3)."""

    letter: str
    digits: int | None = None
    reverse: bool = False
    delimiters: str = ""
    escape: bool = False


def parse_macro_string(text: str, *, explanation: bool = False) -> tuple[str | SPFMacro, ...]:
    """A macro-string (RFC 7208 7.1) as literal text and macros; ``explanation``: an explanation-string
    (the TXT record exp= names), where spaces and the c, r, t macros are allowed too."""
    tokens: list[str | SPFMacro] = []
    letters = SPF_EXPLANATION_LETTERS if explanation else SPF_MACRO_LETTERS
    i = 0
    while i < len(text):
        if text[i] != "%":
            # macro-literal = %x21-24 / %x26-7E (visible characters except "%")
            if not ("!" <= text[i] <= "~" or (explanation and text[i] == " ")):
                raise ParseError(f"character {text[i]!r} at {i} of {text!r} (RFC 7208 7.1)")
            tokens.append(text[i])
            i += 1
            continue
        if text[i + 1 : i + 2] in ("%", "_", "-"):
            tokens.append(SPFMacro(text[i + 1]))
            i += 2
            continue
        m = _MACRO_EXPAND_RE.match(text, i)
        if not m:
            raise ParseError(f"'%' not followed by '{{', '%', '-' or '_' at {i} of {text!r} (RFC 7208 7.1)")
        letter, digits, reverse, delimiters = m.groups()
        if letter.lower() not in letters:
            where = "outside explanation text" if letter.lower() in SPF_EXPLANATION_LETTERS else "unknown"
            raise ParseError(f"macro letter {letter!r} {where} in {text!r} (RFC 7208 7.2, 7.3)")
        if digits and int(digits) == 0:
            raise ParseError(f"macro digit transformer 0 in {text!r} (RFC 7208 7.3)")
        tokens.append(SPFMacro(letter.lower(), int(digits) if digits else None, bool(reverse), delimiters, letter.isupper()))
        i = m.end()
    # Adjacent literal characters as one string.
    merged: list[str | SPFMacro] = []
    for t in tokens:
        if isinstance(t, str) and merged and isinstance(merged[-1], str):
            merged[-1] += t
        else:
            merged.append(t)
    return tuple(merged)


def parse_domain_spec(text: str) -> str:
    """Check a domain-spec (RFC 7208 7.1): macro-string domain-end, where domain-end is
    "." toplabel ["."] or a macro-expand. Returns it unchanged (it is expanded per check)."""
    tokens = parse_macro_string(text)
    if not tokens:
        raise ParseError("empty domain-spec (RFC 7208 7.1)")
    if isinstance(tokens[-1], str) and not _DOMAIN_END_RE.search(tokens[-1]):
        raise ParseError(f"{text!r} does not end in '.' and a valid top label or in a macro (RFC 7208 7.1)")
    return text


def _cidr(digits: str | None, limit: int, term: str) -> int | None:
    if digits is None:
        return None
    if not _CIDR_RE.match(digits) or int(digits) > limit:
        raise ParseError(f"prefix length /{digits} in {term!r} (RFC 7208 5.6: 0 to {limit}, no leading zero)")
    return int(digits)


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


def is_spf_record(text: str) -> bool:
    """Whether a TXT string is an SPF record at all (RFC 7208 4.5: "v=spf1", then a space or the end)."""
    return _SPF_VERSION_RE.match(text) is not None


def _parse_directive(word: str) -> SPFTerm:
    m = _DIRECTIVE_RE.match(word)
    mech = m.group(2).lower() if m else ""
    if mech not in SPF_MECHANISMS:
        raise ParseError(f"unknown mechanism {word!r} (RFC 7208 5)")
    qualifier, rest = _QUALIFIERS.get(m.group(1), "pass"), m.group(3)
    if mech == "all":
        if rest:
            raise ParseError(f"{word!r}: all takes no argument (RFC 7208 5.1)")
        return SPFTerm(qualifier, mech)
    if mech in ("include", "exists"):
        if not rest.startswith(":"):
            raise ParseError(f"{word!r}: {mech} needs ':' and a domain (RFC 7208 5.2, 5.7)")
        return SPFTerm(qualifier, mech, parse_domain_spec(rest[1:]))
    if mech == "ptr":
        if rest and not rest.startswith(":"):
            raise ParseError(f"{word!r}: ptr takes only ':' and a domain (RFC 7208 5.5)")
        return SPFTerm(qualifier, mech, parse_domain_spec(rest[1:]) if rest else None)
    if mech in ("a", "mx"):
        spec, c4, c6 = _DUAL_CIDR_RE.match(rest).groups()
        if spec and not spec.startswith(":"):
            raise ParseError(f"{word!r}: {mech} takes ':' and a domain, then prefix lengths (RFC 7208 5.3, 5.4)")
        domain_spec = parse_domain_spec(spec[1:]) if spec else None
        return SPFTerm(qualifier, mech, domain_spec, _cidr(c4, 32, word), _cidr(c6, 128, word))
    # ip4 / ip6 (5.6): ":" address, then at most one prefix length of that family.
    m_ip = re.match(r"^:([^/]*)(?:/(\d+))?$", rest)
    if not m_ip:
        raise ParseError(f"{word!r}: {mech} takes ':' an address and one '/' prefix length (RFC 7208 5.6)")
    version = 4 if mech == "ip4" else 6
    try:
        address = ipaddress.IPv4Address(m_ip.group(1)) if version == 4 else ipaddress.IPv6Address(m_ip.group(1))
    except ValueError:
        raise ParseError(f"{word!r}: not an IPv{version} address (RFC 7208 5.6)") from None
    if address.version == 6 and address.scope_id is not None:
        raise ParseError(f"{word!r}: not an IPv6 address (RFC 7208 5.6)")
    plen = _cidr(m_ip.group(2), address.max_prefixlen, word)
    network = ipaddress.ip_network(f"{address}/{address.max_prefixlen if plen is None else plen}", strict=False)
    return SPFTerm(qualifier, mech, network=network)


def parse_spf(text: str) -> SPFRecord:
    """Parse one SPF record (RFC 7208 4.5, 4.6.1, 12). Any syntax error raises ParseError saying
    which term and why (check_host's permerror)."""
    if not is_spf_record(text):
        raise ParseError("does not start with v=spf1 (RFC 7208 4.5)")
    # 3.1 / 4.6.1: seven-bit ASCII, terms separated by spaces only (no tabs or other controls).
    bad = re.search(r"[^\x20-\x7e]", text)
    if bad:
        raise ParseError(f"character {bad.group()!r} at {bad.start()} (RFC 7208 3.1, 4.6.1: ASCII and spaces only)")
    terms: list[SPFTerm] = []
    modifiers: dict[str, str] = {}
    for word in text.split(" ")[1:]:
        if not word:
            continue  # 1*SP between terms, trailing spaces allowed (4.5)
        m = _MODIFIER_RE.match(word)
        if not m:
            terms.append(_parse_directive(word))
            continue
        name, value = m.group(1).lower(), m.group(2)
        if name in ("redirect", "exp"):
            # 6: at most once each; their value is a domain-spec (6.1, 6.2).
            if name in modifiers:
                raise ParseError(f"{name}= appears twice (RFC 7208 6)")
            modifiers[name] = parse_domain_spec(value)
        else:
            parse_macro_string(value)  # unknown-modifier = name "=" macro-string; otherwise ignored (6)
    return SPFRecord(tuple(terms), modifiers.get("redirect"), modifiers.get("exp"))
