"""Pure DNS record parsing and SPF evaluation (RFC 7208) over a table of records (no sockets)."""

from __future__ import annotations

import base64

import pytest

from backend.dns.lookup import AsyncOverBlocking, DNSTempError
from backend.dns.parse import ParseError, parse_dkim_txt, parse_dmarc, parse_spf
from backend.dns.spf import check_host, client_address, expand_macros, macro_values


IP = "203.0.113.5"


class TableLookup:
    """The DNSLookup interface over a dict {(name, type): [values]}; 'SERVFAIL' raises a temp error."""

    def __init__(self, table):
        self.table = {(n.rstrip(".").lower(), t): v for (n, t), v in table.items()}
        self.asked = []

    def _get(self, name, rtype):
        self.asked.append((name, rtype))
        v = self.table.get((name.rstrip(".").lower(), rtype), [])
        if v == "SERVFAIL":
            raise DNSTempError(f"{rtype} {name}: SERVFAIL")
        return list(v)

    def txt(self, name):
        return self._get(name, "TXT")

    def a(self, name):
        return self._get(name, "A")

    def aaaa(self, name):
        return self._get(name, "AAAA")

    def addresses(self, name):
        return self.a(name) + self.aaaa(name)

    def mx(self, name):
        return self._get(name, "MX")

    def ptr(self, address):
        return self._get(address, "PTR")


async def spf(table, ip=IP, domain="d.test", sender=None, helo=None):
    """check_host over a table of records (the engine is async; the table answers at once)."""
    return await check_host(AsyncOverBlocking(TableLookup(table)), ip, domain, sender, helo)


@pytest.mark.parametrize(
    "records, result",
    [
        ({("d.test", "TXT"): [f"v=spf1 ip4:{IP} -all"]}, "pass"),
        ({("d.test", "TXT"): ["v=spf1 ip4:203.0.113.0/24 -all"]}, "pass"),
        ({("d.test", "TXT"): ["v=spf1 ip4:198.51.100.1 -all"]}, "fail"),
        ({("d.test", "TXT"): ["v=spf1 ip4:198.51.100.1 ~all"]}, "softfail"),
        ({("d.test", "TXT"): ["v=spf1 ip4:198.51.100.1"]}, "neutral"),
        ({("d.test", "TXT"): ["some other text"]}, "none"),
        ({("d.test", "TXT"): ["v=spf1 -all", "v=spf1 +all"]}, "permerror"),  # two records
        ({("d.test", "TXT"): ["v=spf1 foo:bar -all"]}, "permerror"),  # unknown mechanism
        ({("d.test", "TXT"): "SERVFAIL"}, "temperror"),
        ({("d.test", "TXT"): ["v=spf1 a -all"], ("d.test", "A"): [IP]}, "pass"),
        ({("d.test", "TXT"): ["v=spf1 a:h.d.test/24 -all"], ("h.d.test", "A"): ["203.0.113.99"]}, "pass"),
        ({("d.test", "TXT"): ["v=spf1 mx -all"], ("d.test", "MX"): [(10, "mx.d.test.")], ("mx.d.test", "A"): [IP]}, "pass"),
        ({("d.test", "TXT"): ["v=spf1 include:o.test -all"], ("o.test", "TXT"): [f"v=spf1 ip4:{IP} -all"]}, "pass"),
        # include whose result is fail means "no match": evaluation continues to -all.
        ({("d.test", "TXT"): ["v=spf1 include:o.test -all"], ("o.test", "TXT"): ["v=spf1 -all"]}, "fail"),
        # include of a domain without SPF is a permerror (RFC 7208 5.2).
        ({("d.test", "TXT"): ["v=spf1 include:o.test -all"]}, "permerror"),
        ({("d.test", "TXT"): ["v=spf1 redirect=o.test"], ("o.test", "TXT"): [f"v=spf1 ip4:{IP} -all"]}, "pass"),
        ({("d.test", "TXT"): ["v=spf1 redirect=o.test"]}, "permerror"),  # redirect target has no SPF
        # redirect is ignored when all is present (RFC 7208 6.1).
        ({("d.test", "TXT"): ["v=spf1 -all redirect=o.test"], ("o.test", "TXT"): [f"v=spf1 ip4:{IP} -all"]}, "fail"),
        ({("d.test", "TXT"): ["v=spf1 exists:%{ir}.bl.test -all"], ("5.113.0.203.bl.test", "A"): ["127.0.0.2"]}, "pass"),
        ({("d.test", "TXT"): ["v=spf1 ip6:2001:db8::/32 -all"]}, "fail"),  # wrong family never matches
        # A syntax error anywhere is a permerror, even after a match (RFC 7208 4.6); the engine
        # used to raise AttributeError on a bare ip4 (and crash `dns check` with it).
        ({("d.test", "TXT"): ["v=spf1 ip4 -all"]}, "permerror"),
        ({("d.test", "TXT"): [f"v=spf1 ip4:{IP} a:%{{z}}.d.test"]}, "permerror"),
        # ":" and "/" may appear inside a domain-spec (RFC 7208 7.1).
        ({("d.test", "TXT"): ["v=spf1 a:x:y/z.d.test/24 -all"], ("x:y/z.d.test", "A"): ["203.0.113.1"]}, "pass"),
    ],
)
@pytest.mark.asyncio
async def test_check_host_results(records, result):
    r = await spf(records)
    assert r.result == result, r.reason


@pytest.mark.asyncio
async def test_ten_lookups_pass_eleven_are_a_permerror():
    def table(n):
        t = {(f"i{i}.test", "TXT"): ["v=spf1 -all"] for i in range(n)}
        t[("d.test", "TXT")] = ["v=spf1 " + " ".join(f"include:i{i}.test" for i in range(n)) + f" ip4:{IP} -all"]
        return t

    ok = await spf(table(10))
    assert ok.result == "pass" and ok.lookups == 10
    bad = await spf(table(11))
    assert bad.result == "permerror" and "more than 10 DNS lookups" in bad.reason


@pytest.mark.asyncio
async def test_nested_lookups_count_towards_the_limit():
    t = {("d.test", "TXT"): ["v=spf1 include:a.test include:b.test -all"]}
    t[("a.test", "TXT")] = ["v=spf1 " + " ".join(f"a:x{i}.test" for i in range(5)) + " -all"]
    t[("b.test", "TXT")] = ["v=spf1 " + " ".join(f"mx:y{i}.test" for i in range(4)) + f" ip4:{IP}"]
    for i in range(5):
        t[(f"x{i}.test", "A")] = ["192.0.2.1"]
    for i in range(4):
        t[(f"y{i}.test", "MX")] = [(10, f"m{i}.test.")]
        t[(f"m{i}.test", "A")] = ["192.0.2.1"]
    r = await spf(t)
    assert r.result == "permerror"  # 2 includes + 5 a + 4 mx = 11


@pytest.mark.asyncio
async def test_more_than_two_void_lookups_are_a_permerror():
    t = {("d.test", "TXT"): ["v=spf1 a:v1.test a:v2.test a:v3.test ip4:" + IP + " -all"]}
    r = await spf(t)
    assert r.result == "permerror" and "void" in r.reason
    t = {("d.test", "TXT"): ["v=spf1 a:v1.test a:v2.test ip4:" + IP + " -all"]}
    assert (await spf(t)).result == "pass"


@pytest.mark.asyncio
async def test_include_loop_is_a_permerror():
    t = {("d.test", "TXT"): ["v=spf1 include:d.test -all"]}
    assert (await spf(t)).result == "permerror"


def test_parse_spf_terms_and_modifiers():
    rec = parse_spf("v=spf1 ip4:192.0.2.0/24 ~a:h.test/28//64 -mx ?include:o.test redirect=r.test unknown=x")
    assert [(t.qualifier, t.mechanism) for t in rec.terms] == [("pass", "ip4"), ("softfail", "a"), ("fail", "mx"), ("neutral", "include")]
    assert rec.terms[1].domain_spec == "h.test" and rec.terms[1].cidr4 == 28 and rec.terms[1].cidr6 == 64
    assert rec.redirect == "r.test"
    for bad in ("v=spf2 -all", "v=spf1 ip4:300.1.1.1", "v=spf1 ip4:2001:db8::1", "v=spf1 redirect=a redirect=b", "v=spf1 a/33", "v=spf1 include"):
        with pytest.raises(ParseError):
            parse_spf(bad)


def test_macro_expansion():
    def values(domain="d.test", ip="192.0.2.3"):
        return macro_values(client_address(ip), "u-v@s.test", domain, "helo.test")

    assert expand_macros("%{ir}.%{v}._spf.%{d}", values()) == "3.2.0.192.in-addr._spf.d.test"
    assert expand_macros("%{d2}", values("a.b.d.test")) == "d.test"
    assert expand_macros("%{l}.%{o}.%{h}", values()) == "u-v.s.test.helo.test"
    assert expand_macros("%{lr-}.%{L}%%%_%-", values()) == "v.u.u-v% %20"
    assert expand_macros("%{S}", values()) == "u-v%40s.test"  # upper case: URL-escaped (RFC 7208 7.3)
    # An IPv4-mapped client is its IPv4 address (RFC 7208 5); IPv6 gives nibbles and "ip6".
    assert expand_macros("%{i}.%{v}", values(ip="::ffff:192.0.2.3")) == "192.0.2.3.in-addr"
    assert expand_macros("%{ir}.%{v}", values(ip="2001:db8::1")).endswith(".8.B.D.0.1.0.0.2.ip6")
    for bad in ("%{c}", "%{z}", "%{d0}", "%x", "50%"):  # c only in exp text; unknown letter; 0 digits
        with pytest.raises(ParseError):
            expand_macros(bad, values())
    assert expand_macros("%{c} from %{r}", values(), explanation=True) == "192.0.2.3 from unknown"


@pytest.mark.asyncio
async def test_explanation_on_fail_and_helo_macro():
    t = {
        ("d.test", "TXT"): ["v=spf1 a:%{h} -all exp=why.%{d}"],
        ("helo.test", "A"): ["192.0.2.9"],
        ("why.d.test", "TXT"): ["%{i} is not %{h}, ask %{l}@%{o}"],
    }
    r = await spf(t, sender="bob@d.test", helo="helo.test")
    assert (r.result, r.explanation) == ("fail", f"{IP} is not helo.test, ask bob@d.test")
    assert (await spf(t, ip="192.0.2.9", helo="helo.test")).result == "pass"
    # A result other than fail has no explanation (RFC 7208 6.2).
    t[("d.test", "TXT")] = ["v=spf1 ~all exp=why.%{d}"]
    assert (await spf(t)).explanation is None


def test_parse_dmarc():
    r = parse_dmarc("v=DMARC1; p=quarantine; rua=mailto:a@d.test,mailto:b@d.test; adkim=s; pct=50")
    assert (r.policy, r.adkim, r.aspf, r.pct, r.rua) == ("quarantine", "s", "r", 50, ("mailto:a@d.test", "mailto:b@d.test"))
    for bad in ("p=reject; v=DMARC1", "v=DMARC1; rua=mailto:a@d.test", "v=DMARC1; p=block", "v=DMARC1; p=none; adkim=x", "v=DMARC1; p=none; p=reject"):
        with pytest.raises(ParseError):
            parse_dmarc(bad)


def test_parse_dkim_txt():
    key = base64.b64encode(b"\x01" * 32).decode()
    r = parse_dkim_txt(f"v=DKIM1; k=ed25519; p={key}")
    assert r.key_type == "ed25519" and r.public_key == b"\x01" * 32
    assert parse_dkim_txt("p=AAAA").key_type == "rsa"  # k= defaults to rsa
    # Whitespace inside p= (a zone split across strings with spaces) is ignored (RFC 6376 3.6.1).
    assert parse_dkim_txt(f"v=DKIM1; p={key[:10]} {key[10:]}").public_key == b"\x01" * 32
    assert parse_dkim_txt("v=DKIM1; p=").public_key == b""  # revoked
    for bad in ("v=DKIM1; k=dsa; p=AAAA", "v=DKIM2; p=AAAA", "v=DKIM1; k=rsa", "v=DKIM1; p=!!!!", "k=rsa; v=DKIM1; p=AAAA"):
        with pytest.raises(ParseError):
            parse_dkim_txt(bad)
