"""The README's provisioning commands, run as written on a fresh operator machine (issue 15 point 6).

The block between ``<!-- provision-commands -->`` markers in README.md runs line by line in a copy of
the checkout, with a HOME of its own (so ``~/.local/homemx-op`` is a new venv) and no venv active.
Installing reaches the package index (like apt-get does). No host is contacted: after the
``cp`` line the site file gets a mistake, as an operator could make while editing it, and each
provisioning line must then fail cleanly: one line naming the file and the key, exit status 1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- provision-commands[^>]*-->\n```sh\n(.*?)```\n<!-- /provision-commands -->", re.S)

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    (block,) = BLOCK.findall((REPO / "README.md").read_text())
    return [line for line in block.splitlines() if line.strip()]


def test_readme_block_is_install_copy_preview_deploy():
    lines = readme_commands()
    assert len(lines) == 4
    assert lines[0].startswith("python3 -m venv ~/.local/homemx-op && ") and "pip install" in lines[0]
    assert lines[1].startswith("cp provision/site.example.toml site.toml")
    assert "homemx-provision both --site site.toml --dry-run" in lines[2]


def test_readme_provisioning_commands_work_as_written(tmp_path):
    checkout, home = tmp_path / "homemx", tmp_path / "home"
    home.mkdir()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        if (REPO / rel).is_file():
            (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, checkout / rel)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = os.environ.get("VIRTUAL_ENV", str(REPO / ".venv")) + "/bin"
    env.update(HOME=str(home), PATH=":".join(p for p in env["PATH"].split(":") if p != venv_bin))

    def sh(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=checkout, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)

    install, copy, *provision = readme_commands()
    for line in (install, copy):
        r = sh(line)
        assert r.returncode == 0, (line, r.stdout, r.stderr[-3000:])
    tool = home / ".local" / "homemx-op" / "bin" / "homemx-provision"
    r = sh(f"{tool} both --help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--site" in r.stdout and "--wheelhouse" in r.stdout, r

    # "then edit it": a misspelt key
    site = checkout / "site.toml"
    site.write_text(site.read_text().replace("[site]\n", '[site]\ndomian = "example.org"\n', 1))
    for line in provision:
        r = sh(line)
        assert r.returncode == 1, (line, r.stdout, r.stderr)
        assert r.stderr == "site.toml: site.domian: unknown key\n" and r.stdout == "", (line, r.stderr)

    # `fab -r provision` (the operator guide's spelling) works from the checkout even where homemx is
    # not installed as a package (only its dependencies): it used to fail with "No module named provision"
    op = home / ".local" / "homemx-op" / "bin"
    assert sh(f"{op}/pip uninstall -q -y homemx").returncode == 0
    r = subprocess.run([str(op / "fab"), "-r", str(checkout / "provision"), "--list"], cwd="/", env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "both" in r.stdout and "check" in r.stdout, r.stderr[-2000:]
