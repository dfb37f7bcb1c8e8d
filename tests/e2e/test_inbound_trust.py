"""Issue 13 acceptance over the namespace lab: what a home user's mx does with forged, quarantined,
rejected, properly signed and spam mail coming from the internet through the gateway.

The sending domains are served by the lab's nsd (tests/lab/topology.py SENDER_DOMAINS); signed mail
is sent by the internet's real Postfix after a fixture signer added its DKIM-Signature; rspamd is a
real one in the home namespace. Each scenario asserts what the user sees: the SMTP reply, the
message in the Inbox or in Junk, the Authentication-Results the backend wrote, a metric.
"""

from __future__ import annotations

import email.utils
import re

import pytest

from tests.e2e.test_scenarios import (
    ALICE,
    DELIVERY_TIMEOUT,
    headers_of,
    metric,
    tag,
    with_subject,
)
from tests.lab.rspamd import GTUBE_ADD_HEADER
from tests.lab.topology import HOSTNAME, SIGNED_DOMAIN, MailLab, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def junk_messages(lab: MailLab, address: str) -> list[bytes]:
    box = lab.maildir(address) / ".Junk"
    return [p.read_bytes() for sub in ("new", "cur") if (box / sub).is_dir() for p in sorted((box / sub).iterdir())]


def our_results(raw: bytes) -> list[str]:
    """The Authentication-Results fields that name our authserv-id, unfolded."""
    return [re.sub(r"\s+", " ", v) for v in headers_of(raw).get_all("Authentication-Results") or []
            if v.strip().lower().startswith(HOSTNAME)]


def send_mx(lab: MailLab, sender: str, from_header: str, subject: str, *extra: str):
    return lab.swaks("--server", f"{lab.gateway_addr}:25", "--from", sender, "--to", ALICE,
                     "--h-From", from_header, "--h-Subject", subject, *extra)


def test_13_forged_from_of_our_own_domain_is_refused(mail_lab: MailLab):
    # The first probe: a stranger claims to be one of our users, to one of our users.
    lab, subject = mail_lab, tag("s13-forged")
    r = send_mx(lab, ALICE, f"Boss <{ALICE}>", subject)
    assert "550 5.7.1" in r.stdout, r.stdout + r.stderr
    assert not with_subject(lab.maildir_messages(ALICE) + junk_messages(lab, ALICE), subject)


def test_13_dmarc_quarantine_goes_to_junk_and_reject_is_refused(mail_lab: MailLab):
    lab = mail_lab
    subject = tag("s13-quarantine")
    r = send_mx(lab, "news@quarantine.test", "News <news@quarantine.test>", subject)
    assert "250 2.0.0" in r.stdout, r.stdout + r.stderr
    [junked] = wait_until(lambda: with_subject(junk_messages(lab, ALICE), subject), DELIVERY_TIMEOUT,
                          "the quarantined message in alice's Junk")
    assert not with_subject(lab.maildir_messages(ALICE), subject)
    [ar] = our_results(junked)
    assert "spf=fail smtp.mailfrom=quarantine.test" in ar and "dmarc=fail header.from=quarantine.test" in ar, ar

    subject = tag("s13-reject")
    r = send_mx(lab, "news@reject.test", "News <news@reject.test>", subject)
    assert "550 5.7.1" in r.stdout, r.stdout + r.stderr


def test_13_signed_mail_from_a_real_postfix_lands_in_the_inbox_with_pass_results(mail_lab: MailLab):
    lab, subject = mail_lab, tag("s13-signed")
    sender = f"news@{SIGNED_DOMAIN}"
    msg = (f"From: News <{sender}>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
           f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{subject}@{SIGNED_DOMAIN}>\r\n\r\n"
           "Signed by the sending side, relayed by its Postfix.\r\n").encode()
    data = lab.work / f"{subject}.eml"
    data.write_bytes(lab.dkim_sign(msg))
    # The internet's Postfix (198.51.100.1, the only address signed.test's SPF allows) relays it to
    # example.org's MX: the gateway.
    r = lab.swaks("--server", f"{lab.internet_addr}:25", "--from", sender, "--to", ALICE, "--data", str(data))
    assert r.returncode == 0, r.stdout + r.stderr
    [got] = wait_until(lambda: with_subject(lab.maildir_messages(ALICE), subject), DELIVERY_TIMEOUT,
                       "the signed message in alice's Inbox")
    [ar] = our_results(got)
    assert f"spf=pass smtp.mailfrom={SIGNED_DOMAIN}" in ar, ar
    assert f"dkim=pass header.d={SIGNED_DOMAIN} header.s=lab2026" in ar, ar
    assert f"dmarc=pass header.from={SIGNED_DOMAIN}" in ar, ar
    assert not with_subject(junk_messages(lab, ALICE), subject)


def test_13_a_forged_authentication_results_for_our_id_is_removed(mail_lab: MailLab):
    lab, subject = mail_lab, tag("s13-forged-ar")
    r = send_mx(lab, "someone@remote.test", "someone@remote.test", subject,
                "--add-header", f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=bank.example; dmarc=pass",
                "--add-header", "X-Spam-Flag: NO")
    assert "250 2.0.0" in r.stdout, r.stdout + r.stderr
    [got] = wait_until(lambda: with_subject(lab.maildir_messages(ALICE), subject), DELIVERY_TIMEOUT,
                       "the message in alice's Inbox")
    [ar] = our_results(got)  # exactly one: ours
    assert "bank.example" not in ar and "spf=" in ar, ar
    assert b"X-Spam-Flag: NO" not in got


def test_13_gtube_is_refused_and_mail_flows_while_rspamd_is_down(mail_lab: MailLab):
    lab = mail_lab
    subject = tag("s13-gtube")
    r = send_mx(lab, "someone@remote.test", "someone@remote.test", subject, "--body", f"spam\n{GTUBE}\n")
    # rspamd's action for GTUBE is reject: 550 5.7.1 at the end of DATA, nothing stored.
    assert "550 5.7.1" in r.stdout, r.stdout + r.stderr
    assert not with_subject(junk_messages(lab, ALICE), subject)
    assert not with_subject(lab.maildir_messages(ALICE), subject)

    lab.stop_rspamd()
    try:
        subject = tag("s13-rspamd-down")
        r = send_mx(lab, "someone@remote.test", "someone@remote.test", subject)
        assert "250 2.0.0" in r.stdout, r.stdout + r.stderr  # fail-open (the default)
        wait_until(lambda: with_subject(lab.maildir_messages(ALICE), subject), DELIVERY_TIMEOUT, "the message")
        scraped = lab.scrape("backend")
        assert metric(scraped, "homemx_backend_rspamd_available") == 0
    finally:
        lab.start_rspamd()
