"""Logging for the backend: one line per connection/transaction outcome; SMTP transcripts only at DEBUG."""

import logging
import sys


def setup_logging(level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=lvl,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # aiosmtpd logs every command line at INFO ("mail.log"): that is a transcript, so DEBUG only.
    aiosmtpd_log = logging.getLogger("mail.log")
    aiosmtpd_log.setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.WARNING)
    aiosmtpd_log.addFilter(_no_bodies)


def _no_bodies(record: logging.LogRecord) -> bool:
    # Even at DEBUG, message bodies are never logged: aiosmtpd logs each DATA line.
    return not str(record.msg).startswith("DATA readline")
