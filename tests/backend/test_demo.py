"""The README's first command: the demo stack (gateway + backend on loopback) as ./dev demo starts it,
with its own DNS (backend/cli/demodns.py) serving example.test to the inbound checks."""

from __future__ import annotations

import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.zone
import pytest

from backend.cli.demodns import DemoZones
from backend.config import load_config
from backend.dkim.keys import dkim_txt_record
from tests.backend.helpers import BACKEND_CLI, wait_for_sync

GATEWAY_CLI = str(Path(sys.executable).parent / "homemx-gateway")
OFFSETS = (25, 53, 65, 87, 91, 92, 125, 126, 165, 187)


def _free_base() -> int:
    for _ in range(50):
        base = random.randrange(20000, 60000, 100)
        try:
            for off in OFFSETS:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + off))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the demo's DNS is UDP too
                s.bind(("127.0.0.1", base + 53))
            return base
        except OSError:
            continue
    raise AssertionError("no free port range")


FORGED = "From: Boss <demo@example.test>\r\nSubject: urgent wire transfer\r\n\r\nplease pay\r\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo as ./dev demo runs it: ``--prepare``, then the gateway and ``demo`` side by side.
    Yields (demo dir, port base, the Maildir's new/ of demo@example.test)."""
    tmp = tmp_path_factory.mktemp("demo")
    base = _free_base()
    d = tmp / "demo"
    r = subprocess.run([BACKEND_CLI, "demo", "--dir", str(d), "--port-base", str(base), "--prepare"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(d / "demo-password").st_mode & 0o777) == "0o600"
    procs = [
        subprocess.Popen([GATEWAY_CLI, "run", "-c", str(d / "gateway.toml")], stdout=subprocess.DEVNULL,
                         stderr=open(tmp / "gw.log", "wb"), start_new_session=True),
        subprocess.Popen([BACKEND_CLI, "demo", "--dir", str(d), "--port-base", str(base)],
                         stdout=open(tmp / "out.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True),
    ]
    try:
        def up(port):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return True
            except OSError:
                return False

        wait_for_sync(lambda: up(base + 25) and up(base + 126), 30)
        yield d, base, d / "data" / "mail" / "example.test" / "demo" / "Maildir" / "new"
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(15)


def _delivered(new: Path, subject: str) -> str:
    """The text of the delivered message with this subject, once it is in the Maildir."""
    def find():
        for f in new.iterdir() if new.exists() else ():
            text = f.read_text()
            if f"Subject: {subject}\n" in text:
                return text
        return None

    return wait_for_sync(find, 30)


def test_demo_stack_delivers_through_gateway_and_signs_lan_mail(demo):
    d, base, new = demo
    out = (d.parent / "out.log").read_text()
    assert f"swaks --server 127.0.0.1:{base + 25} --to demo@example.test" in out  # how to send a test message
    with smtplib.SMTP("127.0.0.1", base + 25, timeout=30) as s:  # the "internet" side, via the gateway
        s.sendmail("you@example.net", ["demo@example.test"], "From: you@example.net\r\nSubject: in\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", base + 126, timeout=30) as s:  # a homelab app on the LAN listener
        s.sendmail("nas@example.test", ["demo@example.test"], "From: nas@example.test\r\nSubject: lan\r\n\r\nok\r\n")
    _delivered(new, "in")
    lan = _delivered(new, "lan")
    assert "a=rsa-sha256" in lan and "a=ed25519-sha256" in lan


def test_forged_own_domain_from_is_refused_at_once(demo):
    """The issue's first probe, as the demo's hint prints it: example.test's SPF (from the demo's DNS)
    lists only 192.0.2.25, so mail from 127.0.0.1 with From: example.test has no aligned pass and
    own-domain protection refuses it, as soon as DATA ends (no DNS timeout: the timeout below is
    the liveness bound; each unanswered lookup took 10 s before the demo had its DNS)."""
    d, base, new = demo
    out = (d.parent / "out.log").read_text()
    assert "--h-From 'Boss <demo@example.test>'" in out and "550 5.7.1" in out  # the hint
    with smtplib.SMTP("127.0.0.1", base + 25, timeout=8) as s:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("demo@example.test", ["demo@example.test"], FORGED)
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1 ")
    # A message sent after it is delivered; the refused one never is.
    with smtplib.SMTP("127.0.0.1", base + 126, timeout=30) as s:
        s.sendmail("nas@example.test", ["demo@example.test"], "From: nas@example.test\r\nSubject: after forged\r\n\r\nx\r\n")
    _delivered(new, "after forged")
    assert not any("urgent wire transfer" in f.read_text() for f in new.iterdir())


def test_remote_sender_is_verified_and_delivered_with_authentication_results(demo):
    """example.net is not the demo's: every lookup for it is REFUSED at once, so SPF and DMARC are
    temperrors (RFC 7208 2.6.6, RFC 7489 6.6.2: no policy is applied) and the message is delivered,
    with our Authentication-Results on top."""
    d, base, new = demo
    with smtplib.SMTP("127.0.0.1", base + 25, timeout=8, local_hostname="client.example.net") as s:
        s.sendmail("you@example.net", ["demo@example.test"], "From: you@example.net\r\nSubject: remote\r\n\r\nhi\r\n")
    text = _delivered(new, "remote")
    header = text.split("\n\n", 1)[0]
    assert "Authentication-Results: mail.example.test;" in header
    ar = header.split("Authentication-Results: ", 1)[1].split("\n" + "Date:", 1)[0]
    assert "spf=temperror smtp.mailfrom=example.net" in ar
    assert "spf=temperror smtp.helo=client.example.net" in ar
    assert "dkim=none" in ar and "dmarc=temperror header.from=example.net" in ar


def test_demo_dns_serves_the_records_dns_records_prints(demo):
    d, base, _ = demo
    cfg = load_config(str(d / "backend.toml"))
    server = ("127.0.0.1", base + 53)

    def ask(name, rdtype, tcp=False):
        q = dns.message.make_query(name, rdtype)
        return (dns.query.tcp if tcp else dns.query.udp)(q, server[0], timeout=5, port=server[1])

    rsa = next(k for k in cfg.dkim if k.algorithm == "rsa")
    for tcp in (False, True):
        r = ask(f"{rsa.selector}._domainkey.example.test", "TXT", tcp)
        assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
        assert [b"".join(t.strings).decode() for t in r.answer[0]] == [dkim_txt_record(rsa.private_key, "rsa")]
    r = ask("_dmarc.example.test", "TXT")
    assert [b"".join(t.strings).decode() for t in r.answer[0]] == [
        "v=DMARC1; p=none; rua=mailto:postmaster@example.test"]
    r = ask("example.test", "TXT")
    assert [b"".join(t.strings).decode() for t in r.answer[0]] == ["v=spf1 ip4:192.0.2.25 -all"]
    r = ask("nothing.example.test", "TXT")  # RFC 2308: NXDOMAIN with the SOA, authoritative
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA
    assert r.authority[0].rdtype == dns.rdatatype.SOA
    r = ask("_domainkey.example.test", "TXT")  # RFC 8020: a name with descendants exists: NODATA
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority[0].rdtype == dns.rdatatype.SOA
    r = ask("example.net", "MX")  # not ours: refused, not answered, never forwarded
    assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.AA and not r.answer
    # `dns check` against the demo's DNS: every record it expects is there, the PTR too. DNS only:
    # the demo's gateway address is a documentation address nothing answers on.
    check = subprocess.run([BACKEND_CLI, "dns", "check", "--dns-only", "-c", str(d / "backend.toml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "FAIL" not in check.stdout


ZONE = """example.test. 3600 IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60
example.test. 3600 IN NS ns.example.test.
big.example.test. 3600 IN TXT {strings}
"""


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp():
    """RFC 2181 9 / RFC 7766: past 512 bytes without EDNS, the UDP answer is empty with TC set; the
    same query over TCP, or with an EDNS payload that fits it, gets the whole answer."""
    strings = " ".join(f'"{c * 200}"' for c in "abc")  # 600 bytes of TXT
    zones = DemoZones([dns.zone.from_text(ZONE.format(strings=strings), origin="example.test.", relativize=False)])
    query = dns.message.make_query("big.example.test", "TXT")
    udp = dns.message.from_wire(zones.respond(query.to_wire(), udp=True))
    assert udp.flags & dns.flags.TC and not udp.answer and udp.id == query.id
    tcp = dns.message.from_wire(zones.respond(query.to_wire(), udp=False))
    assert not tcp.flags & dns.flags.TC and len(b"".join(tcp.answer[0][0].strings)) == 600
    edns = dns.message.make_query("big.example.test", "TXT", use_edns=0, payload=1232)
    assert dns.message.from_wire(zones.respond(edns.to_wire(), udp=True)).answer


def test_garbage_gets_formerr_and_responses_get_nothing():
    zones = DemoZones([dns.zone.from_text(ZONE.format(strings='"x"'), origin="example.test.", relativize=False)])
    reply = dns.message.from_wire(zones.respond(b"\x12\x34" + b"\x00" * 10 + b"\xff", udp=True))
    assert reply.id == 0x1234 and reply.rcode() == dns.rcode.FORMERR
    response = dns.message.make_response(dns.message.make_query("example.test", "SOA"))
    assert zones.respond(response.to_wire(), udp=True) is None  # never answer an answer (no loops)
    assert zones.respond(b"\x12", udp=True) is None
