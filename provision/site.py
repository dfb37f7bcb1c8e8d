"""The operator's site file (site.toml): which hosts, which domains, which addresses and where things live on each host.

Declared as pydantic dataclasses (docs/development.md says why): unknown keys are errors, and every
mistake in the file is reported at once, one ``FILE: KEY: REASON`` line each (``SiteError``). Every
on-host path is configurable (``root`` prefixes them all) so two "hosts" can share one machine in tests.

site.toml is the one place a provisioned pair is configured (docs/operator-guide.md, "Site keys"):
provisioning rewrites backend.toml and gateway.toml from it on every run. The settings a home user
makes are [site] keys; anything else the daemons accept goes in ``[gateway.extra]`` / ``[backend.extra]``,
merged into the rendered files and checked against the daemons' own schemas when the site is loaded
(provision.render.rendered_problems), before anything is built or uploaded.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import ConfigDict, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError, field_validator
from pydantic import dataclasses as pydantic_dataclasses
from pydantic_core import InitErrorDetails, PydanticCustomError

TABLES = ("site", "gateway", "backend")


class SiteError(ValueError):
    """Every problem of one site file; ``str()`` is one ``FILE: KEY: REASON`` line per problem.

    ``key`` and ``reason`` are those of the first problem; ``problems`` lists them all."""

    def __init__(self, file, key: str = "", reason: str = "", problems: list[tuple[str, str]] | None = None):
        self.file = str(file)
        self.problems = problems or [(key, reason)]
        self.key, self.reason = self.problems[0]
        super().__init__("\n".join(self.lines))

    @property
    def lines(self) -> list[str]:
        return [f"{self.file}: {k}: {r}" for k, r in self.problems]


# ---------------------------------------------------------------- pydantic errors → lines
# The daemons' config modules carry the same few lines (gateway/config.py, backend/config/errors.py): the
# top-level packages are fixed and none of them is a neutral home that all three may import.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # TOML 1.0 bare key; anything else is written quoted
_EXPECTED = {"string_type": "str", "bool_type": "bool", "int_type": "int", "dict_type": "a table",
             "dataclass_type": "a table", "dataclass_args_type": "a table", "list_type": "a list",
             "tuple_type": "a list"}


def key_path(loc: tuple[str | int, ...]) -> str:
    """``("gateway", "root")`` → ``gateway.root``; keys that are not bare are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            name = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{name}" if out else name
    return out


def error_reason(err: Any) -> str:
    kind = err["type"]
    if kind == "config":
        return err["ctx"]["reason"]
    if kind in ("value_error", "assertion_error"):
        return str(err["ctx"]["error"])
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "unknown key"
    if kind in ("missing", "missing_argument"):
        return "missing (required)"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {type(err['input']).__name__}"
    return f"{err['msg']}, got {err['input']!r}"


def fail(problems: list[tuple[tuple[str | int, ...], str]]) -> ValidationError:
    """Several checks that span keys, each reported at its own key path."""
    return ValidationError.from_exception_data("config", [
        InitErrorDetails(type=PydanticCustomError("config", "{reason}", {"reason": reason}), loc=loc, input=None)
        for loc, reason in problems])


_TABLE = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- schema


@pydantic_dataclasses.dataclass(frozen=True, config=_TABLE)
class HostLayout:
    """Where homemx lives on one host. ``root`` prefixes every path (``/`` in production)."""

    ssh: StrictStr = ""                      # Fabric host string, e.g. root@vps.example.net
    ssh_proxy: StrictStr = ""                # optional ProxyCommand (a literal command line: no %h/%p expansion)
    ssh_key: StrictStr = ""                  # optional identity file (default: your ssh agent / ~/.ssh keys)
    root: StrictStr = "/"
    etc_dir: StrictStr = "/etc/homemx"
    data_dir: StrictStr = "/var/lib/homemx"
    venv_dir: StrictStr = "/opt/homemx/venv"
    unit_dir: StrictStr = "/etc/systemd/system"
    user: StrictStr = "homemx"
    ifname: StrictStr = ""                   # tunnel interface name on this host (default: site.ifname)
    systemctl: StrictBool = True             # False: write units but never call systemctl (tests, containers)
    install_packages: StrictBool = True
    # [gateway.extra] / [backend.extra]: merged into the rendered gateway.toml / backend.toml (tables
    # key by key, arrays of tables extended, a [[listener]] of a rendered name changes that one);
    # checked against the daemon's own schema when the site is loaded (provision.render).
    extra: dict[StrictStr, Any] = field(default_factory=dict)

    @field_validator("root", "etc_dir", "data_dir", "venv_dir", "unit_dir")
    @classmethod
    def _absolute(cls, p: str) -> str:
        if not p.startswith("/"):
            raise ValueError("must be an absolute path")
        return p

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


@pydantic_dataclasses.dataclass(frozen=True, config=_TABLE)
class Site:
    domain: StrictStr
    hostname: StrictStr                      # the mail host name: banner, PTR, MX target
    first_user: StrictStr
    gateway_public_addr: StrictStr           # the VPS address the PTR names; SNAT target
    gateway_public_if: StrictStr = "eth0"
    gateway_endpoint: StrictStr = ""         # what home dials (default: gateway_public_addr)
    wg_port: StrictInt = 51820
    ifname: StrictStr = "hmx0"
    gateway_tunnel_addr: StrictStr = "10.77.0.1"
    backend_tunnel_addr: StrictStr = "10.77.0.2"
    tunnel_prefixlen: StrictInt = 24
    userspace_wireguard: StrictBool = False  # force wireguard-go (always used where the kernel has no module)
    smtp_port: StrictInt = 25
    submission_port: StrictInt = 587
    submissions_port: StrictInt = 465
    imaps_port: StrictInt = 993
    backend_mx_port: StrictInt = 2525
    backend_submission_port: StrictInt = 2587
    backend_submissions_port: StrictInt = 2465
    backend_imaps_port: StrictInt = 993      # Dovecot's haproxy listener on the home box
    greet_wait: StrictStr = "6s"
    dkim_selector: StrictStr = "hmx"
    tls_cert: StrictStr = ""                 # the user's certificate/key on the operator's machine; empty: self-signed
    tls_key: StrictStr = ""
    dmarc_rua: StrictStr = ""
    rspamd: StrictBool = True                # the spam filter on the home host (docs/inbound-trust.md)
    prometheus_rules_dir: StrictStr = ""     # home host: install homemx-alerts.yml here (docs/monitoring.md); "" = don't
    gateway_metrics_port: StrictInt = 0      # gateway metrics on gateway_tunnel_addr:PORT (0: none)
    backend_metrics_listen: StrictStr = ""   # backend metrics_listen, e.g. "127.0.0.1:9325" ("": none)
    # Certificates by ACME at home (docs/certificates.md), validated through the gateway's 80/443
    # passthrough; false: a self-signed certificate made at home, or tls_cert/tls_key.
    acme: StrictBool = True
    acme_contact: StrictStr = ""             # the CA's expiry mail goes here; default postmaster@<domain>
    acme_directory: StrictStr = ""           # default Let's Encrypt's (backend/config)
    http_port: StrictInt = 80                # the gateway's web ports (ACME http-01, redirects) ...
    https_port: StrictInt = 443              # ... and HTTPS (MTA-STS policy, autoconfig, TLS-ALPN-01)
    backend_http_port: StrictInt = 2080      # the home's web face on the tunnel address
    backend_https_port: StrictInt = 2443
    # What a home user configures beyond the one domain (docs/operator-guide.md, "Site keys"); the
    # values are checked with the backend's own parsers (backend/config/values.py).
    domains: tuple[StrictStr, ...] = ()      # more mail domains (each with its DKIM keys and postmaster@)
    aliases: dict[StrictStr, StrictStr | tuple[StrictStr, ...]] = field(default_factory=dict)
    #                                         "info" (of domain) or "info@other.example" → address(es)
    catch_all: StrictStr = ""                # domain's unknown local parts go to this address ("": refused)
    lan_listen: StrictStr = ""               # a lan listener for homelab apps, e.g. "192.168.1.10:2525"
    lan_trusted_networks: tuple[StrictStr, ...] = ()  # may submit on it without AUTH, e.g. ["192.168.1.0/24"]
    dnsbl_zones: tuple[StrictStr, ...] = ()  # the gateway refuses mx clients these DNSBLs list
    mta_sts_mode: Literal["", "testing", "enforce"] = ""  # publish and serve an MTA-STS policy ("": none)
    smarthost: StrictStr = ""                # relay outbound mail through HOST[:PORT] instead of MX delivery
    smarthost_hostname: StrictStr = ""       # its TLS name when smarthost is an address (backend: smarthost_hostname)
    smarthost_username: StrictStr = ""
    smarthost_password_file: StrictStr = ""  # on the HOME host (you put it there, 0600): never uploaded
    gateway_public_addr6: StrictStr = ""     # the VPS's public IPv6: the gateway listens on [::] too (AAAA)
    gateway: HostLayout = field(default_factory=HostLayout)
    backend: HostLayout = field(default_factory=HostLayout)

    @property
    def endpoint(self) -> str:
        return self.gateway_endpoint or self.gateway_public_addr

    @property
    def contact(self) -> str:
        """The ACME account's contact address."""
        return self.acme_contact or f"postmaster@{self.domain}"

    @field_validator("gateway_public_addr", "gateway_tunnel_addr", "backend_tunnel_addr")
    @classmethod
    def _ipv4(cls, v: str) -> str:
        try:
            ipaddress.IPv4Address(v)
        except ValueError as e:
            raise ValueError(f"not an IPv4 address ({e})") from None
        return v

    @field_validator("first_user")
    @classmethod
    def _address(cls, v: str) -> str:
        if "@" not in v:
            raise ValueError("expected an address user@domain")
        return v

    @property
    def all_domains(self) -> tuple[str, ...]:
        """The mail domains, ``domain`` first."""
        return (self.domain, *(d for d in self.domains if d != self.domain))

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from backend.config.values import parse_domain

        return tuple(parse_domain(d) for d in v)

    @field_validator("catch_all")
    @classmethod
    def _catch_all(cls, v: str) -> str:
        from backend.config.values import _address

        return _address(v) if v else v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: dict) -> dict:
        from backend.config.values import _addresses

        return {name.lower(): _addresses(list(targets) if isinstance(targets, tuple) else targets)
                for name, targets in v.items()}

    @field_validator("lan_listen", "smarthost")
    @classmethod
    def _hostport(cls, v: str, info) -> str:
        from backend.config.values import parse_hostport

        if v:
            # an address literal, as backend.toml wants it (smarthost_hostname names it for TLS)
            port = parse_hostport(v, 587)[1] if info.field_name == "smarthost" else parse_hostport(v)[1]
            if info.field_name == "lan_listen" and port < 1024:
                raise ValueError(f"port {port}: the backend runs unprivileged, use a port above 1023 (e.g. 2525)")
        return v

    @field_validator("lan_trusted_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from backend.config.values import parse_network

        for n in v:
            parse_network(n)
        return v

    @field_validator("dnsbl_zones")
    @classmethod
    def _zones(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from backend.config.values import parse_domain

        return tuple(parse_domain(z) for z in v)

    @field_validator("smarthost_password_file")
    @classmethod
    def _host_file(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError("must be an absolute path on the home host")
        return v

    @field_validator("gateway_public_addr6")
    @classmethod
    def _ipv6(cls, v: str) -> str:
        if v:
            try:
                ipaddress.IPv6Address(v)
            except ValueError as e:
                raise ValueError(f"not an IPv6 address ({e})") from None
        return v

    @field_validator("prometheus_rules_dir")
    @classmethod
    def _rules_dir(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError("must be an absolute path (or empty: no rules installed)")
        return v

    @field_validator("tunnel_prefixlen")
    @classmethod
    def _prefixlen(cls, v: int) -> int:
        if not 0 <= v <= 32:
            raise ValueError(f"expected 0..32, got {v}")
        return v

    def __post_init__(self) -> None:
        """Checks between keys, once each key is valid on its own."""
        problems = []
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append((("tls_key" if self.tls_cert else "tls_cert",), "tls_cert and tls_key must be set together"))
        elif self.tls_cert and self.acme:
            problems.append((("tls_cert",), "your own certificate needs acme = false (ACME would replace it)"))
        if self.acme_contact and "@" not in self.acme_contact:
            problems.append((("acme_contact",), "expected an address user@domain"))
        for name in self.aliases:
            if "@" in name and name.rpartition("@")[2] not in self.all_domains:
                problems.append((("aliases", name), "not in one of our domains (domain, domains)"))
        if self.lan_trusted_networks and not self.lan_listen:
            problems.append((("lan_trusted_networks",), "needs lan_listen (the lan listener they may submit on)"))
        if (self.smarthost_username or self.smarthost_password_file) and not self.smarthost:
            problems.append((("smarthost",), "missing: smarthost_username/smarthost_password_file are set"))
        elif bool(self.smarthost_username) != bool(self.smarthost_password_file):
            problems.append((("smarthost_password_file" if self.smarthost_username else "smarthost_username",),
                             "smarthost_username and smarthost_password_file must be set together"))
        # Both ends take their address with this prefix length: one network, or no route between them.
        tunnel = ipaddress.IPv4Network(f"{self.gateway_tunnel_addr}/{self.tunnel_prefixlen}", strict=False)
        if self.backend_tunnel_addr == self.gateway_tunnel_addr:
            problems.append((("backend_tunnel_addr",), "must differ from gateway_tunnel_addr"))
        elif ipaddress.IPv4Address(self.backend_tunnel_addr) not in tunnel:
            problems.append((("backend_tunnel_addr",), f"not in the tunnel network {tunnel} "
                             "(gateway_tunnel_addr/tunnel_prefixlen)"))
        if problems:
            raise fail(problems)


_SITE = TypeAdapter(Site)


def _site_key(loc: tuple[str | int, ...]) -> str:
    """Site's own fields live in the [site] table; its host layouts are the [gateway] and [backend] tables."""
    return key_path(loc if loc and loc[0] in ("gateway", "backend") else ("site", *loc))


def site_from_dict(data: dict, file="site.toml") -> Site:
    """Build a Site from the parsed TOML: top-level [site] keys plus [gateway] and [backend] host tables.
    Raises SiteError listing every problem of the file, including those of the gateway.toml and
    backend.toml it renders (checked by the daemons' own schemas)."""
    problems = [(table, "unknown table (expected [site], [gateway], [backend])") for table in data if table not in TABLES]
    site_table = data.get("site", {})
    if not isinstance(site_table, dict):
        problems.append(("site", f"expected a table, got {type(site_table).__name__}"))
        site_table = {}
    kw = {}
    for key, value in site_table.items():
        if key in ("gateway", "backend"):  # host tables are top-level tables, not keys of [site]
            problems.append((f"site.{key}", "unknown key"))
        else:
            kw[key] = value
    kw.update({role: data[role] for role in ("gateway", "backend") if role in data})
    site = None
    try:
        site = _SITE.validate_python(kw)
    except ValidationError as e:
        problems[:0] = [(_site_key(err["loc"]), error_reason(err)) for err in e.errors(include_url=False)]
    if site is not None and not problems:
        from provision.render import rendered_problems  # render imports this module

        problems += rendered_problems(site)
    if problems:
        raise SiteError(file, problems=problems)
    return site


# Files on the operator's machine that the site file names: a relative path is relative to the site
# file's directory (not to wherever `fab` was started), as in the daemons' own config files.
OPERATOR_FILES = (("site", "tls_cert"), ("site", "tls_key"), ("gateway", "ssh_key"), ("backend", "ssh_key"))


def load_site(path: str | Path) -> Site:
    """Read and check a site file; relative operator-side paths resolved against its directory, and
    the certificate files it names readable."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SiteError(path, "-", str(e)) from None
    base = Path(path).resolve().parent
    for table, key in OPERATOR_FILES:
        t = data.get(table)
        if isinstance(t, dict) and isinstance(t.get(key), str) and t[key]:
            t[key] = str(base / Path(t[key]).expanduser())  # an absolute path stays as it is
    site = site_from_dict(data, path)
    problems = []
    for key in ("tls_cert", "tls_key"):
        if value := getattr(site, key):
            try:
                Path(value).open("rb").close()
            except OSError as e:
                problems.append((f"site.{key}", f"cannot read {value}: {e.strerror}"))
    if problems:
        raise SiteError(path, problems=problems)
    return site
