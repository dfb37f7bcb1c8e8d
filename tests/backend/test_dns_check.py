"""`dns records` output served by a real nsd, and `dns check` against it: a correct zone passes, each broken zone fails by name."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from backend.cli import dns as cmd_dns

from backend.dkim import keys as dkim_keys
from backend.config import load_config
from backend.dns.check import resolver_for, run_checks
from backend.dns.lookup import DNSLookup
from backend.dns.records import render_ptr_records, render_records
from tests.conftest import require_tool
from tests.lab.nsd import NSD, NSDError, reverse_zone_name, zone_text

GW4 = "203.0.113.5"
GW6 = "2001:db8:25::5"
OTHER_IP = "198.51.100.7"
HOST = "mail.example.org."


def write_config(tmp, port: int, extra_dkim: str = "") -> object:
    keys = tmp / "keys"
    dkim_keys.generate_key("example.org", "rsa1", "rsa", keys)
    dkim_keys.generate_key("example.org", "ed1", "ed25519", keys)
    (tmp / "passwd").write_text("")
    (tmp / "backend.toml").write_text(
        f"""
[server]
hostname = "mail.example.org"
data_dir = "data"

[[listener]]
name = "lan"
kind = "lan"
listen = "127.0.0.1:0"

[domain."example.org"]

[users]
passwd_file = "passwd"

[[dkim]]
domain = "example.org"
selector = "rsa1"
algorithm = "rsa"
private_key = "keys/example.org.rsa1.rsa.pem"

[[dkim]]
domain = "example.org"
selector = "ed1"
algorithm = "ed25519"
private_key = "keys/example.org.ed1.ed25519"

[delivery]
nameservers = ["127.0.0.1"]
dns_port = {port}

[gateway]
public_ipv4 = ["{GW4}"]
public_ipv6 = ["{GW6}"]

[dns]
dmarc_rua = "dmarc@example.org"
mta_sts_mode = "enforce"
tlsrpt_rua = "tlsrpt@example.org"
"""
    )
    return load_config(tmp / "backend.toml")


def zones_from(records: str, ptr: str, extra: str = "") -> dict[str, str]:
    """Zones built from the command output as-is, plus the lab's own bits (NS glue, policy host)."""
    forward = records + "mta-sts.example.org.\t300\tIN\tA\t" + GW4 + "\n" + extra
    return {
        "example.org": zone_text("example.org", forward, ns_address="127.0.0.1"),
        reverse_zone_name(GW4): zone_text(reverse_zone_name(GW4), ptr_lines(ptr, 4)),
        reverse_zone_name(GW6): zone_text(reverse_zone_name(GW6), ptr_lines(ptr, 6)),
    }


def ptr_lines(ptr: str, version: int) -> str:
    suffix = ".in-addr.arpa." if version == 4 else ".ip6.arpa."
    return "".join(l + "\n" for l in ptr.splitlines() if l.split("\t")[0].endswith(suffix))


def drop(records: str, owner: str, rtype: str) -> str:
    return "".join(l + "\n" for l in records.splitlines() if not (l.startswith(owner + "\t") and f"\tIN\t{rtype}\t" in l))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_tool("/usr/sbin/nsd", "/usr/sbin/nsd-checkzone", "dig")
    tmp = tmp_path_factory.mktemp("dnslab")
    from tests.lab.ports import free_port

    port = free_port("127.0.0.1", udp=True)
    config = write_config(tmp, port)
    records = render_records(config)
    ptr = render_ptr_records(config)
    with NSD(zones_from(records, ptr), address="127.0.0.1", port=port) as ns:
        yield config, ns, records, ptr, tmp


def check(config):
    report = run_checks(config, DNSLookup(resolver_for(config, timeout=3)))
    return report, {r.name for r in report.failures()}


def serve(lab, records=None, ptr=None, extra=""):
    config, ns, rec0, ptr0, _ = lab
    ns.reload(zones_from(rec0 if records is None else records, ptr0 if ptr is None else ptr, extra))


def test_records_output_loads_into_nsd_and_every_check_passes(lab):
    config, ns, records, ptr, _ = lab
    serve(lab)
    report, failed = check(config)
    assert failed == set(), report.table()
    names = [r.name for r in report.results]
    for expected in (
        "MX example.org", f"A {HOST}", f"AAAA {HOST}", f"PTR {GW4}", f"PTR {GW6}",
        "DKIM rsa1._domainkey.example.org", "DKIM ed1._domainkey.example.org",
        "DMARC example.org", "MTA-STS example.org", "TLS-RPT example.org",
    ):  # fmt: skip
        assert expected in names
    assert any(n.startswith("SPF example.org") for n in names)
    assert any(n.startswith("SPF mail.example.org") for n in names)
    # What nsd serves is what the output said: the long DKIM TXT came back as one key.
    r = ns.resolver()
    txt = b"".join(r.resolve("rsa1._domainkey.example.org", "TXT")[0].strings).decode()
    assert txt == dkim_keys.dkim_txt_record(config.dkim[0].private_key, "rsa")


def test_default_dmarc_record_is_p_none_with_a_local_rua_and_the_check_is_green(lab):
    """Issue 15 (9): a new installation publishes p=none (it was p=quarantine) with rua to a local
    mailbox, and ``dns check`` passes it without a warning while naming the next step."""
    from backend.dns.records import dmarc_value

    config, _, records, _, _ = lab
    assert "dmarc_policy" not in config.path.read_text()  # the default, as a new user gets it
    assert [l for l in records.splitlines() if l.startswith("_dmarc.example.org.\t")] == [
        '_dmarc.example.org.\t3600\tIN\tTXT\t"v=DMARC1; p=none; rua=mailto:dmarc@example.org"']
    # without [dns] dmarc_rua: postmaster@, which exists with no configuration (backend/receive/directory.py)
    plain = dataclasses.replace(config, dns=config.dns.model_copy(update={"dmarc_rua": None}))
    assert dmarc_value(plain, "example.org") == "v=DMARC1; p=none; rua=mailto:postmaster@example.org"
    serve(lab)
    report, failed = check(config)
    assert failed == set(), report.table()
    [dmarc] = [r for r in report.results if r.name == "DMARC example.org"]
    assert dmarc.ok and not dmarc.warn and not report.warnings()
    assert dmarc.detail.startswith("p=none, adkim=r, p=none only monitors: move to p=quarantine once "
                                   "`homemx-backend dmarc report` shows no unknown source")


def test_missing_ptr_is_detected(lab):
    config, _, records, ptr, _ = lab
    serve(lab, ptr="".join(l + "\n" for l in ptr.splitlines() if "in-addr" not in l))
    report, failed = check(config)
    assert failed == {f"PTR {GW4}"}
    assert "no PTR" in report.failures()[0].detail


def test_ptr_not_forward_confirmed_is_detected(lab):
    config, _, records, ptr, _ = lab
    # The PTR names the host but the host's A no longer includes the address.
    broken = records.replace(f"\tA\t{GW4}", f"\tA\t{OTHER_IP}")
    report, failed = check_after(lab, broken)
    assert f"PTR {GW4}" in failed and f"A {HOST}" in failed
    assert "forward-confirmed" in detail(report, f"PTR {GW4}")


def test_spf_without_gateway_ip_is_detected(lab):
    config, _, records, _, _ = lab
    broken = drop(records, "example.org.", "TXT") + f'example.org.\t300\tIN\tTXT\t"v=spf1 ip4:{OTHER_IP} -all"\n'
    report, failed = check_after(lab, broken)
    assert failed == {f"SPF example.org {GW4}", f"SPF example.org {GW6}"}
    assert detail(report, f"SPF example.org {GW4}").startswith("fail")


def test_spf_with_too_many_lookups_is_detected(lab):
    config, _, records, _, _ = lab
    # Eleven includes before the gateway address: RFC 7208 4.6.4 stops at ten lookups.
    includes = " ".join(f"include:s{i}.example.org" for i in range(11))
    extra = "".join(f's{i}.example.org.\t300\tIN\tTXT\t"v=spf1 ip4:192.0.2.{i} -all"\n' for i in range(11))
    broken = drop(records, "example.org.", "TXT") + f"example.org.\t300\tIN\tTXT\t{dkim_keys.zone_txt_rdata(f'v=spf1 {includes} ip4:{GW4} ip6:{GW6} -all')}\n"
    report, failed = check_after(lab, broken, extra)
    assert failed == {f"SPF example.org {GW4}", f"SPF example.org {GW6}"}
    assert "permerror" in detail(report, f"SPF example.org {GW4}")
    assert "more than 10 DNS lookups" in detail(report, f"SPF example.org {GW4}")


def test_wrong_dkim_key_is_detected(lab, tmp_path):
    config, _, records, _, _ = lab
    other = dkim_keys.generate_key("example.org", "rsa1", "rsa", tmp_path)
    broken = drop(records, "rsa1._domainkey.example.org.", "TXT") + other.zone_line() + "\n"
    report, failed = check_after(lab, broken)
    assert failed == {"DKIM rsa1._domainkey.example.org"}
    assert "does not match" in detail(report, "DKIM rsa1._domainkey.example.org")


def test_missing_dmarc_is_detected(lab):
    config, _, records, _, _ = lab
    report, failed = check_after(lab, drop(records, "_dmarc.example.org.", "TXT"))
    assert failed == {"DMARC example.org"}
    assert "no DMARC record" in detail(report, "DMARC example.org")


def test_mx_to_another_host_is_detected(lab):
    config, _, records, _, _ = lab
    broken = drop(records, "example.org.", "MX") + "example.org.\t300\tIN\tMX\t10 mx.elsewhere.example.org.\n"
    report, failed = check_after(lab, broken)
    assert failed == {"MX example.org"}
    assert "mx.elsewhere.example.org." in detail(report, "MX example.org")


def test_cli_check_exit_status_and_json(lab, capsys):
    config, _, records, _, tmp = lab
    serve(lab)
    # DNS only: this lab's gateway addresses are documentation addresses nobody may connect to.
    assert run_cli(["dns", "check", "-c", str(tmp / "backend.toml"), "--json", "--dns-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and all(c["ok"] for c in out["checks"])
    serve(lab, drop(records, "_dmarc.example.org.", "TXT"))
    assert run_cli(["dns", "check", "-c", str(tmp / "backend.toml"), "--dns-only"]) == 1
    table = capsys.readouterr().out
    assert any(line.startswith("DMARC example.org") and "FAIL" in line for line in table.splitlines())


def test_cli_records_prints_the_zone_lines(lab, capsys):
    config, _, records, ptr, tmp = lab
    assert run_cli(["dns", "records", "-c", str(tmp / "backend.toml")]) == 0
    assert capsys.readouterr().out == records
    assert run_cli(["dns", "records", "-c", str(tmp / "backend.toml"), "--ptr"]) == 0
    out = capsys.readouterr().out
    assert f"5.113.0.203.in-addr.arpa.\t3600\tIN\tPTR\t{HOST}" in out
    # The forward output names the PTR to ask for, as a comment (it does not belong in the forward zone).
    assert f"; 5.113.0.203.in-addr.arpa.\t3600\tIN\tPTR\t{HOST}" in records


def test_a_broken_zone_is_refused_by_nsd_with_its_reason(tmp_path):
    require_tool("/usr/sbin/nsd", "/usr/sbin/nsd-checkzone")
    with pytest.raises(NSDError, match="nsd-checkzone"):
        NSD({"example.org": zone_text("example.org", "www IN A not-an-address\n")}, workdir=tmp_path).start()


def check_after(lab, records, extra=""):
    serve(lab, records, extra=extra)
    return check(lab[0])


def detail(report, name):
    return next(r.detail for r in report.results if r.name == name)


def run_cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cmd_dns.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_nsd_fixture_leaves_nothing_behind():
    require_tool("/usr/sbin/nsd", "/usr/sbin/nsd-checkzone", "dig")
    import os
    import subprocess

    with NSD({"example.org": zone_text("example.org", "www IN A 192.0.2.1\n")}, address="127.0.0.77") as ns:
        pid, workdir, port = ns.proc.pid, ns.workdir, ns.port
        assert ns.resolver().resolve("www.example.org", "A")[0].address == "192.0.2.1"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()
    # Nothing answers on that address and port any more.
    r = subprocess.run(["dig", "+time=1", "+tries=1", "-p", str(port), "@127.0.0.77", "example.org", "SOA"], capture_output=True)
    assert r.returncode != 0


class _TXTTable:
    """A blocking lookup answering TXT from a dict (check_dmarc asks nothing else)."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table

    def txt(self, name: str) -> list[str]:
        return self.table.get(name.rstrip("."), [])


@pytest.mark.parametrize("key_domain, from_domain, ok", [
    ("news.example.org", "shop.example.org", True),  # siblings: one organizational domain (PSL)
    ("co.uk", "example.co.uk", False),  # a public suffix is no parent: never aligned
    ("example.co.uk", "example.co.uk", True),
    ("other.example", "example.org", False),
])
def test_dns_check_dmarc_alignment_uses_the_public_suffix_list(key_domain, from_domain, ok):
    from types import SimpleNamespace

    from backend.dns.check import check_dmarc

    config = SimpleNamespace(dkim=[SimpleNamespace(domain=key_domain, selector="s1")])
    lookup = _TXTTable({f"_dmarc.{from_domain}": ["v=DMARC1; p=reject; rua=mailto:d@" + from_domain]})
    passed, detail = check_dmarc(config, lookup, from_domain)
    assert passed is ok, detail
