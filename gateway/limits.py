"""Connection admission: global cap, per-client concurrency cap and per-client token-bucket rate (pure, injectable clock).

A "client" is an IPv4 /32 or an IPv6 /64: one IPv6 host usually owns a whole /64, so counting /128s
would let a single machine open unlimited connections by rotating its interface identifier.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

# Refusal reasons: metric labels and log words.
REFUSE_GLOBAL = "global_cap"
REFUSE_PER_CLIENT = "per_client_cap"
REFUSE_RATE = "rate"


def client_key(address: str) -> str:
    """The per-client key of a peer address: ``"192.0.2.7/32"`` or ``"2001:db8:1:2::/64"``."""
    if "." in address and ":" not in address:
        # An IPv4 peer (what an AF_INET socket reports): inet_pton checks it strictly and
        # inet_ntop spells it canonically, a tenth of ipaddress's cost per connection.
        try:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, address)) + "/32"
        except OSError:
            pass  # not a dotted quad: ipaddress gives its error below
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d
    if ip.version == 4:
        return f"{ip}/32"
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class GlobalCap:
    """Concurrent connections across all listeners."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.maximum:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class ClientLimiter:
    """Per-client concurrency and token-bucket rate for one listener.

    Theory of operation: each client key has a bucket of ``burst`` tokens refilled at ``rate`` per
    second; a new connection takes one token and one concurrency slot. Buckets live in an LRU bounded
    by ``tracked``: evicting the least recently seen bucket forgets a client's history (it gets a full
    burst again), which is the safe direction for a mail server: memory stays bounded under a flood
    of addresses and at worst an attacker with >``tracked`` prefixes gets ``burst`` each.
    """

    def __init__(
        self,
        max_per_client: int,
        rate: float,
        burst: int,
        tracked: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_per_client = max_per_client
        self.rate = rate
        self.burst = burst
        self.tracked = tracked
        self.clock = clock
        self.active: dict[str, int] = {}
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def check(self, key: str) -> str | None:
        """Admit a new connection from ``key`` (counting it) or return the refusal reason."""
        if self.active.get(key, 0) >= self.max_per_client:
            return REFUSE_PER_CLIENT
        now = self.clock()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self.buckets[key] = bucket
            if len(self.buckets) > self.tracked:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            return REFUSE_RATE
        bucket.tokens -= 1.0
        self.active[key] = self.active.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        n = self.active.get(key, 0) - 1
        if n > 0:
            self.active[key] = n
        else:
            self.active.pop(key, None)


class Admission:
    """Global cap plus one listener's per-client limits: ``admit`` → None (take a slot) or a reason."""

    def __init__(self, global_cap: GlobalCap, clients: ClientLimiter):
        self.global_cap = global_cap
        self.clients = clients

    def admit(self, key: str) -> str | None:
        if not self.global_cap.try_acquire():
            return REFUSE_GLOBAL
        reason = self.clients.check(key)
        if reason is not None:
            self.global_cap.release()
        return reason

    def release(self, key: str) -> None:
        self.clients.release(key)
        self.global_cap.release()
