"""Backend configuration: one TOML file loaded into frozen dataclasses and validated before any socket binds.

Every error names the file, the key and the reason (``ConfigError``), and unknown keys are errors:
a typo must never silently fall back to a default on a mail server.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LISTENER_KINDS = ("mx", "submission", "submissions", "lan")
TLS_POLICIES = ("opportunistic", "required")
DKIM_ALGORITHMS = ("rsa", "ed25519")

# RFC 5321 4.5.4.1: retry no sooner than 30 min is the classic advice; like mox and Postfix we start
# sooner (most 4xx are greylisting) and grow, then give up after 5 days.
DEFAULT_RETRY_SCHEDULE = (300, 900, 1800, 3600, 7200, 14400, 28800)
DEFAULT_MAX_QUEUE_AGE = 5 * 86400


class ConfigError(Exception):
    """A configuration problem, rendered as one line: ``FILE: KEY: REASON``."""

    def __init__(self, file: str | os.PathLike[str], key: str, reason: str):
        self.file = str(file)
        self.key = key
        self.reason = reason
        super().__init__(f"{self.file}: {key}: {reason}" if key else f"{self.file}: {reason}")


# ---------------------------------------------------------------- value parsers (pure)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"`` or ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 4h or 5d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 30s, 5m, 4h or 5d, got {value!r}")


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from ``1048576``, ``"25MB"``, ``"25M"``, ``"512KiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
            mult = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]
            return int(m.group(1)) * mult
    raise ValueError(f"expected a size such as 25MB or 1048576, got {value!r}")


def parse_hostport(value: Any, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:25"``, ``"[::1]:25"`` → (host, port). The host must be an IP address literal."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected ADDRESS:PORT such as 127.0.0.1:2525 or [::1]:2525")
    host, port_s = value, None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {value!r}")
        host = value[1:end]
        rest = value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':PORT' after ']' in {value!r}")
            port_s = rest[1:]
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    if port_s is None:
        if default_port is None:
            raise ValueError(f"missing port in {value!r}")
        port = default_port
    else:
        if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
            raise ValueError(f"bad port {port_s!r} in {value!r}")
        port = int(port_s)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, port


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f"expected a network such as 192.168.1.0/24, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as e:
        raise ValueError(f"bad network {value!r}: {e}") from None


_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")


def parse_domain(value: Any) -> str:
    if not isinstance(value, str) or not _DOMAIN_RE.match(value.lower().rstrip(".")) or value.endswith("."):
        raise ValueError(f"expected a domain name such as example.org, got {value!r}")
    return value.lower()


# ---------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class ServerConfig:
    hostname: str  # public name: banner, EHLO, Received, Reporting-MTA
    data_dir: Path  # queue database, spool, Maildirs (unless maildir_root is set)
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class TLSConfig:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    kind: str  # one of LISTENER_KINDS
    listen: tuple[str, int]
    proxy_protocol: bool = False  # expect a PROXY v2 header (mx behind the gateway)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # lan: submit without AUTH
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_received_headers: int = 30  # loop detection (Postfix hopcount_limit is 50, mox uses 50)
    # RFC 5321 4.5.3.2 gives 5 min for commands and 10 min for the DATA terminator; we apply one
    # idle timeout per read, which covers both orders of magnitude.
    timeout: float = 300.0
    auth_max_failures: int = 10  # per real client address per auth_failure_window
    auth_failure_window: float = 60.0
    auth_failure_delay: float = 1.0  # after the n-th failure in the window, wait n × this before replying (≤ 10 s)


@dataclass(frozen=True)
class DomainConfig:
    name: str
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # local part → target addresses
    catch_all: str | None = None  # address that receives mail for unknown local parts


@dataclass(frozen=True)
class DKIMKeyConfig:
    domain: str
    selector: str
    algorithm: str  # rsa | ed25519
    private_key: Path


@dataclass(frozen=True)
class DeliveryConfig:
    source_address: str | None = None  # bind outbound sockets here (the tunnel address)
    nameservers: tuple[str, ...] = ()  # empty: /etc/resolv.conf
    dns_port: int = 53
    tls_policy: str = "opportunistic"
    domain_tls_policy: dict[str, str] = field(default_factory=dict)
    mta_sts: bool = True
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    max_queue_age: float = DEFAULT_MAX_QUEUE_AGE
    delay_notice_after: float | None = None  # send a "delayed" DSN once, after this long; None: never
    keep_final: float = 86400.0  # how long delivered/bounced entries stay visible in `queue list`
    concurrency: int = 20
    per_destination_concurrency: int = 4
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    remote_port: int = 25  # tests point this at a non-privileged port
    paused: bool = False  # maintenance: accept and queue, attempt no remote delivery (Postfix: defer_transports)
    smarthost: tuple[str, int] | None = None
    smarthost_hostname: str | None = None  # TLS server name of the smarthost (defaults to its address)
    smarthost_domains: tuple[str, ...] = ()  # empty: every domain
    smarthost_username: str | None = None
    smarthost_password_file: Path | None = None
    # "implicit": TLS from the first byte (RFC 8314 3.3, port 465); "starttls": RFC 3207 upgrade.
    # Default: implicit on port 465, STARTTLS on any other port.
    smarthost_tls: str = "starttls"


@dataclass(frozen=True)
class GatewayInfo:
    """What the backend knows about its gateway, for DNS records and the DNS check."""

    public_ipv4: tuple[str, ...] = ()
    public_ipv6: tuple[str, ...] = ()


@dataclass(frozen=True)
class DNSConfig:
    dmarc_rua: str | None = None
    dmarc_policy: str = "quarantine"
    mta_sts_mode: str | None = None  # None (disabled), testing, enforce
    mta_sts_id: str | None = None
    tlsrpt_rua: str | None = None


@dataclass(frozen=True)
class BackendConfig:
    path: Path
    server: ServerConfig
    tls: TLSConfig
    listeners: tuple[ListenerConfig, ...]
    domains: dict[str, DomainConfig]
    passwd_file: Path
    maildir_root: Path  # mailbox of user@domain is maildir_root/domain/user/Maildir
    dkim: tuple[DKIMKeyConfig, ...]
    delivery: DeliveryConfig
    gateway: GatewayInfo
    dns: DNSConfig

    @property
    def queue_db(self) -> Path:
        return self.server.data_dir / "queue.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.server.data_dir / "spool"

    def maildir_for(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.maildir_root / domain.lower() / local.lower() / "Maildir"


# ---------------------------------------------------------------- loader


class _Section:
    """A TOML table being read: tracks which keys were consumed so unknown keys can be reported."""

    def __init__(self, file: Path, prefix: str, table: Any):
        self.file = file
        self.prefix = prefix
        if not isinstance(table, dict):
            raise ConfigError(file, prefix, f"expected a table, got {type(table).__name__}")
        self.table = table
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), reason)

    def get(self, name: str, parse=None, default: Any = None, required: bool = False) -> Any:
        self.seen.add(name)
        if name not in self.table:
            if required:
                raise self.error(name, "missing (required)")
            return default
        value = self.table[name]
        if parse is None:
            return value
        try:
            return parse(value)
        except (ValueError, TypeError) as e:
            raise self.error(name, str(e)) from None

    def sub(self, name: str) -> "_Section":
        self.seen.add(name)
        return _Section(self.file, self.key(name), self.table.get(name, {}))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _positive_int(v: Any) -> int:
    v = _int(v)
    if v <= 0:
        raise ValueError(f"expected a positive integer, got {v}")
    return v


def _choice(*choices: str):
    def parse(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
        return v

    return parse


def _list(item_parse):
    def parse(v: Any) -> tuple:
        if not isinstance(v, list):
            raise ValueError(f"expected a list, got {v!r}")
        return tuple(item_parse(x) for x in v)

    return parse


def _ip(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected an IP address, got {v!r}")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


def _address(v: Any) -> str:
    v = _str(v)
    local, at, domain = v.rpartition("@")
    if not at or not local:
        raise ValueError(f"expected an address such as user@example.org, got {v!r}")
    parse_domain(domain)
    return v.lower()


def _path_relative_to(base: Path):
    def parse(v: Any) -> Path:
        p = Path(_str(v)).expanduser()
        return p if p.is_absolute() else (base / p)

    return parse


def _readable_file(sec: _Section, name: str, p: Path | None) -> None:
    if p is None:
        return
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise sec.error(name, f"cannot read {p}: {e.strerror}") from None


def load_config(path: str | os.PathLike[str]) -> BackendConfig:
    """Load and validate a backend TOML file. Raises ConfigError naming file, key and reason."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8: {e}") from None
    return config_from_dict(raw, path)


def config_from_dict(raw: dict, path: Path) -> BackendConfig:
    base = path.parent.resolve()
    rel = _path_relative_to(base)
    top = _Section(path, "", raw)

    s = top.sub("server")
    hostname = s.get("hostname", lambda v: parse_domain(_str(v)), required=True)
    data_dir = s.get("data_dir", rel, required=True)
    server = ServerConfig(
        hostname=hostname,
        data_dir=data_dir,
        log_level=s.get("log_level", _choice("debug", "info", "warning", "error"), "info"),
        metrics_listen=s.get("metrics_listen", parse_hostport),
    )
    s.finish()

    t = top.sub("tls")
    tls = TLSConfig(cert=t.get("cert", rel), key=t.get("key", rel))
    if (tls.cert is None) != (tls.key is None):
        raise t.error("cert" if tls.cert is None else "key", "tls.cert and tls.key must be set together")
    _readable_file(t, "cert", tls.cert)
    _readable_file(t, "key", tls.key)
    if tls.cert is not None:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
        except (ssl.SSLError, OSError) as e:
            raise t.error("key", f"certificate {tls.cert} and key {tls.key} do not load together: {e}") from None
    t.finish()

    top.seen.add("listener")
    raw_listeners = raw.get("listener", [])
    if not isinstance(raw_listeners, list) or not raw_listeners:
        raise ConfigError(path, "listener", "at least one [[listener]] table is required")
    listeners = []
    names = set()
    for i, lt in enumerate(raw_listeners):
        ls = _Section(path, f"listener[{i}]", lt)
        name = ls.get("name", _str, required=True)
        if name in names:
            raise ls.error("name", f"duplicate listener name {name!r}")
        names.add(name)
        kind = ls.get("kind", _choice(*LISTENER_KINDS), required=True)
        lc = ListenerConfig(
            name=name,
            kind=kind,
            listen=ls.get("listen", parse_hostport, required=True),
            proxy_protocol=ls.get("proxy_protocol", _bool, False),
            trusted_proxies=ls.get("trusted_proxies", _list(parse_network), ()),
            trusted_networks=ls.get("trusted_networks", _list(parse_network), ()),
            max_message_size=ls.get("max_message_size", parse_size, 50 * 1024 * 1024),
            max_recipients=ls.get("max_recipients", _positive_int, 100),
            max_received_headers=ls.get("max_received_headers", _positive_int, 30),
            timeout=ls.get("timeout", parse_duration, 300.0),
            auth_max_failures=ls.get("auth_max_failures", _positive_int, 10),
            auth_failure_window=ls.get("auth_failure_window", parse_duration, 60.0),
            auth_failure_delay=ls.get("auth_failure_delay", parse_duration, 1.0),
        )
        if lc.proxy_protocol and not lc.trusted_proxies:
            raise ls.error("trusted_proxies", "proxy_protocol = true needs at least one trusted proxy address")
        if kind in ("submission", "submissions") and lc.trusted_networks:
            raise ls.error("trusted_networks", f"not allowed on a {kind} listener: AUTH is always required there")
        if kind in ("submissions", "submission", "mx") and tls.cert is None:
            raise ls.error("kind", f"a {kind} listener needs [tls] cert and key")
        listeners.append(lc)
        ls.finish()

    top.seen.add("domain")
    raw_domains = raw.get("domain", {})
    if not isinstance(raw_domains, dict) or not raw_domains:
        raise ConfigError(path, "domain", 'at least one [domain."example.org"] table is required')
    domains = {}
    for dname, dt in raw_domains.items():
        ds = _Section(path, f'domain."{dname}"', dt)
        try:
            name = parse_domain(dname)
        except ValueError as e:
            raise ConfigError(path, f'domain."{dname}"', str(e)) from None
        aliases_raw = ds.get("aliases", None, {})
        if not isinstance(aliases_raw, dict):
            raise ds.error("aliases", "expected a table of local-part = [addresses]")
        aliases = {}
        for local, targets in aliases_raw.items():
            if isinstance(targets, str):
                targets = [targets]
            try:
                aliases[local.lower()] = _list(_address)(targets)
            except ValueError as e:
                raise ds.error(f"aliases.{local}", str(e)) from None
        domains[name] = DomainConfig(name=name, aliases=aliases, catch_all=ds.get("catch_all", _address))
        ds.finish()

    u = top.sub("users")
    passwd_file = u.get("passwd_file", rel, required=True)
    maildir_root = u.get("maildir_root", rel, data_dir / "mail")
    u.finish()

    top.seen.add("dkim")
    dkim_raw = raw.get("dkim", [])
    if not isinstance(dkim_raw, list):
        raise ConfigError(path, "dkim", "expected [[dkim]] tables")
    dkim_keys = []
    for i, kt in enumerate(dkim_raw):
        ks = _Section(path, f"dkim[{i}]", kt)
        key = DKIMKeyConfig(
            domain=ks.get("domain", lambda v: parse_domain(_str(v)), required=True),
            selector=ks.get("selector", _str, required=True),
            algorithm=ks.get("algorithm", _choice(*DKIM_ALGORITHMS), required=True),
            private_key=ks.get("private_key", rel, required=True),
        )
        _readable_file(ks, "private_key", key.private_key)
        dkim_keys.append(key)
        ks.finish()

    d = top.sub("delivery")
    schedule = d.get("retry_schedule", _list(parse_duration), DEFAULT_RETRY_SCHEDULE)
    if not schedule:
        raise d.error("retry_schedule", "must list at least one interval")
    domain_tls = d.get("domain_tls_policy", None, {})
    if not isinstance(domain_tls, dict):
        raise d.error("domain_tls_policy", "expected a table of domain = policy")
    for k, v in domain_tls.items():
        if v not in TLS_POLICIES:
            raise d.error(f"domain_tls_policy.{k}", f"expected one of {', '.join(TLS_POLICIES)}, got {v!r}")
    smarthost = d.get("smarthost", lambda v: parse_hostport(v, 587))
    delivery = DeliveryConfig(
        source_address=d.get("source_address", _ip),
        nameservers=d.get("nameservers", _list(_ip), ()),
        dns_port=d.get("dns_port", _positive_int, 53),
        tls_policy=d.get("tls_policy", _choice(*TLS_POLICIES), "opportunistic"),
        domain_tls_policy={k.lower(): v for k, v in domain_tls.items()},
        mta_sts=d.get("mta_sts", _bool, True),
        retry_schedule=schedule,
        max_queue_age=d.get("max_queue_age", parse_duration, DEFAULT_MAX_QUEUE_AGE),
        delay_notice_after=d.get("delay_notice_after", parse_duration),
        keep_final=d.get("keep_final", parse_duration, 86400.0),
        concurrency=d.get("concurrency", _positive_int, 20),
        per_destination_concurrency=d.get("per_destination_concurrency", _positive_int, 4),
        connect_timeout=d.get("connect_timeout", parse_duration, 30.0),
        command_timeout=d.get("command_timeout", parse_duration, 300.0),
        remote_port=d.get("remote_port", _positive_int, 25),
        paused=d.get("paused", _bool, False),
        smarthost=smarthost,
        smarthost_hostname=d.get("smarthost_hostname", _str),
        smarthost_domains=d.get("smarthost_domains", _list(lambda v: parse_domain(_str(v))), ()),
        smarthost_username=d.get("smarthost_username", _str),
        smarthost_password_file=d.get("smarthost_password_file", rel),
        smarthost_tls=d.get(
            "smarthost_tls", _choice("implicit", "starttls"), "implicit" if smarthost and smarthost[1] == 465 else "starttls"
        ),
    )
    _readable_file(d, "smarthost_password_file", delivery.smarthost_password_file)
    d.finish()

    g = top.sub("gateway")
    gateway = GatewayInfo(
        public_ipv4=g.get("public_ipv4", _list(_ip), ()),
        public_ipv6=g.get("public_ipv6", _list(_ip), ()),
    )
    g.finish()

    n = top.sub("dns")
    dns = DNSConfig(
        dmarc_rua=n.get("dmarc_rua", _address),
        dmarc_policy=n.get("dmarc_policy", _choice("none", "quarantine", "reject"), "quarantine"),
        mta_sts_mode=n.get("mta_sts_mode", _choice("testing", "enforce")),
        mta_sts_id=n.get("mta_sts_id", _str),
        tlsrpt_rua=n.get("tlsrpt_rua", _str),
    )
    n.finish()

    top.finish()
    return BackendConfig(
        path=path,
        server=server,
        tls=tls,
        listeners=tuple(listeners),
        domains=domains,
        passwd_file=passwd_file,
        maildir_root=maildir_root,
        dkim=tuple(dkim_keys),
        delivery=delivery,
        gateway=gateway,
        dns=dns,
    )
