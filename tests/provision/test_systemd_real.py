"""Acceptance: the provisioned systemd units run under a real systemd (issue 15, point 7).

Two containers (tests/lab/nspawn.py: a debootstrap'd Debian root booted with systemd-nspawn, PID 1
is systemd) sit in the lab's gateway and home network namespaces (tests/lab/netns.py: internet /
gateway / NAT router / home). Each runs the root's own sshd; ``fab both`` (the real command line,
``systemctl = true``, nothing installed by provisioning: the root has the packages) reaches each
through the same namespace relay as tests/provision/test_fabric_deploy.py. Then: every unit is active
under its hardening, a message crosses the tunnel, a second run changes nothing, ``kill -9`` of a
daemon is undone by systemd, and after a reboot of the home container the tunnel is up before the
backend starts. Dovecot is Debian's unit from the root; the homemx path unit reloads it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.lab.netns import Lab, home_behind_nat

# the first run on a machine also builds the Debian root (debootstrap, ~80 s here) in the fixture's setup
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
RELAY = Path(__file__).with_name("nsrelay.py")
FAB = Path(sys.executable).with_name("fab")
USER = "homemx"  # the layout's default: these hosts are the containers, not this machine
DATA = "/var/lib/homemx"
CAP_NET_BIND_SERVICE = 1 << 10


def _site_toml(topo, key: Path, gw_ns: str, home_ns: str) -> str:
    def host(addr: str, ns: str) -> str:
        return (f'ssh = "root@{addr}"\nssh_proxy = "ip netns exec {ns} {sys.executable} {RELAY} {addr} 22"\n'
                f'ssh_key = "{key}"\nsystemctl = true\ninstall_packages = false\n')

    # rspamd off: the root carries no rspamd (point 7 is about homemx's own units and Dovecot)
    return (f'[site]\ndomain = "example.org"\nhostname = "mail.example.org"\nfirst_user = "alice@example.org"\n'
            f'gateway_public_addr = "{topo.gateway_addr}"\ngateway_public_if = "{topo.gateway_if}"\n'
            f'userspace_wireguard = true\ngreet_wait = "1s"\nrspamd = false\n'
            # the operator guide's sendmail block runs on the home box: a lan listener it may submit on
            f'lan_listen = "127.0.0.1:2525"\nlan_trusted_networks = ["127.0.0.0/8"]\n\n'
            f"[gateway]\n{host(topo.gateway_addr, gw_ns)}\n[backend]\n{host(topo.home_addr, home_ns)}")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    require_root()
    require_tool("systemd-nspawn", "debootstrap", "nsenter", "ssh-keygen", "swaks")
    from provision.wheels import build_homemx_wheel
    from tests.lab.nspawn import Container, debian_root

    root = debian_root()
    # homemx's wheel; fab resolves each host's dependencies for its Python into this run's cache
    wheels = tmp_path_factory.mktemp("wheels")
    build_homemx_wheel(REPO, wheels / "homemx")
    lab = Lab("hs")
    containers: list[Container] = []
    try:
        topo = home_behind_nat(lab)
        key = lab.workdir / "operator_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        for ns in (topo.gateway, topo.home):
            c = Container(root, lab.workdir, ns.name + "c", f"/run/netns/{ns.name}")
            containers.append(c)
            c.mount()
            ssh = c.path("/root/.ssh")
            ssh.mkdir(mode=0o700, exist_ok=True)
            (ssh / "authorized_keys").write_text((lab.workdir / "operator_key.pub").read_text())
            (ssh / "authorized_keys").chmod(0o600)
            if ns is topo.gateway:
                c.mask("dovecot.service")  # the root is the home's; a VPS runs no IMAP server
            c.boot()
        site = lab.workdir / "site.toml"
        site.write_text(_site_toml(topo, key, topo.gateway.name, topo.home.name))
        yield {"lab": lab, "topo": topo, "gw": containers[0], "be": containers[1], "site": site, "wheels": wheels}
    finally:
        for c in containers:
            c.close()
        lab.close()


def _fab(h, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(FAB), "-r", str(REPO / "provision"), *args, "--site", str(h["site"])],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "XDG_CACHE_HOME": str(h["wheels"] / "xdg")})


def _both(h) -> subprocess.CompletedProcess:
    return _fab(h, "both", "--wheelhouse", str(h["wheels"] / "homemx"))


def _status(c, pid: str) -> dict[str, str]:
    text = c.run(["cat", f"/proc/{pid}/status"]).stdout
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _mount_options(c, pid: str) -> dict[str, set[str]]:
    """Mount point → per-mount options, as the process sees its file system."""
    out = {}
    for line in c.run(["cat", f"/proc/{pid}/mountinfo"]).stdout.splitlines():
        f = line.split()
        out[f[4]] = set(f[5].split(","))
    return out


def _journal(c) -> str:
    """The homemx units' journal of a container (for a failure's message)."""
    r = c.run(["journalctl", "--no-pager", "-n", "80", "-o", "short-monotonic", "-u", "homemx-*",
               "-u", "dovecot.service"], check=False)
    return f"--- {c.name} journal:\n{r.stdout}{r.stderr}"


def _wait(what: str, fn, timeout: float = 30):
    end = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_fab_both_starts_every_unit_under_its_hardening(hosts):
    gw, be, topo = hosts["gw"], hosts["be"], hosts["topo"]
    r = _both(hosts)
    out = r.stdout + r.stderr + "\n" + _journal(gw) + _journal(be)
    assert r.returncode == 0, out
    # the post-deploy check `both` runs with systemctl on: both ends handshook, the banner came back
    assert "gateway  handshake fresh" in r.stdout and "backend  handshake fresh" in r.stdout, out
    assert "backend answers through the gateway: 220 mail.example.org" in r.stdout, out
    assert "IMAPS login through the gateway: OK" in r.stdout, out  # the provisioned Dovecot, via port 993
    for c, units in ((gw, ["homemx-tunnel.service", "homemx-gateway.service"]),
                     (be, ["homemx-tunnel.service", "homemx-backend.service", "homemx-dovecot-reload.path",
                           "dovecot.service"])):
        states = c.run(["systemctl", "is-active", *units], check=False).stdout.split()
        assert states == ["active"] * len(units), (c.name, units, states)
        assert c.run(["systemctl", "is-enabled", *units[:-1]], check=False).stdout.split() == ["enabled"] * (
            len(units) - 1)
        failed = c.run(["systemctl", "--failed", "--plain", "--no-legend"]).stdout.strip()
        assert failed == "", (c.name, failed)

    # the edge proxy: its own user, CAP_NET_BIND_SERVICE and nothing else, bound to the privileged 25
    gpid = gw.show("homemx-gateway.service", "MainPID")["MainPID"]
    st = _status(gw, gpid)
    assert st["Uid"].split()[0] != "0" and st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == CAP_NET_BIND_SERVICE and int(st["CapBnd"], 16) == CAP_NET_BIND_SERVICE
    listening = [line.split()[3] for line in topo.gateway.run(["ss", "-ltnH"]).stdout.splitlines()]
    assert "0.0.0.0:25" in listening, listening
    # the MTA: no capability at all; the system read-only but for its data dir (ProtectSystem=strict
    # + ReadWritePaths), where it did write (the ACME placeholder certificate)
    bpid = be.show("homemx-backend.service", "MainPID")["MainPID"]
    st = _status(be, bpid)
    assert st["Uid"].split()[0] != "0" and st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
    mounts = _mount_options(be, bpid)
    assert "ro" in mounts["/"], mounts["/"]
    assert "rw" in mounts[DATA], mounts.get(DATA)
    assert be.path(f"{DATA}/acme/live/fullchain.pem").exists()

    # a message from the internet through the hardened gateway and tunnel into alice's Maildir
    r = topo.internet.run(["swaks", "--server", f"{topo.gateway_addr}:25", "--to", "alice@example.org",
                           "--from", "sender@remote.example", "--helo", "remote.example",
                           "--header", "Subject: under systemd", "--body", "hardened"], check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    new = be.path(f"{DATA}/mail/example.org/alice/Maildir/new")
    msgs = _wait("the message in alice's Maildir", lambda: new.exists() and list(new.iterdir()))
    assert "Subject: under systemd" in msgs[0].read_text()


def test_dovecot_reload_path_unit_reloads_dovecot(hosts):
    """The backend's reload hook touches the trigger (as the backend's user); the root path unit
    runs `doveadm reload`, and Debian's Dovecot reloads its configuration."""
    from provision import render
    from provision.site import HostLayout

    be = hosts["be"]
    trigger = render.dovecot_reload_trigger(HostLayout())
    before = be.show("homemx-dovecot-reload.service", "ExecMainExitTimestampMonotonic")
    be.run(["runuser", "-u", USER, "--", "touch", trigger])
    _wait("homemx-dovecot-reload.service to run", lambda: be.show(
        "homemx-dovecot-reload.service", "ExecMainExitTimestampMonotonic") != before)
    assert be.show("homemx-dovecot-reload.service", "Result")["Result"] == "success"
    _wait("Dovecot to reload", lambda: "reloading configuration" in be.run(
        ["journalctl", "-u", "dovecot.service", "--no-pager", "-o", "cat"]).stdout)
    assert be.run(["systemctl", "is-active", "dovecot.service"], check=False).stdout.strip() == "active"


def test_second_fab_run_changes_nothing(hosts):
    be = hosts["be"]
    pid = be.show("homemx-backend.service", "MainPID")["MainPID"]
    r = _both(hosts)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\nnothing changed\n" in r.stdout, r.stdout
    assert "restart" not in r.stdout and " changed\n" not in r.stdout.replace("\nnothing changed\n", "\n")
    assert "backend answers through the gateway: 220 mail.example.org" in r.stdout
    assert be.show("homemx-backend.service", "MainPID")["MainPID"] == pid  # not restarted


@pytest.mark.parametrize("role, unit", [("gw", "homemx-gateway.service"), ("be", "homemx-backend.service")])
def test_killed_daemon_is_restarted_by_systemd(hosts, role, unit):
    c = hosts[role]
    before = c.show(unit, "MainPID", "NRestarts")
    assert int(before["MainPID"]) > 1, before  # running (kill -9 0 would be the whole process group)
    c.run(["kill", "-9", before["MainPID"]])
    now = _wait(f"{unit} to come back", lambda: (lambda s: s["ActiveState"] == "active" and s["MainPID"] not in (
        "0", before["MainPID"]) and s)(c.show(unit, "MainPID", "NRestarts", "ActiveState")), timeout=30)
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1


def test_tunnel_comes_up_before_the_backend_after_a_reboot(hosts):
    be = hosts["be"]
    old = be.show("homemx-backend.service", "InvocationID")["InvocationID"]
    be.reboot()
    props = ("ActiveState", "InvocationID", "NRestarts", "ActiveEnterTimestampMonotonic",
             "ExecMainStartTimestampMonotonic")
    back = _wait("the backend to start at boot", lambda: (lambda s: s["ActiveState"] == "active" and s)(
        be.show("homemx-backend.service", *props)))
    tunnel = be.show("homemx-tunnel.service", *props)
    assert back["InvocationID"] != old and tunnel["ActiveState"] == "active"
    assert back["NRestarts"] == "0"  # started once, after the tunnel: not failed and restarted until it was up
    # the oneshot tunnel finished its bring-up (became active) before the backend's process started
    assert 0 < int(tunnel["ActiveEnterTimestampMonotonic"]) <= int(back["ExecMainStartTimestampMonotonic"])
    # Dovecot (provisioning's drop-in orders it after both: it listens on the tunnel address and reads
    # the backend's certificate) came up in the same boot, once
    dovecot = _wait("Dovecot to start at boot", lambda: (lambda s: s["ActiveState"] == "active" and s)(
        be.show("dovecot.service", *props)))
    assert int(dovecot["ExecMainStartTimestampMonotonic"]) >= int(back["ExecMainStartTimestampMonotonic"])
    assert dovecot["NRestarts"] == "0"
    r = _fab(hosts, "check")  # a fresh handshake again, the backend answers and IMAPS logs in through the gateway
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- the operator guide, as written
GUIDE = REPO / "docs" / "operator-guide.md"
MARK = "<!-- on-host home:"
# What the lab cannot give a command: `dns check` asks the public DNS, which this lab does not have
# (its table is still printed; exit 1 means "a record does not match", as the guide says).
LAB_EXIT = {"homemx-backend dns check": (0, 1)}


def guide_blocks() -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced block of the guide marked ``<!-- on-host home: ... -->``."""
    lines, blocks = GUIDE.read_text().splitlines(), []
    for i, line in enumerate(lines):
        if line.strip().startswith(MARK):
            indent = len(line) - len(line.lstrip())
            lang = lines[i + 1].strip().removeprefix("```")
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            blocks.append((lang, [x[indent:] for x in lines[i + 2:end]]))
    return blocks


def as_on_the_box(line: str) -> str:
    """A guide line run from the operator's machine over ssh (``ssh [-t] root@home.lan CMD``) is CMD
    on the box; the comment after a command stays (bash ignores it)."""
    return re.sub(r"^ssh (-t )?root@home\.lan ", "", line)


def test_operator_guide_home_commands_work_as_written(hosts):
    """Every block of docs/operator-guide.md marked on-host runs on the provisioned home box (real
    paths, real systemd) as written: DNS records, the first user's password, Dovecot's checks, the
    sendmail command, the backup timer, and a restore of that backup while the box is in service."""
    be = hosts["be"]
    blocks = guide_blocks()
    assert [lang for lang, _ in blocks] == ["sh", "sh", "sh", "sh", "ini", "sh", "sh"], blocks
    out: dict[str, str] = {}

    def run_block(lines: list[str], stdin: dict[str, str] | None = None) -> None:
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cmd = as_on_the_box(line)
            key = cmd.split("#")[0].strip()
            r = be.run(["bash", "-o", "pipefail", "-c", cmd], check=False, timeout=120,
                       input=(stdin or {}).get(key, ""))
            assert r.returncode in LAB_EXIT.get(key, (0,)), (line, r.returncode, r.stdout, r.stderr)
            out[key] = r.stdout

    dns, first_user, dovecot, sendmail, units, timer, restore = (lines for _, lines in blocks)
    run_block(dns)
    assert '"v=DMARC1; p=none; rua=mailto:postmaster@example.org"' in out["homemx-backend dns records"]
    assert "mail.example.org" in out["homemx-backend dns records --ptr"]
    run_block(first_user, stdin={"homemx-backend users passwd alice@example.org": "a-new-pass-phrase-42\n"})
    password = out["cat /etc/homemx/first-user.password"].strip()
    assert password and not be.path("/etc/homemx/first-user.password").exists()
    assert "a-new-pass-phrase-42" not in be.path("/etc/homemx/passwd").read_text()  # stored hashed
    assert be.path("/etc/homemx/passwd").read_text().startswith("alice@example.org:{BLF-CRYPT}")
    run_block(dovecot)
    conf = out["doveconf -n"]
    assert "driver = pam" not in conf and "haproxy = yes" in conf, conf
    sockets = [f.split()[3] for f in out["ss -ltnp 'sport = :993'"].splitlines()[1:]]
    assert sockets == ["10.77.0.2:993"], out["ss -ltnp 'sport = :993'"]

    # sendmail: root is the first user's alias; both messages land in alice's Maildir, masqueraded
    new = be.path(f"{DATA}/mail/example.org/alice/Maildir/new")
    before = set(new.iterdir())
    run_block(sendmail)
    got = _wait("both sendmail messages", lambda: (lambda n: len(n) >= 2 and n)(set(new.iterdir()) - before))
    texts = [p.read_text() for p in got]
    assert any("backup finished" in t for t in texts) and any("Subject: smart" in t for t in texts), texts
    assert any("smartd@example.org" in t for t in texts), texts  # smartd@nas masqueraded to our domain

    # the backup timer and service from the guide, enabled as it says; one run now, by hand
    current = None
    for line in units:
        if line.startswith("# /etc/systemd/system/"):
            current = line[2:]
            be.path(current).write_text("")
        elif current:
            with be.path(current).open("a") as f:
                f.write(line + "\n")
    assert sorted(be.path("/etc/systemd/system").glob("homemx-backup.*")) == [
        be.path("/etc/systemd/system/homemx-backup.service"), be.path("/etc/systemd/system/homemx-backup.timer")]
    run_block(timer)
    assert be.run(["systemctl", "is-enabled", "homemx-backup.timer"], check=False).stdout.strip() == "enabled"
    assert be.run(["systemd-analyze", "verify", "/etc/systemd/system/homemx-backup.service",
                   "/etc/systemd/system/homemx-backup.timer"], check=False).returncode == 0
    r = be.run(["systemctl", "start", "homemx-backup.service"], check=False, timeout=300)
    assert r.returncode == 0, r.stderr + _journal(be)
    backups = sorted(be.path("/var/backups/homemx").iterdir())
    assert len(backups) == 1 and (backups[0] / "manifest.json").exists(), backups
    assert oct(backups[0].stat().st_mode & 0o777) == "0o700"

    # restore that backup while the box is in service, as the guide's steps say: what was in the
    # backup is back, and mail delivered after it stays (restore --force writes over, it does not wipe)
    be.run(["cp", "-a", f"/var/backups/homemx/{backups[0].name}", "/root/homemx-backup"])
    seen = set(new.iterdir())
    after = be.run(["bash", "-c", "echo after the backup | sendmail root"], check=False)
    assert after.returncode == 0, after.stderr
    _wait("the message sent after the backup", lambda: set(new.iterdir()) - seen)
    run_block(restore)
    assert be.run(["systemctl", "is-active", "homemx-backend", "dovecot"], check=False).stdout.split() == [
        "active", "active"]
    texts = [p.read_text() for p in new.iterdir()]
    assert any("backup finished" in t for t in texts) and any("after the backup" in t for t in texts)
    r = _fab(hosts, "check")
    assert r.returncode == 0, r.stdout + r.stderr
