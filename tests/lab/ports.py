"""Free ports for test daemons whose configuration needs a number up front: the one place that asks the OS."""

from __future__ import annotations

import ipaddress
import socket


def free_port(*addresses: str, udp: bool = False) -> int:
    """A TCP port (and UDP too when ``udp``) the OS reports free on every one of ``addresses`` (default 127.0.0.1).

    The first address gets an ephemeral port from the OS; the others (and UDP) are checked by binding the same
    number, retried a few times since another process may hold it there."""
    addresses = addresses or ("127.0.0.1",)
    for _ in range(50):
        with socket.socket(_family(addresses[0]), socket.SOCK_STREAM) as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
            if all(_free(a, port, socket.SOCK_STREAM) for a in addresses[1:]) and (
                not udp or all(_free(a, port, socket.SOCK_DGRAM) for a in addresses)
            ):
                return port
    raise RuntimeError(f"no port free on all of {addresses}")


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _free(address: str, port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(_family(address), kind) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
        return True
