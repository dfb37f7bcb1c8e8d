"""Native tunnel bring-up and tear-down: the wg-quick file's meaning applied without wg-quick.

Kernel WireGuard through pyroute2 where the module exists, otherwise wireguard-go configured over
its UAPI socket (cheap OpenVZ/LXC VPSes, containers, these test machines). Addresses, routes and
policy rules go through pyroute2 in both cases; nftables tables through ``nft -f``.

``up`` is idempotent: what already matches is left alone (an unchanged peer keeps its session), and
what it adds is recorded in a state file so that ``down`` removes exactly that and nothing else.
PostUp/PostDown hooks are not run: their homemx meaning (policy rule, MSS clamp, egress table) is
done natively here, and running them as well would add every rule twice.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import egress, keys, uapi
from .wgquick import DEFAULT_MTU, TunnelConfig, check_ifname, nft_table_name

log = logging.getLogger(__name__)

STATE_DIR = Path(os.environ.get("HOMEMX_TUNNEL_STATE_DIR", "/run/homemx/tunnel"))
WIREGUARD_GO = os.environ.get("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
# Debian's wireguard-go refuses to start on Linux without this: we only start it when the kernel
# has no WireGuard module, which is exactly the case it is meant for.
USERSPACE_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
RT_TABLE_MAIN = 254
ROLES = ("gateway", "backend")


class TunnelError(RuntimeError):
    pass


# ---------------------------------------------------------------- devices (kernel / userspace)


def _zero_key_to_none(b64: str | None) -> str | None:
    if not b64 or keys.decode_key(b64) == bytes(32):
        return None
    return b64


def _endpoint_str(ep: tuple[str, int]) -> str:
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UserspaceDevice:
    """A wireguard-go interface, driven over its UAPI socket."""

    implementation = "userspace"

    def __init__(self, ifname: str):
        self.ifname = ifname

    def state(self) -> dict:
        raw = uapi.get(self.ifname)
        priv = keys.from_hex(raw["private_key"]) if raw.get("private_key") else None
        peers = {}
        for p in raw["peers"]:
            pub = keys.from_hex(p["public_key"])
            peers[pub] = {
                "preshared_key": _zero_key_to_none(keys.from_hex(p["preshared_key"])) if p.get("preshared_key") else None,
                "endpoint": p.get("endpoint") or None,
                "persistent_keepalive": int(p.get("persistent_keepalive_interval", 0)),
                "allowed_ips": sorted(p["allowed_ips"]),
                "last_handshake": int(p.get("last_handshake_time_sec", 0)) + int(p.get("last_handshake_time_nsec", 0)) / 1e9,
                "rx_bytes": int(p.get("rx_bytes", 0)),
                "tx_bytes": int(p.get("tx_bytes", 0)),
            }
        return {"private_key": priv, "public_key": keys.public_key(priv) if priv else None,
                "listen_port": int(raw.get("listen_port", 0)), "fwmark": int(raw.get("fwmark", 0)), "peers": peers}

    def apply(self, changes: dict) -> None:
        lines = []
        if "private_key" in changes:
            lines.append(f"private_key={keys.to_hex(changes['private_key'])}")
        if "listen_port" in changes:
            lines.append(f"listen_port={changes['listen_port']}")
        if "fwmark" in changes:
            lines.append(f"fwmark={changes['fwmark']}")
        for pub in changes.get("remove_peers", ()):
            lines += [f"public_key={keys.to_hex(pub)}", "remove=true"]
        for pub, p in changes.get("peers", {}).items():
            lines.append(f"public_key={keys.to_hex(pub)}")
            lines.append(f"preshared_key={keys.to_hex(p['preshared_key']) if p['preshared_key'] else '0' * 64}")
            if p["endpoint"]:
                lines.append(f"endpoint={p['endpoint']}")
            lines.append(f"persistent_keepalive_interval={p['persistent_keepalive']}")
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={a}" for a in p["allowed_ips"]]
        uapi.set_(self.ifname, lines)


class KernelDevice:
    """A kernel WireGuard interface, driven over generic netlink (pyroute2)."""

    implementation = "kernel"

    def __init__(self, ifname: str):
        self.ifname = ifname

    def state(self) -> dict:
        from pyroute2 import WireGuard

        with WireGuard() as wg:
            msgs = list(wg.info(self.ifname))

        def key(v) -> str | None:
            return v.decode() if isinstance(v, bytes) else v

        dev: dict = {"private_key": None, "public_key": None, "listen_port": 0, "fwmark": 0, "peers": {}}
        for m in msgs:  # a device with many peers is split over several messages
            if m.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None:
                dev["private_key"] = _zero_key_to_none(key(m.get_attr("WGDEVICE_A_PRIVATE_KEY")["value"]))
                dev["public_key"] = keys.public_key(dev["private_key"]) if dev["private_key"] else None
            dev["listen_port"] = m.get_attr("WGDEVICE_A_LISTEN_PORT") or dev["listen_port"]
            dev["fwmark"] = m.get_attr("WGDEVICE_A_FWMARK") or dev["fwmark"]
            for p in m.get_attr("WGDEVICE_A_PEERS") or []:
                pub = key(p.get_attr("WGPEER_A_PUBLIC_KEY")["value"])
                psk = p.get_attr("WGPEER_A_PRESHARED_KEY")
                ep = p.get_attr("WGPEER_A_ENDPOINT")
                hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {"tv_sec": 0, "tv_nsec": 0}
                entry = dev["peers"].setdefault(pub, {"allowed_ips": []})
                entry.update({
                    "preshared_key": _zero_key_to_none(key(psk["value"])) if psk else None,
                    "endpoint": _endpoint_str((ep["addr"], ep["port"])) if ep and ep.get("port") else None,
                    "persistent_keepalive": p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                    "last_handshake": hs["tv_sec"] + hs["tv_nsec"] / 1e9,
                    "rx_bytes": p.get_attr("WGPEER_A_RX_BYTES") or 0,
                    "tx_bytes": p.get_attr("WGPEER_A_TX_BYTES") or 0,
                })
                entry["allowed_ips"] = sorted(set(entry["allowed_ips"]) | {
                    a["addr"] for a in (p.get_attr("WGPEER_A_ALLOWEDIPS") or []) if "addr" in a})
        return dev

    def apply(self, changes: dict) -> None:
        from pyroute2 import WireGuard

        with WireGuard() as wg:
            dev_args = {k: changes[k] for k in ("private_key", "listen_port", "fwmark") if k in changes}
            if dev_args:
                wg.set(self.ifname, **dev_args)
            for pub in changes.get("remove_peers", ()):
                wg.set(self.ifname, peer={"public_key": pub, "remove": True})
            for pub, p in changes.get("peers", {}).items():
                peer = {"public_key": pub, "persistent_keepalive": p["persistent_keepalive"],
                        "replace_allowed_ips": True, "allowed_ips": list(p["allowed_ips"])}
                if p["preshared_key"]:
                    peer["preshared_key"] = p["preshared_key"]
                if p["endpoint"]:
                    host, _, port = p["endpoint"].rpartition(":")
                    peer["endpoint_addr"], peer["endpoint_port"] = host.strip("[]"), int(port)
                wg.set(self.ifname, peer=peer)


def open_device(ifname: str) -> UserspaceDevice | KernelDevice | None:
    """The device behind ``ifname``: userspace when a wireguard-go answers on its socket, else kernel."""
    if uapi.alive(ifname):
        return UserspaceDevice(ifname)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        link = ipr.get_links(idx[0])[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return KernelDevice(ifname) if kind == "wireguard" else None


# ---------------------------------------------------------------- desired device state


def _resolve_endpoint(ep: tuple[str, int]) -> str:
    host, port = ep
    try:
        ipaddress.ip_address(host)
        return _endpoint_str((host, port))
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)  # as `wg setconf` does, once
    if not infos:
        raise TunnelError(f"cannot resolve endpoint {host}")
    return _endpoint_str((infos[0][4][0], port))


def desired_device(cfg: TunnelConfig) -> dict:
    peers = {}
    for p in cfg.peers:
        peers[p.public_key] = {
            "preshared_key": p.preshared_key,
            "endpoint": _resolve_endpoint(p.endpoint) if p.endpoint else None,
            "persistent_keepalive": p.persistent_keepalive or 0,
            "allowed_ips": sorted(str(n) for n in p.allowed_ips),
        }
    return {"private_key": cfg.private_key, "listen_port": cfg.listen_port, "fwmark": cfg.fwmark, "peers": peers}


def device_changes(want: dict, have: dict) -> dict:
    """Only what differs: re-setting an unchanged peer is avoided so a live session is never reset."""
    ch: dict = {}
    if want["private_key"] != have.get("private_key"):
        ch["private_key"] = want["private_key"]
    if want["listen_port"] is not None and want["listen_port"] != have.get("listen_port"):
        ch["listen_port"] = want["listen_port"]
    if want["fwmark"] is not None and want["fwmark"] != have.get("fwmark"):
        ch["fwmark"] = want["fwmark"]
    hp = have.get("peers", {})
    ch["remove_peers"] = [pub for pub in hp if pub not in want["peers"]]
    ch["peers"] = {}
    for pub, p in want["peers"].items():
        cur = hp.get(pub)
        if (cur is None or cur["preshared_key"] != p["preshared_key"]
                or cur["persistent_keepalive"] != p["persistent_keepalive"]
                or sorted(cur["allowed_ips"]) != p["allowed_ips"]
                # a peer without a configured endpoint roams: its learned endpoint is not a difference
                or (p["endpoint"] is not None and cur["endpoint"] != p["endpoint"])):
            ch["peers"][pub] = p
    if not ch["remove_peers"]:
        del ch["remove_peers"]
    if not ch["peers"]:
        del ch["peers"]
    return ch


# ---------------------------------------------------------------- state file


def state_path(ifname: str) -> Path:
    return STATE_DIR / f"{ifname}.json"


def load_state(ifname: str) -> dict | None:
    try:
        return json.loads(state_path(ifname).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable tunnel state %s: %s", state_path(ifname), e)
        return None


def _save_state(ifname: str, state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = state_path(ifname).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, state_path(ifname))


# ---------------------------------------------------------------- wireguard-go process


def _is_wireguard_go(pid: int) -> bool:
    try:
        return "wireguard-go" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _wait(pred, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def _start_wireguard_go(ifname: str) -> int:
    sock = uapi.socket_path(ifname)
    if sock.exists():
        if uapi.alive(ifname):
            raise TunnelError(f"{sock} is served by a wireguard-go whose interface is not in this network "
                              f"namespace: interface names must be unique on the host")
        sock.unlink()  # stale, from a wireguard-go that died
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    logfile = STATE_DIR / f"{ifname}.wireguard-go.log"
    env = dict(os.environ, **USERSPACE_ENV)
    with open(logfile, "ab") as out:
        # -f: stay in the foreground so we know its pid; a new session so it outlives this command
        # and a Ctrl-C in the terminal that ran `tunnel up`.
        try:
            proc = subprocess.Popen([WIREGUARD_GO, "-f", ifname], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, env=env, start_new_session=True)
        except FileNotFoundError:
            raise TunnelError(f"no WireGuard kernel module and {WIREGUARD_GO} is not installed") from None

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        return uapi.alive(ifname)

    _wait(ready, START_TIMEOUT)
    if proc.poll() is not None or not uapi.alive(ifname):
        if proc.poll() is None:
            proc.kill()
        tail = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
        raise TunnelError(f"wireguard-go for {ifname} did not come up: {tail.strip()}")
    return proc.pid


def _stop_wireguard_go(ifname: str, pid: int | None) -> None:
    # Deleting the TUN link makes wireguard-go exit by itself; wait for that, then insist.
    if pid and _is_wireguard_go(pid):
        if not _wait(lambda: not _is_wireguard_go(pid), STOP_TIMEOUT / 2):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                if _wait(lambda: not _is_wireguard_go(pid), STOP_TIMEOUT / 2):
                    break
    else:
        _wait(lambda: not uapi.socket_path(ifname).exists(), STOP_TIMEOUT / 2)
    sock = uapi.socket_path(ifname)
    if sock.exists() and not uapi.alive(ifname):
        sock.unlink(missing_ok=True)


# ---------------------------------------------------------------- up / down


@dataclass(frozen=True)
class EgressSpec:
    """Gateway egress parameters not in the wg-quick file (where the VPS meets the internet)."""

    public_if: str | None = None
    public_addr: str | None = None
    public_addr6: str | None = None


def _route_key(dst: str, table: int) -> dict:
    return {"dst": dst, "table": table}


def up(cfg: TunnelConfig, ifname: str, role: str, *, egress_spec: EgressSpec | None = None,
       userspace: bool | None = None) -> dict:
    """Bring the tunnel up (idempotent); returns the state, including what this and earlier calls added."""
    check_ifname(ifname)
    if role not in ROLES:
        raise TunnelError(f"role must be one of {ROLES}, not {role!r}")
    prev = load_state(ifname) or {}
    state = {"ifname": ifname, "role": role, "implementation": prev.get("implementation"),
             "pid": prev.get("pid"), "created_link": prev.get("created_link", False),
             "addresses": prev.get("addresses", []), "routes": prev.get("routes", []),
             "rules": prev.get("rules", []), "nft_table": prev.get("nft_table"),
             "ip_forward_prev": prev.get("ip_forward_prev"), "ip6_forward_prev": prev.get("ip6_forward_prev")}
    if userspace is None:
        userspace = os.environ.get("HOMEMX_WG_USERSPACE", "") in ("1", "true", "yes")
    try:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                made = False
                if not userspace:
                    try:
                        ipr.link("add", ifname=ifname, kind="wireguard")
                        made = True
                        state["implementation"] = "kernel"
                    except NetlinkError as e:
                        # EOPNOTSUPP: no wireguard module (as wg-quick, fall back to userspace).
                        if e.code not in (95, 93, 19):
                            raise
                if not made:
                    state["created_link"] = True
                    _save_state(ifname, state)  # so a failed start is still cleaned by `down`
                    state["pid"] = _start_wireguard_go(ifname)
                    state["implementation"] = "userspace"
                    if not _wait(lambda: bool(ipr.link_lookup(ifname=ifname)), START_TIMEOUT):
                        raise TunnelError(f"wireguard-go started but no {ifname} link appeared")
                state["created_link"] = True
                _save_state(ifname, state)
                idx = ipr.link_lookup(ifname=ifname)
            index = idx[0]
            dev = open_device(ifname)
            if dev is None:
                raise TunnelError(f"{ifname} exists but is not a WireGuard interface")
            state["implementation"] = dev.implementation
            changes = device_changes(desired_device(cfg), dev.state())
            if changes:
                dev.apply(changes)
            ipr.link("set", index=index, mtu=cfg.mtu or DEFAULT_MTU, state="up")

            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
            for a in cfg.addresses:
                if (str(a.ip), a.network.prefixlen) not in have:
                    ipr.addr("add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen)
                    state["addresses"].append(str(a))
            _save_state(ifname, state)

            table = cfg.route_table()
            if table is not None:
                for p in cfg.peers:
                    for net in p.allowed_ips:
                        if _has_route(ipr, index, net, table):
                            continue
                        # scope link: a device route with no gateway, as `ip route add ... dev` makes it
                        ipr.route("add", dst=str(net), oif=index, table=table, scope=253)
                        state["routes"].append(_route_key(str(net), table))
            _save_state(ifname, state)

            for addr, tbl in cfg.policy_rules():
                fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
                if not _find_rules(ipr, fam, str(addr.ip), addr.max_prefixlen, tbl):
                    ipr.rule("add", family=fam, src=str(addr.ip), src_len=addr.max_prefixlen, table=tbl)
                    state["rules"].append({"src": str(addr.ip), "table": tbl})
            _save_state(ifname, state)

        if role == "backend":
            egress.nft_apply(egress.render_mss_clamp(ifname))
            state["nft_table"] = nft_table_name(ifname)
        else:
            policy = gateway_egress_policy(cfg, ifname, egress_spec or EgressSpec())
            changed = egress.apply(policy)
            state["nft_table"] = changed["nft_table"]
            if state["ip_forward_prev"] is None:
                state["ip_forward_prev"] = changed["ip_forward_prev"]
            if state["ip6_forward_prev"] is None:
                state["ip6_forward_prev"] = changed["ip6_forward_prev"]
        _save_state(ifname, state)
    except NetlinkError as e:
        raise TunnelError(f"{ifname}: netlink: {e}") from None
    return state


def gateway_egress_policy(cfg: TunnelConfig, ifname: str, spec: EgressSpec) -> egress.EgressPolicy:
    """Egress policy from the gateway file (the backend peer's host AllowedIPs) plus the public side."""
    backend4 = backend6 = None
    for p in cfg.peers:
        for net in p.allowed_ips:
            if net.version == 4 and net.prefixlen == 32 and backend4 is None:
                backend4 = net.network_address
            if net.version == 6 and net.prefixlen == 128 and backend6 is None:
                backend6 = net.network_address
    if backend4 is None:
        raise TunnelError("gateway config: no peer with a /32 AllowedIPs (the backend's tunnel address)")
    if spec.public_if and spec.public_addr:
        pub_if, pub_addr = spec.public_if, ipaddress.IPv4Address(spec.public_addr)
    else:
        pub_if, pub_addr = egress.detect_public()
        pub_if = spec.public_if or pub_if
        pub_addr = ipaddress.IPv4Address(spec.public_addr) if spec.public_addr else pub_addr
    pub6 = ipaddress.IPv6Address(spec.public_addr6) if spec.public_addr6 else None
    return egress.EgressPolicy(tunnel_if=ifname, public_if=pub_if, public_addr=pub_addr, backend_addr=backend4,
                               public_addr6=pub6, backend_addr6=backend6 if pub6 else None)


def _has_route(ipr, index: int, net, table: int) -> bool:
    fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
    for r in ipr.get_routes(family=fam, table=table):
        if r.get_attr("RTA_TABLE", r.get("table")) != table or r.get_attr("RTA_OIF") != index:
            continue
        dst = r.get_attr("RTA_DST") or ("0.0.0.0" if net.version == 4 else "::")
        have = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
        # As wg-quick: in the main table a route on the device that already covers it is enough
        # (the connected route of the interface address covers the peer's /32).
        if have == net or (table == RT_TABLE_MAIN and net.subnet_of(have)):
            return True
    return False


def _find_rules(ipr, fam: int, src: str, src_len: int, table: int) -> list:
    out = []
    for r in ipr.get_rules(family=fam):
        if (r.get_attr("FRA_SRC") == src and r["src_len"] == src_len
                and (r.get_attr("FRA_TABLE") or r.get("table")) == table):
            out.append(r)
    return out


def down(ifname: str, cfg: TunnelConfig | None = None) -> dict:
    """Remove what ``up`` added (per the state file; derived from ``cfg`` when there is none). Idempotent."""
    check_ifname(ifname)
    state = load_state(ifname)
    removed: dict = {"ifname": ifname, "link": False, "rules": 0, "nft_table": False}
    if state is None:
        # No record (e.g. the state dir was wiped): remove what up would have added for this config.
        state = {"created_link": True, "rules": [], "routes": [], "addresses": [],
                 "nft_table": nft_table_name(ifname), "pid": None}
        if cfg is not None:
            state["rules"] = [{"src": str(a.ip), "table": t} for a, t in cfg.policy_rules()]
    with IPRoute() as ipr:
        for rule in state.get("rules", []):
            fam = socket.AF_INET6 if ":" in rule["src"] else socket.AF_INET
            for r in _find_rules(ipr, fam, rule["src"], 128 if fam == socket.AF_INET6 else 32, rule["table"]):
                ipr.rule("del", family=fam, src=rule["src"], src_len=r["src_len"], table=rule["table"],
                         priority=r.get_attr("FRA_PRIORITY"))
                removed["rules"] += 1
        if state.get("nft_table"):
            removed["nft_table"] = egress.remove_table(state["nft_table"])
        if state.get("ip_forward_prev") is False:
            egress.set_forwarding(False)
        if state.get("ip6_forward_prev") is False:
            egress.set_forwarding(False, ipv6=True)
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            if state.get("created_link", True):
                ipr.link("del", index=idx[0])  # its addresses and routes go with it
                removed["link"] = True
            else:
                for rt in state.get("routes", []):
                    try:
                        ipr.route("del", dst=rt["dst"], oif=idx[0], table=rt["table"])
                    except NetlinkError:
                        pass
                for a in state.get("addresses", []):
                    i = ipaddress.ip_interface(a)
                    try:
                        ipr.addr("del", index=idx[0], address=str(i.ip), prefixlen=i.network.prefixlen)
                    except NetlinkError:
                        pass
    _stop_wireguard_go(ifname, state.get("pid"))
    state_path(ifname).unlink(missing_ok=True)
    return removed
