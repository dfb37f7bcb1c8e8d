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
