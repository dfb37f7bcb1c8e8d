"""The RFC 7208 test suite (openspf's rfc7208-tests.yml, release 2014.04, as shipped in the pyspf
2.0.14 sdist: tests/data/spf/) run case by case against our SPF engine (backend/dns/spf.py).

Each scenario's zonedata becomes an in-memory lookup (the blocking DNSLookup interface, made async
by backend.dns.lookup.AsyncOverBlocking) that answers the way a resolver would, following the
conventions of pyspf's own driver (test/testspf.py):
- RFC 7208 dropped the SPF RR type (3.1), so only TXT is ever asked. A name's "SPF:" entries are
  copied to TXT when the name has no "TXT:" entry at all ("TXT: NONE" is an entry that says "no TXT").
- "TIMEOUT" met before any record of the asked type: DNSTempError (a SERVFAIL or a timeout).
- A name that is present but has no record of the asked type: NODATA (``[]``); an absent name: NXDOMAIN
  (``[]``); a CNAME is followed (a loop is a resolver error: DNSTempError).
- A name dnspython could not even put in a query (an empty label, a label over 63 octets, over 253
  octets) raises DNSTempError, as backend.dns.lookup does when dnspython refuses it: the engine must
  not ask for such names (RFC 7208 4.3, 4.8).

A case passes when our result is one of the case's results and, where the case names an
explanation, ours is that text; "DEFAULT" (the driver's default explanation) means no exp= text.

The same zones also serve `dns check` (check_spf) for every domain that publishes a record in the
suite: none may crash it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import dns.reversename
import pytest
import yaml

from backend.config import config_from_dict
from backend.dns.check import check_spf
from backend.dns.lookup import AsyncOverBlocking, DNSTempError
from backend.dns.parse import SPF_RESULTS
from backend.dns.spf import check_host

SUITE = Path(__file__).parent.parent / "data" / "spf" / "rfc7208-tests.yml"
SUITE_CASES = 203  # the suite's count; pyspf 2.0.14 passes all of them


def _zone(zonedata: dict) -> dict[str, list]:
    """Zonedata as {lower-case name: [(type, value) or "TIMEOUT", ...]} in the suite's order."""
    zone = {}
    for name, rrs in zonedata.items():
        entries: list = []
        spf_as_txt: list = []
        has_txt = False
        for rr in rrs:
            if rr == "TIMEOUT":
                entries.append(rr)
                continue
            ((rtype, value),) = rr.items()
            if rtype == "SPF":
                spf_as_txt.append(("TXT", value))
                continue  # never asked: RFC 7208 3.1
            has_txt = has_txt or rtype == "TXT"
            if value != "NONE":
                entries.append((rtype, value))
        if not has_txt:
            entries += spf_as_txt
        zone[name.lower()] = entries
    return zone


class SuiteZone:
    """The DNSLookup interface over one scenario's zone (see the module docstring)."""

    def __init__(self, zone: dict[str, list]):
        self.zone = zone

    def _answer(self, name: str, rtype: str, cnames: int = 0) -> list:
        bare = name[:-1] if name.endswith(".") else name
        labels = bare.split(".")
        if not bare or any(not 0 < len(label) <= 63 for label in labels) or len(bare) > 253:
            raise DNSTempError(f"{rtype} {name}: dnspython refuses this name")
        found = []
        for entry in self.zone.get(bare.lower(), []):
            if entry == "TIMEOUT":
                if not found:
                    raise DNSTempError(f"{rtype} {name}: timeout")
                break
            t, value = entry
            if t == rtype:
                found.append(value)
            elif t == "CNAME":
                if cnames >= 8:
                    raise DNSTempError(f"{rtype} {name}: CNAME loop")
                return self._answer(value, rtype, cnames + 1)
        return found

    def txt(self, name):
        # RFC 7208 3.3: the strings of one TXT record are joined with nothing between them.
        return [v if isinstance(v, str) else "".join(v) for v in self._answer(name, "TXT")]

    def a(self, name):
        return [str(ipaddress.IPv4Address(v)) for v in self._answer(name, "A")]

    def aaaa(self, name):
        return [str(ipaddress.IPv6Address(v)) for v in self._answer(name, "AAAA")]

    def addresses(self, name):
        return self.a(name) + self.aaaa(name)

    def mx(self, name):
        # As dnspython gives exchanges: absolute, so the null MX (RFC 7505) reads ".".
        return sorted((pref, host.rstrip(".") + ".") for pref, host in self._answer(name, "MX"))

    def ptr(self, address):
        # Names as the server wrote them (any case): the engine compares them case-insensitively.
        return [v.rstrip(".") + "." for v in self._answer(dns.reversename.from_address(address).to_text(), "PTR")]


@dataclass(frozen=True)
class SuiteCase:
    id: str  # "scenario/test"
    host: str
    mailfrom: str
    helo: str
    results: tuple[str, ...]
    explanation: str | None
    zone: dict


def load_suite(path: Path = SUITE) -> list[SuiteCase]:
    cases = []
    with open(path, encoding="utf-8") as f:
        for scenario in yaml.safe_load_all(f):
            name = re.sub(r"[^a-z0-9]+", "-", scenario["description"].lower()).strip("-")
            zone = _zone(scenario["zonedata"])
            for test, data in scenario["tests"].items():
                result = data["result"]
                results = tuple(result) if isinstance(result, list) else (result,)
                cases.append(
                    SuiteCase(f"{name}/{test}", data["host"], data["mailfrom"], data["helo"], results, data.get("explanation"), zone)
                )
    return cases


CASES = load_suite()


def test_the_whole_suite_is_collected():
    # A yml that failed to load, or a scenario lost on the way, must not pass as "no failures".
    assert len(CASES) == SUITE_CASES
    assert len({c.id for c in CASES}) == SUITE_CASES


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_rfc7208_case(case: SuiteCase):
    # The MAIL FROM identity as the suite means it: a null reverse-path checks postmaster@HELO (RFC 7208 2.4).
    sender = case.mailfrom or f"postmaster@{case.helo}"
    lookup = AsyncOverBlocking(SuiteZone(case.zone))
    r = await check_host(lookup, case.host, sender.rpartition("@")[2], sender, helo=case.helo)
    assert r.result in case.results, f"{r.result} ({r.reason}), want {' or '.join(case.results)}"
    if case.explanation is not None:
        assert r.explanation == (None if case.explanation == "DEFAULT" else case.explanation)


def test_dns_check_reports_every_record_of_the_suite(tmp_path):
    # `dns check` evaluates our own domains' records with the same engine; "v=spf1 ip4 -all" used to
    # crash it with an AttributeError. Each domain that publishes a record in the suite, checked
    # for an IPv4 and an IPv6 gateway address: one line each, with an RFC 7208 result.
    raw = {
        "server": {"hostname": "mail.example.org", "data_dir": str(tmp_path / "data")},
        "users": {"passwd_file": str(tmp_path / "passwd")},
        "domain": {"example.org": {}},
        "listener": [{"name": "lan", "kind": "lan", "listen": "127.0.0.1:0"}],
        "gateway": {"public_ipv4": ["1.2.3.4"], "public_ipv6": ["cafe:babe::1"]},
    }
    config = config_from_dict(raw, tmp_path / "backend.toml")
    zones = {id(c.zone): c.zone for c in CASES}.values()
    checked = 0
    for zone in zones:
        for domain, entries in zone.items():
            if not any(e != "TIMEOUT" and e[0] == "TXT" for e in entries):
                continue
            lines = check_spf(config, SuiteZone(zone), domain)
            assert [label for label, _, _ in lines] == [f"SPF {domain} 1.2.3.4", f"SPF {domain} cafe:babe::1"]
            for _, ok, detail in lines:
                assert detail.split(" ", 1)[0] in SPF_RESULTS and ok == detail.startswith("pass "), detail
            checked += 1
    assert checked > 150  # every TXT-publishing name of every scenario, not a vacuous loop
