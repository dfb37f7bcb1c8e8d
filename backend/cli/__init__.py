"""The homemx-backend command line: one entry point, subcommands registered by the modules that own them."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module here exposes register(subparsers) that adds its subcommand(s) and sets
# `func=callable(args) -> int` on the parser. Keep the list explicit: a module that is not
# listed does not exist as a command.
COMMAND_MODULES = [
    "backend.cli.run",  # run, config check
    "backend.cli.demo",  # demo
    "backend.cli.queue",  # queue list/show/retry/hold/release/delete
    "backend.cli.users",  # users add/passwd/delete/list
    "backend.cli.tunnel",  # tunnel up/down/status/keygen/config (wireguard/cli.py)
    "backend.cli.dkim",  # dkim keygen
    "backend.cli.dns",  # dns records, dns check
    "backend.cli.status",  # status (one screen; exit 1 when something needs attention)
    "backend.cli.dmarc",  # dmarc report (DMARC aggregate reports received)
    "backend.cli.cert",  # cert status, cert renew --now (ACME)
    "backend.cli.apikey",  # apikey create/list/revoke (the HTTP send API, backend/http/api.py)
    "backend.cli.backup",  # backup DIR, restore DIR (backend/backup.py)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homemx-backend", description="homemx home MTA")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
