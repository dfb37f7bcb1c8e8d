"""Dovecot as provisioning sets it up at home: deploy.dovecot() run for real on this host (a local
stand-in for the SSH connection, files under a throwaway root), then the deployed dovecot.conf
checked with ``doveconf -n`` and served by a real Dovecot in a network namespace.

Namespaces (tests/lab/netns.py): "home" holds the backend's tunnel address 10.77.0.2 (Dovecot's
only listener); "peer" is the other end of the link with the gateway's tunnel address 10.77.0.1 and
a stranger's 10.77.0.3. Clients run in "peer", choose their source address and send (or not) the
PROXY header the gateway sends.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool

pytestmark = [pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
HOME, GATEWAY, STRANGER = "10.77.0.2", "10.77.0.1", "10.77.0.3"
USERS = {"alice@example.org": "alice-imap-pw"}

# An IMAPS client that connects from SRC, sends the gateway's PROXY header (v1 text: Dovecot reads
# v1 and v2) claiming CLIENT unless CLIENT is "-", then logs in and reports what it saw as JSON.
CLIENT = r"""
import imaplib, json, socket, ssl, sys
src, dst, port, client, user, password = sys.argv[1:7]

class Client(imaplib.IMAP4):
    def _create_socket(self, timeout):
        s = socket.create_connection((dst, int(port)), timeout=5, source_address=(src, 0))
        if client != "-":
            s.sendall(f"PROXY TCP4 {client} {dst} 40000 {port}\r\n".encode())
        return ssl._create_unverified_context().wrap_socket(s)

out = {}
try:
    m = Client(dst, int(port))
except (OSError, EOFError, imaplib.IMAP4.error) as e:
    print(json.dumps({"connect": f"{type(e).__name__}: {e}"}))
    sys.exit()
out["connect"] = "OK"
try:
    m.login(user, password)
    out["login"] = "OK"
except imaplib.IMAP4.error as e:
    out["login"] = str(e)
    print(json.dumps(out))
    sys.exit()
out["special_use"] = sorted(l.decode() for l in m.list('(SPECIAL-USE) ""', "*")[1])
out["subscribed"] = sorted(l.decode().rsplit(" ", 1)[1] for l in m.lsub()[1])
typ, data = m.select("INBOX", readonly=True)
out["exists"] = int(data[0])
if out["exists"]:
    out["message"] = m.fetch("1", "(RFC822)")[1][0][1].decode()
m.logout()
print(json.dumps(out))
"""


class LocalConnection:
    """What deploy.Remote needs of a Fabric connection, on this host: the steps run for real."""

    def run(self, cmd, hide=True, warn=True, in_stream=False):
        import invoke

        return invoke.Context().run(cmd, hide=hide, warn=warn, in_stream=in_stream)

    def put(self, data: io.BytesIO, path: str) -> None:
        Path(path).write_bytes(data.getvalue())


@pytest.fixture(scope="module")
def home():
    require_root()
    require_tool("dovecot", "doveconf", "sievec", "useradd", "chpasswd", "ucf")
    from backend.receive.users import UserDB
    from provision import deploy, render
    from provision.site import HostLayout, Site
    from tests.backend.helpers import write_cert
    from tests.lab.dovecot import ProvisionedDovecot
    from tests.lab.netns import Lab

    lab = Lab("dv")
    user = "hmx" + lab.prefix  # this run's mail user, removed afterwards
    system_user = "hsy" + lab.prefix  # a system account with a password PAM would accept
    dovecots = []
    try:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        user], check=True)
        subprocess.run(["useradd", "--system", "--no-create-home", system_user], check=True)
        subprocess.run(["chpasswd"], input=f"{system_user}:system-pw-1\n", text=True, check=True)
        lab.workdir.chmod(0o711)  # Dovecot's processes traverse it
        home_ns, peer = lab.namespace("home"), lab.namespace("peer")
        lab.veth(home_ns, "tun0", peer, "tun1")
        home_ns.run(["ip", "addr", "add", f"{HOME}/24", "dev", "tun0"])
        for addr in (GATEWAY, STRANGER):
            peer.run(["ip", "addr", "add", f"{addr}/24", "dev", "tun1"])

        layout = HostLayout(root=str(lab.workdir / "root"), user=user, systemctl=False, install_packages=False)
        site = Site(domain="example.org", hostname="mail.example.org", first_user="alice@example.org",
                    gateway_public_addr="203.0.113.10", acme=False, gateway=layout, backend=layout)
        # what base() and deploy_backend() make before Dovecot's step: the etc and data dirs, the
        # certificate, the users file, the venv the host-side steps run in (this checkout's)
        etc, data = Path(layout.etc), Path(layout.data)
        etc.mkdir(parents=True)
        shutil.chown(etc, "root", user)
        etc.chmod(0o750)
        (data / "mail").mkdir(parents=True)
        for d in (data, data / "mail"):
            shutil.chown(d, user, user)
        data.chmod(0o750)
        cert, key = render.tls_paths(layout)
        made = write_cert(Path(cert).parent / "made", site.hostname)
        for src, dst in zip(made, (cert, key)):
            os.replace(src, dst)
        shutil.chown(key, user, user)
        UserDB(etc / "passwd").add("alice@example.org", USERS["alice@example.org"])
        shutil.chown(etc / "passwd", "root", user)
        (etc / "passwd").chmod(0o640)
        Path(layout.venv).parent.mkdir(parents=True)
        Path(layout.venv).symlink_to(Path(sys.executable).parent.parent)

        report = deploy.Report()
        r = deploy.Remote(LocalConnection(), layout, "backend", report)
        inputs = deploy.dovecot(r, site)
        conf = layout.path(render.DOVECOT_CONF)
        dc = ProvisionedDovecot(home_ns, lab.workdir / "dovecot", conf, address=HOME, port=site.backend_imaps_port)
        dovecots.append(dc)
        dc.start()
        yield {"lab": lab, "ns": home_ns, "peer": peer, "site": site, "layout": layout, "conf": conf, "user": user,
               "system_user": system_user, "report": report, "remote": r, "inputs": inputs, "dovecot": dc}
    finally:
        for dc in dovecots:
            dc.stop()
        lab.close()
        for u in (system_user, user):
            subprocess.run(["userdel", u], capture_output=True)


def imap(h, src: str, client: str, user: str, password: str, port: int | None = None) -> dict:
    port = port or h["site"].backend_imaps_port
    r = h["peer"].run([sys.executable, "-c", CLIENT, src, HOME, str(port), client, user, password], timeout=60)
    return json.loads(r.stdout)


def test_deploy_writes_dovecots_whole_config_and_checks_it(home):
    from provision import render

    lay, report = home["layout"], home["report"]
    conf = Path(home["conf"])
    assert conf.read_text() == render.dovecot_conf(home["site"], lay)
    assert oct(stat.S_IMODE(conf.stat().st_mode)) == "0o644"
    items = {item: st for _, item, st in report.items}
    assert items["dovecot.conf"] == "changed" and items["imap check account"] == "changed"
    assert items["dovecot sieve binaries"] == "changed"
    # doveconf ran on the host against what was written (the certificate exists: acme = false)
    assert any(c.startswith("doveconf -n -c ") for c in home["remote"].commands)
    assert "dovecot.conf" in home["inputs"] and "dovecot homemx-junk.conf" in home["inputs"]
    # the packages, probed with dpkg (installed here; a host without them gets them from apt-get)
    assert items["packages dovecot-imapd dovecot-sieve"] == "unchanged"


def test_without_the_spam_filter_no_sieve_package_and_no_junk_include(home):
    """rspamd = false: Dovecot without Pigeonhole and without the Junk/learning include (dry run:
    nothing written)."""
    import dataclasses

    from provision import deploy, render

    site = dataclasses.replace(home["site"], rspamd=False)
    text = render.dovecot_conf(site, home["layout"])
    assert render.DOVECOT_JUNK_CONF not in text and render.DOVECOT_TLS_CONF in text
    report = deploy.Report()
    r = deploy.Remote(LocalConnection(), home["layout"], "backend", report, dry_run=True)
    inputs = deploy.dovecot(r, site)
    items = {item: st for _, item, st in report.items}
    assert items["packages dovecot-imapd"] == "unchanged" and "packages dovecot-imapd dovecot-sieve" not in items
    assert items["dovecot.conf"] == "would change" and "dovecot sieve binaries" not in items
    assert not any("junk" in i for i in inputs)
    assert Path(home["conf"]).read_text() == render.dovecot_conf(home["site"], home["layout"])  # untouched


def test_doveconf_has_no_pam_passdb_and_imaps_only_on_the_tunnel_address(home):
    out = subprocess.run(["doveconf", "-n", "-c", home["conf"]], capture_output=True, text=True, check=True).stdout
    passdbs = re.findall(r"^passdb \{\n((?:  .*\n)*)\}", out, re.M)
    assert [re.search(r"driver = (\S+)", p).group(1) for p in passdbs] == ["passwd-file", "passwd-file"], out
    assert "driver = pam" not in out and "auth-system" not in out
    assert f"\nlisten = {HOME}\n" in out and "\nprotocols = imap\n" in out
    listeners = out.split("service imap-login {", 1)[1]
    assert "inet_listener imap {\n    port = 0\n  }" in listeners
    imaps = f"inet_listener imaps {{\n    address = {HOME}\n    haproxy = yes\n    port = 993\n    ssl = yes\n  }}"
    assert imaps in listeners, out
    assert f"\nhaproxy_trusted_networks = {GATEWAY}/32\n" in out
    # the same check finds the PAM passdb in Debian's stock configuration (what is not included)
    stock = subprocess.run(["doveconf", "-n", "-c", "/usr/share/dovecot/dovecot.conf"], capture_output=True, text=True)
    assert "driver = pam" in stock.stdout, stock.stderr
    # and the running Dovecot listens there and nowhere else (no 143, no 993 on every address)
    sockets = home["ns"].run(["ss", "-ltnpH"]).stdout.splitlines()
    assert {line.split()[3] for line in sockets if '"dovecot"' in line} == {f"{HOME}:993"}, sockets


def test_a_connection_not_from_the_gateway_or_without_its_header_is_refused(home):
    alice = ("alice@example.org", USERS["alice@example.org"])
    assert imap(home, GATEWAY, "198.51.100.7", *alice)["login"] == "OK"  # the gateway's way in
    stranger = imap(home, STRANGER, "198.51.100.7", *alice)  # a PROXY header from anyone else
    assert stranger["connect"] != "OK", stranger
    bare = imap(home, GATEWAY, "-", *alice)  # the gateway's address, no header
    assert bare["connect"] != "OK", bare
    log = home["dovecot"].log()
    assert "rip=198.51.100.7" in log  # the real client address came through the header
    assert f"haproxy: Client not trusted (rip={STRANGER})" in log
    assert f"Failed to read valid HAproxy data (rip={GATEWAY})" in log


def test_a_system_account_cannot_log_in(home):
    from tests.lab.dovecot import ProvisionedDovecot

    who = (home["system_user"], "system-pw-1")
    got = imap(home, GATEWAY, "198.51.100.7", *who)
    assert got["connect"] == "OK" and got["login"] != "OK", got
    # control: the provisioned file plus Debian's auth-system.conf.ext (PAM) lets the same account in
    pam = ProvisionedDovecot(home["ns"], home["lab"].workdir / "dovecot-pam", home["conf"], address=HOME, port=1993,
                             extra="!include /usr/share/dovecot/conf.d/auth-system.conf.ext\n"
                                   "service imap-login {\n  inet_listener imaps {\n    port = 1993\n  }\n}\n")
    try:
        pam.start()
        assert imap(home, GATEWAY, "198.51.100.7", *who, port=1993)["login"] == "OK", pam.log()[-3000:]
    finally:
        pam.stop()


def test_first_login_has_special_use_folders_and_reads_delivered_mail(home):
    lay, user = home["layout"], home["user"]
    new = Path(lay.data) / "mail" / "example.org" / "alice" / "Maildir" / "new"
    # delivered as the backend does (its Maildir, its user), before alice ever logged in... or after:
    # the folders must be there either way
    for d in (new.parent.parent.parent, new.parent.parent, new.parent, new, new.parent / "cur", new.parent / "tmp"):
        d.mkdir(exist_ok=True)
        shutil.chown(d, user, user)
    msg = new / "1700000000.M1P1.home"
    msg.write_text("From: bob@remote.test\r\nSubject: provisioned imap\r\n\r\nread me over IMAPS\r\n")
    shutil.chown(msg, user, user)
    got = imap(home, GATEWAY, "198.51.100.7", "alice@example.org", USERS["alice@example.org"])
    assert got["special_use"] == ['(\\Drafts) "." Drafts', '(\\Junk) "." Junk', '(\\Sent) "." Sent',
                                  '(\\Trash) "." Trash'], got
    assert {"Drafts", "Junk", "Sent", "Trash"} <= set(got["subscribed"]), got
    assert got["exists"] == 1 and "read me over IMAPS" in got["message"]


def test_check_account_is_made_at_home_and_logs_in(home):
    from provision import deploy, render

    d = Path(home["layout"].etc) / render.DOVECOT_DIR
    password_file, passwd_file = d / render.DOVECOT_CHECK_PASSWORD, d / render.DOVECOT_CHECK_PASSWD
    st = password_file.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    st = passwd_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
    import grp

    assert grp.getgrgid(st.st_gid).gr_name == home["user"]
    password = password_file.read_text().strip()
    assert password not in passwd_file.read_text()  # only its hash is where Dovecot reads
    wire = "\n".join(home["remote"].commands + home["remote"].replies)
    assert password not in wire  # made on the host, never sent back
    got = imap(home, GATEWAY, "198.51.100.7", render.DOVECOT_CHECK_USER, password)
    assert got["login"] == "OK", got
    # a second run changes nothing (the account, the config, the compiled scripts)
    report = deploy.Report()
    r = deploy.Remote(LocalConnection(), home["layout"], "backend", report)
    deploy.dovecot(r, home["site"])
    assert report.changed == [], report.changed
    assert password_file.read_text().strip() == password


def test_the_packages_config_step_keeps_the_provisioned_dovecot_conf(home, tmp_path):
    """dovecot-core's postinst hands dovecot.conf to ucf (``ucf --three-way /usr/share/dovecot/dovecot.conf
    /etc/dovecot/dovecot.conf``); run as install_missing runs apt-get (non-interactive,
    UCF_FORCE_CONFFOLD=1) over the file provisioning wrote first, it keeps that file, so the
    package never starts Debian's stock configuration."""
    conf = tmp_path / "dovecot.conf"
    shutil.copy(home["conf"], conf)
    before = conf.read_bytes()
    (tmp_path / "ucf-state").mkdir()
    r = subprocess.run(["ucf", "--three-way", "--state-dir", str(tmp_path / "ucf-state"),
                        "/usr/share/dovecot/dovecot.conf", str(conf)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive",
                                                      "UCF_FORCE_CONFFOLD": "1"}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert conf.read_bytes() == before
    stock = subprocess.run(["doveconf", "-n", "-c", str(conf)], capture_output=True, text=True)
    assert "driver = pam" not in stock.stdout and stock.returncode == 0, stock.stderr

