"""CLI: ``queue list|show|retry|hold|release|delete`` (postqueue/postsuper of homemx) and ``users add|passwd|delete|list``."""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import sys

from backend.smtp.paths import PathError, parse_address
from backend.local.maildir import ensure_maildir
from backend.cli.run import DEFAULT_CONFIG, load_or_exit
from backend.queue.model import QueueError
from backend.queue.store import Queue
from backend.queue.runner import poke_daemon
from backend.receive.users import UserDB, UserError


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

    u = sub.add_parser("users", help="manage mail users (Dovecot-compatible passwd-file)")
    usub = u.add_subparsers(dest="users_command", metavar="ACTION")
    usub.required = True
    for name in ("add", "passwd", "delete", "list"):
        p = usub.add_parser(name)
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        if name != "list":
            p.add_argument("address")
        if name in ("add", "passwd"):
            p.add_argument(
                "--password-file",
                help="read the password from this file ('-' = stdin) instead of prompting; never on the command line",
            )
        p.set_defaults(func=cmd_users, action=name)


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


def _read_password(args) -> str:
    if args.password_file == "-" or (args.password_file is None and not sys.stdin.isatty()):
        # Piped in (a script, provisioning): the first line of standard input is the password;
        # prompting twice would read the second prompt's answer from an exhausted pipe.
        line = sys.stdin.readline()
        if not line:
            raise UserError("no password on standard input (pipe one line, or use --password-file FILE)")
        pw = line.rstrip("\r\n")
    elif args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            pw = f.readline().rstrip("\r\n")
    else:
        try:
            pw = getpass.getpass(f"password for {args.address}: ")
            if pw != getpass.getpass("again: "):
                raise UserError("passwords do not match")
        except EOFError:
            raise UserError("no password given (use --password-file - to read it from standard input)") from None
    if len(pw) < 8:
        raise UserError("password too short (8 characters at least)")
    return pw


def cmd_users(args) -> int:
    cfg = load_or_exit(args.config)
    db = UserDB(cfg.passwd_file)
    try:
        if args.action == "list":
            for u in db.all():
                print(u.address)
            return 0
        try:
            addr = parse_address(args.address)
        except PathError as e:
            raise UserError(f"{args.address}: not a valid address ({e.reply[10:]})") from None
        if args.action in ("add", "passwd") and addr.domain not in cfg.domains:
            raise UserError(f"{cfg.path}: domain {addr.domain} is not configured (add [domain.\"{addr.domain}\"])")
        if args.action == "add":
            db.add(addr.key, _read_password(args))
            ensure_maildir(cfg.maildir_for(addr.key))
        elif args.action == "passwd":
            db.set_password(addr.key, _read_password(args))
        elif args.action == "delete":
            db.delete(addr.key)
        print(f"users {args.action}: {addr.key}")
        return 0
    except (UserError, OSError) as e:
        print(f"homemx-backend: {e}", file=sys.stderr)
        return 1
