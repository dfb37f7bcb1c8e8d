"""Pure parts of the bring-up: only differences are applied, so `up` on a live tunnel keeps its sessions."""

from __future__ import annotations

from wireguard import bringup, keys, wgquick


def _cfg(endpoint=("198.51.100.10", 51820)):
    a, b = keys.generate_private_key(), keys.generate_private_key()
    return wgquick.backend_config(private_key=a, address="10.77.0.2/24", gateway_public_key=keys.public_key(b),
                                  gateway_endpoint=endpoint)


def _as_device(want: dict) -> dict:
    # what a device that already has this configuration reports (plus live counters)
    return {"private_key": want["private_key"], "listen_port": 40001, "fwmark": 0,
            "peers": {pub: dict(p, last_handshake=1.0, rx_bytes=5, tx_bytes=6) for pub, p in want["peers"].items()}}


def test_matching_device_needs_no_change():
    want = bringup.desired_device(_cfg())
    assert bringup.device_changes(want, _as_device(want)) == {}


def test_fresh_device_gets_everything():
    want = bringup.desired_device(_cfg())
    ch = bringup.device_changes(want, {"private_key": None, "listen_port": 0, "fwmark": 0, "peers": {}})
    assert ch["private_key"] == want["private_key"] and list(ch["peers"]) == list(want["peers"])


def test_changed_allowed_ips_resets_only_that_peer_and_strangers_are_removed():
    want = bringup.desired_device(_cfg())
    have = _as_device(want)
    pub = next(iter(want["peers"]))
    have["peers"][pub]["allowed_ips"] = ["10.0.0.0/8"]
    stranger = keys.public_key(keys.generate_private_key())
    have["peers"][stranger] = dict(have["peers"][pub])
    ch = bringup.device_changes(want, have)
    assert set(ch) == {"peers", "remove_peers"}
    assert list(ch["peers"]) == [pub] and ch["remove_peers"] == [stranger]


def test_roaming_peer_without_configured_endpoint_is_not_a_change():
    g = wgquick.gateway_config(private_key=keys.generate_private_key(), address="10.77.0.1/24",
                               backend_public_key=keys.public_key(keys.generate_private_key()),
                               backend_address="10.77.0.2")
    want = bringup.desired_device(g)
    have = _as_device(want)
    have["listen_port"] = g.listen_port
    next(iter(have["peers"].values()))["endpoint"] = "198.51.100.20:41234"  # learned from the NAT
    assert bringup.device_changes(want, have) == {}


def test_hostname_endpoint_is_resolved_once():
    want = bringup.desired_device(_cfg(("localhost", 51820)))
    assert next(iter(want["peers"].values()))["endpoint"] in ("127.0.0.1:51820", "[::1]:51820")


def test_an_os_error_in_a_tunnel_verb_is_one_line_naming_the_file(tmp_path, capsys):
    """A read-only /proc/sys (a container) made `tunnel up` print a traceback: any OSError of a verb
    is one line with the file and the reason, exit 1 (here a real EISDIR from writing a directory)."""
    import argparse

    from wireguard.cli import _guard

    def up(args):
        with open(tmp_path, "w"):
            pass

    assert _guard(up)(argparse.Namespace(tunnel_command="up")) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith(f"tunnel up: {tmp_path}: Is a directory"), err
