"""Client addresses as the backend reads them: one form for the socket's peer and the PROXY header's
source, used by limits, trusted networks, logs and trace headers."""

from __future__ import annotations

import ipaddress


def client_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The backend's one reading of a client address (from the socket or the PROXY header): a
    zone (``%eth0``) is dropped and an IPv4-mapped IPv6 address is the IPv4 address it maps, so
    the same client is the same address in limits, trusted networks, logs and trace headers.
    None for text that is no address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def canonical_host(host: str) -> str:
    """``client_ip`` as text (compressed IPv6); text that is no address is kept as it is."""
    ip = client_ip(host)
    return host if ip is None else str(ip)
