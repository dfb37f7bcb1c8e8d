"""Independent DKIM verification: OpenDKIM (RSA and Ed25519) and Perl Mail::DKIM (RSA) against TXT records served by nsd.

opendkim-testmsg and Mail::DKIM resolve through /etc/resolv.conf, so they run inside a throwaway
network namespace whose /etc/netns/NAME/resolv.conf points at an nsd listening on 127.0.0.1:53
inside that namespace. The namespace and its /etc/netns directory are always removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.dkim import keys as dkim_keys
from backend.dkim import sign as dkim
from tests.conftest import require_root, require_tool
from tests.lab.nsd import NSD, zone_text

pytestmark = pytest.mark.netns

MESSAGE = (
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@remote.test>\n"
    b"Subject: independent verification\n"
    b"Date: Mon, 03 Jun 2024 10:00:00 +0000\n"
    b"Message-ID: <verify-1@example.org>\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"\n"
    b"Hello Bob,\n.a line with a leading dot\ntrailing spaces   \n\n\n"
)

PERL_VERIFY = r"""
use strict; use Mail::DKIM::Verifier;
my $v = Mail::DKIM::Verifier->new();
local $/; my $msg = <STDIN>; $msg =~ s/\r?\n/\r\n/g;
$v->PRINT($msg); $v->CLOSE();
foreach my $sig ($v->signatures) { printf "%s %s %s\n", $sig->algorithm, $sig->result, ($sig->result_detail // ''); }
"""


@pytest.fixture(scope="module")
def netns_dns(tmp_path_factory):
    """A namespace with lo up, its own resolv.conf, and nsd on 127.0.0.1:53 serving the DKIM keys."""
    require_root()
    require_tool("ip", "/usr/sbin/nsd", "dig", "opendkim-testmsg")
    tmp = tmp_path_factory.mktemp("dkimverify")
    keys = []
    records = ""
    for alg, sel in (("rsa", "rsa1"), ("ed25519", "ed1")):
        g = dkim_keys.generate_key("example.org", sel, alg, tmp)
        keys.append(SimpleNamespace(domain="example.org", selector=sel, algorithm=alg, private_key=g.path))
        records += g.zone_line() + "\n"
    name = f"hmxdk-{uuid.uuid4().hex[:8]}"
    etc = Path("/etc/netns") / name
    ns = None
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        ns = NSD(
            {"example.org": zone_text("example.org", records, ns_address="127.0.0.1")},
            address="127.0.0.1",
            port=53,
            netns_exec=["ip", "netns", "exec", name],
            workdir=tmp / "nsd",
        )
        ns.start()
        yield SimpleNamespace(name=name, keys=keys)
    finally:
        if ns is not None:
            ns.close()
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name])
        shutil.rmtree(etc, ignore_errors=True)


def run_in(ns, cmd, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns.name, *cmd], input=data, capture_output=True, timeout=60)


def only_signature(signed: bytes, algorithm: str) -> bytes:
    """The message with only the DKIM-Signature whose a= is ``algorithm`` (folded lines included)."""
    head, _, body = signed.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    kept = [f for f in fields if not f.lower().startswith(b"dkim-signature:") or re.search(rb"a=" + algorithm.encode() + rb";", f)]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def opendkim(ns, message: bytes) -> subprocess.CompletedProcess:
    return run_in(ns, ["opendkim-testmsg"], message)


def test_opendkim_verifies_both_signatures_each_alone(netns_dns):
    signed = dkim.sign_message(MESSAGE, netns_dns.keys)
    assert dkim.signature_count_by_algorithm(signed) == {"rsa-sha256": 1, "ed25519-sha256": 1}
    for alg in ("rsa-sha256", "ed25519-sha256"):
        alone = only_signature(signed, alg)
        assert dkim.signature_count_by_algorithm(alone) == {alg: 1}
        r = opendkim(netns_dns, alone)
        assert r.returncode == 0, (alg, r.stdout, r.stderr)
    r = opendkim(netns_dns, signed)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_opendkim_rejects_a_tampered_body(netns_dns):
    # The verifier must be able to fail: the same signatures over a changed body are bad.
    signed = dkim.sign_message(MESSAGE, netns_dns.keys)
    tampered = signed.replace(b"Hello Bob", b"Hello Eve")
    for alg in ("rsa-sha256", "ed25519-sha256"):
        r = opendkim(netns_dns, only_signature(tampered, alg))
        assert r.returncode != 0, alg


def test_opendkim_verifies_lf_input_after_crlf_canonicalisation(netns_dns):
    # Input with bare LF, as a LAN app might submit it; stored/relayed with LF again afterwards.
    signed = dkim.sign_message(MESSAGE, netns_dns.keys)
    for alg in ("rsa-sha256", "ed25519-sha256"):
        r = opendkim(netns_dns, only_signature(signed, alg).replace(b"\r\n", b"\n"))
        assert r.returncode == 0, (alg, r.stdout, r.stderr)


def test_mail_dkim_verifies_the_rsa_signature(netns_dns):
    require_tool("perl")
    if subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True).returncode != 0:
        require_tool("Mail::DKIM (libmail-dkim-perl)")  # not a path: skips locally, fails under CI
    signed = dkim.sign_message(MESSAGE, netns_dns.keys)
    r = run_in(netns_dns, ["perl", "-e", PERL_VERIFY], signed)
    lines = dict(l.split(" ", 1) for l in r.stdout.decode().splitlines())
    assert lines["rsa-sha256"].startswith("pass"), r.stdout
    tampered = run_in(netns_dns, ["perl", "-e", PERL_VERIFY], signed.replace(b"Hello Bob", b"Hello Eve"))
    assert dict(l.split(" ", 1) for l in tampered.stdout.decode().splitlines())["rsa-sha256"].startswith("fail")
