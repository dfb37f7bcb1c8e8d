"""CLI: ``run`` (the backend daemon) and ``config check``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from backend.config import ConfigError, load_config
from backend.logsetup import setup_logging

# Written into the venv by provisioning (provision/deploy.py): where this host's files are, so the
# commands work without -c on a host whose files are not in the standard places.
PATHS_FILE = "homemx-paths.json"


def provisioned_path(key: str, fallback: str) -> str:
    """The path ``key`` of the venv's homemx-paths.json, else ``fallback``."""
    try:
        value = json.loads((Path(sys.prefix) / PATHS_FILE).read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return fallback
    return value if isinstance(value, str) and value else fallback


DEFAULT_CONFIG = provisioned_path("backend_config", "/etc/homemx/backend.toml")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the backend daemon")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    c = csub.add_parser("check", help="load and validate the config file, then exit")
    c.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_config_check)


def load_or_exit(path: str):
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.lines:  # every problem of the file, one line each
            print(f"homemx-backend: config error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_config_check(args) -> int:
    cfg = load_or_exit(args.config)
    print(f"{cfg.path}: ok ({len(cfg.listeners)} listeners, {len(cfg.domains)} domains, {len(cfg.dkim)} DKIM keys)")
    return 0


def cmd_run(args) -> int:
    return run_daemon(load_or_exit(args.config))


def run_daemon(cfg) -> int:
    setup_logging(cfg.server.log_level, cfg.server.log_format)
    from backend.run import serve

    from backend.dkim.keys import DKIMKeyError
    from backend.tls.context import TLSSetupError

    try:
        status = asyncio.run(serve(cfg))
    except (OSError, DKIMKeyError, TLSSetupError) as e:
        # A port in use, an unusable DKIM key or certificate: one line naming it, no traceback.
        print(f"homemx-backend: cannot start: {e}", file=sys.stderr)
        return 1
    return status  # 1 when a vital worker died (the watchdog logged which): restart me
