"""Provisioning's /usr/sbin/sendmail link (provision/deploy.py sendmail_link): made where nothing is
there, moved when it is ours, never over another MTA's sendmail. Run through a real shell (invoke,
the runner under Fabric) on a host root in a temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from invoke import Context

from provision.deploy import Remote, Report, sendmail_link
from provision.site import HostLayout


def remote(root: Path, dry_run: bool = False) -> Remote:
    layout = HostLayout(ssh="root@home.lan", root=str(root))
    # the host's venv is this test run's venv: the link must start the real command
    venv = root / "opt" / "homemx" / "venv"
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not venv.exists():
        venv.symlink_to(Path(sys.executable).parent.parent)
    return Remote(Context(), layout, "backend", Report(), dry_run=dry_run)


def test_link_made_where_no_sendmail_is_and_it_runs_our_command(tmp_path):
    link = tmp_path / "usr" / "sbin" / "sendmail"
    r = remote(tmp_path, dry_run=True)
    sendmail_link(r)
    assert not link.exists() and not link.is_symlink()
    assert r.report.changed == [("backend", "/usr/sbin/sendmail", "would change")]
    r = remote(tmp_path)
    sendmail_link(r)
    assert os.readlink(link) == f"{tmp_path}/opt/homemx/venv/bin/homemx-sendmail"
    assert r.report.changed == [("backend", "/usr/sbin/sendmail", "changed")]
    run = subprocess.run([str(link), "-bp"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 64 and run.stderr.startswith("sendmail: -bp is not supported")
    r = remote(tmp_path)
    sendmail_link(r)  # second run: nothing to do
    assert r.report.changed == [] and r.report.notes == []


def test_an_old_link_of_ours_is_moved(tmp_path):
    link = tmp_path / "usr" / "sbin" / "sendmail"
    link.parent.mkdir(parents=True)
    link.symlink_to("/srv/old/venv/bin/homemx-sendmail")
    sendmail_link(remote(tmp_path))
    assert os.readlink(link) == f"{tmp_path}/opt/homemx/venv/bin/homemx-sendmail"


def test_another_mtas_sendmail_is_never_replaced_and_the_report_says_so(tmp_path):
    sbin = tmp_path / "usr" / "sbin"
    sbin.mkdir(parents=True)
    postfix = sbin / "sendmail"
    postfix.write_bytes(b"\x7fELF postfix sendmail")
    r = remote(tmp_path)
    sendmail_link(r)
    assert postfix.read_bytes() == b"\x7fELF postfix sendmail" and not postfix.is_symlink()
    assert r.report.changed == []
    assert r.report.notes == ["backend: /usr/sbin/sendmail is a file (another MTA's): left alone; homelab tools can "
                              "run /opt/homemx/venv/bin/homemx-sendmail instead"]
    postfix.unlink()
    postfix.symlink_to("/etc/alternatives/mta")  # dangling, as with a half-removed alternative: still not ours
    r = remote(tmp_path)
    sendmail_link(r)
    assert os.readlink(postfix) == "/etc/alternatives/mta"
    assert "a link to /etc/alternatives/mta" in r.report.notes[0]


def test_site_toml_lan_listener_and_masquerade_keys_reach_the_config_sendmail_reads(tmp_path):
    """What the operator guide says: lan_listen / lan_trusted_networks in [site], the masquerade keys
    on the rendered "lan" listener through [[backend.extra.listener]]; the daemon's loader accepts the
    result and homemx-sendmail finds the listener in it."""
    from backend.cli.sendmail import lan_server
    from backend.config import load_config
    from provision import hostside, render
    from provision.site import site_from_dict

    site = site_from_dict({
        "site": {"domain": "example.org", "hostname": "mail.example.org", "first_user": "alice@example.org",
                 "gateway_public_addr": "203.0.113.10", "lan_listen": "192.168.1.10:2525",
                 "lan_trusted_networks": ["192.168.1.0/24"]},
        "gateway": {"ssh": "root@vps.example.net"},
        "backend": {"ssh": "root@home.lan", "extra": {"listener": [
            {"name": "lan", "masquerade_domain": "example.org", "local_hostnames": ["nas.home.arpa"]}]}},
    })
    lay = HostLayout(root=str(tmp_path))
    hostside.dkim_keys({"domain": "example.org", "keys": render.dkim_entries(site, lay, "example.org")})
    (tmp_path / "backend.toml").write_text(render.backend_toml(site, lay))
    [lan] = [lc for lc in load_config(tmp_path / "backend.toml").listeners if lc.kind == "lan"]
    assert (lan.masquerade_domain, lan.local_hostnames) == ("example.org", ("nas.home.arpa",))
    s = lan_server(str(tmp_path / "backend.toml"))
    assert (s.host, s.port, s.hostname) == ("192.168.1.10", 2525, "mail.example.org")
