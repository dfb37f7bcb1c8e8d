"""Pure parts of provisioning: the site file's errors name file and key; rendered files are deterministic and valid for the daemons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_alert_rules_path_under_the_home_root():
    site = site_from_dict({**BASE, "site": {**BASE["site"], "prometheus_rules_dir": "/etc/prometheus/rules/"}})
    assert render.alert_rules_path(site, site.backend) == "/srv/h/etc/prometheus/rules/homemx-alerts.yml"
    assert render.ALERT_RULES.is_file() and site_from_dict(BASE).prometheus_rules_dir == ""


def test_metrics_endpoints_rendered_only_when_asked(tmp_path):
    from backend.config import load_config as load_backend
    from gateway.config import load_config as load_gateway
    from provision import hostside

    off = site_from_dict(BASE)
    assert "metrics_listen" not in render.gateway_toml(off)
    assert "metrics_listen" not in render.backend_toml(off, HostLayout(root=str(tmp_path)))
    site = site_from_dict({**BASE, "site": {**BASE["site"], "gateway_metrics_port": 9101,
                                            "backend_metrics_listen": "127.0.0.1:9325"}})
    (tmp_path / "gateway.toml").write_text(render.gateway_toml(site))
    gw = load_gateway(tmp_path / "gateway.toml")
    assert gw.server.metrics_listen == ("10.77.0.1", 9101) and gw.server.tunnel_interface == "hmx0"
    lay = HostLayout(root=str(tmp_path))
    cert, key = render.tls_paths(lay)
    hostside.tls_selfsigned({"cert": cert, "key": key, "hostname": site.hostname})
    hostside.dkim_keys({"domain": site.domain, "keys": render.dkim_entries(site, lay)})
    (tmp_path / "backend.toml").write_text(render.backend_toml(site, lay))
    assert load_backend(tmp_path / "backend.toml").server.metrics_listen == ("127.0.0.1", 9325)


@pytest.mark.parametrize("patch, key, reason", [
    ({"site": {**BASE["site"], "colour": "blue"}}, "site.colour", "unknown key"),
    ({"gateway": {"rooot": "/"}}, "gateway.rooot", "unknown key"),
    ({"backend": {"systemctl": "no"}}, "backend.systemctl", "expected bool"),
    ({"site": {**BASE["site"], "wg_port": True}}, "site.wg_port", "expected int"),
    ({"site": {k: v for k, v in BASE["site"].items() if k != "domain"}}, "site.domain", "missing"),
    ({"site": {**BASE["site"], "gateway_public_addr": "vps"}}, "site.gateway_public_addr", "IPv4"),
    ({"site": {**BASE["site"], "prometheus_rules_dir": "rules"}}, "site.prometheus_rules_dir", "absolute path"),
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


# Renders every file provisioning writes without a secret and prints {name: sha256}. Run in a fresh
# interpreter: ordering that depends on set/dict-of-str iteration (PYTHONHASHSEED) or on anything
# else process-specific only shows across processes, never within one.
RENDER_ALL = r"""
import hashlib, json, sys
from provision import render
from provision.site import HostLayout, site_from_dict
site = site_from_dict(json.loads(sys.argv[1]))
lay = HostLayout(root=sys.argv[2])
files = {
    "gateway.toml": render.gateway_toml(site),
    "backend.toml": render.backend_toml(site, lay),
    "tunnel-gateway.service": render.tunnel_unit(site, lay, "gateway"),
    "tunnel-backend.service": render.tunnel_unit(site, lay, "backend"),
    "gateway.service": render.gateway_unit(site, lay),
    "backend.service": render.backend_unit(site, lay),
    "dkim": json.dumps(render.dkim_entries(site, lay)),
    "rspamd": json.dumps(render.rspamd_local_files()),
    "dovecot": json.dumps([render.dovecot_junk_conf(lay.etc + "/dovecot"), render.dovecot_junk_files()]),
}
print(json.dumps({k: hashlib.sha256(v.encode()).hexdigest() for k, v in files.items()}, sort_keys=True))
"""


def test_rendered_files_are_identical_across_processes(tmp_path):
    """Provisioning compares hashes of what it would write with what is on the host; a second run
    in a new process must produce the same bytes, whatever the interpreter's hash seed."""
    site = {**BASE, "site": {**BASE["site"], "dmarc_rua": "dmarc@example.org", "userspace_wireguard": True}}
    repo = Path(__file__).resolve().parents[2]
    digests = []
    for seed in ("1", "2", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(repo))
        r = subprocess.run([sys.executable, "-c", RENDER_ALL, json.dumps(site), str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        digests.append(json.loads(r.stdout))
    assert len(digests[0]) == 9
    assert digests[0] == digests[1] == digests[2]


def test_rendered_backend_config_names_the_provisioned_rspamd(tmp_path):
    """The backend asks the rspamd provisioning configures (its normal worker on loopback), fail-open;
    a site without rspamd gets a backend without spam filtering."""
    from backend.config import load_config as load_backend
    from provision import hostside

    lay = HostLayout(root=str(tmp_path))
    cert, key = render.tls_paths(lay)
    hostside.tls_selfsigned({"cert": cert, "key": key, "hostname": "mail.example.org"})
    site = site_from_dict(BASE)
    hostside.dkim_keys({"domain": site.domain, "keys": render.dkim_entries(site, lay)})
    (tmp_path / "backend.toml").write_text(render.backend_toml(site, lay))
    cfg = load_backend(tmp_path / "backend.toml")
    assert cfg.rspamd is not None and cfg.rspamd.url == f"http://{render.RSPAMD_WORKER}"
    assert cfg.rspamd.fail_closed is False and cfg.rspamd.timeout == 5.0
    off = site_from_dict({**BASE, "site": {**BASE["site"], "rspamd": False}})
    (tmp_path / "backend.toml").write_text(render.backend_toml(off, lay))
    assert load_backend(tmp_path / "backend.toml").rspamd is None


def test_rendered_rspamd_files_load_in_rspamd_with_workers_on_loopback_only(tmp_path):
    """What provisioning writes to /etc/rspamd/local.d passes Debian's rspamd's own config test, and
    the merged config binds the scanner and the controller to 127.0.0.1 only, with no milter proxy."""
    from tests.conftest import require_tool

    require_tool("rspamadm")
    for rel, text in render.rspamd_local_files().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    base = ["rspamadm", f"--var=LOCAL_CONFDIR={tmp_path}"]
    r = subprocess.run([*base, "configtest", "-c", render.RSPAMD_CONF], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "syntax OK" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*base, "configdump", "-j", "-c", render.RSPAMD_CONF, "worker"], capture_output=True, text=True,
                       timeout=60)
    workers, text, decoder = {}, r.stdout.strip(), json.JSONDecoder()
    while text:  # one JSON object per worker, one after the other
        obj, end = decoder.raw_decode(text)
        workers.update(obj)
        text = text[end:].strip()
    assert workers["normal"]["bind_socket"] == render.RSPAMD_WORKER
    assert workers["controller"]["bind_socket"] == render.RSPAMD_CONTROLLER
    assert workers["rspamd_proxy"]["enabled"] is False


def _load_rendered(tmp_path, site):
    """backend.toml and gateway.toml as rendered, read back by the daemons' own config loaders (the
    files they name made as deploy makes them)."""
    from backend.config import load_config as load_backend
    from gateway.config import load_config as load_gateway
    from provision import hostside

    lay = HostLayout(root=str(tmp_path))
    if not site.acme:
        cert, key = render.tls_paths(lay)
        hostside.tls_selfsigned({"cert": cert, "key": key, "hostname": site.hostname})
    hostside.dkim_keys({"domain": site.domain, "keys": render.dkim_entries(site, lay)})
    (tmp_path / "backend.toml").write_text(render.backend_toml(site, lay))
    (tmp_path / "gateway.toml").write_text(render.gateway_toml(site))
    return lay, load_backend(tmp_path / "backend.toml"), load_gateway(tmp_path / "gateway.toml")


def test_acme_on_by_default_with_the_web_face_behind_the_gateway(tmp_path):
    import ipaddress

    site = site_from_dict(BASE)
    lay, backend, gateway = _load_rendered(tmp_path, site)
    assert "[tls]" not in render.backend_toml(site, lay)  # no self-signed certificate with ACME
    acme = backend.acme
    assert acme.enabled and acme.challenge == "http-01" and str(acme.contact) == "postmaster@example.org"
    assert acme.directory.startswith("https://acme-v02.api.letsencrypt.org/")
    # The web face on the tunnel address, trusting PROXY v2 from the gateway's tunnel address only.
    http = backend.http
    assert http.enabled and http.listen_http == ("10.77.0.2", 2080) and http.listen_https == ("10.77.0.2", 2443)
    assert http.proxy_protocol and list(http.trusted_proxies) == [ipaddress.ip_network("10.77.0.1/32")]
    # The gateway passes 80 and 443 through to it, with PROXY v2, like IMAPS.
    web = {lc.name: lc for lc in gateway.listeners if lc.name in ("http", "https")}
    assert {n: (lc.kind, lc.listen, lc.upstream, lc.proxy_v2) for n, lc in web.items()} == {
        "http": ("tcp", (("0.0.0.0", 80),), ("10.77.0.2", 2080), True),
        "https": ("tcp", (("0.0.0.0", 443),), ("10.77.0.2", 2443), True)}
    # Dovecot reads the backend's live ACME files; the backend's hook touches the file the root
    # path unit watches, whose service reloads Dovecot.
    live_cert, live_key = render.acme_live_paths(lay)
    assert live_cert == f"{backend.acme_dir}/live/fullchain.pem" and live_key == f"{backend.acme_dir}/live/privkey.pem"
    assert render.dovecot_tls_conf(site, lay).endswith(f"ssl_cert = <{live_cert}\nssl_key = <{live_key}\n")
    trigger = render.dovecot_reload_trigger(lay)
    assert acme.reload_hook == f"touch {trigger}"
    units = render.dovecot_reload_units(lay)
    assert f"\nPathChanged={trigger}\n" in units["homemx-dovecot-reload.path"]
    assert "\nExecStart=/usr/bin/doveadm reload\n" in units["homemx-dovecot-reload.service"]


def test_acme_contact_from_the_site_file(tmp_path):
    site = site_from_dict({**BASE, "site": {**BASE["site"], "acme_contact": "hostmaster@example.org",
                                            "acme_directory": "https://acme.example.net/directory"}})
    _, backend, _ = _load_rendered(tmp_path, site)
    assert str(backend.acme.contact) == "hostmaster@example.org"
    assert backend.acme.directory == "https://acme.example.net/directory"


def test_acme_off_renders_the_self_signed_certificate(tmp_path):
    site = site_from_dict({**BASE, "site": {**BASE["site"], "acme": False}})
    lay, backend, gateway = _load_rendered(tmp_path, site)
    cert, key = render.tls_paths(lay)
    assert not backend.acme.enabled and (str(backend.tls.cert), str(backend.tls.key)) == (cert, key)
    assert render.dovecot_tls_conf(site, lay).endswith(f"ssl_cert = <{cert}\nssl_key = <{key}\n")
    assert backend.http.enabled and {"http", "https"} <= {lc.name for lc in gateway.listeners}


@pytest.mark.parametrize("patch, key", [
    ({"tls_cert": "c.pem", "tls_key": "k.pem"}, "site.tls_cert"),  # own certificate needs acme = false
    ({"acme_contact": "postmaster"}, "site.acme_contact"),
])
def test_acme_site_mistakes(patch, key):
    with pytest.raises(SiteError) as e:
        site_from_dict({**BASE, "site": {**BASE["site"], **patch}})
    assert e.value.key == key


def test_backend_unit_reloads_with_sighup(tmp_path):
    # `systemctl reload homemx-backend` must reach Backend.reload (certificate, users, DKIM keys);
    # without ExecReload systemd refuses the verb ("Job type reload is not applicable").
    unit = render.backend_unit(site_from_dict(BASE), HostLayout(root=str(tmp_path)))
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in unit
