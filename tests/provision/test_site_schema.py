"""site.toml schema: every mistake of the file reported at once, one FILE: KEY: REASON line each, by the
real `fab` tasks (exit 1, no traceback); checks between keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from provision.site import SiteError, site_from_dict

REPO = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).with_name("fab"))

SITE = """[site]
domain = "example.org"
hostname = "mail.example.org"
first_user = "alice@example.org"
gateway_public_addr = "203.0.113.10"
[gateway]
ssh = "root@vps.example.net"
[backend]
ssh = "root@home.lan"
"""
BASE = {"site": {"domain": "example.org", "hostname": "mail.example.org", "first_user": "alice@example.org",
                 "gateway_public_addr": "203.0.113.10"}}


@pytest.mark.parametrize("task", ["check", "both", "gateway", "backend"])
def test_three_mistakes_make_three_lines_from_fab(tmp_path, task):
    path = tmp_path / "site.toml"
    path.write_text(SITE.replace('gateway_public_addr = "203.0.113.10"', 'gateway_public_addr = "vps.example.net"')
                    .replace("[gateway]\n", "[gateway]\nsystemctl = \"no\"\n")
                    .replace("[backend]\n", "[backend]\nrooot = \"/srv\"\n"))
    # --dry-run keeps a mistake in the test from touching anything; the file is refused before that.
    r = subprocess.run([FAB, "-r", str(REPO / "provision"), task, "--site", str(path)]
                       + (["--dry-run"] if task != "check" else []),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        f"{path}: site.gateway_public_addr: not an IPv4 address (Expected 4 octets in 'vps.example.net')",
        f"{path}: gateway.systemctl: expected bool, got str",
        f"{path}: backend.rooot: unknown key",
    ]
    assert r.stdout == ""


def _problems(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(SiteError) as e:
        site_from_dict(data, "ops/site.toml")
    assert str(e.value).splitlines() == [f"ops/site.toml: {k}: {r}" for k, r in e.value.problems]
    return e.value.problems


def test_a_typo_is_an_unknown_key_and_the_key_it_meant_is_missing():
    site = {k: v for k, v in BASE["site"].items() if k != "hostname"} | {"hostnme": "mail.example.org"}
    assert _problems({"site": site}) == [("site.hostname", "missing (required)"), ("site.hostnme", "unknown key")]


@pytest.mark.parametrize("extra, problem", [
    ({"tls_cert": "certs/fullchain.pem"}, ("site.tls_key", "tls_cert and tls_key must be set together")),
    ({"tls_key": "certs/privkey.pem"}, ("site.tls_cert", "tls_cert and tls_key must be set together")),
    ({"backend_tunnel_addr": "10.77.0.1"}, ("site.backend_tunnel_addr", "must differ from gateway_tunnel_addr")),
    ({"backend_tunnel_addr": "10.78.0.2"},
     ("site.backend_tunnel_addr", "not in the tunnel network 10.77.0.0/24 (gateway_tunnel_addr/tunnel_prefixlen)")),
    ({"tunnel_prefixlen": 33}, ("site.tunnel_prefixlen", "expected 0..32, got 33")),
])
def test_checks_between_keys(extra, problem):
    assert _problems({"site": BASE["site"] | extra}) == [problem]


def test_host_directories_must_be_absolute():
    assert _problems(BASE | {"backend": {"data_dir": "var/lib/homemx"}}) == [("backend.data_dir", "must be an absolute path")]


def test_host_tables_are_not_keys_of_the_site_table():
    assert _problems({"site": BASE["site"] | {"gateway": {"ssh": "x"}}}) == [("site.gateway", "unknown key")]


def test_every_key_is_documented():
    import dataclasses

    from provision.site import HostLayout, Site

    doc = (REPO / "docs" / "operator-guide.md").read_text()
    keys = {f.name for f in dataclasses.fields(Site) + dataclasses.fields(HostLayout)} - {"gateway", "backend"}
    assert {key for key in keys if f"`{key}`" not in doc} == set()
