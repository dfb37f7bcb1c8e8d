"""The `tunnel` command both daemons' CLIs share: keys, wg-quick file, native up/down, status."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path

from . import bringup, egress, keys, status as status_mod, wgquick

WG_QUICK_CONFIG = f"/etc/wireguard/{wgquick.DEFAULT_IFNAME}.conf"  # wg-quick's own place
PROVISIONED_CONFIG = f"/etc/homemx/wireguard/{wgquick.DEFAULT_IFNAME}.conf"  # provisioning's (provision/render.py)
# Written into the venv by provisioning (provision/deploy.py): this host's files, whatever its
# interface name and root. The backend's CLI reads the same file (backend/cli/run.py).
PATHS_FILE = "homemx-paths.json"


def default_config() -> str:
    """The wg-quick file the verbs use without -c: the one provisioning wrote, when it exists (named
    in the venv's homemx-paths.json, else the standard provisioned path), else wg-quick's place."""
    try:
        named = json.loads((Path(sys.prefix) / PATHS_FILE).read_text(encoding="utf-8")).get("tunnel_config")
    except (OSError, ValueError, AttributeError):
        named = None
    for candidate in (named, PROVISIONED_CONFIG):
        if isinstance(candidate, str) and candidate and os.path.isfile(candidate):
            return candidate
    return WG_QUICK_CONFIG


DEFAULT_CONFIG = default_config()
DEFAULT_KEY = str(Path(DEFAULT_CONFIG).with_suffix(".key"))  # provisioning keeps the key beside the file


def register_tunnel_command(subparsers, role: str) -> argparse.ArgumentParser:
    """Add ``tunnel up|down|status|keygen|pubkey|config`` for ``role`` ("gateway" or "backend")."""
    if role not in bringup.ROLES:
        raise ValueError(f"role must be one of {bringup.ROLES}")
    p = subparsers.add_parser("tunnel", help="WireGuard tunnel to the " + ("backend" if role == "gateway" else "gateway"),
                              description=f"WireGuard tunnel, {role} end. The configuration is a wg-quick file "
                              f"(default {DEFAULT_CONFIG}); its name gives the interface name.")
    sub = p.add_subparsers(dest="tunnel_command", metavar="ACTION")
    sub.required = True

    def cfg_arg(sp):
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"wg-quick file (default {DEFAULT_CONFIG})")

    sp = sub.add_parser("up", help="bring the tunnel up natively (idempotent)")
    cfg_arg(sp)
    sp.add_argument("--userspace", action="store_true", help="use wireguard-go even if the kernel module exists")
    if role == "gateway":
        _egress_args(sp)
    sp.set_defaults(func=lambda a: _cmd_up(a, role))

    sp = sub.add_parser("down", help="remove exactly what `up` added")
    cfg_arg(sp)
    sp.set_defaults(func=_cmd_down)

    sp = sub.add_parser("status", help="interface, handshake age, endpoint, traffic (exit 1 when down)")
    cfg_arg(sp)
    sp.add_argument("-i", "--interface", help="interface name (instead of reading the config)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=_cmd_status)

    sp = sub.add_parser("keygen", help="create this end's private key (0600) if absent; print the public key")
    sp.add_argument("-k", "--key-file", default=DEFAULT_KEY, help=f"private key file (default {DEFAULT_KEY})")
    sp.add_argument("--psk-file", help="also create a preshared key file (0600) if absent")
    sp.set_defaults(func=_cmd_keygen)

    sp = sub.add_parser("pubkey", help="print the public key of a private key file")
    sp.add_argument("-k", "--key-file", default=DEFAULT_KEY)
    sp.set_defaults(func=_cmd_pubkey)

    sp = sub.add_parser("config", help="write this end's wg-quick file (0600)")
    cfg_arg(sp)
    sp.add_argument("-k", "--key-file", default=DEFAULT_KEY, help="this end's private key file (created if absent)")
    sp.add_argument("--peer-public-key", required=True, help="the other end's public key")
    sp.add_argument("--psk-file", help="preshared key file shared by both ends")
    sp.add_argument("--mtu", type=int, default=wgquick.DEFAULT_MTU)
    if role == "backend":
        sp.add_argument("--address", default="10.77.0.2/24", help="this end's tunnel address (default 10.77.0.2/24)")
        sp.add_argument("--address6", help="IPv6 tunnel address (enables IPv6 egress)")
        sp.add_argument("--endpoint", required=True, help="the gateway's public HOST:PORT")
        sp.add_argument("--table", type=int, default=wgquick.DEFAULT_TABLE,
                        help=f"routing table for tunnel-bound traffic (default {wgquick.DEFAULT_TABLE})")
        sp.add_argument("--keepalive", type=int, default=wgquick.DEFAULT_KEEPALIVE)
    else:
        sp.add_argument("--address", default="10.77.0.1/24", help="this end's tunnel address (default 10.77.0.1/24)")
        sp.add_argument("--address6", help="IPv6 tunnel address")
        sp.add_argument("--listen-port", type=int, default=wgquick.DEFAULT_LISTEN_PORT)
        sp.add_argument("--peer-address", default="10.77.0.2", help="the backend's tunnel address")
        sp.add_argument("--peer-address6", help="the backend's IPv6 tunnel address")
        _egress_args(sp, "also write <config>.egress.nft and load it from PostUp, for plain wg-quick")
    sp.set_defaults(func=lambda a: _cmd_config(a, role))
    return p


def _egress_args(sp, extra: str = "") -> None:
    g = sp.add_argument_group("egress", "where the VPS meets the internet (default: the default route's "
                              "interface and source address). " + extra)
    g.add_argument("--public-if", help="public interface (out of which tcp/25 is forwarded)")
    g.add_argument("--public-addr", help="public IPv4 address to SNAT to (the one the PTR names)")
    g.add_argument("--public-addr6", help="public IPv6 address to SNAT to (IPv6 egress)")


def _fail(args, msg: str) -> int:
    print(f"{Path(sys.argv[0]).name} tunnel {args.tunnel_command}: {msg}", file=sys.stderr)
    return 1


def _guard(func):
    def run(args, *rest):
        try:
            return func(args, *rest)
        except (wgquick.WireGuardConfigError, bringup.TunnelError, egress.EgressError, keys.InvalidKeyError) as e:
            return _fail(args, str(e))
        except PermissionError as e:
            return _fail(args, f"{e} (bringing a tunnel up needs root / CAP_NET_ADMIN)")
        except OSError as e:  # e.g. a read-only /proc/sys in a container (EROFS): one line, not a traceback
            where = f"{e.filename}: " if e.filename else ""
            return _fail(args, f"{where}{e.strerror or e}")
    return run


@_guard
def _cmd_up(args, role: str) -> int:
    cfg = wgquick.read(args.config)
    ifname = wgquick.ifname_from_path(args.config)
    spec = None
    if role == "gateway":
        spec = bringup.EgressSpec(args.public_if, args.public_addr, args.public_addr6)
    st = bringup.up(cfg, ifname, role, egress_spec=spec, userspace=args.userspace or None)
    print(f"{ifname}: up ({st['implementation']})")
    return 0


@_guard
def _cmd_down(args) -> int:
    ifname = wgquick.ifname_from_path(args.config)
    cfg = None
    if os.path.exists(args.config):
        cfg = wgquick.read(args.config)
    removed = bringup.down(ifname, cfg)
    print(f"{ifname}: down" + ("" if removed["link"] else " (was not up)"))
    return 0


@_guard
def _cmd_status(args) -> int:
    ifname = args.interface or wgquick.ifname_from_path(args.config)
    st = status_mod.status(ifname)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        sys.stdout.write(status_mod.format_text(st))
    return 0 if st["present"] else 1


@_guard
def _cmd_keygen(args) -> int:
    priv, created = keys.load_or_create_private_key(args.key_file)
    if args.psk_file and not os.path.exists(args.psk_file):
        keys.write_secret(args.psk_file, keys.generate_preshared_key() + "\n")
    print(keys.public_key(priv))
    if not created:
        print(f"(kept the existing key in {args.key_file})", file=sys.stderr)
    return 0


@_guard
def _cmd_pubkey(args) -> int:
    priv = Path(args.key_file).read_text().strip()
    print(keys.public_key(priv))
    return 0


@_guard
def _cmd_config(args, role: str) -> int:
    priv, _ = keys.load_or_create_private_key(args.key_file)
    psk = Path(args.psk_file).read_text().strip() if args.psk_file else None
    keys.decode_key(args.peer_public_key)
    ifname = wgquick.ifname_from_path(args.config)
    if role == "backend":
        host, _, port = args.endpoint.rpartition(":")
        if not host or not port.isdigit():
            return _fail(args, f"--endpoint: expected HOST:PORT, got {args.endpoint!r}")
        cfg = wgquick.backend_config(private_key=priv, address=args.address, gateway_public_key=args.peer_public_key,
                                     gateway_endpoint=(host.strip("[]"), int(port)), preshared_key=psk,
                                     address6=args.address6, table=args.table, mtu=args.mtu, keepalive=args.keepalive)
    else:
        nft_file = None
        if args.public_if and args.public_addr:
            nft_file = str(Path(args.config).with_suffix(".egress.nft"))
            policy = egress.EgressPolicy(
                tunnel_if=ifname, public_if=args.public_if, public_addr=ipaddress.IPv4Address(args.public_addr),
                backend_addr=ipaddress.IPv4Address(args.peer_address),
                public_addr6=ipaddress.IPv6Address(args.public_addr6) if args.public_addr6 else None,
                backend_addr6=ipaddress.IPv6Address(args.peer_address6) if args.public_addr6 and args.peer_address6 else None)
            egress.write_ruleset(policy, nft_file)
        cfg = wgquick.gateway_config(private_key=priv, address=args.address, backend_public_key=args.peer_public_key,
                                     backend_address=args.peer_address, listen_port=args.listen_port,
                                     preshared_key=psk, address6=args.address6, backend_address6=args.peer_address6,
                                     mtu=args.mtu, egress_nft_file=nft_file)
    wgquick.write(cfg, args.config)
    print(f"wrote {args.config} (interface {ifname}); this end's public key: {keys.public_key(priv)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m wireguard.cli gateway|backend tunnel ...``: the same command without the daemon's CLI."""
    parser = argparse.ArgumentParser(prog="python -m wireguard.cli", description="homemx WireGuard tunnel")
    roles = parser.add_subparsers(dest="role", metavar="ROLE")
    roles.required = True
    for role in bringup.ROLES:
        rp = roles.add_parser(role, help=f"the {role} end")
        sub = rp.add_subparsers(dest="command", metavar="COMMAND")
        sub.required = True
        register_tunnel_command(sub, role)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
