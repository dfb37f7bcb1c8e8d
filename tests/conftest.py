"""Shared test helpers. Under CI=true a test never skips for a missing tool: ./dev installs them all."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(*names: str) -> None:
    """Skip (locally) or fail (CI) when a system tool a test uses is missing."""
    for name in names:
        if shutil.which(name) is None and not os.path.exists(name):
            msg = f"{name} not installed (./dev setup installs it)"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)


def require_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root (network namespaces)")
        pytest.skip("needs root")


# ---------------------------------------------------------------- builds started early

# The Debian root the systemd tests boot (tests/lab/nspawn.py, cached under build/nspawn) takes
# ~60 s of debootstrap on a fresh checkout, mostly downloading and unpacking. When those tests are
# selected, it is built in the background from the start of the run, beside the other tests; their
# fixture then finds it made, or waits on the build's lock for the rest. A failed build is simply
# made again by the fixture, which reports debootstrap's own error.
_early_builds: list[subprocess.Popen] = []


def pytest_collection_finish(session) -> None:
    if session.config.option.collectonly or os.geteuid() != 0 or shutil.which("debootstrap") is None:
        return
    if not any(item.nodeid.startswith("tests/provision/test_systemd_real.py") for item in session.items):
        return
    repo = Path(__file__).resolve().parents[1]
    log = repo / "build" / "nspawn-early-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        _early_builds.append(subprocess.Popen(
            [sys.executable, "-c", "from tests.lab.nspawn import debian_root; debian_root()"],
            cwd=repo, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))


def pytest_sessionfinish(session, exitstatus) -> None:
    """Nothing of ours outlives the run. A build still going is waited for when the run ended
    normally (with two workers, the one that started it may finish first while the other still
    needs it), and stopped when the run was cut short (debootstrap unmounts what it mounted on TERM)."""
    for p in _early_builds:
        if p.poll() is None and exitstatus != pytest.ExitCode.INTERRUPTED:
            try:
                p.wait(900)
            except subprocess.TimeoutExpired:
                pass
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
