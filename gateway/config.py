"""Gateway configuration: the schema of ``gateway.toml``, validated as a whole before any socket binds.

The schema is declared on pydantic (docs/development.md says why): each ``[table]`` is a frozen model,
unknown keys are errors (a typo never silently falls back to a default on the machine the internet
talks to), and every mistake in the file is reported at once, one ``FILE: KEY: REASON`` line each
(``ConfigError``). Checks that involve several keys run at load too.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

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
SMTP_ONLY_KEYS = ("submission", "implicit_tls", "greet_wait", "dnsbl", "banner_timeout")


class ConfigError(Exception):
    """Every problem of one configuration file; ``str()`` is one ``FILE: KEY: REASON`` line per problem.

    ``key`` and ``reason`` are those of the first problem; ``problems`` lists them all."""

    def __init__(self, file: str | os.PathLike[str], key: str = "", reason: str = "",
                 problems: list[tuple[str, str]] | None = None):
        self.file = str(file)
        self.problems = problems or [(key, reason)]
        self.key, self.reason = self.problems[0]
        super().__init__("\n".join(self.lines))

    @property
    def lines(self) -> list[str]:
        return [f"{self.file}: {k}: {r}" if k else f"{self.file}: {r}" for k, r in self.problems]


# ---------------------------------------------------------------- pydantic errors → lines
# backend/config/errors.py and provision/site.py carry the same few lines: the two daemons never
# import each other and the top-level packages are fixed, so there is no neutral home for them.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # TOML 1.0 bare key; anything else is written quoted
_EXPECTED = {"string_type": "a string", "bool_type": "true or false", "int_type": "an integer",
             "float_type": "a number", "list_type": "a list", "tuple_type": "a list", "dict_type": "a table",
             "model_type": "a table", "model_attributes_type": "a table", "dataclass_type": "a table"}


def key_path(loc: tuple[str | int, ...]) -> str:
    """``("listener", 0, "listen")`` → ``listener[0].listen``; keys that are not bare are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":  # pydantic's marker for "the key itself was invalid"
            name = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{name}" if out else name
    return out


def error_reason(err: Any) -> str:
    """One pydantic error in the words of this file's documentation."""
    kind = err["type"]
    if kind == "config":
        return err["ctx"]["reason"]
    if kind in ("value_error", "assertion_error"):
        return str(err["ctx"]["error"])
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing (required)"
    if kind == "literal_error":
        return f"expected one of {err['ctx']['expected']}, got {err['input']!r}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {err['input']!r}"
    return f"{err['msg']}, got {err['input']!r}"


def problems_of(e: ValidationError) -> list[tuple[str, str]]:
    return [(key_path(err["loc"]), error_reason(err)) for err in e.errors(include_url=False)]


def each_valid(value: Any, handler, model: type[BaseModel]) -> tuple[list[tuple[int, Any]], list]:
    """Validate a list of tables; when some are wrong, keep (index, table) of the others, so that checks
    between tables run in the same pass and the file's every mistake is reported at once."""
    try:
        return list(enumerate(handler(value))), []
    except ValidationError as e:
        problems = [(err["loc"], error_reason(err)) for err in e.errors(include_url=False)]
    indexed = []
    for i, item in enumerate(value if isinstance(value, list) else []):
        try:
            indexed.append((i, model.model_validate(item)))
        except ValidationError:
            pass
    return indexed, problems


def fail(problems: list[tuple[tuple[str | int, ...], str]]) -> ValidationError:
    """Several checks that span keys, each reported at its own key path (relative to the validated value)."""
    in_file_order = sorted(problems, key=lambda p: p[0][:1] if p[0] and isinstance(p[0][0], int) else (-1,))
    return ValidationError.from_exception_data("config", [
        InitErrorDetails(type=PydanticCustomError("config", "{reason}", {"reason": reason}), loc=loc, input=None)
        for loc, reason in in_file_order])


# ---------------------------------------------------------------- value types (pure)

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


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


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


def _hostports(v: Any) -> tuple[tuple[str, int], ...]:
    """One ``ADDRESS:PORT`` or a list of them (an IPv4 and an IPv6 bind for one service)."""
    if not isinstance(v, list):
        return (parse_hostport(v),)
    if not v:
        raise ValueError("expected at least one ADDRESS:PORT")
    return tuple(parse_hostport(x) for x in v)


def _destination(v: Any) -> tuple[str, int]:
    host, port = parse_hostport(v)
    if port == 0:
        raise ValueError("port 0 is not a destination")
    return host, port


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def _positive_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError(f"expected a positive number, got {v!r}")
    return float(v)


def _buffer_size(v: Any) -> int:
    if _positive_int(v) < 512:
        raise ValueError("must be at least 512 bytes")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _ip(v: Any) -> str:
    try:
        return str(ipaddress.ip_address(_str(v)))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


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


def _list_of(item):
    def parse(v: Any) -> tuple:
        if not isinstance(v, list):
            raise ValueError(f"expected a list, got {v!r}")
        return tuple(item(x) for x in v)

    return parse


Str = Annotated[str, PlainValidator(_str)]
Duration = Annotated[float, PlainValidator(parse_duration)]
PositiveDuration = Annotated[float, PlainValidator(_positive_duration)]
PositiveInt = Annotated[int, PlainValidator(_positive_int)]
PositiveNumber = Annotated[float, PlainValidator(_positive_number)]
HostPort = Annotated[tuple[str, int], PlainValidator(parse_hostport)]
LogLevel = Literal["debug", "info", "warning", "error"]


class _Table(BaseModel):
    """One TOML table: frozen once loaded, and a key the schema does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- tables


class ServerConfig(_Table):
    hostname: Annotated[str, PlainValidator(_hostname)]  # the public name in every reply the gateway writes itself (421/554)
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line (gateway/logsetup.py)
    metrics_listen: HostPort | None = None  # Prometheus text over HTTP; the tunnel address
    tunnel_interface: Str | None = None  # WireGuard interface whose handshake age is exported
    shutdown_grace: Duration = 30.0  # SIGTERM: sessions get this long to finish before being cut


class LimitsConfig(_Table):
    max_connections: PositiveInt = 1000  # all listeners together
    max_per_client: PositiveInt = 20  # concurrent, per IPv4 /32 or IPv6 /64, per listener
    rate: PositiveNumber = 2.0  # new connections per second per client (token refill), per listener
    burst: PositiveInt = 30  # token bucket size
    tracked_clients: PositiveInt = 100_000  # bound on per-client state kept in memory


class DnsblConfig(_Table):
    zones: Annotated[tuple[str, ...], PlainValidator(_list_of(_zone))] = ()
    nameservers: Annotated[tuple[str, ...], PlainValidator(_list_of(_ip))] = ()  # empty: /etc/resolv.conf
    port: PositiveInt = 53
    timeout: Duration = 2.0
    cache_ttl: Duration = 600.0
    cache_size: PositiveInt = 10_000


class ListenerConfig(_Table):
    name: Str
    kind: Literal["smtp", "tcp"]
    listen: Annotated[tuple[tuple[str, int], ...], PlainValidator(_hostports)]
    upstream: Annotated[tuple[str, int], PlainValidator(_destination)]
    proxy_v2: StrictBool = True
    submission: StrictBool = False  # 465/587: no greet wait, no DNSBL (authenticated users, roaming IPs)
    implicit_tls: StrictBool = False  # 465: the client speaks first (TLS ClientHello) → refusals just close
    greet_wait: Duration = 0.0  # seconds the client must stay silent before the banner is relayed
    dnsbl: StrictBool = False
    connect_timeout: PositiveDuration = DEFAULT_CONNECT_TIMEOUT
    banner_timeout: PositiveDuration = DEFAULT_BANNER_TIMEOUT
    idle_timeout: PositiveDuration = DEFAULT_SMTP_IDLE
    session_timeout: PositiveDuration = DEFAULT_SMTP_SESSION
    buffer_size: Annotated[int, PlainValidator(_buffer_size)] = DEFAULT_BUFFER
    # Unset in the file: [limits]' value (filled in by GatewayConfig's listener check).
    max_per_client: PositiveInt = 20
    rate: PositiveNumber = 2.0
    burst: PositiveInt = 30

    @property
    def speaks_smtp_replies(self) -> bool:
        """Whether the gateway may write its own SMTP replies (421/554) to this listener's clients."""
        return self.kind == "smtp" and not self.implicit_tls

    @property
    def is_mx(self) -> bool:
        return self.kind == "smtp" and not self.submission and not self.implicit_tls

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_kind_and_ports(cls, raw: Any) -> Any:
        """Defaults that follow the kind and the ports: 465/587 are submission, 465 implicit TLS, an
        MX on 25 gets a greet wait; tcp passthrough gets IMAP-sized timeouts."""
        if not isinstance(raw, dict) or raw.get("kind") not in LISTENER_KINDS:
            return raw  # the kind's own error is reported
        try:
            ports = {port for _, port in _hostports(raw.get("listen"))}
        except ValueError:
            ports = set()  # listen's own error is reported
        raw = dict(raw)
        if raw["kind"] == "smtp":
            submission = raw.setdefault("submission", bool(ports & set(SUBMISSION_PORTS)))
            implicit_tls = raw.setdefault("implicit_tls", 465 in ports)
            mx = submission is False and implicit_tls is False
            raw.setdefault("greet_wait", DEFAULT_GREET_WAIT if mx and MX_PORT in ports else 0.0)
        smtp = raw["kind"] == "smtp"
        raw.setdefault("idle_timeout", DEFAULT_SMTP_IDLE if smtp else DEFAULT_TCP_IDLE)
        raw.setdefault("session_timeout", DEFAULT_SMTP_SESSION if smtp else DEFAULT_TCP_SESSION)
        return raw

    @model_validator(mode="after")
    def _smtp_keys_make_sense(self) -> ListenerConfig:
        problems = []
        if self.kind == "tcp":
            problems += [((key,), 'only meaningful on kind = "smtp" listeners')
                         for key in SMTP_ONLY_KEYS if key in self.model_fields_set]
        elif self.greet_wait > 0 and not self.is_mx:
            # A submission client on 465 speaks first (TLS ClientHello): a greet wait would reject
            # every one of them; on 587 it only delays people who authenticate anyway.
            problems.append((("greet_wait",), "early-talker detection is only for MX listeners (not submission or implicit TLS)"))
        if self.kind == "smtp" and self.dnsbl and not self.is_mx:
            problems.append((("dnsbl",), "DNSBL checks are never applied to submission ports (roaming users on listed IPs)"))
        if problems:
            raise fail(problems)
        return self


def _overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two binds collide: same port, and the same address or a wildcard of the same family
    (trio's listeners are IPv6-only, so 0.0.0.0 and [::] do not collide)."""
    if a[1] != b[1] or a[1] == 0:
        return False
    ha, hb = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
    return ha == hb or (ha.version == hb.version and (ha.is_unspecified or hb.is_unspecified))


def _fmt(hp: tuple[str, int]) -> str:
    return f"[{hp[0]}]:{hp[1]}" if ":" in hp[0] else f"{hp[0]}:{hp[1]}"


class _GatewayFile(_Table):
    """The whole of gateway.toml."""

    server: ServerConfig = Field(default={}, validate_default=True)
    limits: LimitsConfig = LimitsConfig()
    dnsbl: DnsblConfig = DnsblConfig()
    listener: list[ListenerConfig] = Field(default=[], validate_default=True)

    @field_validator("listener", mode="wrap")
    @classmethod
    def _listeners_together(cls, value: Any, handler, info: ValidationInfo) -> list[ListenerConfig]:
        indexed, problems = each_valid(value, handler, ListenerConfig)
        if value == []:
            problems.append(((), "at least one [[listener]] table is required"))
        limits = info.data.get("limits", LimitsConfig())
        indexed = [(i, lc.model_copy(update={k: getattr(limits, k) for k in ("max_per_client", "rate", "burst")
                                              if k not in lc.model_fields_set})) for i, lc in indexed]
        names: set[str] = set()
        server = info.data.get("server")
        binds: list[tuple[tuple[str, int], str]] = []
        if server is not None and server.metrics_listen is not None:
            binds.append((server.metrics_listen, "server.metrics_listen"))
        for i, lc in indexed:
            if lc.name in names:
                problems.append(((i, "name"), f"duplicate listener name {lc.name!r}"))
            names.add(lc.name)
            for hp in lc.listen:
                other = next((owner for bound, owner in binds if _overlap(hp, bound)), None)
                if other is not None:
                    problems.append(((i, "listen"), f"{_fmt(hp)} is already used by {other}"))
                binds.append((hp, f"listener {lc.name!r}"))
            dnsbl = info.data.get("dnsbl")
            if lc.dnsbl and lc.is_mx and dnsbl is not None and not dnsbl.zones:
                problems.append(((i, "dnsbl"), "dnsbl = true needs [dnsbl] zones"))
        if problems:
            raise fail(problems)
        return [lc for _, lc in indexed]


# ---------------------------------------------------------------- the loaded configuration


@dataclass(frozen=True)
class GatewayConfig:
    path: Path
    server: ServerConfig
    limits: LimitsConfig
    dnsbl: DnsblConfig
    listeners: tuple[ListenerConfig, ...]


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Load and validate a gateway TOML file. Raises ConfigError listing every problem."""
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
    try:
        doc = _GatewayFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(path, problems=problems_of(e)) from None
    return GatewayConfig(path=path, server=doc.server, limits=doc.limits, dnsbl=doc.dnsbl,
                         listeners=tuple(doc.listener))
