"""Logging for the gateway: text lines, or one JSON object per line (``[server] log_format``).

The JSON lines carry the text line's fields plus the ``key=value`` pairs of connection outcome
lines (``conn``, ``listener``, ``client``, ``outcome``, ``up``, ``down``, ``duration``). The backend
has the same formatter (backend/logsetup.py); the daemons never import each other, so the few
lines live in both.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys

# One %-conversion of a logging format string: mapping key, flags, width, precision, length, type.
_CONVERSION_RE = re.compile(r"%(\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
_FIELD_BEFORE_RE = re.compile(r"\b([a-z_]+)=<?$")  # the conversion is the value of ``key=``
BASE_FIELDS = ("timestamp", "level", "logger", "message")


def _fields(record: logging.LogRecord) -> dict:
    """The ``key=value`` pairs of a record, read from its format string and its arguments (never
    from the formatted text, so what a client sent cannot add or overwrite a field)."""
    args = record.args
    if not args or not isinstance(args, tuple) or not isinstance(record.msg, str):
        return {}
    out: dict = {}
    i = 0
    for m in _CONVERSION_RE.finditer(record.msg):
        mapping, width, precision, kind = m.groups()
        if kind == "%":
            continue
        if mapping is not None:
            return {}
        i += (width == "*") + (precision == "*")
        if i >= len(args):
            return {}
        value = args[i]
        i += 1
        before = _FIELD_BEFORE_RE.search(record.msg, 0, m.start())
        if before is not None and before.group(1) not in out and before.group(1) not in BASE_FIELDS:
            out[before.group(1)] = _json_value(kind, precision, value)
    return out


def _json_value(kind: str, precision: str | None, value):
    if isinstance(value, bool) or value is None:
        return value
    try:
        if kind in "diouxX":
            return int(value)
        if kind in "eEfFgG":  # rounded as the text line shows it (duration=%.3fs)
            return round(float(value), int(precision)) if precision and precision != "*" else float(value)
    except (TypeError, ValueError):
        pass
    if isinstance(value, (int, float)):
        return value
    return value if isinstance(value, str) else str(value) if kind == "s" else repr(value)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: timestamp (RFC 3339, UTC), level, logger, message and the line's
    fields. ASCII-only output: any control character or odd byte is a JSON escape."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", log_format: str = "text") -> None:
    """Log to stderr (systemd's journal) at ``level``, as text lines or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
