"""The whole homemx system in network namespaces: DNS, remote Postfix, gateway, NAT router, home with backend and Dovecot, joined by a real WireGuard tunnel; always torn down.

Reusable by the end-to-end tests and the benchmarks:

    with MailLab() as lab:                       # builds everything, removes everything
        lab.internet.run(["swaks", "--server", lab.gateway_addr, ...])
        lab.maildir_messages("alice@example.org")

Roles (addresses are RFC 5737 documentation ranges, nothing leaves the machine):

- internet (198.51.100.1 on a bridge): nsd authoritative for example.org, remote.test and the
  reverse zone of the gateway's address, with records printed by ``homemx-backend dns records``;
  Postfix receiving for remote.test into Maildirs (and sending, for the inbound-retry scenario);
  a sender/phone host address 198.51.100.50.
- gateway (198.51.100.10): ``homemx-gateway run`` with listeners 25, 465, 587, 993 and metrics on
  the tunnel address; ``homemx-gateway tunnel up`` (wireguard-go + egress nft table).
- router: NAT between home (192.0.2.0/24) and internet.
- home (192.0.2.2, tunnel 10.77.0.2): ``homemx-backend run`` (mx/submission/submissions behind
  PROXY v2 on the tunnel address, lan on the LAN address), Dovecot IMAPS with haproxy = yes.

Certificates (``MailLab(acme=True)``, the default, as provisioning sets a home up): Pebble (Debian's
``pebble``, tests/lab/pebble.py) runs in the internet namespace on 198.51.100.1:14000 and resolves
through the lab's nsd, so it validates ``mail.example.org``, ``mta-sts.example.org`` and
``autoconfig.example.org`` at the gateway's address; the gateway passes tcp/80 and tcp/443 with
PROXY v2 to the backend's web face ([http], on the tunnel address); the backend has ``[acme]`` on
(http-01, Pebble's API CA as ca_bundle) and obtains its certificate through that path at start.
Dovecot serves the backend's ACME files (data_dir/acme/live/) and runs as the backend's user, so the
backend's ``reload_hook`` (``doveadm reload``) reloads it after each issuance. ``acme=False``: a
self-signed certificate in [tls], no Pebble, no web face.

Optional (``MailLab(relay_listener=True)``, off by default, for benchmark B5): a sink host
198.51.100.60 on the internet segment with ``sink.test``'s MX pointing at it (the caller runs the
receiver there, e.g. Postfix's smtp-sink), and a relaying path for internet senders: gateway
198.51.100.10:2526 (no greet wait, no per-client limits) → tunnel → a backend ``lan`` listener on
10.77.0.2:2526 behind PROXY v2 trusting 198.51.100.1 and .50. ``log_level`` sets both daemons'.

Every daemon is started through its CLI with config files like a user's. Teardown (``close``, also
from ``with``, a failed ``start``, atexit, SIGTERM/SIGHUP, Ctrl-C) is the Lab's: every process in
the namespaces is killed, namespaces, /etc/netns dirs, wireguard-go sockets and files removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from backend.tls import certfiles, renew
from tests.backend.helpers import write_cert, write_users
from tests.lab.dovecot import Dovecot
from tests.lab.netns import Lab, Namespace
from tests.lab.nsd import NSD, reverse_zone_name, zone_text
from tests.lab.pebble import Pebble
from tests.lab.postfix import Postfix
from tests.lab.rspamd import Rspamd
from tests.wireguard.tunnel_lab import GW_TUN, HOME_TUN, TunnelLab, make_tunnel_lab

VENV_BIN = Path(sys.executable).parent
BACKEND_CLI = str(VENV_BIN / "homemx-backend")
GATEWAY_CLI = str(VENV_BIN / "homemx-gateway")

HOME_DOMAIN = "example.org"
HOSTNAME = "mail.example.org"
REMOTE_DOMAIN = "remote.test"
REMOTE_MAILBOXES = ["bob", "phone", "crash", "later", "relaytest"]
USERS = {"alice@example.org": "alice-lab-pw", "carol@example.org": "carol-lab-pw"}

SENDER_ADDR = "198.51.100.50"  # the "sender / phone" host on the internet segment
SENDER_HELO = "sender.remote.test"  # its name (A and PTR in the lab's DNS), which swaks greets with
# Sending domains of the "internet" for the inbound checks (issue 13): each lets only the internet's
# Postfix (198.51.100.1) send (SPF -all) and publishes the DMARC policy its name says; signed.test
# also publishes the DKIM key the lab signs its mail with (MailLab.dkim_sign).
SENDER_DOMAINS = {"quarantine.test": "quarantine", "reject.test": "reject", "signed.test": "reject"}
SIGNED_DOMAIN, SIGNED_SELECTOR = "signed.test", "lab2026"
# Backend ports on the tunnel address (what the gateway dials) and on the LAN.
BACKEND_PORTS = {"mx": 2525, "submission": 2587, "submissions": 2465}
LAN_PORT = 587
IMAPS_PORT = 993
BACKEND_METRICS_PORT = 9325
GATEWAY_METRICS_PORT = 9101
MAIL_UID = 65534  # nobody: the backend runs as this user and Dovecot's userdb maps every user to it
GATEWAY_PORTS = {"mx": 25, "submission": 587, "submissions": 465, "imaps": 993}
# The home's web face (acme=True): the gateway's 80/443 passthrough → these on the tunnel address.
HTTP_PORTS = {"http": 80, "https": 443}
BACKEND_HTTP_PORTS = {"http": 2080, "https": 2443}
GATEWAY_TCP_LISTENERS = ("imaps", "http", "https")  # passthrough (kind = "tcp"); the rest speak SMTP
ACME_CONTACT = f"postmaster@{HOME_DOMAIN}"
FIRST_ISSUANCE_TIMEOUT = 60.0
# relay_listener=True: the relaying path (gateway port → backend lan listener on the tunnel) and the sink host.
RELAY_PORT = 2526
SINK_ADDR = "198.51.100.60"
SINK_DOMAIN = "sink.test"

_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
"""


def wait_until(pred, timeout: float, what: str, step: float = 0.05):
    """Poll ``pred`` until truthy (its value is returned) or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class MailLab:
    """Builds the topology on ``start()`` (or ``with``) and removes it on ``close()``."""

    def __init__(self, *, greet_wait: str = "300ms", retry_schedule: tuple[str, ...] = ("2s",),
                 gateway_connect_timeout: str = "2s", relay_listener: bool = False, log_level: str = "debug",
                 acme: bool = True):
        self.greet_wait = greet_wait
        self.acme = acme
        self.pebble: Pebble | None = None
        self.relay_listener = relay_listener
        self.log_level = log_level
        self.retry_schedule = retry_schedule
        self.gateway_connect_timeout = gateway_connect_timeout
        self.lab: Lab | None = None
        self.tunnel: TunnelLab | None = None
        self.nsd: NSD | None = None
        self.postfix: Postfix | None = None
        self.dovecot: Dovecot | None = None
        self.rspamd: Rspamd | None = None
        self.backend_proc: subprocess.Popen | None = None
        self.gateway_proc: subprocess.Popen | None = None

    # ------------------------------------------------------------ addresses

    gateway_addr = "198.51.100.10"
    internet_addr = "198.51.100.1"
    sender_addr = SENDER_ADDR
    sink_addr = SINK_ADDR
    relay_port = RELAY_PORT
    home_addr = "192.0.2.2"
    home_tunnel_addr = HOME_TUN
    gateway_tunnel_addr = GW_TUN

    @property
    def internet(self) -> Namespace:
        return self.tunnel.topo.internet

    @property
    def gateway(self) -> Namespace:
        return self.tunnel.topo.gateway

    @property
    def home(self) -> Namespace:
        return self.tunnel.topo.home

    @property
    def router(self) -> Namespace:
        return self.tunnel.topo.router

    # ------------------------------------------------------------ life cycle

    def __enter__(self) -> "MailLab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "MailLab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.pebble is not None:
            self.pebble.close()
        if self.rspamd is not None:
            self.rspamd.close()
        if self.nsd is not None:
            self.nsd.close()
        if self.lab is not None:
            self.lab.close()

    def _build(self) -> None:
        self.lab = Lab("hx")
        self.work = self.lab.workdir
        # Daemons that drop privileges (postfix, dovecot, nobody) must traverse the work dir;
        # secrets inside are 0600 on their own.
        self.work.chmod(0o711)
        self.tunnel = make_tunnel_lab(self.lab)
        self.internet.run(["ip", "addr", "add", f"{SENDER_ADDR}/24", "dev", "br0"])
        if self.relay_listener:
            self.internet.run(["ip", "addr", "add", f"{SINK_ADDR}/24", "dev", "br0"])
        self.tunnel.up()
        # The unprivileged backend binds the LAN submission port 587 (as CAP_NET_BIND_SERVICE would allow).
        self.home.sysctl("net.ipv4.ip_unprivileged_port_start", "0")
        self.tunnel.wait_handshake()
        if self.acme:
            # Pebble's API on the internet host's address (the backend reaches it through the NAT
            # router); it validates on the gateway's 80/443, resolving through the lab's nsd.
            self.pebble = Pebble(dns=f"{self.internet_addr}:53", address=self.internet_addr,
                                 http_port=HTTP_PORTS["http"], tls_port=HTTP_PORTS["https"],
                                 netns_exec=self.internet.cmd([]))
        self._write_backend_config()
        self._start_dns()
        if self.pebble is not None:
            self.pebble.start()
        # The home's spam filter, as provisioning sets it up: rspamd (and its Redis) on the home's
        # loopback, resolving through the lab's nsd.
        self.rspamd = Rspamd(netns_exec=self.home.cmd([]), nameserver=f"{self.internet_addr}:53",
                             workdir=self.work / "rspamd")
        self.start_rspamd()
        self.postfix = Postfix(self.internet, self.work / "postfix", address=self.internet_addr,
                               domain=REMOTE_DOMAIN, mailboxes=REMOTE_MAILBOXES,
                               mynetworks=("127.0.0.0/8", f"{SENDER_ADDR}/32")).start()
        # The gateway before the backend: the backend's first ACME order is validated through it.
        self._write_gateway_config()
        self.start_gateway()
        self.start_backend()
        if self.acme:
            self.first_issuance_seconds = self.wait_first_issuance()
        # Started after the first issuance, Dovecot reads the certificate the backend obtained; later
        # ones reach it through the backend's reload_hook.
        self.dovecot.start()

    # ------------------------------------------------------------ home: backend

    def _write_backend_config(self) -> None:
        home = self.work / "home"
        home.mkdir()
        self.cert, self.key = write_cert(home / "tls", HOSTNAME)
        self.passwd = home / "passwd"
        self.data_dir = home / "data"
        self.acme_dir = self.data_dir / "acme"
        # With ACME Dovecot serves the backend's live files (what ``reload_hook`` tells it to read again).
        dovecot_cert, dovecot_key = certfiles.live_paths(self.acme_dir) if self.acme else (self.cert, self.key)
        self.dovecot = Dovecot(self.home, self.work / "dovecot", address=HOME_TUN, port=IMAPS_PORT,
                               cert=dovecot_cert, key=dovecot_key, passwd=self.passwd,
                               maildir_root=self.data_dir / "mail", trusted=f"{GW_TUN}/32",
                               mail_uid=MAIL_UID, run_as=MAIL_UID)
        write_users(self.passwd, USERS)
        # One passwd-file for SMTP and IMAP (Dovecot runs as the backend's user here; a root
        # Dovecot's auth process, user dovecot, would read it by group).
        shutil.chown(self.passwd, MAIL_UID, "dovecot")
        self.passwd.chmod(0o640)
        self.data_dir.mkdir()
        shutil.chown(self.data_dir, MAIL_UID, MAIL_UID)
        self.backend_log = home / "backend.log"
        out = subprocess.run([BACKEND_CLI, "dkim", "keygen", "--domain", HOME_DOMAIN, "--selector", "lab",
                              "--dir", str(home / "dkim")], capture_output=True, text=True, check=True).stdout
        for path in [self.key, home / "dkim", *(home / "dkim").iterdir()]:
            shutil.chown(path, MAIL_UID, MAIL_UID)
        dkim_tables = out.split("# backend.toml: add these tables", 1)[1]
        dkim_tables = "\n".join(line for line in dkim_tables.splitlines() if not line.startswith("wrote "))
        listeners = ""
        for kind, port in BACKEND_PORTS.items():
            listeners += (f'[[listener]]\nname = "{kind}"\nkind = "{kind}"\nlisten = "{HOME_TUN}:{port}"\n'
                          f'proxy_protocol = true\ntrusted_proxies = ["{GW_TUN}/32"]\n\n')
        listeners += (f'[[listener]]\nname = "lan"\nkind = "lan"\nlisten = "{self.home_addr}:{LAN_PORT}"\n'
                      f'trusted_networks = ["192.0.2.0/24"]\n\n')
        if self.relay_listener:
            # Internet senders relay without AUTH, as a LAN app would: the client address is the PROXY header's.
            listeners += (f'[[listener]]\nname = "relay"\nkind = "lan"\nlisten = "{HOME_TUN}:{RELAY_PORT}"\n'
                          f'proxy_protocol = true\ntrusted_proxies = ["{GW_TUN}/32"]\n'
                          f'trusted_networks = ["{self.internet_addr}/32", "{SENDER_ADDR}/32"]\n\n')
        schedule = ", ".join(f'"{s}"' for s in self.retry_schedule)
        tls = f'[tls]\ncert = "{self.cert}"\nkey = "{self.key}"\n'
        mta_sts = ""
        if self.acme:
            # The backend (user nobody) must read the CA of Pebble's API: a copy of its own.
            ca = home / "pebble-api-ca.pem"
            ca.write_bytes(self.pebble.api_ca_pem)
            ca.chmod(0o644)
            tls = f"""[acme]
enabled = true
directory = "{self.pebble.directory}"
contact = "{ACME_CONTACT}"
ca_bundle = "{ca}"
challenge = "http-01"
reload_hook = '{self.dovecot.reload_command}'

[http]
enabled = true
listen_http = "{HOME_TUN}:{BACKEND_HTTP_PORTS['http']}"
listen_https = "{HOME_TUN}:{BACKEND_HTTP_PORTS['https']}"
proxy_protocol = true
trusted_proxies = ["{GW_TUN}/32"]
"""
            # An MTA-STS policy (RFC 8461) in testing mode: its host mta-sts.example.org is one of
            # the certificate's names, and the web face serves the policy.
            mta_sts = 'mta_sts_mode = "testing"\n'
        self.backend_conf = home / "backend.toml"
        self.backend_conf.write_text(f"""[server]
hostname = "{HOSTNAME}"
data_dir = "{self.data_dir}"
log_level = "{self.log_level}"
metrics_listen = "{self.home_addr}:{BACKEND_METRICS_PORT}"

{tls}

[users]
passwd_file = "{self.passwd}"

[domain."{HOME_DOMAIN}"]
aliases = {{ postmaster = ["alice@{HOME_DOMAIN}"] }}

{listeners}
[delivery]
source_address = "{HOME_TUN}"
nameservers = ["{self.internet_addr}"]
retry_schedule = [{schedule}]
connect_timeout = "3s"
command_timeout = "30s"

[gateway]
public_ipv4 = ["{self.gateway_addr}"]

[rspamd]
url = "http://127.0.0.1:11333"
timeout = "10s"

[dns]
dmarc_policy = "quarantine"
dmarc_rua = "postmaster@{HOME_DOMAIN}"
{mta_sts}{dkim_tables}
""")

    def start_backend(self) -> None:
        """``homemx-backend run`` in home; returns once the lan listener answers."""
        # Not root, like a real install: Dovecot (which refuses uid 0 for mail) reads the same Maildirs.
        self.backend_proc = self.home.popen(["setpriv", f"--reuid={MAIL_UID}", f"--regid={MAIL_UID}",
                                             "--clear-groups", BACKEND_CLI, "run", "-c", str(self.backend_conf)],
                                            stdout=open(self.backend_log, "ab"), stderr=subprocess.STDOUT)
        self._wait_port(self.home, self.home_addr, LAN_PORT, self.backend_proc, "backend lan listener")
        self._wait_port(self.home, HOME_TUN, BACKEND_PORTS["mx"], self.backend_proc, "backend mx listener")
        if self.relay_listener:
            self._wait_port(self.home, HOME_TUN, RELAY_PORT, self.backend_proc, "backend relay listener")

    def wait_first_issuance(self) -> float:
        """Seconds until the backend's first ACME attempt (started with the daemon) ended, whatever its
        outcome (tests look at the outcome); its state file says when."""
        t0 = time.monotonic()
        wait_until(lambda: renew.load_state(self.acme_dir).last_attempt_end is not None, FIRST_ISSUANCE_TIMEOUT,
                   f"the backend's first ACME attempt\n{self.logs()}", step=0.1)
        return time.monotonic() - t0

    def stop_backend(self) -> None:
        """SIGTERM, as ``systemctl stop`` would: the daemon drains and exits."""
        proc = self.backend_proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)

    def set_acme_challenge(self, challenge: str) -> None:
        """Switch ``[acme] challenge`` in backend.toml and restart the backend (a new PID) with it."""
        text = self.backend_conf.read_text()
        assert re.search(r'(?m)^challenge = ', text), "no [acme] challenge in backend.toml (acme=False?)"
        self.backend_conf.write_text(re.sub(r'(?m)^challenge = ".*"$', f'challenge = "{challenge}"', text))
        self.stop_backend()
        self.start_backend()

    def start_rspamd(self) -> None:
        self.rspamd.start()

    def stop_rspamd(self) -> None:
        """Stop rspamd (its Redis stays), as an outage would; ``start_rspamd`` brings it back."""
        self.rspamd.stop()

    def kill_backend(self) -> None:
        """SIGKILL, as a crash would: no drain, no cleanup."""
        proc = self.backend_proc
        if proc is not None and proc.poll() is None:
            # ip netns exec execs the command, so the Popen pid is the backend itself.
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    # ------------------------------------------------------------ internet: DNS

    def _start_dns(self) -> None:
        records = subprocess.run([BACKEND_CLI, "dns", "records", "-c", str(self.backend_conf)],
                                 capture_output=True, text=True, check=True).stdout
        ptr = subprocess.run([BACKEND_CLI, "dns", "records", "--ptr", "-c", str(self.backend_conf)],
                             capture_output=True, text=True, check=True).stdout
        self.dns_records = records
        ns = self.internet_addr
        remote = (f"@\tIN\tMX\t10 mx.{REMOTE_DOMAIN}.\nmx\tIN\tA\t{ns}\nsender\tIN\tA\t{SENDER_ADDR}\n"
                  f'@\tIN\tTXT\t"v=spf1 ip4:{ns} -all"\n')
        zones = {
            HOME_DOMAIN: zone_text(HOME_DOMAIN, records, ns_address=ns),
            REMOTE_DOMAIN: zone_text(REMOTE_DOMAIN, remote, ns_address=ns),
            # The internet's hosts have forward-confirmed reverse names too (as real senders do; rspamd
            # scores a client without one as spam-like: RDNS_NONE, HFILTER_HOSTNAME_UNKNOWN).
            reverse_zone_name(self.gateway_addr): zone_text(reverse_zone_name(self.gateway_addr), ptr.rstrip("\n") + "\n" + (
                f"{ns.split('.')[-1]}\tIN\tPTR\tmx.{REMOTE_DOMAIN}.\n"
                f"{SENDER_ADDR.split('.')[-1]}\tIN\tPTR\t{SENDER_HELO}.\n")),
        }
        for domain, policy in SENDER_DOMAINS.items():
            recs = (f'@\tIN\tTXT\t"v=spf1 ip4:{ns} -all"\n'
                    f'_dmarc\tIN\tTXT\t"v=DMARC1; p={policy}"\n')
            if domain == SIGNED_DOMAIN:
                recs += f"{SIGNED_SELECTOR}._domainkey\tIN\tTXT\t{self._signing_key_txt()}\n"
            zones[domain] = zone_text(domain, recs, ns_address=ns)
        if self.relay_listener:
            zones[SINK_DOMAIN] = zone_text(SINK_DOMAIN, f"@\tIN\tMX\t10 mx.{SINK_DOMAIN}.\nmx\tIN\tA\t{SINK_ADDR}\n",
                                           ns_address=ns)
        self.nsd = NSD(zones, address=ns, port=53, netns_exec=self.internet.cmd([]), workdir=self.work / "nsd")
        self.nsd.start()
        for n in (self.internet, self.gateway, self.router, self.home):
            n.etc_file("resolv.conf", f"nameserver {ns}\n")

    def _signing_key_txt(self) -> str:
        """A fresh RSA-2048 key for signed.test (the private half kept in memory only, never
        committed); returns its DKIM TXT record as zone-file strings."""
        import base64

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.signing_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption())
        pub = base64.b64encode(key.public_key().public_bytes(serialization.Encoding.DER,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
        txt = f"v=DKIM1; k=rsa; p={pub}"
        return " ".join(f'"{txt[i:i + 200]}"' for i in range(0, len(txt), 200))

    def dkim_sign(self, message: bytes) -> bytes:
        """``message`` (CRLF) with a DKIM-Signature of signed.test (the fixture signer of the
        sending side: what OpenDKIM in front of the internet's Postfix would add)."""
        import dkim as dkimpy

        sig = dkimpy.sign(message, SIGNED_SELECTOR.encode(), SIGNED_DOMAIN.encode(), self.signing_key,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        return sig + message

    # ------------------------------------------------------------ gateway

    def _write_gateway_config(self) -> None:
        gw = self.work / "gw"
        gw.mkdir()
        self.gateway_log = gw / "gateway.log"
        upstream = {**BACKEND_PORTS, "imaps": IMAPS_PORT, **BACKEND_HTTP_PORTS}
        listeners = ""
        for name, port in self.gateway_ports.items():
            kind = "tcp" if name in GATEWAY_TCP_LISTENERS else "smtp"
            listeners += (f'[[listener]]\nname = "{name}"\nkind = "{kind}"\nlisten = "{self.gateway_addr}:{port}"\n'
                          f'upstream = "{HOME_TUN}:{upstream[name]}"\n'
                          f'connect_timeout = "{self.gateway_connect_timeout}"\n')
            if name == "mx":
                listeners += f'greet_wait = "{self.greet_wait}"\n'
            listeners += "\n"
        if self.relay_listener:
            # One benchmark client opens many sessions: no greet wait, per-client limits out of the way.
            listeners += (f'[[listener]]\nname = "relay"\nkind = "smtp"\nlisten = "{self.gateway_addr}:{RELAY_PORT}"\n'
                          f'upstream = "{HOME_TUN}:{RELAY_PORT}"\nconnect_timeout = "{self.gateway_connect_timeout}"\n'
                          f'greet_wait = 0\nmax_per_client = 1000\nrate = 1000000\nburst = 1000000\n\n')
        self.gateway_conf = gw / "gateway.toml"
        self.gateway_conf.write_text(f"""[server]
hostname = "{HOSTNAME}"
log_level = "{self.log_level}"
metrics_listen = "{GW_TUN}:{GATEWAY_METRICS_PORT}"
tunnel_interface = "{self.tunnel.gw_if}"
shutdown_grace = "2s"

{listeners}""")

    def start_gateway(self) -> None:
        self.gateway_proc = self.gateway.popen([GATEWAY_CLI, "run", "-c", str(self.gateway_conf)],
                                               stdout=open(self.gateway_log, "ab"), stderr=subprocess.STDOUT,
                                               env=self.tunnel.env)
        for port in [*self.gateway_ports.values(), *([RELAY_PORT] if self.relay_listener else [])]:
            self._wait_port(self.internet, self.gateway_addr, port, self.gateway_proc, f"gateway port {port}")

    @property
    def gateway_ports(self) -> dict[str, int]:
        """The gateway's listeners by name: the mail ports, and 80/443 for the web face with ACME."""
        return {**GATEWAY_PORTS, **(HTTP_PORTS if self.acme else {})}

    # ------------------------------------------------------------ tunnel outage

    def cut_tunnel(self) -> None:
        """Home's end goes away (``homemx-backend tunnel down``: wireguard-go stopped, link gone)."""
        self.tunnel.cli(self.home, "backend", "down", "-c", str(self.tunnel.home_conf))

    def restore_tunnel(self) -> None:
        self.tunnel.cli(self.home, "backend", "up", "-c", str(self.tunnel.home_conf))
        self.tunnel.wait_handshake()
        # Listeners bound to the tunnel address lost it with the link: the backend must bind again.
        # (A real home box restarts homemx after wg-quick up via the unit's dependencies.)

    # ------------------------------------------------------------ helpers for tests

    def _wait_port(self, ns: Namespace, host: str, port: int, proc, what: str, timeout: float = 20) -> None:
        def ready():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what}: process exited {proc.returncode}\n{self.logs()}")
            return ns.run([sys.executable, "-c", _PROBE, host, str(port)], check=False).returncode == 0
        wait_until(ready, timeout, what)

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.data_dir / "mail" / domain / local / "Maildir"

    def maildir_messages(self, address: str) -> list[bytes]:
        new = self.maildir(address) / "new"
        cur = self.maildir(address) / "cur"
        files = [p for d in (new, cur) if d.exists() for p in d.iterdir()]
        return [p.read_bytes() for p in sorted(files)]

    def scrape(self, which: str) -> str:
        """GET the Prometheus text of ``backend`` or ``gateway`` from home (over the tunnel for the gateway)."""
        url = (f"http://{self.home_addr}:{BACKEND_METRICS_PORT}/metrics" if which == "backend"
               else f"http://{GW_TUN}:{GATEWAY_METRICS_PORT}/metrics")
        code = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        return self.home.run([sys.executable, "-c", code, url], timeout=20).stdout

    def swaks(self, *args: str, ns: Namespace | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """swaks from the internet's sender host (``--local-interface`` the sender address) unless ``ns`` is given."""
        argv = ["swaks", *args]
        if ns is None:
            ns = self.internet
            argv += ["--local-interface", SENDER_ADDR]
            if "--helo" not in args and "--ehlo" not in args:
                argv += ["--helo", SENDER_HELO]
        return ns.run(argv, check=False, timeout=timeout)

    def python(self, ns: Namespace, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Python snippet (with this repo importable) inside ``ns``."""
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
        return ns.run([sys.executable, "-c", code, *args], check=False, timeout=timeout, env=env)

    def backend_cli(self, *args: str) -> subprocess.CompletedProcess:
        """``homemx-backend ARGS -c backend.toml`` in home (e.g. ``queue list``)."""
        return self.home.run([BACKEND_CLI, *args, "-c", str(self.backend_conf)], check=False)

    def logs(self) -> str:
        """Every daemon's log, for a failing test's report."""
        parts = []
        for title, path in (("backend", getattr(self, "backend_log", None)),
                            ("gateway", getattr(self, "gateway_log", None))):
            if path is not None and Path(path).exists():
                parts.append(f"===== {title} log =====\n{Path(path).read_text(errors='replace')[-20000:]}")
        if self.postfix is not None:
            parts.append(f"===== postfix (internet) log =====\n{self.postfix.log()[-20000:]}")
            parts.append(f"===== postfix queue =====\n{self.postfix.queue()}")
        if self.dovecot is not None:
            parts.append(f"===== dovecot log =====\n{self.dovecot.log()[-10000:]}")
        if self.rspamd is not None:
            parts.append(f"===== rspamd log =====\n{self.rspamd.log()[-10000:]}")
        if self.nsd is not None:
            parts.append(f"===== nsd log =====\n{self.nsd.log()[-5000:]}")
        if self.pebble is not None:
            parts.append(f"===== pebble log =====\n{self.pebble.log()[-10000:]}")
        return "\n".join(parts)
