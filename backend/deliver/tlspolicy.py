"""What TLS a destination requires, and so where and how to connect: the configured tls_policy
(global and per domain), MTA-STS verdicts (RFC 8461), and the smarthost (always TLS-required,
optionally implicit TLS and AUTH); plus the client TLS contexts for both verdicts."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from backend.config import DeliveryConfig
from backend.deliver.mtasts import MTASTS, Policy
from backend.deliver.mx import DestinationCache, TemporaryFailure
from backend.tls.context import client_context

log = logging.getLogger("homemx.delivery")

# What a destination asks of TLS.
OPPORTUNISTIC, REQUIRED = "opportunistic", "required"

# TLS status of a session, the ``tls`` label of delivery metrics.
TLS_NONE, TLS_UNVERIFIED, TLS_VERIFIED = "none", "unverified", "verified"

SMARTHOST = "[smarthost]"  # destination key of everything relayed (never a valid domain name)

R_MTASTS_NO_MX = "451 4.7.5 No MX host of {domain} matches its MTA-STS policy"
R_NO_SMARTHOST_PASSWORD = "451 4.3.5 smarthost_username set without smarthost_password_file"


@dataclass(frozen=True)
class Target:
    """Where and how to connect for one destination."""

    host_name: str  # MX name: TLS server name and certificate check
    address: str
    port: int
    tls: str  # OPPORTUNISTIC | REQUIRED
    implicit_tls: bool = False
    auth: tuple[str, str] | None = None  # smarthost credentials

    @property
    def key(self) -> tuple:
        return (self.address, self.port, self.host_name, self.tls, self.implicit_tls, self.auth is not None)

    @property
    def peer(self) -> str:
        return f"{self.host_name}[{self.address}]:{self.port}"


class ClientTLS:
    """The two client contexts of delivery, built once and shared by every connection: building
    one loads the CA bundle (about 20 ms), and a context holds no per-connection state."""

    def __init__(self, ca_file: str | None = None):
        self.verified = client_context(True, ca_file)  # ca_file None: the system trust store
        self.opportunistic = client_context(False)

    def context(self, verify: bool) -> ssl.SSLContext:
        """Certificate and name checked (TLS required), or not (opportunistic, RFC 7435)."""
        return self.verified if verify else self.opportunistic


def address_families(d: DeliveryConfig) -> tuple[int, ...]:
    """IP versions we can reach: a socket bound to an IPv4 source cannot reach an IPv6 MX (and vice versa)."""
    if d.source_address is None:
        return (4, 6)
    return (6,) if ":" in d.source_address else (4,)


def destination_of(d: DeliveryConfig, domain: str) -> str:
    """The destination key of a recipient domain: the domain itself, or SMARTHOST if relayed."""
    if d.smarthost is None:
        return domain
    if not d.smarthost_domains or any(domain == s or domain.endswith("." + s) for s in d.smarthost_domains):
        return SMARTHOST
    return domain


class Destinations:
    """The connection targets of a destination, best first, each with the TLS it requires."""

    def __init__(self, d: DeliveryConfig, resolver, mtasts: MTASTS | None):
        self.d = d
        self.resolver = resolver
        self.mtasts = mtasts
        self.families = address_families(d)
        self.hosts = DestinationCache()
        self._smarthost_password: str | None = None  # read once, on first use

    async def targets(self, destination: str) -> list[Target]:
        """Raises mx.TemporaryFailure / mx.PermanentFailure when the whole destination fails."""
        d = self.d
        if destination == SMARTHOST:
            addr, port = d.smarthost
            name = d.smarthost_hostname or addr
            implicit = d.smarthost_tls == "implicit"
            return [Target(name, addr, port, REQUIRED, implicit_tls=implicit, auth=self._smarthost_auth())]
        hosts = await self.hosts.resolve(self.resolver, destination, self.families)
        tls = d.domain_tls_policy.get(destination, d.tls_policy)
        policy: Policy | None = None
        if self.mtasts is not None:
            policy = await self.mtasts.policy(destination)
        if policy is not None and policy.mode == "enforce":
            # RFC 8461 4.1/5: only MX hosts the policy names, and only with a verified certificate.
            allowed = [h for h in hosts if policy.allows(h.name)]
            if not allowed:
                raise TemporaryFailure(R_MTASTS_NO_MX.format(domain=destination))
            hosts, tls = allowed, REQUIRED
        elif policy is not None and policy.mode == "testing":
            for h in hosts:
                if not policy.allows(h.name):
                    log.warning("mta-sts testing: %s MX %s not in policy (delivering anyway)", destination, h.name)
        return [Target(h.name, a, d.remote_port, tls) for h in hosts for a in h.addresses]

    def _smarthost_auth(self) -> tuple[str, str] | None:
        d = self.d
        if d.smarthost_username is None:
            return None
        if self._smarthost_password is None:
            if d.smarthost_password_file is None:
                raise TemporaryFailure(R_NO_SMARTHOST_PASSWORD)
            self._smarthost_password = d.smarthost_password_file.read_text().strip()
        return (d.smarthost_username, self._smarthost_password)
