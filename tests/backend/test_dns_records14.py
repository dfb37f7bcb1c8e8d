"""Issue 14's DNS part: the client SRV records (RFC 6186/8314) and the HTTPS face's names that
`dns records` prints, served by a real nsd and checked by `dns check`; the MTA-STS policy fetched
over real loopback HTTPS; the certificates on 465 and 993 checked over real TLS listeners.

The "gateway" is 127.0.0.1 ([gateway] public_ipv4), so every name resolves to loopback and every
connection stays there; the public ports (443, 465, 993) are mapped to the test's own listeners
through ConnectOptions.ports. Certificates come from a throwaway CA (tests/lab/delivery.py LabCA; leaf
lifetimes in days are what the expiry checks are about), trusted through ConnectOptions.ca_file.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from backend.config import load_config
from backend.dkim import keys as dkim_keys
from backend.dns.check import ConnectOptions, resolver_for, run_checks
from backend.dns.lookup import DNSLookup
from backend.dns.records import mta_sts_id, mta_sts_policy, render_ptr_records, render_records
from tests.backend.helpers import write_cert
from tests.conftest import require_tool
from tests.lab.delivery import LabCA
from tests.lab.nsd import NSD, reverse_zone_name, zone_text
from tests.lab.ports import free_port

GW = "127.0.0.1"
HOST = "mail.example.org"
DOMAIN = "example.org"
POLICY_NAME = "MTA-STS policy example.org"


# ---------------------------------------------------------------- real TLS listeners on loopback


class TLSListener:
    """A TLS server on 127.0.0.1 (a thread per connection). Without ``body`` it completes the
    handshake and closes (the 465/993 stand-in); with it, it answers one HTTP request with
    ``body()`` as text/plain (the HTTPS face serving the MTA-STS policy)."""

    def __init__(self, ctx: ssl.SSLContext, body=None):
        self.ctx, self.body = ctx, body
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                if self.body is None:
                    return
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                self.requests.append(head.decode("latin-1"))
                data = self.body().encode()
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        except (OSError, ssl.SSLError):
            pass  # a client that refused our certificate
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not on Linux)
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


# ---------------------------------------------------------------- the lab: config, nsd, listeners


def write_config(tmp: Path, dns_port: int, *, listeners=("submissions", "submission"), http: bool = True) -> object:
    keys = tmp / "keys"
    if not (keys / "example.org.rsa1.rsa.pem").exists():
        dkim_keys.generate_key(DOMAIN, "rsa1", "rsa", keys)
    write_cert(tmp / "tls", HOST)
    (tmp / "passwd").write_text("")
    blocks = "".join(f'[[listener]]\nname = "{k}"\nkind = "{k}"\nlisten = "127.0.0.1:0"\n\n' for k in listeners)
    (tmp / "backend.toml").write_text(
        f"""
[server]
hostname = "{HOST}"
data_dir = "data"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"

{blocks}[[listener]]
name = "lan"
kind = "lan"
listen = "127.0.0.1:0"

[domain."{DOMAIN}"]

[users]
passwd_file = "passwd"

[[dkim]]
domain = "{DOMAIN}"
selector = "rsa1"
algorithm = "rsa"
private_key = "keys/example.org.rsa1.rsa.pem"

[delivery]
nameservers = ["127.0.0.1"]
dns_port = {dns_port}

[gateway]
public_ipv4 = ["{GW}"]

[dns]
mta_sts_mode = "enforce"

[http]
enabled = {str(http).lower()}
"""
    )
    return load_config(tmp / "backend.toml")


def zones_from(records: str, ptr: str, extra: str = "") -> dict[str, str]:
    """The zones as nsd serves them: the `dns records` output as-is (plus ``extra``), and the PTR."""
    return {
        DOMAIN: zone_text(DOMAIN, records + extra, ns_address="127.0.0.1"),
        reverse_zone_name(GW): zone_text(reverse_zone_name(GW), ptr),
    }


def drop(records: str, owner: str, rtype: str) -> str:
    return "".join(l + "\n" for l in records.splitlines() if not (l.startswith(owner + "\t") and f"\tIN\t{rtype}\t" in l))


class Lab:
    def __init__(self, tmp: Path):
        port = free_port("127.0.0.1", udp=True)
        self.tmp = tmp
        self.config = write_config(tmp, port)
        self.records = render_records(self.config)
        self.ptr = render_ptr_records(self.config)
        self.ns = NSD(zones_from(self.records, self.ptr), address="127.0.0.1", port=port)
        self.ca = LabCA(tmp)
        self.policy = mta_sts_policy(self.config, DOMAIN)
        names = [HOST, f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}"]
        self.https = TLSListener(self.ca.server_context(*names, days=90), body=lambda: self.policy)
        self.smtps = TLSListener(self.ca.server_context(*names, days=90))
        self.imaps = TLSListener(self.ca.server_context(HOST, days=90))

    def serve(self, records: str | None = None, extra: str = "") -> None:
        self.ns.reload(zones_from(self.records if records is None else records, self.ptr, extra))

    def options(self, **ports: int) -> ConnectOptions:
        mapped = {443: self.https.port, 465: self.smtps.port, 993: self.imaps.port}
        mapped.update({int(k[1:]): v for k, v in ports.items()})
        return ConnectOptions(ca_file=str(self.ca.ca_file), timeout=5.0, ports=mapped)

    def check(self, connect: ConnectOptions | None = None):
        report = run_checks(self.config, DNSLookup(resolver_for(self.config, timeout=3)), connect)
        return report, {r.name for r in report.failures()}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_tool("/usr/sbin/nsd", "/usr/sbin/nsd-checkzone")
    lab = Lab(tmp_path_factory.mktemp("dns14"))
    with lab.ns:
        try:
            yield lab
        finally:
            for listener in (lab.https, lab.smtps, lab.imaps):
                listener.close()


@pytest.fixture
def fresh(lab):
    """The lab as `dns records` describes it, and the policy as the config says, for each test."""
    lab.serve()
    lab.policy = mta_sts_policy(lab.config, DOMAIN)
    yield lab
    lab.policy = mta_sts_policy(lab.config, DOMAIN)


def detail(report, name: str) -> str:
    return next(r.detail for r in report.results if r.name == name)


SRV_NAMES = [f"SRV {label}.{DOMAIN}" for label in
             ("_submissions._tcp", "_submission._tcp", "_imaps._tcp", "_imap._tcp", "_pop3s._tcp", "_pop3._tcp")]


# ---------------------------------------------------------------- records


def test_records_print_the_srv_records_and_cnames(lab):
    r = lab.records
    assert f"_submissions._tcp.{DOMAIN}.\t3600\tIN\tSRV\t0 1 465 {HOST}." in r
    assert f"_submission._tcp.{DOMAIN}.\t3600\tIN\tSRV\t10 1 587 {HOST}." in r
    assert f"_imaps._tcp.{DOMAIN}.\t3600\tIN\tSRV\t0 1 993 {HOST}." in r
    for label in ("_imap._tcp", "_pop3s._tcp", "_pop3._tcp"):
        assert f"{label}.{DOMAIN}.\t3600\tIN\tSRV\t0 0 0 ." in r
    assert f"mta-sts.{DOMAIN}.\t3600\tIN\tCNAME\t{HOST}." in r
    assert f"autoconfig.{DOMAIN}.\t3600\tIN\tCNAME\t{HOST}." in r


def test_records_follow_the_configured_listeners_and_http(tmp_path):
    # No submission on 587 and no HTTPS face: 587 is "not offered" and no name points at the home.
    config = write_config(tmp_path, 53, listeners=("submissions",), http=False)
    r = render_records(config)
    assert f"_submission._tcp.{DOMAIN}.\t3600\tIN\tSRV\t0 0 0 ." in r
    assert f"_submissions._tcp.{DOMAIN}.\t3600\tIN\tSRV\t0 1 465 {HOST}." in r
    assert "\tCNAME\t" not in r
    assert f"an A/CNAME for mta-sts.{DOMAIN}" in r  # the policy is to be hosted elsewhere then


def test_new_records_load_into_nsd_and_every_check_passes(fresh):
    report, failed = fresh.check(fresh.options())
    assert failed == set(), report.table()
    assert not report.warnings(), report.table()
    names = {r.name for r in report.results}
    assert set(SRV_NAMES) <= names
    assert {f"A/AAAA mta-sts.{DOMAIN}", f"A/AAAA autoconfig.{DOMAIN}", POLICY_NAME,
            f"TLS {GW}:465", f"TLS {GW}:993"} <= names
    # nsd answers what the output says: the SRV records and the CNAME chain to the gateway.
    r = fresh.ns.resolver()
    srv = r.resolve(f"_submissions._tcp.{DOMAIN}", "SRV")[0]
    assert (srv.port, srv.target.to_text()) == (465, f"{HOST}.")
    assert r.resolve(f"_pop3._tcp.{DOMAIN}", "SRV")[0].target.to_text() == "."
    assert [a.address for a in r.resolve(f"autoconfig.{DOMAIN}", "A")] == [GW]
    # The policy was fetched as a sender does: the URL's host name, the well-known path.
    assert any(req.startswith("GET /.well-known/mta-sts.txt ") and f"Host: mta-sts.{DOMAIN}" in req
               for req in fresh.https.requests)


# ---------------------------------------------------------------- SRV and names, each fault by name


def _srv(owner: str, rdata: str) -> str:
    return f"{owner}.{DOMAIN}.\t300\tIN\tSRV\t{rdata}\n"


@pytest.mark.parametrize("label, replacement, failing, words", [
    ("_submissions._tcp", None, "SRV _submissions._tcp.example.org", "no SRV record"),
    ("_submission._tcp", f"10 1 2587 {HOST}.", "SRV _submission._tcp.example.org", "clients would connect there"),
    ("_imaps._tcp", "0 1 993 imap.elsewhere.example.", "SRV _imaps._tcp.example.org", "imap.elsewhere.example."),
    ("_imap._tcp", f"0 1 143 {HOST}.", "SRV _imap._tcp.example.org", "offers no such service"),
    ("_pop3._tcp", None, "SRV _pop3._tcp.example.org", "(not offered)"),
])  # fmt: skip
def test_each_missing_or_wrong_srv_fails_by_name(fresh, label, replacement, failing, words):
    records = drop(fresh.records, f"{label}.{DOMAIN}.", "SRV")
    if replacement:
        records += _srv(label, replacement)
    fresh.serve(records)
    report, failed = fresh.check()
    assert failed == {failing}, report.table()
    assert words in detail(report, failing)


def test_autoconfig_pointing_elsewhere_fails_by_name(fresh):
    records = drop(fresh.records, f"autoconfig.{DOMAIN}.", "CNAME")
    fresh.serve(records, f"autoconfig.{DOMAIN}.\t300\tIN\tA\t192.0.2.99\n")
    report, failed = fresh.check()
    assert failed == {f"A/AAAA autoconfig.{DOMAIN}"}, report.table()
    assert "not the gateway" in detail(report, f"A/AAAA autoconfig.{DOMAIN}")


def test_missing_mta_sts_name_fails_once_by_name(fresh):
    fresh.serve(drop(fresh.records, f"mta-sts.{DOMAIN}.", "CNAME"))
    report, failed = fresh.check()
    assert failed == {f"A/AAAA mta-sts.{DOMAIN}"}, report.table()
    assert f"CNAME {HOST}." in detail(report, f"A/AAAA mta-sts.{DOMAIN}")


# ---------------------------------------------------------------- the MTA-STS policy over HTTPS


def test_policy_with_another_content_than_the_id_stands_for_fails(fresh):
    fresh.policy = fresh.policy.replace("mode: enforce", "mode: testing")
    report, failed = fresh.check(fresh.options())
    assert failed == {POLICY_NAME}, report.table()
    assert f"that id={mta_sts_id(fresh.config, DOMAIN)} stands for" in detail(report, POLICY_NAME)


def test_txt_id_other_than_the_served_policy_fails(fresh):
    records = drop(fresh.records, f"_mta-sts.{DOMAIN}.", "TXT")
    fresh.serve(records, f'_mta-sts.{DOMAIN}.\t300\tIN\tTXT\t"v=STSv1; id=stale1"\n')
    report, failed = fresh.check(fresh.options())
    # The record check says the id is stale; the fetch says which id the served policy has.
    assert failed == {f"MTA-STS {DOMAIN}", POLICY_NAME}, report.table()
    assert "announces id=stale1" in detail(report, POLICY_NAME)


def test_policy_without_mx_fails(fresh):
    fresh.policy = "".join(l + "\r\n" for l in fresh.policy.splitlines() if not l.startswith("mx:"))
    report, failed = fresh.check(fresh.options())
    assert failed == {POLICY_NAME}, report.table()
    assert "names no mx" in detail(report, POLICY_NAME)


def test_policy_mx_not_covering_our_host_fails(fresh):
    fresh.policy = fresh.policy.replace(f"mx: {HOST}", "mx: *.elsewhere.example")
    report, failed = fresh.check(fresh.options())
    assert failed == {POLICY_NAME}, report.table()
    assert f"does not cover {HOST}" in detail(report, POLICY_NAME)


def test_policy_behind_an_untrusted_certificate_fails(fresh):
    (fresh.tmp / "other-ca").mkdir(exist_ok=True)
    other = LabCA(fresh.tmp / "other-ca")
    server = TLSListener(other.server_context(f"mta-sts.{DOMAIN}", days=90), body=lambda: fresh.policy)
    try:
        report, failed = fresh.check(fresh.options(p443=server.port))
    finally:
        server.close()
    assert failed == {POLICY_NAME}, report.table()
    assert "certificate not accepted" in detail(report, POLICY_NAME)


# ---------------------------------------------------------------- certificates on 465 and 993


@pytest.mark.parametrize("names, days, ok, warn, words", [
    (["other.example.net"], 90, False, False, "not valid for mail.example.org (it names other.example.net)"),
    ([HOST], 2, False, False, "days left): renewal is failing"),
    ([HOST], -1, False, False, "certificate expired on"),
    ([HOST], 10, True, True, "renewal is overdue"),
])  # fmt: skip
def test_certificate_on_465_names_and_days_left(fresh, names, days, ok, warn, words):
    server = TLSListener(fresh.ca.server_context(*names, days=days))
    try:
        report, failed = fresh.check(fresh.options(p465=server.port))
    finally:
        server.close()
    name = f"TLS {GW}:465"
    assert failed == (set() if ok else {name}), report.table()
    assert [r.name for r in report.warnings()] == ([name] if warn else [])
    assert words in detail(report, name)
    assert ("warn" if warn else "pass" if ok else "FAIL") in next(l for l in report.table().splitlines() if l.startswith(name))


def test_refused_port_is_one_clear_failure(fresh):
    closed = free_port("127.0.0.1")  # nothing listens there
    report, failed = fresh.check(fresh.options(p993=closed))
    assert failed == {f"TLS {GW}:993"}, report.table()
    assert "refused" in detail(report, f"TLS {GW}:993")


def test_port_that_never_answers_tls_is_one_failure_within_the_timeout(fresh):
    # The kernel completes the TCP handshake on a listening socket nobody accepts from: the
    # connect succeeds and the ClientHello is never answered.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        opts = dataclasses.replace(fresh.options(p465=silent.getsockname()[1]), timeout=1.0)
        started = time.monotonic()
        report, failed = fresh.check(opts)
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert failed == {f"TLS {GW}:465"}, report.table()
    assert "no TLS answer" in detail(report, f"TLS {GW}:465")
    assert elapsed < 30  # liveness bound: no hang
