"""Tunnel status for operators and metrics: interface present, handshake age, endpoint, traffic — kernel or userspace alike."""

from __future__ import annotations

import time

from . import bringup, uapi

# WireGuard re-keys every 2 minutes while traffic flows and the backend sends a keepalive every 25 s,
# so a handshake older than REJECT_AFTER_TIME (180 s, WireGuard paper 6.1) plus slack means the
# tunnel is down for practical purposes.
STALE_AFTER = 180.0


def status(ifname: str, now: float | None = None) -> dict:
    """A JSON-ready status dict; ``present`` is False (and nothing else is set) when there is no tunnel."""
    now = time.time() if now is None else now
    out: dict = {"interface": ifname, "present": False}
    try:
        dev = bringup.open_device(ifname)
        state = dev.state() if dev is not None else None
    except (uapi.UapiError, OSError):
        state, dev = None, None
    if dev is None or state is None:
        return out
    peers = []
    for pub, p in state["peers"].items():
        age = now - p["last_handshake"] if p["last_handshake"] else None
        peers.append({
            "public_key": pub, "endpoint": p["endpoint"], "allowed_ips": p["allowed_ips"],
            "latest_handshake": p["last_handshake"] or None,
            "handshake_age": round(age, 3) if age is not None else None,
            "rx_bytes": p["rx_bytes"], "tx_bytes": p["tx_bytes"],
            "persistent_keepalive": p["persistent_keepalive"] or None,
        })
    ages = [p["handshake_age"] for p in peers if p["handshake_age"] is not None]
    out.update({
        "present": True, "implementation": dev.implementation, "public_key": state["public_key"],
        "listen_port": state["listen_port"] or None, "peers": peers,
        "handshake_age": min(ages) if ages else None,
        "up": bool(ages) and min(ages) < STALE_AFTER,
        "rx_bytes": sum(p["rx_bytes"] for p in peers), "tx_bytes": sum(p["tx_bytes"] for p in peers),
    })
    return out


def handshake_age(ifname: str) -> float | None:
    """Seconds since the most recent handshake with any peer; None when no tunnel or no handshake yet.

    Cheap enough for a metrics scrape (one UAPI or netlink round trip), never raises.
    """
    try:
        return status(ifname).get("handshake_age")
    except Exception:  # a metrics scrape must not fail because the tunnel is in a strange state
        return None


def format_text(st: dict) -> str:
    """Human-readable status, like a short `wg show`."""
    if not st["present"]:
        return f"interface: {st['interface']}\n  not present (tunnel down)\n"
    lines = [f"interface: {st['interface']} ({st['implementation']})",
             f"  public key: {st['public_key']}"]
    if st.get("listen_port"):
        lines.append(f"  listening port: {st['listen_port']}")
    for p in st["peers"]:
        lines.append(f"peer: {p['public_key']}")
        if p["endpoint"]:
            lines.append(f"  endpoint: {p['endpoint']}")
        lines.append(f"  allowed ips: {', '.join(p['allowed_ips']) or '(none)'}")
        age = p["handshake_age"]
        lines.append(f"  latest handshake: {'never' if age is None else f'{age:.0f} s ago'}")
        lines.append(f"  transfer: {p['rx_bytes']} B received, {p['tx_bytes']} B sent")
    return "\n".join(lines) + "\n"
