"""Logging for the backend: one line per connection/transaction outcome; SMTP transcripts only at DEBUG;
whatever a client sent is escaped before it reaches the log."""

import datetime
import json
import logging
import re
import sys
import time

# C0 and C1 controls, DEL, Unicode line/paragraph separators, and the lone surrogates that stand
# for undecodable bytes (aiosmtpd decodes command arguments with surrogateescape).
_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


def _escape_char(m: re.Match) -> str:
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # the original byte
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\x1b``), so a client
    can neither paint the operator's terminal (ANSI sequences) nor forge log lines (CR/LF)."""
    return _UNSAFE_RE.sub(_escape_char, text)


class EscapingFormatter(logging.Formatter):
    """Escapes the message of every record, whoever logged it (our modules put client text such as
    HELO names and addresses in log lines; aiosmtpd logs unrecognised commands as sent). The
    traceback of a record, appended after the message, keeps its line breaks."""

    _second: int | None = None
    _second_text = ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # logging's default (localtime + strftime per record) with the text of the second kept:
        # a busy daemon logs several lines a millisecond (docs/benchmarks.md "Round 3 — backend CPU
        # per message"). Time zone offsets are whole seconds, so the text changes only with the second.
        if datefmt is not None or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, time.localtime(second))
            self._second = second
        return self.default_msec_format % (self._second_text, record.msecs)


# One %-conversion of a logging format string: mapping key, flags, width, precision, length, type.
_CONVERSION_RE = re.compile(r"%(\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
# A conversion that is the value of a field: ``conn=%s``, ``from=<%s>``; and the accept line's
# ``queued %s``, named like the delivery lines' ``queue=%s`` so one query follows a message.
_FIELD_BEFORE_RE = re.compile(r"(?:\b([a-z_]+)=<?|\b(queued) )$")
_WORD_FIELDS = {"queued": "queue"}
BASE_FIELDS = ("timestamp", "level", "logger", "message")


def _fields(record: logging.LogRecord) -> dict:
    """The ``key=value`` pairs of a record, read from its format string and its arguments (never
    from the formatted text: a client's HELO name or address cannot add or overwrite a field)."""
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
            return {}  # a malformed call: logging prints its own error, we add no fields
        value = args[i]
        i += 1
        before = _FIELD_BEFORE_RE.search(record.msg, 0, m.start())
        if before is None:
            continue
        key = before.group(1) or _WORD_FIELDS[before.group(2)]
        if key in out or key in BASE_FIELDS:
            continue  # the first occurrence is the daemon's own field
        out[key] = _json_value(kind, precision, value)
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
    return escape_controls(value if isinstance(value, str) else str(value) if kind == "s" else repr(value))


class JSONFormatter(logging.Formatter):
    """One JSON object per line (``[server] log_format = "json"``), for Loki or journald: the text
    line's timestamp (RFC 3339, UTC), level, logger and message, plus the ``key=value`` pairs of
    the line as fields (``conn``, ``client``, ``outcome``, ``queue``, ``from``, ``rcpts``,
    ``duration``... numbers as JSON numbers). Strings are escaped as in text lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": escape_controls(record.getMessage()),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", log_format: str = "text") -> None:
    """Log to stderr (systemd's journal) at ``level``, as text lines or as JSON lines."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=lvl, handlers=[handler], force=True)
    # aiosmtpd logs every command line at INFO ("mail.log"): that is a transcript, so DEBUG only.
    aiosmtpd_log = logging.getLogger("mail.log")
    aiosmtpd_log.setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.WARNING)
    aiosmtpd_log.addFilter(_no_bodies)


def _no_bodies(record: logging.LogRecord) -> bool:
    # Even at DEBUG, message bodies are never logged: aiosmtpd logs each DATA line.
    return not str(record.msg).startswith("DATA readline")
