"""SMTP edge decisions before the banner (pure, no I/O): the pre-greeting state machine and the replies the gateway writes itself.

Theory of operation (like Postfix postscreen's pregreet test, but the gateway is a splice proxy):
an MX client is held silent for ``greet_wait`` seconds while any DNSBL lookups run; a legitimate
SMTP client waits for the 220 banner (RFC 5321 3.1, 4.3.1), a spam bot often does not. Only when
the wait passes does the gateway dial home, so bots never cost a tunnel round trip or a backend
session. Until the backend's banner has been relayed, any byte from the client is an early talk.

    event \\ state      WAITING              CONNECTING          (terminal)
    client_bytes       → REJECTED (554)     → REJECTED (554)    ignored
    client_gone (EOF)  → REJECTED (silent)  → REJECTED (silent) ignored
    client_reset (RST) → REJECTED (silent)  → REJECTED (silent) ignored
    dnsbl_listed       → REJECTED (554)     → REJECTED (554)    ignored
    wait_over          → CONNECTING          -                   ignored
    upstream_failed    -                    → UNAVAILABLE (421) ignored
    banner             -                    → PASSED            ignored

The I/O side (gateway/proxy.py) feeds events in and acts on the ``Decision`` it gets back.
"""

from __future__ import annotations

from dataclasses import dataclass

# Replies the gateway writes itself; {host} is the configured public hostname.
# RFC 5321 3.8 / 4.2.2: 421 = service not available, closing; the sender keeps the message and retries.
# RFC 3463: X.3.2 "system not accepting network messages", X.7.0 "other security/policy status",
# X.5.0 "other protocol status", X.7.1 "delivery not authorized".
R421_UNAVAILABLE = "421 4.3.2 {host} Service not available, try again later"
R421_TOO_MANY = "421 4.7.0 {host} Too many connections, try again later"
R421_TOO_FAST = "421 4.7.0 {host} Connection rate limit exceeded, try again later"
R421_BUSY = "421 4.7.0 {host} Server busy, try again later"
R554_EARLY_TALKER = "554 5.5.0 {host} Protocol error: client sent data before the greeting"
R554_DNSBL = "554 5.7.1 {host} Service unavailable; client [{ip}] blocked using {zone}"

WAITING = "waiting"
CONNECTING = "connecting"
PASSED = "passed"
REJECTED = "rejected"
UNAVAILABLE = "unavailable"

# Outcome words (log lines and metric labels).
OUT_EARLY_TALKER = "early_talker"
OUT_DNSBL = "dnsbl_listed"
OUT_UNAVAILABLE = "upstream_unavailable"
OUT_CLIENT_GONE = "client_gone"
OUT_CLIENT_RESET = "client_reset"  # a normal outcome too: scanners and impatient clients abort with RST


def reply(template: str, **fields: str) -> bytes:
    """One SMTP reply line, CRLF-terminated (RFC 5321 4.2)."""
    return (template.format(**fields) + "\r\n").encode("ascii", "replace")


@dataclass(frozen=True)
class Decision:
    state: str
    reply: bytes | None = None  # what to write to the client before closing, if anything
    outcome: str | None = None  # set when the connection ends here


class PreGreeting:
    """One MX connection's pre-banner state (see the module docstring for the table)."""

    def __init__(self, hostname: str, client_ip: str):
        self.hostname = hostname
        self.client_ip = client_ip
        self.state = WAITING

    def _done(self) -> bool:
        return self.state in (PASSED, REJECTED, UNAVAILABLE)

    def client_bytes(self, data: bytes) -> Decision:
        if self._done() or not data:
            return Decision(self.state)
        self.state = REJECTED
        return Decision(REJECTED, reply(R554_EARLY_TALKER, host=self.hostname), OUT_EARLY_TALKER)

    def client_gone(self) -> Decision:
        """The client closed (or half-closed) before the banner: nothing to say, nothing to dial."""
        if self._done():
            return Decision(self.state)
        self.state = REJECTED
        return Decision(REJECTED, None, OUT_CLIENT_GONE)

    def client_reset(self) -> Decision:
        """The client aborted (RST) before the banner: like client_gone, told apart only in logs and metrics."""
        if self._done():
            return Decision(self.state)
        self.state = REJECTED
        return Decision(REJECTED, None, OUT_CLIENT_RESET)

    def dnsbl_listed(self, zone: str) -> Decision:
        if self._done():
            return Decision(self.state)
        self.state = REJECTED
        return Decision(REJECTED, reply(R554_DNSBL, host=self.hostname, ip=self.client_ip, zone=zone), OUT_DNSBL)

    def wait_over(self) -> Decision:
        if self.state == WAITING:
            self.state = CONNECTING
        return Decision(self.state)

    def upstream_failed(self) -> Decision:
        if self.state != CONNECTING:
            return Decision(self.state)
        self.state = UNAVAILABLE
        return Decision(UNAVAILABLE, reply(R421_UNAVAILABLE, host=self.hostname), OUT_UNAVAILABLE)

    def banner(self) -> Decision:
        if self.state == CONNECTING:
            self.state = PASSED
        return Decision(self.state)
