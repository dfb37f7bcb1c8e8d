"""site.toml expresses what a home user configures (issue 15, point 4): every item reaches the rendered
backend.toml / gateway.toml as the daemons' own loaders read them; [gateway.extra] / [backend.extra]
reach anything else, and a mistake in them is a FILE: KEY: REASON line before anything is uploaded."""

from __future__ import annotations

import ipaddress
import tomllib

import pytest

from provision import render
from provision.site import HostLayout, SiteError, site_from_dict

BASE = {"site": {"domain": "example.org", "hostname": "mail.example.org", "first_user": "alice@example.org",
                 "gateway_public_addr": "203.0.113.10"},
        "gateway": {"ssh": "root@vps.example.net"}, "backend": {"ssh": "root@home.lan"}}

# Every item issue 15 lists, as a home user writes it in site.toml.
EVERYTHING = """
[site]
domain = "example.org"
hostname = "mail.example.org"
first_user = "alice@example.org"
gateway_public_addr = "203.0.113.10"
domains = ["example.net"]                               # a second domain
aliases = { info = "alice@example.org", "sales@example.net" = ["alice@example.org", "bob@example.org"] }
catch_all = "alice@example.org"
lan_listen = "192.168.1.10:2525"                        # the lan listener ...
lan_trusted_networks = ["192.168.1.0/24", "fd00::/64"]  # ... and who submits on it without AUTH
gateway_metrics_port = 9101                             # metrics for Prometheus, both ends
backend_metrics_listen = "127.0.0.1:9325"
dnsbl_zones = ["zen.spamhaus.org"]
mta_sts_mode = "enforce"
smarthost = "192.0.2.25:465"
smarthost_hostname = "smtp.provider.example"
smarthost_username = "alice"
smarthost_password_file = "/etc/homemx/smarthost.password"
rspamd = true
gateway_public_addr6 = "2001:db8::10"

[gateway]
ssh = "root@vps.example.net"
[gateway.extra.limits]
max_per_client = 5

[backend]
ssh = "root@home.lan"
[backend.extra.rspamd]
fail_closed = true
scan_listeners = ["mx", "lan"]
[backend.extra.domain."example.net"]
catch_all = "bob@example.org"
[[backend.extra.listener]]                              # a rendered listener changed by name
name = "mx"
max_message_size = "30MB"
"""


def _load(tmp_path, site):
    """Both rendered files read back by the daemons' own loaders, with the files they name made as
    deploy makes them (DKIM keys for every domain, the smarthost password the operator puts there)."""
    from backend.config import load_config as load_backend
    from gateway.config import load_config as load_gateway
    from provision import hostside

    lay = HostLayout(root=str(tmp_path))
    for d in site.all_domains:
        hostside.dkim_keys({"domain": d, "keys": render.dkim_entries(site, lay, d)})
    if site.smarthost_password_file:
        pw = tmp_path / site.smarthost_password_file.lstrip("/")
        pw.parent.mkdir(parents=True, exist_ok=True)
        pw.write_text("secret\n")
    (tmp_path / "backend.toml").write_text(render.backend_toml(site, lay))
    (tmp_path / "gateway.toml").write_text(render.gateway_toml(site))
    return load_backend(tmp_path / "backend.toml"), load_gateway(tmp_path / "gateway.toml")


def test_every_item_a_home_user_configures_reaches_the_daemons(tmp_path):
    site = site_from_dict(tomllib.loads(EVERYTHING), "site.toml")
    backend, gateway = _load(tmp_path, site)
    net = ipaddress.ip_network
    # a second domain, with its own DKIM keys and postmaster@
    assert set(backend.domains) == {"example.org", "example.net"}
    assert {(k.domain, k.selector) for k in backend.dkim} == {
        (d, s) for d in ("example.org", "example.net") for s in ("hmx-rsa", "hmx-ed25519")}
    assert backend.domains["example.net"].aliases["postmaster"] == ("alice@example.org",)
    # root (homelab tools' `sendmail root`) reaches the first user unless the site says otherwise
    assert backend.domains["example.net"].aliases["root"] == ("alice@example.org",)
    # aliases (of the domain, or of another by full address) and catch-alls
    assert backend.domains["example.org"].aliases["info"] == ("alice@example.org",)
    assert backend.domains["example.net"].aliases["sales"] == ("alice@example.org", "bob@example.org")
    assert backend.domains["example.org"].catch_all == "alice@example.org"
    assert backend.domains["example.net"].catch_all == "bob@example.org"  # [backend.extra]
    # the lan listener and its trusted networks
    lan = next(lc for lc in backend.listeners if lc.kind == "lan")
    assert lan.listen == ("192.168.1.10", 2525) and lan.trusted_networks == (net("192.168.1.0/24"), net("fd00::/64"))
    assert not lan.proxy_protocol
    # metrics for Prometheus
    assert backend.server.metrics_listen == ("127.0.0.1", 9325)
    assert gateway.server.metrics_listen == ("10.77.0.1", 9101)
    # DNSBL on the gateway's mx listener only
    assert gateway.dnsbl.zones == ("zen.spamhaus.org",)
    assert {lc.name: lc.dnsbl for lc in gateway.listeners}["mx"] is True
    assert not any(lc.dnsbl for lc in gateway.listeners if lc.name != "mx")
    # MTA-STS, the smarthost
    assert backend.dns.mta_sts_mode == "enforce"
    d = backend.delivery
    assert (d.smarthost, d.smarthost_hostname, d.smarthost_username, d.smarthost_tls) == (
        ("192.0.2.25", 465), "smtp.provider.example", "alice", "implicit")
    assert str(d.smarthost_password_file) == f"{tmp_path}/etc/homemx/smarthost.password"
    # rspamd, with [backend.extra] changing what provisioning renders
    assert backend.rspamd.url == f"http://{render.RSPAMD_WORKER}" and backend.rspamd.fail_closed is True
    assert backend.rspamd.scan_listeners == ("mx", "lan")
    # IPv6: the gateway listens on [::] too; the backend's DNS records know the address
    mx = next(lc for lc in gateway.listeners if lc.name == "mx")
    assert mx.listen == (("0.0.0.0", 25), ("::", 25))
    assert backend.gateway.public_ipv6 == ("2001:db8::10",)
    # [gateway.extra] and a [[listener]] changed by name (not added twice)
    assert gateway.limits.max_per_client == 5
    assert [lc.name for lc in backend.listeners] == ["mx", "submission", "submissions", "lan"]
    mx_be = backend.listeners[0]
    assert mx_be.max_message_size == 30 * 1024 * 1024
    assert mx_be.proxy_protocol  # the rest of the rendered listener is kept


def test_a_minimal_site_renders_none_of_them(tmp_path):
    backend, gateway = _load(tmp_path, site_from_dict(BASE))
    assert set(backend.domains) == {"example.org"} and backend.domains["example.org"].catch_all is None
    assert [lc.kind for lc in backend.listeners] == ["mx", "submission", "submissions"]
    assert backend.delivery.smarthost is None and backend.dns.mta_sts_mode is None
    assert backend.gateway.public_ipv6 == () and gateway.dnsbl.zones == ()
    assert all(lc.listen == (("0.0.0.0", lc.listen[0][1]),) for lc in gateway.listeners)


def test_rendering_with_extras_is_deterministic_toml():
    site = site_from_dict(tomllib.loads(EVERYTHING))
    text = render.backend_toml(site, site.backend)
    assert text == render.backend_toml(site_from_dict(tomllib.loads(EVERYTHING)), site.backend)
    assert tomllib.loads(text) == render.backend_config(site, site.backend)
    assert tomllib.loads(render.gateway_toml(site)) == render.gateway_config(site)
    assert text.startswith("# homemx backend: written by provisioning (provision/render.py) from site.toml")


@pytest.mark.parametrize("patch, problems", [
    # a typo in an extra table, found by the daemon's own schema
    ({"backend": {"extra": {"delivery": {"smarthost_tsl": "implicit"}}}},
     [("backend.extra.delivery.smarthost_tsl", "unknown key")]),
    ({"gateway": {"extra": {"limits": {"max_per_client": 0}}}},
     [("gateway.extra.limits.max_per_client", "expected a positive integer, got 0")]),
    ({"backend": {"extra": {"dns": {"mta_sts_mode": "on"}}}},
     [("backend.extra.dns.mta_sts_mode", "expected one of 'testing' or 'enforce', got 'on'")]),
    # [site] keys, checked with the backend's parsers
    ({"site": {"domains": ["example"]}}, [("site.domains", "expected a domain name such as example.org, got 'example'")]),
    ({"site": {"catch_all": "alice"}}, [("site.catch_all", "'alice' is not an address (Bad address syntax)")]),
    ({"site": {"aliases": {"info@example.com": "alice@example.org"}}},
     [('site.aliases."info@example.com"', "not in one of our domains (domain, domains)")]),
    ({"site": {"lan_listen": "192.168.1.10:25"}},
     [("site.lan_listen", "port 25: the backend runs unprivileged, use a port above 1023 (e.g. 2525)")]),
    ({"site": {"lan_trusted_networks": ["192.168.1.0/24"]}},
     [("site.lan_trusted_networks", "needs lan_listen (the lan listener they may submit on)")]),
    ({"site": {"lan_listen": "192.168.1.10:2525", "lan_trusted_networks": ["0.0.0.0/0"]}},
     [("site (backend.toml listener[3].trusted_networks)", "0.0.0.0/0 trusts every address: whoever reaches this "
       "listener relays without AUTH (set allow_open_relay = true if that is meant)")]),
    ({"site": {"smarthost_username": "alice"}},
     [("site.smarthost", "missing: smarthost_username/smarthost_password_file are set")]),
    ({"site": {"gateway_public_addr6": "203.0.113.10"}}, [("site.gateway_public_addr6", "not an IPv6 address "
                                                             "(At least 3 parts expected in '203.0.113.10')")]),
    ({"site": {"mta_sts_mode": "yes"}}, [("site.mta_sts_mode", "Input should be '', 'testing' or 'enforce', got 'yes'")]),
])
def test_mistakes_are_one_line_each_naming_the_site_key(patch, problems):
    data = {k: ({**v, **patch[k]} if k in patch else v) for k, v in BASE.items()}
    with pytest.raises(SiteError) as e:
        site_from_dict(data, "ops/site.toml")
    assert e.value.problems == problems
    assert str(e.value).splitlines() == [f"ops/site.toml: {k}: {r}" for k, r in problems]


def test_root_goes_to_the_first_user_unless_the_site_aliases_it(tmp_path):
    raw = tomllib.loads(EVERYTHING)
    backend, _ = _load(tmp_path, site_from_dict(raw, "site.toml"))
    assert backend.domains["example.org"].aliases["root"] == ("alice@example.org",)
    raw["site"]["aliases"]["root"] = "bob@example.org"
    backend, _ = _load(tmp_path, site_from_dict(raw, "site.toml"))
    assert backend.domains["example.org"].aliases["root"] == ("bob@example.org",)
