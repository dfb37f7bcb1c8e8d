"""CLI: ``dmarc report``, the DMARC aggregate reports received at the rua address, summarised per
reporting org and per source IP, with unknown sources sending as our domains highlighted."""

from __future__ import annotations

import argparse
import datetime
import json
import time

from backend.cli.run import DEFAULT_CONFIG, load_or_exit
from backend.reports import db
from backend.reports.dmarc import summarise


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dmarc", help="DMARC aggregate reports received at the rua address")
    dsub = d.add_subparsers(dest="dmarc_command", metavar="ACTION")
    dsub.required = True
    p = dsub.add_parser("report", help="per reporting org and per source IP: volume, SPF/DKIM/DMARC results")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.add_argument("--days", type=int, default=30, help="reports whose period ended in the last N days (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_report)


def _day(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d")


def _pf(s: dict, what: str) -> str:
    return f"{s[what + '_pass']}/{s[what + '_fail']}"


def cmd_report(args) -> int:
    cfg = load_or_exit(args.config)
    path = db.db_path(cfg.server.data_dir)
    since = time.time() - args.days * 86400
    summary = summarise(path, since, cfg.domains, cfg.gateway.public_ipv4 + cfg.gateway.public_ipv6)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"DMARC aggregate reports since {_day(summary['since'])} ({args.days} days)")
    if not summary["orgs"]:
        print("no reports (they arrive at the rua address of `homemx-backend dns records`, usually daily)")
        return 0
    print()
    print(f"{'reporting org':<40} {'reports':>7} {'messages':>9} {'dmarc p/f':>10}")
    for o in summary["orgs"]:
        pf = f"{o['dmarc_pass']}/{o['dmarc_fail']}"
        print(f"{o['org'][:40]:<40} {o['reports']:>7} {o['messages']:>9} {pf:>10}")
    print()
    print(f"{'source ip':<40} {'messages':>9} {'spf p/f':>9} {'dkim p/f':>9} {'dmarc p/f':>10}  header from / note")
    unknown = 0
    for s in summary["sources"]:
        note = ", ".join(s["header_from"])
        if s["gateway"]:
            note += " (our gateway)"
        if s["unknown"]:
            unknown += 1
            note = "UNKNOWN SOURCE: " + note
        print(f"{s['source_ip']:<40} {s['messages']:>9} {_pf(s, 'spf'):>9} {_pf(s, 'dkim'):>9} {_pf(s, 'dmarc'):>10}"
              f"  {note}")
    if unknown:
        print()
        print(f"{unknown} unknown source(s) sent mail as your domains and failed DMARC: a forger, or a service "
              "sending for you that needs SPF/DKIM set up (docs/reports.md)")
    return 0
