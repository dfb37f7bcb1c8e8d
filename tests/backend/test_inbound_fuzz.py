"""Hostile headers through the inbound checks (SPF, DKIM, ARC, DMARC, Authentication-Results):
mutated From, DKIM-Signature, ARC and Authentication-Results fields, random bytes, DNS answers that
are garbage or fail. Every message gets an outcome — a 5xx refusal, or one well-formed
Authentication-Results field — and no exception escapes (the accept pipeline would answer 451 and
log a traceback: a sender could make us defer its mail forever and fill the log).
"""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest

from backend.auth.inbound import InboundChecks
from backend.auth.results import Envelope
from backend.dns.lookup import DNSTempError
from backend.metrics import BackendMetrics
from backend.smtp.message import split_header


class HostileDNS:
    """Answers drawn from records that are valid, broken or binary, and some temporary failures."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    async def txt(self, name):
        if self.rng.random() < 0.1:
            raise DNSTempError("SERVFAIL")
        return self.rng.choice([[], ["v=spf1 -all"], ["v=DMARC1; p=reject"], ["v=DKIM1; p=MIIB"], ["v=DKIM1; k=ed25519; p="],
                                ["v=spf1 include:%{l}.x ~all"], ["v=spf1 exists:%{i}.%{h}.x redirect=%{d}"],
                                ["v=DMARC1; p=quarantine; sp=reject; pct=7"], ["\x00\xff"], ["v=spf1 a mx ptr -all"]])

    async def a(self, name):
        return ["127.0.0.1"]

    async def aaaa(self, name):
        return []

    async def addresses(self, name):
        return ["127.0.0.1"]

    async def mx(self, name):
        return [(10, "mx.x.")]

    async def ptr(self, address):
        return ["x."]


CONFIG = SimpleNamespace(
    authserv_id="mail.example.org", domains={"example.org": None}, rspamd=None,
    auth=SimpleNamespace(timeout=2.0, dmarc_overrides={"b.c": "none"}, own_domain_protection=True, dmarc_enforce=True),
    server=SimpleNamespace(hostname="mail.example.org"),
)
PIECES = [
    b"From: a@b.c\r\n", b"From: \r\n", b"From: <@>\r\n", b"From: a@b.c, d@e.f\r\n", b"From: alice@example.org\r\n",
    b"From: =?utf-8?q?x?= <x@\xff.com>\r\n", b"From:" + b"a@b.c," * 500 + b"\r\n", b"From: (comment) <a@[127.0.0.1]>\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=b.c; s=s; h=from; bh=AAAA; b=AAAA\r\n", b"DKIM-Signature: garbage\r\n",
    b"DKIM-Signature: v=1; a=ed25519-sha256; d=\xff; s=;;;; h=; bh=; b=\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha1; c=relaxed/relaxed; d=example.org; s=x; l=99999; h=from:from; bh=; b=\r\n",
    b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=b.c; s=s; b=AA\r\n", b"ARC-Seal: i=99999999999999; cv=pass\r\n",
    b"ARC-Message-Signature: i=1;\r\n", b"ARC-Authentication-Results: i=1; x\r\n",
    b"Authentication-Results: mail.example.org; dkim=pass\r\n", b"Authentication-Results: (\r\n",
    b"Subject: x\r\n", b" folded\r\n", b"X: " + b"A" * 5000 + b"\r\n", b"\r\n",
]


def hostile_message(rng: random.Random) -> bytes:
    msg = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12))) + b"\r\nbody\r\n"
    if rng.random() < 0.2:
        b = bytearray(msg)
        for _ in range(5):
            b[rng.randrange(len(b))] = rng.randrange(256)
        msg = bytes(b)
    return msg


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", [1, 2])
async def test_hostile_headers_always_get_an_outcome(seed):
    rng = random.Random(seed)
    checks = InboundChecks(CONFIG, BackendMetrics(), HostileDNS(rng))
    outcomes = {"refused": 0, "accepted": 0}
    for i in range(1500):
        msg = hostile_message(rng)
        header, _ = split_header(msg)
        env = Envelope("mx", rng.choice(["127.0.0.1", "::ffff:1.2.3.4", "2001:db8::1"]),
                       rng.choice(["x", "[1.2.3.4]", "a..b", "mail.b.c", "", "\xff"]),
                       rng.choice(["", "a@b.c", "x@\u00e9.com", "@", "alice@example.org"]), ("alice@example.org",), None, f"Q{i}")
        out = await checks.check(env, header, msg)
        if out.refuse is not None:
            assert re.fullmatch(r"5\d\d 5\.\d\.\d+ .+", out.refuse[0]), out.refuse
            outcomes["refused"] += 1
            continue
        # One header field: its continuation lines start with a tab, nothing else ends a line.
        assert re.fullmatch(rb"Authentication-Results: mail\.example\.org;?[^\r\n]*(\r\n\t[^\r\n]+)*\r\n", out.prepend), out.prepend
        if out.header is not None:
            assert b"Authentication-Results: mail.example.org" not in out.header
        outcomes["accepted"] += 1
    assert outcomes["refused"] > 100 and outcomes["accepted"] > 100, outcomes
