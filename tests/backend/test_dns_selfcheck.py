"""The periodic DNS self-check against a real nsd serving the records `dns records` prints: each
check's result becomes a metric, the result is stored for `status`, and a change of a check's result
is logged once (not on every run, not again after a restart); a running backend does its first run
at start, in a thread, and `status` shows it."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from backend.dns.selfcheck import DNSSelfCheck, read_result, result_path
from backend.dns.records import render_ptr_records, render_records
from backend.metrics import BackendMetrics
from tests.backend.helpers import BACKEND_CLI, running_backend, wait_for
from tests.backend.test_dns_check import drop, write_config, zones_from
from tests.conftest import require_tool
from tests.lab.nsd import NSD
from tests.lab.ports import free_port

DMARC = "DMARC example.org"


@pytest.fixture
def lab(tmp_path):
    require_tool("/usr/sbin/nsd", "/usr/sbin/nsd-checkzone")
    port = free_port("127.0.0.1", udp=True)
    config = write_config(tmp_path, port)
    records, ptr = render_records(config), render_ptr_records(config)
    with NSD(zones_from(records, ptr), address="127.0.0.1", port=port) as ns:
        yield config, ns, records, ptr


def ok_metric(metrics: BackendMetrics, check: str) -> float | None:
    return metrics.registry.get_sample_value("homemx_backend_dns_check_ok", {"check": check})


def dns_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "homemx.dns"]


def test_metrics_and_one_log_line_per_change(lab, caplog):
    config, ns, records, ptr = lab
    caplog.set_level(logging.INFO, logger="homemx.dns")
    metrics = BackendMetrics()
    times = iter([1000.0, 2000.0, 3000.0, 4000.0])
    selfcheck = DNSSelfCheck(config, metrics, now=lambda: next(times))

    report = selfcheck.check_once()
    assert report.ok, report.table()
    names = [r.name for r in report.results]
    assert DMARC in names and len(names) >= 10
    assert all(ok_metric(metrics, name) == 1 for name in names)
    assert metrics.registry.get_sample_value("homemx_backend_dns_check_timestamp_seconds") == 1000.0
    assert dns_lines(caplog) == []  # every check passes the first time: nothing to tell
    stored = read_result(config)
    assert stored["ok"] is True and stored["timestamp"] == 1000.0 and len(stored["checks"]) == len(names)

    ns.reload(zones_from(drop(records, "_dmarc.example.org.", "TXT"), ptr))
    selfcheck.check_once()
    assert ok_metric(metrics, DMARC) == 0
    assert all(ok_metric(metrics, name) == 1 for name in names if name != DMARC)
    assert dns_lines(caplog) == ["dns self-check: DMARC example.org fails: no DMARC record at _dmarc.example.org"]
    assert [r.levelname for r in caplog.records if r.name == "homemx.dns"] == ["WARNING"]
    assert read_result(config)["ok"] is False

    selfcheck.check_once()  # still failing: no new line
    assert len(dns_lines(caplog)) == 1
    assert metrics.registry.get_sample_value("homemx_backend_dns_check_timestamp_seconds") == 3000.0

    # A restart reads the stored result: the same failure is not logged again, and the metrics
    # are there before the first run.
    restarted_metrics = BackendMetrics()
    restarted = DNSSelfCheck(config, restarted_metrics, now=lambda: 3500.0)
    assert ok_metric(restarted_metrics, DMARC) == 0
    restarted.check_once()
    assert len(dns_lines(caplog)) == 1

    ns.reload(zones_from(records, ptr))
    selfcheck.check_once()
    assert ok_metric(metrics, DMARC) == 1
    assert dns_lines(caplog)[1:] == ["dns self-check: DMARC example.org passes again: p=none, adkim=r, p=none only monitors: move to "
        "p=quarantine once `homemx-backend dmarc report` shows no unknown source (docs/dns.md)"]


@pytest.mark.asyncio
async def test_running_backend_checks_at_start_and_status_shows_it(lab):
    config, ns, records, ptr = lab
    with open(config.path, "a") as f:  # [dns] is the file's last table
        f.write('self_check_interval = "1h"\n')
    async with running_backend(config.path) as backend:
        await wait_for(lambda: result_path(config).exists(), timeout=60)
        assert ok_metric(backend.metrics, DMARC) == 1
    assert json.loads(result_path(config).read_text())["ok"] is True

    code, out = await status(config)
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("dns check"))
    assert line.split()[2] == "ok" and " 0 failed" in line

    # The DMARC record goes; a run records it; status now needs attention and says what.
    ns.reload(zones_from(drop(records, "_dmarc.example.org.", "TXT"), ptr))
    await asyncio.to_thread(DNSSelfCheck(backend.config, BackendMetrics()).check_once)
    code, out = await status(config)
    assert code == 1, out
    assert "dns check: DMARC example.org: no DMARC record at _dmarc.example.org" in out


async def status(config) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        BACKEND_CLI, "status", "-c", str(config.path), "--tunnel-config", str(config.path.parent / "hmxtest9.conf"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


@pytest.mark.parametrize("content", ["", "{", "[]", '{"timestamp": 1, "checks": [{"name": 5}]}', '{"checks": []}'])
def test_damaged_result_file_is_ignored(tmp_path, content):
    """A damaged dns-check.json (a full disk, an editor) neither stops the daemon nor `status`: it
    counts as no stored result."""
    from backend.config import load_config
    from tests.backend.helpers import listener_block, write_config as backend_config

    config = load_config(backend_config(tmp_path, listener_block("lan", "lan"), extra="[dns]\n"))
    result_path(config).parent.mkdir(parents=True)
    result_path(config).write_text(content)
    assert read_result(config) is None
    selfcheck = DNSSelfCheck(config, BackendMetrics())
    assert selfcheck.last_run is None and selfcheck.previous == {}


def test_shutdown_does_not_wait_for_a_self_check_in_progress(tmp_path):
    """A `homemx-backend run` whose self-check is waiting on a DNS server that never answers (each
    lookup then takes its 5 s timeout, the whole check minutes) still exits at once on SIGTERM:
    the check runs in a daemon thread, which the interpreter does not join at exit."""
    import os
    import signal
    import socket
    import subprocess

    from tests.backend.helpers import listener_block, write_config as backend_config
    from tests.lab.backend import Daemon

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.settimeout(30)
    port = free_port("127.0.0.1")
    cfg = backend_config(tmp_path, listener_block("lan", "lan", f"127.0.0.1:{port}", trusted_networks=["127.0.0.0/8"]),
                         extra=f'[dns]\nself_check_interval = "1h"\n\n[delivery]\nnameservers = ["127.0.0.1"]\n'
                               f"dns_port = {silent.getsockname()[1]}\n")
    daemon = Daemon(cfg).start(port)
    try:
        silent.recvfrom(512)  # the self-check has sent its first query: a run is in progress
        os.killpg(daemon.proc.pid, signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError("the daemon waited for the self-check") from None
    finally:
        daemon.stop()
        silent.close()
    assert not (tmp_path / "data" / "dns-check.json").exists()  # that run never finished


@pytest.mark.asyncio
async def test_status_flags_a_stale_result(lab):
    """Every check passed, but a day ago with a 6 h interval: the daemon's self-check is not running."""
    import time

    config, _, _, _ = lab
    await asyncio.to_thread(DNSSelfCheck(config, BackendMetrics(), now=lambda: time.time() - 86400).check_once)
    code, out = await status(config)
    assert code == 1, out
    line = next(line for line in out.splitlines() if line.startswith("dns check"))
    assert line.split()[2] == "ATTENTION" and " 0 failed" in line
    assert "dns check: the last self-check is 1 d 0 h old (every 6 h 0 min expected): is the daemon running?" in out
