"""Mail clients through the gateway's public address: IMAPS to 198.51.100.10:993 → tunnel → Dovecot at
home, started from the configuration provisioning renders (tests/lab/dovecot.py includes
provision.render.dovecot_conf_text verbatim). Read with imaplib and with an independent client,
curl's IMAP; TLS ends at home (the certificate served is the home's own file).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.lab.topology import HOSTNAME, REMOTE_DOMAIN, USERS, MailLab, wait_until

ALICE, CAROL = "alice@example.org", "carol@example.org"
DELIVERY_TIMEOUT = 30

IMAP_READ = r"""
import imaplib, json, ssl, sys
host, user, pw, subject = sys.argv[1:5]
ctx = ssl._create_unverified_context()  # the served certificate is compared with the home's file
with imaplib.IMAP4_SSL(host, 993, ssl_context=ctx, timeout=20) as m:
    cert = m.sock.getpeercert(binary_form=True).hex()
    m.login(user, pw)
    special = sorted(l.decode() for l in m.list('(SPECIAL-USE) ""', "*")[1])
    subscribed = sorted(l.decode().rsplit(" ", 1)[1] for l in m.lsub()[1])
    selectable = [name for name in ("Drafts", "Junk", "Sent", "Trash") if m.select(name, readonly=True)[0] == "OK"]
    m.select("INBOX", readonly=True)
    ids = m.search(None, "SUBJECT", '"%s"' % subject)[1][0].split() if subject else []
    bodies = [m.fetch(i, "(RFC822)")[1][0][1].decode(errors="replace") for i in ids]
print(json.dumps({"cert": cert, "special_use": special, "subscribed": subscribed, "selectable": selectable,
                  "bodies": bodies}))
"""

SPECIAL_USE = ['(\\Drafts) "." Drafts', '(\\Junk) "." Junk', '(\\Sent) "." Sent', '(\\Trash) "." Trash']


def _home_cert(lab: MailLab) -> x509.Certificate:
    return x509.load_pem_x509_certificate(lab.dovecot.cert.read_bytes())


def _deliver(lab: MailLab, to: str) -> str:
    subject = f"imap-{uuid.uuid4().hex[:10]}"
    r = lab.swaks("--server", f"{lab.gateway_addr}:25", "--from", f"someone@{REMOTE_DOMAIN}", "--to", to,
                  "--h-Subject", subject, "--body", f"body of {subject}")
    assert r.returncode == 0 and "250 2.0.0" in r.stdout, r.stdout + r.stderr
    wait_until(lambda: any(subject.encode() in m for m in lab.maildir_messages(to)), DELIVERY_TIMEOUT,
               f"{subject} in {to}'s Maildir")
    return subject


def test_imaplib_reads_mail_through_the_gateway_public_address(mail_lab: MailLab):
    lab = mail_lab
    subject = _deliver(lab, ALICE)
    out = lab.python(lab.internet, IMAP_READ, lab.gateway_addr, ALICE, USERS[ALICE], subject)
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads(out.stdout)
    assert len(got["bodies"]) == 1 and f"body of {subject}" in got["bodies"][0]
    assert bytes.fromhex(got["cert"]) == _home_cert(lab).public_bytes(Encoding.DER)
    assert f"rip={lab.internet_addr}" in lab.dovecot.log()  # the client's address, from the PROXY header


def test_curl_reads_mail_through_the_gateway_public_address(mail_lab: MailLab):
    """curl (libcurl's own IMAP client) by the mail host name, resolved to the gateway's public
    address, with the home certificate's public key pinned."""
    lab = mail_lab
    subject = _deliver(lab, ALICE)
    spki = _home_cert(lab).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    pin = "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    curl = ["curl", "-sS", "--max-time", "20", "--insecure", "--pinnedpubkey", pin,
            "--resolve", f"{HOSTNAME}:993:{lab.gateway_addr}", "-u", f"{ALICE}:{USERS[ALICE]}"]
    r = lab.internet.run([*curl, "-X", f"SEARCH SUBJECT {subject}", f"imaps://{HOSTNAME}/INBOX"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    found = r.stdout.split()  # "* SEARCH 7"
    assert found[:2] == ["*", "SEARCH"] and len(found) == 3, r.stdout
    r = lab.internet.run([*curl, f"imaps://{HOSTNAME}/INBOX;MAILINDEX={found[2]}"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Subject: {subject}" in r.stdout and f"body of {subject}" in r.stdout
    # a wrong password gets nothing
    bad = ["curl", *curl[1:-1], f"{ALICE}:not-the-password"]
    r = lab.internet.run([*bad, f"imaps://{HOSTNAME}/INBOX;MAILINDEX={found[2]}"], check=False)
    assert r.returncode == 67 and subject not in r.stdout, (r.returncode, r.stdout, r.stderr)  # CURLE_LOGIN_DENIED


def test_special_use_folders_exist_on_first_login(mail_lab: MailLab):
    lab = mail_lab
    maildir = lab.maildir(CAROL)
    assert not any((maildir / f".{name}").exists() for name in ("Drafts", "Sent", "Trash")), maildir
    out = lab.python(lab.internet, IMAP_READ, lab.gateway_addr, CAROL, USERS[CAROL], "")
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads(out.stdout)
    assert got["special_use"] == SPECIAL_USE
    assert {"Drafts", "Junk", "Sent", "Trash"} <= set(got["subscribed"])
    assert got["selectable"] == ["Drafts", "Junk", "Sent", "Trash"], got
