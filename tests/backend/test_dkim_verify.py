"""Independent DKIM verification: OpenDKIM (RSA and Ed25519) and Perl Mail::DKIM (RSA) against TXT records served by nsd.

opendkim-testmsg and Mail::DKIM resolve through /etc/resolv.conf, so they run inside a throwaway
network namespace whose /etc/netns/NAME/resolv.conf points at an nsd listening on 127.0.0.1:53
inside that namespace. The namespace and its /etc/netns directory are always removed.
"""

from __future__ import annotations

import subprocess

import pytest

from backend.dkim import sign as dkim
from tests.conftest import require_tool
from tests.lab.dkim import netns_dns, only_signature, opendkim, run_in  # noqa: F401 - fixture

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
