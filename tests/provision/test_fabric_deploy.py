"""Acceptance: the Fabric provisioning runs for real over SSH against two "hosts" (sshd in two network namespaces).

Topology (tests/lab/netns.py): internet / gateway / NAT router / home. sshd listens in the gateway
and home namespaces; Fabric reaches each through a ProxyCommand that relays inside the namespace.
Each host has its own root directory (its /etc/homemx, data dir, venv, units) so the two never
collide on this one filesystem, and systemctl is never called (no systemd here): the test starts the
daemons itself from the provisioned files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.lab.netns import Lab, home_behind_nat

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RELAY = Path(__file__).with_name("nsrelay.py")


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    """homemx's wheel; each host's dependencies are resolved for it (provision/wheels.py) into this
    session's cache (the fab command line test finds it through XDG_CACHE_HOME)."""
    from provision.wheels import HostWheels, build_homemx_wheel

    d = tmp_path_factory.mktemp("wheels")
    return HostWheels(homemx=build_homemx_wheel(REPO, d / "homemx"), cache=d / "xdg" / "homemx" / "wheels")


def _other_python() -> str | None:
    """A CPython of another minor version than the operator's (this machine kind has pyenv's), with
    venv and ensurepip: the home host's python3, so it must get wheels of its own. None: there is none."""
    for v in ("3.12", "3.13", "3.11"):
        if v == "%d.%d" % sys.version_info[:2]:
            continue
        for cand in sorted(Path("/root/.pyenv/versions").glob(f"{v}.*/bin/python{v}")) + [Path(f"/usr/bin/python{v}")]:
            if cand.exists() and subprocess.run([cand, "-c", "import venv, ensurepip, ssl"]).returncode == 0:
                return str(cand)
    return None


def _sshd(lab: Lab, ns, addr: str, role: str, pubkey: str, python3: str | None = None) -> None:
    d = lab.workdir / f"ssh-{role}"
    d.mkdir()
    setenv = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if python3:  # this host's python3 (for SSH sessions) is another Python than the operator's
        (d / "bin").mkdir()
        (d / "bin" / "python3").symlink_to(python3)
        setenv = setenv.replace("PATH=", f"PATH={d / 'bin'}:")
        if "/.pyenv/versions/" in python3:  # root's .bashrc puts pyenv's shims first: they obey this
            setenv += " PYENV_VERSION=" + python3.split("/.pyenv/versions/")[1].split("/")[0]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey")], check=True)
    (d / "authorized_keys").write_text(pubkey)
    cfg = d / "sshd_config"
    cfg.write_text(f"""ListenAddress {addr}:22
HostKey {d}/hostkey
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
SetEnv {setenv}
""")
    Path("/run/sshd").mkdir(exist_ok=True)
    ns.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=subprocess.DEVNULL)


def _wait_ssh(conn, deadline=15.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            conn.run("true", hide=True, in_stream=False)
            return
        except Exception:
            if time.monotonic() > end:
                raise
            conn.close()
            time.sleep(0.2)


@pytest.fixture(scope="module")
def hosts(wheels):
    require_root()
    require_tool("/usr/sbin/sshd", "ssh-keygen", "wireguard-go", "wg", "nft", "systemd-analyze", "swaks", "rspamadm",
                 "sievec")
    from provision import deploy
    from provision.site import HostLayout, Site

    lab = Lab("hp")
    user = "hmx" + lab.prefix  # a system user only this run uses (runs may overlap), removed afterwards
    conns = []
    try:
        topo = home_behind_nat(lab)
        key = lab.workdir / "operator_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        pub = (lab.workdir / "operator_key.pub").read_text()
        _sshd(lab, topo.gateway, topo.gateway_addr, "gw", pub)
        _sshd(lab, topo.home, topo.home_addr, "home", pub, python3=_other_python())

        def layout(role, ns, addr, ifname):
            # Fabric reaches each namespace's sshd through a relay started inside that namespace
            return HostLayout(ssh=f"root@{addr}", ssh_proxy=f"ip netns exec {ns.name} {sys.executable} {RELAY} {addr} 22",
                              ssh_key=str(key), root=str(lab.workdir / f"root-{role}"), user=user, systemctl=False,
                              install_packages=False, ifname=ifname)

        site = Site(domain="example.org", hostname="mail.example.org", first_user="alice@example.org",
                    gateway_public_addr=topo.gateway_addr, gateway_public_if=topo.gateway_if,
                    userspace_wireguard=True, greet_wait="1s",
                    gateway=layout("gw", topo.gateway, topo.gateway_addr, lab.name("wgg")),
                    backend=layout("home", topo.home, topo.home_addr, lab.name("wgh")))
        gw, be = deploy.connection(site.gateway), deploy.connection(site.backend)
        conns += [gw, be]
        _wait_ssh(gw)
        _wait_ssh(be)
        yield {"lab": lab, "topo": topo, "site": site, "gw": gw, "be": be, "wheels": wheels,
               "user": user}
    finally:
        for c in conns:
            c.close()
        lab.close()
        subprocess.run(["userdel", user], capture_output=True)


def _deploy(h, site=None, dry_run=False):
    from provision import deploy

    return deploy.deploy_both(site or h["site"], h["gw"], h["be"], h["wheels"], dry_run=dry_run)


def _mode(p: str) -> tuple[str, str, str]:
    st = os.stat(p)
    import grp
    import pwd

    return oct(stat.S_IMODE(st.st_mode)), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


def test_dry_run_on_fresh_hosts_writes_nothing(hosts):
    site = hosts["site"]
    report, g, b, _ = _deploy(hosts, dry_run=True)
    statuses = {st for _, _, st in report.items}
    assert "changed" not in statuses and "would change" in statuses
    for item in ("venv", "wireguard key", "wireguard conf", "gateway.toml", "unit homemx-gateway.service"):
        assert ("gateway", item, "would change") in report.items, item
    for item in ("dkim keys", "backend.toml", "first user alice@example.org", "dovecot homemx-tls.conf",
                 "unit homemx-dovecot-reload.path", "rspamd local.d/worker-normal.inc", "dovecot homemx-junk.conf",
                 "dovecot sieve binaries"):
        assert ("backend", item, "would change") in report.items, item
    assert not Path(site.gateway.root).exists() and not Path(site.backend.root).exists()
    assert g.uploads == [] and b.uploads == []


def test_first_run_files_keys_and_permissions(hosts):
    from provision import render
    from wireguard import keys, wgquick

    report, g, b, records = _deploy(hosts)
    site, user = hosts["site"], hosts["user"]
    gl, bl = site.gateway, site.backend
    assert ("gateway", "venv", "changed") in report.items and ("backend", "backend.toml", "changed") in report.items
    assert ("backend", "homemx-backend.service") in report.restarts

    # configs root:<user> 0640, keys 0600, data dir owned by the daemon user
    assert _mode(f"{gl.etc}/gateway.toml") == ("0o640", "root", user)
    assert _mode(f"{bl.etc}/backend.toml") == ("0o640", "root", user)
    assert _mode(f"{bl.etc}/passwd") == ("0o640", "root", user)
    assert _mode(gl.etc) == ("0o750", "root", user)
    # homelab tools' /usr/sbin/sendmail: the venv's homemx-sendmail where the host had none (home only)
    assert os.readlink(f"{bl.root}/usr/sbin/sendmail") == f"{bl.venv}/bin/homemx-sendmail"
    assert ("backend", "/usr/sbin/sendmail", "changed") in report.items
    assert not os.path.lexists(f"{gl.root}/usr/sbin/sendmail")
    assert _mode(bl.data) == ("0o750", user, user)
    gkey, bkey = render.wg_key_path(site, gl), render.wg_key_path(site, bl)
    for p in (gkey, bkey, render.wg_conf_path(site, gl), render.wg_conf_path(site, bl),
              render.wg_conf_path(site, gl)[:-5] + ".egress.nft"):
        assert _mode(p) == ("0o600", "root", "root"), p
    dkim_files = [e["private_key"] for e in render.dkim_entries(site, bl)]
    for p in dkim_files + [f"{bl.etc}/first-user.password"]:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    # ACME is on by default: no self-signed certificate is made; the backend obtains one through
    # the gateway's 80/443 passthrough, and Dovecot is given the same live files and a reload unit.
    assert not any(item == "tls certificate" for _, item, _ in report.items)
    assert not Path(render.tls_paths(bl)[1]).exists()
    backend_toml = Path(f"{bl.etc}/backend.toml").read_text()
    assert '[acme]\nenabled = true\ncontact = "postmaster@example.org"\n' in backend_toml and "[tls]" not in backend_toml
    gateway_toml = Path(f"{gl.etc}/gateway.toml").read_text()
    for port, up in ((80, 2080), (443, 2443)):
        assert f'kind = "tcp"\nlisten = ["0.0.0.0:{port}"]\nupstream = "{site.backend_tunnel_addr}:{up}"' in gateway_toml
    assert (Path(bl.etc) / "dovecot" / render.DOVECOT_TLS_CONF).read_text() == render.dovecot_tls_conf(site, bl)
    assert f"ssl_cert = <{bl.data}/acme/live/fullchain.pem\n" in render.dovecot_tls_conf(site, bl)
    for name in render.dovecot_reload_units(bl):
        assert _mode(f"{bl.units}/{name}") == ("0o644", "root", "root"), name
    assert ("backend", "homemx-dovecot-reload.path") in report.restarts
    assert _mode(dkim_files[0])[1] == user  # the daemon (not root) must read its signing key

    # the spam filter: rspamd's local.d (root 0644, the package's user only reads it), restarted; the
    # Dovecot Junk/learning files with their Sieve scripts compiled (the learning programs executable)
    for rel in render.rspamd_local_files():
        assert _mode(f"{bl.root}/etc/rspamd/{rel}") == ("0o644", "root", "root"), rel
    assert ("backend", "rspamd.service") in report.restarts
    junk = Path(bl.etc) / "dovecot"
    assert _mode(str(junk / render.DOVECOT_JUNK_CONF)) == ("0o644", "root", "root")
    for name, (text, mode) in render.dovecot_junk_files().items():
        assert (junk / name).read_text() == text and _mode(str(junk / name))[0] == oct(mode), name
    assert (junk / "learn-spam.svbin").exists() and (junk / "learn-ham.svbin").exists()
    assert f"sieve_pipe_bin_dir = {junk}\n" in (junk / render.DOVECOT_JUNK_CONF).read_text()

    # each host installed the wheels resolved for its own python3 (asked over SSH), not the operator's:
    # the home host runs another Python (_other_python) than the gateway and the operator
    host_abi = {}
    for rem, lay in ((g, gl), (b, bl)):
        abi = subprocess.run([f"{lay.venv}/bin/python", "-c", "import sys; print('cp%d%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        host_abi[rem.role] = abi
        (item,) = [i for h, i, _ in report.items if h == rem.role and i.startswith("wheelhouse (")]
        assert f", {abi}-{abi}-manylinux_" in item, item
        uploaded = os.listdir(Path(lay.venv).parent / "wheelhouse")
        binary = [n for n in uploaded if not n.endswith("-none-any.whl") and "-abi3-" not in n]
        assert binary and all(f"-{abi}-{abi}-" in n for n in binary), (abi, binary)
        assert any(n.startswith("pydantic_core-") for n in binary)
        assert sorted(uploaded) == sorted(w.name for w in hosts["wheels"].resolved[item.split(", ")[1][:-1]])
    if _other_python():
        assert host_abi["backend"] != host_abi["gateway"] == "cp%d%d" % sys.version_info[:2]

    # each end's private key differs; each end's peer is the other's public key
    gpriv, bpriv = Path(gkey).read_text().strip(), Path(bkey).read_text().strip()
    assert gpriv != bpriv
    gconf = wgquick.read(render.wg_conf_path(site, gl))
    bconf = wgquick.read(render.wg_conf_path(site, bl))
    assert gconf.peers[0].public_key == keys.public_key(bpriv)
    assert bconf.peers[0].public_key == keys.public_key(gpriv)
    assert bconf.peers[0].endpoint == (site.gateway_public_addr, site.wg_port)

    # no private material ever crossed the wire: not uploaded, not in a command, not in a reply
    secrets = [gpriv, bpriv, Path(f"{bl.etc}/first-user.password").read_text().strip()]
    secrets += [Path(p).read_text().strip().splitlines()[1 if p.endswith(".pem") else 0] for p in dkim_files]
    wire = b"".join(g.uploads + b.uploads) + "\n".join(g.commands + b.commands + g.replies + b.replies).encode()
    assert len(g.uploads) > 10  # wheels, configs and units did travel
    for s in secrets:
        assert s.encode() not in wire

    # the DKIM records came back (public) and match the keys made at home
    assert any("hmx-rsa._domainkey.example.org." in r and "p=" in r for r in records)


def test_second_run_changes_nothing(hosts):
    report, g, b, _ = _deploy(hosts)
    assert report.changed == [] and report.restarts == []
    assert report.text().endswith("nothing changed")
    assert g.uploads == [] and b.uploads == []


def test_dry_run_changes_nothing_and_previews_a_change(hosts):
    site = dataclasses.replace(hosts["site"], greet_wait="2s")
    conf = Path(f"{site.gateway.etc}/gateway.toml")
    before = conf.read_bytes()
    report, g, _, _ = _deploy(hosts, site, dry_run=True)
    assert report.changed == [("gateway", "gateway.toml", "would change")]
    assert ("gateway", "homemx-gateway.service") in report.restarts
    assert conf.read_bytes() == before and g.uploads == []


def test_changed_setting_touches_only_what_it_must(hosts):
    site = dataclasses.replace(hosts["site"], greet_wait="2s")
    report, _, _, _ = _deploy(hosts, site)
    assert report.changed == [("gateway", "gateway.toml", "changed")]
    assert report.restarts == [("gateway", "homemx-gateway.service")]
    assert 'greet_wait = "2s"' in Path(f"{site.gateway.etc}/gateway.toml").read_text()
    hosts["site"] = site  # what is now deployed


def test_acme_off_makes_a_self_signed_certificate_at_home(hosts):
    from cryptography import x509

    from provision import render

    site = hosts["site"]
    bl = site.backend
    off = dataclasses.replace(site, acme=False)
    report, _, b, _ = _deploy(hosts, off)
    cert, key = render.tls_paths(bl)
    assert ("backend", "tls certificate", "changed") in report.items
    assert _mode(key) == ("0o600", hosts["user"], hosts["user"])
    made = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    assert made.issuer == made.subject and "CN=mail.example.org" in made.subject.rfc4514_string()  # self-signed
    text = Path(f"{bl.etc}/backend.toml").read_text()
    assert f'[tls]\ncert = "{cert}"\nkey = "{key}"\n' in text and "[acme]" not in text
    assert (Path(bl.etc) / "dovecot" / render.DOVECOT_TLS_CONF).read_text() == f"{render.dovecot_tls_conf(off, bl)}"
    assert f"ssl_key = <{key}\n" in render.dovecot_tls_conf(off, bl)
    assert Path(key).read_text().splitlines()[1].encode() not in b"".join(b.uploads)  # made at home
    assert ("backend", "homemx-backend.service") in report.restarts
    # ACME back on (what the next tests expect): the certificate is the backend's again.
    report, _, _, _ = _deploy(hosts, site)
    assert ("backend", "backend.toml", "changed") in report.items
    assert "[acme]" in Path(f"{bl.etc}/backend.toml").read_text()


def test_alert_rules_installed_where_the_operator_asks(hosts):
    from provision import render

    site = dataclasses.replace(hosts["site"], prometheus_rules_dir="/etc/prometheus/rules")
    path = Path(render.alert_rules_path(site, site.backend))
    assert not path.exists()  # empty (the default): nothing was installed
    report, _, b, _ = _deploy(hosts, site)
    assert report.changed == [("backend", "prometheus rules", "changed")] and report.restarts == []
    assert path.read_bytes() == render.ALERT_RULES.read_bytes() and _mode(str(path)) == ("0o644", "root", "root")
    assert "reload Prometheus" in report.text()
    report, _, b, _ = _deploy(hosts, site)
    assert report.changed == [] and b.uploads == []
    hosts["site"] = site  # what is now deployed


def _site_toml(site) -> str:
    """The Site as the operator would write it (site.toml): every key, lists and tables included."""
    from provision.render import toml_text

    doc = {"site": {f.name: getattr(site, f.name) for f in dataclasses.fields(site) if f.name not in ("gateway", "backend")}}
    doc.update({role: dataclasses.asdict(getattr(site, role)) for role in ("gateway", "backend")})
    return toml_text(doc)


def test_fab_command_line_dry_run_reports_nothing_to_change(hosts):
    site_file = hosts["lab"].workdir / "site.toml"
    site_file.write_text(_site_toml(hosts["site"]))
    wheelhouse = hosts["wheels"].homemx.parent
    r = subprocess.run([str(Path(sys.executable).with_name("fab")), "-r", str(REPO / "provision"), "both",
                        "--site", str(site_file), "--dry-run", "--wheelhouse", str(wheelhouse)],
                       capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "XDG_CACHE_HOME": str(hosts["wheels"].cache.parent.parent)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\nnothing changed\n" in r.stdout, r.stdout
    assert "would change" not in r.stdout and "restart" not in r.stdout
    assert "hmx-rsa._domainkey.example.org." in r.stdout  # the DKIM records are printed for the zone


def test_wheel_builds_are_reproducible(tmp_path):
    """Same sources → the same wheel bytes, or every run would reinstall and restart everything."""
    import hashlib

    from provision.wheels import build_homemx_wheel

    a = build_homemx_wheel(REPO, tmp_path / "a")
    b = build_homemx_wheel(REPO, tmp_path / "b")
    assert a.name == b.name
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_units_pass_systemd_analyze_verify(hosts):
    site = hosts["site"]
    for lay, units in ((site.gateway, ("homemx-tunnel.service", "homemx-gateway.service")),
                       (site.backend, ("homemx-tunnel.service", "homemx-backend.service",
                                       "homemx-dovecot-reload.path", "homemx-dovecot-reload.service"))):
        files = [f"{lay.units}/{u}" for u in units]
        r = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True,
                           env={**os.environ, "SYSTEMD_UNIT_PATH": f"{lay.units}:"})
        assert r.returncode == 0, r.stderr
    gw = Path(f"{site.gateway.units}/homemx-gateway.service").read_text()
    be = Path(f"{site.backend.units}/homemx-backend.service").read_text()
    # the edge proxy's one capability; the MTA has none and writes only its data dir
    assert "\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n" in gw and "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in gw
    assert "\nCapabilityBoundingSet=\n" in be and f"\nReadWritePaths={site.backend.data}\n" in be
    for unit in (gw, be):
        for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "Restart=on-failure",
                     f"User={hosts['user']}"):
            assert f"\n{line}\n" in unit


def test_provisioned_spam_filter_learns_through_the_provisioned_dovecot_program(hosts):
    """rspamd started from the provisioned local.d (Debian's stock rspamd.conf, as its unit does)
    in the home namespace listens on 127.0.0.1 only (the scanner and the controller, no milter
    proxy), and the learning program provisioning gave Dovecot makes it learn a message as spam
    into Redis (Debian's redis-server port, in the namespace)."""
    from provision import render
    from tests.lab.rspamd import RedisServer

    site, topo, lab = hosts["site"], hosts["topo"], hosts["lab"]
    home = topo.home
    run = lab.workdir / "rspamd-home"
    for sub in ("db", "run", "log"):
        (run / sub).mkdir(parents=True)
        shutil.chown(run / sub, "_rspamd", "_rspamd")
    for d in (lab.workdir, run):  # rspamd's workers (user _rspamd) reach their directories
        d.chmod(0o711)
    redis = RedisServer(run / "redis", "127.0.0.1", home.cmd([]))
    rspamd = home.popen(["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", render.RSPAMD_CONF,
                         f"--var=LOCAL_CONFDIR={site.backend.root}{render.RSPAMD_CONFDIR}",
                         f"--var=DBDIR={run / 'db'}", f"--var=RUNDIR={run / 'run'}", f"--var=LOGDIR={run / 'log'}"],
                        stdout=open(run / "stdout.log", "w"), stderr=subprocess.STDOUT)
    log = run / "log" / "rspamd.log"
    try:
        probe = ("import sys, urllib.request\n"
                 "for p in sys.argv[1:]: urllib.request.urlopen(f'http://{p}/ping', timeout=1).read()")
        end = time.monotonic() + 120  # a first start compiles rspamd's Hyperscan databases
        while home.run([sys.executable, "-c", probe, render.RSPAMD_WORKER, render.RSPAMD_CONTROLLER],
                       check=False).returncode:
            assert rspamd.poll() is None and time.monotonic() < end, (run / "stdout.log").read_text()[-3000:]
            time.sleep(0.2)
        listening = {line.split()[3] for line in home.run(["ss", "-ltnpH"]).stdout.splitlines() if '"rspamd"' in line}
        assert listening == {render.RSPAMD_WORKER, render.RSPAMD_CONTROLLER}

        program = f"{site.backend.etc}/dovecot/rspamd-learn-spam"
        message = ("From: someone@remote.example\nSubject: cheap watches\nMessage-ID: <provisioned-1@remote.example>\n\n"
                   + " ".join(f"offer{i} watches{i} cheap{i}" for i in range(20)) + "\n")
        r = home.run([program], input=message, check=False, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "learned message as spam: provisioned-1@remote.example" in log.read_text()
        assert "BAYES_SPAM_keys" in redis.keys("BAYES_*")
    finally:
        rspamd.terminate()
        rspamd.wait(30)
        redis.close()


def test_provisioned_daemons_pass_a_message_through_the_tunnel(hosts):
    from provision import deploy, render

    site, topo, lab = hosts["site"], hosts["topo"], hosts["lab"]
    env = {**os.environ, "HOMEMX_TUNNEL_STATE_DIR": str(lab.workdir / "tunnel-state")}
    for ns, lay, role, extra in ((topo.gateway, site.gateway, "gateway",
                                  ["--public-if", site.gateway_public_if, "--public-addr", site.gateway_public_addr]),
                                 (topo.home, site.backend, "backend", [])):
        ns.run([f"{lay.venv}/bin/homemx-{role}", "tunnel", "up", "-c", render.wg_conf_path(site, lay),
                "--userspace", *extra], env=env)
    logs = lab.workdir
    topo.gateway.popen([f"{site.gateway.venv}/bin/homemx-gateway", "run", "-c", f"{site.gateway.etc}/gateway.toml"],
                       stdout=open(logs / "gw.log", "w"), stderr=subprocess.STDOUT)
    topo.home.popen([f"{site.backend.venv}/bin/homemx-backend", "run", "-c", f"{site.backend.etc}/backend.toml"],
                    stdout=open(logs / "be.log", "w"), stderr=subprocess.STDOUT)

    start_provisioned_dovecot(hosts)  # IMAPS through the gateway is part of the check (issue 15)
    res = deploy.check(site, hosts["gw"], hosts["be"], wait=30)
    assert res["ok"], (res, (logs / "gw.log").read_text(), (logs / "be.log").read_text())
    assert res["gateway"]["banner"].startswith("220 mail.example.org")
    # ACME on: the backend serves its placeholder until the first issuance (no CA is reachable here),
    # and its web face answers through the gateway's port 80 (a redirect to https).
    assert Path(render.acme_live_paths(site.backend)[0]).exists()
    r = topo.internet.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H",
                           f"Host: {site.hostname}", f"http://{site.gateway_public_addr}/"], check=False)
    assert r.stdout == f"301 https://{site.hostname}/", (r.stdout, r.stderr, (logs / "gw.log").read_text()[-2000:])

    r = topo.internet.run(["swaks", "--server", f"{site.gateway_public_addr}:25", "--to", "alice@example.org",
                           "--from", "sender@remote.example", "--helo", "remote.example",
                           "--header", "Subject: provisioned", "--body", "through the tunnel"], check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    new = Path(site.backend.data) / "mail" / "example.org" / "alice" / "Maildir" / "new"
    end = time.monotonic() + 20
    while time.monotonic() < end and not (new.exists() and any(new.iterdir())):
        time.sleep(0.2)
    msgs = list(new.iterdir())
    assert len(msgs) == 1
    body = msgs[0].read_text()
    assert "Subject: provisioned" in body and "through the tunnel" in body
    # the backend saw the real client (the internet host) thanks to the gateway's PROXY v2 header
    assert re.search(re.escape(topo.internet_addr), body)


# ---------------------------------------------------------------- the README's on-host commands (issue 15.9)


def readme_on_host_commands(role: str) -> list[str]:
    """The command lines of README.md's block marked ``<!-- on-host ROLE ... -->``, as written."""
    m = re.search(rf"<!-- on-host {role}\b[^>]*-->\s*```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert m, f"README.md has no on-host {role} block"
    return [line for line in m.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_on_host_commands_work_as_written(hosts):
    """Over ssh on each provisioned host the README's commands run as written: the command on PATH
    (provisioning's link), no -c (the provisioned files by default, tunnel verbs included). These
    hosts have their root under the lab's work dir, so that root's /usr/local/bin goes first on PATH:
    what / is on a real host."""
    import shlex

    from provision import deploy, render

    site, topo, lab = hosts["site"], hosts["topo"], hosts["lab"]
    env = {**os.environ, "HOMEMX_TUNNEL_STATE_DIR": str(lab.workdir / "tunnel-state")}
    for ns, lay, role, extra in ((topo.gateway, site.gateway, "gateway",
                                  ["--public-if", site.gateway_public_if, "--public-addr", site.gateway_public_addr]),
                                 (topo.home, site.backend, "backend", [])):
        # up already when the daemons' test ran first; `up` is idempotent
        ns.run([f"{lay.venv}/bin/homemx-{role}", "tunnel", "up", "-c", render.wg_conf_path(site, lay),
                "--userspace", *extra], env=env)
    out = {}
    for role, conn, lay in (("backend", hosts["be"], site.backend), ("gateway", hosts["gw"], site.gateway)):
        assert os.readlink(lay.path(f"/usr/local/bin/homemx-{role}")) == f"{lay.venv}/bin/homemx-{role}"
        commands = readme_on_host_commands(role)
        assert commands and all(c.startswith(f"homemx-{role} ") and " -c " not in c for c in commands), commands
        for cmd in commands:
            r = conn.run(f"export PATH={shlex.quote(lay.path('/usr/local/bin'))}:$PATH; {cmd}",
                         hide=True, warn=True, in_stream=False)
            assert r.exited == 0, (role, cmd, r.stdout, r.stderr)
            out[cmd] = r.stdout
    assert out["homemx-backend config check"].startswith(f"{site.backend.etc}/backend.toml: ok")
    assert out["homemx-backend users list"].split() == [site.first_user]
    assert '"v=DMARC1; p=none; rua=mailto:postmaster@example.org"' in out["homemx-backend dns records"]
    for role, lay in (("backend", site.backend), ("gateway", site.gateway)):
        assert render.ifname(site, lay) in out[f"homemx-{role} tunnel status"]
    # never a file of that name that is not ours: left alone, and the report says so
    link = site.gateway.path("/usr/local/bin/homemx-gateway")
    os.unlink(link)
    Path(link).write_text("#!/bin/sh\necho the operator's own\n")
    r = deploy.Remote(hosts["gw"], site.gateway, "gateway", deploy.Report())
    deploy.commands_on_path(r, site)
    assert Path(link).read_text() == "#!/bin/sh\necho the operator's own\n"
    assert any("/usr/local/bin/homemx-gateway is a file, not ours: left alone" in n for n in r.report.notes)
    os.unlink(link)
    deploy.commands_on_path(r, site)
    assert ("gateway", "/usr/local/bin/homemx-gateway", "changed") in r.report.items
    assert os.readlink(link) == f"{site.gateway.venv}/bin/homemx-gateway"


# ---------------------------------------------------------------- Dovecot as provisioned (issue 15)
# The home's Dovecot runs from the dovecot.conf provisioning deployed (tests/lab/dovecot.py only puts
# its run/state dirs and logs in the work dir), started by the test above once the backend made the
# certificate that file names.

IMAP_READ = r"""
import imaplib, json, ssl, sys
addr, user, password, subject = sys.argv[1:5]
ctx = ssl._create_unverified_context()  # the backend's placeholder: compared with the home's file below
with imaplib.IMAP4_SSL(addr, 993, ssl_context=ctx, timeout=20) as m:
    cert = m.sock.getpeercert(binary_form=True).hex()
    m.login(user, password)
    special = sorted(l.decode() for l in m.list('(SPECIAL-USE) ""', "*")[1])
    m.select("INBOX", readonly=True)
    found = m.search(None, "SUBJECT", subject)[1][0].split()
    body = m.fetch(found[0], "(RFC822)")[1][0][1].decode() if found else ""
print(json.dumps({"cert": cert, "special_use": special, "body": body}))
"""


def start_provisioned_dovecot(hosts):
    from provision import render
    from tests.lab.dovecot import ProvisionedDovecot

    site, lab = hosts["site"], hosts["lab"]
    cert = Path((render.acme_live_paths if site.acme else lambda lay: render.tls_paths(lay))(site.backend)[0])
    end = time.monotonic() + 30
    while not cert.exists():  # the backend makes its placeholder at start
        assert time.monotonic() < end, f"{cert} never appeared"
        time.sleep(0.2)
    lab.workdir.chmod(0o711)  # Dovecot's processes (users dovecot and the mail user) traverse it
    dc = ProvisionedDovecot(hosts["topo"].home, lab.workdir / "dovecot", site.backend.path(render.DOVECOT_CONF),
                            address=site.backend_tunnel_addr, port=site.backend_imaps_port)
    hosts["dovecot"] = dc.start()
    return dc


def test_provisioned_dovecot_conf_has_no_pam_and_listens_only_on_the_tunnel(hosts):
    from provision import render

    site = hosts["site"]
    conf = site.backend.path(render.DOVECOT_CONF)
    out = hosts["topo"].home.run(["doveconf", "-n", "-c", conf]).stdout
    assert "driver = pam" not in out and out.count("driver = passwd-file") == 2
    assert f"\nlisten = {site.backend_tunnel_addr}\n" in out
    assert f"\nhaproxy_trusted_networks = {site.gateway_tunnel_addr}/32\n" in out
    sockets = hosts["topo"].home.run(["ss", "-ltnpH"]).stdout.splitlines()
    assert {line.split()[3] for line in sockets if '"dovecot"' in line} == {f"{site.backend_tunnel_addr}:993"}


def test_provisioned_home_serves_imaps_through_the_gateway(hosts):
    """A mail client on the internet reads the message delivered above through the gateway's 993,
    TLS ending at home with the backend's certificate; the special-use folders are there."""
    import json

    from provision import render

    site, bl = hosts["site"], hosts["site"].backend
    # The test above ran the backend as root (no systemd here, so no User=): give the mailbox it
    # made to the user the unit runs it as, whose files Dovecot's userdb maps every user to.
    subprocess.run(["chown", "-R", f"{hosts['user']}:{hosts['user']}", f"{bl.data}/mail/example.org"], check=True)
    password = Path(f"{bl.etc}/first-user.password").read_text().strip()
    r = hosts["topo"].internet.run([sys.executable, "-c", IMAP_READ, site.gateway_public_addr, site.first_user,
                                    password, "provisioned"], check=False, timeout=60)
    assert r.returncode == 0, r.stderr + hosts["dovecot"].log()[-3000:]
    got = json.loads(r.stdout)
    assert "through the tunnel" in got["body"]
    assert got["special_use"] == ['(\\Drafts) "." Drafts', '(\\Junk) "." Junk', '(\\Sent) "." Sent',
                                  '(\\Trash) "." Trash']
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    home_cert = x509.load_pem_x509_certificate(Path(render.acme_live_paths(bl)[0]).read_bytes())
    assert bytes.fromhex(got["cert"]) == home_cert.public_bytes(Encoding.DER)
    assert f"rip={hosts['topo'].internet_addr}" in hosts["dovecot"].log()  # the client's address, via PROXY


def test_fab_check_logs_in_over_imaps_and_fails_when_dovecot_is_down(hosts):
    from provision import render

    site_file = hosts["lab"].workdir / "site-check.toml"
    site_file.write_text(_site_toml(hosts["site"]))
    fab = [str(Path(sys.executable).with_name("fab")), "-r", str(REPO / "provision"), "check", "--site", str(site_file)]
    r = subprocess.run(fab, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"backend  IMAPS login through the gateway: OK (logged in as {render.DOVECOT_CHECK_USER}" in r.stdout
    # the check account's password stayed at home: not in anything fab printed
    password = Path(f"{hosts['site'].backend.etc}/dovecot/{render.DOVECOT_CHECK_PASSWORD}").read_text().strip()
    assert password not in r.stdout + r.stderr
    hosts["dovecot"].stop()
    r = subprocess.run(fab, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "backend  IMAPS login through the gateway: FAILED" in r.stdout, r.stdout


# ---------------------------------------------------------------- settings that survive upgrades, errors (issue 15.4, 15.5)


def _fab_both(hosts, site, *args: str) -> subprocess.CompletedProcess:
    """The real `fab … both` command line with this site written as the operator would."""
    site_file = hosts["lab"].workdir / "site-all.toml"
    site_file.write_text(_site_toml(site))
    return subprocess.run([str(Path(sys.executable).with_name("fab")), "-r", str(REPO / "provision"), "both",
                           "--site", str(site_file), "--wheelhouse", str(hosts["wheels"].homemx.parent), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "XDG_CACHE_HOME": str(hosts["wheels"].cache.parent.parent)})


@pytest.mark.timeout(900)  # alone (-k), its first deploy is a fresh pair's: venvs and all
def test_every_site_setting_survives_a_second_fab_both_and_a_hand_edit_shows_as_a_diff(hosts):
    """Each item issue 15 lists, set in site.toml ([site] keys and the extra tables), is deployed and
    read back by the daemons' loaders from the host's files; the real `fab both` run again changes
    nothing; a hand edit of backend.toml on the host is a diff in `fab both --dry-run` (nothing
    written), and the next run puts site.toml's version back."""
    from backend.config import load_config as load_backend
    from gateway.config import load_config as load_gateway

    original = hosts["site"]
    bl, gl = original.backend, original.gateway
    password = Path(bl.path("/etc/homemx/smarthost.password"))  # the operator puts it on the home box
    password.parent.mkdir(parents=True, exist_ok=True)
    password.write_text("relay-secret\n")
    site = dataclasses.replace(
        original, domains=("example.net",), aliases={"info": "alice@example.org", "sales@example.net": "alice@example.org"},
        catch_all="alice@example.org", lan_listen="192.168.1.10:2526", lan_trusted_networks=("192.168.1.0/24",),
        gateway_metrics_port=9101, backend_metrics_listen="127.0.0.1:9325", dnsbl_zones=("zen.spamhaus.org",),
        mta_sts_mode="testing", smarthost="192.0.2.25:465", smarthost_hostname="smtp.provider.example",
        smarthost_username="alice", smarthost_password_file="/etc/homemx/smarthost.password",
        gateway_public_addr6="2001:db8::10",
        gateway=dataclasses.replace(gl, extra={"limits": {"max_per_client": 5}}),
        backend=dataclasses.replace(bl, extra={"rspamd": {"fail_closed": True},
                                               "domain": {"example.net": {"catch_all": "alice@example.org"}}}))
    try:
        report, _, b, records = _deploy(hosts, site)
        assert ("backend", "backend.toml", "changed") in report.items and ("gateway", "gateway.toml", "changed") in report.items
        assert any("._domainkey.example.net." in line for line in records)  # the second domain's DKIM keys
        backend, gateway = load_backend(f"{bl.etc}/backend.toml"), load_gateway(f"{gl.etc}/gateway.toml")
        assert set(backend.domains) == {"example.org", "example.net"}
        assert backend.domains["example.org"].aliases["info"] == ("alice@example.org",)
        assert backend.domains["example.net"].aliases["sales"] == ("alice@example.org",)
        assert backend.domains["example.org"].catch_all == backend.domains["example.net"].catch_all == "alice@example.org"
        lan = next(lc for lc in backend.listeners if lc.kind == "lan")
        assert lan.listen == ("192.168.1.10", 2526) and [str(n) for n in lan.trusted_networks] == ["192.168.1.0/24"]
        assert backend.server.metrics_listen == ("127.0.0.1", 9325)
        assert gateway.server.metrics_listen == (site.gateway_tunnel_addr, 9101)
        assert gateway.dnsbl.zones == ("zen.spamhaus.org",) and next(lc for lc in gateway.listeners if lc.name == "mx").dnsbl
        assert backend.dns.mta_sts_mode == "testing"
        assert backend.delivery.smarthost == ("192.0.2.25", 465) and str(backend.delivery.smarthost_password_file) == str(password)
        assert backend.rspamd is not None and backend.rspamd.fail_closed is True
        assert backend.gateway.public_ipv6 == ("2001:db8::10",)
        assert ("::", 25) in next(lc for lc in gateway.listeners if lc.name == "mx").listen
        assert gateway.limits.max_per_client == 5
        wire = b"".join(b.uploads) + "\n".join(b.commands + b.replies).encode()
        assert b"relay-secret" not in wire  # the password stays on the home box: never read, never sent

        # the second `fab both`, as the operator runs it after an upgrade: nothing to change
        r = _fab_both(hosts, site)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "\nnothing changed\n" in r.stdout and "restart" not in r.stdout and " diff " not in r.stdout, r.stdout
        assert not [line for line in r.stdout.splitlines() if line.endswith("changed")
                    and not line.endswith(("unchanged", "nothing changed"))], r.stdout
        assert load_backend(f"{bl.etc}/backend.toml").dns.mta_sts_mode == "testing"

        # a hand edit where provisioning owns the file: shown as a diff, not written by a dry run
        conf = Path(f"{bl.etc}/backend.toml")
        edited = conf.read_text().replace("[server]\n", '[server]\nlog_level = "debug"\n', 1)
        conf.write_text(edited)
        r = _fab_both(hosts, site, "--dry-run")
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout.splitlines()
        at = out.index(f"backend  diff {conf}")
        assert out[at + 1:at + 3] == [f"--- {conf} (on backend)", f"+++ {conf} (from site.toml)"]
        assert '-log_level = "debug"' in out[at + 3:at + 8]
        assert "backend  backend.toml" in r.stdout and conf.read_text() == edited
        assert "relay-secret" not in r.stdout
        report, _, _, _ = _deploy(hosts, site)
        assert ("backend", "backend.toml", "changed") in report.items
        assert [path for _, path, _ in report.diffs] == [str(conf)] and 'log_level = "debug"' not in conf.read_text()
    finally:
        # No deploy back to the original site (~15 s): the one test after this deploys a site of
        # its own and asserts only on its failure line.
        password.unlink()


@pytest.mark.timeout(900)
def test_fab_step_failure_on_a_host_is_one_line(hosts):
    """A step that fails on a host, through the real `fab both`: here the home box lacks the smarthost
    password file site.toml names, which the backend's `config check` finds there. One stderr line
    naming the host, the step and the reason; exit status 1."""
    site = dataclasses.replace(hosts["site"], smarthost="192.0.2.25:587", smarthost_username="alice",
                               smarthost_password_file="/etc/homemx/no-such.password")
    missing = site.backend.path("/etc/homemx/no-such.password")
    # The last test of the module: no deploy back afterwards, the hosts go with its teardown.
    r = _fab_both(hosts, site)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"homemx: backend ({site.backend.ssh}): backend.toml: `{site.backend.venv}/bin/"
                               "homemx-backend config check -c "), lines
    assert lines[0].endswith(f"delivery.smarthost_password_file: cannot read {missing}: No such file or directory")
    assert "Traceback" not in r.stderr

