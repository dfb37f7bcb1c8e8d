"""Fuzz run (issue 11, acceptance): for N minutes, concurrent clients send random and mutated SMTP commands and PROXY v2 headers to a real homemx-gateway and a real homemx-backend on loopback; every few seconds and at the end a normal transaction must get its 250 (within 1 s at the end), both daemons must stay alive with a sane number of threads, no reply may carry Python exception text, and no log a traceback, an ERROR/CRITICAL line, an asyncio warning flood or a raw control byte.

Theory of operation. ``run`` starts the backend with every listener kind (mx, lan, submission and
submissions behind PROXY v2 as deployed, plus an mx without PROXY) and the gateway in front of them
(tests/chaos/stack.py).
``targets()`` are the ways in: through a gateway listener, or directly to a backend listener with the
PROXY v2 header the gateway would send. Workers loop until the time is up, each session drawing a
target and its whole content from its own seeded ``random.Random`` (``Session.seed``), so a finding
names the session that replays it (``--replay TARGET:KIND:SEED``; its choices depend only on the
seed and on the replies it gets). A session is one of:

- SMTP (``smtp_session``): a string of actions from ``ACTIONS``: commands built from a grammar
  (``command``), pipelined in one write or split at random bytes, each possibly mutated
  (``mutate``: control, NUL and 8-bit bytes, lone CR/LF, long lines, truncation); a real
  transaction whose body and terminator are fuzzed; BDAT; STARTTLS with a real handshake or
  garbage; AUTH PLAIN/LOGIN/CRAM-MD5 with bad base64 and challenge answers; a PROXY header
  inside the stream; raw bytes; a cut (FIN or RST mid-line or mid-DATA).
- PROXY (``proxy_session``): a header from ``proxy_header`` (valid, LOCAL, v1, bad signature,
  version, command, family, length fields shorter/longer than the data, TLVs with a right or wrong
  CRC32C, truncated, random, mutated) sent to a proxied backend listener. Headers whose verdict is
  known are checked: a valid one must get the banner, an invalid one must not.

Oracles, besides the checks on every reply: ``probe`` runs a normal transaction through the gateway
and directly (plain mx, mx with PROXY) every ``--probe-every`` seconds, and once more after the fuzz
clients stopped, when each must get 250 within 1 s; the daemons' threads and memory are read from
/proc. At the end, once every client has been gone for ``SETTLE`` seconds, both daemons get SIGTERM
and must exit 0 (the backend exits 1 when its watchdog saw a vital worker die), and the backend must
hold no session then (one it still holds is one whose end it did not notice).

    python -m tests.bench fuzz [--minutes N] [--seed S] [--workers W] [--json PATH] [--replay TARGET:KIND:SEED]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import re
import socket
import ssl
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import google_crc32c  # noqa: E402

from gateway.proxyv2 import SIGNATURE, encode_local_v2, encode_proxy_v2  # noqa: E402
from tests.backend.helpers import ALICE, ALICE_PW, BOB, client_tls  # noqa: E402
from tests.chaos.stack import EXCEPTION_TEXT_RE, Daemon, backend_daemon, gateway_daemon, tracebacks  # noqa: E402
from tests.chaos.vanish import normal_transaction  # noqa: E402

DEFAULT_JSON = ROOT / "bench-results" / "fuzz.json"
PROBE_SENDER = "carol@remote.test"
FINAL_PROBE_LIMIT = 1.0  # seconds: the acceptance bound for a normal transaction after the fuzzing
PROBE_TIMEOUT = 10.0  # a probe during the fuzzing may wait for a busy CPU, not for ever
MAX_THREADS = {"backend": 40, "gateway": 16}  # far above a healthy daemon's count (8 workers + a few)
LOG_PROBLEM_RE = re.compile(r"^\S+ \S+ (?:ERROR|CRITICAL) .*$", re.MULTILINE)
# asyncio's own warnings (a transport written to after its connection was lost, a slow callback):
# one per write, so a single client can flood the log with them.
ASYNCIO_WARNING_RE = re.compile(r"^\S+ \S+ WARNING asyncio: .*$", re.MULTILINE)
RAW_CONTROL_RE = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")  # in a log file: only \t and \n are fine
# Sessions the backend still holds at SIGTERM after every client left end with this outcome: each
# is a session whose end it did not notice (held until its idle timeout, or for ever).
HELD_SESSION_RE = re.compile(r" outcome=shutdown ")
SETTLE = 12.0  # seconds after the last client left: the backend's PROXY header timeout (10 s) and a margin
READ_IDLE = 0.5  # seconds without a byte after which a batch's missing replies are given up on
PP2_TYPE_CRC32C, PP2_TYPE_NOOP, PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL = 0x03, 0x04, 0x02, 0x05, 0x20


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    kind: str  # the backend listener it ends at: mx | lan | submission | submissions
    proxy: bool  # the client sends the PROXY v2 header itself (direct to a proxied listener)
    gateway: bool = False


def targets(ports, gw_ports: dict[str, int]) -> list[Target]:
    return [
        Target("gw-mx", gw_ports["mx"], "mx", False, True),
        Target("gw-relay", gw_ports["relay"], "lan", False, True),
        Target("gw-submission", gw_ports["submission"], "submission", False, True),
        Target("gw-submissions", gw_ports["submissions"], "submissions", False, True),
        Target("mx", ports.mx, "mx", True),
        Target("lan", ports.lan, "lan", True),
        Target("submission", ports.submission, "submission", True),
        Target("submissions", ports.submissions, "submissions", True),
        Target("plain", ports.plain, "mx", False),
    ]


@dataclass
class Stats:
    sessions: collections.Counter = field(default_factory=collections.Counter)  # by target and kind
    commands: int = 0  # command lines (and other chunks: bodies, challenge answers) sent
    bytes_sent: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)
    actions: collections.Counter = field(default_factory=collections.Counter)
    proxy_headers: collections.Counter = field(default_factory=collections.Counter)  # kind → count
    proxy_outcomes: collections.Counter = field(default_factory=collections.Counter)  # "kind: outcome"
    client_errors: collections.Counter = field(default_factory=collections.Counter)
    tls_handshakes: collections.Counter = field(default_factory=collections.Counter)
    findings: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    threads: dict[str, list[int]] = field(default_factory=lambda: {"backend": [], "gateway": []})
    rss_kib: dict[str, list[int]] = field(default_factory=lambda: {"backend": [], "gateway": []})
    health: list[str] = field(default_factory=list)  # dead daemons, too many threads, failed probes

    def finding(self, kind: str, session: "Session | None", detail: str) -> None:
        if len(self.findings) < 200:
            entry = {"kind": kind, "detail": detail[:2000]}
            if session is not None:
                entry.update(target=session.target.name, seed=session.seed, replay=session.replay_key(),
                             sent=session.transcript())
            self.findings.append(entry)


# ---------------------------------------------------------------- the grammar

VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY", "EXPN", "HELP", "STARTTLS",
         "AUTH", "QUIT"]
ODD_VERBS = ["LHLO", "XCLIENT", "XFORWARD", "ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML", "GET", "POST",
             "CONNECT", "USER", "PASS", "CAPA", "STLS", "X" * 40, "", " ", "\t", "MAIL:", "RCPT:", "EHL"]
HOSTS = ["client.example.net", "localhost", "[127.0.0.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "[300.1.1.1]",
         "[]", "[", "x" * 300, "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t", "bücher.example", "exa mple",
         "-bad-.example", "_srv.example", "1.2.3.4", "mail.example.org", ""]
LOCALS = ["bob", "alice", "postmaster", "Postmaster", "BOB", "nobody", "bob+tag", "a.b", ".bob", "bob.", "b..b",
          '"bob smith"', '"\\"q\\""', "bü", "x" * 65, "x" * 300, "bob%example.org", "a!b", "%", "@", ""]
DOMAINS = ["example.org", "EXAMPLE.ORG", "remote.test", "example.org.", "[127.0.0.1]", "[IPv6:::1]", "localhost",
           "exämple.org", "x" * 260 + ".org", "example..org", "", "-"]
PARAMS = ["SIZE=1000", "SIZE=99999999999999999999", "SIZE=-1", "SIZE=", "SIZE", "SIZE=0x10", "BODY=8BITMIME",
          "BODY=7BIT", "BODY=BINARYMIME", "BODY=", "SMTPUTF8", "SMTPUTF8=yes", "RET=HDRS", "RET=FULL", "RET=",
          "ENVID=abc", "ENVID=" + "x" * 200, "NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=bogus",
          "ORCPT=rfc822;bob@example.org", "ORCPT=", "AUTH=<>", "AUTH=alice@example.org", "=", "==", "X=Y=Z",
          "MT-PRIORITY=3", "REQUIRETLS", "HOLDFOR=10", "%%%%", "\x00"]
AUTH_MECHS = ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "GSSAPI", "DIGEST-MD5", "plain", "ANONYMOUS", "", "*",
              "PLAIN PLAIN", "X" * 100]


def _path(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.08:
        return "<>"
    if r < 0.12:
        return "<postmaster>"
    local, domain = rng.choice(LOCALS), rng.choice(DOMAINS)
    addr = f"{local}@{domain}" if rng.random() < 0.9 else local
    if rng.random() < 0.05:
        addr = "@relay.example,@other.example:" + addr  # RFC 5321 4.1.2 source route
    shape = rng.random()
    if shape < 0.8:
        return f"<{addr}>"
    if shape < 0.88:
        return addr
    if shape < 0.94:
        return f"<{addr}"
    return f"<<{addr}>>"


def _params(rng: random.Random) -> str:
    return "".join(" " + rng.choice(PARAMS) for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 5))))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def auth_argument(rng: random.Random) -> str:
    """What follows AUTH: a mechanism and maybe an initial response (right or wrong password,
    undecodable or unsplittable base64, ``=`` for empty)."""
    mech = rng.choices([rng.choice(AUTH_MECHS), "PLAIN", "LOGIN", "CRAM-MD5"], weights=[30, 40, 25, 5])[0]
    r = rng.random()
    if mech.upper() == "PLAIN" and r < 0.7:
        login = rng.choice([ALICE, BOB, "nobody@example.org", "", "x" * 300])
        pw = rng.choice([ALICE_PW, "wrong", "", "\x00"])
        authz = rng.choice(["", "", login, BOB])
        resp = rng.choice([
            _b64(f"{authz}\0{login}\0{pw}".encode()),
            _b64(f"{login}\0{pw}".encode()),  # two parts
            _b64(b"\0\0\0\0"),
            "=",
            "!!notbase64!!",
            _b64(rng.randbytes(rng.randint(1, 64)))[:-1],  # bad padding
            _b64(rng.randbytes(rng.randint(0, 200))),
        ])
        return f"{mech} {resp}"
    if mech.upper() == "LOGIN" and r < 0.5:
        return f"{mech} {rng.choice([_b64(ALICE.encode()), '=', '***', _b64(rng.randbytes(30))])}"
    return mech


def challenge_answer(rng: random.Random) -> str:
    """A line sent when the server may be waiting for an AUTH continuation (RFC 4954 4)."""
    return rng.choice([_b64(ALICE.encode()), _b64(b"wrong"), _b64(ALICE_PW.encode()), "*", "=", "",
                       "%%%", _b64(rng.randbytes(rng.randint(0, 100))), "AAAA" * 500,
                       _b64(f"{ALICE} {rng.randbytes(8).hex()}".encode())])


def command(rng: random.Random) -> str:
    """One command line (no line end) from the SMTP grammar, with odd but well-formed choices."""
    verb = rng.choice(VERBS) if rng.random() < 0.93 else rng.choice(ODD_VERBS)
    if rng.random() < 0.1:
        verb = "".join(c.lower() if rng.random() < 0.5 else c for c in verb)
    v = verb.upper()
    if v in ("EHLO", "HELO"):
        arg = rng.choice(HOSTS)
    elif v == "MAIL":
        arg = rng.choice(["FROM:", "FROM: ", "from:", "FROM :", "FROM", "TO:", ""]) + _path(rng) + _params(rng)
    elif v == "RCPT":
        arg = rng.choice(["TO:", "TO: ", "to:", "TO :", "TO", "FROM:", ""]) + _path(rng) + _params(rng)
    elif v == "BDAT":
        arg = rng.choice(["0", "0 LAST", "10", "10 LAST", "-1", "99999999999999999999", "x", "", "5 LAST extra"])
    elif v == "AUTH":
        arg = auth_argument(rng)
    elif v in ("VRFY", "EXPN"):
        arg = rng.choice(["bob", "<bob@example.org>", "postmaster", "all", "", "x" * 600, "\"q q\""])
    elif v == "HELP":
        arg = rng.choice(["", "", "MAIL", "HELP", "X" * 100])
    elif v in ("DATA", "RSET", "NOOP", "QUIT", "STARTTLS"):
        arg = rng.choice(["", "", "", "", "extra", "x" * 200])
    else:
        arg = rng.choice(["", "arg", _path(rng), rng.choice(HOSTS)])
    sep = rng.choice([" ", " ", " ", " ", "  ", "\t", ""]) if arg else ""
    return f"{verb}{sep}{arg}"


def mutate(rng: random.Random, line: bytes) -> bytes:
    """A line mangled the ways a broken or hostile client mangles them."""
    kind = rng.randrange(12)
    pos = rng.randint(0, len(line))
    if kind == 0:
        return line[:pos] + rng.choice([b"\x00", b"\x1b[2J", b"\x1b]0;x\x07", b"\x7f", b"\x08"]) + line[pos:]
    if kind == 1:
        return line[:pos] + bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 8))) + line[pos:]
    if kind == 2:
        return line[:pos] + rng.choice([b"\r", b"\n", b"\r\r", b"\n.\n", b"\r\n.\r\n"]) + line[pos:]
    if kind == 3:
        return line[:pos]  # truncated
    if kind == 4 and line:
        i = rng.randrange(len(line))
        return line[:i] + bytes([line[i] ^ (1 << rng.randrange(8))]) + line[i + 1:]
    if kind == 5:
        return line + b" " + b"A" * rng.choice([500, 1000, 2000, 9000, 70000])
    if kind == 6 and line:
        i, j = sorted(rng.randrange(len(line) + 1) for _ in range(2))
        return line[:j] + line[i:j] * rng.randint(2, 20) + line[j:]
    if kind == 7:
        return line.replace(b" ", b"\t")
    if kind == 8:
        return "ünïcödé ✉ ".encode() + line
    if kind == 9:
        return line + b"\x00" * rng.randint(1, 50)
    if kind == 10:
        return rng.randbytes(rng.randint(1, 300)).replace(b"\n", b"")
    return line.lower()


def line_end(rng: random.Random) -> bytes:
    return rng.choices([b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r", b""], weights=[80, 8, 3, 3, 3, 3])[0]


def fuzzed_body(rng: random.Random) -> bytes:
    """A message body: headers (some missing or odd), lines with dots, bare CR/LF, NUL, 8-bit bytes,
    overlong lines; it never contains the terminator (the caller decides how the body ends)."""
    head = [b"From: <alice@example.org>", b"To: <bob@example.org>", b"Subject: fuzz",
            b"Date: Thu, 1 Jan 2026 00:00:00 +0000", b"Message-ID: <fuzz@fuzz.test>",
            b"Received: from x by y; Thu, 1 Jan 2026 00:00:00 +0000"]
    lines = [h for h in head if rng.random() < 0.8]
    if rng.random() < 0.1:
        lines += [b"Received : from loop"] * rng.randint(1, 40)
    if rng.random() < 0.1:
        lines += [b"From: <mallory@evil.test>"]
    lines.append(b"")
    for _ in range(rng.randint(0, 40)):
        k = rng.randrange(10)
        if k == 0:
            lines.append(b"." + rng.choice([b"", b".", b"dot", b" "]))
        elif k == 1:
            lines.append(b"bare\nlf\rcr" + rng.choice([b"\n.\n", b"\r.\r", b"\n.\r\n", b""]))
        elif k == 2:
            lines.append(rng.randbytes(rng.randint(1, 200)).replace(b"\n", b"").replace(b"\r", b""))
        elif k == 3:
            lines.append(b"L" * rng.choice([998, 999, 1000, 1001, 5000]))
        elif k == 4:
            lines.append("ünïcödé ✉".encode())
        elif k == 5:
            lines.append(b"\x00\x1b[31m")
        else:
            lines.append(b"The quick brown fox jumps over the lazy dog.")
    return b"\r\n".join(lines) + b"\r\n"


TERMINATORS = [b".\r\n"] * 8 + [b"\n.\n", b"\r.\r", b"\n.\r\n", b".\n", b"..\r\n", b" .\r\n"]


# ---------------------------------------------------------------- PROXY v2 headers


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def _with_crc(header: bytes) -> bytes:
    """``header`` (which ends in a zeroed CRC32C TLV value) with the right checksum filled in."""
    return header[:-4] + struct.pack("!I", google_crc32c.value(header))


def _set_length(header: bytes, length: int) -> bytes:
    return header[:14] + struct.pack("!H", length & 0xFFFF) + header[16:]


def _addresses(rng: random.Random) -> tuple[tuple[str, int], tuple[str, int]]:
    if rng.random() < 0.7:
        src = (f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1024, 65536))
        return src, ("198.51.100.1", 25)
    src6 = f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65535):x}"
    return (src6, rng.randrange(1024, 65536)), ("2001:db8::25", 25)


def valid_header(rng: random.Random) -> bytes:
    src, dst = _addresses(rng)
    return encode_proxy_v2(src, dst)


ACCEPT, REFUSE = "accept", "refuse"


def proxy_header(rng: random.Random) -> tuple[str, bytes, str | None]:
    """(kind, bytes, verdict): a PROXY header, valid or broken in one known way, with what the
    backend must do with it (``ACCEPT``: send its banner; ``REFUSE``: close or wait, never a
    banner; None: either is fine, e.g. random mutations)."""
    src, dst = _addresses(rng)
    base = encode_proxy_v2(src, dst)
    noop = _tlv(PP2_TYPE_NOOP, rng.randbytes(rng.randint(0, 20)))
    k = rng.randrange(30)
    if k < 4:
        return "valid", base, ACCEPT
    if k == 4:
        tlvs = ((PP2_TYPE_AUTHORITY, b"mx.example.org"), (PP2_TYPE_UNIQUE_ID, rng.randbytes(rng.randint(0, 128))),
                (PP2_TYPE_NOOP, b""), (0xE0, b"custom"))
        return "valid-tlvs", encode_proxy_v2(src, dst, tlvs), ACCEPT
    if k == 5:
        h = encode_proxy_v2(src, dst, ((PP2_TYPE_NOOP, b"x"), (PP2_TYPE_CRC32C, bytes(4))))
        return "crc-right", _with_crc(h), ACCEPT
    if k == 6:
        good = _with_crc(encode_proxy_v2(src, dst, ((PP2_TYPE_CRC32C, bytes(4)),)))
        return "crc-wrong", good[:-4] + struct.pack("!I", (struct.unpack("!I", good[-4:])[0] + 1) & 0xFFFFFFFF), REFUSE
    if k == 7:
        return "crc-zero", encode_proxy_v2(src, dst, ((PP2_TYPE_CRC32C, bytes(4)),)), REFUSE
    if k == 8:
        h = encode_proxy_v2(src, dst, ((PP2_TYPE_CRC32C, rng.randbytes(rng.choice((0, 3, 5, 8)))),))
        return "crc-bad-length", h, REFUSE
    if k == 9:
        h = encode_proxy_v2(src, dst, ((PP2_TYPE_CRC32C, bytes(4)), (PP2_TYPE_CRC32C, bytes(4))))
        return "crc-twice", h, REFUSE
    if k == 10:
        # The last TLV claims more bytes than the header holds.
        h = base + noop + struct.pack("!BH", PP2_TYPE_NOOP, 50) + b"short"
        return "tlv-overrun", _set_length(h, len(h) - 16), REFUSE
    if k == 11:
        return "tlv-stub", _set_length(base + b"\x04\x00", len(base) - 16 + 2), REFUSE
    if k == 12:
        return "local", encode_local_v2(), REFUSE
    if k == 13:
        v4 = src[0] if ":" not in src[0] else "192.0.2.1"
        return "v1", f"PROXY TCP4 {v4} 198.51.100.1 {src[1]} 25\r\n".encode(), REFUSE
    if k == 14:
        return "v1-unknown", b"PROXY UNKNOWN\r\n", REFUSE
    if k == 15:
        i = rng.randrange(12)
        return "bad-signature", base[:i] + bytes([base[i] ^ 0x40]) + base[i + 1:], REFUSE
    if k == 16:
        ver = rng.choice([0x0, 0x1, 0x3, 0xF])
        return f"version-{ver}", base[:12] + bytes([(ver << 4) | 1]) + base[13:], REFUSE
    if k == 17:
        cmd = rng.randint(2, 15)
        return "command", base[:12] + bytes([0x20 | cmd]) + base[13:], REFUSE
    if k == 18:
        fam = rng.choice([0x00, 0x01, 0x10, 0x12, 0x22, 0x31, 0x32, 0xFF])
        return f"family-{fam:02x}", base[:13] + bytes([fam]) + base[14:], REFUSE
    if k == 19:
        # An IPv4 address block announced as IPv6: too short for two IPv6 addresses.
        h = encode_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 25))
        return "family-mismatch", h[:13] + b"\x21" + h[14:], REFUSE
    if k == 20:
        return "length-short", _set_length(base, rng.randint(0, len(base) - 17)), REFUSE
    if k == 21:
        # The length field promises more than is sent: the backend waits, then times out.
        return "length-long", _set_length(base, len(base) - 16 + rng.randint(1, 200)), REFUSE
    if k == 22:
        # The length swallows the EHLO that follows: garbage TLVs.
        ehlo = b"EHLO fuzz.example\r\n"
        return "length-swallows-ehlo", _set_length(base, len(base) - 16 + len(ehlo)) + ehlo, None
    if k == 23:
        n = rng.randint(0, len(base) - 1)
        return "truncated", base[:n], REFUSE
    if k == 24:
        return "random", rng.randbytes(rng.randint(1, 300)), REFUSE
    if k == 25:
        return "signature-then-random", SIGNATURE + rng.randbytes(rng.randint(0, 300)), None
    if k == 26:
        tlvs = tuple((PP2_TYPE_NOOP, rng.randbytes(rng.randint(0, 3000))) for _ in range(rng.randint(1, 20)))
        return "many-tlvs", encode_proxy_v2(src, dst, tlvs), ACCEPT
    if k == 27:
        # PP2_TYPE_SSL with sub-TLVs (2.2.6): client flags, verify, a version string.
        ssl_value = struct.pack("!BI", 0x07, 0) + _tlv(0x21, b"TLSv1.3") + _tlv(0x22, b"CN")
        return "ssl-tlv", encode_proxy_v2(src, dst, ((PP2_TYPE_SSL, ssl_value),)), ACCEPT
    if k == 28:
        return "empty", b"", REFUSE
    h = bytearray(base + (noop if rng.random() < 0.5 else b""))
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(h))
        h[i] = rng.randrange(256)
    return "mutated", bytes(h), None


# ---------------------------------------------------------------- sessions


class Closed(Exception):
    """The server closed the connection (a normal end for many fuzzed sessions)."""


class Session:
    """One fuzz connection: its target, seed, what was sent, and the replies read."""

    def __init__(self, target: Target, seed: int, stats: Stats):
        self.target, self.seed, self.stats = target, seed, stats
        self.rng = random.Random(seed)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent: list[bytes] = []
        self.sent_len = 0
        self.buffer = b""
        self.tls = False
        self.ehlo_done = False
        self.kind = "smtp"

    def replay_key(self) -> str:
        """What ``--replay`` takes to run this session again."""
        return f"{self.target.name}:{self.kind}:{self.seed}"

    def transcript(self, limit: int = 3000) -> str:
        return repr(b"".join(self.sent)[:limit])

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.target.port), 10)

    async def send(self, data: bytes, pieces: int = 1) -> None:
        assert self.writer is not None
        if self.sent_len < 65536:
            self.sent.append(data)
            self.sent_len += len(data)
        self.stats.bytes_sent += len(data)
        cuts = sorted(self.rng.randrange(len(data) + 1) for _ in range(pieces - 1)) if data else []
        start = 0
        for cut in [*cuts, len(data)]:
            if cut > start:
                self.writer.write(data[start:cut])
                await asyncio.wait_for(self.writer.drain(), 10)
            start = cut

    async def replies(self, want: int, idle: float = READ_IDLE, first_wait: float | None = None) -> list[str]:
        """Read until ``want`` complete replies arrived, or nothing came for ``idle`` seconds
        (``first_wait`` for the first byte). Every reply line is checked for exception text."""
        assert self.reader is not None
        out: list[str] = []
        lines: list[str] = []
        wait = first_wait if first_wait is not None else idle
        while len(out) < want:
            while b"\n" not in self.buffer:
                try:
                    chunk = await asyncio.wait_for(self.reader.read(65536), wait)
                except asyncio.TimeoutError:
                    return out
                if not chunk:
                    raise Closed(" | ".join(out + lines)[:300])
                self.buffer += chunk
                wait = idle
            raw, _, self.buffer = self.buffer.partition(b"\n")
            text = raw.decode("utf-8", "replace").rstrip("\r")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                reply = "\n".join(lines)
                lines = []
                out.append(reply)
                self.stats.codes[reply[:3] if reply[:3].isdigit() else "other"] += 1
                if EXCEPTION_TEXT_RE.search(reply):
                    self.stats.finding("exception text in reply", self, reply)
        return out

    async def start_tls(self) -> None:
        assert self.writer is not None
        await asyncio.wait_for(self.writer.start_tls(client_tls(), server_hostname="mail.example.org"), 10)
        self.tls = True

    def close(self, how: str) -> None:
        if self.writer is None:
            return
        if how == "rst":
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.writer.transport.abort()
            return
        try:
            if how == "fin" and self.writer.can_write_eof() and not self.tls:
                self.writer.write_eof()
        except (OSError, RuntimeError):
            pass
        self.writer.close()


async def _lines(s: Session, lines: list[bytes], mutate_rate: float = 0.15) -> list[str]:
    """Send command lines (some mutated) in one write or in random pieces, then read a reply each."""
    data = b""
    for line in lines:
        if s.rng.random() < mutate_rate:
            line = mutate(s.rng, line)
        data += line + (line_end(s.rng) if s.rng.random() < 0.15 else b"\r\n")
    s.stats.commands += len(lines)
    await s.send(data, pieces=s.rng.choice((1, 1, 1, 2, 5)))
    return await s.replies(len(lines))


async def act_commands(s: Session) -> None:
    await _lines(s, [command(s.rng).encode("utf-8", "surrogateescape") for _ in range(s.rng.choice((1, 1, 2, 3, 8)))])


async def act_ehlo(s: Session) -> None:
    await _lines(s, [f"{s.rng.choice(['EHLO', 'EHLO', 'HELO'])} {s.rng.choice(HOSTS[:6])}".encode()], 0.05)
    s.ehlo_done = True


async def act_transaction(s: Session) -> None:
    """A real-looking transaction whose envelope, body and terminator may be fuzzed; pipelined
    (RFC 2920) or one command at a time."""
    rng = s.rng
    rcpt = rng.choice([BOB, ALICE, "postmaster", "nobody@example.org", "someone@remote.test", BOB.upper()])
    sender = rng.choice([ALICE, "carol@remote.test", "", BOB])
    lines = [] if s.ehlo_done and rng.random() < 0.7 else [b"EHLO fuzz.example"]
    lines += [f"MAIL FROM:<{sender}>{_params(rng) if rng.random() < 0.3 else ''}".encode(),
              f"RCPT TO:<{rcpt}>".encode()]
    lines += [f"RCPT TO:{_path(rng)}".encode() for _ in range(rng.choice((0, 0, 1, 3)))]
    if rng.random() < 0.5:
        await _lines(s, lines, 0.1)
        got = await _lines(s, [b"DATA"], 0.05)
    else:
        got = await _lines(s, lines + [b"DATA"], 0.1)
    if not (got and got[-1].startswith("354")) and rng.random() < 0.8:
        return  # mostly, a client whose DATA was refused does not send the body anyway
    body = fuzzed_body(rng)
    end = rng.choice(TERMINATORS)
    cut = rng.random() < 0.15
    if cut:
        body = body[: rng.randint(0, len(body))]  # the client leaves mid-DATA
        end = b""
    s.stats.commands += 1
    await s.send(body + end, pieces=rng.choice((1, 1, 3)))
    if cut:
        raise Closed("cut mid-DATA")
    if end != b".\r\n":
        # Not the terminator (RFC 5321 4.1.1.4): the server waits; end DATA properly now and then.
        if rng.random() < 0.5:
            await s.send(b"\r\n.\r\n")
    await s.replies(1, first_wait=3.0)


async def act_bdat(s: Session) -> None:
    n = s.rng.choice((0, 1, 10, 100, 5000))
    last = s.rng.choice(("", " LAST"))
    s.stats.commands += 1
    await s.send(f"BDAT {n}{last}\r\n".encode() + s.rng.randbytes(n))
    await s.replies(2)


async def act_starttls(s: Session) -> None:
    s.stats.commands += 1
    await s.send(b"STARTTLS\r\n")
    got = await s.replies(1, first_wait=3.0)
    if not got or not got[0].startswith("220") or s.tls:
        return
    if s.rng.random() < 0.2:
        await s.send(s.rng.randbytes(s.rng.randint(1, 500)))  # not a ClientHello
        s.stats.tls_handshakes["garbage"] += 1
        raise Closed("garbage instead of a TLS handshake")
    try:
        await s.start_tls()
    except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
        s.stats.tls_handshakes["failed"] += 1
        raise Closed(f"TLS: {e!r}")
    s.stats.tls_handshakes["ok"] += 1
    s.ehlo_done = False


async def act_auth(s: Session) -> None:
    """AUTH with an initial response or without, then 0-3 challenge answers (RFC 4954 4)."""
    s.stats.commands += 1
    await s.send(f"AUTH {auth_argument(s.rng)}\r\n".encode())
    for _ in range(s.rng.randint(0, 3)):
        got = await s.replies(1, first_wait=3.0)
        if not got or not got[0].startswith("334"):
            return
        s.stats.commands += 1
        await s.send(challenge_answer(s.rng).encode() + line_end(s.rng))
    await s.replies(1, first_wait=3.0)


async def act_proxy_inside(s: Session) -> None:
    """A PROXY header (or a v1 line) in the middle of the SMTP stream: just bytes to the server."""
    _, header, _ = proxy_header(s.rng)
    s.stats.commands += 1
    await s.send(header + b"\r\n")
    await s.replies(2)


async def act_raw(s: Session) -> None:
    s.stats.commands += 1
    await s.send(s.rng.randbytes(s.rng.choice((1, 16, 300, 5000, 70000))) + s.rng.choice((b"", b"\r\n")))
    await s.replies(1)


async def act_long_line(s: Session) -> None:
    s.stats.commands += 1
    verb = s.rng.choice([b"EHLO ", b"MAIL FROM:<", b"NOOP ", b"RCPT TO:<", b""])
    await s.send(verb + b"x" * s.rng.choice((513, 1001, 4096, 65537, 300000)) + s.rng.choice((b"\r\n", b"")))
    await s.replies(1)


async def act_cut(s: Session) -> None:
    """Half a command, then leave (the caller closes with FIN or RST)."""
    line = command(s.rng).encode("utf-8", "surrogateescape")
    await s.send(line[: s.rng.randint(0, len(line))])
    raise Closed("cut mid-command")


ACTIONS = [
    (act_commands, 40), (act_ehlo, 8), (act_transaction, 14), (act_bdat, 3), (act_starttls, 5), (act_auth, 10),
    (act_proxy_inside, 2), (act_raw, 4), (act_long_line, 3), (act_cut, 2),
]


async def smtp_session(s: Session) -> None:
    rng, t = s.rng, s.target
    if t.proxy:
        await s.send(valid_header(rng))
    if t.kind == "submissions":
        if rng.random() < 0.05:
            await s.send(rng.randbytes(rng.randint(1, 400)))  # not TLS at all
            await s.replies(1, first_wait=2.0)
            return
        await s.start_tls()
    if t.gateway and t.kind == "mx" and rng.random() < 0.05:
        # An early talker: the gateway must refuse it (and say so in an SMTP reply).
        await s.send(b"EHLO early.example\r\n")
    banner = await s.replies(1, first_wait=10.0)
    if not banner:
        s.stats.finding("no banner within 10 s", s, "")
        return
    if not banner[0].startswith("220"):
        return
    if t.kind in ("submission", "lan") and rng.random() < 0.5:
        # AUTH is only offered inside TLS (RFC 4954 4): get there first, so AUTH is fuzzed too.
        await _lines(s, [b"EHLO fuzz.example"], 0.0)
        await act_starttls(s)
        await _lines(s, [b"EHLO fuzz.example"], 0.0)  # RFC 3207 4.2: the session starts over inside TLS
        s.ehlo_done = True
        if s.tls and rng.random() < 0.6:
            # Logged in, so that the transactions get past RCPT and DATA (RFC 4616 PLAIN).
            s.stats.commands += 1
            await s.send(f"AUTH PLAIN {_b64(f'{chr(0)}{ALICE}{chr(0)}{ALICE_PW}'.encode())}\r\n".encode())
            await s.replies(1, first_wait=5.0)
    funcs, weights = zip(*ACTIONS)
    for _ in range(rng.randint(1, 25)):
        action = rng.choices(funcs, weights)[0]
        s.stats.actions[action.__name__[4:]] += 1
        await action(s)
    if rng.random() < 0.5:
        s.stats.commands += 1
        await s.send(b"QUIT\r\n")
        await s.replies(1)


async def proxy_session(s: Session) -> None:
    kind, header, verdict = proxy_header(s.rng)
    s.stats.proxy_headers[kind] += 1
    if s.target.kind == "submissions" and verdict == ACCEPT:
        verdict = None  # the banner would come inside TLS
    if header:
        await s.send(header, pieces=s.rng.choice((1, 1, 1, 3, len(header))))
    # Wait for a banner; now and then long enough to see the backend give up on a header that
    # never completes (its PROXY timeout is 10 s).
    patience = 14.0 if s.rng.random() < 0.04 else s.rng.choice((0.3, 1.0, 2.0))
    try:
        got = await s.replies(1, first_wait=patience)
        outcome = "banner" if got and got[0].startswith("220") else ("reply " + got[0][:3] if got else "waiting")
    except Closed:
        outcome = "closed"
    s.stats.proxy_outcomes[f"{kind}: {outcome}"] += 1
    if verdict == ACCEPT and outcome != "banner":
        s.stats.finding("valid PROXY header refused", s, f"{kind}: {outcome}")
    if verdict == REFUSE and outcome == "banner":
        s.stats.finding("invalid PROXY header accepted", s, kind)
    if outcome == "waiting" and patience > 12:
        s.stats.finding("incomplete PROXY header not closed after the 10 s timeout", s, kind)
    if outcome == "banner":
        await _lines(s, [b"EHLO fuzz.example", b"NOOP", b"QUIT"], 0.0)


async def run_session(s: Session, kind: str) -> None:
    s.kind = kind
    s.stats.sessions[f"{s.target.name} {kind}"] += 1
    try:
        await s.open()
        await (proxy_session(s) if kind == "proxy" else smtp_session(s))
    except Closed:
        pass
    except (ConnectionError, OSError, asyncio.TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as e:
        s.stats.client_errors[type(e).__name__] += 1
    finally:
        s.close(s.rng.choice(("fin", "fin", "rst")))


# ---------------------------------------------------------------- the run


@dataclass
class Plan:
    seed: int
    seconds: float
    workers: int
    probe_every: float
    replay: tuple[str, str, int] | None = None  # (target, "smtp" | "proxy", session seed): that session only


async def worker(n: int, plan: Plan, ts: list[Target], stats: Stats, stop: asyncio.Event) -> None:
    rng = random.Random(plan.seed * 7919 + n)
    proxied = [t for t in ts if t.proxy]
    while not stop.is_set():
        seed = rng.getrandbits(48)
        if rng.random() < 0.25:
            s = Session(rng.choice(proxied), seed, stats)
            await run_session(s, "proxy")
        else:
            s = Session(rng.choice(ts), seed, stats)
            await run_session(s, "smtp")


PROBE_PATHS = ("gw-mx", "plain", "mx")


async def probe(ts: list[Target], stats: Stats, phase: str, timeout: float) -> list[dict]:
    """A normal transaction on each probe path, one after the other; every result recorded."""
    by_name = {t.name: t for t in ts}
    out = []
    for name in PROBE_PATHS:
        t = by_name[name]
        entry = {"phase": phase, "path": name, "t": round(time.time(), 1)}
        try:
            reply, elapsed = await normal_transaction(t.port, f"probe-{phase}-{name}-{len(stats.probes)}",
                                                      sender=PROBE_SENDER, rcpts=[BOB], proxy=t.proxy,
                                                      timeout=timeout)
            entry.update(reply=reply[:120], seconds=round(elapsed, 3), ok=reply.startswith("250"))
        except (OSError, ConnectionError, asyncio.TimeoutError) as e:
            entry.update(reply=f"{type(e).__name__}: {e}"[:200], seconds=None, ok=False)
        stats.probes.append(entry)
        out.append(entry)
    return out


def thread_count(d: Daemon) -> int | None:
    try:
        return len(os.listdir(f"/proc/{d.proc.pid}/task"))
    except (OSError, AttributeError):
        return None


def rss_kib(d: Daemon) -> int | None:
    try:
        for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, AttributeError):
        pass
    return None


def check_health(daemons: list[Daemon], stats: Stats, when: str) -> None:
    for d in daemons:
        if not d.alive():
            stats.health.append(f"{when}: {d.name} is not running (exit {d.proc.returncode})")
            continue
        rss = rss_kib(d)
        if rss is not None:
            stats.rss_kib[d.name].append(rss)
        n = thread_count(d)
        if n is not None:
            stats.threads[d.name].append(n)
            if n > MAX_THREADS[d.name]:
                stats.health.append(f"{when}: {d.name} has {n} threads")


async def drive(plan: Plan, ts: list[Target], daemons: list[Daemon], stats: Stats) -> None:
    stop = asyncio.Event()
    if plan.replay is not None:
        name, kind, seed = plan.replay
        session = Session(next(t for t in ts if t.name == name), seed, stats)
        await run_session(session, kind)
        print(f"replayed {name} {kind} {seed}: sent {session.transcript(100_000)}", file=sys.stderr)
        await asyncio.sleep(1.0)  # let the daemons log what the session did
        return
    workers = [asyncio.create_task(worker(i, plan, ts, stats, stop)) for i in range(plan.workers)]
    t0 = time.monotonic()
    last_print = t0
    while time.monotonic() - t0 < plan.seconds:
        await asyncio.sleep(min(plan.probe_every, max(0.0, plan.seconds - (time.monotonic() - t0))))
        for p in await probe(ts, stats, "during", PROBE_TIMEOUT):
            if not p["ok"]:
                stats.health.append(f"probe during the fuzzing failed on {p['path']}: {p['reply']}")
        check_health(daemons, stats, f"{time.monotonic() - t0:.0f}s")
        if time.monotonic() - last_print >= 30:
            last_print = time.monotonic()
            print(f"  {time.monotonic() - t0:5.0f}s: {sum(stats.sessions.values())} sessions, {stats.commands} "
                  f"commands, {len(stats.findings)} findings, {len(stats.health)} health problems", file=sys.stderr,
                  flush=True)
        if any(not d.alive() for d in daemons):
            break
    stop.set()
    # A worker may sit in a long read (a PROXY timeout wait); give them a bound, then cancel.
    done, pending = await asyncio.wait(workers, timeout=20)
    for w in pending:
        w.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for w in done:
        if w.exception() is not None:
            stats.finding("fuzz client crashed (a bug in the fuzzer)", None, repr(w.exception()))


def log_problems(d: Daemon) -> dict:
    text = d.log()
    raw = d.log_path.read_bytes() if d.log_path.exists() else b""
    errors = LOG_PROBLEM_RE.findall(text)
    noise = ASYNCIO_WARNING_RE.findall(text)
    controls = RAW_CONTROL_RE.findall(raw)
    tb = tracebacks(text)
    out = {"tracebacks": len(tb), "error_lines": len(errors), "asyncio_warnings": len(noise),
           "raw_control_bytes": len(controls), "lines": text.count("\n")}
    if noise:
        out["asyncio_warning_examples"] = sorted(set(line.split(" ", 2)[2] for line in noise))[:5]
    if tb:
        out["first_traceback"] = tb[0]
    if errors:
        out["error_examples"] = errors[:10]
    if controls:
        i = RAW_CONTROL_RE.search(raw).start()
        out["raw_control_example"] = repr(raw[max(0, i - 200): i + 100])
    return out


def run(seconds: float, seed: int = 11, workers: int = 16, probe_every: float = 5.0, keep: Path | None = None,
        replay: tuple[str, str, int] | None = None) -> dict:
    """Start the stack, fuzz for ``seconds`` (or replay one session), probe, stop; the figures and
    every finding."""
    plan = Plan(seed, seconds, workers, probe_every, replay)
    stats = Stats()
    results: dict = {"benchmark": "fuzz", "seed": seed, "seconds": seconds, "workers": workers, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="hmx-fuzz-") as d:
        work = Path(d)
        # A short AUTH failure delay keeps guessing sessions moving; the lockout still applies.
        backend, ports = backend_daemon(work, submission=True, listener_opts={"auth_failure_delay": 0.05})
        gateway, gw_ports = gateway_daemon(
            work, {"mx": ports.mx, "relay": ports.lan, "submission": ports.submission,
                   "submissions": ports.submissions}, greet_wait="100ms")
        daemons = [backend, gateway]
        ts = targets(ports, gw_ports)
        try:
            backend.start()
            gateway.start()
            results["rss_kib_start"] = {dm.name: rss_kib(dm) for dm in daemons}
            t0 = time.monotonic()
            asyncio.run(drive(plan, ts, daemons, stats))
            results["fuzz_seconds"] = round(time.monotonic() - t0, 1)
            check_health(daemons, stats, "end")
            results["rss_kib_end"] = {dm.name: rss_kib(dm) for dm in daemons}
            # After the fuzzing: the acceptance probe, each path within FINAL_PROBE_LIMIT.
            final = asyncio.run(probe(ts, stats, "final", PROBE_TIMEOUT))
            results["final_probes"] = final
            for p in final:
                if not p["ok"] or p["seconds"] > FINAL_PROBE_LIMIT:
                    stats.health.append(f"final probe on {p['path']}: {p['reply']} after {p['seconds']} s")
            # Every client has left; a session the backend still holds after the longest pre-banner
            # timeout is one whose end it never noticed. Nothing can be awaited from outside: wait.
            time.sleep(SETTLE)
            results["gateway_exit"] = gateway.stop()
            results["backend_exit"] = backend.stop()
            shutdown_log = backend.log().rpartition("shutting down")[2]
            held = [line for line in shutdown_log.splitlines() if HELD_SESSION_RE.search(line)]
            results["sessions_left_open"] = len(held)
            results["sessions_left_open_examples"] = held[:5]
        finally:
            gateway.kill()
            backend.kill()
        results["logs"] = {dm.name: log_problems(dm) for dm in daemons}
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for dm in daemons:
                if dm.log_path.exists():
                    (keep / dm.log_path.name).write_bytes(dm.log_path.read_bytes())
    during = [p["seconds"] for p in stats.probes if p["phase"] == "during" and p["seconds"] is not None]
    results.update(
        sessions=sum(stats.sessions.values()),
        sessions_by_target=dict(stats.sessions.most_common()),
        commands_sent=stats.commands,
        bytes_sent=stats.bytes_sent,
        reply_codes=dict(sorted(stats.codes.items())),
        actions=dict(stats.actions.most_common()),
        tls_handshakes=dict(stats.tls_handshakes),
        proxy_headers=dict(stats.proxy_headers.most_common()),
        proxy_outcomes=dict(sorted(stats.proxy_outcomes.items())),
        client_errors=dict(stats.client_errors.most_common()),
        probes=len(stats.probes),
        probes_ok=sum(1 for p in stats.probes if p["ok"]),
        failed_probes=[p for p in stats.probes if not p["ok"]][:20],
        worst_probe_seconds=max(during, default=None),
        worst_final_probe_seconds=max((p["seconds"] or 99.0 for p in results.get("final_probes", [])), default=None),
        threads_max={k: max(v, default=None) for k, v in stats.threads.items()},
        threads_end={k: (v[-1] if v else None) for k, v in stats.threads.items()},
        rss_kib_max={k: max(v, default=None) for k, v in stats.rss_kib.items()},
        rss_kib_samples={k: v[:: max(1, len(v) // 20)] for k, v in stats.rss_kib.items()},
        findings=stats.findings,
        health=stats.health,
    )
    results["problems"] = problems(results)
    results["ok"] = not results["problems"]
    return results


def problems(r: dict) -> list[str]:
    """Every acceptance condition that failed, in words (empty: the run passed)."""
    out = [f"{f['kind']} (--replay {f.get('replay', '-')}): {f['detail'][:200]}" for f in r["findings"]]
    out += r["health"]
    if not r.get("final_probes"):
        out.append("no final probe ran")
    for name, lp in r["logs"].items():
        for key in ("tracebacks", "error_lines", "asyncio_warnings", "raw_control_bytes"):
            if lp[key]:
                out.append(f"{name} log: {lp[key]} {key.replace('_', ' ')}")
    if r.get("sessions_left_open"):
        out.append(f"backend still held {r['sessions_left_open']} sessions {SETTLE:.0f} s after every client left")
    for name in ("gateway", "backend"):
        if r.get(f"{name}_exit") != 0:
            out.append(f"{name} exit status on SIGTERM: {r.get(f'{name}_exit')}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workers", type=int, default=16, help="concurrent fuzz clients (default 16)")
    ap.add_argument("--probe-every", type=float, default=5.0, help="seconds between probe rounds (default 5)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="copy the daemons' logs here")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    ap.add_argument("--replay", metavar="TARGET:KIND:SEED",
                    help="run only the session a finding names (e.g. submissions:smtp:192059735625538), then check")
    args = ap.parse_args(argv)
    replay = None
    if args.replay:
        name, kind, seed = args.replay.split(":")
        replay = (name, kind, int(seed))
    r = run(args.minutes * 60, args.seed, args.workers, args.probe_every, args.keep, replay)
    print(f"\nfuzz run: {r['fuzz_seconds']} s, seed {r['seed']}, {r['workers']} clients")
    proxy_sessions = sum(v for k, v in r["sessions_by_target"].items() if k.endswith("proxy"))
    print(f"  sessions              {r['sessions']:9d}   ({proxy_sessions} of them PROXY header sessions)")
    print(f"  commands sent         {r['commands_sent']:9d}   ({r['bytes_sent'] / 1e6:.1f} MB)")
    print(f"  reply codes           {' '.join(f'{k}:{v}' for k, v in r['reply_codes'].items())}")
    print(f"  TLS handshakes        {r['tls_handshakes']}")
    print(f"  probes OK             {r['probes_ok']:9d} / {r['probes']}   worst during {r['worst_probe_seconds']} s, "
          f"final worst {r['worst_final_probe_seconds']} s (limit {FINAL_PROBE_LIMIT} s)")
    print(f"  threads max / end     {r['threads_max']} / {r['threads_end']}")
    print(f"  RSS KiB start/max/end {r.get('rss_kib_start')} / {r['rss_kib_max']} / {r.get('rss_kib_end')}")
    for name, lp in r["logs"].items():
        print(f"  {name} log {lp['lines']:7d} lines: tracebacks {lp['tracebacks']}, ERROR/CRITICAL lines "
              f"{lp['error_lines']}, asyncio warnings {lp['asyncio_warnings']}, raw control bytes "
              f"{lp['raw_control_bytes']}")
    print(f"  exit on SIGTERM       backend {r['backend_exit']}, gateway {r['gateway_exit']}; sessions the backend "
          f"still held {SETTLE:.0f} s after the last client left: {r.get('sessions_left_open')}")
    print(f"  findings              {len(r['findings'])}")
    for p in r["problems"][:20]:
        print(f"    - {p}")
    print("  OK: the daemons answered throughout, 250 within 1 s afterwards, nothing leaked" if r["ok"]
          else "  FAILED (see the JSON)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
