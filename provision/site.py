"""The operator's site file (site.toml): which hosts, which domain, which addresses and where things live on each host.

Frozen dataclasses; unknown keys are errors naming the file, the key and the reason. Every on-host
path is configurable (``root`` prefixes them all) so two "hosts" can share one machine in tests.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath


class SiteError(ValueError):
    def __init__(self, file, key: str, reason: str):
        super().__init__(f"{file}: {key}: {reason}")
        self.file, self.key, self.reason = str(file), key, reason


@dataclass(frozen=True)
class HostLayout:
    """Where homemx lives on one host. ``root`` prefixes every path (``/`` in production)."""

    ssh: str = ""                      # Fabric host string, e.g. root@vps.example.net
    ssh_proxy: str = ""                # optional ProxyCommand (a literal command line: no %h/%p expansion)
    ssh_key: str = ""                  # optional identity file (default: your ssh agent / ~/.ssh keys)
    root: str = "/"
    etc_dir: str = "/etc/homemx"
    data_dir: str = "/var/lib/homemx"
    venv_dir: str = "/opt/homemx/venv"
    unit_dir: str = "/etc/systemd/system"
    user: str = "homemx"
    ifname: str = ""                   # tunnel interface name on this host (default: site.ifname)
    systemctl: bool = True             # False: write units but never call systemctl (tests, containers)
    install_packages: bool = True

    def path(self, p: str) -> str:
        """An absolute path on the host with ``root`` applied."""
        return str(PurePosixPath(self.root) / PurePosixPath(p).relative_to("/"))

    @property
    def etc(self) -> str:
        return self.path(self.etc_dir)

    @property
    def data(self) -> str:
        return self.path(self.data_dir)

    @property
    def venv(self) -> str:
        return self.path(self.venv_dir)

    @property
    def units(self) -> str:
        return self.path(self.unit_dir)


@dataclass(frozen=True)
class Site:
    domain: str
    hostname: str                      # the mail host name: banner, PTR, MX target
    first_user: str
    gateway_public_addr: str           # the VPS address the PTR names; SNAT target
    gateway_public_if: str = "eth0"
    gateway_endpoint: str = ""         # what home dials (default: gateway_public_addr)
    wg_port: int = 51820
    ifname: str = "hmx0"
    gateway_tunnel_addr: str = "10.77.0.1"
    backend_tunnel_addr: str = "10.77.0.2"
    tunnel_prefixlen: int = 24
    userspace_wireguard: bool = False  # force wireguard-go (always used where the kernel has no module)
    smtp_port: int = 25
    submission_port: int = 587
    submissions_port: int = 465
    imaps_port: int = 993
    backend_mx_port: int = 2525
    backend_submission_port: int = 2587
    backend_submissions_port: int = 2465
    backend_imaps_port: int = 993      # Dovecot's haproxy listener on the home box
    greet_wait: str = "6s"
    dkim_selector: str = "hmx"
    tls_cert: str = ""                 # the user's certificate/key on the operator's machine; empty: self-signed
    tls_key: str = ""
    dmarc_rua: str = ""
    gateway: HostLayout = field(default_factory=HostLayout)
    backend: HostLayout = field(default_factory=HostLayout)

    @property
    def endpoint(self) -> str:
        return self.gateway_endpoint or self.gateway_public_addr


_LAYOUT_KEYS = {f.name: f for f in fields(HostLayout)}
_SITE_KEYS = {f.name: f for f in fields(Site) if f.name not in ("gateway", "backend")}


def _typed(file, key: str, value, ftype):
    want = {"str": str, "int": int, "bool": bool}[ftype if isinstance(ftype, str) else ftype.__name__]
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise SiteError(file, key, f"expected {want.__name__}, got {type(value).__name__}")
    return value


def site_from_dict(data: dict, file="site.toml") -> Site:
    """Build a Site from the parsed TOML: top-level [site] keys plus [gateway] and [backend] host tables."""
    kw = {}
    for key, value in data.get("site", {}).items():
        if key not in _SITE_KEYS:
            raise SiteError(file, f"site.{key}", "unknown key")
        kw[key] = _typed(file, f"site.{key}", value, _SITE_KEYS[key].type)
    for table in set(data) - {"site", "gateway", "backend"}:
        raise SiteError(file, table, "unknown table (expected [site], [gateway], [backend])")
    for role in ("gateway", "backend"):
        lk = {}
        for key, value in data.get(role, {}).items():
            if key not in _LAYOUT_KEYS:
                raise SiteError(file, f"{role}.{key}", "unknown key")
            lk[key] = _typed(file, f"{role}.{key}", value, _LAYOUT_KEYS[key].type)
        if not str(lk.get("root", "/")).startswith("/"):
            raise SiteError(file, f"{role}.root", "must be an absolute path")
        kw[role] = HostLayout(**lk)
    for req in ("domain", "hostname", "first_user", "gateway_public_addr"):
        if req not in kw:
            raise SiteError(file, f"site.{req}", "missing (required)")
    for key in ("gateway_public_addr", "gateway_tunnel_addr", "backend_tunnel_addr"):
        if key in kw:
            try:
                ipaddress.IPv4Address(kw[key])
            except ValueError as e:
                raise SiteError(file, f"site.{key}", f"not an IPv4 address ({e})") from None
    if "@" not in kw["first_user"]:
        raise SiteError(file, "site.first_user", "expected an address user@domain")
    return Site(**kw)


def load_site(path: str | Path) -> Site:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SiteError(path, "-", str(e)) from None
    return site_from_dict(data, path)
