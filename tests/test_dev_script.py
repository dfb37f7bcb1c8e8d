"""./dev's package installation guard (``with_no_service_starts``), run for real in bash: while the
install runs, policy-rc.d forbids service starts; afterwards the host's own policy is back, and what
the install enabled for boot is disabled again while links that were there before stay."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEV = Path(__file__).resolve().parents[1] / "dev"

# The fake installer: checks the policy in force, then enables a service for boot as a package's
# postinst (deb-systemd-helper) would, and fails or succeeds as asked.
INSTALLER = r"""
fake_install() {
  [ "$("$DEV_POLICY_RC" start; echo $?)" = 101 ] || { echo "policy not in force" >&2; return 9; }
  mkdir -p "$DEV_SYSTEMD_DIR/multi-user.target.wants"
  ln -s /lib/systemd/system/newd.service "$DEV_SYSTEMD_DIR/multi-user.target.wants/newd.service"
  return "$1"
}
"""


def run_guard(tmp_path: Path, exit_code: int) -> subprocess.CompletedProcess:
    func = subprocess.run(["sed", "-n", "/^with_no_service_starts()/,/^}/p", str(DEV)],
                          capture_output=True, text=True, check=True).stdout
    assert func.startswith("with_no_service_starts()")
    script = func + INSTALLER + f"with_no_service_starts fake_install {exit_code}\n"
    env = dict(os.environ, DEV_POLICY_RC=str(tmp_path / "policy-rc.d"), DEV_SYSTEMD_DIR=str(tmp_path / "system"))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True)


def test_install_cannot_start_services_and_leaves_nothing_enabled_at_boot(tmp_path):
    wants = tmp_path / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True)
    os.symlink("/lib/systemd/system/ssh.service", wants / "ssh.service")  # the user's own
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")  # the host's own policy
    policy.chmod(0o755)
    r = run_guard(tmp_path, 0)
    assert r.returncode == 0, r.stderr
    assert "not enabled at boot: newd.service" in r.stdout
    assert sorted(p.name for p in wants.iterdir()) == ["ssh.service"]
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


def test_a_failed_install_still_restores_the_policy_and_undoes_the_enable(tmp_path):
    r = run_guard(tmp_path, 3)
    assert r.returncode == 3
    assert not (tmp_path / "policy-rc.d").exists()  # there was none before
    assert list((tmp_path / "system" / "multi-user.target.wants").iterdir()) == []


def run_dev(tmp_path: Path, verb: str) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    """``dev VERB`` for real in bash on a copy of the script (its own root, no venv), with the system
    tools it may call replaced by recorders: which packages it asks apt-get for, and whether anything
    tried to stop, restart or signal a service. python3 fails, so the run ends after the system step."""
    root, bin_, log = tmp_path / "root", tmp_path / "bin", tmp_path / "calls.log"
    root.mkdir()
    bin_.mkdir()
    (root / "dev").write_text(DEV.read_text())
    recorder = '#!/bin/sh\necho "$(basename "$0") $*" >> {log}\n{tail}\n'
    stubs = {"dpkg-query": "exit 1",  # nothing is installed
             "apt-get": '[ "$1" != install ] || [ "$("$DEV_POLICY_RC" start 2>/dev/null; echo $?)" = 101 ]'
                        ' || echo "apt-get without policy" >> {log}',
             "debconf-set-selections": "cat >/dev/null", "python3": "exit 1",
             "service": "", "systemctl": "", "invoke-rc.d": "", "pkill": "", "killall": "", "kill": ""}
    for name, tail in stubs.items():
        p = bin_ / name
        p.write_text(recorder.format(log=log, tail=tail.format(log=log)))
        p.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:/usr/bin:/bin", DEV_POLICY_RC=str(tmp_path / "policy-rc.d"),
               DEV_SYSTEMD_DIR=str(tmp_path / "system"))
    r = subprocess.run(["bash", str(root / "dev"), verb], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    calls = log.read_text().splitlines() if log.exists() else []
    packages = [word for c in calls if c.startswith("apt-get install ")
                for word in c.split()[2:] if not word.startswith("-")]
    return r, calls, packages


def test_demo_installs_only_python3_venv_and_touches_no_service(tmp_path):
    r, calls, packages = run_dev(tmp_path, "demo")
    assert "python3 -m venv failed" in r.stderr  # it got past the system step and stopped where we made it
    assert packages == ["python3-venv"], calls
    assert not [c for c in calls if c.split()[0] in ("service", "systemctl", "invoke-rc.d", "pkill", "killall", "kill")]
    assert "apt-get without policy" not in calls


def test_setup_installs_its_packages_with_starts_forbidden_and_stops_nothing(tmp_path):
    r, calls, packages = run_dev(tmp_path, "setup")
    assert "python3 -m venv failed" in r.stderr
    assert {"postfix", "dovecot-imapd", "nsd", "haproxy", "openssh-server", "rspamd"} <= set(packages), calls
    assert not [c for c in calls if c.split()[0] in ("service", "systemctl", "invoke-rc.d", "pkill", "killall", "kill")]
    assert "apt-get without policy" not in calls
    assert not (tmp_path / "policy-rc.d").exists()  # the temporary policy is gone again
