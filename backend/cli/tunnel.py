"""The backend's `tunnel` command: the home end of the WireGuard tunnel (see wireguard/cli.py)."""

from __future__ import annotations

from wireguard.cli import register_tunnel_command


def register(subparsers) -> None:
    register_tunnel_command(subparsers, "backend")
