"""The homemx-gateway command line: run the edge proxy, check its config, and (when the wireguard package provides it) manage the tunnel."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config

# Written into the venv by provisioning (provision/deploy.py commands_on_path): this host's files,
# whatever its root, so `homemx-gateway status` works as the operator guide writes it, without -c.
PATHS_FILE = "homemx-paths.json"


def default_config() -> str:
    """The venv's homemx-paths.json ``gateway_config``, else the provisioned place."""
    try:
        named = json.loads((Path(sys.prefix) / PATHS_FILE).read_text(encoding="utf-8")).get("gateway_config")
    except (OSError, ValueError, AttributeError):
        named = None
    return named if isinstance(named, str) and named else "/etc/homemx/gateway.toml"


DEFAULT_CONFIG = default_config()


def _print_config_error(e: ConfigError) -> None:
    for line in e.lines:  # every problem of the file, one line each
        print(f"homemx-gateway: {line}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from .proxy import BindError
    from .run import run

    try:
        config = load_config(args.config)
    except ConfigError as e:
        _print_config_error(e)
        return 2
    try:
        return run(config)
    except BindError as e:
        print(f"homemx-gateway: {e}", file=sys.stderr)
        return 1


def _cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        _print_config_error(e)
        return 2
    for lc in config.listeners:
        binds = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in lc.listen)
        extras = []
        if lc.proxy_v2:
            extras.append("proxy_v2")
        if lc.greet_wait:
            extras.append(f"greet_wait={lc.greet_wait:g}s")
        if lc.dnsbl:
            extras.append("dnsbl")
        if lc.submission:
            extras.append("submission")
        if lc.implicit_tls:
            extras.append("implicit_tls")
        up = "%s:%d" % lc.upstream if ":" not in lc.upstream[0] else "[%s]:%d" % lc.upstream
        print(f"listener {lc.name}: {lc.kind} {binds} -> {up} {' '.join(extras)}".rstrip())
    print(f"{config.path}: OK")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from . import status

    try:
        config = load_config(args.config)
    except ConfigError as e:
        _print_config_error(e)
        return status.EXIT_CONFIG
    report = status.collect(config, args.timeout)
    if args.json:
        print(json.dumps(report.to_json(hostname=config.server.hostname, config=str(config.path)), indent=2))
    else:
        print(report.text(f"homemx-gateway {config.server.hostname} ({config.path})"))
    return status.EXIT_OK if report.ok else status.EXIT_ATTENTION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homemx-gateway", description="homemx edge proxy (VPS side)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    config_help = f"gateway TOML file (default {DEFAULT_CONFIG})"
    p = sub.add_parser("run", help="run the edge proxy")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=config_help)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("config", help="configuration commands")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    c = csub.add_parser("check", help="load and validate the config; binds nothing")
    c.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=config_help)
    c.set_defaults(func=_cmd_config_check)

    p = sub.add_parser("status", help="listeners, upstream, tunnel, metrics; exit 1 when something needs attention",
                       description="The gateway on one screen. Exit status 0: all is well; 1: something needs "
                       "attention; 2: the config cannot be read.")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=config_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=3.0, help="per probe, in seconds (default 3)")
    p.set_defaults(func=_cmd_status)

    try:  # the tunnel commands belong to the wireguard package, which may not be installed
        from wireguard.cli import register_tunnel_command
    except ImportError:
        pass
    else:
        register_tunnel_command(sub, "gateway")
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
