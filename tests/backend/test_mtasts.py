"""MTA-STS pieces (RFC 8461) without sockets: TXT and policy parsing, MX matching, cache behaviour."""

from __future__ import annotations

import dns.resolver
import pytest

from backend.deliver import mtasts
from tests.lab.mtasts import POLICY, TableResolver


def test_parse_txt():
    assert mtasts.parse_txt(["v=STSv1; id=20160831085700Z"]) == "20160831085700Z"
    assert mtasts.parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert mtasts.parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # RFC 8461 3.1: more than one
    assert mtasts.parse_txt(["v=STSv1; id=bad-id!"]) is None
    assert mtasts.parse_txt(["v=STSv10; id=abc"]) is None
    assert mtasts.parse_txt([]) is None


def test_parse_policy():
    p = mtasts.parse_policy(POLICY, "id1", 100.0)
    assert (p.mode, p.mx, p.max_age, p.id) == ("enforce", ("mail.example.net", "*.example.net"), 604800, "id1")
    assert p.expires() == 100.0 + 604800
    assert mtasts.parse_policy("version: STSv1\nmode: none\nmax_age: 1\n").mode == "none"
    assert mtasts.parse_policy(POLICY.replace("604800", "9999999999")).max_age == mtasts.MAX_AGE_LIMIT  # 1*10DIGIT, capped at a year


@pytest.mark.parametrize(
    "text",
    [
        "mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # enforce without mx
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n",
        "<html>not a policy</html>",
    ],
)
def test_bad_policies_are_refused(text):
    with pytest.raises(mtasts.MTASTSError):
        mtasts.parse_policy(text)


@pytest.mark.parametrize(
    "pattern, host, ok",
    [
        ("mail.example.net", "mail.example.net", True),
        ("mail.example.net", "MAIL.example.net.", True),
        ("*.example.net", "mx1.example.net", True),
        ("*.example.net", "example.net", False),
        ("*.example.net", "a.b.example.net", False),  # RFC 8461 4.1: one label only
        ("mail.example.net", "mail.example.org", False),
    ],
)
def test_mx_matching(pattern, host, ok):
    assert mtasts.mx_matches(pattern, host) is ok


@pytest.mark.asyncio
async def test_cache_refetches_on_new_id_and_survives_txt_removal_and_fetch_failure():
    now = [1000.0]
    fetched = []
    bodies = {"ok": POLICY}

    async def fetcher(domain):
        fetched.append(domain)
        if "ok" not in bodies:
            raise OSError("connection refused")
        return bodies["ok"]

    res = TableResolver()
    m = mtasts.MTASTS(res, fetcher=fetcher, now=lambda: now[0])
    assert await m.policy("example.net") is None and fetched == []  # no TXT: no policy, no fetch
    res.txt = ["v=STSv1; id=1"]
    p = await m.policy("example.net")
    assert p.mode == "enforce" and fetched == ["example.net"]
    assert (await m.policy("example.net")) is p and len(fetched) == 1  # same id: cached
    res.txt = []
    assert (await m.policy("example.net")) is p  # RFC 8461 5.1: TXT stripped, cached policy holds
    res.txt = ["v=STSv1; id=2"]
    del bodies["ok"]
    assert (await m.policy("example.net")) is p and len(fetched) == 2  # refresh failed: keep cached
    res.txt = dns.resolver.NoNameservers()
    assert (await m.policy("example.net")) is p  # DNS failure is not "no policy"
    now[0] += 604800
    res.txt = []
    assert await m.policy("example.net") is None  # expired


def test_max_age_longer_than_ten_digits_is_refused():
    with pytest.raises(mtasts.MTASTSError):
        mtasts.parse_policy(POLICY.replace("604800", "99999999999"))
