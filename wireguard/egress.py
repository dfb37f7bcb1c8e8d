"""Gateway egress: the nftables table that lets the backend send mail (tcp/25) out of the VPS's public address and nothing else.

Rules, in a table of homemx's own (``inet homemx_<tunnel if>``), applied in one ``nft -f``
transaction so there is never a half-loaded policy:
- forward only TCP to destination port 25 from the backend's tunnel address out of the public
  interface, and the replies back (conntrack);
- SNAT it to the public address (the one the PTR record names; RFC 5321 senders are judged by it);
- clamp TCP MSS on the tunnel (its MTU is lower than the internet's; RFC 4459 2.3);
- drop every other packet forwarded from or into the tunnel: the home box cannot use the VPS as a
  general exit, and the internet cannot reach home through it.
The gateway's own sockets (input/output) are not touched: its listeners and its connections to the
backend over the tunnel are unaffected. Another table whose forward chain drops (a host firewall)
still wins: nftables needs every base chain on a hook to accept.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .wgquick import check_ifname, nft_table_name

SMTP_PORT = 25  # RFC 5321 4.5.4: mail to other domains' MXes goes to port 25, and only that may leave
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IP6_FORWARD = Path("/proc/sys/net/ipv6/conf/all/forwarding")


class EgressError(RuntimeError):
    pass


@dataclass(frozen=True)
class EgressPolicy:
    tunnel_if: str
    public_if: str
    public_addr: ipaddress.IPv4Address
    backend_addr: ipaddress.IPv4Address
    public_addr6: ipaddress.IPv6Address | None = None
    backend_addr6: ipaddress.IPv6Address | None = None
    ports: tuple[int, ...] = (SMTP_PORT,)

    def __post_init__(self) -> None:
        check_ifname(self.tunnel_if)
        if not self.public_if or any(c in self.public_if for c in ' "\\;{}') or len(self.public_if) > 15:
            raise EgressError(f"bad public interface name {self.public_if!r}")
        for name in ("public_addr", "backend_addr", "public_addr6", "backend_addr6"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                object.__setattr__(self, name, ipaddress.ip_address(value))
        if (self.public_addr6 is None) != (self.backend_addr6 is None):
            raise EgressError("IPv6 egress needs both the public and the backend IPv6 address")

    @property
    def table(self) -> str:
        return nft_table_name(self.tunnel_if)


def render(policy: EgressPolicy) -> str:
    """The nft script: (re)creates the table atomically. Applying it twice gives the same ruleset."""
    t, tun, pub = policy.table, policy.tunnel_if, policy.public_if
    ports = ", ".join(str(p) for p in policy.ports)
    ports_expr = f"{{ {ports} }}" if len(policy.ports) > 1 else ports
    fwd = [
        # MSS clamp first: these statements do not end evaluation. SYN and SYN/ACK entering the
        # tunnel get MSS = tunnel MTU - 40, so neither side sends segments the tunnel must fragment.
        f'iifname "{tun}" tcp flags syn tcp option maxseg size set rt mtu',
        f'oifname "{tun}" tcp flags syn tcp option maxseg size set rt mtu',
        f'iifname "{tun}" oifname "{pub}" ip saddr {policy.backend_addr} tcp dport {ports_expr} ct state new,established accept',
        f'iifname "{pub}" oifname "{tun}" ip daddr {policy.backend_addr} ct state established,related accept',
    ]
    nat = [f'oifname "{pub}" ip saddr {policy.backend_addr} tcp dport {ports_expr} snat ip to {policy.public_addr}']
    if policy.backend_addr6 is not None:
        fwd += [
            f'iifname "{tun}" oifname "{pub}" ip6 saddr {policy.backend_addr6} tcp dport {ports_expr} ct state new,established accept',
            f'iifname "{pub}" oifname "{tun}" ip6 daddr {policy.backend_addr6} ct state established,related accept',
        ]
        nat.append(f'oifname "{pub}" ip6 saddr {policy.backend_addr6} tcp dport {ports_expr} snat ip6 to {policy.public_addr6}')
    fwd += [
        f'iifname "{tun}" counter drop comment "homemx: the tunnel is not a general exit"',
        f'oifname "{tun}" counter drop comment "homemx: nothing but replies goes into the tunnel"',
    ]
    body = "\n".join(f"    {r}" for r in fwd)
    natbody = "\n".join(f"    {r}" for r in nat)
    # "table X {}" then "delete table X" then the full table, all in one transaction: creates it when
    # absent, replaces it when present (nft 1.0.6 in Debian 12 has no "destroy").
    return (
        f"# homemx gateway egress for tunnel {tun}: written by homemx, applied with nft -f\n"
        f"table inet {t} {{}}\n"
        f"delete table inet {t}\n"
        f"table inet {t} {{\n"
        f"  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{body}\n  }}\n"
        f"  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{natbody}\n  }}\n"
        f"}}\n"
    )


def render_mss_clamp(tunnel_if: str) -> str:
    """The backend's small table: clamp the MSS of SYNs it sends into the tunnel."""
    t = nft_table_name(check_ifname(tunnel_if))
    return (
        f"table inet {t} {{}}\n"
        f"delete table inet {t}\n"
        f"table inet {t} {{\n"
        f"  chain mss_out {{\n    type filter hook output priority mangle; policy accept;\n"
        f'    oifname "{tunnel_if}" tcp flags syn tcp option maxseg size set rt mtu\n  }}\n'
        f"}}\n"
    )


def nft_apply(script: str, nft: str = "nft") -> None:
    """Load an nft script in one transaction (``nft -f -``); raises EgressError with nft's message."""
    r = subprocess.run([nft, "-f", "-"], input=script, text=True, capture_output=True, timeout=30)
    if r.returncode != 0:
        raise EgressError(f"nft -f failed: {r.stderr.strip()}")


def table_exists(table: str, nft: str = "nft") -> bool:
    r = subprocess.run([nft, "list", "table", "inet", table], capture_output=True, text=True, timeout=30)
    return r.returncode == 0


def remove_table(table: str, nft: str = "nft") -> bool:
    """Delete ``inet <table>`` if it exists; returns whether it did. Idempotent."""
    if not table_exists(table, nft):
        return False
    nft_apply(f"table inet {table} {{}}\ndelete table inet {table}\n", nft)
    return True


def write_ruleset(policy: EgressPolicy, path: str | os.PathLike[str]) -> None:
    """Write the script for wg-quick's ``PostUp = nft -f <path>``."""
    Path(path).write_text(render(policy))
    os.chmod(path, 0o644)


def set_forwarding(on: bool, ipv6: bool = False) -> bool:
    """Set IPv4 (or IPv6) forwarding in this network namespace; returns the previous value."""
    path = IP6_FORWARD if ipv6 else IP_FORWARD
    prev = path.read_text().strip() == "1"
    if prev != on:
        path.write_text("1\n" if on else "0\n")
    return prev


def apply(policy: EgressPolicy, nft: str = "nft") -> dict:
    """Turn forwarding on and load the egress table; returns what changed (for a clean removal)."""
    nft_apply(render(policy), nft)
    prev4 = set_forwarding(True)
    prev6 = set_forwarding(True, ipv6=True) if policy.backend_addr6 is not None else None
    return {"nft_table": policy.table, "ip_forward_prev": prev4, "ip6_forward_prev": prev6}


def detect_public(route_to: str = "192.0.2.1") -> tuple[str, ipaddress.IPv4Address]:
    """(interface, address) the default route uses: the VPS's public side when not given explicitly.

    ``route_to`` only selects the route (RFC 5737 documentation address); nothing is sent to it.
    """
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=route_to)
        except Exception as e:  # pyroute2 raises NetlinkError(101) when there is no route at all
            raise EgressError(f"no default route to find the public interface: {e}") from None
        r = routes[0]
        oif = r.get_attr("RTA_OIF")
        src = r.get_attr("RTA_PREFSRC")
        ifname = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
    if not src:
        raise EgressError(f"interface {ifname} has no IPv4 address for the default route")
    return ifname, ipaddress.IPv4Address(src)
