"""Failed-AUTH limits shared by every listener: one count per client (an IPv4 address or an IPv6
/64), a delay that grows with each failure, a lockout for the window (RFC 4954 leaves the policy to
the server)."""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from backend.receive.clientaddr import client_ip





log = logging.getLogger("homemx.smtp")


AUTH_DELAY_MAX = 10.0  # seconds: the longest wait before a failed AUTH is answered


def client_key(host: str) -> str:
    """The unit a limit applies to: an IPv4 address, or the /64 of an IPv6 address (one home or
    one server usually holds a whole /64, so counting single IPv6 addresses limits nothing).
    An IPv4-mapped IPv6 address counts as the IPv4 address it maps."""
    ip = client_ip(host)
    if ip is None:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def auth_delay(failures: int, step: float) -> float:
    """How long to wait before answering the n-th failed AUTH in the window: cheap for a user who
    mistyped once, slow for a guesser."""
    return min(failures * step, AUTH_DELAY_MAX)


@dataclass
class AuthLimiter:
    """Failed AUTH attempts per client (``client_key``) in a sliding window, one for every
    listener (Postfix's anvil, smaller): a lockout earned on 465 holds on 587 too. Each listener
    applies its own limit and window to the shared history."""

    now: Callable[[], float] = time.monotonic
    _failures: dict[str, collections.deque] = field(default_factory=dict)
    _horizon: float = 0.0  # the longest window of any listener: how long a failure is kept
    _since_sweep: int = 0

    def _recent(self, key: str, window: float) -> collections.deque:
        dq = self._failures.get(key)
        if dq is None:
            return collections.deque()
        cutoff = self.now() - window
        return collections.deque(t for t in dq if t >= cutoff)

    def serve_window(self, window: float) -> None:
        """A listener judging failures over ``window`` seconds uses this limiter: keep each failure
        that long, whichever listener recorded it (else failures on a port with a short window
        would be forgotten before a port with a long one looks at them)."""
        self._horizon = max(self._horizon, window)

    def count(self, host: str, window: float) -> int:
        """Failures of this client within the last ``window`` seconds."""
        return len(self._recent(client_key(host), window))

    def blocked(self, host: str, max_failures: int, window: float) -> bool:
        return self.count(host, window) >= max_failures

    def failed(self, host: str, window: float) -> int:
        """Record a failure; returns the client's failures within ``window`` (this one included)."""
        key = client_key(host)
        self._horizon = max(self._horizon, window)
        now = self.now()
        dq = self._failures.setdefault(key, collections.deque())
        while dq and dq[0] < now - self._horizon:
            dq.popleft()
        dq.append(now)
        self._since_sweep += 1
        if self._since_sweep >= 1024:
            # Guessers from many addresses must not grow the table for ever.
            self._since_sweep = 0
            stale = [k for k, d in self._failures.items() if d[-1] < now - self._horizon]
            for k in stale:
                del self._failures[k]
        return self.count(host, window)
