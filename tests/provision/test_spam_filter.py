"""The spam-filter step of provisioning (provision.deploy.spam_filter) with systemctl on: Redis made to
run, rspamd restarted only when what it reads changed.

The commands run for real in a local shell (dpkg-query, rspamadm configtest, sievec, file
uploads under a root-prefixed layout); only ``systemctl`` is a stand-in, because this machine has
no systemd to talk to: a script first on PATH that records each call and answers is-enabled /
is-active from a state file. The SSH transport itself is covered by test_fabric_deploy.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from invoke import Context

from provision import deploy, render
from provision.site import HostLayout
from tests.conftest import require_root, require_tool

FAKE_SYSTEMCTL = """#!/bin/sh
# records every call; "is-enabled"/"is-active" succeed once "enable --now" has run
echo "$*" >> {calls}
case "$*" in
  *is-enabled*|*is-active*) test -e {state} ;;
  *"enable -q --now redis-server"*) touch {state} ;;
esac
"""


class LocalConnection:
    """What Remote needs of a Fabric connection (run, put), on this machine."""

    def __init__(self, path: str):
        self.ctx = Context()
        self.env = {"PATH": path}

    def run(self, cmd, **kw):
        return self.ctx.run(cmd, env=self.env, **kw)

    def put(self, fileobj, path):
        Path(path).write_bytes(fileobj.read())


@pytest.fixture
def host(tmp_path):
    require_root()  # files owned by root, chown
    require_tool("rspamadm", "sievec", "dpkg-query")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.calls"
    fake = bin_dir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL.format(calls=calls, state=tmp_path / "redis.enabled"))
    fake.chmod(0o755)
    layout = HostLayout(root=str(tmp_path / "root"), systemctl=True, install_packages=False)
    conn = LocalConnection(f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
    return layout, conn, calls


def _run(layout, conn) -> deploy.Remote:
    """One provisioning pass of the spam filter, restarts included (as deploy_backend does it)."""
    r = deploy.Remote(conn, layout, "backend", deploy.Report())
    inputs = deploy.spam_filter(r)
    deploy._restart(r, {"rspamd.service": inputs})
    return r


def _calls(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return lines


def test_first_run_starts_redis_and_restarts_rspamd_second_run_touches_nothing(host):
    layout, conn, calls = host
    r = _run(layout, conn)
    assert ("backend", "redis-server running", "changed") in r.report.items
    assert r.report.restarts == [("backend", "rspamd.service")]
    assert _calls(calls) == ["is-enabled -q redis-server", "enable -q --now redis-server",
                             "enable -q rspamd.service", "restart rspamd.service"]
    for rel, text in render.rspamd_local_files().items():
        assert Path(f"{layout.root}/etc/rspamd/{rel}").read_text() == text

    again = _run(layout, conn)
    assert again.report.changed == [] and again.report.restarts == []
    assert _calls(calls) == ["is-enabled -q redis-server", "is-active -q redis-server"]


def test_a_changed_rspamd_file_restarts_rspamd_only(host):
    layout, conn, calls = host
    _run(layout, conn)
    _calls(calls)
    worker = Path(f"{layout.root}/etc/rspamd/local.d/worker-normal.inc")
    worker.write_text('bind_socket = "*:11333";\n')  # someone opened the scanner to the network
    r = _run(layout, conn)
    assert r.report.changed == [("backend", "rspamd local.d/worker-normal.inc", "changed")]
    assert worker.read_text() == render.rspamd_local_files()["local.d/worker-normal.inc"]
    assert _calls(calls) == ["is-enabled -q redis-server", "is-active -q redis-server",
                             "enable -q rspamd.service", "restart rspamd.service"]
