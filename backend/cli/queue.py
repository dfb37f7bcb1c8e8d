"""CLI: ``queue list|show|retry|hold|release|delete``, the postqueue/postsuper of homemx (works while the daemon runs)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from backend.cli.run import DEFAULT_CONFIG, load_or_exit
from backend.queue.model import QueueError
from backend.queue.store import Queue
from backend.queue.runner import poke_daemon


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("queue", help="inspect and manage the mail queue (works while the daemon runs)")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True
    for name, needs_id, helptext in (
        ("list", False, "list queued messages"),
        ("show", True, "show one message"),
        ("retry", None, "retry now (one message, or all)"),
        ("hold", True, "hold a message (no delivery attempts)"),
        ("release", True, "release a held message"),
        ("delete", True, "delete a message"),
    ):
        p = qsub.add_parser(name, help=helptext)
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if needs_id is True:
            p.add_argument("id")
        elif needs_id is None:
            p.add_argument("id", nargs="?")
        if name == "list":
            p.add_argument("--all", action="store_true", help="include delivered and bounced entries")
        p.set_defaults(func=cmd_queue, action=name)


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def cmd_queue(args) -> int:
    cfg = load_or_exit(args.config)
    if not cfg.queue_db.exists():
        print(f"homemx-backend: no queue database at {cfg.queue_db} (has the daemon run?)", file=sys.stderr)
        return 1
    q = Queue(cfg.queue_db, group_commit=False)
    try:
        if args.action == "list":
            states = None if args.all else ("queued", "deferred", "held")
            entries = q.list(states)
            if args.json:
                print(json.dumps([e.to_json() for e in entries], indent=2))
            else:
                for e in entries:
                    print(f"{e.id}  {_fmt_time(e.created)}  {e.size:>9}  <{e.sender}>")
                    for r in e.recipients:
                        print(f"    {r.state:<9} {r.address}  attempts={r.attempts} next={_fmt_time(r.next_attempt)}"
                              f"  {r.last_reply or ''}")
                print(f"-- {len(entries)} message(s)")
            return 0
        if args.action == "show":
            e = q.get(args.id)
            print(json.dumps(e.to_json(), indent=2))
            if not args.json:
                sys.stdout.write(q.content(args.id).decode("utf-8", "replace"))
            return 0
        op = {"retry": q.retry, "hold": q.hold, "release": q.release, "delete": q.delete}[args.action]
        n = op(args.id)
        if args.action in ("retry", "release"):
            # Due now: tell the running daemon, which otherwise looks only at its idle poll.
            poke_daemon(cfg.queue_db)
        result = {"action": args.action, "id": args.id, "recipients": n}
        print(json.dumps(result) if args.json else f"{args.action}: {args.id or 'all'}" + (f" ({n} recipients)" if n is not None else ""))
        return 0
    except QueueError as e:
        print(f"homemx-backend: {e}", file=sys.stderr)
        return 1
    finally:
        q.close()
