"""gateway.toml schema: every mistake of a file reported at once, one FILE: KEY: REASON line each,
through the real `homemx-gateway config check`; checks between listeners run in the same pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

GATEWAY_CLI = str(Path(sys.executable).with_name("homemx-gateway"))

MX = '[[listener]]\nname = "{name}"\nkind = "smtp"\nlisten = {listen}\nupstream = "10.8.0.2:2525"\n'


def write(tmp_path, text: str, server: str = 'hostname = "mx.example.org"\n') -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text("[server]\n" + server + text)
    return p


def check(path: Path) -> list[str]:
    r = subprocess.run([GATEWAY_CLI, "config", "check", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    return r.stderr.splitlines()


def problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.file == str(path)
    return e.value.problems


def test_three_mistakes_make_three_lines_naming_file_key_and_reason(tmp_path):
    path = write(tmp_path, "[limits]\nrate = 0\n" + MX.format(name="mx", listen='"0.0.0.0:25"') + 'greet_wiat = "3s"\n'
                 + '[[listener]]\nname = "imaps"\nkind = "tcp"\nlisten = "0.0.0.0:993"\nupstream = "10.8.0.2:993"\n'
                 + "proxy_v2 = 1\n")
    assert check(path) == [
        f"homemx-gateway: {path}: limits.rate: expected a positive number, got 0",
        f"homemx-gateway: {path}: listener[0].greet_wiat: unknown key",
        f"homemx-gateway: {path}: listener[1].proxy_v2: expected true or false, got 1",
    ]


def test_a_typo_is_an_unknown_key_and_the_key_it_meant_is_missing(tmp_path):
    path = write(tmp_path, MX.format(name="mx", listen='"0.0.0.0:25"'), server='hostnme = "mx.example.org"\n')
    assert check(path) == [
        f"homemx-gateway: {path}: server.hostname: missing (required)",
        f"homemx-gateway: {path}: server.hostnme: unknown key",
    ]


def test_mistakes_inside_a_listener_and_between_listeners_are_reported_together(tmp_path):
    path = write(tmp_path, MX.format(name="a", listen='"0.0.0.0:25"') + 'idle_timeout = "never"\n'
                 + MX.format(name="b", listen='"0.0.0.0:2525"') + MX.format(name="b", listen='"0.0.0.0:2526"'))
    assert problems(path) == [("listener[0].idle_timeout", "expected a duration such as 30s, 5m or 4h, got 'never'"),
                              ("listener[2].name", "duplicate listener name 'b'")]


@pytest.mark.parametrize("first,second,reason", [
    ('"0.0.0.0:25"', '"0.0.0.0:25"', "0.0.0.0:25 is already used by listener 'a'"),
    ('"0.0.0.0:25"', '"192.0.2.1:25"', "192.0.2.1:25 is already used by listener 'a'"),
    ('["192.0.2.1:25", "[2001:db8::1]:25"]', '"[::]:25"', "[::]:25 is already used by listener 'a'"),
])
def test_two_listeners_on_one_address_are_refused(tmp_path, first, second, reason):
    path = write(tmp_path, MX.format(name="a", listen=first) + MX.format(name="b", listen=second))
    assert problems(path) == [("listener[1].listen", reason)]


def test_ipv4_and_ipv6_wildcards_on_one_port_and_port_zero_do_not_collide(tmp_path):
    cfg = load_config(write(tmp_path, MX.format(name="a", listen='"0.0.0.0:25"') + MX.format(name="b", listen='"[::]:25"')
                            + MX.format(name="c", listen='"127.0.0.1:0"') + MX.format(name="d", listen='"127.0.0.1:0"')))
    assert [lc.name for lc in cfg.listeners] == ["a", "b", "c", "d"]


def test_a_listener_on_the_metrics_address_is_refused(tmp_path):
    path = write(tmp_path, MX.format(name="a", listen='"10.8.0.1:9101"'),
                 server='hostname = "mx.example.org"\nmetrics_listen = "10.8.0.1:9101"\n')
    assert problems(path) == [("listener[0].listen", "10.8.0.1:9101 is already used by server.metrics_listen")]


def test_listener_limits_default_to_the_limits_table(tmp_path):
    cfg = load_config(write(tmp_path, "[limits]\nmax_per_client = 5\nrate = 0.5\nburst = 7\n"
                            + MX.format(name="a", listen='"0.0.0.0:25"') + "burst = 9\n"))
    lc = cfg.listeners[0]
    assert (lc.max_per_client, lc.rate, lc.burst) == (5, 0.5, 9)


def test_every_key_is_documented():
    from gateway.config import _GatewayFile

    doc = (Path(__file__).resolve().parents[2] / "docs" / "gateway.md").read_text()
    keys = {(table, key) for table, f in _GatewayFile.model_fields.items()
            for model in [f.annotation.__args__[0] if table == "listener" else f.annotation]
            for key in model.model_fields}
    assert {(table, key) for table, key in keys if f"`{key}`" not in doc} == set()
