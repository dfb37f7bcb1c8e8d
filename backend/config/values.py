"""Configuration values that TOML types do not carry (durations, sizes, ADDRESS:PORT, networks, domains,
addresses, paths): pure parsers whose ValueError is the reason the operator reads, and their schema types."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import PlainValidator, ValidationInfo

from backend.smtp.paths import PathError, parse_path

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
