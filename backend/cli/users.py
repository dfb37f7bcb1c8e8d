"""CLI: ``users add|passwd|delete|list``, the mail users of the Dovecot-compatible passwd-file."""

from __future__ import annotations

import argparse
import getpass
import sys

from backend.cli.run import DEFAULT_CONFIG, load_or_exit
from backend.local.maildir import ensure_maildir
from backend.receive.users import UserDB, UserError
from backend.smtp.paths import PathError, parse_address


def register(sub: argparse._SubParsersAction) -> None:
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
