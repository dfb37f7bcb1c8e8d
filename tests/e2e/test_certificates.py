"""Issue 14 acceptance over the namespace lab: the home's certificate from ACME through the gateway,
served everywhere, renewed and reloaded without a restart, kept when the CA is down; the home's web
face (autoconfig, autodiscover, MTA-STS) and its DNS records; the TLS settings as testssl.sh sees
them; and no private key on the gateway host but its WireGuard key.

The CA is a real Pebble (Debian's ``pebble``) in the internet namespace, validating the names at the
gateway's address through the lab's nsd (tests/lab/topology.py, ``MailLab(acme=True)``). Every
client runs in the internet namespace and connects to the gateway's public address, trusting only
Pebble's root (fetched from Pebble's management interface, new at each Pebble start).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from backend.tls import certfiles
from tests.conftest import require_tool
from tests.e2e.test_scenarios import ALICE, DELIVERY_TIMEOUT, metric, tag, with_subject
from tests.lab.netns import NETNS_ETC
from tests.lab.topology import HOME_DOMAIN, HOSTNAME, MailLab, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NAMES = [HOSTNAME, f"mta-sts.{HOME_DOMAIN}", f"autoconfig.{HOME_DOMAIN}"]
# Every place a client meets the certificate, through the gateway: (port, how TLS starts).
TLS_PORTS = [(25, "starttls"), (587, "starttls"), (465, "tls"), (993, "tls"), (443, "tls")]

# One process in the internet namespace does every handshake: the serial (hex) each port shows to
# a client that trusts only Pebble's root and checks the name, or the error.
HANDSHAKES = r"""
import json, socket, ssl, sys
from cryptography import x509
host, cafile, name = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=cafile)

def reply(f):
    lines = []
    while True:
        line = f.readline()
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)

out = {}
for spec in sys.argv[4:]:
    port, mode = spec.split("/")
    try:
        sock = socket.create_connection((host, int(port)), timeout=20)
        if mode == "starttls":
            f = sock.makefile("rb")
            reply(f)
            sock.sendall(b"EHLO probe.remote.test\r\n"); reply(f)
            sock.sendall(b"STARTTLS\r\n")
            assert reply(f).startswith(b"220"), "no STARTTLS"
        with ctx.wrap_socket(sock, server_hostname=name) as tls:
            cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            out[port] = format(cert.serial_number, "x")
    except Exception as e:
        out[port] = "error: %r" % e
print(json.dumps(out))
"""


def pebble_root(lab: MailLab) -> str:
    """Pebble's current root (PEM) in a file the namespace's clients read; returns its path."""
    path = lab.work / f"pebble-root-{time.monotonic_ns()}.pem"
    path.write_bytes(lab.pebble.issuer_root())
    return str(path)


def cert_status(lab: MailLab) -> dict:
    r = lab.backend_cli("cert", "status", "--json")
    return json.loads(r.stdout)


def live_serial(lab: MailLab) -> str:
    info = certfiles.read_live(lab.acme_dir)
    return format(info.serial, "x")


def served_serials(lab: MailLab, name: str = HOSTNAME, ports=TLS_PORTS, root: str | None = None) -> dict[int, str]:
    r = lab.python(lab.internet, HANDSHAKES, lab.gateway_addr, root or pebble_root(lab), name,
                   *(f"{p}/{m}" for p, m in ports))
    assert r.returncode == 0, r.stdout + r.stderr
    return {int(k): v for k, v in json.loads(r.stdout).items()}


def renew_now(lab: MailLab) -> subprocess.CompletedProcess:
    return lab.backend_cli("cert", "renew", "--now", "--wait", "60")


def issued(lab: MailLab) -> str:
    """The live certificate comes from the running Pebble (its intermediate: a Pebble restarted by an
    earlier scenario has new ones) and the last attempt succeeded; a forced renewal makes it so
    otherwise. Returns its serial."""
    st = cert_status(lab)
    intermediate = x509.load_pem_x509_certificate(lab.pebble.intermediate())
    current = intermediate.subject.rfc4514_string()
    if st["certificate"] is None or st["certificate"]["issuer"] != current or st["renewal"]["last_result"] != "success":
        r = renew_now(lab)
        assert r.returncode == 0, r.stdout + r.stderr
    return live_serial(lab)


def log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def backend_pid(lab: MailLab) -> int:
    return lab.backend_proc.pid


# ---------------------------------------------------------------- issuance and where it is served


def test_14_http01_certificate_through_the_gateway_served_on_25_587_465_993_443(mail_lab: MailLab):
    lab = mail_lab
    # The backend started with a placeholder and ordered at once; Pebble validated http-01 at the
    # gateway's port 80 (MailLab waited for that first attempt).
    st = cert_status(lab)
    assert st["renewal"]["last_result"] == "success", st
    assert st["challenge"] == "http-01"
    cert = st["certificate"]
    assert not cert["placeholder"] and "Pebble" in cert["issuer"] and sorted(cert["names"]) == sorted(NAMES)
    assert "certificate issued for" in lab.backend_log.read_text()
    # Pebble's http-01 requests came through the gateway's passthrough listener on 80 (no other
    # client of the internet host uses port 80; the lab's readiness probe got no upstream).
    assert re.search(r"listener=http client=\[198\.51\.100\.1\]:\d+ outcome=relayed up=[1-9]",
                     lab.gateway_log.read_text())
    serial = issued(lab)
    # Every name the certificate has, every port: Pebble's certificate, name checked.
    for name in NAMES:
        ports = TLS_PORTS if name == HOSTNAME else [(443, "tls")]
        assert served_serials(lab, name, ports) == {p: serial for p, _ in ports}, name


def test_14_forced_renewal_new_serial_same_daemon_open_session_completes(mail_lab: MailLab):
    lab = mail_lab
    old = issued(lab)
    pid = backend_pid(lab)
    subject = tag("s14-renewal")
    # A session opened before the renewal: TLS up, envelope given, DATA waits for our go.
    session = lab.internet.popen([sys.executable, "-u", "-c", OPEN_SESSION, lab.gateway_addr, pebble_root(lab),
                                  HOSTNAME, ALICE, subject], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    first = session.stdout.readline()
    assert first.startswith("envelope accepted"), first + session.stdout.read()
    seen_by_session = first.split()[-1]
    assert seen_by_session == old

    r = renew_now(lab)
    assert r.returncode == 0, r.stdout + r.stderr
    new = live_serial(lab)
    assert new != old and f"serial {new}" in r.stdout

    # New handshakes everywhere see the new serial (Dovecot through the backend's reload_hook);
    # the backend was never restarted.
    assert served_serials(lab) == {p: new for p, _ in TLS_PORTS}
    assert backend_pid(lab) == pid and lab.backend_proc.poll() is None
    assert re.search(r"reload_hook .* done", lab.backend_log.read_text())

    # The session opened before completes its transaction on its old TLS session.
    out, _ = session.communicate("go\n", timeout=60)
    assert session.returncode == 0 and out.startswith("250 "), out
    wait_until(lambda: with_subject(lab.maildir_messages(ALICE), subject), DELIVERY_TIMEOUT, "the message in the Maildir")


OPEN_SESSION = r"""
import socket, ssl, sys, time, email.utils
from cryptography import x509
host, cafile, name, rcpt, subject = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=cafile)
sock = socket.create_connection((host, 25), timeout=60)
f = sock.makefile("rb")
def reply():
    lines = []
    while True:
        line = f.readline().decode()
        lines.append(line)
        if line[3:4] != "-":
            return "".join(lines)
def cmd(line, want):
    s.sendall(line.encode() + b"\r\n")
    r = reply()
    assert r.startswith(want), (line, r)
    return r
s = sock
reply()
cmd("EHLO mx.remote.test", "250")
cmd("STARTTLS", "220")
s = ctx.wrap_socket(sock, server_hostname=name)
f = s.makefile("rb")
serial = format(x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number, "x")
cmd("EHLO mx.remote.test", "250")
cmd("MAIL FROM:<someone@remote.test>", "250")
cmd("RCPT TO:<%s>" % rcpt, "250")
print("envelope accepted", serial, flush=True)
sys.stdin.readline()
cmd("DATA", "354")
msg = ("From: someone@remote.test\r\nTo: %s\r\nSubject: %s\r\nDate: %s\r\nMessage-ID: <%s@remote.test>\r\n\r\n"
       "opened before the renewal\r\n.") % (rcpt, subject, email.utils.formatdate(), subject)
print(cmd(msg, "250").strip(), flush=True)
cmd("QUIT", "221")
"""


def test_14_tls_alpn01_certificate_through_the_gateway_443(mail_lab: MailLab):
    lab = mail_lab
    old = issued(lab)
    lab.set_acme_challenge("tls-alpn-01")
    try:
        gw_offset = lab.gateway_log.stat().st_size
        r = renew_now(lab)
        assert r.returncode == 0, r.stdout + r.stderr
        assert cert_status(lab)["challenge"] == "tls-alpn-01"
        new = live_serial(lab)
        assert new != old
        # Pebble validated on 443 only (RFC 8737: TLS with ALPN acme-tls/1), through the passthrough.
        during = log_since(lab.gateway_log, gw_offset)
        assert re.search(r"listener=https client=\[198\.51\.100\.1\]:\d+ outcome=relayed up=[1-9]", during), during
        assert not re.search(r"listener=http client=", during), during
        assert served_serials(lab) == {p: new for p, _ in TLS_PORTS}
    finally:
        lab.set_acme_challenge("http-01")


def _iso(t: str) -> float:
    return time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone


def test_14_pebble_down_backoff_old_certificate_kept_expiry_metric(mail_lab: MailLab):
    lab = mail_lab
    old = issued(lab)
    root = pebble_root(lab)  # what the old certificate chains to (a restarted Pebble has a new root)
    not_after = certfiles.read_live(lab.acme_dir).not_after
    lab.pebble.stop()
    try:
        # Each failed attempt backs off twice as long: about 1 then 2 minutes (±10 % jitter).
        for failures, backoff in ((1, 60), (2, 120)):
            r = renew_now(lab)
            assert r.returncode == 1 and "cert renew: failed" in r.stderr, r.stdout + r.stderr
            st = cert_status(lab)
            renewal = st["renewal"]
            assert renewal["last_result"] == "failure" and renewal["failures"] == failures, st
            wait = _iso(renewal["next_attempt"]) - _iso(renewal["last_attempt"])
            assert 0.9 * backoff - 2 <= wait <= 1.1 * backoff + 2, renewal
        assert lab.backend_cli("cert", "status").returncode == 1  # monitoring sees the failure
        # The old certificate keeps serving everywhere; the metric still gives its expiry (days left).
        assert served_serials(lab, root=root) == {p: old for p, _ in TLS_PORTS}
        scrape = lab.scrape("backend")
        assert metric(scrape, "homemx_backend_cert_expiry_timestamp_seconds") == pytest.approx(not_after)
        assert (not_after - time.time()) / 86400 > 30
        assert metric(scrape, "homemx_backend_cert_renewal_failures") == 2
        assert metric(scrape, "homemx_backend_cert_renewal_attempts_total", result="failure") >= 2
    finally:
        lab.pebble.start()
    # The CA is back (a new Pebble: new root, no accounts): the next renewal registers again and issues.
    r = renew_now(lab)
    assert r.returncode == 0, r.stdout + r.stderr
    assert cert_status(lab)["renewal"]["failures"] == 0
    assert served_serials(lab) == {p: live_serial(lab) for p, _ in TLS_PORTS}


def test_14_pebble_bad_nonces_are_retried(mail_lab: MailLab):
    lab = mail_lab
    old = issued(lab)
    lab.pebble.stop()
    lab.pebble.nonce_reject = 50  # PEBBLE_WFE_NONCEREJECT: half of the requests get badNonce
    lab.pebble.start()
    try:
        offset = lab.backend_log.stat().st_size
        r = renew_now(lab)
        assert r.returncode == 0, r.stdout + r.stderr
        assert live_serial(lab) != old
        assert "urn:ietf:params:acme:error:badNonce" in log_since(lab.backend_log, offset)
    finally:
        lab.pebble.stop()
        lab.pebble.nonce_reject = 0
        lab.pebble.start()
    issued(lab)


# ---------------------------------------------------------------- the web face and DNS

FETCH = r"""
import json, ssl, sys, urllib.request
url, cafile, body = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
req = urllib.request.Request(url, data=body.encode() if body else None,
                             headers={"Content-Type": "text/xml"} if body else {})
with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
    print(json.dumps({"status": r.status, "type": r.headers.get("Content-Type"), "body": r.read().decode()}))
"""


def fetch(lab: MailLab, url: str, body: str = "") -> dict:
    """GET (or POST ``body``) ``url`` from the internet, the name resolved by the lab's nsd to the
    gateway, over HTTPS trusting only Pebble's root."""
    r = lab.python(lab.internet, FETCH, url, pebble_root(lab), body)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_14_autoconfig_through_the_gateway_matches_the_listeners(mail_lab: MailLab):
    lab = mail_lab
    issued(lab)
    for url in (f"https://autoconfig.{HOME_DOMAIN}/mail/config-v1.1.xml?emailaddress={ALICE}",
                f"https://{HOSTNAME}/.well-known/autoconfig/mail/config-v1.1.xml"):
        got = fetch(lab, url)
        assert got["status"] == 200 and "xml" in got["type"], got
        provider = ET.fromstring(got["body"]).find("emailProvider")
        assert provider.get("id") == HOME_DOMAIN
        assert [d.text for d in provider.findall("domain")] == [HOME_DOMAIN]
        servers = [(s.get("type"), s.findtext("hostname"), int(s.findtext("port")), s.findtext("socketType"))
                   for s in [*provider.findall("incomingServer"), *provider.findall("outgoingServer")]]
        # What the gateway passes through: Dovecot's 993, the backend's 465 and 587.
        assert servers == [("imap", HOSTNAME, 993, "SSL"), ("smtp", HOSTNAME, 465, "SSL"),
                           ("smtp", HOSTNAME, 587, "STARTTLS")], servers
        assert {s.findtext("username") for s in provider.iter() if s.tag.endswith("Server")} == {"%EMAILADDRESS%"}
    # Every server it names answers through the gateway with the certificate for that name.
    serial = live_serial(lab)
    assert served_serials(lab, ports=[(993, "tls"), (465, "tls"), (587, "starttls")]) == \
        {993: serial, 465: serial, 587: serial}


AUTODISCOVER_REQUEST = f"""<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>{ALICE}</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>"""


def test_14_autodiscover_answers_through_the_gateway(mail_lab: MailLab):
    lab = mail_lab
    issued(lab)
    got = fetch(lab, f"https://{HOSTNAME}/autodiscover/autodiscover.xml", AUTODISCOVER_REQUEST)
    assert got["status"] == 200, got
    ns = {"a": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
    protocols = ET.fromstring(got["body"]).findall(".//a:Protocol", ns)
    found = {(p.findtext("a:Type", namespaces=ns), p.findtext("a:Server", namespaces=ns),
              int(p.findtext("a:Port", namespaces=ns))) for p in protocols}
    assert ("IMAP", HOSTNAME, 993) in found and ("SMTP", HOSTNAME, 465) in found, got["body"]
    assert {p.findtext("a:LoginName", namespaces=ns) for p in protocols} == {ALICE}


def test_14_mta_sts_policy_through_the_gateway_matches_the_txt_id(mail_lab: MailLab):
    lab = mail_lab
    issued(lab)
    got = fetch(lab, f"https://mta-sts.{HOME_DOMAIN}/.well-known/mta-sts.txt")
    assert got["status"] == 200 and got["type"].startswith("text/plain"), got
    policy = dict(line.split(": ", 1) for line in got["body"].splitlines() if line)
    assert policy["version"] == "STSv1" and policy["mode"] == "testing" and policy["mx"] == HOSTNAME
    txt = lab.internet.run(["dig", "+short", "TXT", f"_mta-sts.{HOME_DOMAIN}", f"@{lab.internet_addr}"]).stdout
    assert re.search(r'"v=STSv1; id=\w+"', txt), txt


def test_14_srv_records_answered_by_the_lab_dns(mail_lab: MailLab):
    lab = mail_lab
    want = {"_submissions._tcp": f"0 1 465 {HOSTNAME}.", "_submission._tcp": f"10 1 587 {HOSTNAME}.",
            "_imaps._tcp": f"0 1 993 {HOSTNAME}.", "_imap._tcp": "0 0 0 .", "_pop3s._tcp": "0 0 0 .",
            "_pop3._tcp": "0 0 0 ."}
    for name, value in want.items():
        r = lab.internet.run(["dig", "+short", "SRV", f"{name}.{HOME_DOMAIN}", f"@{lab.internet_addr}"])
        assert r.stdout.strip() == value, (name, r.stdout)
    for name in ("mta-sts", "autoconfig"):
        r = lab.internet.run(["dig", "+short", "A", f"{name}.{HOME_DOMAIN}", f"@{lab.internet_addr}"])
        assert r.stdout.split() == [f"{HOSTNAME}.", lab.gateway_addr], (name, r.stdout)


# ---------------------------------------------------------------- testssl.sh

# Per target: the ciphers each protocol accepts (-E), the server's defaults (-S: session tickets,
# resumption) and LUCKY13 (-L); --ssl-native (openssl, not testssl's bash sockets) and short
# socket sleeps keep each run at about 15 s, and the two targets run side by side.
TESTSSL = ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none", "--ssl-native",
           "-E", "-S", "-L"]
AEAD = {"AESGCM", "CHACHA20", "ChaCha20", "AESCCM", "AESCCM8"}


def _testssl(lab: MailLab, target: str, *extra: str) -> list[dict]:
    out = lab.work / f"testssl-{target.replace(':', '-')}.json"
    env = dict(os.environ, USLEEP_SND="0.02", USLEEP_REC="0.02")
    r = lab.internet.run([*TESTSSL, *extra, "--jsonfile", str(out), target], check=False, timeout=180, env=env)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_14_testssl_465_and_starttls_587_no_cbc_no_ticket(mail_lab: MailLab):
    require_tool("testssl")
    lab = mail_lab
    issued(lab)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        implicit = pool.submit(_testssl, lab, f"{lab.gateway_addr}:465")
        starttls = pool.submit(_testssl, lab, f"{lab.gateway_addr}:587", "-t", "smtp")
        results = {465: implicit.result(), 587: starttls.result()}
    print(f"testssl.sh on 465 and 587: {time.monotonic() - t0:.1f} s")
    for port, findings in results.items():
        by_id = {f["id"]: f for f in findings}
        ciphers = [f for f in findings if f["id"].startswith("cipher-")]
        # Found some (the scan ran): TLS 1.2 and 1.3 AEAD suites, nothing below TLS 1.2 (ids
        # cipher-tls1_xHEX for TLS 1.0, cipher-tls1_1_xHEX for 1.1).
        assert any(f["id"].startswith("cipher-tls1_2_") for f in ciphers), (port, findings)
        assert any(f["id"].startswith("cipher-tls1_3_") for f in ciphers), (port, findings)
        assert not [f for f in ciphers if re.match(r"cipher-(ssl|tls1_x|tls1_1_)", f["id"])], (port, ciphers)
        # The finding's columns: protocol, hexcode, OpenSSL name, key exchange, encryption, bits, IANA name.
        encryption = {f["id"]: f["finding"].split()[-3] for f in ciphers}
        assert set(encryption.values()) <= AEAD, (port, encryption)
        assert not [f for f in ciphers if "CBC" in f["finding"]], (port, ciphers)
        assert by_id["LUCKY13"]["finding"].startswith("not vulnerable"), (port, by_id["LUCKY13"])
        assert by_id["TLS_session_ticket"]["finding"].startswith("no"), (port, by_id["TLS_session_ticket"])
        assert by_id["sessionresumption_ticket"]["finding"] == "not supported", (port, by_id["sessionresumption_ticket"])


# ---------------------------------------------------------------- no key on the gateway

PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----")
WG_KEY = re.compile(rb"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=(?![A-Za-z0-9+/=])")  # base64 of 32 bytes


def gateway_host_files(lab: MailLab) -> list[Path]:
    """What a gateway VPS holds, in the lab (one machine hosts every role, so "the gateway host" is
    defined by what belongs to the gateway): its config dir (config and log), the tunnel's
    gateway-side files (wg-quick file, key files ``tunnel keygen`` wrote, egress rules, the state
    dir's files for its interface), /etc/netns/<gateway namespace> (its /etc), and every regular
    file any process of the gateway namespace (homemx-gateway, wireguard-go) has open."""
    work = lab.work
    roots = [lab.gateway_conf.parent, lab.tunnel.gw_conf, work / "gw.key", work / "psk",
             *work.glob(f"{lab.tunnel.gw_if}.*"), *(work / "state").glob(f"{lab.tunnel.gw_if}.*"),
             NETNS_ETC / lab.gateway.name]
    for pid in lab.gateway.pids():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = Path(os.readlink(fd))
            except OSError:
                continue
            if target.is_absolute() and target.is_file():
                roots.append(target)
    files = set()
    for root in roots:
        if root.is_dir():
            files.update(p for p in root.rglob("*") if stat.S_ISREG(p.lstat().st_mode))
        elif root.is_file():
            files.add(root)
    return sorted(files)


def home_private_keys(lab: MailLab) -> dict[str, list[bytes]]:
    """Every private key the home holds (ACME account and certificate keys, DKIM keys), by file: its
    DER (PKCS#8) and the base64 body of its PEM, as they would appear if copied anywhere."""
    keys = {}
    for path in (lab.work / "home").rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if not PEM_PRIVATE_KEY.search(data):
            continue
        key = serialization.load_pem_private_key(data, None)
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        body = b"".join(line for line in data.splitlines() if line and not line.startswith(b"-----"))
        keys[str(path)] = [der, body[:64], base64.b64encode(der)[:64]]
    return keys


def test_14_no_private_key_on_the_gateway_host_but_its_wireguard_key(mail_lab: MailLab):
    lab = mail_lab
    issued(lab)
    files = gateway_host_files(lab)
    assert lab.gateway_log in files and lab.tunnel.gw_conf in files, files
    home_keys = home_private_keys(lab)
    # The certificate keys, live and archived, are among what we look for.
    assert any("/acme/archive/" in p for p in home_keys) and any("/acme/account.key" in p for p in home_keys)
    gw_private = (lab.work / "gw.key").read_bytes().strip()
    psk = (lab.work / "psk").read_bytes().strip()
    found = []
    wireguard = set()
    for path in files:
        data = path.read_bytes()
        if PEM_PRIVATE_KEY.search(data):
            found.append(f"{path}: PEM private key")
        try:
            serialization.load_der_private_key(data, None)
            found.append(f"{path}: DER private key")
        except (ValueError, TypeError):
            pass
        for where, needles in home_keys.items():
            if any(n in data for n in needles):
                found.append(f"{path}: material of the home's {where}")
        for token in WG_KEY.findall(data):
            if token in (gw_private, psk):
                wireguard.add(path)
    assert found == [], found
    # The one secret there: the gateway's WireGuard private key (and the tunnel's preshared key), in
    # the files the tunnel is made of: what the scan was able to see.
    assert wireguard == {lab.work / "gw.key", lab.work / "psk", lab.tunnel.gw_conf}, wireguard
