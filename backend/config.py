"""Backend configuration: the schema of ``backend.toml``, validated as a whole before any socket binds.

The schema is declared on pydantic (docs/development.md says why): each ``[table]`` is a frozen model,
unknown keys are errors (a typo must never silently fall back to a default on a mail server), and
every mistake in the file is reported at once, one ``FILE: KEY: REASON`` line each (``ConfigError``).
Checks that involve several keys (and the files the config names) run at load too.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
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

from backend.addresses import PathError, parse_path

LISTENER_KINDS = ("mx", "submission", "submissions", "lan")
TLS_POLICIES = ("opportunistic", "required")
DKIM_ALGORITHMS = ("rsa", "ed25519")

# RFC 5321 4.5.4.1: retry no sooner than 30 min is the classic advice; like mox and Postfix we start
# sooner (most 4xx are greylisting) and grow, then give up after 5 days.
DEFAULT_RETRY_SCHEDULE = (300, 900, 1800, 3600, 7200, 14400, 28800)
DEFAULT_MAX_QUEUE_AGE = 5 * 86400


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
# The gateway's config module and provision/site.py carry the same few lines: the two daemons never
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


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def _ip(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected an IP address, got {v!r}")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


def _address(v: Any) -> str:
    """A mailbox as SMTP would accept it in RCPT TO (the same parser): what an alias, a catch-all or a
    report address names must be deliverable, not a display name, a list or a bare local part."""
    v = _str(v)
    try:
        parse_path(f"<{v}>")
    except PathError as e:
        raise ValueError(f"{v!r} is not an address ({e.reply.split(' ', 2)[-1]})") from None
    local, _, domain = v.rpartition("@")
    parse_domain(domain)  # a domain name we could look up: no address literal, no single label
    return v.lower()


def _addresses(v: Any) -> tuple[str, ...]:
    """One address or a list of them."""
    if isinstance(v, str):
        return (_address(v),)
    if not isinstance(v, list):
        raise ValueError(f"expected an address or a list of addresses, got {v!r}")
    return tuple(_address(x) for x in v)


def _path(v: Any, info: ValidationInfo) -> Path:
    """Relative paths are relative to the config file's directory (given as context ``base``)."""
    p = Path(_str(v) if not isinstance(v, os.PathLike) else v).expanduser()
    base = (info.context or {}).get("base")
    return p if p.is_absolute() or base is None else base / p


def _list_of(item):
    def parse(v: Any) -> tuple:
        if not isinstance(v, list):
            raise ValueError(f"expected a list, got {v!r}")
        return tuple(item(x) for x in v)

    return parse


def _cannot_read(p: Path | None) -> str | None:
    if p is None:
        return None
    try:
        with open(p, "rb"):
            return None
    except OSError as e:
        return f"cannot read {p}: {e.strerror}"


Str = Annotated[str, PlainValidator(_str)]
Duration = Annotated[float, PlainValidator(parse_duration)]
PositiveInt = Annotated[int, PlainValidator(_positive_int)]
HostPort = Annotated[tuple[str, int], PlainValidator(parse_hostport)]
Domain = Annotated[str, PlainValidator(parse_domain)]
IP = Annotated[str, PlainValidator(_ip)]
Address = Annotated[str, PlainValidator(_address)]
FilePath = Annotated[Path, PlainValidator(_path)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = Annotated[tuple[Network, ...], PlainValidator(_list_of(parse_network))]


class _Table(BaseModel):
    """One TOML table: frozen once loaded, and a key the schema does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- tables


class ServerConfig(_Table):
    hostname: Domain  # public name: banner, EHLO, Received, Reporting-MTA
    data_dir: FilePath  # queue database, spool, Maildirs (unless maildir_root is set)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_listen: HostPort | None = None


class TLSConfig(_Table):
    cert: FilePath | None = None
    key: FilePath | None = None

    @model_validator(mode="after")
    def _usable(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise fail([(("cert" if self.cert is None else "key",), "tls.cert and tls.key must be set together")])
        problems = [((name,), reason) for name in ("cert", "key") if (reason := _cannot_read(getattr(self, name)))]
        if not problems and self.cert is not None:
            import ssl

            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, OSError) as e:
                problems.append((("key",), f"certificate {self.cert} and key {self.key} do not load together: {e}"))
        if problems:
            raise fail(problems)
        return self


class ListenerConfig(_Table):
    name: Str
    kind: Literal["mx", "submission", "submissions", "lan"]
    listen: HostPort
    proxy_protocol: StrictBool = False  # expect a PROXY v2 header (mx behind the gateway)
    trusted_proxies: Networks = ()
    trusted_networks: Networks = ()  # lan: submit without AUTH
    # Trusting every address (0.0.0.0/0, ::/0) makes the listener an open relay for whoever can reach
    # it; refused unless this says so (a listener reachable only from trusted hosts, e.g. a container bridge).
    allow_open_relay: StrictBool = False
    max_message_size: Annotated[int, PlainValidator(parse_size)] = 50 * 1024 * 1024
    max_recipients: PositiveInt = 100
    max_received_headers: PositiveInt = 30  # loop detection (Postfix hopcount_limit is 50, mox uses 50)
    # RFC 5321 4.5.3.2 gives 5 min for commands and 10 min for the DATA terminator; we apply one
    # idle timeout per read, which covers both orders of magnitude.
    timeout: Duration = 300.0
    auth_max_failures: PositiveInt = 10  # per real client address per auth_failure_window
    auth_failure_window: Duration = 60.0
    auth_failure_delay: Duration = 1.0  # after the n-th failure in the window, wait n × this before replying (≤ 10 s)

    @model_validator(mode="after")
    def _trust_makes_sense(self) -> ListenerConfig:
        problems = []
        if self.proxy_protocol and not self.trusted_proxies:
            problems.append((("trusted_proxies",), "proxy_protocol = true needs at least one trusted proxy address"))
        if self.kind in ("submission", "submissions") and self.trusted_networks:
            problems.append((("trusted_networks",), f"not allowed on a {self.kind} listener: AUTH is always required there"))
        everyone = [str(n) for n in self.trusted_networks if n.prefixlen == 0]
        if everyone and not self.allow_open_relay:
            problems.append((("trusted_networks",), f"{', '.join(everyone)} trusts every address: whoever reaches this "
                             "listener relays without AUTH (set allow_open_relay = true if that is meant)"))
        if problems:
            raise fail(problems)
        return self


@dataclass(frozen=True)
class DomainConfig:
    name: str
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # local part → target addresses
    catch_all: str | None = None  # address that receives mail for unknown local parts


class _DomainTable(_Table):
    """``[domain."example.org"]``: the name is the table's key."""

    aliases: dict[Annotated[str, PlainValidator(lambda v: _str(v).lower())],
                  Annotated[tuple[str, ...], PlainValidator(_addresses)]] = {}
    catch_all: Address | None = None


class DKIMKeyConfig(_Table):
    domain: Domain
    selector: Str
    algorithm: Literal["rsa", "ed25519"]
    private_key: FilePath

    @field_validator("private_key")
    @classmethod
    def _readable(cls, p: Path) -> Path:
        if reason := _cannot_read(p):
            raise ValueError(reason)
        return p


def _smarthost(v: Any) -> tuple[str, int]:
    return parse_hostport(v, 587)


def _retry_schedule(v: Any) -> tuple[float, ...]:
    schedule = _list_of(parse_duration)(v)
    if not schedule:
        raise ValueError("must list at least one interval")
    return schedule


class DeliveryConfig(_Table):
    source_address: IP | None = None  # bind outbound sockets here (the tunnel address)
    nameservers: Annotated[tuple[str, ...], PlainValidator(_list_of(_ip))] = ()  # empty: /etc/resolv.conf
    dns_port: PositiveInt = 53
    tls_policy: Literal["opportunistic", "required"] = "opportunistic"
    domain_tls_policy: dict[Annotated[str, PlainValidator(lambda v: _str(v).lower())],
                            Literal["opportunistic", "required"]] = {}
    mta_sts: StrictBool = True
    retry_schedule: Annotated[tuple[float, ...], PlainValidator(_retry_schedule)] = DEFAULT_RETRY_SCHEDULE
    max_queue_age: Duration = DEFAULT_MAX_QUEUE_AGE
    delay_notice_after: Duration | None = None  # send a "delayed" DSN once, after this long; None: never
    keep_final: Duration = 86400.0  # how long delivered/bounced entries stay visible in `queue list`
    concurrency: PositiveInt = 20
    per_destination_concurrency: PositiveInt = 4
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0
    remote_port: PositiveInt = 25  # tests point this at a non-privileged port
    paused: StrictBool = False  # maintenance: accept and queue, attempt no remote delivery (Postfix: defer_transports)
    smarthost: Annotated[tuple[str, int], PlainValidator(_smarthost)] | None = None
    smarthost_hostname: Str | None = None  # TLS server name of the smarthost (defaults to its address)
    smarthost_domains: Annotated[tuple[str, ...], PlainValidator(_list_of(parse_domain))] = ()  # empty: every domain
    smarthost_username: Str | None = None
    smarthost_password_file: FilePath | None = Field(default=None, validate_default=True)
    # "implicit": TLS from the first byte (RFC 8314 3.3, port 465); "starttls": RFC 3207 upgrade.
    # Default: implicit on port 465, STARTTLS on any other port.
    smarthost_tls: Literal["implicit", "starttls"] = "starttls"

    @model_validator(mode="before")
    @classmethod
    def _smarthost_tls_from_port(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "smarthost_tls" not in raw:
            try:
                port = _smarthost(raw["smarthost"])[1]
            except (KeyError, ValueError):
                return raw  # no smarthost, or its own error is reported
            raw = {**raw, "smarthost_tls": "implicit" if port == 465 else "starttls"}
        return raw

    @field_validator("smarthost_password_file")
    @classmethod
    def _password_file(cls, p: Path | None, info: ValidationInfo) -> Path | None:
        if p is None and info.data.get("smarthost_username") is not None:
            # Found now rather than as a 451 on every relayed message.
            raise ValueError("missing: smarthost_username is set, and its password is read from this file")
        if reason := _cannot_read(p):
            raise ValueError(reason)
        return p


class GatewayInfo(_Table):
    """What the backend knows about its gateway, for DNS records and the DNS check."""

    public_ipv4: Annotated[tuple[str, ...], PlainValidator(_list_of(_ip))] = ()
    public_ipv6: Annotated[tuple[str, ...], PlainValidator(_list_of(_ip))] = ()


class DNSConfig(_Table):
    dmarc_rua: Address | None = None
    dmarc_policy: Literal["none", "quarantine", "reject"] = "quarantine"
    mta_sts_mode: Literal["testing", "enforce"] | None = None  # None (disabled), testing, enforce
    mta_sts_id: Str | None = None
    tlsrpt_rua: Str | None = None


class _UsersTable(_Table):
    passwd_file: FilePath
    maildir_root: FilePath | None = None  # default: data_dir/mail


def _overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two binds collide: same port, and the same address or a wildcard of the same family
    (asyncio makes IPv6 sockets IPv6-only, so 0.0.0.0 and [::] do not collide). Port 0 never does."""
    if a[1] != b[1] or a[1] == 0:
        return False
    ha, hb = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
    return ha == hb or (ha.version == hb.version and (ha.is_unspecified or hb.is_unspecified))


def _fmt(hp: tuple[str, int]) -> str:
    return f"[{hp[0]}]:{hp[1]}" if ":" in hp[0] else f"{hp[0]}:{hp[1]}"


class _BackendFile(_Table):
    """The whole of backend.toml."""

    server: ServerConfig = Field(default={}, validate_default=True)
    tls: TLSConfig = TLSConfig()
    listener: list[ListenerConfig] = Field(default=[], validate_default=True)
    domain: dict[Domain, _DomainTable] = Field(default={}, validate_default=True)
    users: _UsersTable = Field(default={}, validate_default=True)
    dkim: list[DKIMKeyConfig] = []
    delivery: DeliveryConfig = DeliveryConfig()
    gateway: GatewayInfo = GatewayInfo()
    dns: DNSConfig = DNSConfig()

    @field_validator("listener", mode="wrap")
    @classmethod
    def _listeners_together(cls, value: Any, handler, info: ValidationInfo) -> list[ListenerConfig]:
        indexed, problems = each_valid(value, handler, ListenerConfig)
        if value == []:
            problems.append(((), "at least one [[listener]] table is required"))
        tls, server = info.data.get("tls"), info.data.get("server")
        binds: list[tuple[tuple[str, int], str]] = []
        if server is not None and server.metrics_listen is not None:
            binds.append((server.metrics_listen, "server.metrics_listen"))
        names: set[str] = set()
        for i, lc in indexed:
            if lc.name in names:
                problems.append(((i, "name"), f"duplicate listener name {lc.name!r}"))
            names.add(lc.name)
            other = next((owner for bound, owner in binds if _overlap(lc.listen, bound)), None)
            if other is not None:
                problems.append(((i, "listen"), f"{_fmt(lc.listen)} is already used by {other}"))
            binds.append((lc.listen, f"listener {lc.name!r}"))
            if lc.kind in ("submissions", "submission", "mx") and tls is not None and tls.cert is None:
                problems.append(((i, "kind"), f"a {lc.kind} listener needs [tls] cert and key"))
        if problems:
            raise fail(problems)
        return [lc for _, lc in indexed]

    @field_validator("domain")
    @classmethod
    def _at_least_one_domain(cls, domains: dict) -> dict:
        if not domains:
            raise ValueError('at least one [domain."example.org"] table is required')
        return domains


# ---------------------------------------------------------------- the loaded configuration


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


def load_config(path: str | os.PathLike[str]) -> BackendConfig:
    """Load and validate a backend TOML file. Raises ConfigError listing every problem."""
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
    """Validate an already-parsed TOML document (tests build configs this way)."""
    try:
        doc = _BackendFile.model_validate(raw, context={"base": path.parent.resolve()})
    except ValidationError as e:
        raise ConfigError(path, problems=problems_of(e)) from None
    return BackendConfig(
        path=path,
        server=doc.server,
        tls=doc.tls,
        listeners=tuple(doc.listener),
        domains={name: DomainConfig(name, t.aliases, t.catch_all) for name, t in doc.domain.items()},
        passwd_file=doc.users.passwd_file,
        maildir_root=doc.users.maildir_root or doc.server.data_dir / "mail",
        dkim=tuple(doc.dkim),
        delivery=doc.delivery,
        gateway=doc.gateway,
        dns=doc.dns,
    )
