"""The homemx-gateway command line: run the edge proxy, check its config, and (when the wireguard package provides it) manage the tunnel."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homemx-gateway", description="homemx edge proxy (VPS side)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run the edge proxy")
    p.add_argument("-c", "--config", required=True, help="gateway TOML file")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("config", help="configuration commands")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    c = csub.add_parser("check", help="load and validate the config; binds nothing")
    c.add_argument("-c", "--config", required=True, help="gateway TOML file")
    c.set_defaults(func=_cmd_config_check)

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
