"""Without -c, the commands of a provisioned venv use that host's files, named in the venv's
homemx-paths.json (provision/deploy.py commands_on_path); elsewhere the standard paths.

A real venv (``python -m venv``) that sees this checkout, so ``sys.prefix`` is the venv's as on a
host; the full path (link on PATH, the README's commands over ssh) is
tests/provision/test_fabric_deploy.py::test_readme_on_host_commands_work_as_written.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAIN = "import sys; from backend.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    v = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(v)], check=True)
    purelib = subprocess.run([v / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this checkout and the test venv's dependencies, as if installed
    Path(purelib, "homemx-test.pth").write_text("\n".join([str(REPO), *site.getsitepackages()]) + "\n")
    return v


def backend_cli(venv: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([venv / "bin/python", "-c", MAIN, *argv], capture_output=True, text=True, timeout=60)


def test_provisioned_paths_are_the_defaults(venv, tmp_path):
    conf = tmp_path / "etc/homemx/wireguard/wgt7.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[Interface]\n")
    backend_toml = tmp_path / "etc/homemx/backend.toml"
    (venv / "homemx-paths.json").write_text(json.dumps({"backend_config": str(backend_toml),
                                                        "tunnel_config": str(conf)}))
    try:
        r = backend_cli(venv, "tunnel", "status", "--help")
        assert f"(default{conf})" in "".join(r.stdout.split()), r.stdout  # argparse wraps at "-" too
        r = backend_cli(venv, "tunnel", "status")  # the interface named by the provisioned file
        assert r.returncode == 1 and r.stdout.startswith("interface: wgt7\n"), (r.stdout, r.stderr)
        r = backend_cli(venv, "users", "list")
        assert r.returncode == 2
        assert r.stderr == f"homemx-backend: config error: {backend_toml}: cannot read: No such file or directory\n"
        # a tunnel file that is not there (yet): wg-quick's place, as before
        conf.unlink()
        r = backend_cli(venv, "tunnel", "status", "--help")
        assert "(default/etc/wireguard/hmx0.conf)" in "".join(r.stdout.split()), r.stdout
    finally:
        (venv / "homemx-paths.json").unlink()
    r = backend_cli(venv, "dns", "records")  # no homemx-paths.json: the standard path
    assert r.returncode == 2 and "/etc/homemx/backend.toml: cannot read: No such file or directory" in r.stderr


def test_gateway_commands_use_the_provisioned_config_without_c(venv, tmp_path):
    """`homemx-gateway status` / `config check` / `run` as the operator guide writes them (no -c)."""
    gw = "import sys; from gateway.cli import main; sys.exit(main())"
    toml = tmp_path / "etc/homemx/gateway.toml"
    (venv / "homemx-paths.json").write_text(json.dumps({"gateway_config": str(toml)}))
    try:
        for argv in (["status"], ["config", "check"], ["run"]):
            r = subprocess.run([venv / "bin/python", "-c", gw, *argv], capture_output=True, text=True, timeout=60)
            assert r.returncode == 2, (argv, r.stdout, r.stderr)
            assert str(toml) in r.stderr and len(r.stderr.splitlines()) == 1, (argv, r.stderr)
    finally:
        (venv / "homemx-paths.json").unlink()
    r = subprocess.run([venv / "bin/python", "-c", gw, "config", "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "/etc/homemx/gateway.toml" in r.stderr, r.stderr
