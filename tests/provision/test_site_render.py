"""Pure parts of provisioning: the site file's errors name file and key; rendered files are deterministic and valid for the daemons."""

from __future__ import annotations

import pytest

from provision import render
from provision.site import HostLayout, SiteError, site_from_dict

BASE = {"site": {"domain": "example.org", "hostname": "mail.example.org", "first_user": "alice@example.org",
                 "gateway_public_addr": "203.0.113.10"},
        "gateway": {"ssh": "root@vps.example.net"}, "backend": {"ssh": "root@home.lan", "root": "/srv/h"}}


def test_site_defaults_and_root_prefix():
    site = site_from_dict(BASE)
    assert site.endpoint == "203.0.113.10" and site.gateway.etc == "/etc/homemx"
    assert site.backend.etc == "/srv/h/etc/homemx" and site.backend.data == "/srv/h/var/lib/homemx"
    assert render.wg_conf_path(site, site.backend) == "/srv/h/etc/homemx/wireguard/hmx0.conf"


@pytest.mark.parametrize("patch, key, reason", [
    ({"site": {**BASE["site"], "colour": "blue"}}, "site.colour", "unknown key"),
    ({"gateway": {"rooot": "/"}}, "gateway.rooot", "unknown key"),
    ({"backend": {"systemctl": "no"}}, "backend.systemctl", "expected bool"),
    ({"site": {**BASE["site"], "wg_port": True}}, "site.wg_port", "expected int"),
    ({"site": {k: v for k, v in BASE["site"].items() if k != "domain"}}, "site.domain", "missing"),
    ({"site": {**BASE["site"], "gateway_public_addr": "vps"}}, "site.gateway_public_addr", "IPv4"),
    ({"extra": {}}, "extra", "unknown table"),
])
def test_site_errors_name_file_and_key(patch, key, reason):
    with pytest.raises(SiteError) as e:
        site_from_dict({**BASE, **patch}, "ops/site.toml")
    assert e.value.file == "ops/site.toml" and e.value.key == key and reason in e.value.reason


def test_rendered_configs_load_in_the_daemons(tmp_path):
    from backend.config import load_config as load_backend
    from gateway.config import load_config as load_gateway

    site = site_from_dict(BASE)
    lay = HostLayout(root=str(tmp_path))
    assert render.backend_toml(site, lay) == render.backend_toml(site, lay)  # deterministic: hashes compare
    (tmp_path / "gateway.toml").write_text(render.gateway_toml(site))
    gw = load_gateway(tmp_path / "gateway.toml")
    mx = next(lc for lc in gw.listeners if lc.name == "mx")
    assert mx.upstream == ("10.77.0.2", 2525) and mx.greet_wait == 6.0
    # the backend config names files that must exist: make them as the host side would
    from provision import hostside

    cert, key = render.tls_paths(lay)
    assert hostside.tls_selfsigned({"cert": cert, "key": key, "hostname": site.hostname}) == {"tls": "changed"}
    assert hostside.tls_selfsigned({"cert": cert, "key": key, "hostname": site.hostname}) == {"tls": "unchanged"}
    res = hostside.dkim_keys({"domain": site.domain, "keys": render.dkim_entries(site, lay)})
    assert res["keys"] == "changed" and len(res["records"]) == 2
    assert hostside.dkim_keys({"domain": site.domain, "keys": render.dkim_entries(site, lay)})["keys"] == "unchanged"
    (tmp_path / "backend.toml").write_text(render.backend_toml(site, lay))
    cfg = load_backend(tmp_path / "backend.toml")
    assert [d.selector for d in cfg.dkim] == ["hmx-rsa", "hmx-ed25519"]
