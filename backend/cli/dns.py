"""The ``homemx-backend dns`` commands: print the records to publish, and check them live."""

from __future__ import annotations

import json
import sys

from backend.cli.run import DEFAULT_CONFIG  # the provisioned config, else /etc/homemx/backend.toml
from backend.config import ConfigError, load_config


def register(subparsers) -> None:
    p = subparsers.add_parser("dns", help="DNS records to publish, and a live check of them")
    sub = p.add_subparsers(dest="dns_command", metavar="SUBCOMMAND")
    sub.required = True

    r = sub.add_parser("records", help="print the DNS records to publish, as zone-file lines")
    r.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"backend config (default {DEFAULT_CONFIG})")
    r.add_argument("--ptr", action="store_true", help="print only the PTR records, as reverse-zone lines")
    r.add_argument("--ttl", type=int, default=3600, help="TTL of every record (default 3600)")
    r.set_defaults(func=cmd_records)

    c = sub.add_parser(
        "check",
        help="check the published records live, the MTA-STS policy over HTTPS and the certificates on 465/993 "
        "through the gateway; exit 1 on any failure",
    )
    c.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"backend config (default {DEFAULT_CONFIG})")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--timeout", type=float, default=5.0,
                   help="per-query and per-connection timeout in seconds (default 5)")
    c.add_argument("--ca-file", help="trust only this CA file for HTTPS and the certificates (a lab's CA); "
                   "default: the system's trust store")
    c.add_argument("--dns-only", action="store_true",
                   help="only query DNS: no HTTPS policy fetch, no TLS connection to the gateway")
    c.set_defaults(func=cmd_check)


def _load(path: str):
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.lines:  # every problem of the file, one line each
            print(f"homemx-backend: {line}", file=sys.stderr)
        return None


def cmd_records(args) -> int:
    from backend.dkim.keys import DKIMKeyError
    from backend.dns.records import render_ptr_records, render_records

    config = _load(args.config)
    if config is None:
        return 2
    try:
        sys.stdout.write(render_ptr_records(config, args.ttl) if args.ptr else render_records(config, args.ttl))
    except DKIMKeyError as e:
        print(f"homemx-backend: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args) -> int:
    from backend.dns.check import ConnectOptions, resolver_for, run_checks
    from backend.dns.lookup import DNSLookup

    config = _load(args.config)
    if config is None:
        return 2
    connect = None if args.dns_only else ConnectOptions(ca_file=args.ca_file, timeout=args.timeout)
    report = run_checks(config, DNSLookup(resolver_for(config, args.timeout)), connect)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.table())
    return 0 if report.ok else 1
