"""The cross-platform WireGuard configuration protocol (UAPI) spoken by wireguard-go over /var/run/wireguard/<if>.sock.

Protocol (https://www.wireguard.com/xplatform/): "get=1\\n\\n" or "set=1\\n" + key=value lines +
"\\n"; the reply ends with "errno=N\\n\\n". Keys travel as hex. No library speaks it from Python,
so this small client is ours.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

WG_RUN_DIR = Path(os.environ.get("HOMEMX_WG_RUN_DIR", "/var/run/wireguard"))
TIMEOUT = 5.0


class UapiError(RuntimeError):
    pass


def socket_path(ifname: str) -> Path:
    return WG_RUN_DIR / f"{ifname}.sock"


def _exchange(ifname: str, request: str) -> list[tuple[str, str]]:
    path = socket_path(ifname)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.connect(str(path))
        except OSError as e:
            raise UapiError(f"cannot reach wireguard-go at {path}: {e.strerror or e}") from None
        s.sendall(request.encode("ascii"))
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    pairs = []
    for line in buf.decode("ascii", "replace").split("\n"):
        if line:
            k, _, v = line.partition("=")
            pairs.append((k, v))
    errno_ = next((v for k, v in pairs if k == "errno"), None)
    if errno_ != "0":
        raise UapiError(f"wireguard-go {ifname}: request failed (errno={errno_})")
    return [(k, v) for k, v in pairs if k != "errno"]


def alive(ifname: str) -> bool:
    """True when a wireguard-go answers on the interface's socket."""
    try:
        _exchange(ifname, "get=1\n\n")
        return True
    except (UapiError, OSError):
        return False


def get(ifname: str) -> dict:
    """Device state: {"private_key", "listen_port", "fwmark", "peers": [{...}]}; keys as hex strings."""
    dev: dict = {"peers": []}
    peer: dict | None = None
    for k, v in _exchange(ifname, "get=1\n\n"):
        if k == "public_key":
            peer = {"public_key": v, "allowed_ips": []}
            dev["peers"].append(peer)
        elif peer is None:
            dev[k] = v
        elif k == "allowed_ip":
            peer["allowed_ips"].append(v)
        else:
            peer[k] = v
    return dev


def set_(ifname: str, lines: list[str]) -> None:
    """Apply ``key=value`` lines in one set operation (an empty list does nothing)."""
    if lines:
        _exchange(ifname, "set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")
