"""`fab` failures a person can act on (issue 15, point 5): one stderr line naming the host, the step and
the reason, exit status 1, no traceback; an unreachable host is found before anything is built; paths in
site.toml are relative to the site file. The real `fab` command line, against a closed port on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.deploy import ProvisionError, Remote, Report
from provision.site import HostLayout, load_site

REPO = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).with_name("fab"))


@pytest.fixture
def closed_port():
    """A loopback port bound but not listening: a connection to it is refused at once, and no other
    program can take it while the test runs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


def _site(port: int, **site_keys: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in site_keys.items())
    return f"""[site]
domain = "example.org"
hostname = "mail.example.org"
first_user = "alice@example.org"
gateway_public_addr = "203.0.113.10"
{extra}[gateway]
ssh = "root@127.0.0.1:{port}"
[backend]
ssh = "admin@127.0.0.1:{port}"
"""


FAB_CLI = [FAB, "-r", str(REPO / "provision")]
# `homemx-provision` (provision/cli.py): the same tasks as an installed command
PROVISION_CLI = [sys.executable, "-m", "provision.cli"]


def _fab(site_file: Path, *args: str, cwd: Path, cli: list[str] = FAB_CLI) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    r = subprocess.run([*cli, *args, "--site", str(site_file)], capture_output=True, text=True, timeout=120, cwd=cwd,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return r, time.monotonic() - start


@pytest.mark.parametrize("cli, task, role, user", [
    (FAB_CLI, "both", "gateway", "root"), (FAB_CLI, "gateway", "gateway", "root"),
    (FAB_CLI, "backend", "backend", "admin"), (FAB_CLI, "check", "gateway", "root"),
    (PROVISION_CLI, "both", "gateway", "root")])
def test_unreachable_host_is_one_line_before_anything_is_built(tmp_path, closed_port, cli, task, role, user):
    site = tmp_path / "site.toml"
    site.write_text(_site(closed_port))
    # no --wheelhouse: without the reachability check first, `both` would build homemx's wheel first
    r, took = _fab(site, task, cwd=tmp_path, cli=cli)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines() == [f"homemx: {role} ({user}@127.0.0.1:{closed_port}): connect: "
                                     "[Errno 111] Connection refused"]
    assert r.stdout == ""
    assert took < 8, f"{took:.1f} s: something was built before the host was tried"


def test_relative_certificate_paths_are_relative_to_the_site_file(tmp_path, closed_port):
    conf = tmp_path / "ops"
    (conf / "certs").mkdir(parents=True)
    (conf / "certs" / "fullchain.pem").write_text("cert\n")
    (conf / "certs" / "privkey.pem").write_text("key\n")
    site = conf / "site.toml"
    site.write_text(_site(closed_port, tls_cert="certs/fullchain.pem", tls_key="certs/privkey.pem")
                    .replace("[gateway]", "acme = false\n[gateway]"))
    loaded = load_site(site)
    assert (loaded.tls_cert, loaded.tls_key) == (str(conf / "certs/fullchain.pem"), str(conf / "certs/privkey.pem"))
    # started elsewhere: the files are still found (the run gets as far as the host, which is down)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    (wheelhouse / "homemx-0.1.0-py3-none-any.whl").write_bytes(b"")
    r, _ = _fab(site, "backend", "--dry-run", "--wheelhouse", str(wheelhouse), cwd=elsewhere)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"homemx: backend (admin@127.0.0.1:{closed_port}): connect: "
                                     "[Errno 111] Connection refused"]


def test_a_missing_certificate_is_one_line_naming_the_key_and_the_resolved_path(tmp_path, closed_port):
    site = tmp_path / "site.toml"
    site.write_text(_site(closed_port, tls_cert="certs/fullchain.pem", tls_key="certs/privkey.pem")
                    .replace("[gateway]", "acme = false\n[gateway]"))
    r, _ = _fab(site, "both", "--dry-run", cwd=REPO)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{site}: site.tls_cert: cannot read {tmp_path}/certs/fullchain.pem: No such file or directory",
        f"{site}: site.tls_key: cannot read {tmp_path}/certs/privkey.pem: No such file or directory"]


def test_a_typo_in_an_extra_table_is_one_line_before_any_host_is_tried(tmp_path, closed_port):
    site = tmp_path / "site.toml"
    site.write_text(_site(closed_port) + "[backend.extra.delivery]\nsmarthost_tsl = \"implicit\"\n")
    r, took = _fab(site, "both", "--dry-run", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"{site}: backend.extra.delivery.smarthost_tsl: unknown key"]


def test_a_failing_step_is_one_line_naming_host_step_and_reason(tmp_path):
    """A command that fails on a host (here the operator's own shell, through invoke: the same
    run() Fabric's connections have) names the host, the item being done and the command's error."""
    from invoke import Context

    r = Remote(Context(), HostLayout(ssh="root@home.lan"), "backend", Report())
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ProvisionError) as e:
        r.ensure_dir(f"{blocker}/dir", 0o755, "root", "root")
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(f"backend (root@home.lan): {blocker}/dir: `install -d -m 755 -o root -g root {blocker}/dir` "
                           "failed (1): install: ")
    assert text.endswith("Not a directory")


def test_dry_run_shows_a_hand_edit_as_a_diff_and_never_a_secret(tmp_path):
    import getpass
    import grp
    import os

    from invoke import Context

    me, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
    conf, key = tmp_path / "backend.toml", tmp_path / "privkey.pem"
    conf.write_text('[server]\nhostname = "mail.example.org"\nlog_level = "debug"\n')  # the hand edit
    key.write_text("OLD-SECRET\n")
    r = Remote(Context(), HostLayout(ssh="root@home.lan"), "backend", Report(), dry_run=True)
    assert r.ensure_file(str(conf), b'[server]\nhostname = "mail.example.org"\n', 0o644, me, group) == "would change"
    assert r.ensure_file(str(key), b"NEW-SECRET\n", 0o600, me, group, item="tls key") == "would change"
    (host, path, diff), (host2, path2, diff2) = r.report.diffs
    assert (host, path) == ("backend", str(conf))
    assert diff.splitlines() == [f"--- {conf} (on backend)", f"+++ {conf} (from site.toml)", "@@ -1,3 +1,2 @@",
                                 " [server]", ' hostname = "mail.example.org"', '-log_level = "debug"']
    assert (host2, path2, diff2) == ("backend", str(key), "secret, not shown")
    text = r.report.text()
    assert f"backend  diff {conf}\n" in text and '\n-log_level = "debug"\n' in text
    assert "SECRET" not in text and not any("SECRET" in x for x in r.replies)
    assert conf.read_text().endswith('log_level = "debug"\n')  # a dry run changes nothing
