"""Gateway configuration: one TOML file loaded into frozen dataclasses and validated before any socket binds.

Every error names the file, the key and the reason (``ConfigError``); unknown keys are errors, so a
typo never silently falls back to a default on the machine the internet talks to.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LISTENER_KINDS = ("smtp", "tcp")
SUBMISSION_PORTS = (465, 587)  # RFC 8314 (465, implicit TLS) and RFC 6409 (587)
MX_PORT = 25

DEFAULT_GREET_WAIT = 6.0  # Postfix postscreen_greet_wait default
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_BANNER_TIMEOUT = 30.0
# RFC 5321 4.5.3.2: a server waits 5 min for a command; the backend's listener timeout is exactly
# that and it then replies 421 4.4.2 and closes. The gateway waits 30 s longer so that 421 (not a
# silent cut by the gateway) is what an idle client reads: the backend's timer starts when it wrote
# its last reply, ours when that reply crossed the tunnel, and the 421 must cross it too.
DEFAULT_SMTP_IDLE = 330.0
DEFAULT_SMTP_SESSION = 3600.0
DEFAULT_TCP_IDLE = 1800.0  # RFC 2177: IMAP IDLE re-issued at least every 29 min
DEFAULT_TCP_SESSION = 86400.0
DEFAULT_BUFFER = 16384


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
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"4h"``, ``"1d"`` or ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 4h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 30s, 5m or 4h, got {value!r}")


def parse_hostport(value: Any) -> tuple[str, int]:
    """``"127.0.0.1:25"``, ``"[::1]:25"`` → (host, port). The host must be an IP address literal:
    the gateway never resolves names at start (a DNS outage must not keep it from listening)."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected ADDRESS:PORT such as 0.0.0.0:25 or [::]:25")
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or not value[end + 1 :].startswith(":"):
            raise ValueError(f"expected [IPv6]:PORT, got {value!r}")
        host, port_s = value[1:end], value[end + 2 :]
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    else:
        raise ValueError(f"expected ADDRESS:PORT (IPv6 in brackets), got {value!r}")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad port {port_s!r} in {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, int(port_s)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def _positive_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError(f"expected a positive number, got {v!r}")
    return float(v)


def _choice(*choices: str):
    def parse(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
        return v

    return parse


def _ip(v: Any) -> str:
    try:
        return str(ipaddress.ip_address(_str(v)))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


def _list(item_parse):
    def parse(v: Any) -> tuple:
        if not isinstance(v, list):
            raise ValueError(f"expected a list, got {v!r}")
        return tuple(item_parse(x) for x in v)

    return parse


def _hostports(v: Any) -> tuple[tuple[str, int], ...]:
    """One ``ADDRESS:PORT`` or a list of them (an IPv4 and an IPv6 bind for one service)."""
    items = _list(parse_hostport)(v) if isinstance(v, list) else (parse_hostport(v),)
    if not items:
        raise ValueError("expected at least one ADDRESS:PORT")
    return items


_HOST_RE = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


def _hostname(v: Any) -> str:
    v = _str(v).lower()
    if not _HOST_RE.match(v):
        raise ValueError(f"expected a host name such as mx.example.org, got {v!r}")
    return v


def _zone(v: Any) -> str:
    v = _hostname(_str(v).rstrip("."))
    if "." not in v:
        raise ValueError(f"expected a DNSBL zone such as zen.spamhaus.org, got {v!r}")
    return v


# ---------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class ServerConfig:
    hostname: str  # the public name in every reply the gateway writes itself (421/554)
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None  # Prometheus text over HTTP; the tunnel address
    tunnel_interface: str | None = None  # WireGuard interface whose handshake age is exported
    shutdown_grace: float = 30.0  # SIGTERM: sessions get this long to finish before being cut


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = 1000  # all listeners together
    max_per_client: int = 20  # concurrent, per IPv4 /32 or IPv6 /64, per listener
    rate: float = 2.0  # new connections per second per client (token refill), per listener
    burst: int = 30  # token bucket size
    tracked_clients: int = 100_000  # bound on per-client state kept in memory


@dataclass(frozen=True)
class DnsblConfig:
    zones: tuple[str, ...] = ()
    nameservers: tuple[str, ...] = ()  # empty: /etc/resolv.conf
    port: int = 53
    timeout: float = 2.0
    cache_ttl: float = 600.0
    cache_size: int = 10_000


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    kind: str  # smtp | tcp
    listen: tuple[tuple[str, int], ...]
    upstream: tuple[str, int]
    proxy_v2: bool = True
    submission: bool = False  # 465/587: no greet wait, no DNSBL (authenticated users, roaming IPs)
    implicit_tls: bool = False  # 465: the client speaks first (TLS ClientHello) → refusals just close
    greet_wait: float = 0.0  # seconds the client must stay silent before the banner is relayed
    dnsbl: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    banner_timeout: float = DEFAULT_BANNER_TIMEOUT
    idle_timeout: float = DEFAULT_SMTP_IDLE
    session_timeout: float = DEFAULT_SMTP_SESSION
    buffer_size: int = DEFAULT_BUFFER
    max_per_client: int = 20
    rate: float = 2.0
    burst: int = 30

    @property
    def speaks_smtp_replies(self) -> bool:
        """Whether the gateway may write its own SMTP replies (421/554) to this listener's clients."""
        return self.kind == "smtp" and not self.implicit_tls


@dataclass(frozen=True)
class GatewayConfig:
    path: Path
    server: ServerConfig
    limits: LimitsConfig
    dnsbl: DnsblConfig
    listeners: tuple[ListenerConfig, ...]


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

    def has(self, name: str) -> bool:
        return name in self.table

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


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Load and validate a gateway TOML file. Raises ConfigError naming file, key and reason."""
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


def config_from_dict(raw: dict, path: Path) -> GatewayConfig:
    """Validate an already-parsed TOML document (tests build configs this way)."""
    top = _Section(path, "", raw)

    s = top.sub("server")
    server = ServerConfig(
        hostname=s.get("hostname", _hostname, required=True),
        log_level=s.get("log_level", _choice("debug", "info", "warning", "error"), "info"),
        metrics_listen=s.get("metrics_listen", parse_hostport),
        tunnel_interface=s.get("tunnel_interface", _str),
        shutdown_grace=s.get("shutdown_grace", parse_duration, 30.0),
    )
    s.finish()

    lm = top.sub("limits")
    limits = LimitsConfig(
        max_connections=lm.get("max_connections", _positive_int, 1000),
        max_per_client=lm.get("max_per_client", _positive_int, 20),
        rate=lm.get("rate", _positive_number, 2.0),
        burst=lm.get("burst", _positive_int, 30),
        tracked_clients=lm.get("tracked_clients", _positive_int, 100_000),
    )
    lm.finish()

    d = top.sub("dnsbl")
    dnsbl = DnsblConfig(
        zones=d.get("zones", _list(_zone), ()),
        nameservers=d.get("nameservers", _list(_ip), ()),
        port=d.get("port", _positive_int, 53),
        timeout=d.get("timeout", parse_duration, 2.0),
        cache_ttl=d.get("cache_ttl", parse_duration, 600.0),
        cache_size=d.get("cache_size", _positive_int, 10_000),
    )
    d.finish()

    top.seen.add("listener")
    raw_listeners = raw.get("listener", [])
    if not isinstance(raw_listeners, list) or not raw_listeners:
        raise ConfigError(path, "listener", "at least one [[listener]] table is required")
    listeners = []
    names: set[str] = set()
    binds: dict[tuple[str, int], str] = {}
    for i, lt in enumerate(raw_listeners):
        ls = _Section(path, f"listener[{i}]", lt)
        name = ls.get("name", _str, required=True)
        if name in names:
            raise ls.error("name", f"duplicate listener name {name!r}")
        names.add(name)
        kind = ls.get("kind", _choice(*LISTENER_KINDS), required=True)
        listen = ls.get("listen", _hostports, required=True)
        for hp in listen:
            if hp[1] != 0 and hp in binds:
                raise ls.error("listen", f"{hp[0]}:{hp[1]} is already used by listener {binds[hp]!r}")
            binds[hp] = name
        ports = {p for _, p in listen}
        smtp = kind == "smtp"
        submission = ls.get("submission", _bool, smtp and bool(ports & set(SUBMISSION_PORTS)))
        implicit_tls = ls.get("implicit_tls", _bool, smtp and 465 in ports)
        mx = smtp and not submission and not implicit_tls
        greet_default = DEFAULT_GREET_WAIT if (mx and MX_PORT in ports) else 0.0
        lc = ListenerConfig(
            name=name,
            kind=kind,
            listen=listen,
            upstream=ls.get("upstream", parse_hostport, required=True),
            proxy_v2=ls.get("proxy_v2", _bool, True),
            submission=submission,
            implicit_tls=implicit_tls,
            greet_wait=ls.get("greet_wait", parse_duration, greet_default),
            dnsbl=ls.get("dnsbl", _bool, False),
            connect_timeout=ls.get("connect_timeout", parse_duration, DEFAULT_CONNECT_TIMEOUT),
            banner_timeout=ls.get("banner_timeout", parse_duration, DEFAULT_BANNER_TIMEOUT),
            idle_timeout=ls.get("idle_timeout", parse_duration, DEFAULT_SMTP_IDLE if smtp else DEFAULT_TCP_IDLE),
            session_timeout=ls.get(
                "session_timeout", parse_duration, DEFAULT_SMTP_SESSION if smtp else DEFAULT_TCP_SESSION
            ),
            buffer_size=ls.get("buffer_size", _positive_int, DEFAULT_BUFFER),
            max_per_client=ls.get("max_per_client", _positive_int, limits.max_per_client),
            rate=ls.get("rate", _positive_number, limits.rate),
            burst=ls.get("burst", _positive_int, limits.burst),
        )
        if lc.upstream[1] == 0:
            raise ls.error("upstream", "port 0 is not a destination")
        if kind == "tcp":
            for key in ("submission", "implicit_tls", "greet_wait", "dnsbl", "banner_timeout"):
                if ls.has(key):
                    raise ls.error(key, "only meaningful on kind = \"smtp\" listeners")
        if lc.greet_wait > 0 and not mx:
            # A submission client on 465 speaks first (TLS ClientHello): a greet wait would reject
            # every one of them; on 587 it only delays people who authenticate anyway.
            raise ls.error("greet_wait", "early-talker detection is only for MX listeners (not submission or implicit TLS)")
        if lc.dnsbl and not mx:
            raise ls.error("dnsbl", "DNSBL checks are never applied to submission ports (roaming users on listed IPs)")
        if lc.dnsbl and not dnsbl.zones:
            raise ls.error("dnsbl", "dnsbl = true needs [dnsbl] zones")
        if lc.buffer_size < 512:
            raise ls.error("buffer_size", "must be at least 512 bytes")
        for key in ("connect_timeout", "banner_timeout", "idle_timeout", "session_timeout"):
            if getattr(lc, key) <= 0:
                raise ls.error(key, "must be greater than zero")
        listeners.append(lc)
        ls.finish()

    top.finish()
    return GatewayConfig(path=path, server=server, limits=limits, dnsbl=dnsbl, listeners=tuple(listeners))
