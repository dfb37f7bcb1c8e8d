"""wg-quick configuration files for both tunnel ends: build, write (through wgconfig), read back and validate.

The files are plain wg-quick files, so on a real host `wg-quick up hmx0` and
`systemctl enable wg-quick@hmx0` work exactly as `homemx-* tunnel up` does.

Design (see docs/wireguard.md):
- backend (home): ``Table = <number>`` puts ``AllowedIPs = 0.0.0.0/0`` into a routing table of its own,
  and a policy rule ``from <backend tunnel address> lookup <table>`` (PostUp/PostDown) sends only
  traffic bound to the tunnel address there. The home's default route is never touched.
- gateway (VPS): listens, and routes only the backend's tunnel address into the tunnel.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import wgconfig

from . import keys

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Why 1380: the outer packet must fit the smallest common home uplink. WireGuard adds 60 bytes over
# IPv4 (20 IP + 8 UDP + 32 WireGuard header/tag), 80 over IPv6. PPPoE leaves 1492 → 1432/1412;
# DS-Lite (IPv4 tunnelled in IPv6, 40 bytes) leaves 1460 → 1400; DS-Lite over PPPoE 1452 → 1392.
# 1380 fits all of those with a little room (e.g. for a VPS provider's own encapsulation), and the
# MSS clamp on the tunnel makes TCP (SMTP) choose segments that fit without relying on PMTUD,
# whose ICMP is often filtered (RFC 4459 2.3: path-MTU black holes in tunnels).
DEFAULT_MTU = 1380
DEFAULT_LISTEN_PORT = 51820
# Home is behind NAT and dials out: 25 s keeps the NAT mapping alive (most NATs expire UDP after 30 s+),
# the value wg(8) recommends for peers behind NAT.
DEFAULT_KEEPALIVE = 25
# Routing table for the backend's tunnel-bound traffic ("25" twice, for SMTP). Not 51820, which
# wg-quick itself uses for its fwmark trick on other tunnels.
DEFAULT_TABLE = 2525
DEFAULT_SUBNET = "10.77.0.0/24"
DEFAULT_IFNAME = "hmx0"

# wg-quick derives the interface from the file name and requires this form; we also keep it usable
# as part of an nftables identifier (homemx_<ifname>), hence no '=' or '+'.
IFNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")

INTERFACE_KEYS = ("Address", "ListenPort", "PrivateKey", "MTU", "Table", "FwMark", "PostUp", "PostDown")
PEER_KEYS = ("PublicKey", "PresharedKey", "Endpoint", "AllowedIPs", "PersistentKeepalive")
# wg-quick keys that are valid but that homemx never writes and the native bring-up does not do:
# rejected with a reason rather than silently ignored (DNS on the home box would hijack its resolver).
UNSUPPORTED_KEYS = {"DNS": "homemx tunnels must not change the resolver", "SaveConfig": "not supported",
                    "PreUp": "not supported", "PreDown": "not supported"}


class WireGuardConfigError(ValueError):
    """A wg-quick file problem, rendered as ``FILE: KEY: REASON``."""

    def __init__(self, file: str | os.PathLike[str] | None, key: str, reason: str):
        self.file = str(file) if file is not None else "<config>"
        self.key = key
        self.reason = reason
        super().__init__(f"{self.file}: {key}: {reason}" if key else f"{self.file}: {reason}")


@dataclass(frozen=True)
class Peer:
    public_key: str
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: tuple[str, int] | None = None
    preshared_key: str | None = None
    persistent_keepalive: int | None = None


@dataclass(frozen=True)
class TunnelConfig:
    """One wg-quick file's content. ``table``: None (wg-quick "auto" = main), "off", or a table number."""

    private_key: str
    addresses: tuple[IPInterface, ...]
    peers: tuple[Peer, ...]
    listen_port: int | None = None
    mtu: int | None = None
    table: int | str | None = None
    fwmark: int | None = None
    post_up: tuple[str, ...] = ()
    post_down: tuple[str, ...] = ()
    comment: str | None = field(default=None, compare=False)

    @property
    def public_key(self) -> str:
        return keys.public_key(self.private_key)

    def route_table(self) -> int | None:
        """The routing table AllowedIPs routes go to, as wg-quick does it; None for ``Table = off``."""
        if self.table is None or self.table in ("auto", "main"):
            return 254  # RT_TABLE_MAIN
        if self.table == "off":
            return None
        return int(self.table)

    def policy_rules(self) -> tuple[tuple[IPInterface, int], ...]:
        """(address, table) pairs for the ``from <tunnel address> lookup <table>`` rules a custom table needs."""
        table = self.route_table()
        if table is None or table == 254:
            return ()
        return tuple((a, table) for a in self.addresses)


def ifname_from_path(path: str | os.PathLike[str]) -> str:
    """wg-quick's rule: /etc/wireguard/hmx0.conf configures interface hmx0."""
    name = Path(path).name
    if not name.endswith(".conf"):
        raise WireGuardConfigError(path, "", "a wg-quick file name ends in .conf (its stem is the interface name)")
    ifname = name[: -len(".conf")]
    check_ifname(ifname, path)
    return ifname


def check_ifname(ifname: str, file: str | os.PathLike[str] | None = None) -> str:
    if not IFNAME_RE.match(ifname):
        raise WireGuardConfigError(file, "interface", f"{ifname!r} is not a valid interface name "
                                   "(a letter, then up to 14 letters, digits, '_' or '-'; IFNAMSIZ is 16)")
    return ifname


def nft_table_name(ifname: str) -> str:
    """The nftables table (family inet) homemx owns for a tunnel interface, on either end."""
    return "homemx_" + ifname


# ---------------------------------------------------------------- builders (pure)


def _mss_clamp_hook(table: str) -> str:
    # One nft invocation (one transaction); wg-quick evals hook lines in bash, so the single quotes
    # survive and %i is replaced by the interface name before that.
    return (f"nft 'add table inet {table}; add chain inet {table} mss_out "
            "{ type filter hook output priority mangle; policy accept; }; "
            f"add rule inet {table} mss_out oifname \"%i\" tcp flags syn tcp option maxseg size set rt mtu'")


def backend_config(*, private_key: str, address: IPInterface | str, gateway_public_key: str,
                   gateway_endpoint: tuple[str, int], preshared_key: str | None = None,
                   address6: IPInterface | str | None = None, table: int = DEFAULT_TABLE,
                   mtu: int = DEFAULT_MTU, keepalive: int = DEFAULT_KEEPALIVE) -> TunnelConfig:
    """The home end: dials the gateway, routes only traffic from its tunnel address(es) through it."""
    addrs: list[IPInterface] = [ipaddress.ip_interface(address)]
    allowed: list[IPNetwork] = [ipaddress.ip_network("0.0.0.0/0")]
    if address6 is not None:
        addrs.append(ipaddress.ip_interface(address6))
        allowed.append(ipaddress.ip_network("::/0"))
    up, down = [], []
    for a in addrs:
        fam = "-4" if a.version == 4 else "-6"
        up.append(f"ip {fam} rule add from {a.ip} lookup {table}")
        down.append(f"ip {fam} rule del from {a.ip} lookup {table}")
    nft_table = "homemx_%i"
    up.append(_mss_clamp_hook(nft_table))
    down.append(f"nft delete table inet {nft_table}")
    peer = Peer(public_key=gateway_public_key, allowed_ips=tuple(allowed), endpoint=gateway_endpoint,
                preshared_key=preshared_key, persistent_keepalive=keepalive)
    cfg = TunnelConfig(private_key=private_key, addresses=tuple(addrs), peers=(peer,), mtu=mtu, table=table,
                       post_up=tuple(up), post_down=tuple(down),
                       comment="# homemx backend (home) end: only traffic from the tunnel address uses the tunnel")
    validate(cfg)
    return cfg


def gateway_config(*, private_key: str, address: IPInterface | str, backend_public_key: str,
                   backend_address: str | ipaddress.IPv4Address, listen_port: int = DEFAULT_LISTEN_PORT,
                   preshared_key: str | None = None, address6: IPInterface | str | None = None,
                   backend_address6: str | ipaddress.IPv6Address | None = None, mtu: int = DEFAULT_MTU,
                   egress_nft_file: str | None = None) -> TunnelConfig:
    """The VPS end: listens; the backend peer may only use its own tunnel address(es).

    With ``egress_nft_file`` (written by ``egress.write_ruleset``), PostUp turns forwarding on and
    loads the egress table, so plain wg-quick gives the same egress as ``tunnel up``.
    """
    addrs: list[IPInterface] = [ipaddress.ip_interface(address)]
    allowed: list[IPNetwork] = [ipaddress.ip_network(f"{ipaddress.ip_address(backend_address)}/32")]
    if address6 is not None:
        addrs.append(ipaddress.ip_interface(address6))
    if backend_address6 is not None:
        allowed.append(ipaddress.ip_network(f"{ipaddress.ip_address(backend_address6)}/128"))
    up, down = [], []
    if egress_nft_file:
        up.append("sysctl -q -w net.ipv4.ip_forward=1")
        if backend_address6 is not None:
            up.append("sysctl -q -w net.ipv6.conf.all.forwarding=1")
        up.append(f"nft -f {egress_nft_file}")
        down.append("nft delete table inet homemx_%i")
    peer = Peer(public_key=backend_public_key, allowed_ips=tuple(allowed), preshared_key=preshared_key)
    cfg = TunnelConfig(private_key=private_key, addresses=tuple(addrs), peers=(peer,), listen_port=listen_port,
                       mtu=mtu, post_up=tuple(up), post_down=tuple(down),
                       comment="# homemx gateway (VPS) end: the backend may use only its tunnel address")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- validation


def validate(cfg: TunnelConfig, file: str | os.PathLike[str] | None = None) -> None:
    try:
        keys.decode_key(cfg.private_key)
    except keys.InvalidKeyError as e:
        raise WireGuardConfigError(file, "Interface.PrivateKey", str(e)) from None
    if not cfg.addresses:
        raise WireGuardConfigError(file, "Interface.Address", "at least one tunnel address is needed")
    if cfg.listen_port is not None and not 0 < cfg.listen_port < 65536:
        raise WireGuardConfigError(file, "Interface.ListenPort", f"{cfg.listen_port} is not a UDP port")
    if cfg.mtu is not None and not 1280 <= cfg.mtu <= 65456:
        # 1280: the IPv6 minimum link MTU (RFC 8200 5); WireGuard refuses less for IPv6 anyway.
        raise WireGuardConfigError(file, "Interface.MTU", f"{cfg.mtu} is outside 1280..65456")
    if isinstance(cfg.table, str) and cfg.table not in ("off", "auto", "main"):
        raise WireGuardConfigError(file, "Interface.Table", f"{cfg.table!r}: expected a number, off, auto or main")
    if isinstance(cfg.table, int) and not (0 < cfg.table < 2**32 and cfg.table not in (253, 254, 255)):
        raise WireGuardConfigError(file, "Interface.Table", f"{cfg.table} is not a usable routing table")
    for hook in cfg.post_up + cfg.post_down:
        if "#" in hook or "\n" in hook:
            raise WireGuardConfigError(file, "Interface.PostUp", "a hook cannot contain '#' (wg-quick strips it) or a newline")
    seen = set()
    for n, p in enumerate(cfg.peers):
        where = f"Peer[{n}]"
        try:
            keys.decode_key(p.public_key)
            if p.preshared_key is not None:
                keys.decode_key(p.preshared_key)
        except keys.InvalidKeyError as e:
            raise WireGuardConfigError(file, f"{where}.PublicKey/PresharedKey", str(e)) from None
        if p.public_key in seen:
            raise WireGuardConfigError(file, f"{where}.PublicKey", "duplicate peer")
        seen.add(p.public_key)
        if p.persistent_keepalive is not None and not 0 <= p.persistent_keepalive <= 65535:
            raise WireGuardConfigError(file, f"{where}.PersistentKeepalive", "expected 0..65535 seconds")
        if cfg.route_table() == 254 and any(a.prefixlen == 0 for a in p.allowed_ips):
            # wg-quick would install a fwmark-based default route for the whole host; homemx never
            # wants that (DESIGN: the home's default route is untouched).
            raise WireGuardConfigError(file, f"{where}.AllowedIPs",
                                       "a default route in the main table would capture all traffic; set Table = <number>")


# ---------------------------------------------------------------- writing (wgconfig)


def _endpoint_text(ep: tuple[str, int]) -> str:
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render(cfg: TunnelConfig) -> str:
    """The wg-quick file text for ``cfg``, produced with wgconfig."""
    validate(cfg)
    wc = wgconfig.WGConfig()
    wc.initialize_file(cfg.comment)
    add = wc.add_attr
    add(None, "Address", ", ".join(str(a) for a in cfg.addresses))
    if cfg.listen_port is not None:
        add(None, "ListenPort", cfg.listen_port)
    add(None, "PrivateKey", cfg.private_key)
    if cfg.mtu is not None:
        add(None, "MTU", cfg.mtu)
    if cfg.table is not None:
        add(None, "Table", cfg.table)
    if cfg.fwmark is not None:
        add(None, "FwMark", cfg.fwmark)
    for hook in cfg.post_up:
        add(None, "PostUp", hook, append_as_line=True)
    for hook in cfg.post_down:
        add(None, "PostDown", hook, append_as_line=True)
    for p in cfg.peers:
        wc.add_peer(p.public_key)
        if p.preshared_key is not None:
            add(p.public_key, "PresharedKey", p.preshared_key)
        if p.endpoint is not None:
            add(p.public_key, "Endpoint", _endpoint_text(p.endpoint))
        add(p.public_key, "AllowedIPs", ", ".join(str(n) for n in p.allowed_ips))
        if p.persistent_keepalive is not None:
            add(p.public_key, "PersistentKeepalive", p.persistent_keepalive)
    out = io.StringIO()
    wc.write_to_fileobj(out)
    return out.getvalue()


def write(cfg: TunnelConfig, path: str | os.PathLike[str]) -> None:
    """Write the file atomically, mode 0600 (it holds the private key and any preshared key)."""
    if str(path).endswith(".conf"):
        ifname_from_path(path)
    keys.write_secret(path, render(cfg))


# ---------------------------------------------------------------- reading (wgconfig)


def _int(value, file, key) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise WireGuardConfigError(file, key, f"expected a number, got {value!r}") from None


def _list(value) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value if str(v) != ""]
    return [str(value)] if str(value) != "" else []


def _parse_endpoint(text: str, file, key) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise WireGuardConfigError(file, key, f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _hooks(raw_lines: list[str], name: str) -> tuple[str, ...]:
    # wgconfig splits values at commas, which is right for Address/AllowedIPs but would cut a shell
    # command apart; hooks are therefore taken from the raw section lines, as wg-quick does.
    out = []
    for line in raw_lines:
        line = line.partition("#")[0].strip()
        k, sep, v = line.partition("=")
        if sep and k.strip() == name:
            out.append(v.strip())
    return tuple(out)


def parse(text: str, file: str | os.PathLike[str] | None = None) -> TunnelConfig:
    """Parse wg-quick text; unknown keys and bad values are errors naming the file and key."""
    wc = wgconfig.WGConfig()
    wc.read_from_fileobj(io.StringIO(text))
    try:
        iface = wc.get_interface(include_details=True)
        peers = wc.get_peers(keys_only=False, include_details=True)
    except (ValueError, TypeError, KeyError) as e:
        raise WireGuardConfigError(file, "", f"not a wg-quick file: {e}") from None
    if not iface:
        raise WireGuardConfigError(file, "Interface", "missing [Interface] section")
    for k in iface:
        if k.startswith("_"):
            continue
        if k in UNSUPPORTED_KEYS:
            raise WireGuardConfigError(file, f"Interface.{k}", UNSUPPORTED_KEYS[k])
        if k not in INTERFACE_KEYS:
            raise WireGuardConfigError(file, f"Interface.{k}", "unknown key")
    if "PrivateKey" not in iface:
        raise WireGuardConfigError(file, "Interface.PrivateKey", "missing")
    try:
        addresses = tuple(ipaddress.ip_interface(a) for a in _list(iface.get("Address", [])))
    except ValueError as e:
        raise WireGuardConfigError(file, "Interface.Address", str(e)) from None
    table: int | str | None = None
    if "Table" in iface:
        t = iface["Table"]
        table = t if isinstance(t, int) else (int(t) if str(t).isdigit() else str(t))
    peer_list = []
    for n, (pub, p) in enumerate(peers.items()):
        where = f"Peer[{n}]"
        if p.get("_disabled"):
            continue
        for k in p:
            if not k.startswith("_") and k not in PEER_KEYS:
                raise WireGuardConfigError(file, f"{where}.{k}", "unknown key")
        if pub is None:
            raise WireGuardConfigError(file, f"{where}.PublicKey", "missing")
        try:
            allowed = tuple(ipaddress.ip_network(a, strict=True) for a in _list(p.get("AllowedIPs", [])))
        except ValueError as e:
            raise WireGuardConfigError(file, f"{where}.AllowedIPs", str(e)) from None
        peer_list.append(Peer(
            public_key=str(pub), allowed_ips=allowed,
            endpoint=_parse_endpoint(str(p["Endpoint"]), file, f"{where}.Endpoint") if "Endpoint" in p else None,
            preshared_key=str(p["PresharedKey"]) if "PresharedKey" in p else None,
            persistent_keepalive=_int(p["PersistentKeepalive"], file, f"{where}.PersistentKeepalive")
            if "PersistentKeepalive" in p and str(p["PersistentKeepalive"]) != "off" else None,
        ))
    raw = iface.get("_rawdata", [])
    comment = raw[0] if raw and raw[0].startswith("#") else None
    cfg = TunnelConfig(
        private_key=str(iface["PrivateKey"]), addresses=addresses, peers=tuple(peer_list),
        listen_port=_int(iface["ListenPort"], file, "Interface.ListenPort") if "ListenPort" in iface else None,
        mtu=_int(iface["MTU"], file, "Interface.MTU") if "MTU" in iface else None, table=table,
        fwmark=_int(iface["FwMark"], file, "Interface.FwMark") if "FwMark" in iface and iface["FwMark"] != "off" else None,
        post_up=_hooks(raw, "PostUp"), post_down=_hooks(raw, "PostDown"), comment=comment,
    )
    validate(cfg, file)
    return cfg


def read(path: str | os.PathLike[str]) -> TunnelConfig:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise WireGuardConfigError(path, "", f"cannot read: {e.strerror}") from None
    return parse(text, path)
