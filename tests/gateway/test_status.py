"""`homemx-gateway status` against a running gateway (in this trio nursery, on real ports): with its
upstream (the home) down it exits 1 and names the upstream; with the upstream listening it exits 0;
a configured tunnel interface that does not exist is attention; an unreadable config exits 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from gateway.config import load_config
from tests.lab.gateway import running
from tests.lab.ports import free_port

GATEWAY_CLI = str(Path(sys.executable).parent / "homemx-gateway")


def write_config(tmp: Path, server_extra: str = "") -> tuple[Path, dict[str, int]]:
    ports = {name: free_port("127.0.0.1") for name in ("mx", "imaps", "home_mx", "home_imaps", "metrics")}
    path = tmp / "gateway.toml"
    path.write_text(f"""
[server]
hostname = "mx.example.org"
shutdown_grace = "1s"
metrics_listen = "127.0.0.1:{ports['metrics']}"
{server_extra}

[[listener]]
name = "mx"
kind = "smtp"
listen = "127.0.0.1:{ports['mx']}"
upstream = "127.0.0.1:{ports['home_mx']}"

[[listener]]
name = "imaps"
kind = "tcp"
listen = "127.0.0.1:{ports['imaps']}"
upstream = "127.0.0.1:{ports['home_imaps']}"
""")
    return path, ports


async def status(path: Path, *extra: str) -> tuple[int, str, str]:
    """The CLI in its own process: this nursery keeps serving what it probes."""
    with trio.fail_after(60):
        done = await trio.run_process([GATEWAY_CLI, "status", "-c", str(path), "--timeout", "5", *extra],
                                      capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def home(port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A listener standing in for the home's service: accepts and closes."""
    async def handler(stream):
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(handler, listeners)


@pytest.mark.trio
async def test_upstream_down_then_up(tmp_path):
    path, ports = write_config(tmp_path)
    async with running(load_config(path)):
        async with trio.open_nursery() as nursery:
            await nursery.start(home, ports["home_imaps"])  # the home's IMAP is up, its mx is not

            code, out, err = await status(path)
            assert code == 1, out + err
            assert err == ""
            lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
            assert lines["listeners"].split()[1:] == ["ok", "2", "of", "2", "listening"]
            assert lines["upstream"].split()[1:] == ["ATTENTION", "1", "of", "2", "reachable"]
            assert f"127.0.0.1:{ports['home_mx']} unreachable (Connection refused): mx cannot reach home" in out
            assert lines["tunnel"].split()[1] == "off"
            assert lines["metrics"].split()[1] == "ok"

            code, out, _ = await status(path, "--json")
            assert code == 1
            doc = json.loads(out)
            assert doc["ok"] is False and [p.split(":")[0] for p in doc["attention"]] == ["upstream"]
            ups = {u["address"]: u for u in doc["sections"]["upstream"]["upstreams"]}
            assert ups[f"127.0.0.1:{ports['home_mx']}"]["reachable"] is False
            assert ups[f"127.0.0.1:{ports['home_mx']}"]["listeners"] == ["mx"]
            assert ups[f"127.0.0.1:{ports['home_imaps']}"]["reachable"] is True
            assert [r["listening"] for r in doc["sections"]["listeners"]["listeners"]] == [True, True]

            await nursery.start(home, ports["home_mx"])  # the home's mx comes up
            code, out, err = await status(path)
            assert code == 0, out + err
            assert "2 of 2 reachable" in out and out.rstrip().endswith("-- all is well")
            code, out, _ = await status(path, "--json")
            assert code == 0 and json.loads(out)["ok"] is True
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_listener_and_metrics_down_and_missing_tunnel(tmp_path):
    """Nothing runs: every listener and the metrics endpoint are down; the configured tunnel
    interface does not exist."""
    path, ports = write_config(tmp_path, 'tunnel_interface = "hmxnone9"')
    code, out, _ = await status(path, "--json")
    assert code == 1
    doc = json.loads(out)
    assert [p.split(":")[0] for p in doc["attention"]] == ["listeners", "listeners", "upstream", "upstream",
                                                           "tunnel", "metrics"]
    assert doc["sections"]["tunnel"]["present"] is False
    assert "hmxnone9 is down" in doc["sections"]["tunnel"]["summary"]
    assert "Connection refused" in doc["sections"]["metrics"]["summary"]


@pytest.mark.trio
async def test_unreadable_config_exits_2(tmp_path):
    code, out, err = await status(tmp_path / "missing.toml")
    assert code == 2 and out == ""
    assert err.splitlines() == [f"homemx-gateway: {tmp_path / 'missing.toml'}: cannot read: No such file or directory"]
