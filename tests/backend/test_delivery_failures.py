"""The FAILURES table of backend/deliver/transaction.py, row by row: which reply (and so which
outcome) each failure of each phase is recorded with. Pure: exceptions built as aiosmtplib and
ssl raise them, no sockets (the socket-level paths are in test_delivery*.py)."""

from __future__ import annotations

import asyncio
import ssl

import aiosmtplib
import pytest

from backend.deliver.transaction import (
    AUTH,
    CONNECT,
    DATA,
    ENVELOPE,
    SESSION,
    STARTTLS,
    failure_outcome,
    failure_reply,
)
from backend.queue.model import BOUNCED, DEFERRED

PEER = "mx.dest.test[192.0.2.1]:25"


def _wrapped_ssl_error() -> aiosmtplib.SMTPConnectError:
    # As aiosmtplib raises a failed implicit-TLS handshake: SMTPConnectError from the SSLError.
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "self-signed certificate"
    err = aiosmtplib.SMTPConnectError("Error connecting to mx.dest.test on port 465")
    err.__cause__ = cause
    return err


CASES = [
    (CONNECT, aiosmtplib.SMTPConnectResponseError(554, "5.7.1 go away"), "554 5.7.1 go away"),
    (CONNECT, aiosmtplib.SMTPConnectTimeoutError("timed out"), f"421 4.4.2 Timeout talking to {PEER}: timed out"),
    (CONNECT, _wrapped_ssl_error(), f"421 4.7.5 TLS handshake with {PEER} failed: self-signed certificate"),
    (CONNECT, ConnectionRefusedError(111, "Connection refused"), f"421 4.4.1 Cannot connect to {PEER}: Connection refused"),
    (STARTTLS, aiosmtplib.SMTPServerDisconnected("gone"), f"421 4.7.5 TLS handshake with {PEER} failed: gone"),
    (STARTTLS, aiosmtplib.SMTPResponseException(454, "4.7.0 TLS not available"), "454 4.7.0 TLS not available"),
    (STARTTLS, asyncio.TimeoutError(), None),  # left to the session's rows
    (AUTH, aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad"), f"421 4.7.0 Smarthost {PEER} refused our credentials: 535 5.7.8 bad"),
    (AUTH, aiosmtplib.SMTPReadTimeoutError("slow"), f"421 4.7.0 Smarthost {PEER} refused our credentials: slow"),
    (SESSION, aiosmtplib.SMTPHeloError(421, "4.3.2 busy"), "421 4.3.2 busy"),
    (SESSION, aiosmtplib.SMTPReadTimeoutError("slow"), f"421 4.4.2 Timeout talking to {PEER}: slow"),
    (SESSION, ConnectionResetError(104, "reset"), f"421 4.4.2 Connection to {PEER} lost: [Errno 104] reset"),
    (ENVELOPE, aiosmtplib.SMTPServerDisconnected("gone"), f"421 4.4.2 Connection to {PEER} lost: gone"),
    (DATA, aiosmtplib.SMTPDataError(554, "5.6.0 rejected\nfor content"), "554 5.6.0 rejected for content"),
    (DATA, aiosmtplib.SMTPDataError(452, "4.3.1 full"), "452 4.3.1 full"),
    (DATA, aiosmtplib.SMTPReadTimeoutError("slow"),
     f"451 4.4.2 No reply from {PEER} after end of data (may or may not be delivered)"),
    (DATA, LookupError("a bug"), None),  # no row: the deliverer defers it as a local error
]


@pytest.mark.parametrize("phase, error, reply", CASES, ids=[f"{p}-{type(e).__name__}" for p, e, _ in CASES])
def test_failure_reply(phase, error, reply):
    assert failure_reply(phase, error, PEER) == reply


@pytest.mark.parametrize("reply, outcome", [
    ("554 5.6.0 rejected for content", BOUNCED),
    ("452 4.3.1 full", DEFERRED),
    (f"421 4.4.2 Timeout talking to {PEER}: slow", DEFERRED),
])
def test_failure_outcome_follows_the_reply_code(reply, outcome):
    assert failure_outcome(reply) == outcome
