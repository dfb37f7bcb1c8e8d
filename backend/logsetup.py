"""Logging for the backend: one line per connection/transaction outcome; SMTP transcripts only at DEBUG;
whatever a client sent is escaped before it reaches the log."""

import logging
import re
import sys

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

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup_logging(level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=lvl, handlers=[handler], force=True)
    # aiosmtpd logs every command line at INFO ("mail.log"): that is a transcript, so DEBUG only.
    aiosmtpd_log = logging.getLogger("mail.log")
    aiosmtpd_log.setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.WARNING)
    aiosmtpd_log.addFilter(_no_bodies)


def _no_bodies(record: logging.LogRecord) -> bool:
    # Even at DEBUG, message bodies are never logged: aiosmtpd logs each DATA line.
    return not str(record.msg).startswith("DATA readline")
