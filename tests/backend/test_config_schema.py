"""backend.toml schema: every mistake of a file reported at once (one FILE: KEY: REASON line each, through
the real `homemx-backend config check`), and the checks between keys refused at load."""

from __future__ import annotations

import ipaddress

import pytest

from backend.config import ConfigError, load_config
from tests.backend.helpers import listener_block, run_cli, write_config


def _check(path) -> list[str]:
    """stderr lines of `homemx-backend config check`, which must refuse the file with status 2."""
    r = run_cli("config", "check", "-c", str(path))
    assert r.returncode == 2, r.stdout + r.stderr
    return r.stderr.splitlines()


def _problems(path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.file == str(path)
    return e.value.problems


def test_three_mistakes_make_three_lines_naming_file_key_and_reason(tmp_path):
    path = write_config(tmp_path, listener_block("mx", "mx", max_recipients=0),
                        server_extra='metrics_listen = "localhost:9325"',
                        extra='[delivery]\nretry_schedule = ["5 minutes"]\n')
    assert _check(path) == [
        f"homemx-backend: config error: {path}: server.metrics_listen: 'localhost' is not an IP address",
        f"homemx-backend: config error: {path}: listener[0].max_recipients: expected a positive integer, got 0",
        f"homemx-backend: config error: {path}: delivery.retry_schedule: "
        "expected a duration such as 30s, 5m, 4h or 5d, got '5 minutes'",
    ]


def test_a_typo_is_an_unknown_key_and_the_key_it_meant_is_missing(tmp_path):
    path = write_config(tmp_path, listener_block("mx", "mx"))
    path.write_text(path.read_text().replace("hostname =", "hostnme ="))
    assert _check(path) == [
        f"homemx-backend: config error: {path}: server.hostname: missing (required)",
        f"homemx-backend: config error: {path}: server.hostnme: unknown key",
    ]


def test_mistakes_inside_a_listener_and_between_listeners_are_reported_together(tmp_path):
    path = write_config(tmp_path, listener_block("a", "lan", "127.0.0.1:2525", timeout="soon")
                        + listener_block("b", "lan", "127.0.0.1:2526")
                        + listener_block("b", "lan", "127.0.0.1:2527"))
    assert _problems(path) == [("listener[0].timeout", "expected a duration such as 30s, 5m, 4h or 5d, got 'soon'"),
                               ("listener[2].name", "duplicate listener name 'b'")]


def test_smarthost_username_without_password_file_is_refused(tmp_path):
    path = write_config(tmp_path, listener_block("mx", "mx"),
                        extra='[delivery]\nsmarthost = "192.0.2.1:587"\nsmarthost_username = "me@provider.example"\n')
    assert _problems(path) == [("delivery.smarthost_password_file",
                                "missing: smarthost_username is set, and its password is read from this file")]
    pw = tmp_path / "smarthost.pw"
    pw.write_text("secret\n")
    path.write_text(path.read_text() + f'smarthost_password_file = "{pw}"\n')
    assert load_config(path).delivery.smarthost_password_file == pw


@pytest.mark.parametrize("first,second,reason", [
    ("127.0.0.1:2525", "127.0.0.1:2525", "127.0.0.1:2525 is already used by listener 'a'"),
    ("0.0.0.0:2525", "127.0.0.1:2525", "127.0.0.1:2525 is already used by listener 'a'"),
    ("[::1]:2525", "[::]:2525", "[::]:2525 is already used by listener 'a'"),
])
def test_two_listeners_on_one_address_are_refused(tmp_path, first, second, reason):
    path = write_config(tmp_path, listener_block("a", "lan", first) + listener_block("b", "lan", second))
    assert _problems(path) == [("listener[1].listen", reason)]


def test_listeners_that_do_not_collide_load(tmp_path):
    # Port 0 is a fresh port each time; IPv6 sockets are IPv6-only, so [::] and 0.0.0.0 are distinct.
    cfg = load_config(write_config(tmp_path, listener_block("a", "lan", "127.0.0.1:0") + listener_block("b", "lan")
                                   + listener_block("c", "lan", "0.0.0.0:2525") + listener_block("d", "lan", "[::]:2525")))
    assert [lc.name for lc in cfg.listeners] == ["a", "b", "c", "d"]


def test_a_listener_on_the_metrics_address_is_refused(tmp_path):
    path = write_config(tmp_path, listener_block("a", "lan", "127.0.0.1:9325"),
                        server_extra='metrics_listen = "127.0.0.1:9325"')
    assert _problems(path) == [("listener[0].listen", "127.0.0.1:9325 is already used by server.metrics_listen")]


@pytest.mark.parametrize("target", [
    "Alice <alice@example.org>",  # a display name
    "alice@example.org, bob@example.org",  # a list in one string
    "alice",  # a bare local part
    "alice@localhost",  # no domain we could look up
    "alice@[192.0.2.1]",  # an address literal
    "alice%remote.example@example.org",  # the %-hack
])
def test_alias_targets_that_are_not_addresses_are_refused(tmp_path, target):
    path = write_config(tmp_path, listener_block("mx", "mx"), aliases={"team": ["bob@example.org", target]})
    [(key, reason)] = _problems(path)
    assert key == 'domain."example.org".aliases.team' and reason.startswith(f"{target!r} is not an address")


def test_alias_targets_and_catch_all_that_are_addresses_load(tmp_path):
    cfg = load_config(write_config(tmp_path, listener_block("mx", "mx"), catch_all="Alice@Example.org",
                                   aliases={"Team": ["bob@example.org", "carol+lists@remote.example"], "x": "alice@example.org"}))
    dom = cfg.domains["example.org"]
    assert dom.aliases == {"team": ("bob@example.org", "carol+lists@remote.example"), "x": ("alice@example.org",)}
    assert dom.catch_all == "alice@example.org"


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0"])
def test_a_lan_trusting_every_address_is_refused_unless_allowed(tmp_path, network):
    block = listener_block("lan", "lan", trusted_networks=["192.168.1.0/24", network])
    path = write_config(tmp_path, block)
    assert _problems(path) == [("listener[0].trusted_networks",
                                f"{network} trusts every address: whoever reaches this listener relays without "
                                "AUTH (set allow_open_relay = true if that is meant)")]
    cfg = load_config(write_config(tmp_path, block.replace("[[listener]]\n", "[[listener]]\nallow_open_relay = true\n")))
    assert cfg.listeners[0].allow_open_relay
    assert ipaddress.ip_network(network) in cfg.listeners[0].trusted_networks


def test_defaults_are_unchanged(tmp_path):
    cfg = load_config(write_config(tmp_path, listener_block("mx", "mx"), extra="[delivery]\n"))
    lc, d = cfg.listeners[0], cfg.delivery
    assert (lc.proxy_protocol, lc.trusted_networks, lc.allow_open_relay, lc.max_message_size, lc.max_recipients,
            lc.max_received_headers, lc.timeout, lc.auth_max_failures, lc.auth_failure_window,
            lc.auth_failure_delay) == (False, (), False, 50 * 1024 * 1024, 100, 30, 300.0, 10, 60.0, 1.0)
    assert (d.retry_schedule, d.max_queue_age, d.keep_final, d.concurrency, d.per_destination_concurrency,
            d.connect_timeout, d.command_timeout, d.remote_port, d.tls_policy, d.mta_sts, d.paused, d.smarthost,
            d.smarthost_tls) == ((300, 900, 1800, 3600, 7200, 14400, 28800), 5 * 86400, 86400.0, 20, 4, 30.0, 300.0,
                                 25, "opportunistic", True, False, None, "starttls")
    assert cfg.maildir_root == tmp_path / "data" / "mail" and cfg.server.log_level == "debug"
    assert cfg.dns.dmarc_policy == "none" and cfg.gateway.public_ipv4 == ()


def _keys(model) -> set[str]:
    """Every key the schema accepts, in every table below ``model`` (walked through list/dict/Optional)."""
    import typing

    from pydantic import BaseModel

    keys = set()
    for name, f in model.model_fields.items():
        keys.add(name)
        todo = [f.annotation]
        while todo:
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                keys |= _keys(t)
            todo += typing.get_args(t)
    return keys


def test_every_key_is_documented():
    from pathlib import Path

    from backend.config import _BackendFile

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    tables = {"server", "tls", "listener", "domain", "users", "dkim", "delivery", "gateway", "dns", "auth", "rspamd", "acme", "http", "api"}
    undocumented = {k for k in _keys(_BackendFile) - tables if f"\n{k} = " not in doc}
    assert undocumented == set()
