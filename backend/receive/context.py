"""What every session of one listener shares (config, directory, queue, accept pipeline, limits)."""

from __future__ import annotations

import functools
import logging
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable



from backend.accept import Acceptor
from backend.config import BackendConfig, ListenerConfig
from backend.receive.directory import Directory
from backend.metrics import BackendMetrics
from backend.queue.store import Queue
from backend.receive.users import UserDB
from backend.receive.authlimit import AuthLimiter
from backend.receive.clientaddr import client_ip
from backend.receive.sessions import SessionRegistry


log = logging.getLogger("homemx.smtp")

PROXY_TIMEOUT = 10.0  # the gateway sends the header at once; anything slower is not the gateway


@dataclass
class ListenerContext:
    """Everything a listener's sessions share."""

    config: BackendConfig
    listener: ListenerConfig
    directory: Directory
    users: UserDB
    queue: Queue
    metrics: BackendMetrics
    tls_context: ssl.SSLContext | None
    auth_limiter: AuthLimiter  # one for all listeners
    sessions: SessionRegistry  # one for all listeners
    # The accept pipeline (policy, trace header, DKIM, spool, queue) shared by every listener.
    acceptor: Acceptor | None = None
    # Runs blocking work (queue, bcrypt, signing) off the event loop.
    run_blocking: Callable[..., Awaitable] | None = None
    # How long the PROXY header (and, on submissions behind the gateway, the TLS handshake) may take.
    proxy_timeout: float = PROXY_TIMEOUT

    def trusted_proxy(self, host: str) -> bool:
        return _in_networks(host, self.listener.trusted_proxies)

    def trusted_network(self, host: str) -> bool:
        return _in_networks(host, self.listener.trusted_networks)

    @property
    def primary_domain(self) -> str:
        """The first configured domain: where mail to a bare ``<postmaster>`` goes."""
        return next(iter(self.config.domains))

    @property
    def masquerade_domain(self) -> str:
        """lan: the domain unqualified and host-local addresses get (backend/smtp/masquerade.py)."""
        return self.listener.masquerade_domain or self.primary_domain


def _in_networks(host: str, networks) -> bool:
    # Asked for each MAIL, RCPT and DATA of a lan session (check_auth_needed); the answer depends
    # on the two arguments alone, so it is cached (networks: a tuple from the frozen config).
    try:
        return _in_networks_cached(host, networks)
    except TypeError:  # networks given as a list (unhashable): no cache
        return _member(host, networks)


def _member(host: str, networks) -> bool:
    ip = client_ip(host)
    return ip is not None and any(ip in n for n in networks)


_in_networks_cached = functools.lru_cache(maxsize=4096)(_member)
