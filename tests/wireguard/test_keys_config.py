"""Keys against the real `wg` tool; wg-quick files: round trip, validation, 0600, CLI config writing."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess

import pytest

from tests.conftest import require_tool
from wireguard import cli, keys, wgquick


def wg(*args: str, input: str | None = None) -> str:
    return subprocess.run(["wg", *args], input=input, capture_output=True, text=True, check=True).stdout.strip()


def test_our_keys_match_wg_pubkey():
    require_tool("wg")
    for _ in range(5):
        priv = keys.generate_private_key()
        assert wg("pubkey", input=priv + "\n") == keys.public_key(priv)


def test_wg_genkey_keys_give_same_public_key():
    require_tool("wg")
    for _ in range(5):
        priv = wg("genkey")
        assert keys.public_key(priv) == wg("pubkey", input=priv + "\n")


def test_private_key_is_clamped_like_wg_genkey():
    raw = keys.decode_key(keys.generate_private_key())
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40


def test_preshared_key_shape_and_hex_round_trip():
    psk = keys.generate_preshared_key()
    assert len(keys.decode_key(psk)) == 32
    assert keys.from_hex(keys.to_hex(psk)) == psk
    with pytest.raises(keys.InvalidKeyError):
        keys.decode_key("c2hvcnQ=")
    with pytest.raises(keys.InvalidKeyError):
        keys.decode_key("not base64 at all!")


def test_private_key_file_is_0600_and_reused(tmp_path):
    path = tmp_path / "sub" / "hmx0.key"
    k1, created = keys.load_or_create_private_key(path)
    assert created and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    k2, created = keys.load_or_create_private_key(path)
    assert not created and k1 == k2


def _pair():
    a, b = keys.generate_private_key(), keys.generate_private_key()
    return a, b


def test_backend_file_round_trips_and_routes_only_through_its_table():
    a, b = _pair()
    cfg = wgquick.backend_config(private_key=a, address="10.77.0.2/24", gateway_public_key=keys.public_key(b),
                                 gateway_endpoint=("198.51.100.10", 51820), preshared_key=keys.generate_preshared_key(),
                                 address6="fd77::2/64")
    text = wgquick.render(cfg)
    assert wgquick.parse(text) == cfg
    assert "Table = 2525" in text and "AllowedIPs = 0.0.0.0/0, ::/0" in text
    assert "PersistentKeepalive = 25" in text and "MTU = 1380" in text
    assert "PostUp = ip -4 rule add from 10.77.0.2 lookup 2525" in text
    assert "PostDown = ip -6 rule del from fd77::2 lookup 2525" in text
    assert [(str(a.ip), t) for a, t in cfg.policy_rules()] == [("10.77.0.2", 2525), ("fd77::2", 2525)]


def test_gateway_file_round_trips():
    a, b = _pair()
    cfg = wgquick.gateway_config(private_key=a, address="10.77.0.1/24", backend_public_key=keys.public_key(b),
                                 backend_address="10.77.0.2", listen_port=51999,
                                 egress_nft_file="/etc/wireguard/hmx0.egress.nft")
    text = wgquick.render(cfg)
    assert wgquick.parse(text) == cfg
    assert "ListenPort = 51999" in text and "AllowedIPs = 10.77.0.2/32" in text
    assert "Endpoint" not in text and "Table" not in text
    assert cfg.policy_rules() == ()


def test_written_file_is_0600_and_reads_back(tmp_path):
    a, b = _pair()
    cfg = wgquick.backend_config(private_key=a, address="10.77.0.2/24", gateway_public_key=keys.public_key(b),
                                 gateway_endpoint=("vps.example.net", 51820))
    path = tmp_path / "hmx0.conf"
    wgquick.write(cfg, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert wgquick.read(path) == cfg
    assert wgquick.ifname_from_path(path) == "hmx0"


@pytest.mark.parametrize("mutate, key", [
    (lambda t: t.replace("MTU = 1380", "MTU = 1380\nDNS = 1.1.1.1"), "Interface.DNS"),
    (lambda t: t.replace("MTU = 1380", "MTU = 1380\nColour = blue"), "Interface.Colour"),
    (lambda t: t.replace("PersistentKeepalive = 25", "PersistentKeepalive = 25\nFoo = 1"), "Peer[0].Foo"),
    (lambda t: t.replace("Table = 2525\n", ""), "Peer[0].AllowedIPs"),  # 0/0 into main: refused
    (lambda t: t.replace("MTU = 1380", "MTU = 500"), "Interface.MTU"),
    (lambda t: t.replace("Address = 10.77.0.2/24", "Address = 10.77.0.300/24"), "Interface.Address"),
])
def test_bad_files_name_file_and_key(mutate, key):
    a, b = _pair()
    cfg = wgquick.backend_config(private_key=a, address="10.77.0.2/24", gateway_public_key=keys.public_key(b),
                                 gateway_endpoint=("198.51.100.10", 51820))
    with pytest.raises(wgquick.WireGuardConfigError) as ei:
        wgquick.parse(mutate(wgquick.render(cfg)), "/etc/wireguard/hmx0.conf")
    assert ei.value.key == key
    assert str(ei.value).startswith("/etc/wireguard/hmx0.conf: " + key)


def test_bad_interface_names_are_refused():
    for name in ("0abc.conf", "a" * 16 + ".conf", "wg+1.conf", "hmx0.txt"):
        with pytest.raises(wgquick.WireGuardConfigError):
            wgquick.ifname_from_path("/etc/wireguard/" + name)


def _cli(role: str, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register_tunnel_command(sub, role)
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_keygen_and_config_write_a_working_pair(tmp_path, capsys):
    gk, bk, psk = tmp_path / "g.key", tmp_path / "b.key", tmp_path / "psk"
    assert _cli("gateway", "tunnel", "keygen", "-k", str(gk), "--psk-file", str(psk)) == 0
    gpub = capsys.readouterr().out.strip()
    assert _cli("backend", "tunnel", "keygen", "-k", str(bk)) == 0
    bpub = capsys.readouterr().out.strip()
    assert stat.S_IMODE(os.stat(psk).st_mode) == 0o600
    assert keys.public_key(gk.read_text().strip()) == gpub
    gconf, bconf = tmp_path / "hmxg.conf", tmp_path / "hmxb.conf"
    assert _cli("gateway", "tunnel", "config", "-c", str(gconf), "-k", str(gk), "--peer-public-key", bpub,
                "--psk-file", str(psk), "--public-if", "eth0", "--public-addr", "198.51.100.10") == 0
    assert _cli("backend", "tunnel", "config", "-c", str(bconf), "-k", str(bk), "--peer-public-key", gpub,
                "--psk-file", str(psk), "--endpoint", "198.51.100.10:51820") == 0
    g, b = wgquick.read(gconf), wgquick.read(bconf)
    assert g.peers[0].public_key == b.public_key and b.peers[0].public_key == g.public_key
    assert g.peers[0].preshared_key == b.peers[0].preshared_key == psk.read_text().strip()
    assert b.peers[0].endpoint == ("198.51.100.10", 51820)
    nft = (tmp_path / "hmxg.egress.nft").read_text()
    assert f"nft -f {tmp_path / 'hmxg.egress.nft'}" in g.post_up
    assert "snat ip to 198.51.100.10" in nft and "tcp dport 25" in nft
    # a bad peer key is a clear CLI error, not a traceback
    assert _cli("backend", "tunnel", "config", "-c", str(bconf), "-k", str(bk), "--peer-public-key", "nope",
                "--endpoint", "198.51.100.10:51820") == 1
    assert "tunnel config" in capsys.readouterr().err


def test_wg_quick_strip_accepts_our_files(tmp_path):
    require_tool("wg-quick")
    a, b = _pair()
    for name, cfg in (("hmxb", wgquick.backend_config(private_key=a, address="10.77.0.2/24",
                                                     gateway_public_key=keys.public_key(b),
                                                     gateway_endpoint=("198.51.100.10", 51820),
                                                     preshared_key=keys.generate_preshared_key())),
                      ("hmxg", wgquick.gateway_config(private_key=b, address="10.77.0.1/24",
                                                     backend_public_key=keys.public_key(a),
                                                     backend_address="10.77.0.2"))):
        path = tmp_path / f"{name}.conf"
        wgquick.write(cfg, path)
        r = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert f"PrivateKey = {cfg.private_key}" in r.stdout
        assert "Address" not in r.stdout and "PostUp" not in r.stdout and "Table" not in r.stdout
        assert f"PublicKey = {cfg.peers[0].public_key}" in r.stdout
